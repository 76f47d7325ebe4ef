"""Speech segments of a long recording: energy-based voice-activity detection.

A recording up to ``WHOLE_UP_TO_S`` long stays one segment (the models were trained on 3–4 s
utterances and classify such clips whole). Longer ones are cut where the speech pauses:

1. frame energy (25 ms frames every 10 ms, as the features use) against a threshold set from the
   recording itself: 10 dB over its noise floor (10th percentile), but never more than 40 dB
   under its loud speech (99th percentile) nor below -70 dBFS;
2. pauses shorter than ``MIN_GAP_S`` are bridged (a breath or a comma is not a boundary), bursts
   shorter than ``MIN_SPEECH_S`` dropped (a click is not speech);
3. runs of speech longer than ``MAX_SEGMENT_S`` are split at their quietest point between
   ``MIN_SEGMENT_S`` and ``MAX_SEGMENT_S`` from their start, so each stays utterance-sized;
4. each segment reaches ``PAD_S`` into the pauses around it (soft onsets and tails are often
   below the threshold), never past the quietest frame between it and its neighbour; longer
   silences belong to no segment, so noise between utterances does not colour them.

Steps 2–4 (``segments_from_flags``) take per-frame speech flags from any detector: the trained one
in ``ser_ml/vad.py`` sets them from its speech probabilities instead of step 1.

Each segment also reports how much speech it holds: a recording's result weights its segments by
that, so a long silence does not count as a long opinion.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ser_ml.features import HOP, SAMPLE_RATE, WIN

WHOLE_UP_TO_S = 10.0
MIN_GAP_S = 0.5
MIN_SPEECH_S = 0.25
MIN_SEGMENT_S = 2.0
MAX_SEGMENT_S = 8.0
PAD_S = 0.3
FRAME_S = HOP / SAMPLE_RATE


def frame_energy_db(audio: np.ndarray) -> np.ndarray:
    """RMS level per 10 ms frame, in dBFS (centred 25 ms frames, zero-padded at the edges)."""
    x = np.asarray(audio, dtype=np.float32)
    n = 1 + x.size // HOP
    padded = np.zeros((n - 1) * HOP + WIN, dtype=np.float32)
    padded[WIN // 2 : WIN // 2 + x.size] = x[: padded.size - WIN // 2]
    return _energy(np.lib.stride_tricks.sliding_window_view(padded, WIN)[::HOP][:n])


def _energy(frames: np.ndarray) -> np.ndarray:
    return (10.0 * np.log10(np.einsum("ij,ij->i", frames, frames) / WIN + 1e-10)).astype(np.float32)


class EnergyMeter:
    """``frame_energy_db`` of a recording fed block by block, without holding the recording."""

    def __init__(self) -> None:
        self._carry = np.zeros(WIN // 2, dtype=np.float32)  # the leading zero padding of frame 0
        self._parts: list[np.ndarray] = []
        self.samples = 0

    def feed(self, block: np.ndarray) -> None:
        self.samples += block.size
        buf = np.concatenate([self._carry, np.asarray(block, dtype=np.float32)])
        n = 1 + (buf.size - WIN) // HOP if buf.size >= WIN else 0
        if n:
            self._parts.append(_energy(np.lib.stride_tricks.sliding_window_view(buf, WIN)[::HOP][:n]))
        self._carry = buf[n * HOP :]

    def finish(self) -> np.ndarray:
        need = 1 + self.samples // HOP - sum(p.size for p in self._parts)
        if need > 0:
            buf = np.zeros((need - 1) * HOP + WIN, dtype=np.float32)
            buf[: self._carry.size] = self._carry[: buf.size]
            self._parts.append(_energy(np.lib.stride_tricks.sliding_window_view(buf, WIN)[::HOP][:need]))
        return np.concatenate(self._parts)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.diff(np.r_[0, mask.astype(np.int8), 0])
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True))


def _split(start: int, end: int, energy: np.ndarray) -> list[tuple[int, int]]:
    """Cut a too-long run at its quietest frames until every piece is at most MAX_SEGMENT_S."""
    low, high = int(MIN_SEGMENT_S / FRAME_S), int(MAX_SEGMENT_S / FRAME_S)
    pieces = []
    while end - start > high:
        window = energy[start + low : start + high]
        cut = start + low + int(np.argmin(window))
        pieces.append((start, cut))
        start = cut
    pieces.append((start, end))
    return pieces


@dataclass(frozen=True)
class Segment:
    start: float  # seconds
    end: float
    speech_s: float  # how much of it is above the speech threshold


def find_segments(audio: np.ndarray) -> list[Segment]:
    """The recording's segments, in order; one segment for short recordings."""
    duration = audio.size / SAMPLE_RATE
    if duration <= WHOLE_UP_TO_S:
        return [Segment(0.0, round(duration, 3), round(duration, 3))]
    return segments_from_energy(frame_energy_db(audio), duration)


def segments_from_energy(energy: np.ndarray, duration: float) -> list[Segment]:
    """``find_segments`` from the frame energies (what a streamed recording has)."""
    floor, loud = np.percentile(energy, [10, 99])
    threshold = max(min(floor + 10.0, loud - 6.0), loud - 40.0, -70.0)
    segments = segments_from_flags(energy > threshold, energy, duration)
    return segments or [Segment(0.0, round(duration, 3), 0.0)]  # no speech stands out: analyse it whole


def segments_from_flags(speech: np.ndarray, energy: np.ndarray, duration: float,
                        pad_s: float = PAD_S, min_speech_s: float = MIN_SPEECH_S) -> list[Segment]:
    """Steps 2–4 above: segments from per-frame speech flags, whichever detector set them.

    ``speech`` and ``energy`` are per 10 ms frame (``frame_energy_db``'s frames); the energy only
    chooses where to cut (the quietest frames). ``pad_s`` is how far a segment reaches into the
    pauses around it, ``min_speech_s`` the shortest run kept. Empty when no run is long enough.
    """
    bridged: list[tuple[int, int]] = []
    for start, end in _runs(speech):
        if bridged and (start - bridged[-1][1]) * FRAME_S < MIN_GAP_S:
            bridged[-1] = (bridged[-1][0], end)
        else:
            bridged.append((start, end))
    kept = [(s, e) for s, e in bridged if (e - s) * FRAME_S >= min_speech_s]
    if not kept:
        return []
    pieces = [piece for s, e in kept for piece in _split(s, e, energy)]
    # Cut in the quietest frame between consecutive pieces (a split piece is cut where it was split).
    cuts = [0]
    for (_, prev_end), (next_start, _) in zip(pieces, pieces[1:], strict=False):
        cuts.append(prev_end + int(np.argmin(energy[prev_end:next_start])) if next_start > prev_end else prev_end)
    cuts.append(energy.size)
    pad = int(pad_s / FRAME_S)
    out = []
    for (s, e), lo, hi in zip(pieces, cuts, cuts[1:], strict=False):
        start, end = max(lo, s - pad), min(hi, e + pad)
        out.append(Segment(round(start * FRAME_S, 3), round(min(end * FRAME_S, duration), 3),
                           round(float(speech[s:e].sum()) * FRAME_S, 3)))
    return out
