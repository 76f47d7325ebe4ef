"""``ser evaluate``: score the served models on a folder of labelled recordings.

It runs the worker's own path (format sniffing, decoding, resampling, features, the ensemble with
its calibration and threshold, in chunks like a task), so what it measures is what the service
does. Labels come from file names: RAVDESS (``03-01-05-01-01-01-12.wav``, calm merged into
neutral) and the Indian EmoSpeech field recordings (``Env__word-condition-emotion-time-user.flac``).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ser_shared.audio import sniff_format
from ser_shared.emotions import EMOTIONS, parse_ravdess_name
from ser_shared.errors import AudioError
from ser_shared.memory import tune_malloc
from ser_shared.settings import Settings
from worker import metrics
from worker.inference import Ensemble
from worker.pipeline import JobInput, Outcome, run

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3", ".m4a", ".aac", ".webm", ".aiff"}
# The field recordings' self-reported labels; calm is neutral, as in RAVDESS.
FIELD_LABELS = {"calm": "neutral", "neutral": "neutral", "happy": "happy", "sad": "sad", "angry": "angry",
                "fearful": "fearful", "disgust": "disgust", "surprised": "surprised"}


@dataclass(frozen=True)
class Labelled:
    path: Path
    emotion: str
    corpus: str
    speaker: str


def parse_field_name(path: Path | str) -> tuple[str, str] | None:
    """``(emotion, speaker)`` for an Indian EmoSpeech name, or None if the name does not match."""
    stem = Path(path).stem
    if "__" not in stem:
        return None
    parts = stem.split("__", 1)[1].split("-")
    if len(parts) < 5 or parts[2].lower() not in FIELD_LABELS:
        return None
    return FIELD_LABELS[parts[2].lower()], parts[-1][:12]


def label_of(path: Path) -> Labelled | None:
    ravdess = parse_ravdess_name(path)
    if ravdess is not None:
        return Labelled(path, ravdess[0], "ravdess", ravdess[1])
    field = parse_field_name(path)
    if field is not None:
        return Labelled(path, field[0], "indian_emospeech", field[1])
    return None


def labelled_files(root: Path) -> list[Labelled]:
    """Every labelled audio file under ``root``, sorted by path; unlabelled names are skipped."""
    found = (label_of(p) for p in sorted(root.rglob("*")) if p.suffix.lower() in AUDIO_SUFFIXES)
    return [item for item in found if item is not None]


def _job(item: Labelled) -> JobInput | Outcome:
    """A job input as the web tier would make it (format from the bytes), or the upload-time error."""
    try:
        with item.path.open("rb") as f:
            fmt = sniff_format(f.read(64))
    except AudioError as exc:
        return Outcome(uuid.uuid4(), error_code=exc.code, error_message=exc.message)
    return JobInput(uuid.uuid4(), item.path, fmt)


def analyse(ensemble: Ensemble, items: list[Labelled], settings: Settings, chunk: int = 32) -> list[Outcome]:
    """One outcome per item, in order, computed in chunks exactly as a worker task does."""
    outcomes: list[Outcome] = []
    for start in range(0, len(items), chunk):
        prepared = [_job(item) for item in items[start : start + chunk]]
        jobs = [p for p in prepared if isinstance(p, JobInput)]
        done = iter(run(ensemble, jobs, settings))
        outcomes.extend(p if isinstance(p, Outcome) else next(done) for p in prepared)
    return outcomes


def _probs(outcomes: list[Outcome], key: str) -> np.ndarray:
    rows = []
    for o in outcomes:
        assert o.prediction is not None
        source = o.prediction.probabilities if key == "ensemble" else o.prediction.model_probabilities[key]
        rows.append([source[c] for c in EMOTIONS])
    return np.asarray(rows, dtype=np.float64)


def report(ensemble: Ensemble, items: list[Labelled], outcomes: list[Outcome], root: Path) -> dict[str, Any]:
    """The evaluation report: metrics over the recordings that were analysed, plus the failures."""
    ok = [(item, o) for item, o in zip(items, outcomes, strict=True) if o.prediction is not None]
    failed = [(item, o) for item, o in zip(items, outcomes, strict=True) if o.prediction is None]
    y = np.array([EMOTIONS.index(item.emotion) for item, _ in ok], dtype=int)
    result: dict[str, Any] = {"root": str(root), "n": len(ok), "n_failed": len(failed)}
    if not ok:
        return {**result, "accuracy": None, "balanced_accuracy": None, "macro_f1": None, "per_class": {},
                "confusion": {"labels": list(EMOTIONS), "matrix": []}}
    served = [o for _, o in ok]
    ens = _probs(served, "ensemble")
    result.update(metrics.classification(y, ens))
    result["labels_present"] = [c for c in EMOTIONS if (y == EMOTIONS.index(c)).any()]
    # A corpus with fewer labels (the field recordings have four): the same predictions with the
    # argmax taken over its labels only, i.e. as if the service knew which four were possible.
    present = [EMOTIONS.index(c) for c in result["labels_present"]]
    within = np.asarray(present)[ens[:, present].argmax(axis=1)]
    result["accuracy_within_present_labels"] = float(np.mean(within == y))
    result["models"] = {m: {k: v for k, v in metrics.classification(y, _probs(served, m)).items()
                            if k in ("accuracy", "balanced_accuracy", "macro_f1")} for m in ("rf", "lstm")}
    result["model_versions"] = ensemble.versions
    result["calibration"] = metrics.reliability(y, ens)
    flagged = np.array([o.prediction.uncertain for o in served if o.prediction is not None])
    right = ens.argmax(axis=1) == y
    result["uncertain"] = {
        "threshold": ensemble.threshold, "share": round(float(flagged.mean()), 4),
        "accuracy_when_certain": round(float(right[~flagged].mean()), 4) if (~flagged).any() else None,
        "accuracy_when_uncertain": round(float(right[flagged].mean()), 4) if flagged.any() else None,
    }
    result["corpora"] = {c: sum(1 for item, _ in ok if item.corpus == c) for c in sorted({i.corpus for i, _ in ok})}
    result["files"] = [
        {"path": str(item.path.relative_to(root)), "label": item.emotion, "predicted": o.prediction.emotion,
         "confidence": o.prediction.confidence, "uncertain": o.prediction.uncertain}
        for item, o in ok if o.prediction is not None
    ]
    result["failures"] = [{"path": str(item.path.relative_to(root)), "code": o.error_code,
                           "message": o.error_message} for item, o in failed]
    return result


def summary(rep: dict[str, Any]) -> str:
    """A human-readable table of the report."""
    if not rep["n"]:
        return f"no recording could be analysed ({rep['n_failed']} failed)"
    lines = [f"{rep['n']} recordings ({rep['n_failed']} failed) under {rep['root']}",
             f"accuracy {rep['accuracy']:.3f}   balanced accuracy {rep['balanced_accuracy']:.3f}   "
             f"macro-F1 {rep['macro_f1']:.3f}   ECE {rep['calibration']['ece']:.3f}",
             "  ".join(f"{m} accuracy {v['accuracy']:.3f}" for m, v in rep["models"].items()),
             f"{'class':10s} {'precision':>9s} {'recall':>7s} {'f1':>6s} {'support':>8s}"]
    for name, row in rep["per_class"].items():
        if row["support"] or row["predicted"]:
            lines.append(f"{name:10s} {row['precision']:9.3f} {row['recall']:7.3f} {row['f1']:6.3f} "
                         f"{row['support']:8d}")
    u = rep["uncertain"]
    lines.append(f"uncertain below {u['threshold']}: {u['share']:.1%} of recordings; accuracy when certain "
                 f"{u['accuracy_when_certain']}, when uncertain {u['accuracy_when_uncertain']}")
    return "\n".join(lines)


def evaluate(root: Path, models_dir: Path, settings: Settings, json_path: Path | None = None,
             plot_path: Path | None = None) -> dict[str, Any]:
    tune_malloc()  # as in a worker process
    items = labelled_files(root)
    if not items:
        raise SystemExit(f"no labelled recordings (RAVDESS or Indian EmoSpeech names) under {root}")
    ensemble = Ensemble.load(models_dir)
    rep = report(ensemble, items, analyse(ensemble, items, settings), root)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(rep, indent=2) + "\n")
    if plot_path is not None and rep["n"]:
        from worker.plots import confusion_png

        confusion_png(np.asarray(rep["confusion"]["matrix"]), list(EMOTIONS), plot_path,
                      title=f"{root.name}: accuracy {rep['accuracy']:.3f}, macro-F1 {rep['macro_f1']:.3f}")
    return rep
