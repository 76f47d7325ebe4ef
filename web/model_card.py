"""The model card of the models being served, for ``/model`` and the job page's note.

Everything comes from the configured models folder (``SER_MODELS_DIR``): ``manifest.json``, which the
workers load and which holds the training reports (cross-validation, conditions, calibration,
cross-corpus), and ``MODEL_CARD.md``, the prose. Nothing here imports the ML package: the web tier
reads JSON and Markdown only, so it stays light. Both files are read again when they change on disk
(checked by modification time and size on each request; a stat is cheap).
"""

from __future__ import annotations

import json
import logging
import re
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from ser_shared.errors import ServiceUnavailable
from ser_shared.schemas import EnsembleRule, Manifest
from ser_shared.settings import Settings
from web.markup import sections

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CARD = "MODEL_CARD.md"
# The pictures `ser train` draws into the models folder (ser_ml/train/training.py ``_plots``).
CONFUSION_PICTURE = "cv_confusion.png"
RELIABILITY_PICTURE = "reliability.png"
# The only files of the models folder the site serves: PNG pictures, by a plain name (no folders).
PICTURE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\.png")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MODEL_NAMES = {"rf": "RandomForest pipeline", "lstm": "LSTM"}
SUMMARY_ROWS = {"rf": "RandomForest pipeline", "lstm": "LSTM",
                "ensemble": "Ensemble (served weights and temperature)",
                "ensemble_nested": "Ensemble, nested (weights and temperature chosen on the other folds)"}


@dataclass(frozen=True)
class Served:
    """The served models' manifest (validated, and raw for its reports), card text and threshold."""

    folder: Path
    manifest: Manifest
    raw: dict[str, Any]
    card: str
    threshold: float  # what the workers flag results against: SER_UNCERTAIN_THRESHOLD, else the manifest's
    overridden: bool  # whether the threshold is the operator's rather than the model's own

    @property
    def rule(self) -> EnsembleRule:
        return self.manifest.ensemble

    @property
    def versions(self) -> dict[str, str]:
        return {name: m.version for name, m in self.manifest.models.items()}


def served(settings: Settings) -> Served:
    """The served models' card; raises ServiceUnavailable when the folder has no readable manifest."""
    folder = Path(settings.models_dir)
    try:
        manifest, raw, card = _read(str(folder), _stamp(folder / MANIFEST), _stamp(folder / CARD))
    except (OSError, ValueError) as exc:
        log.warning("model manifest unreadable models_dir=%s error=%s", folder, exc)
        raise ServiceUnavailable("the models folder has no readable manifest.json, so there is no model "
                                 "card to show", code="model_manifest_unavailable") from None
    own = manifest.ensemble.uncertain_threshold
    chosen = settings.uncertain_threshold
    return Served(folder, manifest, raw, card, own if chosen is None else chosen,
                  chosen is not None and chosen != own)


def served_or_none(settings: Settings) -> Served | None:
    """``served``, or None where there is no manifest (a job page still renders without the numbers)."""
    try:
        return served(settings)
    except ServiceUnavailable:
        return None


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size


@lru_cache(maxsize=8)
def _read(folder: str, manifest_stamp: tuple[int, int] | None,
          card_stamp: tuple[int, int] | None) -> tuple[Manifest, dict[str, Any], str]:
    """Read once per (folder, file versions): the stamps are part of the cache key."""
    path = Path(folder) / MANIFEST
    if manifest_stamp is None:
        raise FileNotFoundError(path)
    raw = json.loads(path.read_text())
    card = (Path(folder) / CARD).read_text() if card_stamp is not None else ""
    return Manifest.model_validate(raw), raw, card


# --- pictures ------------------------------------------------------------------------------------


def picture(folder: Path, name: str) -> Path | None:
    """A PNG picture of the models folder by its plain name, or None (not a picture name, absent, or
    not really a PNG: the site serves it as image/png, so it must be one)."""
    if not PICTURE_NAME.fullmatch(name):
        return None
    path = folder / name
    try:
        with path.open("rb") as f:
            head = f.read(24)
    except OSError:
        return None
    return path if head[:8] == PNG_SIGNATURE and len(head) == 24 else None


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's header (checked by ``picture``)."""
    with path.open("rb") as f:
        head = f.read(24)
    width, height = struct.unpack(">II", head[16:24])
    return int(width), int(height)


# --- what the page shows -------------------------------------------------------------------------


def report(s: Served, *keys: str) -> Any:
    """A report of the manifest by its path (``report(s, "cv", "conditions")``), or None."""
    node: Any = s.raw
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def versions(s: Served) -> list[tuple[str, str]]:
    """(what, version) rows: each model, the features, the encoder, the speech detector, the training."""
    m, raw = s.manifest, s.raw
    rows = [(MODEL_NAMES.get(name, name), art.version) for name, art in m.models.items()]
    rows.append(("Feature version", m.feature_version))
    enc = m.encoder.model_extra or {}
    if enc.get("whisper_model"):
        rows.append(("Encoder", f"Whisper {enc['whisper_model']}, first {enc.get('layers_kept', '?')} of "
                                f"{enc.get('layers_total', '?')} blocks ({enc.get('dtype', '?')}), "
                                f"sha256 {m.encoder.sha256[:12]}…"))
    else:
        rows.append(("Encoder", f"{m.encoder.file}, sha256 {m.encoder.sha256[:12]}…"))
    detector = (m.speech_detector.model_extra or {}).get("model", m.speech_detector.file)
    rows.append(("Speech detector", f"{detector}, sha256 {m.speech_detector.sha256[:12]}…"))
    if raw.get("trained_at"):
        rows.append(("Trained", f"{raw['trained_at'][:10]} (seed {raw.get('seed', '?')})"))
    return rows


def summary_rows(s: Served) -> list[dict[str, Any]]:
    """Speaker-independent accuracy per model: mean ± std over the folds, macro-F1, pooled accuracy."""
    cv = report(s, "cv") or {}
    return [{"key": key, "name": name, **cv[key]} for key, name in SUMMARY_ROWS.items()
            if isinstance(cv.get(key), dict) and "accuracy_fold_mean" in cv[key]]


def fold_rows(s: Served) -> list[dict[str, Any]]:
    """One row per cross-validation fold: its test actors and each model's accuracy on them."""
    folds = report(s, "cv", "folds") or []
    nested = {f["fold"]: f for f in report(s, "cv", "ensemble_nested", "folds") or []}
    return [{"actors": ", ".join(f.get("test_actors", [])), "rf": f.get("rf", {}).get("accuracy"),
             "lstm": f.get("lstm", {}).get("accuracy"), "ensemble": f.get("ensemble", {}).get("accuracy"),
             "rf_weight": nested.get(f.get("fold"), {}).get("rf_weight"),
             "temperature": nested.get(f.get("fold"), {}).get("temperature"),
             "epoch": f.get("lstm_best_epoch")} for f in folds]


def describe_condition(name: str) -> str:
    """A condition of ``ser train --conditions`` in words (``noise:10`` -> noise at 10 dB SNR)."""
    kind, _, value = name.partition(":")
    words = {
        "clean": lambda v: "clean studio audio",
        "telephone": lambda v: "phone line, GSM 06.10" if v == "gsm" else f"phone line, {v or 'G.711 µ-law'}",
        "noise": lambda v: f"noise at {v} dB SNR",
        "reverb": lambda v: f"room, reverberation time {v} s",
        "phone-noisy": lambda v: f"noise at {v} dB, then the phone line",
        "speed": lambda v: f"speed ×{v}",
    }
    return words[kind](value) if kind in words else name


def condition_rows(s: Served) -> list[dict[str, Any]]:
    """Accuracy under each degraded condition the training run scored (out of fold)."""
    table = report(s, "cv", "conditions") or {}
    rows = []
    for name, m in table.items():
        ens = m.get("ensemble_nested") or m.get("ensemble") or {}
        rows.append({"name": name, "words": describe_condition(name), "ensemble": ens.get("accuracy"),
                     "macro_f1": ens.get("macro_f1"), "rf": m.get("rf", {}).get("accuracy"),
                     "lstm": m.get("lstm", {}).get("accuracy")})
    return rows


@dataclass
class Confusion:
    """A confusion matrix for an HTML table: true labels by row, predictions by column."""

    labels: list[str]
    # {"label", "total", "cells": [{"n", "share", "level", "right"}]} per row shown
    rows: list[dict[str, Any]] = field(default_factory=list)


def confusion(matrix: Any, labels: list[str], skip_empty: bool = False) -> Confusion | None:
    """The matrix (a list of rows, or ``{"labels", "matrix"}`` as ``metrics.classification`` writes it)
    with each cell's share of its row and a shading level 0-9; None when there is no matrix."""
    if isinstance(matrix, dict):
        labels, matrix = list(matrix.get("labels") or labels), matrix.get("matrix")
    if not matrix or len(matrix) != len(labels) or any(len(r) != len(labels) for r in matrix):
        return None
    out = Confusion(labels)
    for i, (label, row) in enumerate(zip(labels, matrix, strict=True)):
        total = sum(int(n) for n in row)
        if skip_empty and not total:
            continue
        cells = [{"n": int(n), "share": int(n) / total if total else 0.0,
                  "level": min(9, int(10 * int(n) / total)) if total else 0, "right": i == j}
                 for j, n in enumerate(row)]
        out.rows.append({"label": label, "total": total, "cells": cells})
    return out


def cv_confusion(s: Served) -> Confusion | None:
    """The ensemble's out-of-fold confusion matrix, where the manifest holds it (newer training runs)."""
    return confusion(report(s, "cv", "ensemble", "confusion"), list(s.manifest.classes))


def per_class(s: Served) -> list[dict[str, Any]] | None:
    """Precision, recall and F1 per class (out of fold): the manifest's own figures, or read off its
    confusion matrix; None when it holds neither."""
    given = report(s, "cv", "ensemble", "per_class")
    if isinstance(given, dict) and given:
        return [{"label": c, **v} for c, v in given.items()]
    cm = cv_confusion(s)
    if cm is None:
        return None
    columns = [sum(r["cells"][j]["n"] for r in cm.rows) for j in range(len(cm.labels))]
    rows = []
    for i, r in enumerate(cm.rows):
        right = r["cells"][i]["n"]
        precision = right / columns[i] if columns[i] else 0.0
        recall = right / r["total"] if r["total"] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append({"label": r["label"], "precision": precision, "recall": recall, "f1": f1, "support": r["total"]})
    return rows


def reliability_curves(s: Served) -> dict[str, list[dict[str, Any]]]:
    """The reliability diagram's numbers: per curve, its confidence bins."""
    curves = report(s, "calibration", "curves") or {}
    return {name: c.get("bins", []) for name, c in curves.items() if isinstance(c, dict)}


def cross_corpus(s: Served) -> list[dict[str, Any]]:
    """Each corpus the shipped models were scored on after training, with its confusion matrix."""
    out = []
    for name, m in (report(s, "cross_corpus") or {}).items():
        out.append({"name": name, "words": name.replace("_", " "), **m,
                    "matrix": confusion(m.get("confusion"), list(s.manifest.classes), skip_empty=True)})
    return out


def worked_example(s: Served, result: Any) -> dict[str, Any] | None:
    """This result's confidence retraced with the served rule: each model's probability of the
    ensemble's emotion, their weighted blend, and the result's (calibrated) confidence.

    None where it cannot be retraced: no result, or a result made by other model versions than the
    served ones (then ``{"stale": True}``, so the page can say so instead).
    """
    if result is None or not getattr(result, "model_probabilities", None):
        return None
    if dict(result.model_versions or {}) != s.versions:
        return {"stale": True, "versions": dict(result.model_versions or {})}
    weights = s.manifest.ensemble.weights
    try:
        probs = [(m, w, float(result.model_probabilities[m][result.emotion])) for m, w in weights.items()]
    except (KeyError, TypeError):
        return None
    parts = [{"name": MODEL_NAMES.get(m, m), "weight": w, "p": p} for m, w, p in probs]
    return {"stale": False, "emotion": result.emotion, "parts": parts, "blend": sum(w * p for _, w, p in probs),
            "confidence": float(result.confidence), "segments": len(result.segments or [])}


def weaknesses(s: Served) -> str:
    """The card's section on limits and weaknesses (Markdown), or "" when it has none."""
    for title, body in sections(s.card):
        if re.search(r"limit|weak", title, re.IGNORECASE):
            return body
    return ""
