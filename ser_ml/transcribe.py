"""Speech-to-text beside the emotion analysis.

Engines (the ``transcribe`` upload option):

- ``whisper``: offline, faster-whisper with the Whisper models installed from PyPI wheels
  (``ser_ml.whisper_asr``): tiny.en for English, the multilingual base for any other language, and
  base with language detection for ``und`` (BCP-47's "undetermined"; ``auto`` is taken too). Word
  timestamps.
- ``sphinx``: the name is kept so that old clients keep working, but it is served by Whisper, as
  ``whisper`` is (the transcript's ``model`` and ``message`` say so). PocketSphinx read a RAVDESS
  sentence as "can i just caught him by the door"; Whisper tiny.en is both more accurate and faster
  here (``bench/asr.py``, ``bench/RESULTS.md``), so nothing is lost.
- ``google``: Google's free Web Speech endpoint through the SpeechRecognition package (needs the
  network; any BCP-47 language).

A transcript is a nice-to-have next to the emotion result, so :func:`transcribe` never raises for a
transcription problem: an unreachable or slow engine, an HTTP error, a rate limit, silence, missing or
altered model files or an unsupported language all come back as ``status="unavailable"`` with a stable
``reason`` code. The one exception that does pass through is Celery's soft time limit, which belongs to
the task, not to us.

The call is bounded by ``timeout_s``. Google requests run in a helper thread that is abandoned when the
budget runs out (its socket timeout ends it soon after). Whisper decodes in C and cannot be interrupted
mid-window, so its work is cut into packs of at most ``whisper_asr.PACK_S`` seconds and the deadline is
checked between them (and between the segments Whisper yields); a pack is not started when the speed
seen so far says it would overrun. The overshoot is at most about one pack (a few seconds). Loading a
model (first use in a process: ~1 s for tiny.en, ~2 s for base) comes on top, once per process.

When the budget runs out, or an engine fails part-way through a long recording, the result is
``unavailable`` with no text at all: ``text`` is set if and only if ``status == "succeeded"``, so a
truncated transcript is never mistaken for the whole one. ``message`` says how far it got. With
segments (:func:`transcribe_segments`), the segments transcribed before that keep their own text.
"""

from __future__ import annotations

import http.client
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.error import HTTPError, URLError

import numpy as np

from ser_ml import whisper_asr
from ser_ml.features import SAMPLE_RATE
from ser_ml.time_limit import TimeLimit  # must reach the task, which turns it into a failed job
from ser_ml.whisper_asr import Heard, OutOfTime, UnknownLanguage, Word
from ser_ml.whisper_weights import WeightsError
from ser_shared.audio import resample

__all__ = ["ENGINES", "Heard", "Transcript", "Word", "split_points", "transcribe", "transcribe_segments"]

log = logging.getLogger(__name__)

ENGINES = ("whisper", "google", "sphinx")
OFFLINE = ("whisper", "sphinx")  # both served by Whisper
SUCCEEDED = "succeeded"
UNAVAILABLE = "unavailable"
# Google's free Web Speech endpoint is made for short utterances and rejects long uploads; 30 s is a safe ceiling.
GOOGLE_MAX_CHUNK_S = 30.0
SPLIT_SEARCH_FRACTION = 0.2  # look for a quiet cut point in the last fifth of a chunk ...
SPLIT_SEARCH_MAX_S = 5.0  # ... but no further back than this
SPLIT_FRAME_S = 0.02
SILENT_RMS = 10 ** (-60 / 20)  # a chunk quieter than -60 dBFS is not sent to any engine
_LANGUAGE_TAG = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8})*$")
# After these, later segments would fail alike: stop instead of trying each.
_STOP = ("timeout", "network_error", "rate_limited", "engine_missing")
SPHINX_NOTE = "transcribe=sphinx is served by Whisper (PocketSphinx was retired)"


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
    model: str | None = None  # the Whisper model that made it: "whisper-tiny.en" or "whisper-base"
    detected_language: str | None = None  # Whisper's language code, when the language was detected
    detected_probability: float | None = None  # Whisper's probability for that language

    @property
    def succeeded(self) -> bool:
        return self.status == SUCCEEDED

    def stored(self) -> dict[str, Any]:
        """The transcript as a result stores it (``ser_shared.schemas.Transcript``)."""
        out: dict[str, Any] = {"status": self.status, "engine": self.engine, "language": self.language,
                               "text": self.text, "reason": self.reason, "message": self.message,
                               "seconds": round(self.seconds, 3)}
        if self.model is not None:
            out["model"] = self.model
        if self.detected_language is not None:
            out["detected_language"] = self.detected_language
        if self.detected_probability is not None:
            out["detected_language_probability"] = self.detected_probability
        return out


class _Unavailable(Exception):
    """Internal: stop and report ``reason`` (with the segments heard so far, if any)."""

    def __init__(self, reason: str, message: str, heard: list[Heard | None] | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.heard = heard


@dataclass
class _Run:
    """What a run learns on the way, reported whatever the outcome."""

    model: str | None = None
    detected: str | None = None
    probability: float | None = None


def transcribe(audio: np.ndarray, sample_rate: int, engine: str, language: str = "en-US", *,
               timeout_s: float = 15.0, google_key: str | None = None, chunk_s: float = 30.0) -> Transcript:
    """Transcribe mono float audio in [-1, 1]; never raises for a transcription failure (see the module doc).

    Long audio is cut into chunks of at most ``chunk_s`` seconds (capped per engine) at quiet points and
    the chunk texts are joined with spaces. ``google_key`` is Google's API key; None uses the shared
    development key SpeechRecognition ships, which Google may throttle or revoke.
    """
    result, _ = transcribe_segments(audio, sample_rate, engine, language, None, timeout_s=timeout_s,
                                    google_key=google_key, chunk_s=chunk_s)
    return result


def transcribe_segments(audio: np.ndarray, sample_rate: int, engine: str, language: str = "en-US",
                        spans: Sequence[tuple[float, float]] | None = None, *, timeout_s: float = 15.0,
                        google_key: str | None = None, chunk_s: float = 30.0
                        ) -> tuple[Transcript, list[Heard | None]]:
    """:func:`transcribe`, segment by segment: ``spans`` are ``(start, end)`` seconds of ``audio``.

    Returns the recording's transcript (the segments' texts joined) and, per span, what was heard
    there (None: not transcribed, the budget or the engine ran out first); word times are seconds
    from the start of ``audio``. Without ``spans`` the whole audio is one piece and the list is empty.
    """
    started = time.monotonic()
    deadline = started + max(0.0, timeout_s)
    run = _Run()
    heard: list[Heard | None] = [None] * len(spans or ())

    def result(status: str, text: str | None = None, reason: str | None = None,
               message: str | None = None) -> Transcript:
        if status == SUCCEEDED and engine == "sphinx":
            message = SPHINX_NOTE
        return Transcript(status, engine, language, text, reason, message, round(time.monotonic() - started, 3),
                          run.model, run.detected, run.probability)

    try:
        text, heard = _transcribe(audio, sample_rate, engine, language, spans, deadline, google_key, chunk_s, run)
    except TimeLimit:
        raise
    except _Unavailable as exc:
        log.info("transcript unavailable engine=%s language=%s reason=%s: %s", engine, language, exc.reason,
                 exc.message)
        return result(UNAVAILABLE, reason=exc.reason, message=exc.message), exc.heard or heard
    except Exception as exc:  # a bug or an engine failure nobody foresaw: still only a missing transcript
        log.exception("transcription failed engine=%s language=%s", engine, language)
        return result(UNAVAILABLE, reason="engine_error", message=f"{type(exc).__name__}: {exc}"[:300]), heard
    return result(SUCCEEDED, text=text), heard


def _transcribe(audio: np.ndarray, sample_rate: int, engine: str, language: str,
                spans: Sequence[tuple[float, float]] | None, deadline: float, google_key: str | None,
                chunk_s: float, run: _Run) -> tuple[str, list[Heard | None]]:
    if engine not in ENGINES:
        raise _Unavailable("unknown_engine", f"unknown transcription engine {engine!r}; use one of {ENGINES}")
    if not isinstance(language, str) or not (_LANGUAGE_TAG.match(language) or language.lower() == "auto"):
        raise _Unavailable("unsupported_language", f"{language!r} is not a BCP-47 language tag like en-US")
    pcm = _to_pcm(audio, sample_rate)
    if not chunk_s > 0:
        raise _Unavailable("invalid_audio", f"chunk length must be positive, got {chunk_s}")
    if engine in OFFLINE:
        return _whisper(pcm, language, spans, deadline, run)
    if spans is None:
        return _google_audio(pcm, language, deadline, google_key, chunk_s), []
    return _google_spans(pcm, language, spans, deadline, google_key, chunk_s)


# --- Whisper --------------------------------------------------------------------------------------

def _whisper(pcm: np.ndarray, language: str, spans: Sequence[tuple[float, float]] | None, deadline: float,
             run: _Run) -> tuple[str, list[Heard | None]]:
    try:
        name, code = whisper_asr.choose(language)
    except UnknownLanguage as exc:
        raise _Unavailable("unsupported_language", str(exc)) from exc
    except ImportError as exc:
        raise _Unavailable("engine_missing", f"faster-whisper is not installed ({exc})") from exc
    run.model = f"whisper-{name}"
    loading = time.monotonic()
    try:
        session = whisper_asr.Session(whisper_asr.model(name), code, whisper_asr.PRIOR_COST[name])
    except WeightsError as exc:
        raise _Unavailable("engine_missing", str(exc)) from exc
    # A process's first transcript loads the model (~1 s for tiny.en, ~2 s for base, once): that is
    # not the recording's time, so the budget starts after it.
    deadline += time.monotonic() - loading
    whole = spans is None
    segments = [(0.0, pcm.size / SAMPLE_RATE)] if spans is None else list(spans)
    pieces, owner = _pieces(pcm, segments)
    if not pieces:
        raise _Unavailable("no_speech", "the recording is silent", None if whole else [Heard("", ())] * len(segments))
    try:
        got: list[Heard | None] = list(whisper_asr.transcribe_spans(session, pcm, pieces, deadline))
        failure = None
    except OutOfTime as exc:
        got, failure = exc.heard, exc
    finally:
        run.detected, run.probability = session.detected, session.probability
    heard = _merge(got, owner, len(segments))
    if failure is not None:
        if whole:
            message = _progress("the time budget ran out", sum(g is not None for g in got), pieces, "pieces")
        else:
            message = _progress("the time budget ran out", sum(h is not None for h in heard), segments, "segments")
        raise _Unavailable("timeout", message, None if whole else heard)
    text = " ".join(h.text for h in heard if h is not None and h.text)
    if not text:
        raise _Unavailable("no_speech", "Whisper recognised no words", None if whole else heard)
    return text, [] if whole else heard


def _pieces(pcm: np.ndarray, segments: list[tuple[float, float]]) -> tuple[list[tuple[float, float]], list[int]]:
    """The non-silent stretches of at most ``PACK_S`` seconds that Whisper gets, and their segment's index."""
    pieces: list[tuple[float, float]] = []
    owner: list[int] = []
    for i, (start, end) in enumerate(segments):
        a = min(max(0, int(round(start * SAMPLE_RATE))), pcm.size)
        b = min(max(a, int(round(end * SAMPLE_RATE))), pcm.size)
        for x, y in split_points(pcm[a:b], SAMPLE_RATE, whisper_asr.PACK_S) if b > a else []:
            if not _silent(pcm[a + x:a + y]):
                pieces.append(((a + x) / SAMPLE_RATE, (a + y) / SAMPLE_RATE))
                owner.append(i)
    return pieces, owner


def _merge(got: list[Heard | None], owner: list[int], n: int) -> list[Heard | None]:
    """Pieces back into their segments: a segment is heard when all of its pieces are (one without
    any piece is silent, so heard as nothing)."""
    texts: list[list[str]] = [[] for _ in range(n)]
    words: list[list[Word]] = [[] for _ in range(n)]
    missing = [False] * n
    for piece, i in zip(got, owner, strict=True):
        if piece is None:
            missing[i] = True
            continue
        if piece.text:
            texts[i].append(piece.text)
        words[i].extend(piece.words or ())
    return [None if missing[i] else Heard(" ".join(texts[i]), tuple(words[i])) for i in range(n)]


# --- Google ---------------------------------------------------------------------------------------

def _google_spans(pcm: np.ndarray, language: str, spans: Sequence[tuple[float, float]], deadline: float,
                  key: str | None, chunk_s: float) -> tuple[str, list[Heard | None]]:
    """Each span on its own (Google gives no word times): the first failure other than silence
    makes the transcript unavailable, and one that would repeat stops the rest."""
    heard: list[Heard | None] = [None] * len(spans)
    failure: _Unavailable | None = None
    for i, (start, end) in enumerate(spans):
        piece = pcm[int(round(start * SAMPLE_RATE)):int(round(end * SAMPLE_RATE))]
        try:
            heard[i] = Heard(_google_audio(piece, language, deadline, key, chunk_s), None)
        except _Unavailable as exc:
            if exc.reason == "no_speech":
                heard[i] = Heard("", None)
                continue
            failure = failure or exc
            if exc.reason in _STOP:
                break
    segments = list(spans)
    if failure is not None:
        done = sum(h is not None for h in heard)
        raise _Unavailable(failure.reason, _progress(failure.message, done, segments, "segments"), heard)
    text = " ".join(h.text for h in heard if h is not None and h.text)
    if not text:
        raise _Unavailable("no_speech", "the engine recognised no words", heard)
    return text, heard


def _google_audio(pcm: np.ndarray, language: str, deadline: float, key: str | None, chunk_s: float) -> str:
    """Google's text for 16 kHz ``pcm``, sent in chunks cut at quiet points."""
    try:
        import speech_recognition as sr
    except ImportError as exc:
        raise _Unavailable("engine_missing", "the SpeechRecognition package is not installed") from exc
    if not hasattr(sr.Recognizer, "recognize_google"):  # SpeechRecognition attaches engines only if they import
        raise _Unavailable("engine_missing", "this SpeechRecognition has no recognize_google")

    max_chunk_s = min(chunk_s, GOOGLE_MAX_CHUNK_S)
    if pcm.size == 0:
        raise _Unavailable("no_speech", "the recording is empty")
    chunks = [(a, b) for a, b in split_points(pcm, SAMPLE_RATE, max_chunk_s) if not _silent(pcm[a:b])]
    if not chunks:
        raise _Unavailable("no_speech", "the recording is silent")
    recognise = _google(sr, language, key)

    texts: list[str] = []
    for i, (a, b) in enumerate(chunks):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Unavailable("timeout", _progress("the time budget ran out", i, _seconds(chunks), "chunks"))
        data = _int16(pcm[a:b]).tobytes()
        text = recognise(sr.AudioData(data, SAMPLE_RATE, 2), remaining, i, chunks)
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
            raise _Unavailable(reason, _progress(f"Google: {detail}", i, _seconds(chunks), "chunks")) from exc
        except (ValueError, KeyError, TypeError) as exc:  # a reply that is not Google's JSON lines
            detail = f"Google sent an unreadable reply ({type(exc).__name__}: {exc})"
            raise _Unavailable("bad_response", _progress(detail, i, _seconds(chunks), "chunks")) from exc

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


def _seconds(chunks: list[tuple[int, int]]) -> list[tuple[float, float]]:
    return [(a / SAMPLE_RATE, b / SAMPLE_RATE) for a, b in chunks]


def _progress(what: str, done: int, parts: list[tuple[float, float]], name: str) -> str:
    if len(parts) == 1:
        return what
    seconds = sum(b - a for a, b in parts[:done])
    total = sum(b - a for a, b in parts)
    return f"{what} after {done} of {len(parts)} {name} ({seconds:.1f} of {total:.1f} s)"


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
