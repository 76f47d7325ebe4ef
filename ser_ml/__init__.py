"""Pure numeric code: decoding checks, features, the Whisper encoder, VAD, segments, the pipeline,
inference and transcripts. Arrays and paths in, results out: no Celery, no SQL, no Flask (the
worker persists what it returns). Offline training recipes live in ``ser_ml.train``."""
