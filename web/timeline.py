"""The job page's time axis: where each speaker's segments, words and escalation moments lie.

Every track on the page (the waveform and spectrogram pictures, the speaker lanes, the time ruler)
spans the same seconds, 0 to the recording's duration, over the same width; positions here are
percentages of that span, so the tracks line up whatever the page's width. The pictures span the
same seconds (``web.images`` leaves the part it does not draw blank rather than stretching the part
it does). Values are read from the stored result (``schemas.Channel``, ``schemas.Conversation``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ser_shared.models import Job, Result

# Tick spacings of the ruler (seconds): the first that gives at most MAX_TICKS ticks.
TICK_STEPS = (0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0)
MAX_TICKS = 12


def percent(seconds: float, span: float) -> str:
    """``seconds`` as a percentage of ``span``, clamped to the axis, for an SVG ``x`` or ``width``."""
    share = 100.0 * seconds / span if span > 0 else 0.0
    return f"{min(100.0, max(0.0, share)):.3f}%"


def clock(seconds: float) -> str:
    """m:ss (h:mm:ss past an hour), as a player shows times."""
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def ticks(span: float) -> list[tuple[str, str]]:
    """The ruler's ticks as (x, label): evenly spaced, at most MAX_TICKS of them."""
    if span <= 0:
        return []
    step = next((s for s in TICK_STEPS if span / s <= MAX_TICKS), TICK_STEPS[-1])
    count = int(span // step)
    return [(percent(k * step, span), clock(k * step) if step >= 1 else f"{k * step:g}s") for k in range(count + 1)]


@dataclass
class Word:
    start: float
    text: str


@dataclass
class Band:
    """One speech segment on a lane: its place, emotion and words."""

    start: float
    end: float
    x: str
    width: str
    emotion: str
    confidence: float
    uncertain: bool
    probabilities: dict[str, float]
    text: str
    words: list[Word]


@dataclass
class Mark:
    """An escalation moment on a lane."""

    start: float
    end: float
    x: str
    width: str
    emotion: str
    score: float


@dataclass
class Lane:
    """One speaker: their bands, escalation moments and metrics, beside their label and emotion."""

    index: int
    label: str
    emotion: str | None
    confidence: float | None
    uncertain: bool | None
    speech_s: float
    metrics: dict[str, Any]
    customer: bool
    bands: list[Band] = field(default_factory=list)
    marks: list[Mark] = field(default_factory=list)


def axis_seconds(job: Job, result: Result | None) -> float:
    """The span of the axis: the recording's duration (as the pictures draw it), else what the result covers."""
    if job.duration_s:
        return float(job.duration_s)
    conversation = (result.conversation if result else None) or {}
    if conversation.get("duration_s"):
        return float(conversation["duration_s"])
    ends = [float(s["end"]) for s in (result.segments if result else None) or []]
    return max(ends, default=0.0)


def _words(segment: dict[str, Any]) -> list[Word]:
    """The segment's words with their times when the engine gave them, else its text as one run."""
    timed = [Word(float(w["start"]), str(w["word"]).strip()) for w in segment.get("words") or []]
    timed = [w for w in timed if w.text]
    if timed:
        return timed
    text = (segment.get("transcript") or "").strip()
    return [Word(float(segment["start"]), text)] if text else []


def band(segment: dict[str, Any], span: float) -> Band:
    start, end = float(segment["start"]), float(segment["end"])
    words = _words(segment)
    return Band(start, end, percent(start, span), percent(end - start, span), segment["emotion"],
                float(segment["confidence"]), bool(segment["uncertain"]), dict(segment["probabilities"]),
                " ".join(w.text for w in words), words)


def lanes(result: Result | None, span: float) -> list[Lane]:
    """One lane per speaker of a conversation; [] for results from before conversations, and for a
    single speaker with at most one segment (nothing a lane would add to the verdict)."""
    channels: Sequence[dict[str, Any]] = (result.channels if result else None) or []
    if not channels or (len(channels) == 1 and len(channels[0].get("segments") or []) < 2):
        return []
    customer = ((result.conversation if result else None) or {}).get("customer")
    out = []
    for ch in channels:
        metrics = ch.get("metrics") or {}
        lane = Lane(int(ch["index"]), str(ch["label"]), ch.get("emotion"), ch.get("confidence"), ch.get("uncertain"),
                    float(ch.get("speech_s") or 0.0), metrics, customer == ch["index"])
        lane.bands = [band(s, span) for s in ch.get("segments") or []]
        lane.marks = [Mark(float(e["start"]), float(e["end"]), percent(float(e["start"]), span),
                           percent(float(e["end"]) - float(e["start"]), span), e["emotion"], float(e["score"]))
                      for e in metrics.get("escalations") or []]
        out.append(lane)
    return out


def segment_bands(result: Result | None, span: float) -> list[Band]:
    """The single timeline of a long recording without conversation lanes (results from before them)."""
    segments = (result.segments if result else None) or []
    return [band(s, span) for s in segments] if len(segments) > 1 else []
