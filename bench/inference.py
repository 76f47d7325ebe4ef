"""Inference benchmark: per-clip model cost one clip at a time against batched, as the worker runs it.

    python -m bench.inference [--clips 256]

Compares, on real clips' features: Keras ``model.predict`` per clip (what SER scripts do), the
service's compiled LSTM path one clip at a time and in batches of 1..256, and the RandomForest
per clip against one call per batch. Checks that batched probabilities equal one-by-one ones.
Ends with one JSON line.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy loads: one core per worker process, as served
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.features import DEFAULT_DATA, pick_files, read, versions
from ser_ml.allocator import tune_malloc
from ser_shared.settings import REPO_ROOT


def per_clip_ms(fn: Callable[[], object], clips: int, repeat: int = 3) -> float:
    """Best of ``repeat`` runs of ``fn`` (which handles ``clips`` clips), in ms per clip."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        best = min(best, (time.perf_counter() - started) * 1000 / clips)
    return best


def load_single_threaded(models: Path) -> Any:
    """The served ensemble, on one core with the worker's allocator settings."""
    import tensorflow as tf

    tune_malloc()  # as the worker processes do
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from ser_ml.inference import Ensemble

    return Ensemble.load(models)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=256)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--models", type=Path, default=REPO_ROOT / "models")
    args = parser.parse_args(argv)
    ensemble = load_single_threaded(args.models)
    import tensorflow as tf

    from ser_ml import lstm
    from ser_ml.speech_features import speech_clip

    feats = ensemble.features([speech_clip(read(p)) for p in pick_files(args.data, args.clips)])
    seqs = [f.sequence for f in feats]
    vectors = np.stack([f.vector for f in feats])
    mean, std, steps = ensemble.seq_mean, ensemble.seq_std, ensemble.max_steps

    def lstm_batched(size: int) -> Callable[[], object]:
        lstm.BATCH = size  # the worker's batch size, swept here
        return lambda: lstm.predict(ensemble.lstm, seqs, mean, std, steps)

    few = seqs[:16]  # model.predict per clip is slow: a few clips suffice
    keras_single = per_clip_ms(
        lambda: [ensemble.lstm.predict(lstm.normalise(s, mean, std)[None], verbose=0) for s in few], len(few), 1)
    single = per_clip_ms(lambda: [lstm.predict(ensemble.lstm, [s], mean, std, steps) for s in seqs], len(seqs))
    sweep = {size: per_clip_ms(lstm_batched(size), len(seqs)) for size in (1, 4, 16, 64, 256)}
    lstm.BATCH = 64
    batched = lstm.predict(ensemble.lstm, seqs, mean, std, steps)
    one_by_one = np.concatenate([lstm.predict(ensemble.lstm, [s], mean, std, steps) for s in seqs])
    rf_single = per_clip_ms(lambda: [ensemble.rf_proba(v[None]) for v in vectors], len(vectors))
    rf_batched = per_clip_ms(lambda: ensemble.rf_proba(vectors), len(vectors))
    both_batched = per_clip_ms(lambda: ensemble.predict_proba(feats), len(feats))
    result = {
        "benchmark": "inference",
        "clips": len(seqs),
        "lstm_ms_per_clip": {"keras_predict_single": round(keras_single, 3), "compiled_single": round(single, 3),
                             **{f"compiled_batch_{k}": round(v, 3) for k, v in sweep.items()}},
        "rf_ms_per_clip": {"single": round(rf_single, 3), "batched": round(rf_batched, 3)},
        "ensemble_batched_ms_per_clip": round(both_batched, 3),
        "lstm_speedup_batched_vs_keras_single": round(keras_single / sweep[64], 1),
        "lstm_speedup_batched_vs_compiled_single": round(single / sweep[64], 1),
        "rf_speedup_batched_vs_single": round(rf_single / rf_batched, 1),
        "max_abs_diff_batched_vs_single": float(np.abs(batched - one_by_one).max()),
        "model_versions": ensemble.versions,
        "cpu_count": os.cpu_count(),
        "versions": versions() | {"tensorflow": tf.__version__},
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
