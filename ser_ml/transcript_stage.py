"""The transcript stage: after a chunk's emotions are stored, the recordings that asked for a
transcript are transcribed (``transcribe_all``), segment by segment and, for a recording split into
speakers, channel by channel; and again from the stored audio when a worker was killed during it
(``transcribe_stored``, then ``restore_conversation``).

Each recording has a time budget (``budgeted``): the larger of ``transcribe_timeout_s`` and
``transcribe_s_per_speech_s`` per second of its speech. Nothing here raises: a transcript that
cannot be made is stored ``unavailable`` with its reason.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from ser_ml.features import SAMPLE_RATE
from ser_ml.pipeline import JobInput, Outcome, converse, merged
from ser_shared.audio import decode, decode_channels
from ser_shared.errors import AudioError
from ser_shared.settings import Settings

# --- A split recording: each channel through ``_transcribe`` ---------------------------------------

def _transcribe_channels(audio: np.ndarray, pending: dict[str, Any], entries: list[dict[str, Any]],
                         settings: Settings) -> dict[str, Any]:
    """Each channel of (channels, samples) ``audio`` transcribed with its own segments (``entries``:
    the outcome's ``schemas.Channel`` dicts, whose segments get their text), the budget shared
    between the channels; the recording's text is all segments' in time order.

    Outside its segments a channel is muted first: there it holds only the other speakers'
    crosstalk, which an engine given the whole channel would transcribe as this speaker's words.
    """
    started = time.monotonic()
    done: list[dict[str, Any]] = []
    for entry in entries:
        segments = entry["segments"]
        left = settings.transcribe_timeout_s - (time.monotonic() - started)
        if not segments:
            continue
        if left <= 0:
            break
        made = _transcribe(_only(audio[entry["index"]], segments), pending, segments,
                           settings.model_copy(update={"transcribe_timeout_s": left}))
        if len(segments) == 1 and made["status"] == "succeeded" and segments[0].get("transcript") is None:
            segments[0]["transcript"] = made["text"]  # transcribed whole: its one segment's text
        done.append(made)
    # The recording's transcript is a channel's (the first that succeeded, else the last that
    # failed, with whatever else the engine reports) with every channel's text, in time order.
    ok = [t for t in done if t["status"] == "succeeded"]
    base = ok[0] if ok else done[-1] if done else {
        "status": "unavailable", "engine": pending["engine"], "language": pending["language"],
        "reason": "timeout", "message": "no time was left for the transcript"}
    kept = {"attempts": pending["attempts"]} if "attempts" in pending else {}
    return {**base, "text": " ".join(s["transcript"] for s in merged(entries) if s.get("transcript")) if ok else None,
            "seconds": round(time.monotonic() - started, 3), "segments": True, **kept}


def _only(audio: np.ndarray, segments: Sequence[dict[str, Any]]) -> np.ndarray:
    """A copy of ``audio`` silent outside ``segments``."""
    out = np.zeros_like(audio)
    for seg in segments:
        start, end = int(seg["start"] * SAMPLE_RATE), int(seg["end"] * SAMPLE_RATE)
        out[start:end] = audio[start:end]
    return out


def _transcribe_stored_channels(job: JobInput, transcript: dict[str, Any], entries: list[dict[str, Any]],
                                settings: Settings) -> dict[str, Any]:
    try:
        audio = decode_channels(job.path, job.format, SAMPLE_RATE, settings.max_duration_s, job.channel_count)
    except (AudioError, FileNotFoundError) as exc:
        message = exc.message if isinstance(exc, AudioError) else "the stored recording is gone"
        return {**transcript, "status": "unavailable", "text": None, "reason": "audio_missing",
                "message": message}
    return _transcribe_channels(audio, transcript, entries, settings)


def restore_conversation(job_id: uuid.UUID, segments: list[dict[str, Any]] | None, entries: list[dict[str, Any]],
                         stored: dict[str, Any] | None) -> Outcome:
    """A stored result's segments, channels and conversation once ``transcribe_stored`` has given
    their segments text: the recording's segments and its channels' are the same again (they
    were stored apart) and the metrics and conversation are made anew."""
    mode = (stored or {}).get("channels", "mono")
    if mode == "split":
        segments = merged(entries)
    elif entries and segments is not None:
        entries[0]["segments"] = segments
    outcome = Outcome(job_id, duration_s=(stored or {}).get("duration_s"), segments=segments, mode=mode,
                      channels=entries)
    converse(outcome)
    return outcome


def budgeted(settings: Settings, segments: Sequence[dict[str, Any]]) -> Settings:
    """``settings`` with the transcript budget of a recording whose speech is ``segments``: the
    larger of ``transcribe_timeout_s`` and ``transcribe_s_per_speech_s`` per second of speech."""
    speech = sum(float(seg["end"]) - float(seg["start"]) for seg in segments)
    budget = max(settings.transcribe_timeout_s, settings.transcribe_s_per_speech_s * speech)
    return settings if budget == settings.transcribe_timeout_s else \
        settings.model_copy(update={"transcribe_timeout_s": budget})


def transcribe_all(outcomes: list[Outcome], settings: Settings) -> dict[uuid.UUID, dict[str, Any]]:
    """Transcripts for the analysed recordings that asked for one (never raises, never blocks
    longer than its budget per recording: see ``budgeted``). Runs after the emotions are stored.

    A recording with segments is transcribed segment by segment (the budget shared between them):
    each segment gets its own text (and words, from Whisper), and the recording's is their
    concatenation.
    """
    done: dict[uuid.UUID, dict[str, Any]] = {}
    for outcome in outcomes:
        if outcome.audio is None or outcome.transcript is None or outcome.prediction is None:
            continue
        settings = budgeted(settings, outcome.segments or [])
        if outcome.mode == "split":  # channels transcribed one by one: see _transcribe_channels
            done[outcome.job_id] = _transcribe_channels(outcome.audio, outcome.transcript, outcome.channels or [],
                                                        settings)
        else:
            done[outcome.job_id] = _transcribe(outcome.audio, outcome.transcript, outcome.segments or [], settings)
        outcome.audio = None
        if outcome.channels:
            converse(outcome)  # words per minute and the conversation transcript
    return done


def transcribe_stored(job: JobInput, transcript: dict[str, Any], segments: list[dict[str, Any]] | None,
                      settings: Settings, channels: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The transcript stage again, for a recording whose emotion is stored but whose transcript
    was interrupted (its worker was killed): the stored audio is decoded once more. ``segments``
    (the stored ones) get their own transcripts, as in ``transcribe_all``; so do a split
    recording's ``channels`` (see ``_transcribe_channels``, and ``restore_conversation`` after)."""
    spoken = [seg for c in channels for seg in c["segments"]] if channels else segments or []
    settings = budgeted(settings, spoken)
    if channels is not None and len(channels) > 1:  # a split recording
        return _transcribe_stored_channels(job, transcript, channels, settings)
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
