"""The GPU worker path: does TensorFlow see a GPU, do the encoder and the LSTM run on it, how fast?

    python -m bench.gpu [--clips 512] [--chunk 64] [--require-gpu]

Loads the served ensemble as a ``--queues gpu --pool solo`` worker does (TensorFlow's own thread
pools), places one encoder call and one LSTM call with device placement logged, and times
``ser_ml.pipeline.run`` over RAVDESS clips in chunks: recordings per second, wall clock. On a
machine without a GPU it says so and measures the CPU path (exit 1 with ``--require-gpu``).
Prints one JSON line.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import json
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.features import DEFAULT_DATA, pick_files
from ser_shared.settings import REPO_ROOT, Settings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--models", type=Path, default=REPO_ROOT / "models")
    parser.add_argument("--require-gpu", action="store_true")
    args = parser.parse_args(argv)
    import numpy as np
    import tensorflow as tf

    from ser_ml.inference import Ensemble
    from ser_ml.pipeline import JobInput, run

    gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
    ensemble = Ensemble.load(args.models, threads=None)
    placement: dict[str, Any] = {}
    with tf.device("/GPU:0" if gpus else "/CPU:0"):
        frames = ensemble.encoder._graph(tf.constant(np.zeros((1, 350, 80), np.float32)), tf.constant([350]))
        placement["encoder_output_device"] = frames.device
    placement["lstm_weights_device"] = ensemble.lstm.weights[0].value.device if ensemble.lstm.weights else None
    paths = pick_files(args.data, args.clips)
    settings = Settings(env="test")
    jobs = [JobInput(uuid.uuid4(), p, "flac") for p in paths]
    run(ensemble, jobs[: args.chunk], settings)  # warm-up: graphs traced for these shapes
    started = time.perf_counter()
    failed = 0
    for start in range(0, len(jobs), args.chunk):
        failed += sum(1 for o in run(ensemble, jobs[start : start + args.chunk], settings) if o.error_code)
    wall = time.perf_counter() - started
    result = {"benchmark": "gpu", "gpus": gpus, "gpu_used": bool(gpus) and "GPU" in str(placement),
              "placement": placement, "clips": len(jobs), "failed": failed, "chunk": args.chunk,
              "wall_s": round(wall, 2), "recordings_per_s": round(len(jobs) / wall, 1),
              "tensorflow": tf.__version__, "models": ensemble.versions}
    print(json.dumps(result))
    if args.require_gpu and not result["gpu_used"]:
        print("no GPU used", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
