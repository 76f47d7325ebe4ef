"""Load run: N parallel clients upload real RAVDESS recordings for a bounded time, then every job
is followed to its end in the database.

Reports upload latency (p50/p99), uploads per second, 5xx and transport errors, and jobs submitted
against results stored: a job that the service accepted (202) and never finished counts as lost.

    python -m bench.load --url http://127.0.0.1:8000 [--clients 8] [--seconds 30] [--files-per-upload 1]

The database to check is the one ``SER_DATABASE_URL`` names (the same settings as the service).
With auth on, pass the key in ``SER_LOAD_API_KEY``. Prints one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from ser_shared.models import FINISHED, Job, Result
from ser_shared.settings import REPO_ROOT

RAVDESS = Path(os.environ.get("SER_TEST_DATASETS", REPO_ROOT.parent / "shared" / "datasets")) / "ravdess"


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _client(base: str, files: list[Path], per_upload: int, deadline: float, seed: int,
            out: dict[str, Any], lock: threading.Lock) -> None:
    rng = random.Random(seed)
    session = requests.Session()
    key = os.environ.get("SER_LOAD_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    while time.monotonic() < deadline:
        chosen = [rng.choice(files) for _ in range(per_upload)]
        parts = [("file", (p.name, p.read_bytes(), "audio/flac")) for p in chosen]
        started = time.perf_counter()
        try:
            resp = session.post(f"{base}/api/v1/jobs", files=parts, headers=headers, timeout=60)
        except requests.RequestException:
            with lock:
                out["errors"] += 1
            continue
        elapsed = time.perf_counter() - started
        with lock:
            out["latencies"].append(elapsed)
            out["statuses"][resp.status_code] = out["statuses"].get(resp.status_code, 0) + 1
            if resp.status_code == 202:
                out["job_ids"].extend(j["id"] for j in resp.json()["jobs"])


def _drain(factory: sessionmaker[Session], job_ids: list[str], timeout_s: float) -> dict[str, int]:
    """Wait for every job to finish (or the timeout); count outcomes and stored results."""
    ids = [uuid.UUID(i) for i in job_ids]
    deadline = time.monotonic() + timeout_s
    counts: dict[str, int] = {}
    while True:
        with factory() as session:
            counts = {}
            for start in range(0, len(ids), 1000):
                part = ids[start:start + 1000]
                for status, n in session.execute(select(Job.status, func.count()).where(Job.id.in_(part))
                                                 .group_by(Job.status)):
                    counts[status] = counts.get(status, 0) + n
        unfinished = sum(n for s, n in counts.items() if s not in FINISHED)
        if unfinished == 0 or time.monotonic() > deadline:
            break
        time.sleep(1)
    with factory() as session:
        results = sum(int(session.scalar(select(func.count()).select_from(Result)
                                         .where(Result.job_id.in_(ids[s:s + 1000]))) or 0)
                      for s in range(0, len(ids), 1000))
    counts["results"] = results
    return counts


def run_load(base: str, clients: int, seconds: float, factory: sessionmaker[Session],
             per_upload: int = 1, drain_s: float = 600) -> dict[str, Any]:
    files = sorted(RAVDESS.glob("Actor_*/*.flac"))
    if not files:
        raise FileNotFoundError(f"no RAVDESS recordings under {RAVDESS}")
    out: dict[str, Any] = {"latencies": [], "statuses": {}, "errors": 0, "job_ids": []}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    started = time.perf_counter()
    threads = [threading.Thread(target=_client, args=(base, files, per_upload, deadline, i, out, lock))
               for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    upload_s = time.perf_counter() - started
    counts = _drain(factory, out["job_ids"], drain_s)
    drained_s = time.perf_counter() - started
    latencies = out["latencies"]
    statuses: dict[int, int] = out["statuses"]
    return {
        "clients": clients, "seconds": seconds, "files_per_upload": per_upload,
        "uploads": len(latencies), "uploads_per_s": round(len(latencies) / upload_s, 2),
        "p50_ms": round(_percentile(latencies, 0.50) * 1000, 1),
        "p99_ms": round(_percentile(latencies, 0.99) * 1000, 1),
        "max_ms": round(max(latencies, default=0.0) * 1000, 1),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 1) if latencies else 0.0,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "status_5xx": sum(n for code, n in statuses.items() if code >= 500), "errors": out["errors"],
        "jobs_submitted": len(out["job_ids"]), "succeeded": counts.get("succeeded", 0),
        "failed": counts.get("failed", 0), "unfinished": sum(n for s, n in counts.items()
                                                            if s not in (*FINISHED, "results")),
        "results_stored": counts["results"], "drained_s": round(drained_s, 1),
        "jobs_per_s": round(len(out["job_ids"]) / drained_s, 2) if drained_s else 0.0,
    }


def main() -> None:
    from ser_shared.db import make_engine, make_session_factory
    from ser_shared.settings import get_settings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--files-per-upload", type=int, default=1)
    parser.add_argument("--drain-s", type=float, default=600)
    args = parser.parse_args()
    factory = make_session_factory(make_engine(get_settings()))
    print(json.dumps(run_load(args.url.rstrip("/"), args.clients, args.seconds, factory,
                              args.files_per_upload, args.drain_s)))


if __name__ == "__main__":
    main()
