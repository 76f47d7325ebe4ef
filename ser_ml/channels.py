"""Channels as speakers: whether a multi-channel recording's channels are analysed apart or mixed,
and which channel a stretch of speech belongs to when it leaks into the others.

Both rules read the 10 ms frame levels (``segments.frame_energy_db``: RMS of 25 ms frames, in dBFS)
that the pipeline measures anyway, so they cost next to nothing and work the same on a streamed
recording.

``auto``: copies or speakers (``decide``)
    The frames that count are those where some channel is within ``ACTIVE_DB`` (20 dB) of its own
    loud level (99th percentile of its frames): speech, not the pauses' noise. Over them, each
    channel's level is compared with the loudest channel's, frame by frame: ``offset`` is the
    median difference, ``spread`` the 95th percentile of the differences' distance from it. A
    channel is a near-copy of the loudest when ``|offset| < CROSSTALK_DB`` (15 dB) and
    ``spread < COPY_DB`` (8 dB): the same signal at a steady level ratio, as one microphone written
    to two channels gives. All channels near-copies: ``mix``; otherwise ``split``.

    Measured (``tests/integration/test_channels.py`` checks the duplicated channel and the -25 dB
    call): a duplicated channel has spread 0 dB; a copy at -12 dB (a recorder's safety track, with
    its own noise) 1.4 dB; two microphones in one room (simulated: two different 0.5 s
    reverberations of the same speech) 4.0-4.9 dB; the two-actor test call 48 dB with -25 dB
    crosstalk (also through 8 kHz µ-law), 30 dB with -15 dB and still 12 dB with -6 dB, where a
    talker on their own channel is only 6 dB over their leakage into the other. The 95th
    percentile, not the median: a customer who speaks in only a tenth of the call still makes the
    spread large, while a steady level ratio (a copy) keeps it small everywhere. 8 dB sits between
    the copies' 5 and the calls' 12.

    A silent or near-silent channel (only noise, or only the other's faint crosstalk) is not a
    copy (its offset is -15 dB or lower, or its spread large): the recording is split, and that
    channel is reported as a speaker with no speech (emotion null). For a call that is the truth
    (the customer said nothing); for a mono recording written to one channel of a stereo file, the
    recording's own result is exactly the live channel's, where mixing would have blended it with
    the dead one. Crosstalk of -3 dB or louder makes two talkers' channels near-copies (the test
    call splits at -4 dB, spread 8.2, and mixes at -3 dB, spread 6.2): ``auto`` mixes them; ask for
    ``split`` to keep them apart.

Crosstalk (``own_speech``)
    A channel's frame counts as its own speech only when no other channel that the speech
    detector hears around it is more than ``CROSSTALK_DB`` (15 dB) louder. The channel's level is
    its maximum over the 5 frames (50 ms) around the frame; a rival's is its maximum over the 31
    frames (±150 ms) around it, so the pauses between a talker's words (where their level drops to
    the line noise, and so does their leakage) still count as theirs. Leakage is an attenuated copy
    of another channel (-25 dB in the tests, 20-40 dB on telephone lines), so it sits that far
    under its source and is dropped with 10 dB to spare; two people talking at once at comparable
    levels stay within 15 dB of each other's peaks (and the segments bridge the dips under 0.5 s),
    so a real overlap stays speech on both channels. Only channels with speech count as rivals, so
    one channel's hiss does not silence a quiet talker on another. Levels are compared as
    recorded, not normalised: leakage is a fixed attenuation of its source, which normalising each
    channel to its own level would hide. A talker recorded 15 dB or more under the other loses the
    frames where both speak at once (not their solo speech). On the test calls (8 kHz µ-law
    included) the segments' edges stay within 0.13 s of the speech's, 0.1 s of it the segments'
    padding; with the rival's level taken over 50 ms as well, pauses inside the other's turn let
    leakage through and a segment started 0.34 s early.

Splitting is for a few speakers: a recording with more than ``MAX_SPEAKERS`` channels is mixed by
``auto``, and ``split`` refuses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import maximum_filter1d

MODES = ("auto", "mix", "split")
ACTIVE_DB = 20.0
COPY_DB = 8.0
CROSSTALK_DB = 15.0
OWN_FRAMES = 5  # 50 ms of 10 ms frames
RIVAL_FRAMES = 31  # 310 ms
SPREAD_PERCENTILE = 95
MAX_SPEAKERS = 8
LOUD_PERCENTILE = 99


@dataclass(frozen=True)
class Decision:
    """What ``decide`` chose, and the measures it chose by (per channel, against the loudest)."""

    mode: str  # "mix" | "split"
    offsets_db: tuple[float, ...]
    spreads_db: tuple[float, ...]


def decide(energies: np.ndarray) -> Decision:
    """``mix`` when every channel is a near-copy of the loudest one, else ``split`` (module doc).

    ``energies``: (channels, frames) ``frame_energy_db`` levels of each channel.
    """
    e = np.asarray(energies, dtype=np.float64)
    loud = np.percentile(e, LOUD_PERCENTILE, axis=1)
    ref = int(np.argmax(loud))
    active = (e > loud[:, None] - ACTIVE_DB).any(axis=0)
    diff = e[:, active] - e[ref, active]
    offsets = np.median(diff, axis=1)
    spreads = np.percentile(np.abs(diff - offsets[:, None]), SPREAD_PERCENTILE, axis=1)
    copies = (np.abs(offsets) < CROSSTALK_DB) & (spreads < COPY_DB)
    mode = "mix" if bool(copies.all()) or e.shape[0] > MAX_SPEAKERS else "split"
    return Decision(mode, tuple(round(float(o), 2) for o in offsets), tuple(round(float(s), 2) for s in spreads))


def own_speech(energies: np.ndarray, speech: np.ndarray, margin_db: float = CROSSTALK_DB) -> np.ndarray:
    """Per channel and frame: False where the frame is another channel's crosstalk (module doc).

    ``energies``: (channels, frames) levels in dB; ``speech``: the same shape, the speech detector's
    flags. Frames where no other channel has speech are True (nothing to take them from).
    """
    e = np.asarray(energies, dtype=np.float32)
    own = maximum_filter1d(e, size=OWN_FRAMES, axis=1, mode="nearest")
    heard = np.where(np.asarray(speech, dtype=bool), e, -np.inf)
    rivals = maximum_filter1d(heard, size=RIVAL_FRAMES, axis=1, mode="nearest")
    keep = np.ones(e.shape, dtype=bool)
    for c in range(e.shape[0]):
        others = np.delete(rivals, c, axis=0)
        if others.size:
            keep[c] = own[c] >= others.max(axis=0) - margin_db
    return keep


def labels(count: int, given: Sequence[str] | None) -> list[str]:
    """A label per channel: the given ones in order, ``ch<i>`` for the channels they do not cover."""
    named = [str(g).strip() for g in (given or [])]
    return [named[i] if i < len(named) and named[i] else f"ch{i}" for i in range(count)]


def mix(audio: np.ndarray) -> np.ndarray:
    """The channels of (channels, samples) ``audio`` averaged to mono float32 (as ``decode`` mixes)."""
    if audio.shape[0] == 1:
        return np.asarray(audio[0], dtype=np.float32)
    return np.clip(audio.mean(axis=0, dtype=np.float64), -1.0, 1.0).astype(np.float32)
