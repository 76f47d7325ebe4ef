"""Feature-extraction benchmark: the service's pipeline against a naive librosa reference,
openSMILE eGeMAPS, and the floor (read + one STFT), all measured in this run on the same files.

    python -m bench.features [--files 200] [--rounds 5]

Each method reads the file through the service's decoder, then computes its features. Methods
run in interleaved rounds (floor, ours, naive, openSMILE, floor, ...) and each reports its median
round, so a burst of background load hits all of them alike. Everything runs single-threaded:
a worker process per core is how the service uses the machine. Ends with one JSON line.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy loads: one core per worker process, as served

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from bench import reference
from ser_ml import features
from ser_ml.allocator import tune_malloc
from ser_shared.audio import decode
from ser_shared.settings import REPO_ROOT

DEFAULT_DATA = REPO_ROOT.parent / "shared" / "datasets" / "ravdess"


def pick_files(root: Path, n: int) -> list[Path]:
    """``n`` files spread evenly over the sorted corpus (every actor and emotion represented)."""
    files = sorted(root.rglob("*.flac"))
    if not files:
        raise SystemExit(f"no FLAC files under {root}")
    return [files[i] for i in np.linspace(0, len(files) - 1, min(n, len(files))).round().astype(int)]


def read(path: Path) -> np.ndarray:
    return decode(path, "flac", features.SAMPLE_RATE, 600.0)


def opensmile_method() -> tuple[Callable[[np.ndarray], Any] | None, str | None]:
    try:
        import opensmile
    except ImportError:
        return None, None
    smile = opensmile.Smile(feature_set=opensmile.FeatureSet.eGeMAPSv02,
                            feature_level=opensmile.FeatureLevel.Functionals)
    return (lambda x: smile.process_signal(x, features.SAMPLE_RATE)), opensmile.__version__


def methods() -> dict[str, Callable[[Path], Any]]:
    found: dict[str, Callable[[Path], Any]] = {
        "floor_read_stft": lambda p: features.power_spectrogram(read(p)),
        "ours": lambda p: features.extract(read(p)),
        "naive_librosa": lambda p: reference.extract(read(p)),
    }
    smile, _ = opensmile_method()
    if smile is not None:
        found["opensmile_egemaps"] = lambda p: smile(read(p))
    return found


def time_rounds(runs: dict[str, Callable[[Path], Any]], files: Sequence[Path], rounds: int) -> dict[str, float]:
    """Median over rounds of the mean milliseconds per file, per method."""
    for run in runs.values():  # warm-up: page cache, lazy imports, filter banks, FFT plans
        for path in files[:5]:
            run(path)
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds):
        for name, run in runs.items():
            started = time.perf_counter()
            for path in files:
                run(path)
            samples[name].append((time.perf_counter() - started) * 1000 / len(files))
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.2f} ms" for k, v in samples.items()),
              file=sys.stderr, flush=True)
    return {name: statistics.median(v) for name, v in samples.items()}


def agreement(files: Sequence[Path]) -> dict[str, float]:
    """Largest differences between the fast and the reference features over the files."""
    vec, seq, rel = 0.0, 0.0, 0.0
    for path in files:
        x = read(path)
        fast, ref = features.extract(x), reference.extract(x)
        diff = np.abs(fast.vector - ref.vector)
        vec = max(vec, float(diff.max()))
        rel = max(rel, float((diff / (np.abs(ref.vector) + 1e-3)).max()))
        seq = max(seq, float(np.abs(fast.sequence - ref.sequence).max()))
    return {"max_abs_diff_vector": vec, "max_rel_diff_vector": rel, "max_abs_diff_sequence": seq}


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("numpy", "scipy", "librosa", "soxr", "soundfile", "opensmile"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args(argv)
    tune_malloc()  # as the worker processes do
    files = pick_files(args.data, args.files)
    runs = methods()
    if "opensmile_egemaps" not in runs:
        print("opensmile is not installed (pip install -e '.[bench]'): no openSMILE comparison",
              file=sys.stderr)
    ms = time_rounds(runs, files, args.rounds)
    clip_s = float(np.mean([sf_duration(p) for p in files]))
    smile = ms.get("opensmile_egemaps")
    result = {
        "benchmark": "features",
        "files": len(files),
        "mean_clip_s": round(clip_s, 3),
        "ms_per_clip": {k: round(v, 3) for k, v in ms.items()},
        "speedup_vs_naive": round(ms["naive_librosa"] / ms["ours"], 2),
        "speedup_vs_opensmile": round(smile / ms["ours"], 2) if smile else None,
        "ratio_to_stft_floor": round(ms["ours"] / ms["floor_read_stft"], 2),
        "realtime_factor_ours": round(clip_s * 1000 / ms["ours"], 1),
        **agreement(files[:: max(1, len(files) // 20)]),
        "feature_version": features.FEATURE_VERSION,
        "rounds": args.rounds,
        "threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "versions": versions(),
    }
    print(json.dumps(result))
    return 0


def sf_duration(path: Path) -> float:
    import soundfile as sf

    return float(sf.info(str(path)).duration)


if __name__ == "__main__":
    sys.exit(main())
