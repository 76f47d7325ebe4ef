"""Uploads in S3, end to end, with the web tier and the worker on different data folders (so
nothing can pass between them through a disk), and the leftovers of a web process killed
mid-upload swept on both backends.

The S3 store is moto's server mode: a real S3 HTTP server on this machine; boto3 is not mocked.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import soundfile as sf
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from ser_shared import storage
from ser_shared.db import make_engine, make_session_factory
from ser_shared.models import Batch, Job
from ser_shared.settings import Settings
from tests.conftest import S3_ENV, WorkerProcess, ravdess_file, wait_for
from tests.fault_tools import Gunicorn, isolated, kill, only_child
from tests.helpers import multipart, read
from worker.orphans import sweep_orphans
from worker.retention import purge_expired_audio

pytestmark = pytest.mark.slow

PREFIX = "audio"


@pytest.fixture(scope="module")
def bucket(s3_endpoint: str) -> tuple[Any, str]:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    name = f"ser-e2e-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return client, name


@pytest.fixture(scope="module")
def base(pg_settings: Settings, bucket: tuple[Any, str], s3_endpoint: str,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A database and a Redis of this module's own, uploads in the bucket."""
    tmp = tmp_path_factory.mktemp("s3e2e")
    with isolated(pg_settings, tmp, storage_dir=None, data_dir=tmp / "web",
                  storage_url=f"s3://{bucket[1]}/{PREFIX}", s3_endpoint_url=s3_endpoint) as settings:
        yield settings


@pytest.fixture(scope="module")
def worker_settings(base: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return base.model_copy(update={"data_dir": tmp_path_factory.mktemp("s3worker") / "data"})


@pytest.fixture(scope="module")
def factory(base: Settings) -> sessionmaker[Session]:
    return make_session_factory(make_engine(base))


@pytest.fixture(scope="module")
def worker(worker_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    proc = WorkerProcess(worker_settings, tmp_path_factory.mktemp("s3logs") / "worker.log", extra_env=S3_ENV)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def _objects(bucket: tuple[Any, str]) -> set[str]:
    client, name = bucket
    found: set[str] = set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name, Prefix=f"{PREFIX}/"):
        found |= {o["Key"].removeprefix(f"{PREFIX}/") for o in page.get("Contents", [])}
    return found


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


@pytest.fixture(scope="module")
def processed(base: Settings, worker: WorkerProcess) -> dict[str, Any]:
    """Two real recordings and one non-audio file, uploaded through the app, analysed by the worker."""
    from web import create_app

    app = create_app(base)
    app.config["TESTING"] = True
    client = app.test_client()
    good = [read(ravdess_file(1, "05")), read(ravdess_file(2, "03"))]
    files = good + [("notes.wav", b"not audio at all\n" * 50)]
    resp = client.post("/api/v1/jobs", data=multipart(files), content_type="multipart/form-data")
    assert resp.status_code == 202, resp.get_data(as_text=True)
    batch_id = resp.get_json()["batch_id"]

    def done() -> dict[str, Any] | None:
        body: dict[str, Any] = client.get(f"/api/v1/batches/{batch_id}").get_json()
        return body if body["done"] else None

    return {"client": client, "batch": wait_for(done, 240), "bytes": [content for _, content in good]}


def test_jobs_succeed_from_objects_with_separate_data_folders(
        processed: dict[str, Any], base: Settings, worker_settings: Settings, bucket: tuple[Any, str],
        factory: sessionmaker[Session]) -> None:
    jobs = processed["batch"]["jobs"]
    assert [j["status"] for j in jobs] == ["succeeded", "succeeded", "failed"]
    assert all(j["result"]["emotion"] for j in jobs[:2])
    with factory() as session:
        keys = {k for k in session.scalars(select(Job.storage_key)) if k}
    assert len(keys) == 2 and keys <= _objects(bucket)  # the refused file was never stored
    # Nothing of the audio on either disk: the web checked it on a spool, the worker read a spool copy.
    assert base.resolved_data_dir != worker_settings.resolved_data_dir
    for folder in (base.resolved_data_dir, worker_settings.resolved_data_dir):
        assert not [p for p in _files(folder) if "spool" in p.parts or "uploads" in p.parts], folder


def test_audio_streams_from_the_store_with_range(processed: dict[str, Any]) -> None:
    client, job, original = processed["client"], processed["batch"]["jobs"][0], processed["bytes"][0]
    whole = client.get(f"/api/v1/jobs/{job['id']}/audio")
    assert whole.status_code == 200 and whole.data == original
    assert whole.headers["Accept-Ranges"] == "bytes" and whole.mimetype == "audio/flac"  # RAVDESS copies are FLAC
    assert whole.headers["Content-Disposition"].startswith("attachment")
    assert "sandbox" in whole.headers["Content-Security-Policy"]
    part = client.get(f"/api/v1/jobs/{job['id']}/audio", headers={"Range": "bytes=100-1099"})
    assert part.status_code == 206 and part.data == original[100:1100]
    assert part.headers["Content-Range"] == f"bytes 100-1099/{len(original)}"
    tail = client.get(f"/api/v1/jobs/{job['id']}/audio", headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.data == original[-10:]
    beyond = client.get(f"/api/v1/jobs/{job['id']}/audio", headers={"Range": f"bytes={len(original) + 5}-"})
    assert beyond.status_code == 416


def test_delete_and_retention_remove_objects(processed: dict[str, Any], base: Settings,
                                             bucket: tuple[Any, str], factory: sessionmaker[Session]) -> None:
    client = processed["client"]
    first, second = processed["batch"]["jobs"][:2]
    with factory() as session:
        key_of = {str(j.id): j.storage_key for j in session.scalars(select(Job))}
    assert client.delete(f"/api/v1/jobs/{first['id']}").status_code == 204
    assert key_of[first["id"]] not in _objects(bucket)
    assert client.get(f"/api/v1/jobs/{first['id']}/audio").status_code == 404
    later = datetime.now(UTC) + timedelta(days=base.audio_retention_days + 1)
    assert purge_expired_audio(factory, base, now=later) == 1
    assert key_of[second["id"]] not in _objects(bucket)
    assert client.get(f"/api/v1/jobs/{second['id']}/audio").status_code == 410


# --- leftovers of a web process killed mid-upload ---------------------------------------------


def _tiny_wavs(folder: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(11)
    paths = []
    for i in range(count):
        path = folder / f"tiny-{i:04d}.wav"
        sf.write(path, (0.1 * rng.standard_normal(4000)).astype(np.float32), 16000, subtype="PCM_16")
        paths.append(path)
    return paths


def _kill_mid_upload(settings: Settings, factory: sessionmaker[Session], tmp_path: Path,
                     stored: Callable[[], int]) -> None:
    """Start gunicorn, send it a large batch, and kill -9 it (worker and master) once ``stored()``
    counts 20 files stored and before the request committed any row."""
    with factory() as session:
        old_batches = set(session.scalars(select(Batch.id)))
    paths = _tiny_wavs(tmp_path, 1500)
    web = Gunicorn(settings, tmp_path / "gunicorn.log", workers=1)
    try:
        web.wait_ready()

        def send() -> None:
            # The connection dies with gunicorn: that is the point.
            with contextlib.suppress(requests.RequestException):
                requests.post(f"{web.base}/api/v1/jobs", timeout=300,
                              files=[("file", (p.name, p.read_bytes(), "audio/wav")) for p in paths])

        threading.Thread(target=send, daemon=True).start()
        wait_for(lambda: stored() >= 20, 120, 0.05)
        server = only_child(web.proc.pid)
        kill(server, signal.SIGSTOP)  # frozen: it cannot commit between the check and the kill
        with factory() as session:
            assert set(session.scalars(select(Batch.id))) == old_batches, "too late: the batch committed"
        kill(server)
        kill(web.proc.pid)
        web.proc.wait()
    finally:
        web.stop()


def _orphans(store: storage.Storage, factory: sessionmaker[Session]) -> set[str]:
    with factory() as session:
        known = {k for k in session.scalars(select(Job.storage_key)) if k}
    return {e.key for e in store.entries()} - known


def _sweep_after_grace(settings: Settings, factory: sessionmaker[Session]) -> int:
    # Within the grace, nothing goes (an upload in flight may be about to commit its rows) ...
    assert sweep_orphans(factory, settings) == 0
    # ... and once past it, every leftover does: the sweep the worker's reconciler runs.
    return sweep_orphans(factory, settings, now=datetime.now(UTC) + timedelta(seconds=settings.orphan_grace_s + 1))


def test_killed_upload_leftovers_swept_on_s3(base: Settings, factory: sessionmaker[Session],
                                             bucket: tuple[Any, str], tmp_path: Path) -> None:
    settings = base.model_copy(update={"data_dir": tmp_path / "web", "orphan_grace_s": 3600.0})
    store = storage.store_for(settings)
    kept = _objects(bucket)
    _kill_mid_upload(settings, factory, tmp_path, lambda: len(_objects(bucket) - kept))
    leftovers = _orphans(store, factory)
    assert len(leftovers) >= 20 and leftovers == _objects(bucket) - kept
    assert _sweep_after_grace(settings, factory) >= len(leftovers)
    assert _objects(bucket) == kept and _orphans(store, factory) == set()


def test_killed_upload_leftovers_swept_on_the_folder_store(base: Settings, factory: sessionmaker[Session],
                                                           tmp_path: Path) -> None:
    settings = base.model_copy(update={"data_dir": tmp_path / "web", "storage_dir": tmp_path / "uploads",
                                       "storage_url": None, "orphan_grace_s": 3600.0})
    store = storage.store_for(settings)
    _kill_mid_upload(settings, factory, tmp_path, lambda: len(_files(tmp_path / "uploads")))
    leftovers = _files(tmp_path / "uploads")
    assert len(leftovers) >= 20 and len(_orphans(store, factory)) == len(leftovers)
    assert _sweep_after_grace(settings, factory) == len(leftovers)  # .part files included
    assert _files(tmp_path / "uploads") == []
