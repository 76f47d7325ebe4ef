"""Conversation results for the web tier's tests: stored as the worker stores them.

``call()`` builds a two-speaker call's ``channels`` and ``conversation`` in the contract's shapes
(``schemas.Channel``, ``schemas.Conversation``; the tests validate them strictly), with segments,
words and an escalation moment; the values are simple sums over the segments, so a test can say what
a page or an export must show. ``finish`` stores one job's result through ``worker.results.persist``:
the result row, the job's own columns (emotion, confidence, escalation) and the webhook events, in one
transaction.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from ser_shared.emotions import EMOTIONS

NEGATIVE = ("angry", "fearful", "disgust")


def probabilities(top: str, confidence: float) -> dict[str, float]:
    rest = (1.0 - confidence) / (len(EMOTIONS) - 1)
    return {e: round(confidence if e == top else rest, 6) for e in EMOTIONS}


def segment(start: float, end: float, emotion: str, confidence: float, text: str | None = None,
            words: bool = True) -> dict[str, Any]:
    """A speech segment; with ``text``, its transcript and (``words``) each word's time, evenly spread."""
    seg: dict[str, Any] = {"start": start, "end": end, "speech_s": round(end - start, 3), "emotion": emotion,
                           "confidence": confidence, "uncertain": confidence < 0.4,
                           "probabilities": probabilities(emotion, confidence)}
    if text is not None:
        seg["transcript"] = text
        if words:
            said = text.split()
            step = (end - start) / len(said)
            seg["words"] = [{"start": round(start + k * step, 3), "end": round(start + (k + 1) * step, 3), "word": w}
                            for k, w in enumerate(said)]
    return seg


# A 12-second call: the agent stays neutral, the customer starts neutral and ends angry.
AGENT = [segment(0.3, 2.8, "neutral", 0.71, "thank you for calling how can I help"),
         segment(6.0, 8.0, "neutral", 0.66, "let me check that for you")]
CUSTOMER = [segment(3.0, 5.6, "neutral", 0.52, "my parcel never arrived"),
            segment(8.2, 11.5, "angry", 0.81, "this is the third time I call about it")]
ESCALATION = {"start": 8.2, "end": 11.5, "emotion": "angry", "score": 0.62}


def _share(segments: list[dict[str, Any]], emotions: tuple[str, ...]) -> float:
    total = sum(s["speech_s"] for s in segments)
    return round(sum(s["speech_s"] for s in segments if s["emotion"] in emotions) / total, 4) if total else 0.0


def channel(index: int, label: str, segments: list[dict[str, Any]], total_talk_s: float,
            escalations: list[dict[str, Any]], interruptions: int = 0) -> dict[str, Any]:
    talk = round(sum(s["speech_s"] for s in segments), 3)
    words = sum(len((s.get("transcript") or "").split()) for s in segments)
    top = max(segments, key=lambda s: s["speech_s"]) if segments else None
    return {
        "index": index, "label": label,
        "emotion": top["emotion"] if top else None, "confidence": top["confidence"] if top else None,
        "uncertain": top["uncertain"] if top else None, "probabilities": top["probabilities"] if top else None,
        "speech_s": talk, "segments": segments,
        "metrics": {"talk_s": talk, "talk_share": round(talk / total_talk_s, 4) if total_talk_s else 0.0,
                    "words": words, "words_per_minute": round(60 * words / talk, 1) if talk else None,
                    "longest_monologue_s": max((s["speech_s"] for s in segments), default=0.0),
                    "turns": len(segments), "interruptions": interruptions,
                    "emotion_share": {e: _share(segments, (e,)) for e in sorted({s["emotion"] for s in segments})},
                    "negative_start": _share(segments[:1], NEGATIVE) if segments else None,
                    "negative_end": _share(segments[-1:], NEGATIVE) if segments else None,
                    "escalations": escalations},
    }


def call(labels: tuple[str, str] = ("agent", "customer"), escalation: bool = True,
         transcript: bool = True) -> tuple[list[dict[str, Any]], dict[str, Any], list[dict[str, Any]]]:
    """A split two-speaker call: (channels, conversation, the result's top-level segments)."""
    agent = [dict(s) for s in AGENT]
    customer = [dict(s) for s in CUSTOMER] if escalation else [
        dict(s) for s in CUSTOMER[:1]] + [segment(8.2, 11.5, "neutral", 0.6, CUSTOMER[1].get("transcript"))]
    if not transcript:
        for s in agent + customer:
            s.pop("transcript", None)
            s.pop("words", None)
    total = sum(s["speech_s"] for s in agent + customer)
    channels = [channel(0, labels[0], agent, total, []),
                channel(1, labels[1], customer, total, [dict(ESCALATION)] if escalation else [], interruptions=1)]
    lines = sorted(([s["start"], s["end"], ch["index"], ch["label"], s["transcript"]] for ch in channels
                    for s in ch["segments"] if s.get("transcript")), key=lambda line: line[0])
    conversation = {"channels": "split", "duration_s": 12.0, "silence_share": round(1 - total / 12.0, 4),
                    "overlap_s": 0.0, "overlaps": 0, "interruptions": [{"at": 8.2, "by": 1, "of": 0}],
                    "turns": 4, "escalation": escalation, "customer": 1,
                    "transcript": [dict(zip(("start", "end", "channel", "label", "text"), line, strict=True))
                                   for line in lines] if transcript else None}
    merged = sorted(agent + customer, key=lambda s: s["start"])
    return channels, conversation, merged


def finish(factory: sessionmaker[Session], job_id: uuid.UUID, channels: list[dict[str, Any]],
           conversation: dict[str, Any], segments: list[dict[str, Any]],
           transcript: dict[str, Any] | None = None) -> list[str]:
    """Store ``job_id``'s result and finish the job through ``worker.results.persist``, as the worker
    does with an analysed recording (the result row, the job's columns, its webhook events); returns
    the webhook deliveries."""
    from ser_ml.inference import Prediction
    from ser_ml.pipeline import Outcome
    from worker.results import persist

    top = max(segments, key=lambda s: s["speech_s"])
    probs = top["probabilities"]
    prediction = Prediction(top["emotion"], top["confidence"], False, probs, {"rf": probs, "lstm": probs})
    outcome = Outcome(job_id, prediction, duration_s=conversation["duration_s"],
                      timings_ms={"decode": 1.0, "total": 2.0}, transcript=transcript, segments=segments,
                      mode=conversation["channels"], labels=[ch["label"] for ch in channels], channels=channels,
                      conversation=conversation)
    return persist(factory, [outcome], {"rf": "rf-test", "lstm": "lstm-test"})


def mono(segments: list[dict[str, Any]], duration_s: float, label: str = "ch0") -> tuple[list[dict[str, Any]],
                                                                                         dict[str, Any]]:
    """A one-speaker recording's (channels, conversation), its channel holding ``segments``."""
    total = sum(s["speech_s"] for s in segments)
    channels = [channel(0, label, [dict(s) for s in segments], total, [])]
    lines = [{"start": s["start"], "end": s["end"], "channel": 0, "label": label, "text": s["transcript"]}
             for s in segments if s.get("transcript")]
    conversation = {"channels": "mono", "duration_s": duration_s, "silence_share": round(1 - total / duration_s, 4),
                    "overlap_s": 0.0, "overlaps": 0, "interruptions": [], "turns": 1, "escalation": False,
                    "customer": None, "transcript": lines or None}
    return channels, conversation
