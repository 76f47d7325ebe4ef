"""Cost growth with recording length: time and memory of one recording from 1 s to 30 minutes.

    python -m bench.scaling [--lengths 1,10,60,600,1800]

Each recording is real speech (RAVDESS clips joined end to end), written to a temporary FLAC and
run through the worker's path for one recording (``pipeline.run``: decode, streamed in two
passes over a minute; speech segments; features; both models). Time is the best
of a few runs; memory is the peak of Python-visible allocations (numpy's included, via
tracemalloc; not TensorFlow's own allocator) during one run. Linear cost shows as a good straight-
line fit of time against length (a fixed cost per recording plus a cost per audio second); bounded
memory shows as a peak that barely moves past one minute. Ends with one JSON line.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy loads: one core per worker process, as served
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import json
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile as sf

from bench.features import DEFAULT_DATA, pick_files, read, versions
from bench.inference import load_single_threaded
from ser_ml import features
from ser_ml.pipeline import JobInput, run
from ser_shared.settings import REPO_ROOT, Settings


def speech_of_length(files: Sequence[Path], seconds: float) -> np.ndarray:
    """Real clips joined until ``seconds`` of audio (the last one cut)."""
    need = int(seconds * features.SAMPLE_RATE)
    parts, total, i = [], 0, 0
    while total < need:
        clip = read(files[i % len(files)])
        parts.append(clip)
        total += clip.size
        i += 1
    return np.concatenate(parts)[:need]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="1,10,60,600,1800", help="seconds, comma-separated")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--models", type=Path, default=REPO_ROOT / "models")
    args = parser.parse_args(argv)
    ensemble = load_single_threaded(args.models)
    import tensorflow as tf

    files = pick_files(args.data, 60)
    settings = Settings(env="test", max_duration_s=3600.0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seconds in (float(s) for s in args.lengths.split(",")):
            path = Path(tmp) / f"speech_{seconds:g}s.flac"
            sf.write(path, speech_of_length(files, seconds), features.SAMPLE_RATE, subtype="PCM_16")

            def once(path: Path = path) -> object:
                # The worker's own path: one-shot or streamed decode, segments, both models.
                return run(ensemble, [JobInput(uuid.uuid4(), path, "flac")], settings)

            once()  # warm-up (graph shapes, page cache)
            repeats = 5 if seconds <= 60 else 2
            best = float("inf")
            for _ in range(repeats):
                started = time.perf_counter()
                once()
                best = min(best, time.perf_counter() - started)
            tracemalloc.start()
            once()
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            rows.append({"seconds": seconds, "ms": round(best * 1000, 2),
                         "ms_per_audio_s": round(best * 1000 / seconds, 3),
                         "peak_mb": round(peak / 2**20, 1), "mb_per_audio_min": round(peak / 2**20 / seconds * 60, 2)})
            print(f"{seconds:>6g} s: {rows[-1]['ms']:9.1f} ms ({rows[-1]['ms_per_audio_s']:.2f} ms per audio s), "
                  f"peak {rows[-1]['peak_mb']:.1f} MB", file=sys.stderr, flush=True)
    # Linear cost = a fixed cost per recording (model calls) plus a constant cost per audio second:
    # fit time = fixed + slope * seconds and report how far any length strays from that line.
    secs = np.array([r["seconds"] for r in rows])
    ms = np.array([r["ms"] for r in rows])
    slope, fixed = np.polyfit(secs, ms, 1) if len(rows) > 1 else (ms[0] / secs[0], 0.0)
    residual = np.abs(ms - (fixed + slope * secs)) / ms
    minute = next((r["peak_mb"] for r in rows if r["seconds"] >= 60), None)
    result = {
        "benchmark": "scaling",
        "lengths": rows,
        "linear_fit": {"fixed_ms": round(float(fixed), 2), "ms_per_audio_s": round(float(slope), 3),
                       "max_relative_residual": round(float(residual.max()), 3)},
        # Over a minute the decode is streamed: memory should stay near the one-minute figure.
        "peak_mb_at_60s": minute,
        "peak_mb_longest": rows[-1]["peak_mb"],
        "realtime_factor_longest": round(rows[-1]["seconds"] * 1000 / rows[-1]["ms"], 1),
        "model_versions": ensemble.versions,
        "versions": versions() | {"tensorflow": tf.__version__},
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
