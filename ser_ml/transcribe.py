"""Speech-to-text beside the emotion analysis, through the SpeechRecognition package.

Two engines: ``google`` (Google's free Web Speech endpoint, needs the network, any BCP-47 language) and
``sphinx`` (CMU PocketSphinx, offline, only the US-English model that SpeechRecognition bundles).

A transcript is a nice-to-have next to the emotion result, so :func:`transcribe` never raises for a
transcription problem: an unreachable or slow engine, an HTTP error, a rate limit, silence or an
unsupported language all come back as ``status="unavailable"`` with a stable ``reason`` code. The one
exception that does pass through is Celery's soft time limit, which belongs to the task, not to us.

The call is bounded by ``timeout_s``. Google requests run in a helper thread that is abandoned when the
budget runs out (its socket timeout ends it soon after). PocketSphinx decodes in C while holding the GIL
and cannot be interrupted, so its chunks are kept short (``SPHINX_CHUNK_S``) and a chunk is not started
when the decoding speed seen so far says it would overrun the budget; the overshoot is at most one chunk.

When the budget runs out, or an engine fails part-way through a long recording, the result is
``unavailable`` with no text at all: ``text`` is set if and only if ``status == "succeeded"``, so a
truncated transcript is never mistaken for the whole one. ``message`` says how far it got.
"""

from __future__ import annotations

import http.client
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.error import HTTPError, URLError

import numpy as np

from ser_ml.features import SAMPLE_RATE
from ser_ml.time_limit import TimeLimit  # must reach the task, which turns it into a failed job
from ser_shared.audio import resample

log = logging.getLogger(__name__)

ENGINES = ("google", "sphinx")
SUCCEEDED = "succeeded"
UNAVAILABLE = "unavailable"
# Google's free Web Speech endpoint is made for short utterances and rejects long uploads; 30 s is a safe ceiling.
GOOGLE_MAX_CHUNK_S = 30.0
# PocketSphinx holds the GIL for a whole chunk (0.3-0.4 s per audio second here, model load included): short
# chunks keep the unavoidable overrun of the time budget small.
SPHINX_CHUNK_S = 10.0
SPHINX_LANGUAGES = {"en", "en-us"}  # the only model SpeechRecognition bundles
# Until a chunk has been decoded, assume PocketSphinx costs this many seconds per audio second.
SPHINX_PRIOR_COST = 0.5
SPLIT_SEARCH_FRACTION = 0.2  # look for a quiet cut point in the last fifth of a chunk ...
SPLIT_SEARCH_MAX_S = 5.0  # ... but no further back than this
SPLIT_FRAME_S = 0.02
SILENT_RMS = 10 ** (-60 / 20)  # a chunk quieter than -60 dBFS is not sent to any engine
_LANGUAGE_TAG = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8})*$")


@dataclass(frozen=True)
class Transcript:
    status: str  # "succeeded" | "unavailable"
    engine: str
    language: str
    text: str | None  # set if and only if status == "succeeded"
    # For "unavailable", a stable code: network_error, timeout, rate_limited, http_error, bad_response,
    # no_speech, unsupported_language, unknown_engine, engine_missing, invalid_audio, engine_error.
    reason: str | None
    message: str | None  # human-readable detail
    seconds: float  # wall time spent

    @property
    def succeeded(self) -> bool:
        return self.status == SUCCEEDED


class _Unavailable(Exception):
    """Internal: stop and report ``reason``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def transcribe(audio: np.ndarray, sample_rate: int, engine: str, language: str = "en-US", *,
               timeout_s: float = 15.0, google_key: str | None = None, chunk_s: float = 30.0) -> Transcript:
    """Transcribe mono float audio in [-1, 1]; never raises for a transcription failure (see the module doc).

    Long audio is cut into chunks of at most ``chunk_s`` seconds (capped per engine) at quiet points and
    the chunk texts are joined with spaces. ``google_key`` is Google's API key; None uses the shared
    development key SpeechRecognition ships, which Google may throttle or revoke.
    """
    started = time.monotonic()
    deadline = started + max(0.0, timeout_s)

    def result(status: str, text: str | None = None, reason: str | None = None,
               message: str | None = None) -> Transcript:
        return Transcript(status, engine, language, text, reason, message, round(time.monotonic() - started, 3))

    try:
        text = _transcribe(audio, sample_rate, engine, language, deadline, google_key, chunk_s)
    except TimeLimit:
        raise
    except _Unavailable as exc:
        log.info("transcript unavailable engine=%s language=%s reason=%s: %s", engine, language, exc.reason,
                 exc.message)
        return result(UNAVAILABLE, reason=exc.reason, message=exc.message)
    except Exception as exc:  # a bug or an engine failure nobody foresaw: still only a missing transcript
        log.exception("transcription failed engine=%s language=%s", engine, language)
        return result(UNAVAILABLE, reason="engine_error", message=f"{type(exc).__name__}: {exc}"[:300])
    return result(SUCCEEDED, text=text)


def _transcribe(audio: np.ndarray, sample_rate: int, engine: str, language: str, deadline: float,
                google_key: str | None, chunk_s: float) -> str:
    if engine not in ENGINES:
        raise _Unavailable("unknown_engine", f"unknown transcription engine {engine!r}; use one of {ENGINES}")
    if not isinstance(language, str) or not _LANGUAGE_TAG.match(language):
        raise _Unavailable("unsupported_language", f"{language!r} is not a BCP-47 language tag like en-US")
    if engine == "sphinx" and language.lower() not in SPHINX_LANGUAGES:
        raise _Unavailable("unsupported_language", f"the offline engine only knows US English, not {language}")
    pcm = _to_pcm(audio, sample_rate)
    try:
        import speech_recognition as sr
    except ImportError as exc:
        raise _Unavailable("engine_missing", "the SpeechRecognition package is not installed") from exc

    method = "recognize_google" if engine == "google" else "recognize_sphinx"
    if not hasattr(sr.Recognizer, method):  # SpeechRecognition attaches its engines only if they import
        raise _Unavailable("engine_missing", f"this SpeechRecognition has no {method}")

    max_chunk_s = min(chunk_s, GOOGLE_MAX_CHUNK_S if engine == "google" else SPHINX_CHUNK_S)
    if not max_chunk_s > 0:
        raise _Unavailable("invalid_audio", f"chunk length must be positive, got {chunk_s}")
    chunks = [(a, b) for a, b in split_points(pcm, SAMPLE_RATE, max_chunk_s) if not _silent(pcm[a:b])]
    if not chunks:
        raise _Unavailable("no_speech", "the recording is silent")
    recognise = _google(sr, language, google_key) if engine == "google" else _sphinx(sr)

    texts: list[str] = []
    cost_per_s = SPHINX_PRIOR_COST  # only used for sphinx admission
    for i, (a, b) in enumerate(chunks):
        remaining = deadline - time.monotonic()
        chunk_dur = (b - a) / SAMPLE_RATE
        if remaining <= 0 or (engine == "sphinx" and cost_per_s * chunk_dur > remaining):
            raise _Unavailable("timeout", _progress("the time budget ran out", i, chunks))
        data = _int16(pcm[a:b]).tobytes()
        chunk_started = time.monotonic()
        text = recognise(sr.AudioData(data, SAMPLE_RATE, 2), remaining, i, chunks)
        cost_per_s = max(cost_per_s if i else 0.0, (time.monotonic() - chunk_started) / chunk_dur)
        if text:
            texts.append(text)
    if not texts:
        raise _Unavailable("no_speech", "the engine recognised no words")
    return " ".join(texts)


_Recognise = Callable[[Any, float, int, list[tuple[int, int]]], str]


def _google(sr: Any, language: str, key: str | None) -> _Recognise:
    try:
        sr.audio.get_flac_converter()  # the upload is FLAC: a missing encoder is an installation problem
    except OSError as exc:
        raise _Unavailable("engine_missing", f"no FLAC encoder for the Google engine: {exc}") from exc

    def recognise(data: Any, remaining: float, i: int, chunks: list[tuple[int, int]]) -> str:
        recognizer = sr.Recognizer()
        # A socket timeout per connect/read; the thread deadline below bounds the request as a whole.
        recognizer.operation_timeout = max(0.05, remaining)
        try:
            return str(_within(lambda: recognizer.recognize_google(data, key=key, language=language), remaining))
        except sr.UnknownValueError:
            return ""  # this chunk holds nothing Google could recognise
        except (sr.RequestError, OSError, http.client.HTTPException) as exc:
            reason, detail = _network_reason(exc)
            raise _Unavailable(reason, _progress(f"Google: {detail}", i, chunks)) from exc
        except (ValueError, KeyError, TypeError) as exc:  # a reply that is not Google's JSON lines
            detail = f"Google sent an unreadable reply ({type(exc).__name__}: {exc})"
            raise _Unavailable("bad_response", _progress(detail, i, chunks)) from exc

    return recognise


def _sphinx(sr: Any) -> _Recognise:
    def recognise(data: Any, remaining: float, i: int, chunks: list[tuple[int, int]]) -> str:
        try:
            return str(sr.Recognizer().recognize_sphinx(data, language="en-US")).strip()
        except sr.UnknownValueError:
            return ""
        except sr.RequestError as exc:  # SpeechRecognition's word for "PocketSphinx is not set up"
            raise _Unavailable("engine_missing", f"PocketSphinx: {exc}") from exc

    return recognise


def _within(call: Callable[[], object], seconds: float) -> object:
    """Run ``call`` in a daemon thread and give up on it after ``seconds`` (raising TimeoutError)."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = call()
        except Exception as exc:
            box["error"] = exc

    worker = threading.Thread(target=target, name="transcribe-request", daemon=True)
    worker.start()
    worker.join(max(0.0, seconds))
    if worker.is_alive():
        raise TimeoutError(f"no answer within {seconds:.1f} s")
    error = box.get("error")
    if isinstance(error, Exception):
        raise error
    return box.get("value")


def _network_reason(exc: BaseException) -> tuple[str, str]:
    """Map the exception chain of a failed request to a reason code and a short detail."""
    # SpeechRecognition wraps urllib's errors in RequestError, keeping the original as __context__.
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, HTTPError):
            if seen.code == 429:
                return "rate_limited", f"rate limited (HTTP 429 {seen.reason})"
            return "http_error", f"HTTP {seen.code} {seen.reason}"
        if isinstance(seen, TimeoutError):
            return "timeout", "no answer before the time budget ran out"
        if isinstance(seen, URLError) and isinstance(seen.reason, TimeoutError):
            return "timeout", "no answer before the time budget ran out"
        seen = seen.__cause__ or seen.__context__
    return "network_error", f"cannot reach the engine ({exc})"


def _progress(what: str, done: int, chunks: list[tuple[int, int]]) -> str:
    if len(chunks) == 1:
        return what
    seconds = sum(b - a for a, b in chunks[:done]) / SAMPLE_RATE
    total = sum(b - a for a, b in chunks) / SAMPLE_RATE
    return f"{what} after {done} of {len(chunks)} chunks ({seconds:.1f} of {total:.1f} s)"


def _to_pcm(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Validate and bring the input to float32 at the project's 16 kHz (both engines are happy there)."""
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise _Unavailable("invalid_audio", f"expected mono audio (one dimension), got shape {audio.shape}")
    if not isinstance(sample_rate, int | np.integer) or sample_rate <= 0:
        raise _Unavailable("invalid_audio", f"invalid sample rate {sample_rate!r}")
    if audio.size == 0:
        raise _Unavailable("no_speech", "the recording is empty")
    if not np.issubdtype(audio.dtype, np.floating):
        raise _Unavailable("invalid_audio", f"expected float samples in [-1, 1], got {audio.dtype}")
    audio = np.clip(np.nan_to_num(audio.astype(np.float32), nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)
    return resample(audio, int(sample_rate), SAMPLE_RATE)


def _int16(audio: np.ndarray) -> np.ndarray:
    return np.round(np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2")


def _silent(audio: np.ndarray) -> bool:
    return audio.size == 0 or float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) < SILENT_RMS


def split_points(audio: np.ndarray, rate: int, chunk_s: float) -> list[tuple[int, int]]:
    """Cut ``audio`` into consecutive ``(start, end)`` sample ranges of at most ``chunk_s`` seconds.

    Each cut is placed in the quietest 20 ms frame of the last part of the chunk (see SPLIT_SEARCH_*),
    so words are rarely cut in half; with no quieter frame it falls at the latest such frame.
    """
    n = int(audio.size)
    max_len = max(1, int(chunk_s * rate))
    frame = max(1, int(SPLIT_FRAME_S * rate))
    search = max(frame, int(min(SPLIT_SEARCH_MAX_S, SPLIT_SEARCH_FRACTION * chunk_s) * rate))
    ranges: list[tuple[int, int]] = []
    start = 0
    while n - start > max_len:
        end = start + max_len
        lo = max(start + 1, end - search)
        frames = (end - lo) // frame
        if frames < 1:
            cut = end
        else:
            window = audio[end - frames * frame:end].astype(np.float64).reshape(frames, frame)
            energy = np.mean(np.square(window), axis=1)
            quietest = frames - 1 - int(np.argmin(energy[::-1]))  # the latest of equally quiet frames
            cut = end - frames * frame + quietest * frame + frame // 2
        ranges.append((start, cut))
        start = cut
    ranges.append((start, n))
    return ranges
