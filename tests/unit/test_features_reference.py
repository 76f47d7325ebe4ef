"""The fast feature path computes the same numbers as the naive per-feature librosa reference."""

from __future__ import annotations

import numpy as np
import pytest

from bench import reference
from ser_ml import features
from ser_shared.audio import decode
from tests.conftest import ravdess_file

# float32 throughout, different FFT libraries and summation orders: differences are rounding.
DESCRIPTOR_TOLERANCE = {"logmel": 1e-3, "mfcc": 1e-3, "energy_db": 1e-4, "centroid": 1e-5, "bandwidth": 1e-5,
                        "flatness": 1e-5, "flux": 1e-5, "zcr": 0.0, "f0": 1e-3, "harmonicity": 1e-5}


def _clips() -> list[np.ndarray]:
    files = [ravdess_file(1, "01"), ravdess_file(6, "05", "02"), ravdess_file(11, "04", "02", "02", "02"),
             ravdess_file(20, "08", "02", "01", "02")]
    clips = [decode(p, "flac", features.SAMPLE_RATE, 600.0) for p in files]
    t = np.arange(features.SAMPLE_RATE * 2, dtype=np.float32) / features.SAMPLE_RATE
    clips.append((0.2 * np.sin(2 * np.pi * 180.0 * t) * (t > 0.5)).astype(np.float32))  # silence, then a tone
    return clips


@pytest.mark.parametrize("index", range(5))
def test_frame_descriptors_match_the_reference(index: int) -> None:
    audio = _clips()[index]
    fast, ref = features.frame_descriptors(audio), reference.descriptors(audio)
    assert fast.keys() == ref.keys()
    for key, tol in DESCRIPTOR_TOLERANCE.items():
        assert fast[key].shape == ref[key].shape, key
        np.testing.assert_allclose(fast[key], ref[key], atol=tol, rtol=1e-3, err_msg=key)
    # Roll-off picks a bin: rounding can move a frame by one bin (31 Hz), never more.
    assert np.abs(fast["rolloff"] - ref["rolloff"]).max() <= features.SAMPLE_RATE / features.N_FFT / 1000 + 1e-6
    assert np.mean(fast["rolloff"] == ref["rolloff"]) > 0.98
    assert np.mean(fast["voiced"] == ref["voiced"]) > 0.99


def test_model_inputs_match_the_reference() -> None:
    for audio in _clips():
        fast, ref = features.extract(audio), reference.extract(audio)
        np.testing.assert_allclose(fast.vector, ref.vector, atol=2e-3, rtol=1e-3)
        np.testing.assert_allclose(fast.sequence, ref.sequence, atol=2e-3, rtol=1e-3)


def test_the_tone_is_tracked_at_its_pitch() -> None:
    d = features.frame_descriptors(_clips()[4])
    voiced = d["f0"][d["voiced"]]
    assert voiced.size > 100
    assert np.median(voiced) == pytest.approx(180.0, rel=0.01)
