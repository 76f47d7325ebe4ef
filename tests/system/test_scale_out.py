"""Scale-out: three workers as if on three hosts share one batch, and one killed -9 mid-batch
loses nothing.

Each worker has its own data folder; web and workers share only Postgres, a Redis and the S3
store (moto's server mode, a real S3 HTTP server). Heartbeats every 0.5 s and a node dead after
3 s make the requeue quick; the hard time limit is long (600 s), so the killed worker's jobs can
only come back through its stopped heartbeat. Nothing measures time: the test waits for states.
"""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from ser_shared.db import make_engine, make_session_factory
from ser_shared.models import Job, Result
from ser_shared.settings import Settings
from tests.conftest import RAVDESS, S3_ENV, WorkerProcess, wait_for
from tests.fault_tools import fault_env, fault_settings, isolated, kill, only_child
from tests.helpers import multipart

pytestmark = pytest.mark.slow

RECORDINGS = 60
WORKERS = 3


@pytest.fixture(scope="module")
def settings(pg_settings: Settings, s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    import boto3

    tmp = tmp_path_factory.mktemp("scale")
    bucket = f"ser-scale-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    with isolated(pg_settings, tmp, storage_dir=None, data_dir=tmp / "web",
                  storage_url=f"s3://{bucket}/audio", s3_endpoint_url=s3_endpoint) as base:
        # Chunks of 2: 30 messages, so that every worker gets some (one prefetched at a time each).
        yield fault_settings(base, chunk_size=2, worker_heartbeat_s=0.5, worker_dead_after_s=3.0,
                             task_soft_time_limit_s=590, task_time_limit_s=600, stuck_margin_s=60.0)


@pytest.fixture(scope="module")
def factory(settings: Settings) -> sessionmaker[Session]:
    return make_session_factory(make_engine(settings))


@pytest.fixture(scope="module")
def workers(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[WorkerProcess]]:
    """Three "hosts": each worker its own data folder. Started together, so they load in parallel."""
    started: list[WorkerProcess] = []
    try:
        for i in range(WORKERS):
            own = settings.model_copy(update={"data_dir": tmp_path_factory.mktemp(f"host{i}") / "data"})
            started.append(WorkerProcess(own, tmp_path_factory.mktemp("logs") / f"worker{i}.log",
                                         extra_env=fault_env(own) | S3_ENV))
        for worker in started:
            worker.wait_ready(timeout=240)
        yield started
    finally:
        for worker in started:
            worker.stop()


def _holding(factory: sessionmaker[Session], pid: int) -> list[tuple[uuid.UUID, str]]:
    with factory() as session:
        rows = session.execute(select(Job.id, Job.worker).where(Job.worker.like(f"%:{pid}:%"))).all()
    return [(r[0], str(r[1])) for r in rows]


def _freeze_while_holding(factory: sessionmaker[Session], victim: WorkerProcess, child: int) -> list[uuid.UUID]:
    """Wait until the victim holds jobs, then SIGSTOP its pool child: frozen, it cannot finish them
    between the look and the kill. If it finished its chunk just before the stop, let it go on and
    look again."""
    while True:
        wait_for(lambda: _holding(factory, victim.proc.pid), 120, 0.01)
        kill(child, signal.SIGSTOP)
        held = [job_id for job_id, _ in _holding(factory, victim.proc.pid)]
        if held:
            return held
        kill(child, signal.SIGCONT)


def test_three_workers_share_a_batch_and_one_killed_loses_nothing(
        settings: Settings, factory: sessionmaker[Session], workers: list[WorkerProcess]) -> None:
    from web import create_app

    app = create_app(settings)
    app.config["TESTING"] = True
    paths = sorted(RAVDESS.glob("Actor_*/*.flac"))[:RECORDINGS]
    assert len(paths) == RECORDINGS
    resp = app.test_client().post("/api/v1/jobs", data=multipart([(p.name, p.read_bytes()) for p in paths]),
                                  content_type="multipart/form-data")
    assert resp.status_code == 202, resp.get_data(as_text=True)
    ids = [uuid.UUID(j["id"]) for j in resp.get_json()["jobs"]]

    victim, survivors = workers[-1], workers[:-1]
    child = only_child(victim.proc.pid)
    held = _freeze_while_holding(factory, victim, child)
    node = _holding(factory, victim.proc.pid)[0][1]
    kill(victim.proc.pid)  # the whole "host": main process (heartbeat, reconciler) and pool child
    kill(child)
    victim.proc.wait()

    def finished() -> list[Job] | None:
        with factory() as session:
            jobs = list(session.scalars(select(Job).where(Job.id.in_(ids))))
        return jobs if all(j.status in ("succeeded", "failed") for j in jobs) else None

    jobs: list[Job] = wait_for(finished, 300, 0.2)
    with factory() as session:
        results: list[Any] = list(session.scalars(select(Result.job_id).where(Result.job_id.in_(ids))))
    assert sorted(j.status for j in jobs) == ["succeeded"] * RECORDINGS
    assert sorted(results) == sorted(ids)  # one Result row per job
    assert all(j.attempts <= 2 and j.worker is None for j in jobs)
    assert {j.id: j.attempts for j in jobs if j.id in held} == dict.fromkeys(held, 2)  # finished elsewhere
    # Every worker took jobs: the victim held some, and each survivor analysed some (its own log).
    logs = [Path(w.log_path).read_text(errors="replace") for w in survivors]
    assert all("analysed jobs=" in text for text in logs)
    assert any("requeued jobs of dead workers" in text and node in text for text in logs)
