"""Scale-out on one machine: the web tier and N workers as if on separate hosts, 1 → 3 workers, and one killed.

    python -m bench.scale [--recordings 300] [--workers 3] [--from-workers 1] [--kill-one] [--s3-endpoint URL]

Starts moto's S3 server (unless ``--s3-endpoint``), a fresh Postgres database, a FLUSHED Redis
database, the gunicorn web tier and up to N Celery workers (``ser worker --concurrency 1``), each
in its own session and with its OWN data folder: the processes share only Postgres, Redis and the
S3 store, as separate hosts would. A worker node's id (``worker.heartbeat.node``) carries the
host name, its main pid and a random part, so three workers on one host are three nodes.

The throughput phases add one worker at a time (N = 1, 2, 3, …; the ones already started stay) and
upload R recordings each, first upload byte → last result stored. Who took which job is read from
``Job.worker`` while the phase runs (a finished job's holder is cleared, so it is sampled while the
job is held) and cross-checked against each worker's own "analysed jobs=" log lines. Per phase it
also records the costs docs/SCALING.md works from, per recording: worker and web CPU seconds (the
process trees, from /proc), Postgres commits and rows written (pg_stat_database), Redis commands
(INFO commandstats of a private redis-server), S3 requests on recording objects by method (the
in-process moto server's access log) and objects and bytes stored (listing the bucket).

``--kill-one`` then uploads R more to all N workers and, once the last worker holds jobs, sends
SIGKILL to its whole process group (main process: heartbeat and reconciler; pool child): every
job must end succeeded exactly once (one Result row, attempts ≤ 2), the killed node's jobs
finished elsewhere; it reports how long after the kill they were taken back.

Ends with ONE JSON line on stdout (progress on stderr). Everything started is stopped, the database
dropped, on success, error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import requests
import sqlalchemy as sa

from bench.e2e import (
    Child,
    Clip,
    _readyz,
    add_stack_args,
    auth_headers,
    child_env,
    create_api_key,
    create_database,
    cycle,
    encode,
    expect,
    load_clips,
    log,
    run_migrate,
)
from ser_shared.models import BROKER as BROKER_HOLDER
from ser_shared.settings import REPO_ROOT, Settings

S3_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--recordings", type=int, default=300, help="recordings uploaded per phase")
    p.add_argument("--workers", type=int, default=3, help="largest number of worker processes (phases 1..N)")
    p.add_argument("--from-workers", type=int, default=1,
                   help="measure only the phases with at least this many workers (the others are started)")
    p.add_argument("--batch-size", type=int, default=50, help="files per upload request")
    p.add_argument("--chunk-size", type=int, default=8, help="SER_CHUNK_SIZE: jobs per task message")
    p.add_argument("--kill-one", action="store_true", help="after the phases, kill -9 one worker mid-batch")
    p.add_argument("--dead-after", type=float, default=5.0, help="SER_WORKER_DEAD_AFTER_S (heartbeat: a fifth)")
    p.add_argument("--s3-endpoint", default=None, help="an S3 endpoint to use instead of starting moto")
    add_stack_args(p, redis_default=None,
                   redis_help="Redis database used as the broker, FLUSHED first (default: a private redis-server, "
                              "so that INFO commandstats counts this run's commands only)")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for one phase's results")
    args = p.parse_args(argv)
    if args.recordings < 1 or args.workers < 1 or args.batch_size < 1:
        p.error("--recordings, --workers and --batch-size must be at least 1")
    if not 1 <= args.from_workers <= args.workers:
        p.error("--from-workers must be between 1 and --workers")
    if not args.datasets.is_absolute():
        args.datasets = REPO_ROOT / args.datasets
    return args


# --------------------------------------------------------------------------------------------- services


class S3Requests(logging.Handler):
    """Counts the in-process moto server's requests on recording objects, by method (from its access
    log: the bench's own bucket listings are not on object keys, so they are left out)."""

    PATTERN = re.compile(r'"(GET|PUT|HEAD|POST|DELETE) /[^/ ]+/audio/')

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        if match := self.PATTERN.search(record.getMessage()):
            self.counts[match.group(1)] += 1


S3_REQUESTS = S3Requests()


def start_s3(stack: ExitStack, endpoint: str | None) -> str:
    os.environ.update({k: os.environ.get(k, v) for k, v in S3_ENV.items()})  # boto3 and children read these
    if endpoint:
        return endpoint
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    access = logging.getLogger("werkzeug")  # moto's server is a werkzeug one
    access.addHandler(S3_REQUESTS)
    access.propagate = False
    access.setLevel(logging.INFO)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    stack.callback(server.stop)
    log(f"moto S3 on port {port}")
    return f"http://127.0.0.1:{port}"


def make_bucket(endpoint: str) -> tuple[Any, str]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    name = f"ser-scale-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=name)
    return client, name


def bucket_usage(bucket: tuple[Any, str]) -> tuple[int, int]:
    """(objects, bytes) under the bucket."""
    client, name = bucket
    count = size = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        for obj in page.get("Contents", []):
            count, size = count + 1, size + int(obj["Size"])
    return count, size


def start_redis(stack: ExitStack, work: Path) -> str:
    """A private, non-persistent redis-server: its command counts are this run's alone."""
    port = _free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(work)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stack.callback(proc.wait)
    stack.callback(proc.kill)
    client = redis.Redis(port=port)
    for _ in range(200):
        with suppress(redis.ConnectionError):
            if client.ping():
                break
        time.sleep(0.05)
    log(f"private redis-server on port {port}")
    return f"redis://127.0.0.1:{port}/0"


@dataclass
class Worker:
    index: int
    child: Child

    @property
    def pid(self) -> int:
        return self.child.proc.pid

    def analysed(self) -> int:
        return sum(int(n) for n in re.findall(r"analysed jobs=(\d+)", self.child.log_text()))


def start_worker(stack: ExitStack, base: Settings, index: int, work: Path) -> Worker:
    """A worker "host": its own data folder, its own session (process group)."""
    settings = base.model_copy(update={"data_dir": work / f"worker{index}" / "data"})
    argv = [sys.executable, "-m", "ser_cli", "worker", "--concurrency", "1"]
    child = Child(f"worker{index}", argv, child_env(settings), work / f"worker{index}.log")
    stack.callback(child.stop)
    return Worker(index, child)


def wait_worker_ready(worker: Worker, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not worker.child.alive():
            raise RuntimeError(f"worker{worker.index} exited:\n{worker.child.log_text()[-3000:]}")
        text = worker.child.log_text()
        if "ready." in text and "models loaded" in text:
            return
        time.sleep(0.5)
    raise RuntimeError(f"worker{worker.index} not ready:\n{worker.child.log_text()[-3000:]}")


# --------------------------------------------------------------------------------------------- measuring


class HolderSampler:
    """Samples ``Job.worker`` every few ms: which node held which job (and when a node's jobs moved)."""

    def __init__(self, engine: sa.Engine, interval: float = 0.05) -> None:
        self.engine, self.interval = engine, interval
        self.held: dict[str, set[str]] = {}  # job id → nodes seen holding it
        self.last_seen: dict[str, float] = {}  # node → monotonic time it was last seen holding a job
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> HolderSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        query = sa.text("SELECT id::text, worker FROM jobs WHERE worker IS NOT NULL AND worker <> :broker")
        while not self._stop.is_set():
            with self.engine.connect() as conn:
                rows = conn.execute(query, {"broker": BROKER_HOLDER}).all()
            now = time.monotonic()
            for job_id, node in rows:
                self.held.setdefault(job_id, set()).add(node)
                self.last_seen[node] = now
            self._stop.wait(self.interval)

    def per_node(self) -> Counter[str]:
        return Counter(node for nodes in self.held.values() for node in nodes)

    def nodes_of(self, pid: int) -> list[str]:
        return [n for n in self.last_seen if f":{pid}:" in n]


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and all its live descendants (from /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with suppress(OSError):
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()  # fields[1]: the parent pid; 11, 12: utime, stime
            parent[int(entry.name)], cpu[int(entry.name)] = int(fields[1]), (int(fields[11]) + int(fields[12])) / tick

    def under(p: int) -> bool:
        while p > 1:
            if p == pid:
                return True
            p = parent.get(p, 0)
        return False

    return sum(c for p, c in cpu.items() if under(p))


def _own_cpu_s() -> float:
    """This process's CPU seconds: the uploads, the samplers and the in-process moto server."""
    t = os.times()
    return t.user + t.system


def _busy_s() -> float:
    """Busy CPU seconds of the whole machine so far (/proc/stat: all but idle and iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def pg_counters(engine: sa.Engine) -> dict[str, int]:
    query = sa.text("SELECT xact_commit, tup_inserted, tup_updated, tup_deleted FROM pg_stat_database "
                    "WHERE datname = current_database()")
    with engine.connect() as conn:
        row = conn.execute(query).one()
    return dict(zip(("commits", "inserted", "updated", "deleted"), (int(v) for v in row), strict=True))


def redis_commands(client: redis.Redis) -> int:
    stats: dict[str, Any] = client.info("commandstats")  # type: ignore[assignment]
    return sum(int(v["calls"]) for v in stats.values())


# --------------------------------------------------------------------------------------------- phases


@dataclass
class Ctx:
    args: argparse.Namespace
    base_url: str
    headers: dict[str, str]
    engine: sa.Engine
    broker: redis.Redis
    bucket: tuple[Any, str]
    clips: list[Clip]
    web: Child
    workers: list[Worker] = field(default_factory=list)


def upload(ctx: Ctx, recs: list[Clip]) -> list[str]:
    """Upload ``recs`` in batches (two requests in flight), returning the job ids."""
    bodies = [encode(recs[i:i + ctx.args.batch_size]) for i in range(0, len(recs), ctx.args.batch_size)]

    def send(body: tuple[bytes, str]) -> list[str]:
        resp = requests.post(f"{ctx.base_url}/api/v1/jobs", data=body[0], timeout=300,
                             headers={**ctx.headers, "Content-Type": body[1]})
        return [j["id"] for j in expect(resp, "upload", 202).json()["jobs"]]

    with ThreadPoolExecutor(2) as pool:
        return [i for ids in pool.map(send, bodies) for i in ids]


def wait_done(ctx: Ctx, ids: list[str], timeout: float) -> None:
    query = sa.text("SELECT count(*) FROM jobs WHERE id = ANY(CAST(:ids AS uuid[])) "
                    "AND status IN ('succeeded', 'failed')")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with ctx.engine.connect() as conn:
            if conn.execute(query, {"ids": ids}).scalar_one() == len(ids):
                return
        time.sleep(0.1)
    raise RuntimeError(f"phase not finished in {timeout:.0f} s")


def outcome(ctx: Ctx, ids: list[str]) -> dict[str, Any]:
    """Statuses, attempts and Result rows of ``ids``: each job succeeded once?"""
    query = sa.text("SELECT j.status, j.attempts, (SELECT count(*) FROM results r WHERE r.job_id = j.id) "
                    "FROM jobs j WHERE j.id = ANY(CAST(:ids AS uuid[]))")
    with ctx.engine.connect() as conn:
        rows = conn.execute(query, {"ids": ids}).all()
    return {"jobs": len(rows), "statuses": dict(Counter(r[0] for r in rows)),
            "attempts": dict(Counter(int(r[1]) for r in rows)), "result_rows": dict(Counter(int(r[2]) for r in rows))}


def phase(ctx: Ctx, n: int) -> dict[str, Any]:
    recs = cycle(ctx.clips, ctx.args.recordings)
    cpu0 = {w.index: tree_cpu_s(w.pid) for w in ctx.workers}
    analysed0 = {w.index: w.analysed() for w in ctx.workers}
    pg0, redis0, s30 = pg_counters(ctx.engine), redis_commands(ctx.broker), bucket_usage(ctx.bucket)
    s3req0, web0, own0, busy0 = Counter(S3_REQUESTS.counts), tree_cpu_s(ctx.web.proc.pid), _own_cpu_s(), _busy_s()
    with HolderSampler(ctx.engine) as sampler:
        start = time.monotonic()
        ids = upload(ctx, recs)
        wait_done(ctx, ids, ctx.args.timeout)
        elapsed = time.monotonic() - start
    pg1, redis1, s31 = pg_counters(ctx.engine), redis_commands(ctx.broker), bucket_usage(ctx.bucket)
    cpu = sum(tree_cpu_s(w.pid) - cpu0[w.index] for w in ctx.workers)
    web_cpu, own_cpu, busy = tree_cpu_s(ctx.web.proc.pid) - web0, _own_cpu_s() - own0, _busy_s() - busy0
    s3req = S3_REQUESTS.counts - s3req0
    by_node = sampler.per_node()
    result = {
        "workers": n, "recordings": len(ids), "seconds": round(elapsed, 2),
        "recordings_per_s": round(len(ids) / elapsed, 2),
        "jobs_by_worker": {f"worker{w.index}": sum(c for node, c in by_node.items() if f":{w.pid}:" in node)
                           for w in ctx.workers},
        "analysed_by_worker_log": {f"worker{w.index}": w.analysed() - analysed0[w.index] for w in ctx.workers},
        "distinct_holders": len(by_node),
        "machine_busy_cores": round(busy / elapsed, 2),  # of os.cpu_count(), everything on the machine
        "per_recording": {
            "worker_cpu_s": round(cpu / len(ids), 4),
            "web_cpu_s": round(web_cpu / len(ids), 4),
            "bench_and_moto_cpu_s": round(own_cpu / len(ids), 4),
            "s3_requests": {k: round(v / len(ids), 2) for k, v in sorted(s3req.items())},
            "pg_commits": round((pg1["commits"] - pg0["commits"]) / len(ids), 2),
            "pg_rows_written": round(sum(pg1[k] - pg0[k] for k in ("inserted", "updated", "deleted")) / len(ids), 2),
            "redis_commands": round((redis1 - redis0) / len(ids), 2),
            "s3_objects": round((s31[0] - s30[0]) / len(ids), 3),
            "s3_bytes": round((s31[1] - s30[1]) / len(ids)),
        },
        "outcome": outcome(ctx, ids),
    }
    log(f"N={n}: {result['recordings_per_s']} recordings/s, by worker {result['jobs_by_worker']}")
    return result


def kill_phase(ctx: Ctx) -> dict[str, Any]:
    """Upload R to all workers, kill -9 the last one's process group once it holds jobs."""
    victim = ctx.workers[-1]
    recs = cycle(ctx.clips, ctx.args.recordings)
    with HolderSampler(ctx.engine, interval=0.02) as sampler:
        sender = ThreadPoolExecutor(1)
        future = sender.submit(upload, ctx, recs)
        deadline = time.monotonic() + 120
        while not sampler.nodes_of(victim.pid):
            if time.monotonic() > deadline:
                raise RuntimeError("the victim never held a job")
            time.sleep(0.01)
        node = sampler.nodes_of(victim.pid)[0]
        with ctx.engine.connect() as conn:
            held = [r[0] for r in conn.execute(sa.text("SELECT id::text FROM jobs WHERE worker = :n"), {"n": node})]
        os.killpg(victim.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        log(f"killed worker{victim.index} (node {node}) holding {len(held)} jobs")
        victim.child.proc.wait()
        ids = future.result()
        sender.shutdown()
        # The victim's jobs are back once none is held by it any more (taken by another node or done).
        query = sa.text("SELECT count(*) FROM jobs WHERE id = ANY(CAST(:ids AS uuid[])) AND worker = :n")
        while True:
            with ctx.engine.connect() as conn:
                if conn.execute(query, {"ids": held, "n": node}).scalar_one() == 0:
                    break
            if time.monotonic() - killed_at > ctx.args.timeout:
                raise RuntimeError("the killed worker's jobs were never taken back")
            time.sleep(0.05)
        requeued_s = time.monotonic() - killed_at
        wait_done(ctx, ids, ctx.args.timeout)
        total_s = time.monotonic() - killed_at
    again = [j for j in held if len(sampler.held.get(j, set()) - {node}) > 0]
    by_node = sampler.per_node()
    result: dict[str, Any] = {"killed": f"worker{victim.index}", "held_when_killed": len(held),
              "held_jobs_finished_by_another_worker": len(again),
              "jobs_by_worker": {f"worker{w.index}": sum(c for n, c in by_node.items() if f":{w.pid}:" in n)
                                 for w in ctx.workers},
              "requeue_s": round(requeued_s, 2), "kill_to_all_done_s": round(total_s, 2),
              "outcome": outcome(ctx, ids), "held_outcome": outcome(ctx, held)}
    out = result["outcome"]
    result["ok"] = (out["statuses"] == {"succeeded": len(ids)} and out["result_rows"] == {1: len(ids)}
                    and max(out["attempts"]) <= 2 and len(again) == len(held))
    log(f"kill: {result}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report: dict[str, Any] = {"bench": "scale", "args": {k: str(v) for k, v in vars(args).items()}}
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="ser-scale-") as tmp:
        work = Path(tmp)
        endpoint = start_s3(stack, args.s3_endpoint)
        bucket = make_bucket(endpoint)
        db_url = create_database(stack, args.pg_admin_url)
        redis_url = args.redis_url or start_redis(stack, work)
        broker = redis.Redis.from_url(redis_url)
        broker.flushdb()
        base = Settings(env="production", database_url=db_url, broker_url=redis_url,
                        data_dir=work / "web" / "data", storage_url=f"s3://{bucket[1]}/audio",
                        s3_endpoint_url=endpoint, secret_key=secrets.token_hex(16), log_level="INFO",
                        chunk_size=args.chunk_size, worker_concurrency=1,
                        worker_heartbeat_s=args.dead_after / 5, worker_dead_after_s=args.dead_after,
                        sweep_interval_s=1.0, rate_limit_uploads_per_minute=1_000_000,
                        rate_limit_files_per_minute=10_000_000, max_queued_jobs=1_000_000)
        env = child_env(base)
        run_migrate(env)
        headers = auth_headers(create_api_key(env))
        port = _free_port()
        web = Child("web", [sys.executable, "-m", "ser_cli", "web", "--host", "127.0.0.1", "--port", str(port),
                            "--workers", "1"], env, work / "web.log")
        stack.callback(web.stop)
        ctx = Ctx(args, f"http://127.0.0.1:{port}", headers, sa.create_engine(db_url), broker, bucket,
                  load_clips(args.datasets, 1440), web)
        stack.callback(ctx.engine.dispose)
        phases = []
        try:
            for n in range(1, args.workers + 1):
                ctx.workers.append(start_worker(stack, base, n, work))
                wait_worker_ready(ctx.workers[-1])
                while not _readyz(ctx.base_url):
                    time.sleep(0.2)
                if n >= args.from_workers:
                    phases.append(phase(ctx, n))
            report["phases"] = phases
            if phases and phases[0]["workers"] == 1:
                report["rate_vs_1"] = {p["workers"]: round(p["recordings_per_s"] / phases[0]["recordings_per_s"], 2)
                                       for p in phases}
            if args.kill_one:
                report["kill_one"] = kill_phase(ctx)
        except Exception as exc:  # noqa: BLE001 - reported in the JSON line, exit status 1
            report["error"] = f"{type(exc).__name__}: {exc}"
            report["phases"] = phases
            for w in ctx.workers:
                log(f"worker{w.index} log tail:\n{w.child.log_text()[-1500:]}")
    report["cores"] = os.cpu_count()
    print(json.dumps(report), flush=True)
    return 1 if "error" in report or not report.get("kill_one", {}).get("ok", True) else 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    sys.exit(main())
