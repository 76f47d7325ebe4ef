"""The GPU worker, proven through the service: a ``gpu``-queue worker analyses a real batch, then a CPU worker.

    python -m bench.gpu [--recordings 320] [--stack embedded|services] [--chunk-size 32]
                        [--cpu-concurrency 1] [--require-gpu] [--out PATH]

Starts the service as an operator would: ``ser migrate``, an API key from ``ser keys create``
(authentication on: every request carries it, and one without it must get 401), the gunicorn web
tier, and two workers side by side:

- the GPU worker, ``ser worker --queues gpu --pool solo --concurrency 1`` (as compose and
  deploy/k8s run it), which consumes ONLY the ``gpu`` queue;
- the CPU worker, ``ser worker --queues cpu --concurrency N``, with CUDA hidden from it
  (``CUDA_VISIBLE_DEVICES=-1``), as a CPU image would be.

The embedded stack (the default) is SQLite and the filesystem broker under one temporary data
folder: no server to install. ``--stack services`` uses a fresh Postgres database and a FLUSHED
Redis database instead (``--pg-admin-url``, ``--redis-url``).

Then two phases, one after the other, on the same RAVDESS recordings: upload them with
``device=gpu`` and wait until every job has finished, then again with ``device=cpu``. Each phase
checks that every job succeeded and that the worker of that queue analysed all of them and the
other none (each worker's own "analysed jobs=" log lines), and measures recordings/s from the
first upload byte to the last result stored (and the workers' own span, first job started → last
finished), the worker's CPU seconds per recording, and the mean stage timings of the results.

Where the models ran is the GPU worker's own report: its "models loaded" log line names the device
TensorFlow placed the encoder's and the LSTM's outputs on (``ser_ml.inference.Ensemble.find_placement``).
Where ``nvidia-smi`` exists it is sampled during the GPU phase (the worker's pid among the compute
processes, utilisation, memory) as the driver's view. The two phases' predictions are compared.

On a machine without a usable GPU the ``gpu`` worker still serves its queue, on the CPU (it logs a
warning); the bench says "no GPU visible: the gpu queue worker ran on CPU" and exits 0 (1 with
``--require-gpu``), so the queue path itself is exercised anywhere. Prints a summary and ONE JSON
line on stdout (progress on stderr), and writes the JSON to ``--out`` (default ``$OUT/gpu.json``
when ``OUT`` is set). Exit 1 when a job failed, a phase timed out, a job went to the wrong worker,
or (with ``--require-gpu``) the models did not run on a GPU. Everything started is stopped, and a
services database dropped, on success, error or Ctrl-C.

On a bare GPU machine: ``bench/gpu_proof.sh`` installs the ``gpu`` extras and runs this.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import redis
import requests
import sqlalchemy as sa

from bench.e2e import (
    Child,
    Clip,
    Service,
    _readyz,
    add_stack_args,
    auth_headers,
    check_auth,
    child_env,
    create_api_key,
    create_database,
    cycle,
    expect,
    free_port,
    load_clips,
    log,
    run_migrate,
    signals_as_interrupt,
    tree_usage,
)
from ser_shared.clock import as_utc
from ser_shared.db import make_engine
from ser_shared.models import Job, Result
from ser_shared.settings import REPO_ROOT, Settings

PLACEMENT = re.compile(r"models loaded .*encoder_device=(\S+) lstm_device=(\S+)")
ANALYSED = re.compile(r"analysed jobs=(\d+)")
NO_GPU = "no GPU visible: the gpu queue worker ran on CPU"
TF_GPU_LINE = re.compile(r"(?i)cuda|cudnn|gpu_device|Created device|dlopen|GPU:0|consumed without a GPU")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--recordings", type=int, default=320, help="recordings per phase (distinct RAVDESS files)")
    p.add_argument("--stack", choices=["embedded", "services"], default="embedded",
                   help="embedded: SQLite + filesystem broker; services: Postgres + Redis")
    p.add_argument("--chunk-size", type=int, default=32, help="SER_CHUNK_SIZE: jobs per task message")
    p.add_argument("--batch-size", type=int, default=80, help="files per upload request")
    p.add_argument("--cpu-concurrency", type=int, default=1,
                   help="CPU worker processes (1: the GPU worker against one CPU worker process)")
    p.add_argument("--require-gpu", action="store_true", help="exit 1 unless both models ran on a GPU")
    p.add_argument("--out", type=Path, default=None, help="write the JSON here (default: $OUT/gpu.json if OUT is set)")
    add_stack_args(p, when="--stack services: ")
    p.add_argument("--start-timeout", type=float, default=300, help="seconds for the service to become ready")
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for one phase's results")
    p.add_argument("--keep", type=Path, default=None, help="keep the data folder and logs here")
    args = p.parse_args(argv)
    for name in ("recordings", "chunk_size", "batch_size", "cpu_concurrency"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if not args.datasets.is_absolute():
        args.datasets = REPO_ROOT / args.datasets
    if args.out is None and os.environ.get("OUT"):
        args.out = Path(os.environ["OUT"]) / "gpu.json"
    return args


# --------------------------------------------------------------------------------------------- the machine


def nvidia_smi(*query: str) -> list[list[str]] | None:
    """Rows of ``nvidia-smi --query-...=... --format=csv,noheader,nounits``; None without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", *query, "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return [[cell.strip() for cell in line.split(",")] for line in out.stdout.splitlines() if line.strip()]


def machine_gpus() -> list[str]:
    """The GPUs the driver lists (name, memory MiB, driver): what the machine has, not what TensorFlow uses."""
    rows = nvidia_smi("--query-gpu=name,memory.total,driver_version")
    return [f"{r[0]} ({r[1]} MiB, driver {r[2]})" for r in rows or [] if len(r) >= 3]


class SmiSampler:
    """``nvidia-smi`` every half second in a thread: the compute processes' pids and their memory,
    the GPU's utilisation and memory in use. Does nothing where there is no nvidia-smi."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.available = shutil.which("nvidia-smi") is not None
        self.pids: dict[int, int] = {}  # pid → most MiB seen
        self.max_util_pct = 0
        self.max_used_mib = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="nvidia-smi", daemon=True)

    def __enter__(self) -> SmiSampler:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            for row in nvidia_smi("--query-gpu=utilization.gpu,memory.used") or []:
                if len(row) >= 2 and row[0].isdigit() and row[1].isdigit():
                    self.max_util_pct, self.max_used_mib = max(self.max_util_pct, int(row[0])), max(
                        self.max_used_mib, int(row[1]))
            for row in nvidia_smi("--query-compute-apps=pid,used_memory") or []:
                if len(row) >= 2 and row[0].isdigit():
                    mib = int(row[1]) if row[1].isdigit() else 0
                    self.pids[int(row[0])] = max(self.pids.get(int(row[0]), 0), mib)
            self.samples += 1
            self._stop.wait(self.interval)

    def report(self, worker_pid: int) -> dict[str, Any] | None:
        if not self.available:
            return None
        return {"samples": self.samples, "max_utilization_pct": self.max_util_pct,
                "max_memory_used_mib": self.max_used_mib, "compute_pids": sorted(self.pids),
                "worker_pid_seen": worker_pid in self.pids, "worker_mib": self.pids.get(worker_pid)}


# --------------------------------------------------------------------------------------------- the service


def service_settings(args: argparse.Namespace, stack: ExitStack, work: Path) -> Settings:
    """Settings of the service under test: authentication on, the embedded stores or Postgres + Redis."""
    common: dict[str, Any] = {"data_dir": work / "data", "secret_key": secrets.token_hex(16), "auth": True,
                              "chunk_size": args.chunk_size, "log_level": "INFO", "log_format": "text"}
    if args.stack == "embedded":
        return Settings(env="development", **common)
    db_url = create_database(stack, args.pg_admin_url)
    redis.Redis.from_url(args.redis_url).flushdb()
    log(f"flushed {args.redis_url}")
    return Settings(env="production", database_url=db_url, broker_url=args.redis_url, **common)


@dataclass
class Worker:
    name: str
    queue: str
    processes: int
    child: Child
    log_mark: int = 0  # where this phase's part of the log starts

    def analysed(self, since: int = 0) -> int:
        """Jobs this worker reports analysed (its own log lines), from ``since`` on in its log."""
        return sum(int(n) for n in ANALYSED.findall(self.child.log_text()[since:]))

    def placement(self) -> dict[str, str] | None:
        """The devices its process(es) report in "models loaded" (the first process's line)."""
        match = PLACEMENT.search(self.child.log_text())
        return {"encoder": match.group(1), "lstm": match.group(2)} if match else None

    def ready(self) -> bool:
        text = self.child.log_text()
        return "ready." in text and text.count("models loaded") >= self.processes


def start_workers(settings: Settings, args: argparse.Namespace, work: Path) -> list[Worker]:
    cli = [sys.executable, "-m", "ser_cli", "worker"]
    gpu_env = child_env(settings)
    gpu_env["TF_CPP_MIN_LOG_LEVEL"] = "1"  # keep TensorFlow's warnings: a GPU it cannot use says why there
    cpu_env = {**child_env(settings), "CUDA_VISIBLE_DEVICES": "-1"}
    specs = [("gpu-worker", "gpu", 1, [*cli, "--queues", "gpu", "--pool", "solo", "--concurrency", "1"], gpu_env),
             ("cpu-worker", "cpu", args.cpu_concurrency,
              [*cli, "--queues", "cpu", "--concurrency", str(args.cpu_concurrency)], cpu_env)]
    return [Worker(name, queue, processes, Child(name, argv, env, work / f"{name}.log"))
            for name, queue, processes, argv, env in specs]


def stop_all(children: list[Child]) -> None:
    """Kill the children's process groups. Nothing they wrote is kept (a temporary folder, a dropped
    database), and a worker's warm shutdown with TensorFlow's teardown takes 7-15 s each here."""
    for child in children:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(child.proc.pid, signal.SIGKILL)
    for child in children:
        child.stop()  # reaps it and closes its log


def wait_ready(web: Child, base_url: str, workers: list[Worker], timeout: float) -> None:
    """Until both workers have loaded their models and consume, and /readyz answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in (web, *(w.child for w in workers)):
            if not child.alive():
                raise RuntimeError(f"{child.name} exited with {child.proc.returncode}:\n{child.log_text()[-3000:]}")
        if all(w.ready() for w in workers) and _readyz(base_url):
            return
        time.sleep(0.5)
    raise RuntimeError(f"service not ready in {timeout:.0f} s; " + "; ".join(
        f"{w.name} log:\n{w.child.log_text()[-2000:]}" for w in workers))


# --------------------------------------------------------------------------------------------- a phase


@dataclass
class Phase:
    device: str
    worker: Worker
    batch_ids: list[uuid.UUID] = field(default_factory=list)
    job_ids: list[uuid.UUID] = field(default_factory=list)
    started: datetime | None = None
    upload_s: float = 0.0


def upload(base_url: str, headers: dict[str, str], clips: Sequence[Clip], device: str) -> dict[str, Any]:
    """One multipart upload of ``clips`` with ``device``; raises ApiError unless 202 with every file accepted."""
    files = [("file", (c.name, c.data, "audio/flac")) for c in clips]
    resp = expect(requests.post(f"{base_url}/api/v1/jobs", files=files, data={"device": device},
                                headers=headers, timeout=300), f"upload of {len(clips)} with device={device}", 202)
    body: dict[str, Any] = resp.json()
    refused = [j for j in body["jobs"] if j.get("error")]
    if refused:
        raise RuntimeError(f"upload refused {len(refused)} files: {refused[0]}")
    return body


def submit(phase: Phase, base_url: str, headers: dict[str, str], recs: list[Clip], batch_size: int) -> None:
    """Upload every recording, two requests in flight, timed from the first byte."""
    groups = [recs[i : i + batch_size] for i in range(0, len(recs), batch_size)]
    phase.started = datetime.now(UTC)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        bodies = list(pool.map(lambda g: upload(base_url, headers, g, phase.device), groups))
    phase.upload_s = time.perf_counter() - t0
    for body in bodies:
        phase.batch_ids.append(uuid.UUID(body["batch_id"]))
        phase.job_ids.extend(uuid.UUID(j["id"]) for j in body["jobs"])


def status_counts(engine: sa.Engine, phase: Phase) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(Job.status, sa.func.count()).where(Job.batch_id.in_(phase.batch_ids))
                            .group_by(Job.status)).all()
    return {status: int(n) for status, n in rows}


def wait_done(engine: sa.Engine, phase: Phase, workers: list[Worker], timeout: float) -> dict[str, int]:
    """Until every job of the phase has succeeded or failed; RuntimeError on timeout or a dead worker."""
    deadline = time.monotonic() + timeout
    while True:
        counts = status_counts(engine, phase)
        if counts.get("succeeded", 0) + counts.get("failed", 0) >= len(phase.job_ids):
            return counts
        dead = [w.name for w in workers if not w.child.alive()]
        if dead or time.monotonic() > deadline:
            why = f"{dead} exited" if dead else f"not finished in {timeout:.0f} s"
            raise RuntimeError(f"{phase.device} phase: {why}: {counts} of {len(phase.job_ids)} jobs "
                               f"(a job sent to a queue nobody consumes stays queued)")
        time.sleep(0.2)


def span(engine: sa.Engine, phase: Phase) -> tuple[float, float]:
    """(first upload byte → last result, first job started → last finished), seconds."""
    with engine.connect() as conn:
        first, last = conn.execute(sa.select(sa.func.min(Job.started_at), sa.func.max(Job.finished_at))
                                   .where(Job.batch_id.in_(phase.batch_ids))).one()
    if phase.started is None or first is None or last is None:
        raise RuntimeError(f"{phase.device} phase: no job started or finished")
    end = as_utc(last)
    return (end - phase.started).total_seconds(), (end - as_utc(first)).total_seconds()


def predictions(engine: sa.Engine, phase: Phase) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Each file's ensemble probabilities, and the mean of each stage timing over the phase's results."""
    with engine.connect() as conn:
        rows = conn.execute(sa.select(Job.filename, Result.probabilities, Result.timings_ms)
                            .join(Result, Result.job_id == Job.id).where(Job.batch_id.in_(phase.batch_ids))).all()
    probs = {name: dict(p) for name, p, _ in rows}
    sums: dict[str, float] = {}
    for _, _, timings in rows:
        for key, ms in (timings or {}).items():
            if isinstance(ms, int | float):
                sums[key] = sums.get(key, 0.0) + float(ms)
    return probs, {k: round(v / max(len(rows), 1), 2) for k, v in sorted(sums.items())}


def api_counts(base_url: str, headers: dict[str, str], phase: Phase) -> dict[str, int]:
    """The batches' job counts as the API reports them to the key's holder."""
    total: dict[str, int] = {}
    for batch_id in phase.batch_ids:
        body = expect(requests.get(f"{base_url}/api/v1/batches/{batch_id}", headers=headers, timeout=60),
                      f"GET batch {batch_id}", 200).json()
        for status, n in body["counts"].items():
            total[status] = total.get(status, 0) + int(n)
    return total


def worker_cpu_s(worker: Worker) -> float:
    return sum(cpu for _, _, cpu in tree_usage({"w": worker.child.proc.pid})["w"])


def run_phase(engine: sa.Engine, base_url: str, headers: dict[str, str], phase: Phase, workers: list[Worker],
              recs: list[Clip], args: argparse.Namespace) -> dict[str, Any]:
    """Upload the recordings with the phase's device, wait for every result, check who analysed them."""
    marks = {w.name: len(w.child.log_text()) for w in workers}
    cpu_before = worker_cpu_s(phase.worker)
    with SmiSampler() as smi:
        submit(phase, base_url, headers, recs, args.batch_size)
        counts = wait_done(engine, phase, workers, args.timeout)
    cpu_s = worker_cpu_s(phase.worker) - cpu_before
    time.sleep(0.5)  # the task logs "analysed" right after its commit
    analysed = {w.name: w.analysed(marks[w.name]) for w in workers}
    wall_s, worker_s = span(engine, phase)
    n = len(phase.job_ids)
    out: dict[str, Any] = {
        "device": phase.device, "queue": phase.worker.queue, "worker": phase.worker.name,
        "worker_processes": phase.worker.processes, "recordings": n, "counts": counts,
        "api_counts": api_counts(base_url, headers, phase), "analysed_by": analysed,
        "routed_only_to_its_worker": analysed[phase.worker.name] == n and sum(analysed.values()) == n,
        "upload_s": round(phase.upload_s, 3), "wall_s": round(wall_s, 3), "worker_span_s": round(worker_s, 3),
        "per_s": round(n / wall_s, 2), "worker_per_s": round(n / worker_s, 2) if worker_s > 0 else None,
        "worker_cpu_ms_per_recording": round(1000 * cpu_s / n, 1),
        "nvidia_smi": smi.report(phase.worker.child.proc.pid),
    }
    out["probabilities"], out["mean_timings_ms"] = predictions(engine, phase)
    log(f"{phase.device} phase: {n} recordings in {wall_s:.2f} s ({out['per_s']}/s), counts {counts}, "
        f"analysed by {analysed}")
    return out


# --------------------------------------------------------------------------------------------- the verdict


def agreement(gpu: dict[str, dict[str, float]], cpu: dict[str, dict[str, float]]) -> dict[str, Any]:
    """How far the GPU phase's probabilities are from the CPU phase's, file by file."""
    common = sorted(set(gpu) & set(cpu))
    diffs = [max(abs(gpu[f][k] - cpu[f].get(k, 0.0)) for k in gpu[f]) for f in common]
    top = sum(max(gpu[f], key=gpu[f].__getitem__) != max(cpu[f], key=cpu[f].__getitem__) for f in common)
    return {"files": len(common), "max_abs_prob_diff": round(max(diffs), 6) if diffs else None,
            "top_emotion_differs": top}


def verdict(report: dict[str, Any]) -> str:
    placement = report["gpu_worker_placement"] or {}
    where = f"encoder on {placement.get('encoder')}, LSTM on {placement.get('lstm')}"
    if report["gpu_used"]:
        return f"GPU used: the gpu queue worker ran the {where}"
    if report["machine_gpus"]:
        return (f"GPU present ({report['machine_gpus'][0]}) but not used by TensorFlow: the gpu queue worker ran "
                f"on CPU ({where}); see its log for the CUDA libraries it could not load")
    return f"{NO_GPU} ({where})"


def summary(report: dict[str, Any]) -> str:
    gpu, cpu = report["phases"].get("gpu"), report["phases"].get("cpu")
    lines = [report["verdict"]]
    for p in (gpu, cpu):
        if p:
            lines.append(f"{p['worker']} (queue {p['queue']}, {p['worker_processes']} process(es)): "
                         f"{p['per_s']} recordings/s ({p['recordings']} in {p['wall_s']} s; worker span "
                         f"{p['worker_span_s']} s; {p['worker_cpu_ms_per_recording']} ms worker CPU each)"
                         + ("" if p["routed_only_to_its_worker"] else f" WRONG WORKER: analysed by {p['analysed_by']}"))
    if report["ratio_gpu_to_cpu"] is not None:
        lines.append(f"ratio gpu/cpu: {report['ratio_gpu_to_cpu']}x")
    return "\n".join(lines)


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in ("tensorflow", "tensorflow-cpu", "keras", "celery", "kombu", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def bench(args: argparse.Namespace, report: dict[str, Any], stack: ExitStack, work: Path) -> None:
    recs = cycle(load_clips(args.datasets, args.recordings), args.recordings)
    settings = service_settings(args, stack, work)
    env = child_env(settings)
    run_migrate(env)
    port = free_port()
    web = Child("web", [sys.executable, "-m", "ser_cli", "web", "--host", "127.0.0.1", "--port", str(port),
                        "--workers", "2"], env, work / "web.log")
    children = [web]
    stack.callback(stop_all, children)  # the workers too: they join the list below
    workers = start_workers(settings, args, work)
    children.extend(w.child for w in workers)
    headers = auth_headers(create_api_key(env))  # while the workers load their models
    base_url = f"http://127.0.0.1:{port}"
    wait_ready(web, base_url, workers, args.start_timeout)
    check_auth(Service(base_url, web, workers[0].child, headers), True)  # 401 without the key, 200 with it
    report["gpu_worker_placement"] = workers[0].placement()
    report["cpu_worker_placement"] = workers[1].placement()
    placement = report["gpu_worker_placement"] or {}
    report["gpu_used"] = bool(placement) and all(d.startswith("GPU") for d in placement.values())
    log(f"ready: gpu worker placement {report['gpu_worker_placement']}, cpu worker {report['cpu_worker_placement']}")
    engine = make_engine(settings)
    stack.callback(engine.dispose)
    for worker, device in ((workers[0], "gpu"), (workers[1], "cpu")):
        report["phases"][device] = run_phase(engine, base_url, headers, Phase(device, worker), workers, recs, args)
    gpu, cpu = report["phases"]["gpu"], report["phases"]["cpu"]
    report["agreement"] = agreement(gpu.pop("probabilities"), cpu.pop("probabilities"))
    report["ratio_gpu_to_cpu"] = round(gpu["per_s"] / cpu["per_s"], 2)


def gpu_worker_lines(report: dict[str, Any], log_path: Path) -> None:
    """The GPU worker's own lines about the GPU and CUDA (TensorFlow's too): which GPU it used, or why
    none; read from its log whatever happened, since a failed start is when they matter most."""
    text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    report["gpu_worker_warned_no_gpu"] = "consumed without a GPU" in text
    report["gpu_worker_tf_lines"] = [line[-300:] for line in text.splitlines() if TF_GPU_LINE.search(line)][:20]


def new_report(args: argparse.Namespace) -> dict[str, Any]:
    return {"benchmark": "gpu", "stack": args.stack, "recordings": args.recordings, "chunk_size": args.chunk_size,
            "cpu_concurrency": args.cpu_concurrency, "cpu_count": os.cpu_count(), "machine_gpus": machine_gpus(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            "versions": versions(), "gpu_used": False, "gpu_worker_placement": None, "cpu_worker_placement": None,
            "phases": {}, "ratio_gpu_to_cpu": None, "agreement": None, "verdict": None, "ok": False, "error": None}


def passed(report: dict[str, Any]) -> bool:
    phases = report["phases"].values()
    return len(report["phases"]) == 2 and all(
        p["counts"].get("succeeded") == p["recordings"] and p["api_counts"].get("succeeded") == p["recordings"]
        and p["routed_only_to_its_worker"] for p in phases) and report["cpu_worker_placement"] is not None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = new_report(args)
    code = 1
    work = Path(tempfile.mkdtemp(prefix="ser-gpu-")) if args.keep is None else args.keep
    work.mkdir(parents=True, exist_ok=True)
    try:
        with signals_as_interrupt(), ExitStack() as stack:
            bench(args, report, stack, work)
        report["ok"] = passed(report)
        code = 0 if report["ok"] and (report["gpu_used"] or not args.require_gpu) else 1
    except KeyboardInterrupt:
        report["error"], code = "interrupted", 130
    except Exception as exc:  # the JSON is written whatever happened
        traceback.print_exc(file=sys.stderr)
        report["error"] = f"{type(exc).__name__}: {exc}"[:3000]
    finally:
        gpu_worker_lines(report, work / "gpu-worker.log")
        if args.out is not None:  # the logs beside the JSON: the worker's own words are the evidence
            args.out.parent.mkdir(parents=True, exist_ok=True)
            for name in ("gpu-worker", "cpu-worker", "web"):
                if (work / f"{name}.log").is_file():
                    shutil.copyfile(work / f"{name}.log", args.out.parent / f"{name}.log")
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    report["verdict"] = verdict(report)
    report["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]  # others' work on the machine skews rates
    print(summary(report), flush=True)
    if report["error"]:
        print(f"FAILED: {report['error'][:500]}", flush=True)
    elif not report["ok"]:
        print("FAILED: a job did not succeed or went to the wrong worker (see phases in the JSON)", flush=True)
    elif args.require_gpu and not report["gpu_used"]:
        print("FAILED: --require-gpu, and the models did not run on a GPU", flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
