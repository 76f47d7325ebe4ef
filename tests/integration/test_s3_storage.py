"""The S3 backend against a real S3 HTTP server (moto's server mode; boto3 talks HTTP to it), and
the orphan sweep on both backends against a real Postgres."""

from __future__ import annotations

import hashlib
import io
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from ser_shared import storage
from ser_shared.db import make_engine, make_session_factory
from ser_shared.errors import FileTooLarge
from ser_shared.models import Batch, Job
from ser_shared.settings import Settings
from tests.conftest import private_database
from worker.orphans import sweep_orphans

MiB = 1 << 20


class Generated(io.RawIOBase):
    """``size`` pseudo-random bytes made on demand, remembering the largest read asked of it:
    a body that exists whole nowhere, so storing it cannot have held it whole."""

    def __init__(self, size: int) -> None:
        self.left, self.largest, self.digest, self.counter = size, 0, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.largest = max(self.largest, n)
        out = bytearray()
        while len(out) < n:
            out += hashlib.sha512(self.counter.to_bytes(8, "big")).digest()
            self.counter += 1
        chunk = bytes(out[:n])
        self.left -= n
        self.digest.update(chunk)
        return chunk


@pytest.fixture
def s3_settings(pg_settings: Settings, s3_bucket: tuple[Any, str], s3_endpoint: str,
                tmp_path: Path) -> Iterator[Settings]:
    _, bucket = s3_bucket
    with private_database(pg_settings, data_dir=tmp_path / "data", storage_url=f"s3://{bucket}/audio",
                          s3_endpoint_url=s3_endpoint, orphan_grace_s=600.0) as settings:
        yield settings


def _objects(client: Any, bucket: str) -> dict[str, int]:
    page = client.list_objects_v2(Bucket=bucket)
    return {o["Key"]: o["Size"] for o in page.get("Contents", [])}


def test_a_large_upload_is_a_streamed_multipart_put(s3_settings: Settings, s3_bucket: tuple[Any, str]) -> None:
    client, bucket = s3_bucket
    store = storage.store_for(s3_settings)
    body = Generated(20 * MiB + 123)
    with store.receive(body, 100 * MiB) as (stored, local):
        assert local.stat().st_size == 20 * MiB + 123  # the local check copy, not yet in the bucket
        assert _objects(client, bucket) == {}
    assert body.largest <= storage.CHUNK  # read a chunk at a time, never whole
    assert stored.sha256 == body.digest.hexdigest()
    head = client.head_object(Bucket=bucket, Key=f"audio/{stored.key}")
    assert head["ContentLength"] == 20 * MiB + 123
    assert head["ETag"].strip('"').endswith("-3")  # three 8 MiB parts: a multipart upload
    assert not local.exists() and list((s3_settings.resolved_data_dir / "spool").iterdir()) == []


def test_ranged_reads_spool_and_delete(s3_settings: Settings, s3_bucket: tuple[Any, str]) -> None:
    client, bucket = s3_bucket
    store = storage.store_for(s3_settings)
    data = bytes(range(256)) * 4096  # 1 MiB
    with store.receive(io.BytesIO(data), 100 * MiB) as (stored, _):
        pass
    assert isinstance(store, storage.S3Storage)
    assert b"".join(store.get_range(stored.key, 1000, 3000)) == data[1000:3000]
    assert store.size(stored.key) == len(data) and store.exists(stored.key)
    with store.local_copy(stored.key) as path:
        assert path.read_bytes() == data
    assert not path.exists()  # the spool copy goes with the block
    assert store.delete(stored.key) is True
    assert _objects(client, bucket) == {} and not store.exists(stored.key)
    assert store.delete(stored.key) is False
    with pytest.raises(FileNotFoundError), store.local_copy(stored.key):
        pass


def test_a_refused_upload_reaches_nothing(s3_settings: Settings, s3_bucket: tuple[Any, str]) -> None:
    client, bucket = s3_bucket
    store = storage.store_for(s3_settings)
    with pytest.raises(FileTooLarge), store.receive(io.BytesIO(b"x" * (2 * MiB)), MiB):
        pass
    with pytest.raises(RuntimeError), store.receive(io.BytesIO(b"RIFF...."), MiB):
        raise RuntimeError("the header check refused it")
    assert _objects(client, bucket) == {}
    assert list((s3_settings.resolved_data_dir / "spool").iterdir()) == []


def _job_with(settings: Settings, key: str) -> None:
    factory = make_session_factory(make_engine(settings))
    with factory() as session:
        batch = Batch(id=uuid.uuid4(), options={}, file_count=1)
        session.add(batch)
        session.add(Job(id=uuid.uuid4(), batch_id=batch.id, position=0, filename="kept.wav", status="queued",
                        options={}, storage_key=key, size_bytes=3))
        session.commit()


def test_sweep_removes_old_objects_and_parts_with_no_row(s3_settings: Settings,
                                                         s3_bucket: tuple[Any, str]) -> None:
    client, bucket = s3_bucket
    store = storage.store_for(s3_settings)
    keys = []
    for _ in range(3):
        with store.receive(io.BytesIO(b"abc"), MiB) as (stored, _):
            keys.append(stored.key)
    _job_with(s3_settings, keys[0])
    factory = make_session_factory(make_engine(s3_settings))
    # Within the grace nothing goes: an upload request may still be about to commit its rows.
    assert sweep_orphans(factory, s3_settings) == 0
    assert len(_objects(client, bucket)) == 3
    # Made only now: moto reports every multipart upload as initiated on 2010-11-10, so its age
    # cannot show the grace (real S3 and MinIO report the true time).
    upload = client.create_multipart_upload(Bucket=bucket, Key=f"audio/{storage.new_key()}")
    later = datetime.now(UTC) + timedelta(seconds=s3_settings.orphan_grace_s + 60)
    assert sweep_orphans(factory, s3_settings, now=later) == 3  # two objects, one multipart upload
    assert _objects(client, bucket) == {f"audio/{keys[0]}": 3}
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert upload["UploadId"]


def test_sweep_on_the_folder_store(pg_settings: Settings, tmp_path: Path) -> None:
    with private_database(pg_settings, data_dir=tmp_path / "data", storage_dir=tmp_path / "uploads",
                          orphan_grace_s=600.0) as settings:
        store = storage.store_for(settings)
        keys = []
        for _ in range(2):
            with store.receive(io.BytesIO(b"abc"), MiB) as (stored, _):
                keys.append(stored.key)
        _job_with(settings, keys[0])
        part = storage.path_for(settings.upload_dir, storage.new_key() + ".part")
        part.parent.mkdir(parents=True)
        part.write_bytes(b"half an upload")
        factory = make_session_factory(make_engine(settings))
        assert sweep_orphans(factory, settings) == 0
        later = datetime.now(UTC) + timedelta(seconds=settings.orphan_grace_s + 60)
        assert sweep_orphans(factory, settings, now=later) == 2
        left = sorted(p.relative_to(settings.upload_dir).as_posix()
                      for p in settings.upload_dir.rglob("*") if p.is_file())
        assert left == [keys[0]]


def test_the_reconciler_runs_the_sweep_at_most_once_per_grace(s3_settings: Settings,
                                                               s3_bucket: tuple[Any, str]) -> None:
    """The worker's sweeper pass (``Reconciler``) includes the orphan sweep, throttled: listing
    a whole store every ``sweep_interval_s`` would be waste."""
    from worker.reconcile import Reconciler

    client, bucket = s3_bucket
    settings = s3_settings.model_copy(update={"orphan_grace_s": 3600.0})
    store = storage.store_for(settings)
    with store.receive(io.BytesIO(b"abc"), MiB) as (stored, _):
        pass
    reconcile = Reconciler()
    factory = make_session_factory(make_engine(settings))
    assert reconcile.orphans(factory, settings) == 0  # within the grace: kept
    assert reconcile.orphans_swept_at is not None
    reconcile.orphans_swept_at -= 3601  # an hour on: the next pass sweeps again
    later = settings.model_copy(update={"orphan_grace_s": 0.001})
    # With a grace of 1 ms the object is old now; the throttle is min(grace, 1 h).
    assert reconcile.orphans(factory, later) == 1
    assert _objects(client, bucket) == {} and not store.exists(stored.key)
    assert reconcile.orphans(factory, later) == 0  # swept just now: nothing more to find
