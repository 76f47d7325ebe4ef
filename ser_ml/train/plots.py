"""Pictures for reports and the model card: confusion matrix and reliability diagram (matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


class PlotsUnavailable(RuntimeError):
    """matplotlib, an optional extra (``train``), is not installed."""


def _pyplot() -> Any:
    """matplotlib's pyplot, drawing to files only; raises PlotsUnavailable without matplotlib."""
    try:
        import matplotlib
    except ImportError as exc:  # an optional extra: say how to get it
        raise PlotsUnavailable("plots need matplotlib: pip install 'ser-service[train]' "
                               "(in the project folder: pip install -e '.[train]')") from exc
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def confusion_png(matrix: np.ndarray, labels: list[str], path: Path, title: str = "") -> None:
    """Row-normalised confusion matrix with the counts written in each cell."""
    plt = _pyplot()
    counts = np.asarray(matrix, dtype=float)
    keep = [i for i in range(len(labels)) if counts[i].sum() > 0 or counts[:, i].sum() > 0]
    counts = counts[np.ix_(keep, keep)]
    names = [labels[i] for i in keep]
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    fig, ax = plt.subplots(figsize=(1.0 + 0.85 * len(names), 0.8 + 0.75 * len(names)), dpi=110)
    ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=8,
                    color="white" if share[i, j] > 0.55 else "black")
    ax.set_xticks(range(len(names)), names, rotation=40, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def reliability_png(curves: dict[str, dict[str, Any]], path: Path) -> None:
    """Reliability diagram: accuracy against mean confidence per bin, one line per curve."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.4, 4.2), dpi=110)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfect calibration")
    for name, curve in curves.items():
        bins = curve["bins"]
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", markersize=3,
                label=f"{name} (ECE {curve['ece']:.3f})")
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
