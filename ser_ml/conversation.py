"""A recording as a conversation: per-speaker metrics, overlaps, interruptions, turns, escalation.

Pure: segments in, ``ser_shared.schemas`` shapes out (no I/O). docs/CONVERSATIONS.md defines every
figure for the people who read them; the constants below are the thresholds it quotes.

API::

    track = Track(index=0, label="agent", segments=[...])   # schemas.Segment dicts, times from the recording's start
    metrics, conversation = analyse([agent, customer], duration_s=93.2, mode="split",
                                    customer=customer_index(["agent", "customer"]))
    # metrics: one ChannelMetrics dict per track, in the tracks' order; conversation: a Conversation dict

Vocabulary (all times in seconds):

- an *utterance* is a speaker's run of touching segments (the segmenter cuts speech longer than 8 s
  into touching pieces; a gap of ``JOIN_S`` or more is a real pause);
- a *backchannel* is an utterance with under ``FLOOR_SPEECH_S`` of speech, at least half of whose
  span lies inside other speakers' utterances ("mm-hm" while someone talks): it counts as talk and
  overlap, but never takes the floor, interrupts or breaks someone's monologue;
- every other utterance *takes the floor*. Turns are the runs of one speaker in the floor-taking
  utterances ordered by start; a monologue is such a run cut wherever the speaker pauses for
  ``MONOLOGUE_GAP_S`` or more.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from ser_shared import schemas
from ser_shared.emotions import EMOTIONS

# Segments of one speaker closer than this are one utterance (the segmenter's split pieces touch).
JOIN_S = 0.1
# An utterance needs this much speech to take the floor while someone else is speaking.
FLOOR_SPEECH_S = 1.0
# Two speakers' utterances must intersect this long to count as an overlap (or an interruption):
# segments reach 0.1 s into the pauses around speech, so 0.5 s of intersecting segments is at
# least 0.3 s of both voices.
OVERLAP_MIN_S = 0.5
# Who was cut off must stop within this long after the other started (and before they stop).
YIELD_S = 2.0
# A pause this long ends a monologue even when nobody else takes the floor.
MONOLOGUE_GAP_S = 2.0

NEGATIVE = ("angry", "fearful", "disgust")


@dataclass(frozen=True)
class EscalationRule:
    """The escalation thresholds (docs/CONVERSATIONS.md; measured by bench/escalation.py).

    A *moment*: consecutive segments of one speaker, each ``margin`` (or ``spread`` times the
    standard deviation of the speaker's opening third, when that is more) above the speaker's
    baseline in negative share, holding ``moment_speech_s`` of speech together. The call's *flag*:
    the judged speaker's last third of speech is ``rise`` more negative than the first third and
    at least ``floor`` negative, each third holding ``third_speech_s`` of speech.
    """

    margin: float = 0.35
    moment_speech_s: float = 3.0
    spread: float = 2.0
    rise: float = 0.25
    floor: float = 0.4
    third_speech_s: float = 3.0


RULE = EscalationRule()

MODES = ("mono", "mix", "split")
DEFAULT_CUSTOMER_LABEL = "customer"


@dataclass(frozen=True)
class Track:
    """One speaker: the channel's index and label and its segments (``schemas.Segment`` dicts)."""

    index: int
    label: str
    segments: list[dict[str, Any]]


@dataclass(frozen=True)
class _Utterance:
    channel: int
    start: float
    end: float
    speech_s: float
    floor: bool = True  # False for a backchannel


# --- public ----------------------------------------------------------------------------------

def customer_index(labels: Sequence[str], customer_label: str | None = DEFAULT_CUSTOMER_LABEL) -> int | None:
    """The position of the speaker whose escalation the call's flag judges.

    The label equal to ``customer_label`` (case and surrounding spaces ignored) when there is one,
    else the second channel (call recorders put the caller there), else the only channel (a mono
    recording is judged as a whole). None when there are no labels.
    """
    if customer_label is not None:
        wanted = customer_label.strip().casefold()
        for i, label in enumerate(labels):
            if label.strip().casefold() == wanted:
                return i
    if len(labels) >= 2:
        return 1
    return 0 if labels else None


def analyse(tracks: Sequence[Track], duration_s: float, mode: str, customer: int | None = None,
            rule: EscalationRule = RULE) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Each track's ``ChannelMetrics`` (in the tracks' order) and the ``Conversation``, as JSON dicts.

    ``customer`` is the index (``Track.index``) of the speaker judged for the call's escalation
    flag, None to judge nobody (the flag is then false). Raises ValueError for an unknown ``mode``,
    a negative duration, repeated track indexes or a ``customer`` that is no track's index.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    if duration_s < 0:
        raise ValueError(f"duration_s {duration_s} is negative")
    indexes = [t.index for t in tracks]
    if len(set(indexes)) != len(indexes):
        raise ValueError(f"track indexes repeat: {indexes}")
    if customer is not None and customer not in indexes:
        raise ValueError(f"customer {customer} is not a track index ({indexes})")
    segments = {t.index: sorted(t.segments, key=lambda s: (s["start"], s["end"])) for t in tracks}
    utterances = _mark_backchannels([u for t in tracks for u in _utterances(t.index, segments[t.index])])
    turns = _turns(utterances)
    interruptions = _interruptions(utterances)
    talk = {i: sum(_speech(s) for s in segs) for i, segs in segments.items()}
    total_talk = sum(talk.values())
    metrics = [_metrics(t, segments[t.index], talk[t.index], total_talk, turns, interruptions, rule)
               for t in tracks]
    overlap = _overlaps(utterances)
    conversation = schemas.Conversation.build({
        "channels": mode, "duration_s": round(duration_s, 3),
        "silence_share": _silence_share(utterances, duration_s),
        "overlap_s": round(sum(e - s for s, e in overlap), 3), "overlaps": len(overlap),
        "interruptions": [{"at": round(at, 3), "by": by, "of": of} for at, by, of in interruptions],
        "turns": len(turns), "escalation": customer is not None and escalates(*_thirds(segments[customer]), rule),
        "customer": customer, "transcript": _transcript(tracks, segments)})
    return [schemas.ChannelMetrics.build(m).to_json() for m in metrics], conversation.to_json()


def escalates(negative_start: float | None, negative_end: float | None, third_speech_s: float,
              rule: EscalationRule = RULE) -> bool:
    """The call-level flag: the speaker ends ``rule.rise`` more negative than they began, at
    ``rule.floor`` or above, with ``rule.third_speech_s`` of speech in a third (``third_speech_s``)."""
    if negative_start is None or negative_end is None or third_speech_s < rule.third_speech_s:
        return False
    return negative_end - negative_start >= rule.rise and negative_end >= rule.floor


def negative_share(segment: dict[str, Any]) -> float:
    """The segment's probability of angry, fearful or disgust."""
    probs = segment.get("probabilities") or {}
    return float(sum(probs.get(e, 0.0) for e in NEGATIVE))


# --- segments and utterances -----------------------------------------------------------------

def _speech(segment: dict[str, Any]) -> float:
    """Seconds of speech in a segment (its span when the segmenter did not say)."""
    speech = segment.get("speech_s")
    return float(speech) if speech is not None else max(0.0, float(segment["end"]) - float(segment["start"]))


def _utterances(channel: int, segments: Sequence[dict[str, Any]]) -> list[_Utterance]:
    out: list[_Utterance] = []
    for seg in segments:
        start, end, speech = float(seg["start"]), float(seg["end"]), _speech(seg)
        if out and start - out[-1].end < JOIN_S:
            last = out[-1]
            out[-1] = _Utterance(channel, last.start, max(last.end, end), last.speech_s + speech)
        else:
            out.append(_Utterance(channel, start, end, speech))
    return out


def _intersection(a: _Utterance, b: _Utterance) -> float:
    return max(0.0, min(a.end, b.end) - max(a.start, b.start))


class _Lanes:
    """Each speaker's utterances, for finding those near a time in O(log n).

    One speaker's utterances never overlap (``_utterances`` merges overlapping segments) and are
    in order, so both their starts and their ends increase.
    """

    def __init__(self, utterances: Iterable[_Utterance]) -> None:
        self.lanes: dict[int, list[_Utterance]] = {}
        for u in sorted(utterances, key=lambda u: u.start):
            self.lanes.setdefault(u.channel, []).append(u)
        self.starts = {c: [u.start for u in us] for c, us in self.lanes.items()}
        self.ends = {c: [u.end for u in us] for c, us in self.lanes.items()}

    def others_during(self, u: _Utterance) -> list[_Utterance]:
        """Other speakers' utterances that intersect ``u``."""
        out: list[_Utterance] = []
        for c, lane in self.lanes.items():
            if c != u.channel:
                first, stop = bisect_right(self.ends[c], u.start), bisect_left(self.starts[c], u.end)
                out.extend(lane[first:stop])
        return out

    def running_at(self, channel: int, t: float) -> _Utterance | None:
        """``channel``'s utterance that started before ``t`` and is still running at ``t``."""
        i = bisect_left(self.starts.get(channel, []), t) - 1
        return self.lanes[channel][i] if i >= 0 and self.lanes[channel][i].end > t else None


def _covered(u: _Utterance, lanes: _Lanes) -> float:
    """Seconds of ``u``'s span during which another speaker's utterance runs."""
    return sum(e - s for s, e in _union((max(u.start, o.start), min(u.end, o.end)) for o in lanes.others_during(u)))


def _mark_backchannels(utterances: list[_Utterance]) -> list[_Utterance]:
    """All utterances ordered by start, the backchannels marked (``floor=False``)."""
    lanes = _Lanes(utterances)
    out = []
    for u in sorted(utterances, key=lambda u: (u.start, u.end, u.channel)):
        short = u.speech_s < FLOOR_SPEECH_S
        inside = u.end > u.start and _covered(u, lanes) >= 0.5 * (u.end - u.start)
        out.append(_Utterance(u.channel, u.start, u.end, u.speech_s, floor=not (short and inside)))
    return out


def _union(spans: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for s, e in sorted(spans):
        if e <= s:
            continue
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


# --- the floor: turns, monologues, interruptions ---------------------------------------------

def _turns(utterances: Sequence[_Utterance]) -> list[list[_Utterance]]:
    """The floor-taking utterances grouped into turns: runs of one speaker, in order of start."""
    turns: list[list[_Utterance]] = []
    for u in (u for u in utterances if u.floor):
        if turns and turns[-1][0].channel == u.channel:
            turns[-1].append(u)
        else:
            turns.append([u])
    return turns


def _monologues(turn: Sequence[_Utterance]) -> list[float]:
    """A turn's stretches, cut where the speaker pauses MONOLOGUE_GAP_S or more: their lengths."""
    lengths: list[float] = []
    start, end = turn[0].start, turn[0].end
    for u in turn[1:]:
        if u.start - end >= MONOLOGUE_GAP_S:
            lengths.append(end - start)
            start = u.start
        end = max(end, u.end)
    lengths.append(end - start)
    return lengths


def _interruptions(utterances: Sequence[_Utterance]) -> list[tuple[float, int, int]]:
    """``(at, by, of)``: a floor-taking utterance of ``by`` starting inside one of ``of``, the two
    overlapping OVERLAP_MIN_S or more, ``of`` stopping within YIELD_S and before ``by`` does."""
    lanes = _Lanes(utterances)
    found = []
    for b in (u for u in utterances if u.floor):
        for channel in lanes.lanes:
            a = lanes.running_at(channel, b.start) if channel != b.channel else None
            if a and _intersection(a, b) >= OVERLAP_MIN_S and a.end - b.start <= YIELD_S and a.end < b.end:
                found.append((b.start, b.channel, a.channel))
    return sorted(found)


def _overlaps(utterances: Sequence[_Utterance]) -> list[tuple[float, float]]:
    """Stretches where two or more speakers' utterances run at once, OVERLAP_MIN_S long or more."""
    by_channel: dict[int, list[tuple[float, float]]] = {}
    for u in utterances:
        by_channel.setdefault(u.channel, []).append((u.start, u.end))
    events = sorted((t, step) for spans in by_channel.values() for s, e in _union(spans)
                    for t, step in ((s, 1), (e, -1)))
    out: list[tuple[float, float]] = []
    active, since = 0, 0.0
    for t, step in events:  # at equal times ends (-1) sort first: touching spans do not overlap
        if active < 2 <= active + step:
            since = t
        elif active >= 2 > active + step:
            out.append((since, t))
        active += step
    return [(s, e) for s, e in _union(out) if e - s >= OVERLAP_MIN_S]


def _silence_share(utterances: Sequence[_Utterance], duration_s: float) -> float:
    if duration_s <= 0:
        return 0.0
    spoken = sum(min(e, duration_s) - max(s, 0.0) for s, e in _union((u.start, u.end) for u in utterances)
                 if min(e, duration_s) > max(s, 0.0))
    return round(max(0.0, 1.0 - spoken / duration_s), 4)


# --- per speaker -----------------------------------------------------------------------------

def _metrics(track: Track, segments: list[dict[str, Any]], talk_s: float, total_talk_s: float,
             turns: Sequence[list[_Utterance]], interruptions: Sequence[tuple[float, int, int]],
             rule: EscalationRule) -> dict[str, Any]:
    mine = [t for t in turns if t[0].channel == track.index]
    words, wpm = _words(segments)
    split = _split_thirds(segments)
    start, end, _ = _levels(split)
    return {
        "talk_s": round(talk_s, 3), "talk_share": round(talk_s / total_talk_s, 4) if total_talk_s > 0 else 0.0,
        "words": words, "words_per_minute": wpm,
        "longest_monologue_s": round(max((m for t in mine for m in _monologues(t)), default=0.0), 3),
        "turns": len(mine), "interruptions": sum(1 for _, by, _ in interruptions if by == track.index),
        "emotion_share": _emotion_share(segments),
        "negative_start": start, "negative_end": end,
        "escalations": _moments(segments, split, start, rule),
    }


def _words(segments: Sequence[dict[str, Any]]) -> tuple[int | None, float | None]:
    """Words said and words per minute of (transcribed) speech; None, None without a transcript."""
    transcribed = [s for s in segments if s.get("transcript") is not None or s.get("words") is not None]
    if not transcribed:
        return None, None
    words = sum(len(_text(s).split()) for s in transcribed)
    minutes = sum(_speech(s) for s in transcribed) / 60
    return words, (round(words / minutes, 1) if minutes > 0 else None)


def _text(segment: dict[str, Any]) -> str:
    """The segment's transcript text, or its words joined when only those are given."""
    if segment.get("transcript") is not None:
        return str(segment["transcript"]).strip()
    return " ".join(str(w["word"]).strip() for w in segment.get("words") or []).strip()


def _emotion_share(segments: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Share of the speaker's speech per emotion (each segment's label, weighted by its speech)."""
    total = sum(_speech(s) for s in segments)
    if total <= 0:
        return {}
    return {e: round(sum(_speech(s) for s in segments if s["emotion"] == e) / total, 4) for e in EMOTIONS}


def _thirds(segments: Sequence[dict[str, Any]]) -> tuple[float | None, float | None, float]:
    """Negative share of the first and last third of the speaker's speech time, and a third's length.

    A segment straddling a third's edge counts for the part of its speech on each side (its
    speech taken as spread evenly over it). None, None, 0 without speech.
    """
    return _levels(_split_thirds(segments))


class _Split(NamedTuple):
    """A speaker's segments against the thirds of their speech time: each segment's negative share
    and speech, how much of that speech lies inside the first and inside the last third, and a
    third's length."""

    negative: np.ndarray
    speech: np.ndarray
    first: np.ndarray
    last: np.ndarray
    third: float


def _split_thirds(segments: Sequence[dict[str, Any]]) -> _Split | None:
    """The speaker's ``_Split``; None without speech."""
    speech = np.array([_speech(s) for s in segments], dtype=np.float64)
    total = float(speech.sum())
    if total <= 0:
        return None
    ends = np.cumsum(speech)
    starts = ends - speech
    third = total / 3

    def inside(lo: float, hi: float) -> np.ndarray:
        return np.asarray(np.clip(np.minimum(ends, hi) - np.maximum(starts, lo), 0.0, None))

    return _Split(np.array([negative_share(s) for s in segments]), speech, inside(0.0, third),
                  inside(total - third, total), third)


def _levels(split: _Split | None) -> tuple[float | None, float | None, float]:
    """``_thirds`` from a ``_Split``."""
    if split is None:
        return None, None, 0.0
    return (round(float((split.first * split.negative).sum() / split.first.sum()), 4),
            round(float((split.last * split.negative).sum() / split.last.sum()), 4), split.third)


def _moments(segments: Sequence[dict[str, Any]], split: _Split | None, opening: float | None,
             rule: EscalationRule) -> list[dict[str, Any]]:
    """Escalation moments: runs of consecutive segments each clearly above the baseline (the
    lower of the speaker's speech-weighted median and ``opening``, their first third). Clearly:
    by ``rule.margin``, or by ``rule.spread`` times the spread of the opening when that is more."""
    if opening is None or split is None:
        return []
    negative, speech, first = split.negative, split.speech, split.first
    baseline = min(_weighted_median(negative, speech), opening)
    spread = float(np.sqrt((first * (negative - opening) ** 2).sum() / first.sum()))
    bar = max(rule.margin, rule.spread * spread)
    out: list[dict[str, Any]] = []
    run: list[int] = []
    for i in [*range(len(segments)), -1]:  # -1 closes the last run
        if i >= 0 and negative[i] - baseline >= bar:
            run.append(i)
            continue
        if run and speech[run].sum() >= rule.moment_speech_s:
            out.append(_moment([segments[k] for k in run], speech[run], negative[run], baseline))
        run = []
    return out


def _moment(segments: Sequence[dict[str, Any]], speech: np.ndarray, negative: np.ndarray,
            baseline: float) -> dict[str, Any]:
    weights = speech / speech.sum() if speech.sum() > 0 else np.full(len(speech), 1 / len(speech))
    mass = {e: float(sum(w * (s.get("probabilities") or {}).get(e, 0.0) for w, s in zip(weights, segments,
                                                                                    strict=True)))
            for e in NEGATIVE}
    return schemas.Escalation(start=round(float(segments[0]["start"]), 3), end=round(float(segments[-1]["end"]), 3),
                              emotion=max(NEGATIVE, key=lambda e: mass[e]),
                              score=round(min(1.0, float(weights @ negative) - baseline), 4)).to_json()


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """The value below which half the weight lies (the plain median when no weight is positive)."""
    if values.size == 0:
        return 0.0
    if weights.sum() <= 0:
        return float(np.median(values))
    order = np.argsort(values)
    cumulative = np.cumsum(weights[order])
    return float(values[order][int(np.searchsorted(cumulative, cumulative[-1] / 2))])


# --- the conversation transcript -------------------------------------------------------------

def _transcript(tracks: Sequence[Track], segments: dict[int, list[dict[str, Any]]]
                ) -> list[dict[str, Any]] | None:
    """Every segment with text, in time order (ties by channel); None when none has any."""
    lines = [{"start": round(float(s["start"]), 3), "end": round(float(s["end"]), 3), "channel": t.index,
              "label": t.label, "text": _text(s)}
             for t in tracks for s in segments[t.index] if _text(s)]
    return sorted(lines, key=lambda line: (line["start"], line["channel"])) or None
