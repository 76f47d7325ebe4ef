"""The analysis of a chunk of recordings: decode → features → one RF call → batched LSTM.

Pure of database concerns: it takes job inputs and returns outcomes; ``worker.store`` persists them.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ser_shared.audio import check_duration, decode
from ser_shared.errors import AudioError, SilentAudio
from ser_shared.features import SAMPLE_RATE, Features, extract
from ser_shared.segments import Segment, find_segments
from ser_shared.settings import Settings
from worker.inference import Ensemble, Prediction

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobInput:
    id: uuid.UUID
    path: Path
    format: str
    transcribe: str | None = None  # "google" | "sphinx" when a transcript was asked for
    language: str = "en-US"


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
    """A decoded recording's model inputs: one Features per speech segment."""

    outcome: Outcome
    feats: list[Features] = field(default_factory=list)
    spans: list[Segment] = field(default_factory=list)


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000, 2)


def prepare(job: JobInput, settings: Settings) -> Prepared:
    """Decode, segment and featurise one recording; an AudioError becomes a failed outcome."""
    prepared = Prepared(Outcome(job.id))
    outcome = prepared.outcome
    try:
        started = time.perf_counter()
        audio = decode(job.path, job.format, SAMPLE_RATE, settings.max_duration_s)
        outcome.timings_ms["decode"] = _ms(started)
        outcome.duration_s = round(audio.size / SAMPLE_RATE, 3)
        check_duration(outcome.duration_s, settings.min_duration_s, settings.max_duration_s)
        started = time.perf_counter()
        spans = find_segments(audio)
        for span in spans:
            try:
                prepared.feats.append(extract(audio[int(span.start * SAMPLE_RATE) : int(span.end * SAMPLE_RATE)]))
                prepared.spans.append(span)
            except SilentAudio:
                if len(spans) == 1:
                    raise
        if not prepared.feats:
            raise SilentAudio("no segment of the recording holds audible speech")
        outcome.timings_ms["features"] = _ms(started)
        if job.transcribe:
            outcome.audio = audio
            outcome.transcript = {"status": "pending", "engine": job.transcribe, "language": job.language}
    except AudioError as exc:
        outcome.error_code, outcome.error_message = exc.code, exc.message
    except FileNotFoundError:
        outcome.error_code, outcome.error_message = "audio_missing", "the stored recording is gone"
    except Exception:
        # A bug or an input we did not foresee: fail this recording alone, keep the traceback.
        log.exception("analysis failed job_id=%s", job.id)
        outcome.error_code, outcome.error_message = "internal_error", "unexpected error while analysing"
    if outcome.error_code:
        prepared.feats, prepared.spans = [], []
    return prepared


def run(ensemble: Ensemble, jobs: list[JobInput], settings: Settings) -> list[Outcome]:
    """Analyse a chunk; every input gets exactly one outcome, in order.

    All segments of all recordings go through the models together (one RF call, batched LSTM);
    a recording's result is its segments' probabilities averaged by duration.
    """
    prepared = [prepare(job, settings) for job in jobs]
    feats = [f for p in prepared for f in p.feats]
    if feats:
        started = time.perf_counter()
        probs = ensemble.predict_proba(feats)
        cut = settings.uncertain_threshold
        row = 0
        for p in prepared:
            if not p.feats:
                continue
            rows = list(range(row, row + len(p.feats)))
            row += len(p.feats)
            # Weighted by speech, not by span: a segment that is mostly silence counts for little.
            lengths = np.array([max(span.speech_s, 0.01) for span in p.spans])
            p.outcome.prediction = ensemble.combine(probs, rows, lengths, cut)
            p.outcome.segments = [_segment(ensemble.combine(probs, [r], np.ones(1), cut), span)
                                  for r, span in zip(rows, p.spans, strict=True)]
        per_clip = _ms(started) / len(feats)
        for p in prepared:
            if p.feats:
                p.outcome.timings_ms["inference"] = round(per_clip * len(p.feats), 2)
    for p in prepared:
        p.outcome.timings_ms["total"] = round(sum(p.outcome.timings_ms.values()), 2)
    return [p.outcome for p in prepared]


def _segment(prediction: Prediction, span: Segment) -> dict[str, Any]:
    return {"start": span.start, "end": span.end, "speech_s": span.speech_s, "emotion": prediction.emotion,
            "confidence": prediction.confidence, "uncertain": prediction.uncertain,
            "probabilities": prediction.probabilities}


def transcribe_all(outcomes: list[Outcome], settings: Settings) -> dict[uuid.UUID, dict[str, Any]]:
    """Transcripts for the analysed recordings that asked for one (never raises, never blocks
    longer than ``transcribe_timeout_s`` per recording). Runs after the emotions are stored."""
    from worker.transcribe import transcribe

    done: dict[uuid.UUID, dict[str, Any]] = {}
    for outcome in outcomes:
        if outcome.audio is None or outcome.transcript is None or outcome.prediction is None:
            continue
        t = transcribe(outcome.audio, SAMPLE_RATE, outcome.transcript["engine"], outcome.transcript["language"],
                       timeout_s=settings.transcribe_timeout_s, google_key=settings.google_speech_key)
        outcome.audio = None
        done[outcome.job_id] = {"status": t.status, "engine": t.engine, "language": t.language, "text": t.text,
                                "reason": t.reason, "message": t.message, "seconds": round(t.seconds, 3)}
    return done
