"""The feature pipeline on real speech and on signals whose right answer is known.

MFCCs are checked against librosa (an independent implementation), pitch against synthetic
tones of known frequency, trimming against digital silence added around a real clip.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import soundfile as sf

from ser_ml.features import SAMPLE_RATE, SEQ_DIM, VECTOR_DIM, Features, extract, frame_descriptors
from ser_shared.errors import SilentAudio
from tests.conftest import ravdess_file

STEP_S = 0.03  # one LSTM step pools three 10 ms frames


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """A real RAVDESS utterance (16 kHz mono), copied out of the shared dataset before reading."""
    dst = tmp_path_factory.mktemp("clip") / "clip.flac"
    shutil.copy(ravdess_file(1, "05", intensity="02"), dst)
    audio, rate = sf.read(str(dst), dtype="float32")
    assert rate == SAMPLE_RATE and audio.ndim == 1
    return audio


def harmonic_tone(f0: float, seconds: float = 1.0, amp: float = 0.3) -> np.ndarray:
    """A steady voiced-like tone: the fundamental plus decaying harmonics."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    wave = sum(a * np.sin(2 * np.pi * f0 * k * t + k) for k, a in ((1, 1.0), (2, 0.5), (3, 0.3), (4, 0.2)))
    return (amp * wave / np.abs(wave).max()).astype(np.float32)


def assert_well_formed(features: Features) -> None:
    assert features.vector.shape == (VECTOR_DIM,)
    assert features.vector.dtype == np.float32
    assert features.sequence.ndim == 2 and features.sequence.shape[1] == SEQ_DIM
    assert features.sequence.shape[0] >= 1
    assert features.sequence.dtype == np.float32
    assert np.isfinite(features.vector).all()
    assert np.isfinite(features.sequence).all()


def test_extract_real_clip_shapes(clip: np.ndarray) -> None:
    features = extract(clip)
    assert_well_formed(features)
    assert features.duration_s == pytest.approx(clip.size / SAMPLE_RATE)
    # Trimming removes RAVDESS's silent lead-in and tail, so there are fewer steps than the whole
    # clip would give, but most of the spoken part remains.
    whole_steps = clip.size / SAMPLE_RATE / STEP_S
    assert 0.3 * whole_steps < features.sequence.shape[0] <= whole_steps


def test_sequence_steps_follow_the_active_duration() -> None:
    # 0.5 s silence, 2 s tone, 0.5 s silence: only the 2 s tone counts after trimming.
    tone = harmonic_tone(200.0, seconds=2.0)
    silence = np.zeros(SAMPLE_RATE // 2, dtype=np.float32)
    features = extract(np.concatenate([silence, tone, silence]))
    assert_well_formed(features)
    assert features.sequence.shape[0] == pytest.approx(2.0 / STEP_S, abs=3)
    assert features.duration_s == pytest.approx(3.0)


def test_digital_silence_around_a_clip_changes_nothing(clip: np.ndarray) -> None:
    # Silence trimming: the features describe the utterance, not how much silence surrounds it.
    pad = np.zeros(SAMPLE_RATE, dtype=np.float32)  # a whole number of 10 ms hops
    plain = extract(clip)
    padded = extract(np.concatenate([pad, clip, pad]))
    np.testing.assert_allclose(padded.sequence, plain.sequence, atol=1e-5)
    np.testing.assert_allclose(padded.vector, plain.vector, atol=1e-4)


def test_extract_is_deterministic(clip: np.ndarray) -> None:
    a = extract(clip.copy())
    b = extract(clip.copy())
    assert np.array_equal(a.vector, b.vector)
    assert np.array_equal(a.sequence, b.sequence)


@pytest.mark.parametrize("audio", [
    np.zeros(SAMPLE_RATE, dtype=np.float32),
    (np.random.default_rng(0).standard_normal(SAMPLE_RATE) * 1e-6).astype(np.float32),
    np.zeros(0, dtype=np.float32),
], ids=["zeros", "noise_1e-6", "empty"])
def test_silence_raises_silent_audio(audio: np.ndarray) -> None:
    with pytest.raises(SilentAudio) as exc:
        extract(audio)
    assert exc.value.code == "silent_audio"


def test_very_short_clip(clip: np.ndarray) -> None:
    # 0.1 s from the loudest part of the utterance: the shortest recording the service accepts.
    centre = int(np.argmax(np.abs(clip)))
    start = min(max(centre - SAMPLE_RATE // 20, 0), clip.size - SAMPLE_RATE // 10)
    short = clip[start : start + SAMPLE_RATE // 10]
    features = extract(short)
    assert_well_formed(features)
    assert features.sequence.shape[0] <= 0.1 / STEP_S + 1


def test_long_clip_scales(clip: np.ndarray) -> None:
    seconds = 60
    repeats = int(np.ceil(seconds * SAMPLE_RATE / clip.size))
    long = np.tile(clip, repeats)[: seconds * SAMPLE_RATE]
    features = extract(long)
    assert_well_formed(features)
    steps = features.sequence.shape[0]
    # The active span runs from the first copy's speech onset to the last copy's speech end, so it
    # loses less than one clip's duration to trimming in total.
    clip_s = clip.size / SAMPLE_RATE
    assert (seconds - clip_s) / STEP_S <= steps <= seconds / STEP_S + 1
    assert steps > 10 * extract(clip).sequence.shape[0]


# --- pitch --------------------------------------------------------------------------------------


# Tones whose period multiples also fall in the search range: the tracker must not report
# a half or a third of the pitch (an octave error it once made).
@pytest.mark.parametrize("f0", [110.0, 150.0, 200.0, 220.0, 300.0, 400.0])
def test_f0_of_harmonic_tone(f0: float) -> None:
    d = frame_descriptors(harmonic_tone(f0))
    voiced_f0 = d["f0"][d["f0"] > 0]
    assert voiced_f0.size > 0.8 * d["f0"].size  # a steady tone is voiced nearly throughout
    assert np.array_equal(d["f0"] > 0, d["voiced"])  # f0 is zero exactly where unvoiced
    assert float(np.median(voiced_f0)) == pytest.approx(f0, rel=0.03)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_white_noise_is_mostly_unvoiced(seed: int) -> None:
    noise = (np.random.default_rng(seed).standard_normal(2 * SAMPLE_RATE) * 0.1).astype(np.float32)
    d = frame_descriptors(noise)
    assert float(np.mean(d["voiced"])) < 0.2


# --- MFCC against librosa -----------------------------------------------------------------------
