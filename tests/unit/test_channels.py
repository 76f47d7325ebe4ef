"""ser_ml.channels on frame levels made by hand: the auto rule, the crosstalk gate, labels, the mix.
(tests/integration/test_channels.py runs them on calls made of real speech.)"""

from __future__ import annotations

import numpy as np

from ser_ml import channels

FRAMES = 2000  # 20 s of 10 ms frames
NOISE_DB = -70.0


def _talk(rng: np.random.Generator, spans: list[tuple[int, int]], level: float = -25.0) -> np.ndarray:
    """A channel's frame levels: speech (level ± syllable-sized swings) in ``spans``, noise elsewhere."""
    e = NOISE_DB + rng.normal(0, 1, FRAMES)
    for start, end in spans:
        e[start:end] = level + 8 * np.sin(np.arange(end - start) / 3.0) + rng.normal(0, 2, end - start)
    return e


def _leak(source: np.ndarray, into: np.ndarray, db: float) -> np.ndarray:
    """``into`` with ``source`` added ``db`` under it (powers add)."""
    return 10 * np.log10(10 ** (into / 10) + 10 ** ((source + db) / 10))


A_TURNS = [(100, 400), (900, 1200), (1500, 1800)]
B_TURNS = [(500, 800), (1100, 1400)]  # 1100-1200: both talk


def _call(leak_db: float = -25.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    a, b = _talk(rng, A_TURNS), _talk(rng, B_TURNS)
    levels = np.stack([_leak(b, a, leak_db), _leak(a, b, leak_db)])
    # The speech detector hears speech wherever a channel is loud, the other's leakage included.
    return levels, levels > -55.0


def test_two_talkers_are_split_and_copies_mixed() -> None:
    levels, _ = _call()
    assert channels.decide(levels).mode == "split"
    a = levels[0]
    assert channels.decide(np.stack([a, a])).mode == "mix"
    assert channels.decide(np.stack([a, a - 12.0])).mode == "mix"  # a safety track 12 dB down
    assert channels.decide(np.stack([a, a + np.random.default_rng(1).normal(0, 1.5, FRAMES)])).mode == "mix"


def test_a_dead_channel_or_leakage_alone_is_not_a_copy() -> None:
    rng = np.random.default_rng(2)
    a = _talk(rng, A_TURNS)
    assert channels.decide(np.stack([a, NOISE_DB + rng.normal(0, 1, FRAMES)])).mode == "split"
    assert channels.decide(np.stack([a, _leak(a, NOISE_DB + rng.normal(0, 1, FRAMES), -25.0)])).mode == "split"


def test_more_channels_than_speakers_are_mixed() -> None:
    levels, _ = _call()
    many = np.concatenate([levels] * 5)  # 10 channels
    assert channels.decide(many).mode == "mix"


def test_crosstalk_is_dropped_and_overlaps_kept() -> None:
    levels, heard = _call()
    own = channels.own_speech(levels, heard)
    for (me, turns), (_, theirs) in zip([(0, A_TURNS), (1, B_TURNS)], [(1, B_TURNS), (0, A_TURNS)], strict=True):
        for start, end in theirs:
            # (A channel's own level is its maximum over OWN_FRAMES: its turns reach that far out.)
            reach = channels.OWN_FRAMES // 2
            alone = [f for f in range(start, end) if not any(s - reach <= f < e + reach for s, e in turns)]
            assert not own[me, alone].any(), (me, start, end)  # their speech, leaked: never mine
        for start, end in turns:
            assert own[me, start:end].mean() > 0.9, (me, start, end)  # mine, overlaps included


def test_hiss_on_one_channel_does_not_silence_a_quiet_talker() -> None:
    rng = np.random.default_rng(3)
    quiet = _talk(rng, [(100, 400)], level=-50.0)
    hiss = -35.0 + rng.normal(0, 1, FRAMES)
    levels = np.stack([quiet, hiss])
    heard = np.stack([quiet > -60.0, np.zeros(FRAMES, dtype=bool)])  # the hiss is no speech
    assert channels.own_speech(levels, heard)[0, 100:400].all()


def test_labels_and_mix() -> None:
    assert channels.labels(2, None) == ["ch0", "ch1"]
    assert channels.labels(3, ["agent", " ", "x", "extra"]) == ["agent", "ch1", "x"]
    assert channels.labels(1, ["agent", "customer"]) == ["agent"]
    audio = np.array([[0.5, -1.0, 0.2], [0.5, -1.0, -0.2]], dtype=np.float32)
    np.testing.assert_array_equal(channels.mix(audio), np.array([0.5, -1.0, 0.0], dtype=np.float32))
    assert channels.mix(audio[:1]).dtype == np.float32
