"""Classification and calibration metrics in plain numpy, used by training and by ``ser evaluate``.

Written here rather than taken from scikit-learn so that the tests can check them against
scikit-learn as an independent computation. Macro averages run over the classes present in the
ground truth: a corpus with four labels is not penalised for the three it does not contain.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ser_shared.emotions import EMOTIONS


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int = len(EMOTIONS)) -> np.ndarray:
    """Counts, rows = true class, columns = predicted class."""
    out = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(out, (np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)), 1)
    return out


def classification(y_true: np.ndarray, probs: np.ndarray, classes: tuple[str, ...] = EMOTIONS) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1 and per-class precision/recall/F1 from probabilities."""
    y_true = np.asarray(y_true, dtype=int)
    y_pred = np.asarray(probs).argmax(axis=1)
    cm = confusion(y_true, y_pred, len(classes))
    tp = np.diag(cm).astype(float)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    present = support > 0
    return {
        "n": int(y_true.size),
        "accuracy": float(tp.sum() / max(y_true.size, 1)),
        "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {
            c: {"precision": round(float(precision[i]), 4), "recall": round(float(recall[i]), 4),
                "f1": round(float(f1[i]), 4), "support": int(support[i]), "predicted": int(predicted[i])}
            for i, c in enumerate(classes)
        },
        "confusion": {"labels": list(classes), "matrix": cm.tolist()},
    }


def reliability(y_true: np.ndarray, probs: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Reliability curve of the top-class confidence and its expected calibration error (ECE).

    ECE = sum over equal-width confidence bins of (bin share) * |accuracy - mean confidence|.
    """
    conf = np.asarray(probs).max(axis=1)
    right = np.asarray(probs).argmax(axis=1) == np.asarray(y_true)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    table = []
    ece = 0.0
    for b in range(bins):
        mask = which == b
        if not mask.any():
            continue
        acc, mean_conf = float(right[mask].mean()), float(conf[mask].mean())
        ece += mask.mean() * abs(acc - mean_conf)
        table.append({"low": round(float(edges[b]), 2), "high": round(float(edges[b + 1]), 2),
                      "count": int(mask.sum()), "confidence": round(mean_conf, 4), "accuracy": round(acc, 4)})
    return {"ece": round(float(ece), 4), "bins": table}


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature scaling in log space: T > 1 softens over-confident probabilities, T < 1 sharpens."""
    logits = np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-7, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    out = np.exp(logits)
    return out / out.sum(axis=1, keepdims=True)


def fit_temperature(y_true: np.ndarray, probs: np.ndarray) -> float:
    """The temperature minimising the negative log-likelihood (a 1-D search, coarse then fine)."""
    y_true = np.asarray(y_true, dtype=int)

    def nll(t: float) -> float:
        p = apply_temperature(probs, t)[np.arange(y_true.size), y_true]
        return float(-np.mean(np.log(np.clip(p, 1e-12, 1.0))))

    grid = np.exp(np.linspace(np.log(0.05), np.log(5.0), 60))
    best = float(grid[int(np.argmin([nll(t) for t in grid]))])
    fine = best * np.exp(np.linspace(-0.1, 0.1, 41))
    return round(float(fine[int(np.argmin([nll(t) for t in fine]))]), 4)
