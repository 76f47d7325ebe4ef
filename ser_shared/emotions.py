"""The seven emotion classes and the RAVDESS label mapping (calm is merged into neutral)."""

from __future__ import annotations

from pathlib import Path

EMOTIONS: tuple[str, ...] = ("neutral", "happy", "sad", "angry", "fearful", "disgust", "surprised")

# RAVDESS emotion field (third of seven) -> class name.
RAVDESS_CODES: dict[str, str] = {
    "01": "neutral",
    "02": "neutral",  # calm: too close to neutral to separate on acted speech; merged by design
    "03": "happy",
    "04": "sad",
    "05": "angry",
    "06": "fearful",
    "07": "disgust",
    "08": "surprised",
}


def parse_ravdess_name(path: Path | str) -> tuple[str, str] | None:
    """Return ``(emotion, actor)`` for a RAVDESS file name, or None if the name does not match."""
    parts = Path(path).stem.split("-")
    if len(parts) != 7 or not all(p.isdigit() and len(p) == 2 for p in parts):
        return None
    emotion = RAVDESS_CODES.get(parts[2])
    if emotion is None:
        return None
    return emotion, parts[6]
