"""API behaviour against the real Postgres database: validation, listing, audio, delete, health."""

from __future__ import annotations

import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ser_shared import storage
from ser_shared.db import make_engine, make_session_factory
from ser_shared.models import Batch, Job
from ser_shared.settings import Settings
from tests.conftest import REPO_ROOT, ravdess_file, settings_env
from tests.helpers import csrf_token, multipart, read
from web import create_app


def _post(client, files, **fields):  # type: ignore[no-untyped-def]
    return client.post("/api/v1/jobs", data=multipart(files, **fields), content_type="multipart/form-data")


def _assert_error(resp, status: int, code: str) -> None:  # type: ignore[no-untyped-def]
    assert resp.status_code == status, resp.get_data(as_text=True)
    body = resp.get_json()
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"]


def test_upload_without_files_is_400(client) -> None:  # type: ignore[no-untyped-def]
    _assert_error(client.post("/api/v1/jobs", data={}, content_type="multipart/form-data"), 400, "no_files")


def test_unknown_option_is_400(client) -> None:  # type: ignore[no-untyped-def]
    _assert_error(_post(client, [read(ravdess_file(1, "03"))], device="tpu"), 400, "invalid_option")


def test_too_many_files_is_400(pg_settings: Settings) -> None:
    client = create_app(pg_settings.model_copy(update={"max_files_per_request": 2})).test_client()
    files = [(f"f{i}.wav", b"x") for i in range(3)]
    _assert_error(_post(client, files), 400, "too_many_files")


def test_oversized_request_is_413_json(pg_settings: Settings) -> None:
    client = create_app(pg_settings.model_copy(update={"max_request_mb": 0.01})).test_client()
    _assert_error(_post(client, [("big.wav", b"\0" * 50_000)]), 413, "request_too_large")


def test_per_file_limits_fail_only_that_file(pg_settings: Settings, tmp_path: Path) -> None:
    settings = pg_settings.model_copy(update={"max_file_mb": 0.05, "max_duration_s": 3.0})
    client = create_app(settings).test_client()
    short = read(ravdess_file(1, "01"))  # ~3.3 s: over the 3 s limit here
    big = ("big.flac", b"fLaC" + b"\0" * 60_000)
    resp = _post(client, [short, big])
    assert resp.status_code == 202
    codes = [j.get("error", {}).get("code") for j in resp.get_json()["jobs"]]
    assert codes == ["audio_too_long", "file_too_large"]
    assert not any(p.is_file() for p in settings.upload_dir.rglob("*.part"))


def test_unknown_and_malformed_ids_are_404(client) -> None:  # type: ignore[no-untyped-def]
    _assert_error(client.get(f"/api/v1/jobs/{uuid.uuid4()}"), 404, "not_found")
    _assert_error(client.get("/api/v1/jobs/not-a-uuid"), 404, "not_found")
    _assert_error(client.get(f"/api/v1/batches/{uuid.uuid4()}"), 404, "not_found")
    _assert_error(client.get("/api/v1/nothing-here"), 404, "not_found")


def test_audio_download_and_delete(client, pg_settings: Settings) -> None:  # type: ignore[no-untyped-def]
    name, content = read(ravdess_file(2, "04"))
    job = _post(client, [(name, content)]).get_json()["jobs"][0]
    audio = client.get(f"/api/v1/jobs/{job['id']}/audio")
    assert audio.status_code == 200 and audio.data == content and audio.mimetype == "audio/flac"
    partial = client.get(f"/api/v1/jobs/{job['id']}/audio", headers={"Range": "bytes=0-99"})
    assert partial.status_code == 206 and partial.data == content[:100]
    engine = make_engine(pg_settings)
    with make_session_factory(engine)() as session:
        found = session.get(Job, uuid.UUID(job["id"]))
        assert found is not None and found.storage_key
        path = storage.path_for(pg_settings.upload_dir, found.storage_key)
    engine.dispose()
    assert path.read_bytes() == content

    assert client.delete(f"/api/v1/jobs/{job['id']}").status_code == 204
    _assert_error(client.get(f"/api/v1/jobs/{job['id']}"), 404, "not_found")
    assert not path.exists()


@pytest.fixture
def listed_jobs(pg_settings: Settings) -> dict[str, object]:
    """Twelve jobs in a fresh batch with known statuses, emotions, names and times."""
    factory = make_session_factory(make_engine(pg_settings))
    batch = Batch(id=uuid.uuid4(), file_count=12, options={})
    base = datetime(2031, 1, 1, tzinfo=UTC)
    emotions = ["angry", "sad", "happy"]
    jobs = [
        Job(id=uuid.uuid4(), batch_id=batch.id, position=i, filename=f"call_{i:02d}{'_50%' if i == 5 else ''}.wav",
            status="succeeded" if i % 2 == 0 else "failed", emotion=emotions[i % 3] if i % 2 == 0 else None,
            confidence=0.5 if i % 2 == 0 else None, created_at=base + timedelta(minutes=i), options={},
            size_bytes=1, attempts=1)
        for i in range(12)
    ]
    with factory() as session:
        session.add(batch)
        session.add_all(jobs)
        session.commit()
    return {"batch": str(batch.id), "jobs": jobs, "base": base}


def _ids(client, query: str) -> list[str]:  # type: ignore[no-untyped-def]
    resp = client.get(f"/api/v1/jobs?{query}")
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return [j["id"] for j in resp.get_json()["jobs"]]


def test_listing_filters(client, listed_jobs) -> None:  # type: ignore[no-untyped-def]
    batch, jobs, base = listed_jobs["batch"], listed_jobs["jobs"], listed_jobs["base"]
    newest_first = [str(j.id) for j in reversed(jobs)]
    assert _ids(client, f"batch_id={batch}&limit=200") == newest_first
    failed = [str(j.id) for j in reversed(jobs) if j.status == "failed"]
    angry = [str(j.id) for j in reversed(jobs) if j.emotion == "angry"]
    assert _ids(client, f"batch_id={batch}&status=failed") == failed
    assert _ids(client, f"batch_id={batch}&emotion=angry") == angry
    assert _ids(client, f"batch_id={batch}&q=CALL_03") == [str(jobs[3].id)]
    assert _ids(client, f"batch_id={batch}&q=50%25") == [str(jobs[5].id)]  # % is literal, not a wildcard
    since = (base + timedelta(minutes=4)).isoformat()
    until = (base + timedelta(minutes=7)).isoformat()
    window = _ids(client, f"batch_id={batch}&since={since.replace('+', '%2B')}&until={until.replace('+', '%2B')}")
    assert window == [str(jobs[i].id) for i in (6, 5, 4)]


def test_cursor_pagination_visits_every_job_once(client, listed_jobs) -> None:  # type: ignore[no-untyped-def]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        query = f"batch_id={listed_jobs['batch']}&limit=5" + (f"&cursor={cursor}" if cursor else "")
        body = client.get(f"/api/v1/jobs?{query}").get_json()
        seen += [j["id"] for j in body["jobs"]]
        pages += 1
        cursor = body["next_cursor"]
        if not cursor:
            break
    assert pages == 3 and seen == [str(j.id) for j in reversed(listed_jobs["jobs"])]


@pytest.mark.parametrize("query", ["status=done", "emotion=bored", "limit=0", "limit=1000", "cursor=%%%",
                                   "since=yesterday", "batch_id=nope"])
def test_bad_list_parameters_are_400(client, query: str) -> None:  # type: ignore[no-untyped-def]
    _assert_error(client.get(f"/api/v1/jobs?{query}"), 400, "invalid_parameter")


def test_health_and_readiness(client, pg_settings: Settings) -> None:  # type: ignore[no-untyped-def]
    assert client.get("/healthz").get_json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["checks"] == {"database": "ok", "broker": "ok"}
    no_db = pg_settings.model_copy(update={"database_url": "postgresql+psycopg://postgres@127.0.0.1:1/none"})
    resp = create_app(no_db).test_client().get("/readyz")
    assert resp.status_code == 503 and resp.get_json()["checks"]["database"].startswith("unreachable")


def test_upload_with_database_down_is_503_and_leaves_no_files(pg_settings: Settings, tmp_path: Path) -> None:
    settings = pg_settings.model_copy(update={
        "database_url": "postgresql+psycopg://postgres@127.0.0.1:1/none", "storage_dir": tmp_path / "up"})
    client = create_app(settings).test_client()
    _assert_error(_post(client, [read(ravdess_file(1, "03"))]), 503, "database_unavailable")
    assert not [p for p in (tmp_path / "up").rglob("*") if p.is_file()]


def test_web_process_never_imports_tensorflow_or_librosa(pg_settings: Settings) -> None:
    code = ("import sys; from web import create_app; app = create_app(); c = app.test_client();"
            "assert c.get('/healthz').status_code == 200; c.get('/history');"
            "heavy = [m for m in ('tensorflow', 'keras', 'librosa', 'sklearn') if m in sys.modules];"
            "assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], env=settings_env(pg_settings), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_upload_page_creates_a_batch_and_redirects(client) -> None:  # type: ignore[no-untyped-def]
    assert 'type="file"' in client.get("/").get_data(as_text=True)
    resp = _post_page(client, [read(ravdess_file(12, "06")), ("x.wav", b"nope")])
    assert resp.status_code == 303 and "/batches/" in resp.headers["Location"]
    page = client.get(resp.headers["Location"]).get_data(as_text=True)
    assert "2 file(s)" in page and "unsupported_format" in page


def _post_page(client, files):  # type: ignore[no-untyped-def]
    data = multipart(files, csrf_token=csrf_token(client))
    return client.post("/upload", data=data, content_type="multipart/form-data")


def test_a_batch_answer_counts_the_jobs_it_lists(pg_settings: Settings) -> None:
    """A job that finishes between loading the batch and counting it must not make the answer
    contradict itself: the counts come from the rows listed (a second query saw the newer state)."""
    import redis
    from sqlalchemy import update

    from ser_shared.models import LOCAL_TENANT
    from tests.conftest import private_database
    from web import queries

    # A database of its own: the jobs it marks failed must not show in other tests' history.
    with private_database(pg_settings, default_queue="batch-counts-unread") as settings:
        resp = _post(create_app(settings).test_client(), [read(ravdess_file(2, "03")), read(ravdess_file(2, "04"))])
        assert resp.status_code == 202
        batch_id = resp.get_json()["batch_id"]
        engine = make_engine(settings)
        factory = make_session_factory(engine)
        with factory() as reader, factory() as writer:
            found = queries.get_batch(reader, batch_id, LOCAL_TENANT)
            writer.execute(update(Job).where(Job.batch_id == found.id).values(status="failed", error_code="x"))
            writer.commit()
            counts = queries.status_counts(found)
            assert counts["queued"] == sum(j.status == "queued" for j in found.jobs) == 2
            assert counts["failed"] == 0
        engine.dispose()
        redis.Redis.from_url(settings.broker_url or "").delete("batch-counts-unread")
