"""Voice-activity detection with a trained model: Silero VAD v6, the ONNX file faster-whisper ships.

"No speech, no emotion": the energy detector in ``ser_ml/segments.py`` finds whatever is
louder than the floor, so a tone, a melody or a dial tone looks like speech to it and gets an
emotion. Silero VAD was trained to tell speech from everything else; its probabilities decide
whether a recording holds speech at all (``has_speech``), how much (``speech_seconds``) and where
(``speech_regions``, ``speech_segments``).

How the model is fed (as ``faster_whisper/vad.py`` does; reproduced here without its in-place
write into the caller's audio): 16 kHz audio in windows of 512 samples (32 ms), each preceded
by the last 64 samples of the window before it (zeros before the first), as rows of a
``(windows, 576)`` batch; the model encodes the rows together and runs its LSTM over them in
order, carrying the state ``h``, ``c`` (1×1×128 each) from one batch to the next. Carrying the state
makes block-by-block results identical to whole ones, so ``SpeechMeter`` can take a recording as a
stream.

The model file is found through the installed faster_whisper package's location, without
importing faster_whisper (that would pull in CTranslate2 and PyAV, ~0.2 s, for one file path) and
never downloaded. One onnxruntime session per process, made on first use (after Celery's fork),
single-threaded: the worker runs one process per core.

Cost: about 5.5 ms per 3.5 s clip on one core (1.6 ms per second of audio) and 44 ms to load
the model once per process; see ``bench/vad.py`` and bench/RESULTS.md.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ser_ml.segments import FRAME_S, Segment, frame_energy_db, segments_from_flags

if TYPE_CHECKING:
    import onnxruntime

SAMPLE_RATE = 16000
WINDOW = 512  # samples per probability: 32 ms at 16 kHz, the only size the v6 model takes
CONTEXT = 64  # samples of the previous window the model sees with each window
WINDOW_S = WINDOW / SAMPLE_RATE
BLOCK_WINDOWS = 1024  # windows per model call (~33 s): bounded memory, same cost as bigger calls

# Regions as Silero's get_speech_timestamps makes them: a region starts at a window of
# probability >= THRESHOLD and lasts while the probability stays >= THRESHOLD - 0.15; dips shorter
# than MIN_SILENCE_S do not end it. Regions shorter than MIN_REGION_S (Silero: 0.25 s) are dropped:
# 0.1 s keeps a short shouted word, whose region is often 0.13–0.2 s, in speech_seconds.
THRESHOLD = 0.5
MIN_SILENCE_S = 0.1
MIN_REGION_S = 0.1

# has_speech: some region at least this long. The longest region, not the total, so that a long
# recording of music or noise cannot add up scattered blips. Chosen by bench/vad.py: the longest
# region any of 15 kinds of non-speech reached (10 seeds each, peaks 0.05–0.8) was 6 windows
# (0.192 s: a synth melody, loud white noise); 0.2 s needs 7. Speech below it exists (1 % of
# RAVDESS, shouted; 12 % of the Indian command words): the trained model misses it, see RESULTS.
HAS_SPEECH_S = 0.2

# Segments from this detector reach less far into the pauses than the energy detector's 0.3 s:
# the hysteresis above already holds soft onsets and tails that an energy threshold cuts off.
SEGMENT_PAD_S = 0.1


def model_path() -> Path:
    """Where the installed faster_whisper keeps Silero VAD v6 (its package assets)."""
    spec = importlib.util.find_spec("faster_whisper")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("faster_whisper is not installed: it ships the Silero VAD model this detector needs")
    path = Path(next(iter(spec.submodule_search_locations))) / "assets" / "silero_vad_v6.onnx"
    if not path.is_file():
        raise RuntimeError(f"Silero VAD model missing from the faster_whisper package: {path}")
    return path


@functools.cache
def _session() -> onnxruntime.InferenceSession:
    import onnxruntime  # here, not at import: the web tier and Celery's parent never load it

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(model_path()), sess_options=options,
                                        providers=["CPUExecutionProvider"])


class SpeechMeter:
    """Speech probabilities of a recording fed block by block (any block sizes), one per window.

    The result equals ``speech_probabilities`` of the whole recording: the last window is padded
    with zeros, and the model's state and context carry across blocks.
    """

    def __init__(self) -> None:
        self._pending = np.zeros(0, dtype=np.float32)  # samples not yet making a whole window
        self._context = np.zeros(CONTEXT, dtype=np.float32)
        self._h = np.zeros((1, 1, 128), dtype=np.float32)
        self._c = np.zeros((1, 1, 128), dtype=np.float32)
        self._parts: list[np.ndarray] = []

    def feed(self, block: np.ndarray) -> None:
        x = np.concatenate([self._pending, np.asarray(block, dtype=np.float32).reshape(-1)])
        whole = x.size // WINDOW * WINDOW
        for start in range(0, whole, BLOCK_WINDOWS * WINDOW):
            self._run(x[start : min(start + BLOCK_WINDOWS * WINDOW, whole)].reshape(-1, WINDOW))
        self._pending = x[whole:].copy()

    def finish(self) -> np.ndarray:
        if self._pending.size:
            last = np.zeros((1, WINDOW), dtype=np.float32)
            last[0, : self._pending.size] = self._pending
            self._run(last)
            self._pending = np.zeros(0, dtype=np.float32)
        return np.concatenate(self._parts) if self._parts else np.zeros(0, dtype=np.float32)

    def _run(self, windows: np.ndarray) -> None:
        rows = np.empty((windows.shape[0], CONTEXT + WINDOW), dtype=np.float32)
        rows[:, CONTEXT:] = windows
        rows[0, :CONTEXT] = self._context
        rows[1:, :CONTEXT] = windows[:-1, -CONTEXT:]
        probs, self._h, self._c = _session().run(None, {"input": rows, "h": self._h, "c": self._c})
        self._context = windows[-1, -CONTEXT:].copy()
        self._parts.append(np.asarray(probs, dtype=np.float32).reshape(-1))


def speech_probabilities(audio16k: np.ndarray) -> np.ndarray:
    """Probability of speech per 32 ms window (window i covers samples 512·i to 512·i + 511)."""
    meter = SpeechMeter()
    meter.feed(audio16k)
    return meter.finish()


def speech_flags(probabilities: np.ndarray, threshold: float = THRESHOLD,
                 neg_threshold: float | None = None) -> np.ndarray:
    """Per window: speech or not, with hysteresis: on at ``threshold``, off below ``neg_threshold``
    (``threshold`` - 0.15 unless given, as Silero does)."""
    p = np.asarray(probabilities)
    low = max(threshold - 0.15, 0.01) if neg_threshold is None else neg_threshold
    event = np.where(p >= threshold, 1, np.where(p < low, 0, -1))  # -1: keep the state before
    last = np.maximum.accumulate(np.where(event >= 0, np.arange(p.size), -1))
    return (last >= 0) & (event[np.maximum(last, 0)] == 1)


def regions_from_probabilities(probabilities: np.ndarray, threshold: float = THRESHOLD,
                               neg_threshold: float | None = None, min_region_s: float = MIN_REGION_S,
                               min_silence_s: float = MIN_SILENCE_S) -> list[tuple[float, float]]:
    """``speech_regions`` from probabilities already computed."""
    flags = speech_flags(probabilities, threshold, neg_threshold)
    edges = np.diff(np.r_[0, flags.astype(np.int8), 0])
    runs: list[list[int]] = []
    for start, end in zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True):
        if runs and (start - runs[-1][1]) * WINDOW_S < min_silence_s:
            runs[-1][1] = end
        else:
            runs.append([start, end])
    return [(round(s * WINDOW_S, 3), round(e * WINDOW_S, 3)) for s, e in runs if (e - s) * WINDOW_S >= min_region_s]


def speech_regions(audio: np.ndarray, threshold: float = THRESHOLD, *,
                   probabilities: np.ndarray | None = None) -> list[tuple[float, float]]:
    """Where the speech is, as ``(start_s, end_s)`` pairs in order, unpadded.

    Like Silero's ``get_speech_timestamps`` with its defaults (hysteresis of 0.15 below
    ``threshold``, dips under ``MIN_SILENCE_S`` bridged, regions under ``MIN_REGION_S`` dropped).
    Pass ``probabilities`` when they are at hand to skip the model.
    """
    p = speech_probabilities(audio) if probabilities is None else probabilities
    return regions_from_probabilities(p, threshold)


def speech_seconds(audio: np.ndarray, *, probabilities: np.ndarray | None = None) -> float:
    """How much speech the recording holds: the total length of its ``speech_regions``."""
    return round(sum(end - start for start, end in speech_regions(audio, probabilities=probabilities)), 3)


def longest_region_s(audio: np.ndarray, *, probabilities: np.ndarray | None = None) -> float:
    """The longest of the ``speech_regions`` in seconds (0 when there are none)."""
    return max((end - start for start, end in speech_regions(audio, probabilities=probabilities)), default=0.0)


def has_speech(audio: np.ndarray, *, probabilities: np.ndarray | None = None) -> bool:
    """The rule for ``no_speech``: some speech region lasts at least ``HAS_SPEECH_S``."""
    return longest_region_s(audio, probabilities=probabilities) >= HAS_SPEECH_S


def frame_flags(probabilities: np.ndarray, frames: int) -> np.ndarray:
    """``speech_flags`` per 10 ms frame of ``frame_energy_db`` (``frames`` of them): each frame takes
    the flag of the window holding its centre sample."""
    flags = speech_flags(probabilities)
    if not flags.size:
        return np.zeros(frames, dtype=bool)
    window_of_frame = np.minimum(np.arange(frames) * round(FRAME_S * SAMPLE_RATE) // WINDOW, flags.size - 1)
    return flags[window_of_frame]


def segments_from_probabilities(probabilities: np.ndarray, energy: np.ndarray, duration: float,
                                pad_s: float = SEGMENT_PAD_S, keep: np.ndarray | None = None) -> list[Segment]:
    """``speech_segments`` from probabilities and ``frame_energy_db`` frames (a streamed recording).

    ``keep`` (per frame) drops the speech frames it marks False: a channel's frames that are another
    channel's crosstalk (``ser_ml.channels.own_speech``).
    """
    if not np.asarray(probabilities).size:
        return []
    flags = frame_flags(probabilities, energy.size)
    if keep is not None:
        flags &= keep
    # Runs as short as has_speech accepts are kept, so a recording with speech has a segment.
    return segments_from_flags(flags, energy, duration, pad_s=pad_s, min_speech_s=HAS_SPEECH_S)


def speech_segments(audio: np.ndarray, *, probabilities: np.ndarray | None = None) -> list[Segment]:
    """The recording's speech segments by this detector, with the energy detector's rules.

    Pauses of ``MIN_GAP_S`` (0.5 s) or more separate segments, runs over 8 s are split at their
    quietest frame 2–8 s in, each segment reaches ``SEGMENT_PAD_S`` into the pauses around it
    (``ser_ml.segments``); runs shorter than ``HAS_SPEECH_S`` are dropped, so it is non-empty
    whenever ``has_speech`` is true. Unlike ``find_segments`` it cuts recordings of any length
    (keeping a short one whole is the caller's choice) and returns ``[]`` when there is no speech
    rather than the whole recording.
    """
    p = speech_probabilities(audio) if probabilities is None else probabilities
    return segments_from_probabilities(p, frame_energy_db(audio), np.asarray(audio).size / SAMPLE_RATE)
