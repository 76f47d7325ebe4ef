"""Training-time augmentations do what their names say, repeatably."""

from __future__ import annotations

import numpy as np
import pytest

from ser_shared.audio import decode
from ser_shared.features import SAMPLE_RATE, frame_descriptors
from tests.conftest import ravdess_file
from worker import augment


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    return decode(ravdess_file(4, "03", "02"), "flac", SAMPLE_RATE, 600.0)


@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_speed_changes_duration_and_pitch_together(clip: np.ndarray, factor: float) -> None:
    out = augment.apply(f"speed{factor}", clip, seed=0)
    assert out.dtype == np.float32
    assert out.size == pytest.approx(clip.size / factor, rel=1e-3)
    t = np.arange(SAMPLE_RATE, dtype=np.float32) / SAMPLE_RATE
    tone = sum(0.2 / k * np.sin(2 * np.pi * 200.0 * k * t) for k in (1, 2, 3)).astype(np.float32)
    d = frame_descriptors(augment.apply(f"speed{factor}", tone, seed=0))
    assert np.median(d["f0"][d["voiced"]]) == pytest.approx(200.0 * factor, rel=0.01)


def test_noise_has_the_named_snr_and_is_repeatable(clip: np.ndarray) -> None:
    a, b = augment.apply("noise20", clip, seed=7), augment.apply("noise20", clip, seed=7)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, augment.apply("noise20", clip, seed=8))
    snr = 10 * np.log10(np.mean(clip.astype(np.float64) ** 2) / np.mean((a - clip).astype(np.float64) ** 2))
    assert snr == pytest.approx(20.0, abs=0.3)


def test_unknown_augmentation_is_refused(clip: np.ndarray) -> None:
    with pytest.raises(ValueError, match="unknown augmentation"):
        augment.apply("reverb", clip, seed=0)
