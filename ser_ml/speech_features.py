"""The models' inputs (feature version fv4): a frozen Whisper encoder's frames, pooled two ways.

A clip is trimmed to its speech by energy, encoded by the first ``ENCODER_LAYERS`` blocks of
Whisper tiny.en's encoder (``ser_ml.encoder``; 20 ms frames of 384 values), and the last kept
block's frames become:

- the utterance vector for the RandomForest pipeline: their mean and standard deviation (768);
- the sequence for the LSTM: the frames averaged over 80 ms steps (4 frames), (steps, 384).

Why these choices (speaker-independent 5-fold CV on RAVDESS actors 01–20, clean audio, scaler →
shrinkage LDA → RandomForest on the pooled vector; see models/MODEL_CARD.md for the full table):
tiny.en's second block gave 0.714 (first 0.684, third 0.708, fourth 0.674, all four 0.672), base's
third block 0.723 at 1.6 times the cost; early blocks carry more of how something is said, later ones
more of what is said, as reported for Whisper and wav2vec2 layers elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ser_ml.encoder import HOP, SAMPLE_RATE, WhisperEncoder
from ser_ml.features import SILENCE_DBFS, TRIM_DB, Features
from ser_ml.segments import frame_energy_db
from ser_shared.errors import SilentAudio

FEATURE_VERSION = "fv4"
WHISPER_MODEL = "tiny.en"
ENCODER_LAYERS = 2  # blocks kept in the artifact; the last one's output is used
POOL = 4  # encoder frames (20 ms) per LSTM step: 80 ms


def speech_clip(audio: np.ndarray) -> np.ndarray:
    """``audio`` from its first to its last 10 ms frame within TRIM_DB of the loudest one.

    Leading and trailing silence would otherwise be pooled into the vector as if it were part of
    the voice. Raises SilentAudio for a clip whose peak is under the silence floor.
    """
    x = np.asarray(audio, dtype=np.float32)
    if x.size == 0 or float(np.max(np.abs(x))) < 10 ** (SILENCE_DBFS / 20):
        raise SilentAudio("the recording is silent: nothing above the silence floor")
    energy = frame_energy_db(x)
    active = np.flatnonzero(energy > energy.max() - TRIM_DB)
    start, end = int(active[0]) * HOP, min(x.size, (int(active[-1]) + 1) * HOP)
    return x[start:end] if end - start >= HOP * 4 else x


def from_frames(frames: np.ndarray, duration_s: float) -> Features:
    """Features from one clip's encoder output, (frames, layers, width)."""
    last = frames[:, -1, :].astype(np.float32)
    if last.shape[0] == 0:
        raise SilentAudio("the clip is too short to encode")
    vector = np.concatenate([last.mean(axis=0), last.std(axis=0)]).astype(np.float32)
    steps = max(1, last.shape[0] // POOL)
    usable = last[: steps * POOL] if last.shape[0] >= POOL else last
    sequence = usable.reshape(steps, -1, last.shape[1]).mean(axis=1).astype(np.float32)
    return Features(vector, sequence, duration_s)


def featurise(encoder: WhisperEncoder, clips: Sequence[np.ndarray]) -> list[Features]:
    """Features of already trimmed clips (see ``speech_clip``), encoded together in batches."""
    return [from_frames(frames, clip.size / SAMPLE_RATE)
            for frames, clip in zip(encoder.encode(clips), clips, strict=True)]
