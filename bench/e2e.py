"""End-to-end throughput benchmark of the real service on this machine.

It creates a fresh Postgres database and flushes one Redis database, runs ``ser migrate``, creates an
API key with ``ser keys create`` (production has authentication on), starts the gunicorn web tier and
the Celery worker(s) as subprocesses, uploads real RAVDESS recordings in multipart batches through
the HTTP API and times first upload byte → last result stored. Then it times single uploads to
result on the idle service, fetches one upload's audio back, checks a sample of stored results
against an in-process one-by-one run of the same pipeline, and prints ONE JSON line on stdout
(progress goes to stderr).

Every API request carries the key. An answer other than the expected 2xx (401, 429, 5xx, ...) or a
failed request stops the bench with an error naming the status and body: exit status 1, and the
JSON line's ``error`` says it (``http_errors`` counts the failed throughput uploads).

    python -m bench.e2e [--recordings 1000] [--batch-size 100] [--concurrency 2] [--chunk-size 16]

Every process it starts is stopped, and the database dropped, on success, error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import IO, Any

import redis
import requests
import sqlalchemy as sa
from urllib3.filepost import encode_multipart_formdata

from ser_shared.settings import REPO_ROOT, Settings

DEFAULT_PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/10"
DEFAULT_DATASETS = Path("..") / "shared" / "datasets"  # relative to the repository root
FINISHED = ("succeeded", "failed")
VERSIONED_PACKAGES = ("ser-service", "flask", "werkzeug", "gunicorn", "celery", "kombu", "redis", "sqlalchemy",
                      "psycopg", "numpy", "scipy", "librosa", "scikit-learn", "tensorflow-cpu", "tensorflow",
                      "keras", "soundfile", "soxr", "requests", "psutil")

_T0 = time.monotonic()


def log(message: str) -> None:
    print(f"[bench {time.monotonic() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- options


def add_stack_args(p: argparse.ArgumentParser, when: str = "", redis_default: str | None = DEFAULT_REDIS_URL,
                   redis_help: str = "Redis database used as the broker; it is FLUSHED first") -> None:
    """The options every service bench shares: where the recordings are, and the Postgres and Redis
    it runs on (``when`` prefixes their help, e.g. "--stack services: ")."""
    p.add_argument("--datasets", type=Path, default=DEFAULT_DATASETS,
                   help="folder holding ravdess/Actor_*/*.flac (relative paths: to the repository root)")
    p.add_argument("--pg-admin-url", default=os.environ.get("SER_BENCH_PG_ADMIN_URL", DEFAULT_PG_ADMIN_URL),
                   help=f"{when}Postgres URL with CREATE DATABASE rights (env SER_BENCH_PG_ADMIN_URL)")
    p.add_argument("--redis-url", default=os.environ.get("SER_BENCH_REDIS_URL", redis_default),
                   help=f"{when}{redis_help} (env SER_BENCH_REDIS_URL)")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--recordings", type=int, default=1000, help="recordings uploaded in the throughput run")
    p.add_argument("--batch-size", type=int, default=100, help="files per upload request")
    p.add_argument("--upload-concurrency", type=int, default=2, help="upload requests in flight at once")
    p.add_argument("--concurrency", type=int, default=2, help="Celery worker processes")
    p.add_argument("--web-workers", type=int, default=2, help="gunicorn worker processes")
    p.add_argument("--chunk-size", type=int, default=None, help="SER_CHUNK_SIZE; None keeps the service's own default")
    p.add_argument("--latency-samples", type=int, default=30, help="sequential single uploads timed to result")
    p.add_argument("--identity-samples", type=int, default=20,
                   help="distinct recordings compared with an in-process one-by-one run (0: skip)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max abs probability difference for 'identical'")
    add_stack_args(p)
    p.add_argument("--port", type=int, default=0, help="web port (0: a free one)")
    p.add_argument("--start-timeout", type=float, default=300, help="seconds for the service to become ready")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for all results")
    p.add_argument("--keep-going", action="store_true",
                   help="run the later phases even when the throughput phase failed or timed out")
    args = p.parse_args(argv)
    for name in ("recordings", "batch_size", "upload_concurrency", "concurrency", "web_workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if not args.datasets.is_absolute():
        args.datasets = REPO_ROOT / args.datasets
    return args


# --------------------------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class Clip:
    name: str
    path: Path
    data: bytes


def load_clips(datasets: Path, limit: int) -> list[Clip]:
    """The first ``limit`` distinct recordings, read once (the dataset is only ever read)."""
    paths = sorted((datasets / "ravdess").glob("Actor_*/*.flac"))
    if not paths:
        raise RuntimeError(f"no recordings under {datasets / 'ravdess'}/Actor_*/*.flac (see --datasets)")
    return [Clip(p.name, p, p.read_bytes()) for p in paths[:limit]]


def cycle(clips: Sequence[Clip], n: int) -> list[Clip]:
    return [clips[i % len(clips)] for i in range(n)]


def encode(clips: Sequence[Clip]) -> tuple[bytes, str]:
    """One multipart body with a ``file`` part per clip, built before timing starts."""
    body, content_type = encode_multipart_formdata([("file", (c.name, c.data, "audio/flac")) for c in clips])
    return body, content_type


# --------------------------------------------------------------------------------------------- backing services


def create_database(stack: ExitStack, admin_url: str) -> str:
    """A fresh database, dropped when ``stack`` closes; returns its URL."""
    name = f"ser_bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
        log(f"dropped database {name}")

    stack.callback(drop)
    log(f"created database {name}")
    return sa.make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def service_settings(args: argparse.Namespace, db_url: str, work: Path) -> Settings:
    """Production-shaped settings for the service under test (validated like the real thing)."""
    extra: dict[str, Any] = {} if args.chunk_size is None else {"chunk_size": args.chunk_size}
    return Settings(env="production", database_url=db_url, broker_url=args.redis_url, data_dir=work / "data",
                    storage_dir=work / "uploads", worker_concurrency=args.concurrency,
                    secret_key=secrets.token_hex(16), log_level="INFO", **extra)


def child_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a child process exactly ``settings`` (inherited SER_* dropped)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SER_")}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if value is not None:
            env[f"SER_{name.upper()}"] = str(value)
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


# --------------------------------------------------------------------------------------------- child processes


class Child:
    """A service process in its own session, so that stopping it also reaches its pool children."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name, self.log_path = name, log_path
        self._log: IO[bytes] = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, env=env, cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (a warm shutdown), then SIGKILL to the whole process group if it lingers."""
        if self._log.closed:
            return  # already stopped
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name} ignored SIGTERM for {timeout:.0f} s; killing it")
        # Pool children that outlived their parent are still in its process group.
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._log.close()
        log(f"stopped {self.name} (exit {self.proc.returncode})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ApiError(RuntimeError):
    """The API answered something other than what the bench expects (or did not answer)."""

    def __init__(self, message: str, count: int = 1) -> None:
        super().__init__(message)
        self.count = count


def expect(resp: requests.Response, what: str, status: int | None = None) -> requests.Response:
    """``resp`` when it has ``status`` (any 2xx when None); else an :class:`ApiError` naming status and body."""
    ok = resp.status_code == status if status is not None else 200 <= resp.status_code < 300
    if not ok:
        raise ApiError(f"{what}: HTTP {resp.status_code} (expected {status or '2xx'}): {resp.text[:500]}")
    return resp


def run_migrate(env: dict[str, str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "ser_cli", "migrate"], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ser migrate failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    log("migrations applied")


def create_api_key(env: dict[str, str]) -> str:
    """A new API key from ``ser keys create`` on the bench's database (the operator's own path)."""
    proc = subprocess.run([sys.executable, "-m", "ser_cli", "keys", "create", "--name", "bench-e2e", "--json"],
                          env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("{")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"ser keys create failed (exit {proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    key = json.loads(line)["key"]
    if not isinstance(key, str) or not key.startswith("ser_"):
        raise RuntimeError(f"ser keys create printed no key: {line[:200]}")
    log(f"API key created ({key[:12]}…)")
    return key


def auth_headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class Service:
    base_url: str
    web: Child
    worker: Child
    headers: dict[str, str] = field(default_factory=dict)  # the API key, sent on every API request


def start_service(stack: ExitStack, args: argparse.Namespace, env: dict[str, str], logs: Path,
                  headers: dict[str, str]) -> Service:
    cli = [sys.executable, "-m", "ser_cli"]
    worker = Child("worker", [*cli, "worker", "--concurrency", str(args.concurrency)], env, logs / "worker.log")
    stack.callback(worker.stop)
    port = args.port or free_port()
    web = Child("web", [*cli, "web", "--host", "127.0.0.1", "--port", str(port), "--workers", str(args.web_workers)],
                env, logs / "web.log")
    stack.callback(web.stop)
    return Service(f"http://127.0.0.1:{port}", web, worker, headers)


def wait_ready(svc: Service, concurrency: int, timeout: float) -> None:
    """Until every pool child has logged "models loaded", Celery is consuming and /readyz says 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in (svc.web, svc.worker):
            if not child.alive():
                raise RuntimeError(f"{child.name} exited with {child.proc.returncode}:\n{child.log_text()[-3000:]}")
        text = svc.worker.log_text()
        if text.count("models loaded") >= concurrency and "ready." in text and _readyz(svc.base_url):
            return
        time.sleep(0.5)
    raise RuntimeError(f"service not ready in {timeout:.0f} s; worker log:\n{svc.worker.log_text()[-3000:]}")


def check_auth(svc: Service, auth_enabled: bool) -> None:
    """With authentication on, a request without the key gets 401 and one with it 200 (the shape is real)."""
    url = f"{svc.base_url}/api/v1/jobs?limit=1"
    if auth_enabled:
        expect(requests.get(url, timeout=30), "GET /api/v1/jobs without the API key", 401)
    expect(requests.get(url, headers=svc.headers, timeout=30), "GET /api/v1/jobs with the API key", 200)


def _readyz(base_url: str) -> bool:
    try:
        return requests.get(f"{base_url}/readyz", timeout=5).status_code == 200
    except requests.RequestException:
        return False


# --------------------------------------------------------------------------------------------- process accounting


def _optional(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


psutil: Any = _optional("psutil")  # optional: /proc gives the same numbers on Linux
MEMORY_METHOD = "psutil" if psutil is not None else "/proc"
_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICK = os.sysconf("SC_CLK_TCK")


def _proc_stat(pid: int) -> tuple[int, int, float, str] | None:
    """(parent pid, RSS bytes, user+system CPU seconds, name) from /proc/<pid>/stat; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # the command name may contain spaces
    name = raw[raw.index("(") + 1 : raw.rindex(")")]
    return int(fields[1]), int(fields[21]) * _PAGE, (int(fields[11]) + int(fields[12])) / _TICK, name


def _proc_table() -> dict[int, tuple[int, int, float, str]]:
    return {int(e.name): st for e in os.scandir("/proc") if e.name.isdigit() and (st := _proc_stat(int(e.name)))}


def cpu_by_name(names: dict[str, str]) -> dict[str, float]:
    """CPU seconds so far of every process with a given name (e.g. the local Postgres and Redis servers)."""
    out = dict.fromkeys(names, 0.0)
    if psutil is not None:
        for proc in psutil.process_iter(["name", "cpu_times"]):
            for key, name in names.items():
                if proc.info["name"] == name and proc.info["cpu_times"] is not None:
                    out[key] += proc.info["cpu_times"].user + proc.info["cpu_times"].system
        return out
    for st in _proc_table().values():
        for key, name in names.items():
            if st[3] == name:
                out[key] += st[2]
    return out


def tree_usage(roots: dict[str, int]) -> dict[str, list[tuple[int, int, float]]]:
    """Per named root: (pid, RSS bytes, CPU seconds) of it and all its descendants (root first)."""
    if psutil is not None:
        return {name: _psutil_tree(root) for name, root in roots.items()}
    table = _proc_table()  # one scan of /proc serves every tree
    out: dict[str, list[tuple[int, int, float]]] = {}
    for name, root in roots.items():
        tree, frontier = [root] if root in table else [], [root] if root in table else []
        while frontier:
            parent = frontier.pop()
            kids = [pid for pid, st in table.items() if st[0] == parent]
            tree.extend(kids)
            frontier.extend(kids)
        out[name] = [(pid, table[pid][1], table[pid][2]) for pid in tree]
    return out


def _psutil_tree(root: int) -> list[tuple[int, int, float]]:
    try:
        top = psutil.Process(root)
        procs = [top, *top.children(recursive=True)]
    except psutil.Error:
        return []
    out = []
    for proc in procs:
        try:
            cpu = proc.cpu_times()
            out.append((proc.pid, int(proc.memory_info().rss), float(cpu.user + cpu.system)))
        except psutil.Error:
            continue
    return out


def pss(pid: int) -> int | None:
    """Proportional set size: pages shared with other processes (libraries, the pre-fork parent) split."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Pss:")) * 1024
    except (OSError, StopIteration, ValueError):
        return None


def machine_busy_cpu_s() -> float:
    """CPU seconds all cores spent not idle since boot (every process on the machine, not just ours)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks[:8]) - idle) / _TICK


class TreeSampler:
    """Samples the summed RSS of named process trees in a thread (PSS every ``pss_every`` samples).

    The interval is modest on purpose: the sampler shares the CPU with the service it measures.
    """

    def __init__(self, roots: dict[str, int], interval: float = 0.2, pss_every: int = 10) -> None:
        self.roots, self.interval, self.pss_every = roots, interval, pss_every
        self.peak_rss = dict.fromkeys(roots, 0)
        self.peak_pss: dict[str, int | None] = dict.fromkeys(roots, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds used so far by each tree's live processes, and by each tree's root alone."""
        usage = tree_usage(self.roots)
        out = {name: sum(cpu for _, _, cpu in procs) for name, procs in usage.items()}
        out.update({f"{name}_main": procs[0][2] if procs else 0.0 for name, procs in usage.items()})
        return out

    def _loop(self) -> None:
        n = 0
        while not self._stop.is_set():
            for name, procs in tree_usage(self.roots).items():
                self.peak_rss[name] = max(self.peak_rss[name], sum(rss for _, rss, _ in procs))
                if n % self.pss_every == 0 and self.peak_pss[name] is not None and procs:
                    sizes = [pss(pid) for pid, _, _ in procs]
                    # PSS needs /proc/<pid>/smaps_rollup (Linux 4.14+); without it, report none.
                    self.peak_pss[name] = None if None in sizes else max(
                        sum(s or 0 for s in sizes), self.peak_pss[name] or 0)
            n += 1
            self._stop.wait(self.interval)


# --------------------------------------------------------------------------------------------- HTTP phases


@dataclass
class Upload:
    first: int  # index of the request's first recording in the run
    count: int
    seconds: float = 0.0
    status: int = 0
    job_ids: list[str] = field(default_factory=list)  # in request order; "" for a part rejected at upload
    error: str | None = None


_http = threading.local()


def _session() -> requests.Session:
    # One keep-alive session per thread: requests.Session is not meant to be shared across threads.
    if not hasattr(_http, "session"):
        _http.session = requests.Session()
    return _http.session  # type: ignore[no-any-return]


def post(svc: Service, upload: Upload, body: bytes, content_type: str) -> Upload:
    started = time.perf_counter()
    try:
        resp = _session().post(f"{svc.base_url}/api/v1/jobs", data=body,
                               headers={**svc.headers, "Content-Type": content_type}, timeout=600)
        upload.status = resp.status_code
        if resp.status_code == 202:
            upload.job_ids = [j["id"] if j["status"] == "queued" else "" for j in resp.json()["jobs"]]
        else:
            upload.error = resp.text[:300] or "(empty body)"
    except requests.RequestException as exc:
        upload.error = f"{type(exc).__name__}: {exc}"
    upload.seconds = time.perf_counter() - started
    return upload


@dataclass
class Throughput:
    uploads: list[Upload]
    job_ids: list[uuid.UUID]  # queued jobs, in recording order
    by_recording: list[uuid.UUID | None]  # the job of each recording (None: rejected or its request failed)
    started_wall: float  # time.time() at the first upload byte
    upload_s: float  # first byte → last 202
    wall_s: float | None  # first byte → every job finished (seen by polling); None on timeout
    counts: dict[str, int]


def run_throughput(args: argparse.Namespace, svc: Service, engine: sa.Engine, recs: list[Clip]) -> Throughput:
    uploads = [Upload(i, len(recs[i : i + args.batch_size])) for i in range(0, len(recs), args.batch_size)]
    bodies = [encode(recs[u.first : u.first + u.count]) for u in uploads]
    log(f"throughput: {len(recs)} recordings in {len(uploads)} requests, {args.upload_concurrency} at a time")
    started, started_wall = time.perf_counter(), time.time()
    with ThreadPoolExecutor(args.upload_concurrency, thread_name_prefix="upload") as pool:
        done = list(pool.map(lambda u, b: post(svc, u, *b), uploads, bodies))
    upload_s = time.perf_counter() - started
    failed = [u for u in done if u.error]
    log(f"uploads answered in {upload_s:.2f} s ({len(failed)} failed requests)")
    if failed:  # never a silent zero: a 401 or 429 here means the bench measured nothing
        detail = "; ".join(f"HTTP {u.status or 'none'} (expected 202): {u.error}" for u in failed[:3])
        raise ApiError(f"{len(failed)} of {len(done)} upload requests failed: {detail}", len(failed))
    by_recording: list[uuid.UUID | None] = [None] * len(recs)
    for u in done:
        for pos, job_id in enumerate(u.job_ids):
            by_recording[u.first + pos] = uuid.UUID(job_id) if job_id else None
    job_ids = [j for j in by_recording if j is not None]
    finished = wait_finished(engine, job_ids, started, args.timeout)
    wall_s = None if finished is None else finished - started
    return Throughput(done, job_ids, by_recording, started_wall, upload_s, wall_s, status_counts(engine, job_ids))


def wait_finished(engine: sa.Engine, ids: list[uuid.UUID], started: float, timeout: float,
                  interval: float = 0.025) -> float | None:
    """Poll the database until every job is finished; the perf_counter time it was seen, None on timeout."""
    query = sa.text("SELECT count(*) FROM jobs WHERE id = ANY(:ids) AND status IN ('succeeded', 'failed')")
    next_report = time.perf_counter() + 2
    with engine.connect() as conn:
        while True:
            done = conn.execute(query, {"ids": ids}).scalar_one()
            conn.commit()  # a fresh snapshot for the next poll
            now = time.perf_counter()
            if done >= len(ids):
                log(f"all {len(ids)} jobs finished after {now - started:.2f} s")
                return now
            if now - started > timeout:
                log(f"timed out: {done}/{len(ids)} jobs finished after {timeout:.0f} s")
                return None
            if now >= next_report:
                log(f"  {done}/{len(ids)} finished, {done / (now - started):.1f}/s")
                next_report = now + 2
            time.sleep(interval)


def status_counts(engine: sa.Engine, ids: list[uuid.UUID]) -> dict[str, int]:
    """Jobs per status, plus how many have a stored result row."""
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT j.status, count(*), count(r.job_id) FROM jobs j LEFT JOIN results r ON r.job_id = j.id "
            "WHERE j.id = ANY(:ids) GROUP BY j.status"), {"ids": ids}).all()
    counts = {status: n for status, n, _ in rows}
    counts["with_result"] = sum(r for _, _, r in rows)
    return counts


@dataclass
class Latency:
    total_ms: float
    post_ms: float
    queue_ms: float | None  # created → claimed by a worker
    processing_ms: float | None  # claimed → finished
    status: str


def measure_latency(svc: Service, clips: Sequence[Clip], samples: int, poll_s: float = 0.01,
                    timeout: float = 120) -> list[Latency]:
    """Sequential single uploads on the otherwise idle service: request start → status succeeded."""
    out = []
    session = requests.Session()
    session.headers.update(svc.headers)
    for i in range(samples):
        body, content_type = encode([clips[i % len(clips)]])
        started = time.perf_counter()
        resp = session.post(f"{svc.base_url}/api/v1/jobs", data=body, headers={"Content-Type": content_type},
                            timeout=timeout)
        post_ms = (time.perf_counter() - started) * 1000
        url = expect(resp, "latency upload POST /api/v1/jobs", 202).json()["jobs"][0]["url"]
        while True:
            job = expect(session.get(url, timeout=timeout), f"polling GET {url}", 200).json()
            if job["status"] in FINISHED or time.perf_counter() - started > timeout:
                break
            time.sleep(poll_s)
        total_ms = (time.perf_counter() - started) * 1000
        out.append(Latency(total_ms, post_ms, _ms_between(job["created_at"], job["started_at"]),
                           _ms_between(job["started_at"], job["finished_at"]), job["status"]))
    return out


def check_audio(svc: Service, clip: Clip) -> bool:
    """Upload ``clip`` once more, then fetch its stored audio through the API: the same bytes come back."""
    body, content_type = encode([clip])
    resp = requests.post(f"{svc.base_url}/api/v1/jobs", data=body,
                         headers={**svc.headers, "Content-Type": content_type}, timeout=120)
    url = expect(resp, "audio check POST /api/v1/jobs", 202).json()["jobs"][0]["url"]
    job = expect(requests.get(url, headers=svc.headers, timeout=120), f"GET {url}", 200).json()
    if not job.get("audio_url"):
        raise RuntimeError(f"job {job.get('id')} has no audio_url: {json.dumps(job)[:500]}")
    audio = expect(requests.get(job["audio_url"], headers=svc.headers, timeout=120), f"GET {job['audio_url']}", 200)
    return audio.content == clip.data


def _ms_between(a: str | None, b: str | None) -> float | None:
    if not a or not b:
        return None
    return (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds() * 1000


# --------------------------------------------------------------------------------------------- profile


def profile(engine: sa.Engine, run: Throughput, cpu: dict[str, float]) -> dict[str, Any]:
    """Where a recording's time went: the worker's own stage timings, chunk walls and CPU per tier."""
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT j.created_at, j.started_at, j.finished_at, r.timings_ms FROM jobs j "
            "LEFT JOIN results r ON r.job_id = j.id WHERE j.id = ANY(:ids)"), {"ids": run.job_ids}).all()
    n = max(len(run.job_ids), 1)
    timings = [r.timings_ms for r in rows if r.timings_ms]
    stages = {k: _mean([t.get(k, 0.0) for t in timings]) for k in ("decode", "features", "inference", "total")}
    # One claim stamps a whole chunk with the same started_at; the chunk's wall is its jobs' finished_at minus it.
    chunks: dict[datetime, datetime] = {}
    for r in rows:
        if r.started_at and r.finished_at:
            chunks[r.started_at] = max(chunks.get(r.started_at, r.finished_at), r.finished_at)
    chunk_ms = sum((end - start).total_seconds() * 1000 for start, end in chunks.items())
    queue_ms = [(r.started_at - r.created_at).total_seconds() * 1000 for r in rows if r.started_at]
    finished = [r.finished_at for r in rows if r.finished_at]
    requests_ms = sum(u.seconds for u in run.uploads) * 1000
    return {
        "ms_per_recording": {
            "upload_request": round(requests_ms / n, 3),  # summed request time (concurrent requests overlap)
            "decode": stages["decode"], "features": stages["features"], "inference": stages["inference"],
            "pipeline_total": stages["total"],
            # claim commit + pipeline + persist preparation, per recording (worker processes overlap)
            "worker_chunk": round(chunk_ms / n, 3),
            "worker_chunk_minus_pipeline": round(chunk_ms / n - stages["total"], 3),
        },
        "cpu_ms_per_recording": {k: round(v * 1000 / n, 3) for k, v in cpu.items()},
        # First byte → the last finished_at a worker stamped (no polling delay; its commit follows).
        "last_finished_s": round(max(finished).timestamp() - run.started_wall, 3) if finished else None,
        "chunks": len(chunks),
        "queue_wait_ms_p50": round(statistics.median(queue_ms), 1) if queue_ms else None,
    }


def _mean(values: Sequence[float]) -> float:
    return round(statistics.fmean(values), 3) if values else 0.0


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), ``q`` in [0, 100]."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return round(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo), 1)


# --------------------------------------------------------------------------------------------- identity check


@dataclass(frozen=True)
class Stored:
    job_id: uuid.UUID
    format: str
    emotion: str | None
    probabilities: dict[str, float] | None
    model_probabilities: dict[str, dict[str, float]] | None


def identity_sample(recs: Sequence[Clip], jobs: Sequence[uuid.UUID | None], k: int) -> list[tuple[Clip, uuid.UUID]]:
    """Up to ``k`` distinct recordings spread over the run (different actors), each with its first job."""
    first: dict[str, tuple[Clip, uuid.UUID]] = {}
    for clip, job_id in zip(recs, jobs, strict=True):
        if job_id is not None:
            first.setdefault(clip.name, (clip, job_id))
    distinct = list(first.values())
    step = max(1, len(distinct) // max(k, 1))
    return distinct[::step][:k]


def load_stored(engine: sa.Engine, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Stored]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT j.id, j.format, r.emotion, r.probabilities, r.model_probabilities FROM jobs j "
            "LEFT JOIN results r ON r.job_id = j.id WHERE j.id = ANY(:ids)"), {"ids": list(ids)}).all()
    return {r.id: Stored(r.id, r.format, r.emotion, r.probabilities, r.model_probabilities) for r in rows}


def check_identity(settings: Settings, sample: Sequence[tuple[Clip, uuid.UUID]],
                   stored: dict[uuid.UUID, Stored], tolerance: float) -> dict[str, Any]:
    """Run each sampled recording alone through the same pipeline in this process and compare."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # as the service's workers run it
    from ser_ml import pipeline  # TensorFlow: imported only now, after the timed phases
    from ser_ml.inference import Ensemble

    ensemble = Ensemble.load(settings.models_dir)
    mismatches: list[str] = []
    max_diff = max_model_diff = 0.0
    for clip, job_id in sample:
        saved = stored.get(job_id)
        (alone,) = pipeline.run(ensemble, [pipeline.JobInput(job_id, clip.path, saved.format if saved else "flac")],
                                settings)
        if saved is None or saved.probabilities is None or alone.prediction is None:
            mismatches.append(f"{clip.name}: no result (stored={saved is not None}, alone={alone.error_code})")
            continue
        p = alone.prediction
        max_diff = max(max_diff, _max_abs_diff(saved.probabilities, p.probabilities))
        for model, probs in (saved.model_probabilities or {}).items():
            max_model_diff = max(max_model_diff, _max_abs_diff(probs, p.model_probabilities[model]))
        if saved.emotion != p.emotion:
            mismatches.append(f"{clip.name}: stored {saved.emotion}, alone {p.emotion}")
    return {"identical_to_one_by_one": not mismatches and max_diff <= tolerance,
            "max_prob_diff": float(f"{max_diff:.3g}"), "max_model_prob_diff": float(f"{max_model_diff:.3g}"),
            "identity_samples": len(sample), "tolerance": tolerance, "identity_mismatches": mismatches}


def _max_abs_diff(a: dict[str, float], b: dict[str, float]) -> float:
    if set(a) != set(b):
        return float("inf")
    return max(abs(a[k] - b[k]) for k in a)


# --------------------------------------------------------------------------------------------- versions


def versions(engine: sa.Engine, redis_url: str, models_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    with engine.connect() as conn:
        out["postgres"] = conn.execute(sa.text("SHOW server_version")).scalar_one()
    out["redis_server"] = redis.Redis.from_url(redis_url).info("server").get("redis_version")
    manifest = json.loads((models_dir / "manifest.json").read_text())
    out["models"] = {name: m.get("version") for name, m in manifest.get("models", {}).items()}
    out["feature_version"] = manifest.get("feature_version")
    out["git"] = _git_revision()
    return out


def _git_revision() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


# --------------------------------------------------------------------------------------------- the run


@contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGINT unwind like Ctrl-C, so the cleanup runs either way.

    SIGINT too, explicitly: a shell without job control starts background commands with SIGINT
    ignored, and a benchmark that owns servers must still stop on it.
    """

    def handler(*_: object) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _mb(n: int | None) -> float | None:
    return None if n is None else round(n / (1 << 20), 1)


def bench(args: argparse.Namespace, report: dict[str, Any], stack: ExitStack) -> None:
    """All phases; fills ``report`` as it goes, so an error still leaves what was measured."""
    distinct = load_clips(args.datasets, max(args.recordings, args.latency_samples, args.identity_samples))
    recs = cycle(distinct, args.recordings)
    log(f"{len(distinct)} distinct recordings read from {args.datasets}")
    redis.Redis.from_url(args.redis_url).flushdb()
    work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ser-bench-")))
    db_url = create_database(stack, args.pg_admin_url)
    settings = service_settings(args, db_url, work)
    report["config"]["chunk_size"] = settings.chunk_size
    engine = sa.create_engine(db_url, pool_size=2)
    stack.callback(engine.dispose)
    env = child_env(settings)
    run_migrate(env)
    report["config"]["auth"] = settings.auth_enabled
    headers = auth_headers(create_api_key(env))
    report["versions"] = versions(engine, args.redis_url, settings.models_dir)

    svc = start_service(stack, args, env, work, headers)
    log(f"waiting for the service at {svc.base_url} (models load in each worker process)")
    wait_ready(svc, args.concurrency, args.start_timeout)
    check_auth(svc, settings.auth_enabled)
    log(f"service ready (authentication {'on' if settings.auth_enabled else 'off'})")
    sampler = TreeSampler({"worker": svc.worker.proc.pid, "web": svc.web.proc.pid})
    try:
        with sampler:
            run = timed_phases(args, report, svc, engine, sampler, recs, distinct)
    finally:
        report["worker_peak_rss_mb"] = _mb(sampler.peak_rss["worker"])
        report["worker_peak_pss_mb"] = _mb(sampler.peak_pss["worker"])
        report["web_peak_rss_mb"] = _mb(sampler.peak_rss["web"])
    if args.identity_samples:
        sample = identity_sample(recs, run.by_recording, args.identity_samples)
        stored = load_stored(engine, [j for _, j in sample])
        # The service is no longer needed: stop it so the in-process check has the CPU to itself.
        svc.web.stop()
        svc.worker.stop()
        log(f"identity: {len(sample)} distinct recordings one by one in this process")
        report.update(check_identity(settings, sample, stored, args.tolerance))


SERVER_PROCESSES = {"postgres": "postgres", "redis": "redis-server"}  # counted when they run on this machine


def _cpu_now(sampler: TreeSampler) -> dict[str, float]:
    return {**sampler.cpu_s(), **cpu_by_name(SERVER_PROCESSES), "bench": time.process_time(),
            "machine_all": machine_busy_cpu_s()}


def timed_phases(args: argparse.Namespace, report: dict[str, Any], svc: Service, engine: sa.Engine,
                 sampler: TreeSampler, recs: list[Clip], distinct: list[Clip]) -> Throughput:
    """The throughput run (with CPU accounting per tier), then the single-upload latencies."""
    cpu_before = _cpu_now(sampler)
    run = run_throughput(args, svc, engine, recs)
    cpu = {k: v - cpu_before[k] for k, v in _cpu_now(sampler).items()}
    # Whatever else the machine did (other jobs sharing it): all busy CPU minus what is accounted for.
    cpu["service_total"] = sum(cpu[k] for k in ("worker", "web", *SERVER_PROCESSES))
    cpu["other"] = cpu["machine_all"] - cpu["service_total"] - cpu["bench"]
    cpu["worker_pool"] = cpu["worker"] - cpu.pop("worker_main")  # the prefork children: the tasks themselves
    cpu.pop("web_main")
    report.update(_throughput_fields(args, run))
    report["profile"] = profile(engine, run, cpu)
    report["conditions"]["loadavg_after_throughput"] = [round(x, 2) for x in os.getloadavg()]
    log(f"throughput: {report['per_s']} recordings/s; profile {json.dumps(report['profile'])}")
    if not (report["all_results_stored"] and report["failed"] == 0) and not args.keep_going:
        raise RuntimeError("the throughput phase did not store every result (use --keep-going to go on)")
    if args.latency_samples:
        log(f"latency: {args.latency_samples} single uploads, one at a time")
        report.update(_latency_fields(measure_latency(svc, distinct, args.latency_samples)))
        log(f"latency p50 {report['latency_p50_ms']} ms, p95 {report['latency_p95_ms']} ms")
    report["audio_roundtrip"] = check_audio(svc, distinct[0])
    return run


def _throughput_fields(args: argparse.Namespace, run: Throughput) -> dict[str, Any]:
    failed_requests = [u for u in run.uploads if u.error]
    not_uploaded = sum(u.count for u in failed_requests) + sum(1 for u in run.uploads for j in u.job_ids if not j)
    stored = run.counts.get("with_result", 0)
    return {
        "recordings": args.recordings,
        "wall_s": None if run.wall_s is None else round(run.wall_s, 3),
        "per_s": None if run.wall_s is None else round(args.recordings / run.wall_s, 2),
        "upload_s": round(run.upload_s, 3),
        "all_results_stored": run.wall_s is not None and stored == args.recordings,
        "results_stored": stored,
        "succeeded": run.counts.get("succeeded", 0),
        "failed": run.counts.get("failed", 0) + not_uploaded,
        "http_errors": len(failed_requests),
        "failed_requests": [f"{u.status}: {u.error}"[:200] for u in failed_requests],
    }


def _latency_fields(samples: list[Latency]) -> dict[str, Any]:
    ok = [s for s in samples if s.status == "succeeded"]

    def p50(values: list[float | None]) -> float | None:
        return percentile([v for v in values if v is not None], 50)

    return {
        "latency_p50_ms": percentile([s.total_ms for s in ok], 50),
        "latency_p95_ms": percentile([s.total_ms for s in ok], 95),
        "latency_samples": len(samples), "latency_failed": len(samples) - len(ok),
        "latency_breakdown_p50_ms": {"post": p50([s.post_ms for s in ok]), "queue": p50([s.queue_ms for s in ok]),
                                     "processing": p50([s.processing_ms for s in ok])},
    }


def new_report(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("recordings", "wall_s", "per_s", "all_results_stored", "failed", "http_errors", "latency_p50_ms",
            "latency_p95_ms", "latency_failed", "audio_roundtrip", "worker_peak_rss_mb", "identical_to_one_by_one",
            "max_prob_diff")
    report: dict[str, Any] = dict.fromkeys(keys)
    report.update(recordings=args.recordings, all_results_stored=False, memory_method=MEMORY_METHOD)
    report["config"] = {"concurrency": args.concurrency, "web_workers": args.web_workers,
                        "chunk_size": args.chunk_size, "batch_size": args.batch_size,
                        "upload_concurrency": args.upload_concurrency, "cpu_count": os.cpu_count(),
                        "cpus_usable": len(os.sched_getaffinity(0))}
    report["conditions"] = {"loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    report["error"] = None
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = new_report(args)
    code = 1
    try:
        with signals_as_interrupt(), ExitStack() as stack:
            bench(args, report, stack)
        ok = (report["all_results_stored"] and report["identical_to_one_by_one"] is not False
              and not report["latency_failed"] and report["audio_roundtrip"] is not False)
        code = 0 if ok else 1
    except KeyboardInterrupt:
        report["error"], code = "interrupted", 130
    except Exception as exc:  # the JSON line is printed whatever happened
        traceback.print_exc(file=sys.stderr)
        report["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        if isinstance(exc, ApiError):
            report["http_errors"] = exc.count
            log(f"FAILED: {exc}")
    print(json.dumps(report), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
