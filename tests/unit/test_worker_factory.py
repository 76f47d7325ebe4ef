"""The worker built by its factory and run in this process, against a real (filesystem) queue.

Uploads go through the Flask test client of ``web.create_app(settings)``, which commits the jobs
and sends their messages into the broker folder; a worker built by
``worker.celery_app.create_worker(settings)`` consumes them in a thread of this process. Nothing
runs eagerly: the tests check that their messages sat in the queue before a worker took them.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.signals import task_postrun
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from ser_ml.inference import Ensemble
from ser_shared.contracts import ANALYZE, TRANSCRIBE
from ser_shared.db import make_engine, make_session_factory
from ser_shared.emotions import EMOTIONS
from ser_shared.enqueue import make_celery
from ser_shared.models import Job, Result
from ser_shared.settings import Settings
from ser_shared.storage import path_for
from tests.conftest import ravdess_file, wait_for
from tests.helpers import multipart, read
from tests.unit.conftest import embedded_settings, running, unit_worker
from worker.runtime import runtime_of

# Two apps' tasks under one name would mean one app's closures reached the other.
pytestmark = pytest.mark.filterwarnings("error::celery.exceptions.DuplicateTaskNameWarning")
TIMEOUT_S = 120.0  # a generous bound for one short recording on a busy 2-core machine, not a latency claim


@pytest.fixture(scope="module")
def sessions(settings: Settings) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(settings)
    yield make_session_factory(engine)
    engine.dispose()


def _upload(client: FlaskClient, path: Path, **fields: str) -> dict[str, Any]:
    resp = client.post("/api/v1/jobs", data=multipart([read(path)], **fields), content_type="multipart/form-data")
    assert resp.status_code == 202, resp.get_data(as_text=True)
    (job,) = resp.get_json()["jobs"]
    assert job["status"] == "queued", job
    return dict(job)


def _finished(client: FlaskClient, url: str) -> dict[str, Any] | None:
    job = client.get(url).get_json()
    return job if job["status"] in ("succeeded", "failed") else None


def _queued_messages(settings: Settings) -> int:
    """Messages waiting in the filesystem broker's folder."""
    return sum(1 for p in (settings.broker_folder / "queue").iterdir() if p.is_file())


class TaskRuns:
    """Records every task this process finishes (Celery's ``task_postrun``): name, args, return value."""

    def __init__(self) -> None:
        self.runs: list[tuple[str, Any, Any]] = []
        self._lock = threading.Lock()

    def __call__(self, sender: Any = None, args: Any = None, retval: Any = None, **_: Any) -> None:
        with self._lock:
            self.runs.append((sender.name, args, retval))

    def of(self, name: str, job_id: str) -> list[Any]:
        with self._lock:
            return [retval for task, args, retval in self.runs if task == name and job_id in (args or [[]])[0]]


@pytest.fixture(scope="module")
def processed(client_module: FlaskClient, worker_app: Celery, settings: Settings,
              sessions: sessionmaker[Session]) -> Iterator[dict[str, Any]]:
    """Three jobs queued before any worker runs, then one in-process worker until all are done
    (one worker start for three scenarios: stopping a worker costs Celery a few idle seconds).

    ``plain``: a RAVDESS recording; ``gone``: its stored file deleted while its message waits;
    ``twice``: its message plus two copies, as redeliveries would bring them.
    """
    client = client_module
    before = _queued_messages(settings)
    jobs = {"plain": _upload(client, ravdess_file(1, "05")), "gone": _upload(client, ravdess_file(2, "03")),
            "twice": _upload(client, ravdess_file(3, "04"))}
    with sessions() as session:
        key = session.scalar(select(Job.storage_key).where(Job.id == uuid.UUID(jobs["gone"]["id"])))
    assert key is not None
    path_for(settings.upload_dir, key).unlink()
    for _ in range(2):
        worker_app.send_task(ANALYZE, args=[[jobs["twice"]["id"]]], queue=settings.default_queue)
    waiting = _queued_messages(settings) - before  # in the broker's folder, not run eagerly
    runs = TaskRuns()
    task_postrun.connect(runs, weak=False)
    try:
        with running(worker_app):
            wait_for(lambda: len(runs.of(ANALYZE, jobs["twice"]["id"])) == 3, TIMEOUT_S)
            done = {name: wait_for(lambda j=job: _finished(client, j["url"]), TIMEOUT_S) for name, job in jobs.items()}
    finally:
        task_postrun.disconnect(runs)
    yield {"jobs": done, "waiting": waiting, "runs": runs, "ids": {n: j["id"] for n, j in jobs.items()}}


@pytest.fixture(scope="module")
def client_module(app: Flask) -> FlaskClient:
    return app.test_client()


def test_an_upload_is_analysed_end_to_end_in_process(processed: dict[str, Any], settings: Settings) -> None:
    assert processed["waiting"] == 5  # every message went through the filesystem broker
    job = processed["jobs"]["plain"]
    assert job["status"] == "succeeded" and job["error"] is None and job["attempts"] == 1, job
    result = job["result"]
    assert result["emotion"] in EMOTIONS and set(result["probabilities"]) == set(EMOTIONS)
    assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-3)
    assert set(result["models"]) == {"rf", "lstm"}
    assert _queued_messages(settings) == 0


def test_a_job_whose_recording_is_gone_fails_audio_missing(processed: dict[str, Any]) -> None:
    job = processed["jobs"]["gone"]
    assert job["status"] == "failed" and job["error"]["code"] == "audio_missing", job


def test_duplicate_messages_analyse_a_job_once(processed: dict[str, Any], sessions: sessionmaker[Session]) -> None:
    job_id = processed["ids"]["twice"]
    assert sorted(processed["runs"].of(ANALYZE, job_id)) == [0, 0, 1]  # one analysis, two no-ops
    with sessions() as session:
        job = session.get(Job, uuid.UUID(job_id))
        assert job is not None and job.status == "succeeded" and job.attempts == 1
        assert session.get(Result, job.id) is not None


def test_two_worker_apps_with_their_own_settings_share_a_process(
        client: FlaskClient, worker_app: Celery, settings: Settings, models: Ensemble, tmp_path: Path) -> None:
    """Each app's tasks use the settings it was built with: its own database, queue and storage."""
    from web import create_app

    other = embedded_settings(tmp_path / "other")
    other_worker = unit_worker(other, models)  # create_worker(other), sharing the loaded models
    other_client = create_app(other).test_client()
    assert runtime_of(worker_app).settings is settings and runtime_of(other_worker).settings is other
    assert worker_app.tasks[ANALYZE] is not other_worker.tasks[ANALYZE]
    # No task is registered on apps it was not defined on (Celery's "shared" tasks would be).
    assert ANALYZE not in make_celery(other).tasks

    mine = _upload(client, ravdess_file(4, "01"))
    theirs = _upload(other_client, ravdess_file(5, "06"))
    assert other_client.get(mine["url"]).status_code == 404 and client.get(theirs["url"]).status_code == 404
    with running(worker_app):
        assert wait_for(lambda: _finished(client, mine["url"]), TIMEOUT_S)["status"] == "succeeded"
        # The first app's worker never saw the other app's queue: its job still waits there.
        assert other_client.get(theirs["url"]).get_json()["status"] == "queued" and _queued_messages(other) == 1
        with running(other_worker):  # both workers now run side by side in this process
            job = wait_for(lambda: _finished(other_client, theirs["url"]), TIMEOUT_S)
    assert job["status"] == "succeeded" and job["attempts"] == 1, job


def test_the_transcribe_task_makes_a_transcript_left_pending(
        client: FlaskClient, worker_app: Celery, settings: Settings, sessions: sessionmaker[Session]) -> None:
    """``ser.transcribe``, as the reconciler sends it for a transcript a dead worker left pending."""
    queued = _upload(client, ravdess_file(6, "01"))  # "Kids are talking by the door", neutral
    job_id = uuid.UUID(queued["id"])
    with running(worker_app):
        assert wait_for(lambda: _finished(client, queued["url"]), TIMEOUT_S)["status"] == "succeeded"
        with sessions() as session:  # the state a worker killed during the transcript stage leaves
            session.execute(update(Job).where(Job.id == job_id).values(
                options={"transcribe": "sphinx", "language": "en-US"}))
            session.execute(update(Result).where(Result.job_id == job_id).values(
                transcript={"status": "pending", "engine": "sphinx", "language": "en-US"}))
            session.commit()
        worker_app.send_task(TRANSCRIBE, args=[[queued["id"]]], queue=settings.default_queue)

        def transcribed() -> dict[str, Any] | None:
            transcript = client.get(queued["url"]).get_json()["result"]["transcript"]
            return transcript if transcript and transcript["status"] != "pending" else None

        transcript = wait_for(transcribed, TIMEOUT_S)
    assert transcript["status"] == "succeeded" and transcript["engine"] == "sphinx", transcript
    assert transcript["text"] and transcript["attempts"] == 1
    with sessions() as session:
        assert session.scalar(select(Job.worker).where(Job.id == job_id)) is None  # released: the stage is done
