"""Postgres commits per recording, by the code that makes them.

    python -m bench.db_writes [--recordings 400] [--batch-size 50] [--chunk-size 8]

Uploads go through the web app (Flask's test client, in this process) and a real worker analyses
them (``create_worker``, solo pool in a thread, consuming a Redis broker), on a fresh Postgres
database. Every commit any engine of this process makes is counted (SQLAlchemy's ``commit`` event)
and charged to the service function that made it; ``pg_stat_database.xact_commit`` over the same
run is the cross-check. That counter also counts read-only transactions, which write nothing:
among them the pool's pre-ping, a ``SELECT 1`` that SQLAlchemy's psycopg dialect runs in autocommit
mode on every connection checkout. So the run also counts checkouts, and write transactions by
the transaction-id counter (``pg_current_xact_id``: a transaction gets an id only when it writes;
the counter is cluster-wide, so run it on an otherwise quiet server).

The reference, computed for the same run, is what the code is meant to do: two commits per upload
request (the rows, then the enqueue mark) and two per chunk (claim, persist; a request's files
are chunked on their own). Heartbeats and reconciler sweeps come on top, per worker per interval,
not per recording. Prints one JSON line.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import json
import math
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import redis
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import Pool

from bench.e2e import add_stack_args, create_database, cycle, encode, load_clips, log
from ser_shared.settings import REPO_ROOT, Settings

SERVICE = ("web.", "worker.", "ser_shared.", "ser_ml.")


def call_site(frame: FrameType | None) -> str:
    """The innermost service function on the stack from ``frame`` out: ``module.function``."""
    while frame is not None:
        module = str(frame.f_globals.get("__name__", ""))
        if module.startswith(SERVICE):
            return f"{module}.{frame.f_code.co_name}"
        frame = frame.f_back
    return "other"


@dataclass
class Counts:
    commits: Counter[str] = field(default_factory=Counter)  # by call site
    checkouts: int = 0  # connections taken from a pool (each one pre-ping on Postgres)


@contextmanager
def counting() -> Iterator[Counts]:
    """Every commit and pool checkout of every SQLAlchemy engine in this process while inside."""
    counts = Counts()

    def on_commit(_: Connection) -> None:
        counts.commits[call_site(sys._getframe(1))] += 1

    def on_checkout(*_: object) -> None:
        counts.checkouts += 1

    event.listen(Engine, "commit", on_commit)
    event.listen(Pool, "checkout", on_checkout)
    try:
        yield counts
    finally:
        event.remove(Engine, "commit", on_commit)
        event.remove(Pool, "checkout", on_checkout)


def pg_counters(admin: Engine, name: str) -> tuple[int, int]:
    """(xact_commit of database ``name``, the cluster's next transaction id)."""
    with admin.connect() as conn:
        conn.execute(sa.text("SELECT pg_stat_clear_snapshot()"))
        commits = conn.execute(sa.text("SELECT xact_commit FROM pg_stat_database WHERE datname = :n"),
                               {"n": name}).scalar_one()
        xid = conn.execute(sa.text("SELECT pg_snapshot_xmax(pg_current_snapshot())::text")).scalar_one()
    return int(commits), int(xid)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.db_writes", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--recordings", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=50, help="files per upload request")
    p.add_argument("--chunk-size", type=int, default=8, help="SER_CHUNK_SIZE")
    add_stack_args(p)
    args = p.parse_args()
    if not args.datasets.is_absolute():
        args.datasets = REPO_ROOT / args.datasets
    return args


def main() -> None:
    args = parse_args()
    with ExitStack() as stack:
        from celery.contrib.testing.worker import start_worker

        from ser_ml.inference import Ensemble
        from ser_shared.migrate import upgrade
        from web import create_app
        from worker.celery_app import create_worker

        db_url = create_database(stack, args.pg_admin_url)
        name = db_url.rsplit("/", 1)[1]
        admin = sa.create_engine(args.pg_admin_url, isolation_level="AUTOCOMMIT")
        stack.callback(admin.dispose)
        redis.Redis.from_url(args.redis_url).flushdb()
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ser-dbw-")))
        settings = Settings(env="test", data_dir=work, database_url=db_url, broker_url=args.redis_url,
                            storage_dir=work / "uploads", models_dir=REPO_ROOT / "models", secret_key="bench",
                            chunk_size=args.chunk_size, worker_concurrency=1, max_files_per_request=args.batch_size,
                            rate_limit_uploads_per_minute=10**6, rate_limit_files_per_minute=10**7,
                            max_queued_jobs=10**6)
        upgrade(settings)
        recs = cycle(load_clips(args.datasets, 240), args.recordings)
        bodies = [encode(recs[i:i + args.batch_size]) for i in range(0, len(recs), args.batch_size)]
        client = create_app(settings).test_client()
        worker = create_worker(settings, models=Ensemble.load(REPO_ROOT / "models"))
        time.sleep(2)  # pg_stat_database is flushed about once a second
        pg0 = pg_counters(admin, name)
        with counting() as upload:
            for body, content_type in bodies:
                resp = client.post("/api/v1/jobs", data=body, content_type=content_type)
                assert resp.status_code == 202, resp.get_data(as_text=True)
        started = time.monotonic()
        probe = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
        with counting() as analysis, start_worker(worker, pool="solo", perform_ping_check=False,
                                                  shutdown_timeout=60, hostname="db-writes@localhost"):
            while True:
                with probe.connect() as conn:  # read-only: ends in a rollback, not a commit
                    left = conn.execute(sa.text("SELECT count(*) FROM jobs WHERE status NOT IN "
                                                "('succeeded', 'failed')")).scalar_one()
                if not left:
                    break
                time.sleep(0.5)
            seconds = time.monotonic() - started
        probe.dispose()
        time.sleep(2)
        pg1 = pg_counters(admin, name)
    n = len(recs)
    counted = {f"{phase}:{site}": c for phase, counts in (("upload", upload), ("analysis", analysis))
               for site, c in counts.commits.most_common()}
    total = sum(counted.values())
    sizes = [len(recs[i:i + args.batch_size]) for i in range(0, n, args.batch_size)]
    expected = sum(2 + 2 * math.ceil(size / args.chunk_size) for size in sizes)
    pg_commits, writes = pg1[0] - pg0[0], pg1[1] - pg0[1]
    checkouts = upload.checkouts + analysis.checkouts
    log(f"{n} recordings, {len(bodies)} requests, chunks of {args.chunk_size}: {total} commits counted "
        f"({total / n:.3f} per recording), expected {expected}; pg_stat_database {pg_commits}, "
        f"checkouts {checkouts}, write transactions {writes}")
    print(json.dumps({
        "recordings": n, "requests": len(bodies), "chunk_size": args.chunk_size,
        "analysis_seconds": round(seconds, 1),
        "commits_by_site": counted, "commits_per_recording": round(total / n, 4),
        "expected_per_recording": round(expected / n, 4), "ratio_to_expected": round(total / expected, 3),
        "pg_stat_xact_commit": pg_commits, "pg_stat_per_recording": round(pg_commits / n, 4),
        "pool_checkouts": checkouts, "write_transactions": writes,
        "write_transactions_per_recording": round(writes / n, 4),
    }))


if __name__ == "__main__":
    main()
