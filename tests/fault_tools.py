"""Real servers and processes for the fault-injection tests: a private Redis and Postgres to kill,
a long recording to be caught mid-analysis, pool children to SIGKILL or freeze, and a gunicorn."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from ser_shared.models import Job, Result, WebhookDelivery
from ser_shared.settings import REPO_ROOT, Settings
from tests.conftest import RAVDESS, WorkerProcess, private_database, settings_env, wait_for
from tests.helpers import stop_process

if TYPE_CHECKING:
    from flask import Flask


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fault_settings(base: Settings, **changes: Any) -> Settings:
    """``base`` with quick reconciler sweeps and no upload limits (the load test would trip them)."""
    defaults: dict[str, Any] = {
        "sweep_interval_s": 1.0, "requeue_after_s": 3.0, "stuck_margin_s": 1.0,
        "task_soft_time_limit_s": 20, "task_time_limit_s": 22, "max_attempts": 2,
        "rate_limit_uploads_per_minute": 1_000_000, "rate_limit_files_per_minute": 10_000_000,
        "max_queued_jobs": 1_000_000,
    }
    return base.model_copy(update=defaults | changes)


def fault_env(settings: Settings) -> dict[str, str]:
    """The child-process environment for ``settings``, including what ``settings_env`` leaves out."""
    return settings_env(settings) | {
        "SER_SWEEP_INTERVAL_S": str(settings.sweep_interval_s), "SER_REQUEUE_AFTER_S": str(settings.requeue_after_s),
        "SER_STUCK_MARGIN_S": str(settings.stuck_margin_s), "SER_UNQUEUED_GRACE_S": str(settings.unqueued_grace_s),
        "SER_TASK_SOFT_TIME_LIMIT_S": str(settings.task_soft_time_limit_s),
        "SER_TASK_TIME_LIMIT_S": str(settings.task_time_limit_s), "SER_MAX_ATTEMPTS": str(settings.max_attempts),
        "SER_RATE_LIMIT_UPLOADS_PER_MINUTE": str(settings.rate_limit_uploads_per_minute),
        "SER_RATE_LIMIT_FILES_PER_MINUTE": str(settings.rate_limit_files_per_minute),
        "SER_MAX_QUEUED_JOBS": str(settings.max_queued_jobs),
        "SER_WORKER_HEARTBEAT_S": str(settings.worker_heartbeat_s),
        "SER_WORKER_DEAD_AFTER_S": str(settings.worker_dead_after_s),
        "SER_IDEMPOTENCY_LEASE_S": str(settings.idempotency_lease_s),
    }


@contextlib.contextmanager
def isolated(pg_settings: Settings, tmp: Path, **changes: Any) -> Iterator[Settings]:
    """A database and a Redis of their own for tests that start, kill and freeze workers. The
    session's shared worker consumes the shared broker and reconciles the shared database: it must
    neither pick up these jobs nor take them for lost (they are in a broker it cannot see). Data and
    uploads in ``tmp`` unless ``changes`` say otherwise."""
    broker = RedisServer(tmp)
    try:
        broker.start()
        changes = {"data_dir": tmp / "data", "storage_dir": tmp / "data" / "uploads"} | changes
        with private_database(pg_settings, broker_url=broker.url, **changes) as settings:
            yield settings
    finally:
        broker.kill()


def start_worker(settings: Settings, log: Path) -> WorkerProcess:
    """A worker with ``settings`` (all of them, see ``fault_env``), ready to take tasks."""
    worker = WorkerProcess(settings, log, extra_env=fault_env(settings))
    try:
        worker.wait_ready()
    except BaseException:
        stop_cold(worker)
        raise
    return worker


def stop_cold(worker: WorkerProcess) -> None:
    """Cold shutdown: a warm one waits for the webhook retries the tests leave scheduled."""
    if worker.proc.poll() is None:
        worker.proc.send_signal(signal.SIGQUIT)
    worker.stop()


def web_app(settings: Settings) -> Flask:
    """The web app on ``settings``, in test mode (exceptions reach the test)."""
    from web import create_app

    app = create_app(settings)
    app.config["TESTING"] = True
    return app


def long_recording(path: Path, seconds: float) -> Path:
    """Real speech, RAVDESS clips end to end, about ``seconds`` long (16 kHz mono FLAC)."""
    clips = sorted(RAVDESS.glob("Actor_*/*.flac"))
    needed = int(seconds / 3.7) + 1
    subprocess.run(["sox", *map(str, clips[:needed]), "-r", "16000", "-c", "1", str(path)], check=True)
    return path


def pool_children(pid: int) -> list[int]:
    """Pids of the direct children of ``pid`` (a prefork worker's pool processes)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    return found


def only_child(pid: int, timeout: float = 60) -> int:
    children: list[int] = wait_for(lambda: pool_children(pid), timeout, 0.1)
    assert len(children) == 1, children
    return children[0]


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


class RedisServer:
    """A private, non-persistent redis-server that a test may kill and restart."""

    def __init__(self, workdir: Path) -> None:
        self.port, self.workdir = free_port(), workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        wait_for(lambda: _pings(client), 10, 0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def _pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    bindir = subprocess.run(["pg_config", "--bindir"], check=True, capture_output=True, text=True).stdout.strip()
    return str(Path(bindir) / name)


class PostgresCluster:
    """A throwaway Postgres cluster (trust auth) on a free port, stopped and started by the tests.

    initdb refuses to run as root, so as root the cluster belongs to the ``postgres`` user, in a
    folder of its own under the system temp dir (pytest's temp dirs are private to root).
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="ser-faults-pg-"))
        self.datadir = self.workdir / "pgdata"
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.workdir, "postgres")
        self._run(_pg_bin("initdb"), "-D", str(self.datadir), "-U", "postgres", "--auth=trust", "-E", "UTF8")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if self.as_root else []
        subprocess.run([*prefix, *argv], check=True, capture_output=True, cwd=self.workdir)

    def start(self) -> None:
        self._run(_pg_bin("pg_ctl"), "-D", str(self.datadir), "-l", str(self.workdir / "pg.log"), "-w",
                  "-o", f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1", "start")

    def stop(self) -> None:
        self._run(_pg_bin("pg_ctl"), "-D", str(self.datadir), "-m", "fast", "-w", "stop")

    def running(self) -> bool:
        return (self.datadir / "postmaster.pid").exists()

    def remove(self) -> None:
        if self.running():
            self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


class Gunicorn:
    """The web tier as production runs it (`ser web`'s gunicorn), on a free port."""

    def __init__(self, settings: Settings, log_path: Path, workers: int = 2, port: int | None = None) -> None:
        self.port = port or free_port()  # a restart after a kill -9 may take the same port again
        self.log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "web.wsgi:app", "--bind", f"127.0.0.1:{self.port}",
             "--workers", str(workers), "--threads", "4", "--timeout", "120"],
            env=fault_env(settings), cwd=REPO_ROOT, stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> None:
        import requests

        def up() -> bool:
            try:
                return requests.get(f"{self.base}/healthz", timeout=5).status_code == 200
            except requests.RequestException:  # refused or slow while the workers boot
                return False

        wait_for(up, 60, 0.2)

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()


def job(factory: sessionmaker[Session], job_id: str | uuid.UUID) -> Job:
    with factory() as session:
        found = session.get(Job, uuid.UUID(str(job_id)))
        assert found is not None
        return found


def result_rows(factory: sessionmaker[Session], job_id: str | uuid.UUID) -> int:
    with factory() as session:
        return int(session.scalar(select(func.count()).select_from(Result)
                                  .where(Result.job_id == uuid.UUID(str(job_id)))) or 0)


def events(factory: sessionmaker[Session], job_id: str | uuid.UUID) -> list[str]:
    with factory() as session:
        return sorted(session.scalars(select(WebhookDelivery.event)
                                      .where(WebhookDelivery.job_id == uuid.UUID(str(job_id)))))


def wait_status(factory: sessionmaker[Session], job_id: str, statuses: tuple[str, ...], timeout: float = 90,
                interval: float = 0.1) -> Job:
    return wait_for(lambda: (j if (j := job(factory, job_id)).status in statuses else None), timeout, interval)  # type: ignore[no-any-return]
