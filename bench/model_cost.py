"""Cost of the models per clip, as the worker runs them, against the previous (fv3) pipeline.

    python -m bench.model_cost [--clips 256] [--chunk 32] [--reference-commit ef44c8b]

Both sides run on one core (one BLAS and one TensorFlow thread, as each worker process does) on
the same RAVDESS clips (about 3.5 s each) and are charged CPU time (``time.process_time``), so a
busy machine does not inflate them:

- **served (fv4)**: ``ser_ml.pipeline.run`` on chunks of ``--chunk`` stored files: decode, Silero
  VAD, speech clip, the Whisper encoder's first two blocks (batched across the chunk), the RF
  pipeline and the LSTM: everything between the stored file and the stored probabilities;
- **reference (fv3)**: the same files through the previous pipeline: decode, the hand-made
  features (``ser_ml.features.extract``) and the previous RandomForest + LSTM, loaded from the
  models shipped at ``--reference-commit`` (read out of git; skipped, and said, if git has no such commit).

Prints one JSON line with both per-clip costs and their ratio.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy loads: one core per worker process, as served
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import json
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.features import DEFAULT_DATA, pick_files, read
from ser_ml.allocator import tune_malloc
from ser_shared.settings import REPO_ROOT, Settings

REFERENCE_COMMIT = "ef44c8b"  # the last commit serving the fv3 models


def cpu_ms_per_clip(fn: Callable[[], object], clips: int, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        fn()
        best = min(best, (time.process_time() - started) * 1000 / clips)
    return best


def reference_models(commit: str, out: Path) -> dict[str, Any] | None:
    """The fv3 RandomForest bundle, LSTM and manifest from ``commit`` (None when git lacks it)."""
    for name in ("manifest.json", "rf.joblib", "lstm.keras"):
        proc = subprocess.run(["git", "show", f"{commit}:models/{name}"], cwd=REPO_ROOT, capture_output=True)
        if proc.returncode != 0:
            return None
        (out / name).write_bytes(proc.stdout)
    import joblib
    import keras

    manifest = json.loads((out / "manifest.json").read_text())
    return {"manifest": manifest, "rf": joblib.load(out / "rf.joblib"),
            "lstm": keras.models.load_model(out / "lstm.keras", compile=False)}


def reference_run(ref: dict[str, Any], paths: list[Path]) -> np.ndarray:
    """The previous pipeline end to end: decode, fv3 features, RF (scaler + forest) and LSTM."""
    from ser_ml import features, lstm

    feats = [features.extract(read(p)) for p in paths]
    vectors = np.stack([f.vector for f in feats])
    rf = ref["rf"]["rf"].predict_proba(ref["rf"]["scaler"].transform(vectors))
    info = ref["manifest"]["models"]["lstm"]
    seq = lstm.predict(ref["lstm"], [f.sequence for f in feats], np.asarray(info["seq_mean"], np.float32),
                       np.asarray(info["seq_std"], np.float32), int(info["max_steps"]))
    return np.asarray(rf) + seq


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--models", type=Path, default=REPO_ROOT / "models")
    parser.add_argument("--reference-commit", default=REFERENCE_COMMIT)
    args = parser.parse_args(argv)
    tune_malloc()
    from ser_ml.inference import Ensemble
    from ser_ml.pipeline import JobInput, run

    ensemble = Ensemble.load(args.models, threads=1)
    paths = pick_files(args.data, args.clips)
    settings = Settings(env="test")

    def served() -> None:
        for start in range(0, len(paths), args.chunk):
            jobs = [JobInput(uuid.uuid4(), p, "flac") for p in paths[start : start + args.chunk]]
            outcomes = run(ensemble, jobs, settings)
            bad = [o.error_code for o in outcomes if o.error_code]
            if bad:
                raise SystemExit(f"the served pipeline failed clips: {bad[:5]}")

    durations = [read(p).size / 16000 for p in paths]
    result: dict[str, Any] = {"benchmark": "model_cost", "clips": len(paths), "chunk": args.chunk,
                              "mean_clip_s": round(float(np.mean(durations)), 2),
                              "model_versions": ensemble.versions}
    served()  # warm-up: graphs traced, files in the page cache
    result["served_fv4_cpu_ms_per_clip"] = round(cpu_ms_per_clip(served, len(paths)), 2)
    with tempfile.TemporaryDirectory() as tmp:
        ref = reference_models(args.reference_commit, Path(tmp))
        if ref is None:
            result["reference"] = f"commit {args.reference_commit} not in this git checkout: no reference"
        else:
            ref["rf"]["rf"].n_jobs = 1

            def previous() -> None:
                for start in range(0, len(paths), args.chunk):
                    reference_run(ref, paths[start : start + args.chunk])

            previous()
            result["reference_fv3_cpu_ms_per_clip"] = round(cpu_ms_per_clip(previous, len(paths)), 2)
            result["ratio_fv4_to_fv3"] = round(result["served_fv4_cpu_ms_per_clip"]
                                               / result["reference_fv3_cpu_ms_per_clip"], 2)
    result["goal_ms_per_clip"] = 40.0
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
