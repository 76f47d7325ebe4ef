"""The second speech check: the training generator, a small detector's separation, the decision rule.

The full measurement (GroupKFold by actor, the Indian words, the 600 test clips, leave one family
out) is ``python -m bench.speech_detector``; this trains on a small subset, in seconds.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.pipeline import Pipeline

from ser_ml import speech_detector as sd
from ser_ml.encoder import WhisperEncoder
from ser_ml.train import nonspeech_train
from ser_ml.vad import HAS_SPEECH_S
from ser_shared.settings import REPO_ROOT
from tests.conftest import RAVDESS
from tests.nonspeech import KINDS, make

ENCODER = REPO_ROOT / "models" / "encoder-tiny.en-L2.npz"
TRAIN_ACTORS = [f"{a:02d}" for a in range(1, 13)]
TEST_ACTORS = [f"{a:02d}" for a in range(17, 21)]
Fitted = tuple[WhisperEncoder, Pipeline]


@pytest.mark.parametrize("family", nonspeech_train.NAMES)
def test_generator_is_deterministic_finite_and_in_range(family: str) -> None:
    for seed in (0, 7):
        x = nonspeech_train.make(family, seed)
        assert x.dtype == np.float32
        assert np.isfinite(x).all()
        assert float(np.max(np.abs(x))) <= 1.0
        assert nonspeech_train.PEAK[0] * 0.99 <= float(np.max(np.abs(x)))  # never near-silent
        assert nonspeech_train.DURATION_S[0] * 16000 <= x.size <= nonspeech_train.DURATION_S[1] * 16000
        assert np.array_equal(x, nonspeech_train.make(family, seed))
    assert not np.array_equal(nonspeech_train.make(family, 0)[:16000], nonspeech_train.make(family, 1)[:16000])
    assert nonspeech_train.make(family, 3, n=12345).size == 12345


def test_mixture_names_its_parts() -> None:
    _, parts = nonspeech_train.make_with_parts("mixture", 5)
    assert len(parts) == 2 and set(parts) <= set(nonspeech_train.FAMILIES)
    assert nonspeech_train.make_with_parts("notes", 5)[1] == ("notes",)
    with pytest.raises(ValueError, match="unknown family"):
        nonspeech_train.make("white_noise", 0)  # a test kind's name is not a training family


def test_is_no_speech_truth_table() -> None:
    sure, short, none = sd.SURE_SPEECH_S, (HAS_SPEECH_S + sd.SURE_SPEECH_S) / 2, HAS_SPEECH_S / 2
    # Silero sure: speech whatever the classifier says (it is not consulted).
    assert not sd.is_no_speech(sure, 0.0)
    assert not sd.is_no_speech(3.0, 0.0)
    # A short region: refused only when the classifier is sure of non-speech.
    assert sd.is_no_speech(short, 0.0)
    assert not sd.is_no_speech(short, sd.SHORT_REGION_THRESHOLD)
    assert not sd.is_no_speech(short, 1.0)
    # No region of HAS_SPEECH_S: refused unless the classifier says speech.
    assert sd.is_no_speech(0.0, 0.0)
    assert sd.is_no_speech(none, np.nextafter(sd.NO_REGION_THRESHOLD, 0))
    assert not sd.is_no_speech(none, sd.NO_REGION_THRESHOLD)
    assert not sd.is_no_speech(0.0, 1.0)
    assert sd.SHORT_REGION_THRESHOLD <= sd.NO_REGION_THRESHOLD  # Silero's evidence only ever helps speech


def test_array_rule_agrees_with_scalar_rule() -> None:
    longest = np.repeat([0.0, 0.1, HAS_SPEECH_S, 0.3, sd.SURE_SPEECH_S, 2.0], 21)
    prob = np.tile(np.linspace(0.0, 1.0, 21), 6)
    mask = sd.no_speech_mask(longest, prob)
    assert mask.tolist() == [sd.is_no_speech(float(a), float(b)) for a, b in zip(longest, prob, strict=True)]
    # The plain rule (no short-region zone): a 0.2 s region is speech whatever the classifier says.
    assert not sd.no_speech_mask(np.array([HAS_SPEECH_S]), np.array([0.0]), sure_speech_s=HAS_SPEECH_S)[0]


@pytest.fixture(scope="module")
def fitted() -> Fitted:
    # The encoder ships in models/ and the suite needs ../shared/datasets: a missing one fails
    # here, loudly, as everywhere else in the suite, rather than skipping.
    encoder = WhisperEncoder.load(ENCODER)
    ts = sd.build_training_set(encoder, RAVDESS, seed=1, actors=TRAIN_ACTORS, files_per_actor=3,
                               nonspeech_per_family=6)
    assert not set(ts.groups) & {f"actor:{a}" for a in TEST_ACTORS}
    return encoder, sd.fit_speech_detector(ts.speech(), ts.nonspeech(), seed=1)


def test_small_detector_separates_held_out_speech_from_held_out_nonspeech(fitted: Fitted) -> None:
    """Trained on 12 actors and 66 generated recordings; judged on 4 other actors and on the test
    generator's kinds, none of which it has seen."""
    encoder, model = fitted
    speech = [sd.read(p) for a in TEST_ACTORS for p in sorted((RAVDESS / f"Actor_{a}").glob("*.flac"))[::20]]
    nonspeech = [make(kind, seed=0, peak=0.3) for kind in KINDS]
    p_speech = sd.speech_probability(model, sd.vectors_of(encoder, speech))
    p_nonspeech = sd.speech_probability(model, sd.vectors_of(encoder, nonspeech))
    assert len(speech) >= 12 and p_speech.shape == (len(speech),)
    assert p_speech.min() > 0.5, p_speech
    assert p_nonspeech.max() < 0.5, dict(zip(KINDS, p_nonspeech.round(3), strict=True))
    assert p_speech.min() > p_nonspeech.max()


def test_speech_probability_takes_one_vector_or_many(fitted: Fitted) -> None:
    _, model = fitted
    vectors = np.random.default_rng(0).standard_normal((3, 768)).astype(np.float32)
    many = sd.speech_probability(model, vectors)
    assert many.shape == (3,) and ((many >= 0) & (many <= 1)).all()
    assert sd.speech_probability(model, vectors[0])[0] == pytest.approx(many[0])
