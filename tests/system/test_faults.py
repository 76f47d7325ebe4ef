"""Fault injection on real processes: SIGKILLed and frozen workers, a Redis restart, a Postgres
outage, time limits, and a load run against gunicorn. Nothing is mocked: the faults are signals to
real worker processes and real servers stopped and started under the service."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy.orm import Session, sessionmaker

from ser_ml.inference import Prediction
from ser_ml.pipeline import Outcome
from ser_shared.contracts import ANALYZE
from ser_shared.db import make_engine, make_session_factory
from ser_shared.enqueue import make_celery
from ser_shared.migrate import upgrade
from ser_shared.settings import Settings
from ser_shared.storage import path_for
from tests import fault_tools
from tests.conftest import WorkerProcess, ravdess_file, wait_for
from tests.fault_tools import (
    Gunicorn,
    PostgresCluster,
    RedisServer,
    events,
    fault_settings,
    job,
    kill,
    long_recording,
    only_child,
    result_rows,
    start_worker,
    stop_cold,
    wait_status,
    web_app,
)
from tests.helpers import multipart, read
from worker import results

pytestmark = pytest.mark.slow

# Long enough to be caught mid-analysis (seconds of work), short enough to finish well inside the
# 20 s soft limit of these tests on a busy machine.
LONG_S = 300.0
# Nothing listens there: deliveries fail and stay in the outbox, which is what is counted.
WEBHOOK = "http://127.0.0.1:9/hook"


@pytest.fixture(scope="module")
def long_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, bytes]:
    path = long_recording(tmp_path_factory.mktemp("audio") / "long.flac", LONG_S)
    return path.name, path.read_bytes()


@pytest.fixture(scope="module")
def isolated(pg_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A database and a Redis of these tests' own (see ``fault_tools.isolated``)."""
    tmp = tmp_path_factory.mktemp("isolated")
    with fault_tools.isolated(pg_settings, tmp) as settings:
        yield settings


def _upload(client: FlaskClient, files: list[tuple[str, bytes]], **fields: str) -> list[str]:
    resp = client.post("/api/v1/jobs", data=multipart(files, **fields), content_type="multipart/form-data")
    assert resp.status_code == 202, resp.get_data(as_text=True)
    return [j["id"] for j in resp.get_json()["jobs"]]


def _short(i: int) -> tuple[str, bytes]:
    return read(ravdess_file(1 + i % 4, ("01", "03", "04", "05", "06")[i % 5]))


def _factory(settings: Settings) -> sessionmaker[Session]:
    return make_session_factory(make_engine(settings))


class TestTimeLimits:
    """Soft limit 5 s, hard limit 8 s, against work that cannot finish: no test here races the clock.

    The recording's stored file is swapped for a FIFO that nobody writes, while the pool child is
    frozen and before it has taken the job, so the decoder (ffmpeg, for M4A) blocks opening it for
    ever. Only the limits can end that job, however fast or slow the machine is. (An earlier version
    analysed a long recording and expected the 2 s limit to catch it; on a quiet machine it finished
    inside the limit and the test failed.) The margins (5 s to freeze a blocked child, 3 s from the
    soft to the hard limit) only concern the test noticing a state that lasts until a limit.
    """

    SOFT_S, HARD_S = 5, 8

    @pytest.fixture(scope="class")
    @classmethod
    def env(cls, isolated: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
        settings = fault_settings(isolated, task_soft_time_limit_s=cls.SOFT_S, task_time_limit_s=cls.HARD_S,
                                  max_attempts=3)
        worker = start_worker(settings, tmp_path_factory.mktemp("tl") / "worker.log")
        try:
            yield {"settings": settings, "worker": worker, "client": web_app(settings).test_client(),
                   "factory": _factory(settings)}
        finally:
            stop_cold(worker)

    @pytest.fixture(scope="class")
    @classmethod
    def m4a_file(cls, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, bytes]:
        src = ravdess_file(2, "05")
        out = tmp_path_factory.mktemp("m4a") / "blocked.m4a"
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(src), "-c:a", "aac", str(out)], check=True)
        return out.name, out.read_bytes()

    @staticmethod
    def _release(env: dict[str, Any], job_id: str) -> None:
        """Let a decoder still waiting on the FIFO go (the hard limit kills the pool child, not the
        ffmpeg it started): opening the write end and closing it gives it an empty stream."""
        stored = path_for(env["settings"].upload_dir, job(env["factory"], job_id).storage_key or "")
        with contextlib.suppress(OSError):  # ENXIO: no reader left, nothing waits on it
            os.close(os.open(stored, os.O_WRONLY | os.O_NONBLOCK))

    @staticmethod
    def _blocked_job(env: dict[str, Any], m4a_file: tuple[str, bytes]) -> tuple[str, int]:
        """Upload a job whose audio can never be read; return its id and the (running) pool child
        that has taken it. The child is frozen from before the upload until the swap is done, so
        it cannot have opened the real file; its time limits start when it takes the job."""
        child = only_child(env["worker"].proc.pid)
        kill(child, signal.SIGSTOP)
        try:
            (job_id,) = _upload(env["client"], [m4a_file])
            stored = path_for(env["settings"].upload_dir, job(env["factory"], job_id).storage_key or "")
            stored.unlink()
            os.mkfifo(stored)
        finally:
            kill(child, signal.SIGCONT)
        wait_status(env["factory"], job_id, ("processing",), timeout=60, interval=0.05)
        return job_id, child

    def test_soft_time_limit_fails_the_job_with_a_clear_code(self, env: dict[str, Any],
                                                               m4a_file: tuple[str, bytes]) -> None:
        job_id, _ = self._blocked_job(env, m4a_file)
        done = wait_status(env["factory"], job_id, ("succeeded", "failed"), timeout=120)
        self._release(env, job_id)
        assert (done.status, done.error_code, done.attempts) == ("failed", "time_limit_exceeded", 1)
        assert f"{self.SOFT_S} s" in (done.error_message or "")
        assert result_rows(env["factory"], job_id) == 0
        # The child took the limit as an exception and lives on: the next job is analysed.
        (short_id,) = _upload(env["client"], [_short(0)])
        assert wait_status(env["factory"], short_id, ("succeeded", "failed"), timeout=90).status == "succeeded"

    def test_hard_time_limit_kills_a_frozen_child_and_replaces_it(self, env: dict[str, Any],
                                                                   m4a_file: tuple[str, bytes]) -> None:
        """A child that cannot take the soft limit (frozen with SIGSTOP, as if stuck in native code)
        is killed at the hard limit; its job fails at once rather than being retried to hang again."""
        worker: WorkerProcess = env["worker"]
        job_id, child = self._blocked_job(env, m4a_file)
        kill(child, signal.SIGSTOP)
        done = wait_status(env["factory"], job_id, ("succeeded", "failed"), timeout=60)
        self._release(env, job_id)
        assert (done.status, done.error_code, done.attempts) == ("failed", "time_limit_exceeded", 1)
        assert f"{self.HARD_S} s" in (done.error_message or "")  # the hard limit's message, not the soft one's
        replacement = wait_for(lambda: [p for p in [only_child(worker.proc.pid)] if p != child], 30, 0.2)[0]
        assert not Path(f"/proc/{child}").exists()
        # The replacement child works: a short recording is analysed.
        (short_id,) = _upload(env["client"], [_short(0)])
        assert wait_status(env["factory"], short_id, ("succeeded", "failed"), timeout=90).status == "succeeded"
        assert only_child(worker.proc.pid) == replacement


class TestKilledWorkers:
    """SIGKILL the pool child, or the whole worker, while a job is being analysed."""

    @pytest.fixture(scope="class")
    @classmethod
    def settings(cls, isolated: Settings) -> Settings:
        return fault_settings(isolated)

    @pytest.fixture(scope="class")
    @classmethod
    def env(cls, settings: Settings) -> dict[str, Any]:
        return {"client": web_app(settings).test_client(), "factory": _factory(settings)}

    @pytest.fixture(scope="class")
    @classmethod
    def logs(cls, tmp_path_factory: pytest.TempPathFactory) -> Path:
        return tmp_path_factory.mktemp("kills")

    @pytest.fixture(scope="class")
    @classmethod
    def worker(cls, settings: Settings, logs: Path) -> Iterator[WorkerProcess]:
        worker = start_worker(settings, logs / "worker.log")
        yield worker
        stop_cold(worker)

    def test_whole_worker_killed_mid_job_is_requeued_by_the_reconciler(
            self, request: pytest.FixtureRequest, settings: Settings, env: dict[str, Any], logs: Path,
            long_file: tuple[str, bytes]) -> None:
        """Main process and child SIGKILLed: nothing requeues the message (it sits unacknowledged
        until Redis's visibility timeout, an hour); the next worker's reconciler finds the job
        processing past the hard time limit and requeues it, counting the lost attempt."""
        victim = start_worker(settings, logs / "victim.log")
        try:
            child = only_child(victim.proc.pid)
            (job_id,) = _upload(env["client"], [long_file], webhook_url=WEBHOOK)
            started = wait_status(env["factory"], job_id, ("processing",), timeout=60)
            kill(victim.proc.pid)
            kill(child)
            victim.proc.wait()
        finally:
            stop_cold(victim)
        time.sleep(1)
        assert job(env["factory"], job_id).status == "processing"
        worker: WorkerProcess = request.getfixturevalue("worker")
        done = wait_status(env["factory"], job_id, ("succeeded", "failed"), timeout=120)
        assert (done.status, done.attempts) == ("succeeded", 2)
        assert done.started_at is not None and started.started_at is not None
        waited = (done.started_at - started.started_at).total_seconds()
        assert waited >= settings.task_time_limit_s + settings.stuck_margin_s
        assert "requeued stuck jobs=1" in worker.log_path.read_text(errors="replace")
        assert result_rows(env["factory"], job_id) == 1
        assert events(env["factory"], job_id) == ["job.succeeded"]

    def test_child_killed_mid_job_is_redelivered_and_completes_once(
            self, worker: WorkerProcess, env: dict[str, Any], long_file: tuple[str, bytes]) -> None:
        child = only_child(worker.proc.pid)
        (job_id,) = _upload(env["client"], [long_file], webhook_url=WEBHOOK)
        wait_status(env["factory"], job_id, ("processing",), timeout=60)
        kill(child)
        done = wait_status(env["factory"], job_id, ("succeeded", "failed"), timeout=120)
        assert (done.status, done.attempts, done.error_code) == ("succeeded", 2, None)
        assert only_child(worker.proc.pid) != child
        assert result_rows(env["factory"], job_id) == 1
        assert events(env["factory"], job_id) == ["job.succeeded"]

    def test_job_that_keeps_killing_its_worker_fails_after_max_attempts(
            self, worker: WorkerProcess, settings: Settings, env: dict[str, Any],
            long_file: tuple[str, bytes]) -> None:
        (job_id,) = _upload(env["client"], [long_file], webhook_url=WEBHOOK)
        killed = []
        for attempt in range(1, settings.max_attempts + 1):
            wait_for(lambda n=attempt: (j := job(env["factory"], job_id)).status == "processing"  # type: ignore[misc]
                     and j.attempts == n, 120, 0.1)
            killed.append(only_child(worker.proc.pid))
            kill(killed[-1])
        done = wait_status(env["factory"], job_id, ("succeeded", "failed"), timeout=60)
        assert (done.status, done.error_code, done.attempts) == ("failed", "too_many_attempts", settings.max_attempts)
        assert len(set(killed)) == settings.max_attempts
        assert result_rows(env["factory"], job_id) == 0
        assert events(env["factory"], job_id) == ["job.failed"]

    def test_duplicate_messages_for_a_job_analyse_it_once(self, worker: WorkerProcess, settings: Settings,
                                                          env: dict[str, Any]) -> None:
        """Three messages for one job (re-sends racing the original): one claim, one result, one event."""
        (job_id,) = _upload(env["client"], [_short(3)], webhook_url=WEBHOOK)
        celery = make_celery(settings)
        extra = [celery.send_task(ANALYZE, args=[[job_id]], queue=settings.default_queue).id for _ in range(2)]
        done = wait_status(env["factory"], job_id, ("succeeded", "failed"), timeout=60)
        wait_for(lambda: all(f"ser.analyze[{t}] succeeded" in worker.log_path.read_text(errors="replace")
                             for t in extra), 60)
        assert (done.status, job(env["factory"], job_id).attempts) == ("succeeded", 1)
        assert result_rows(env["factory"], job_id) == 1
        assert events(env["factory"], job_id) == ["job.succeeded"]

    def test_two_deliveries_running_at_once_keep_one_result_and_one_event(self, settings: Settings) -> None:
        """A claim does not stop a second delivery of a job still processing (that is how a job
        whose child died is taken up again); if both run to the end, the outcome is still one
        result row and one webhook event. Uses a queue no worker reads, so nothing else claims it."""
        idle = fault_settings(settings, default_queue="faults-unread")
        factory = _factory(idle)
        (job_id,) = _upload(web_app(idle).test_client(), [_short(4)], webhook_url=WEBHOOK)
        first = results.claim(factory, [job_id], idle)
        second = results.claim(factory, [job_id], idle)
        assert [i.id for i in first.inputs] == [i.id for i in second.inputs] == [uuid.UUID(job_id)]
        for emotion, confidence in (("angry", 0.6), ("sad", 0.7)):
            probs = {"neutral": round(1 - confidence, 3), emotion: confidence}
            outcome = Outcome(uuid.UUID(job_id), Prediction(emotion, confidence, False, probs,
                                                            {"rf": probs, "lstm": probs}))
            results.persist(factory, [outcome], {"rf": "t", "lstm": "t"})
        done = job(factory, job_id)
        assert (done.status, done.attempts, done.emotion) == ("succeeded", 2, "sad")
        assert result_rows(factory, job_id) == 1
        assert events(factory, job_id) == ["job.succeeded"]

    def test_load_against_gunicorn_no_5xx_no_lost_job(self, worker: WorkerProcess, settings: Settings,
                                                       env: dict[str, Any], logs: Path) -> None:
        from bench.load import run_load

        web = Gunicorn(settings, logs / "gunicorn.log")
        try:
            web.wait_ready()
            clients, seconds = int(os.environ.get("SER_LOAD_CLIENTS", "8")), float(os.environ.get("SER_LOAD_S", "6"))
            report = run_load(web.base, clients=clients, seconds=seconds, factory=env["factory"], drain_s=240)
        finally:
            web.stop()
        print(f"\nload: {report}")
        assert report["uploads"] > 0
        assert report["status_5xx"] == 0 and report["errors"] == 0, report
        assert report["jobs_submitted"] == report["results_stored"] == report["succeeded"], report
        # A backlog older than requeue_after_s sat in the broker the whole time: none of it may be
        # taken for lost and re-sent.
        assert "re-sending jobs missing" not in worker.log_path.read_text(errors="replace")


class TestBrokerAndDatabaseOutages:
    """A private Redis and a private Postgres cluster under one worker and one web app, so that
    they can be killed and stopped without touching the servers other tests use."""

    @pytest.fixture(scope="class")
    @classmethod
    def env(cls, pg_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
        tmp = tmp_path_factory.mktemp("outages")
        cluster, broker = PostgresCluster(), RedisServer(tmp)
        worker = None
        try:
            cluster.start()
            broker.start()
            settings = fault_settings(pg_settings, database_url=cluster.url, broker_url=broker.url,
                                      data_dir=tmp / "data", storage_dir=tmp / "data" / "uploads")
            upgrade(settings)
            worker = start_worker(settings, tmp / "worker.log")
            yield {"settings": settings, "cluster": cluster, "broker": broker, "worker": worker,
                   "client": web_app(settings).test_client(), "factory": _factory(settings)}
        finally:
            if worker is not None:
                stop_cold(worker)
            broker.kill()
            cluster.remove()

    def test_jobs_queued_when_redis_restarts_are_not_lost(self, env: dict[str, Any],
                                                          long_file: tuple[str, bytes]) -> None:
        """Redis (no persistence) restarts while one job runs and four wait in its queue; the
        reconciler finds the four in neither the queue nor the unacknowledged set and re-sends them."""
        broker: RedisServer = env["broker"]
        client, factory = env["client"], env["factory"]
        (long_id,) = _upload(client, [long_file])
        wait_status(factory, long_id, ("processing",), timeout=60)
        queued = [_upload(client, [_short(i)])[0] for i in range(4)]
        assert broker.client().llen(env["settings"].default_queue) == 4
        broker.kill()
        broker.start()  # same port, empty: Redis kept nothing
        assert broker.client().llen(env["settings"].default_queue) == 0
        for job_id in [long_id, *queued]:
            done = wait_status(factory, job_id, ("succeeded", "failed"), timeout=120)
            assert (done.status, done.attempts) == ("succeeded", 1), (job_id, done.error_code)
            assert result_rows(factory, job_id) == 1
        log = env["worker"].log_path.read_text(errors="replace")
        assert sum(map(int, re.findall(r"re-sending jobs missing from the broker jobs=(\d+)", log))) == 4

    def test_postgres_outage_uploads_answer_503_and_everything_recovers(
            self, env: dict[str, Any], long_file: tuple[str, bytes]) -> None:
        cluster: PostgresCluster = env["cluster"]
        worker: WorkerProcess = env["worker"]
        settings: Settings = env["settings"]
        client, factory = env["client"], env["factory"]
        assert client.get("/readyz").status_code == 200
        (long_id,) = _upload(client, [long_file])
        wait_status(factory, long_id, ("processing",), timeout=60)
        stored = sorted(p for p in settings.upload_dir.rglob("*") if p.is_file())

        cluster.stop()
        down = client.post("/api/v1/jobs", data=multipart([_short(0), _short(1)]), content_type="multipart/form-data")
        assert down.status_code == 503
        assert down.get_json()["error"]["code"] == "database_unavailable"
        assert sorted(p for p in settings.upload_dir.rglob("*") if p.is_file()) == stored  # nothing half-written
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.get_json()["checks"]["database"].startswith("unreachable")
        assert ready.get_json()["checks"]["broker"] == "ok"
        # The analysis carries on (its progress writes fail quietly) and its result write meets
        # the outage; the database returns while that write is being retried.
        wait_for(lambda: "database write failed, retrying" in worker.log_path.read_text(errors="replace"), 60)
        cluster.start()

        # The same web process, not restarted: ready again and taking uploads.
        assert wait_for(lambda: client.get("/readyz").status_code == 200, 30)
        (after_id,) = _upload(client, [_short(2)])
        for job_id in (long_id, after_id):
            done = wait_status(factory, job_id, ("succeeded", "failed"), timeout=120)
            # attempts == 1: the worker retried its write in place instead of redoing the job.
            assert (done.status, done.attempts) == ("succeeded", 1), (job_id, done.error_code)
            assert result_rows(factory, job_id) == 1
