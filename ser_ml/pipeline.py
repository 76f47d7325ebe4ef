"""The analysis of a chunk of recordings: decode → speech check (Silero VAD) → speech clips →
Whisper encoder (batched across the chunk) → one RF pipeline call → batched LSTM.

Pure of database concerns: it takes job inputs and returns outcomes; ``worker.results`` persists them.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ser_ml import vad
from ser_ml.features import SAMPLE_RATE, SILENCE_DBFS, Features
from ser_ml.inference import Ensemble, Prediction
from ser_ml.segments import WHOLE_UP_TO_S, EnergyMeter, Segment, find_segments
from ser_ml.speech_detector import SURE_SPEECH_S
from ser_ml.speech_features import speech_clip
from ser_ml.time_limit import TimeLimit
from ser_shared import schemas
from ser_shared.audio import check_duration, decode, probe, stream
from ser_shared.errors import AudioError, IncompleteAudio, NoSpeech, SilentAudio
from ser_shared.settings import Settings

log = logging.getLogger(__name__)

# Longer recordings are decoded as a stream, in two passes, so memory does not grow with length.
STREAM_OVER_S = 60.0
# A recording of which less than this share of the header's length decodes is refused as truncated.
DECODED_SHARE = 0.5
# ``extract`` calls a recording silent from its peak, which a DC offset lifts (a cheap converter's
# silence, a constant float export): one whose signal never varies by more than the silence floor
# is silent too, and would otherwise get a confident-looking emotion for a flat line.
SILENT_SPAN = 2 * 10 ** (SILENCE_DBFS / 20)
# Segments of a streamed recording go through the models this many at a time, as they are cut, so
# only their probabilities are kept: memory does not grow with the recording's length.
STREAM_BATCH = 16
NO_SPEECH_MESSAGE = ("no speech was found in the recording (noise, tones, music or other sounds only): "
                     "there is no emotion to report")


@dataclass(frozen=True)
class JobInput:
    id: uuid.UUID
    path: Path
    format: str
    transcribe: str | None = None  # "google" | "sphinx" when a transcript was asked for
    language: str = "en-US"
    duration_s: float | None = None  # from the upload's header probe, when it told
    key: str | None = None  # the storage key ``path`` was made from (the worker spools it, see worker.spool)


@dataclass
class Outcome:
    job_id: uuid.UUID
    prediction: Prediction | None = None
    error_code: str | None = None
    error_message: str | None = None
    duration_s: float | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    # Transcript stage: "pending" until ``transcribe_all`` fills it; the decoded audio is kept only
    # for recordings that asked for one, and dropped once transcribed.
    transcript: dict[str, Any] | None = None
    audio: np.ndarray | None = field(default=None, repr=False)
    # Speech segments with their own predictions (one covering the whole of a short recording).
    segments: list[dict[str, Any]] | None = None


@dataclass
class Prepared:
    """A decoded recording's speech segments: clips still to encode (a short recording, batched
    with the rest of the chunk) or, for a streamed one, each model's probabilities already."""

    outcome: Outcome
    clips: list[np.ndarray] = field(default_factory=list)
    spans: list[Segment] = field(default_factory=list)
    probs: dict[str, list[np.ndarray]] = field(default_factory=dict)
    # Silero's longest speech region: under SURE_SPEECH_S the speech detector, fed the encoder's
    # vectors of this recording, decides whether it holds speech at all (see ser_ml.speech_detector).
    silero_longest_s: float = float("inf")

    @property
    def segments(self) -> int:
        return len(self.spans)


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000, 2)


Progress = Callable[[uuid.UUID, float], None]  # (job id, share done 0..1) while a long recording runs


def prepare(job: JobInput, settings: Settings, ensemble: Ensemble,
            on_progress: Progress | None = None) -> Prepared:
    """Decode, check for speech and segment one recording; an AudioError becomes a failed outcome.

    ``ensemble`` is used only by streamed recordings, whose segments are analysed as they are cut.
    """
    prepared = Prepared(Outcome(job.id))
    outcome = prepared.outcome
    try:
        if not job.path.exists():
            # The decoders report a missing file as undecodable data (decode_failed): say it is gone.
            raise FileNotFoundError(job.path)
        if _long(job, settings):
            _prepare_streamed(job, settings, ensemble, prepared, on_progress)
            return prepared
        started = time.perf_counter()
        audio = decode(job.path, job.format, SAMPLE_RATE, settings.max_duration_s)
        outcome.timings_ms["decode"] = _ms(started)
        outcome.duration_s = round(audio.size / SAMPLE_RATE, 3)
        _check_complete(job.duration_s, outcome.duration_s)
        check_duration(outcome.duration_s, settings.min_duration_s, settings.max_duration_s)
        _check_varies(float(audio.min()), float(audio.max()))
        started = time.perf_counter()
        probs = vad.speech_probabilities(audio)
        prepared.silero_longest_s = vad.longest_region_s(audio, probabilities=probs)
        outcome.timings_ms["vad"] = _ms(started)
        started = time.perf_counter()
        # Up to WHOLE_UP_TO_S a recording is one utterance; longer ones are cut where the trained
        # detector hears pauses, so noise between utterances is not analysed as speech. Where
        # Silero heard (almost) nothing, the energy segments go to the speech detector instead.
        sure = prepared.silero_longest_s >= SURE_SPEECH_S
        spans = vad.speech_segments(audio, probabilities=probs) if sure and outcome.duration_s > WHOLE_UP_TO_S \
            else find_segments(audio)
        for span in spans:
            try:
                prepared.clips.append(speech_clip(audio[int(span.start * SAMPLE_RATE) : int(span.end * SAMPLE_RATE)]))
                prepared.spans.append(span)
            except SilentAudio:
                if len(spans) == 1:
                    raise
        if not prepared.clips:
            raise NoSpeech(NO_SPEECH_MESSAGE)
        outcome.timings_ms["features"] = _ms(started)  # segments and speech clips; the encoder is inference
        if job.transcribe:
            outcome.audio = audio
            outcome.transcript = {"status": "pending", "engine": job.transcribe, "language": job.language}
    except AudioError as exc:
        outcome.error_code, outcome.error_message = exc.code, exc.message
    except FileNotFoundError:
        outcome.error_code, outcome.error_message = "audio_missing", "the stored recording is gone"
    except TimeLimit:
        raise  # the task ran out of time, not this recording: analyze fails the chunk time_limit_exceeded
    except Exception:
        # A bug or an input we did not foresee: fail this recording alone, keep the traceback.
        log.exception("analysis failed job_id=%s", job.id)
        outcome.error_code, outcome.error_message = "internal_error", "unexpected error while analysing"
    if outcome.error_code:
        prepared.clips, prepared.spans, prepared.probs = [], [], {}
    return prepared


def _check_complete(declared: float | None, decoded: float) -> None:
    """Raise IncompleteAudio when well under half of what the header declares decodes.

    A download or copy that stopped early keeps its header, and a decoder meeting smashed frames
    may stop there. Analysing the fragment would present the emotion of a few words (or of the
    leading pause) as the recording's. A file with most of it decodable is still analysed, like a
    WAV whose header overstates its size.
    """
    if declared and decoded < declared * DECODED_SHARE and declared - decoded > 1.0:
        raise IncompleteAudio(f"only {decoded:.2f} s of the {declared:.1f} s the header declares could be decoded: "
                              "the file is cut short (an incomplete copy?) or damaged")


def _check_varies(low: float, high: float) -> None:
    """Raise SilentAudio when the signal's range is within the silence floor (a flat line)."""
    if high - low < SILENT_SPAN:
        raise SilentAudio("the recording is silent: its signal does not vary")


def _long(job: JobInput, settings: Settings) -> bool:
    """Stream recordings longer than STREAM_OVER_S (or of unknown length) instead of decoding whole."""
    duration = job.duration_s
    if duration is None:
        try:
            duration = probe(job.path, job.format, settings.max_duration_s).duration_s
        except AudioError:
            return False  # the one-shot decode reports the error
    return duration is None or duration > STREAM_OVER_S


def _prepare_streamed(job: JobInput, settings: Settings, ensemble: Ensemble, prepared: Prepared,
                      on_progress: Progress | None = None) -> None:
    """Two passes over the decoded stream, holding about one block and a few segments at a time.

    Pass 1 measures frame energies and speech probabilities and finds the segments; pass 2 cuts
    each segment out of the stream as it goes by, and every STREAM_BATCH segments goes through
    the models. Memory stays bounded whatever the length (unless a transcript is asked for: the
    transcription stage needs the whole recording).
    """
    outcome = prepared.outcome
    started = time.perf_counter()
    meter, speech = EnergyMeter(), vad.SpeechMeter()
    low, high = np.inf, -np.inf
    for block in stream(job.path, job.format, SAMPLE_RATE, settings.max_duration_s):
        meter.feed(block)
        speech.feed(block)
        if block.size:
            low, high = min(low, float(block.min())), max(high, float(block.max()))
    energy = meter.finish()
    probabilities = speech.finish()
    outcome.duration_s = round(meter.samples / SAMPLE_RATE, 3)
    _check_complete(job.duration_s, outcome.duration_s)
    check_duration(outcome.duration_s, settings.min_duration_s, settings.max_duration_s)
    _check_varies(low, high)
    spans = vad.segments_from_probabilities(probabilities, energy, outcome.duration_s)
    if not spans:
        raise NoSpeech(NO_SPEECH_MESSAGE)
    outcome.timings_ms["decode"] = _ms(started)
    started = time.perf_counter()
    kept: list[np.ndarray] = []
    buf, offset, i = np.zeros(0, dtype=np.float32), 0, 0  # buf holds samples [offset, offset + buf.size)
    for block in stream(job.path, job.format, SAMPLE_RATE, settings.max_duration_s):
        if job.transcribe:
            kept.append(block)
        buf = np.concatenate([buf, block])
        i = _cut_ready(spans, i, buf, offset, prepared, ensemble, final=False)
        if on_progress is not None and spans:
            on_progress(job.id, i / len(spans))
        drop = (int(spans[i].start * SAMPLE_RATE) if i < len(spans) else offset + buf.size) - offset
        drop = max(0, min(drop, buf.size))
        buf, offset = buf[drop:], offset + drop
    _cut_ready(spans, i, buf, offset, prepared, ensemble, final=True)
    if not prepared.spans:
        raise NoSpeech(NO_SPEECH_MESSAGE)
    outcome.timings_ms["features"] = _ms(started)
    if job.transcribe:
        outcome.audio = np.concatenate(kept)
        outcome.transcript = {"status": "pending", "engine": job.transcribe, "language": job.language}


def _cut_ready(spans: list[Segment], i: int, buf: np.ndarray, offset: int, prepared: Prepared,
               ensemble: Ensemble, final: bool) -> int:
    """Cut every segment from ``i`` on that ``buf`` now covers; returns the next one's index.

    Cut clips wait in ``prepared.clips`` until STREAM_BATCH of them (or the end) are there, then
    go through the models together and only their probabilities are kept.
    """
    while i < len(spans):
        start, end = int(spans[i].start * SAMPLE_RATE) - offset, int(spans[i].end * SAMPLE_RATE) - offset
        if end > buf.size and not final:
            break
        try:
            prepared.clips.append(speech_clip(buf[max(start, 0) : end]))
            prepared.spans.append(spans[i])
        except SilentAudio:
            pass  # a segment of near-silence says nothing: leave it out
        i += 1
    if prepared.clips and (final or len(prepared.clips) >= STREAM_BATCH):
        for model, p in ensemble.predict_clips(prepared.clips).items():
            prepared.probs.setdefault(model, []).append(p)
        prepared.clips = []
    return i


def run(ensemble: Ensemble, jobs: list[JobInput], settings: Settings,
        on_progress: Progress | None = None) -> list[Outcome]:
    """Analyse a chunk; every input gets exactly one outcome, in order.

    The speech clips of all short recordings go through the encoder and both models together;
    a recording's result is its segments' probabilities averaged by how much speech each holds.
    """
    prepared = [prepare(job, settings, ensemble, on_progress) for job in jobs]
    short = [p for p in prepared if p.clips]  # streamed ones were analysed while they were cut
    clips = [c for p in short for c in p.clips]
    if clips:
        started = time.perf_counter()
        feats = ensemble.features(clips)
        short, feats = _drop_no_speech(ensemble, short, feats)
        probs = ensemble.predict_proba(feats) if feats else {}
        per_clip = _ms(started) / len(clips)
        row = 0
        for p in short:
            n = len(p.clips)
            p.probs = {m: [v[row : row + n]] for m, v in probs.items()}
            p.clips = []
            p.outcome.timings_ms["inference"] = round(per_clip * n, 2)
            row += n
    cut = settings.uncertain_threshold
    for p in prepared:
        if not p.probs:
            continue
        stacked = {m: np.concatenate(v) for m, v in p.probs.items()}
        rows = list(range(p.segments))
        # Weighted by speech, not by span: a segment that is mostly silence counts for little.
        lengths = np.array([max(span.speech_s, 0.01) for span in p.spans])
        p.outcome.prediction = ensemble.combine(stacked, rows, lengths, cut)
        p.outcome.segments = [_segment(ensemble.combine(stacked, [r], np.ones(1), cut), span)
                              for r, span in zip(rows, p.spans, strict=True)]
        p.probs = {}
    for p in prepared:
        p.outcome.timings_ms["total"] = round(sum(p.outcome.timings_ms.values()), 2)
    return [p.outcome for p in prepared]


def _drop_no_speech(ensemble: Ensemble, short: list[Prepared], feats: list[Features]
                    ) -> tuple[list[Prepared], list[Features]]:
    """Fail ``no_speech`` the recordings that Silero barely heard and the speech detector, on
    the same encoder vectors the models read, calls non-speech; the rest go on to the models."""
    kept: list[Prepared] = []
    kept_feats: list[Features] = []
    row = 0
    for p in short:
        mine = feats[row : row + len(p.clips)]
        row += len(p.clips)
        if p.silero_longest_s < SURE_SPEECH_S and ensemble.no_speech(p.silero_longest_s, mine):
            p.outcome.error_code, p.outcome.error_message = NoSpeech.code, NO_SPEECH_MESSAGE
            p.outcome.audio = p.outcome.transcript = None
            p.clips, p.spans = [], []
            continue
        kept.append(p)
        kept_feats.extend(mine)
    return kept, kept_feats


def _segment(prediction: Prediction, span: Segment) -> dict[str, Any]:
    """A result's segment as stored and served (``ser_shared.schemas.Segment``)."""
    return schemas.Segment(start=span.start, end=span.end, speech_s=span.speech_s, emotion=prediction.emotion,
                           confidence=prediction.confidence, uncertain=prediction.uncertain,
                           probabilities=prediction.probabilities).to_json()


def transcribe_all(outcomes: list[Outcome], settings: Settings) -> dict[uuid.UUID, dict[str, Any]]:
    """Transcripts for the analysed recordings that asked for one (never raises, never blocks
    longer than ``transcribe_timeout_s`` per recording). Runs after the emotions are stored.

    A recording with segments is transcribed segment by segment (the budget shared between them):
    each segment gets its own text (and words, from Whisper), and the recording's is their
    concatenation.
    """
    done: dict[uuid.UUID, dict[str, Any]] = {}
    for outcome in outcomes:
        if outcome.audio is None or outcome.transcript is None or outcome.prediction is None:
            continue
        done[outcome.job_id] = _transcribe(outcome.audio, outcome.transcript, outcome.segments or [], settings)
        outcome.audio = None
    return done


def transcribe_stored(job: JobInput, transcript: dict[str, Any], segments: list[dict[str, Any]] | None,
                      settings: Settings) -> dict[str, Any]:
    """The transcript stage again, for a recording whose emotion is stored but whose transcript
    was interrupted (its worker was killed): the stored audio is decoded once more. ``segments``
    (the stored ones) get their own transcripts, as in ``transcribe_all``."""
    try:
        audio = decode(job.path, job.format, SAMPLE_RATE, settings.max_duration_s)
    except (AudioError, FileNotFoundError) as exc:
        message = exc.message if isinstance(exc, AudioError) else "the stored recording is gone"
        return {**transcript, "status": "unavailable", "text": None, "reason": "audio_missing",
                "message": message}
    return _transcribe(audio, transcript, segments or [], settings)


def _transcribe(audio: np.ndarray, pending: dict[str, Any], segments: list[dict[str, Any]],
                settings: Settings) -> dict[str, Any]:
    """The finished transcript for ``pending``; each of ``segments`` gets its ``transcript`` (and,
    from Whisper, its ``words``, timed from the start of the recording)."""
    from ser_ml.transcribe import transcribe_segments

    engine, language = pending["engine"], pending["language"]
    # Bookkeeping of the stage (how many times it was started) stays with the finished transcript.
    kept = {"attempts": pending["attempts"]} if "attempts" in pending else {}
    spans = [(float(seg["start"]), float(seg["end"])) for seg in segments] or None
    t, heard = transcribe_segments(audio, SAMPLE_RATE, engine, language, spans,
                                   timeout_s=settings.transcribe_timeout_s, google_key=settings.google_speech_key)
    for seg, got in zip(segments, heard, strict=True):
        seg.pop("words", None)  # a stage made again (its worker was killed) starts from what is heard now
        seg["transcript"] = None if got is None else got.text
        if got is not None and got.words is not None:
            seg["words"] = [{"start": w.start, "end": w.end, "word": w.word} for w in got.words]
    return {**t.stored(), **({"segments": True} if segments else {}), **kept}
