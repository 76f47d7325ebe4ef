"""Idempotent submission (Idempotency-Key) and caller references, against the real Postgres."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from ser_shared.db import make_engine
from ser_shared.models import LOCAL_TENANT, Batch, IdempotencyKey
from ser_shared.settings import Settings
from tests.conftest import ravdess_file
from tests.helpers import multipart, read


def _post(client, files, key: str | None = None, **fields):  # type: ignore[no-untyped-def]
    headers = {"Idempotency-Key": key} if key is not None else {}
    return client.post("/api/v1/jobs", data=multipart(files, **fields), content_type="multipart/form-data",
                       headers=headers)


@pytest.fixture
def engine(pg_settings: Settings):  # type: ignore[no-untyped-def]
    eng = make_engine(pg_settings)
    yield eng
    eng.dispose()


def _batches(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(Batch)).scalar_one())


def test_a_retry_with_the_same_key_replays_and_creates_nothing(client, engine) -> None:  # type: ignore[no-untyped-def]
    key = f"retry-{uuid.uuid4()}"
    files = [read(ravdess_file(1, "05")), read(ravdess_file(2, "04"))]
    before = _batches(engine)
    first = _post(client, files, key)
    assert first.status_code == 202 and "Idempotent-Replayed" not in first.headers
    again = _post(client, files, key)
    assert again.status_code == 202
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.get_json() == first.get_json()
    assert _batches(engine) == before + 1  # one batch for two identical requests


def test_the_same_key_with_another_request_is_a_conflict(client) -> None:  # type: ignore[no-untyped-def]
    key = f"reuse-{uuid.uuid4()}"
    assert _post(client, [read(ravdess_file(1, "05"))], key).status_code == 202
    other = _post(client, [read(ravdess_file(1, "03"))], key)  # different bytes
    assert other.status_code == 409 and other.get_json()["error"]["code"] == "idempotency_key_reused"
    fields = _post(client, [read(ravdess_file(1, "05"))], key, device="cpu")  # same file, other options
    assert fields.status_code == 409


def test_a_failed_request_releases_its_key(client) -> None:  # type: ignore[no-untyped-def]
    key = f"fail-{uuid.uuid4()}"
    bad = _post(client, [read(ravdess_file(1, "05"))], key, device="tpu")
    assert bad.status_code == 400
    retry = _post(client, [read(ravdess_file(1, "05"))], key)
    assert retry.status_code == 202 and "Idempotent-Replayed" not in retry.headers


def test_in_progress_stale_and_expired_keys(client, engine) -> None:  # type: ignore[no-untyped-def]
    now = datetime.now(UTC)
    busy, stale, expired = (f"{kind}-{uuid.uuid4()}" for kind in ("busy", "stale", "expired"))
    files = [read(ravdess_file(3, "05"))]
    for key in (busy, stale, expired):
        assert _post(client, files, key).status_code == 202
    with engine.begin() as conn:  # as if the first request were still running, had died, or were old
        table = IdempotencyKey.__table__

        def stored(key: str) -> str:  # keys are stored per tenant
            return f"{LOCAL_TENANT}:{key}"

        # A claim in progress has no response and no batch yet; a dead one's lease has run out.
        conn.execute(sa.update(table).where(table.c.key == stored(busy))
                     .values(status_code=None, response=None, batch_id=None, lease_until=now + timedelta(minutes=1)))
        conn.execute(sa.update(table).where(table.c.key == stored(stale))
                     .values(status_code=None, response=None, batch_id=None, lease_until=now - timedelta(seconds=1)))
        conn.execute(sa.update(table).where(table.c.key == stored(expired))
                     .values(created_at=now - timedelta(hours=25)))
    running = _post(client, files, busy)
    assert running.status_code == 409 and running.get_json()["error"]["code"] == "idempotency_key_in_progress"
    assert 1 <= int(running.headers["Retry-After"]) <= 60  # the rest of the lease
    retaken = _post(client, files, stale)  # its request died: the key is free again
    assert retaken.status_code == 202 and "Idempotent-Replayed" not in retaken.headers
    fresh = _post(client, files, expired)  # 24 hours on, the key is new again
    assert fresh.status_code == 202 and "Idempotent-Replayed" not in fresh.headers
    with engine.connect() as conn:
        row = conn.execute(sa.select(IdempotencyKey).where(IdempotencyKey.key == stored(expired))).one()
    assert row.response["batch_id"] == fresh.get_json()["batch_id"]


def test_a_key_whose_request_died_after_committing_replays_its_batch(client, engine) -> None:  # type: ignore[no-untyped-def]
    key = f"bound-{uuid.uuid4()}"
    files = [read(ravdess_file(3, "04")), read(ravdess_file(3, "06"))]
    before = _batches(engine)
    first = _post(client, files, key)
    assert first.status_code == 202
    table = IdempotencyKey.__table__
    with engine.begin() as conn:  # as if the request died between its batch's commit and its answer
        conn.execute(sa.update(table).where(table.c.key == f"{LOCAL_TENANT}:{key}")
                     .values(status_code=None, response=None))
    again = _post(client, files, key)
    assert again.status_code == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert again.get_json()["batch_id"] == first.get_json()["batch_id"]
    assert [j["id"] for j in again.get_json()["jobs"]] == [j["id"] for j in first.get_json()["jobs"]]
    assert _batches(engine) == before + 1


@pytest.mark.parametrize("key", ["", "x" * 256, "caf\u00e9", "tab\there"])
def test_malformed_keys_are_400(client, key: str) -> None:  # type: ignore[no-untyped-def]
    resp = _post(client, [read(ravdess_file(1, "05"))], key)
    assert resp.status_code == 400 and resp.get_json()["error"]["code"] == "invalid_idempotency_key"


def test_client_reference_and_metadata_are_stored_and_returned(client) -> None:  # type: ignore[no-untyped-def]
    ref = f"study-{uuid.uuid4()}"
    meta = {"site": "Leeds", "call": 42}
    resp = _post(client, [read(ravdess_file(4, "05")), read(ravdess_file(4, "03"))],
                 client_reference=ref, metadata=json.dumps(meta))
    assert resp.status_code == 202
    jobs = resp.get_json()["jobs"]
    assert [j["client_reference"] for j in jobs] == [ref, ref]
    detail = client.get(f"/api/v1/jobs/{jobs[0]['id']}").get_json()
    assert detail["client_reference"] == ref and detail["metadata"] == meta
    listed = client.get("/api/v1/jobs", query_string={"client_reference": ref}).get_json()["jobs"]
    assert sorted(j["id"] for j in listed) == sorted(j["id"] for j in jobs)


def test_one_client_reference_per_file(client) -> None:  # type: ignore[no-untyped-def]
    files = [read(ravdess_file(5, "05")), read(ravdess_file(5, "03")), read(ravdess_file(5, "04"))]
    refs = [f"call-{i}-{uuid.uuid4()}" for i in range(3)]
    resp = _post(client, files, client_reference=refs)
    assert [j["client_reference"] for j in resp.get_json()["jobs"]] == refs


@pytest.mark.parametrize("fields", [
    {"client_reference": ["a", "b"]},  # two references for three files
    {"client_reference": "r" * 201},
    {"metadata": "[1, 2]"},
    {"metadata": "{not json"},
    {"metadata": json.dumps({"blob": "x" * 5000})},
])
def test_bad_references_and_metadata_are_400(client, fields: dict) -> None:  # type: ignore[no-untyped-def]
    files = [read(ravdess_file(6, "05")), read(ravdess_file(6, "03")), read(ravdess_file(6, "04"))]
    resp = _post(client, files, **fields)
    assert resp.status_code == 400 and resp.get_json()["error"]["code"] == "invalid_parameter"
