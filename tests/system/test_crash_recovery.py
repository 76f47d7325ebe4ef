"""Nothing stuck after a kill -9: of a pool child while it transcribes, of a whole worker (main
process and children) while it analyses or transcribes, of the worker that runs the sweeps, and of
gunicorn in the middle of an upload with an Idempotency-Key.

Real processes and real signals, nothing mocked. The settings make recovery quick (heartbeats
every 0.5 s, a node dead after 3 s of silence, a 3 s idempotency lease) and the hard time limit
long (600 s): a job that comes back before it comes back through the new mechanisms, not the old
hard-limit rule, and each test also checks the worker log line of the mechanism. No test measures
time: each waits, with generous timeouts, for the state it expects.
"""

from __future__ import annotations

import signal
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from ser_client import Client
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from ser_shared.db import make_engine, make_session_factory
from ser_shared.models import LOCAL_TENANT, Batch, IdempotencyKey, Job, Result, WorkerHeartbeat
from ser_shared.settings import Settings
from tests.conftest import WorkerProcess, ravdess_file, wait_for
from tests.fault_tools import (
    Gunicorn,
    events,
    fault_settings,
    free_port,
    isolated,
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

pytestmark = pytest.mark.slow

# Long enough to be caught mid-analysis, and, asked for a sphinx transcript, to be caught while it
# is transcribed (a segment at a time, for seconds); short enough to be analysed twice quickly.
SPEECH_S = 60.0
LONG_S = 300.0
WEBHOOK = "http://127.0.0.1:9/hook"  # nothing listens: deliveries stay in the outbox, counted there


@pytest.fixture(scope="module")
def settings(pg_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A database and a Redis of this module's own (see ``isolated``), and the quick recovery settings."""
    tmp = tmp_path_factory.mktemp("crash")
    with isolated(pg_settings, tmp) as base:
        yield fault_settings(base, worker_heartbeat_s=0.5, worker_dead_after_s=3.0,
                             task_soft_time_limit_s=590, task_time_limit_s=600, stuck_margin_s=60.0,
                             max_attempts=3, transcribe_timeout_s=120.0, idempotency_lease_s=3.0)


@pytest.fixture(scope="module")
def factory(settings: Settings) -> sessionmaker[Session]:
    return make_session_factory(make_engine(settings))


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, bytes]:
    path = long_recording(tmp_path_factory.mktemp("audio") / "speech.flac", SPEECH_S)
    return path.name, path.read_bytes()


@pytest.fixture(scope="module")
def long_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, bytes]:
    path = long_recording(tmp_path_factory.mktemp("audio") / "long.flac", LONG_S)
    return path.name, path.read_bytes()


def _upload(settings: Settings, files: list[tuple[str, bytes]], **fields: str) -> str:
    resp = web_app(settings).test_client().post("/api/v1/jobs", data=multipart(files, **fields),
                                             content_type="multipart/form-data")
    assert resp.status_code == 202, resp.get_data(as_text=True)
    (only,) = resp.get_json()["jobs"]
    return str(only["id"])


def _kill_worker(worker: WorkerProcess, child: int) -> None:
    """kill -9 of the whole worker: its main process (heartbeat, sweeper) and its pool child."""
    kill(worker.proc.pid)
    kill(child)
    worker.proc.wait()
    stop_cold(worker)


def _transcript(factory: sessionmaker[Session], job_id: str) -> dict[str, Any]:
    with factory() as session:
        found = session.get(Result, uuid.UUID(job_id))
        return dict((found.transcript if found is not None else None) or {})


def _log(worker: WorkerProcess) -> str:
    return worker.log_path.read_text(errors="replace")


def _catch_transcribing(factory: sessionmaker[Session], job_id: str, child: int) -> None:
    """Freeze ``child`` while it makes the transcript: the emotion is stored, the transcript
    pending. Frozen, it cannot finish between the check and the kill that follows."""
    wait_for(lambda: job(factory, job_id).status == "succeeded" and _transcript(factory, job_id).get("status")
             == "pending", 240, 0.05)
    kill(child, signal.SIGSTOP)
    assert _transcript(factory, job_id)["status"] == "pending"


def _final_transcript(factory: sessionmaker[Session], job_id: str) -> dict[str, Any]:
    final: dict[str, Any] = wait_for(lambda: t if (t := _transcript(factory, job_id)).get("status") not in
                                     ("pending", None) else None, 300, 0.2)
    return final


def test_child_killed_while_transcribing_transcript_is_finished(
        settings: Settings, factory: sessionmaker[Session], speech: tuple[str, bytes],
        tmp_path: Path) -> None:
    """The pool child dies after storing the emotion, while it transcribes. Its node's main
    process requeues the message; the redelivered analyze finds the job finished and makes the
    transcript again from the stored audio (a second attempt), without touching the emotion."""
    worker = start_worker(settings, tmp_path / "worker.log")
    try:
        child = only_child(worker.proc.pid)
        job_id = _upload(settings, [speech], transcribe="sphinx", webhook_url=WEBHOOK)
        _catch_transcribing(factory, job_id, child)
        emotion = job(factory, job_id).emotion
        kill(child)
        transcript = _final_transcript(factory, job_id)
        assert only_child(worker.proc.pid) != child
        assert "transcribing again" in _log(worker)
    finally:
        stop_cold(worker)
    assert transcript["status"] in ("succeeded", "unavailable") and transcript["attempts"] == 2, transcript
    assert transcript.get("reason") != "worker_lost"
    done = job(factory, job_id)
    assert (done.status, done.attempts, done.emotion, done.worker) == ("succeeded", 1, emotion, None)
    assert result_rows(factory, job_id) == 1
    assert events(factory, job_id) == ["job.succeeded"]


def test_whole_worker_killed_mid_analysis_jobs_requeued_by_heartbeat(
        settings: Settings, factory: sessionmaker[Session], long_file: tuple[str, bytes],
        tmp_path: Path) -> None:
    """Main process and child killed: the job's holder stops heartbeating, and the next worker's
    reconciler requeues it as soon as the holder counts as dead, long before the hard time limit
    (600 s here) plus margin would have."""
    victim = start_worker(settings, tmp_path / "victim.log")
    try:
        child = only_child(victim.proc.pid)
        job_id = _upload(settings, [long_file], webhook_url=WEBHOOK)
        held = wait_status(factory, job_id, ("processing",), timeout=120, interval=0.05)
        assert held.worker is not None and f":{victim.proc.pid}:" in held.worker
    finally:
        _kill_worker(victim, child)
    worker = start_worker(settings, tmp_path / "worker.log")
    try:
        done = wait_status(factory, job_id, ("succeeded", "failed"), timeout=300)
        log = _log(worker)
    finally:
        stop_cold(worker)
    assert (done.status, done.attempts, done.worker) == ("succeeded", 2, None)
    assert "requeued jobs of dead workers jobs=1" in log and held.worker in log
    assert "requeued stuck jobs" not in log
    assert result_rows(factory, job_id) == 1
    assert events(factory, job_id) == ["job.succeeded"]
    with factory() as session:  # the dead node's heartbeat stopped where it was
        seen = session.scalar(select(WorkerHeartbeat.seen_at).where(WorkerHeartbeat.node == held.worker))
    assert seen is not None and done.started_at is not None and seen < done.started_at


def test_whole_worker_killed_while_transcribing_transcript_is_resent(
        settings: Settings, factory: sessionmaker[Session], speech: tuple[str, bytes],
        tmp_path: Path) -> None:
    """The emotion is stored and the whole worker dies during the transcript: no message would
    bring the transcript back (the unacknowledged one returns after an hour). The next worker's
    reconciler sees the holder dead and re-sends the transcript stage alone."""
    victim = start_worker(settings, tmp_path / "victim.log")
    try:
        child = only_child(victim.proc.pid)
        job_id = _upload(settings, [speech], transcribe="sphinx", webhook_url=WEBHOOK)
        _catch_transcribing(factory, job_id, child)
    finally:
        _kill_worker(victim, child)
    emotion = job(factory, job_id).emotion
    worker = start_worker(settings, tmp_path / "worker.log")
    try:
        transcript = _final_transcript(factory, job_id)
        log = _log(worker)
    finally:
        stop_cold(worker)
    assert transcript["status"] in ("succeeded", "unavailable") and transcript["attempts"] == 2, transcript
    assert transcript.get("reason") != "worker_lost"
    assert "re-sent transcripts of lost workers jobs=1" in log and "transcribing again" in log
    done = job(factory, job_id)
    assert (done.status, done.attempts, done.emotion, done.worker) == ("succeeded", 1, emotion, None)
    assert result_rows(factory, job_id) == 1
    assert events(factory, job_id) == ["job.succeeded"]


def test_sweeper_killed_sweeps_resume_when_the_worker_returns(
        settings: Settings, factory: sessionmaker[Session], tmp_path: Path) -> None:
    """The sweeps run in the worker's main process: kill -9 it, and a job that reached no broker
    (Redis was unreachable at upload) waits; the worker started again sweeps it into the queue."""
    victim = start_worker(settings, tmp_path / "victim.log")
    _kill_worker(victim, only_child(victim.proc.pid))
    unreachable = fault_settings(settings, broker_url=f"redis://127.0.0.1:{free_port()}/0")
    job_id = _upload(unreachable, [read(ravdess_file(2, "03"))])
    assert job(factory, job_id).enqueued_at is None
    # Sent once 2 s old rather than 30 (SER_UNQUEUED_GRACE_S): the wait is the setting's, not the point.
    worker = start_worker(settings.model_copy(update={"unqueued_grace_s": 2.0}), tmp_path / "worker.log")
    try:
        done = wait_status(factory, job_id, ("succeeded", "failed"), timeout=300)
        log = _log(worker)
    finally:
        stop_cold(worker)
    assert (done.status, done.attempts) == ("succeeded", 1)
    assert "sweep found=1 enqueued=1" in log


def _tiny_wavs(folder: Path, count: int) -> list[tuple[str, Path]]:
    """Many small distinct recordings: storing and probing them keeps the request busy for a while
    after it claimed its key, which is when it is killed."""
    rng = np.random.default_rng(7)
    files = []
    for i in range(count):
        path = folder / f"tiny-{i:04d}.wav"
        sf.write(path, (0.1 * rng.standard_normal(4000)).astype(np.float32), 16000, subtype="PCM_16")
        files.append((path.name, path))
    return files


def test_gunicorn_killed_mid_upload_retry_with_the_same_key_succeeds(
        settings: Settings, factory: sessionmaker[Session], tmp_path: Path) -> None:
    """gunicorn (worker and master) killed after the request claimed its Idempotency-Key, while it
    stores the files. The client (``ser submit``'s, retrying) meets a refused connection, then,
    once gunicorn is back, a 409 whose Retry-After is the rest of the lease, and then takes the
    key over: one batch, all files, no duplicate."""
    count = 1500
    files = _tiny_wavs(tmp_path, count)
    key = f"crash-{uuid.uuid4()}"
    stored_key = f"{LOCAL_TENANT}:{key}"
    said: list[str] = []
    outcome: dict[str, Any] = {}
    with factory() as session:  # the module's other tests left theirs
        old_batches = set(session.scalars(select(Batch.id)))
        old_jobs = session.scalar(select(func.count()).select_from(Job))
    web = Gunicorn(settings, tmp_path / "gunicorn.log", workers=1)
    restarted: Gunicorn | None = None
    try:
        web.wait_ready()
        client = Client(web.base, max_retries=8, on_retry=lambda event: said.append(str(event.error)))

        def submit() -> None:
            try:
                outcome["body"] = client.jobs.create(files, idempotency_key=key).to_dict()
            except Exception as exc:  # reported by the assertions below
                outcome["error"] = exc

        thread = threading.Thread(target=submit, daemon=True)
        thread.start()

        def claimed() -> IdempotencyKey | None:
            with factory() as session:
                return session.get(IdempotencyKey, stored_key)

        first = wait_for(claimed, 120, 0.01)
        server = only_child(web.proc.pid)
        kill(server, signal.SIGSTOP)
        frozen = claimed()
        assert frozen is not None and frozen.batch_id is None and frozen.status_code is None, "too late"
        kill(server)
        kill(web.proc.pid)
        web.proc.wait()
        with factory() as session:
            assert set(session.scalars(select(Batch.id))) == old_batches  # it committed nothing
        restarted = Gunicorn(settings, tmp_path / "gunicorn2.log", workers=1, port=web.port)
        restarted.wait_ready()
        thread.join(300)
    finally:
        web.stop()
        if restarted is not None:
            restarted.stop()
    assert "error" not in outcome, (outcome, said)
    body = outcome["body"]
    assert len(body["jobs"]) == count
    with factory() as session:
        batches = set(session.scalars(select(Batch.id))) - old_batches
        jobs = session.scalar(select(func.count()).select_from(Job))
        row = session.get(IdempotencyKey, stored_key)
    assert {str(b) for b in batches} == {body["batch_id"]} and jobs == (old_jobs or 0) + count
    # The key was taken over from the dead request (another owner) and is bound to the one batch.
    assert row is not None and row.owner != first.owner and str(row.batch_id) == body["batch_id"]
    assert row.status_code == 202
    assert any("cannot reach" in line for line in said), said
