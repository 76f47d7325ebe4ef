"""A call-centre sized batch end to end: N recordings, some of them broken, through ``ser submit``.

Builds a folder of N files (real RAVDESS recordings under new names, plus ``--broken`` damaged
ones spread among them: empty, text named .wav, a truncated FLAC, a PNG named .flac), sends it to a
running service with ``ser submit DIR --wait --output``, and checks the CSV it writes: one row per
file, every broken file failed with an error code, every good one analysed. Prints one JSON line:
files, wall time, jobs per second, status and error-code counts, and what went wrong if anything.

    python -m bench.big_batch --url http://127.0.0.1:8000 [--files 5000] [--broken 50]

Start the service first (``ser serve --concurrency 2``, on Postgres and Redis for a run this size).
Exit status 0 only when every file has its row and every row is what it should be.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from ser_shared.settings import REPO_ROOT

RAVDESS = Path(os.environ.get("SER_TEST_DATASETS", REPO_ROOT.parent / "shared" / "datasets")) / "ravdess"
PNG_HEADER = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


def build(folder: Path, total: int, broken: int) -> set[str]:
    """Write ``total`` files into ``folder`` (``broken`` of them damaged); returns the broken names."""
    sources = sorted(RAVDESS.glob("Actor_*/*.flac"))
    if not sources:
        raise SystemExit(f"no RAVDESS recordings under {RAVDESS}")
    every = max(1, total // max(broken, 1))
    bad: set[str] = set()
    for i in range(total):
        src = sources[i % len(sources)]
        if broken and i % every == every // 2 and len(bad) < broken:
            kind = len(bad) % 4
            name = f"{i:05d}_broken.{'wav' if kind < 2 else 'flac'}"
            data = [b"", b"call notes, not audio\n" * 20, src.read_bytes()[:1500], PNG_HEADER][kind]
            bad.add(name)
        else:
            name = f"{i:05d}_{src.name}"
            data = src.read_bytes()
        (folder / name).write_bytes(data)
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--broken", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=7200)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder, out = Path(tmp) / "calls", Path(tmp) / "results.csv"
        folder.mkdir()
        bad = build(folder, args.files, args.broken)
        started = time.monotonic()
        run = subprocess.run([sys.executable, "-m", "ser_cli", "submit", str(folder), "--wait", "--server",
                              args.url, "--batch-size", str(args.batch_size), "--timeout", str(args.timeout),
                              "--output", str(out)], capture_output=True, text=True, check=False)
        wall = time.monotonic() - started
        rows = list(csv.DictReader(out.open())) if out.exists() else []
    names = [Path(r["path"]).name for r in rows]
    problems = []
    if len(rows) != args.files or len(set(names)) != args.files:
        problems.append(f"{len(rows)} rows ({len(set(names))} distinct files) for {args.files} files")
    wrong_bad = [r for r in rows if Path(r["path"]).name in bad and (r["status"] != "failed" or not r["error_code"])]
    wrong_good = [r for r in rows if Path(r["path"]).name not in bad and r["status"] != "succeeded"]
    problems += [f"broken {Path(r['path']).name}: {r['status']}" for r in wrong_bad[:5]]
    problems += [f"good {Path(r['path']).name}: {r['status']} {r['error_code']}" for r in wrong_good[:5]]
    report = {
        "files": args.files, "broken": len(bad), "wall_s": round(wall, 1),
        "jobs_per_s": round(len(rows) / wall, 2) if wall else None, "submit_exit": run.returncode,
        "status": dict(Counter(r["status"] for r in rows)),
        "error_codes": dict(Counter(r["error_code"] for r in rows if r["error_code"])),
        "emotions": dict(Counter(r["emotion"] for r in rows if r["emotion"])),
        "problems": problems, "submit_stderr_tail": run.stderr[-400:],
    }
    print(json.dumps(report))
    return 0 if not problems else 1


if __name__ == "__main__":
    raise SystemExit(main())
