"""Access: API keys, tenant isolation (API, pages, exports, audio), page sign-in with CSRF,
per-tenant upload limits, and audio retention. Real Postgres and Redis throughout."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from ser_shared import apikeys, storage
from ser_shared.db import make_engine, make_session_factory
from ser_shared.models import ApiKey, Batch, Job, JobStatus, Result
from ser_shared.settings import REPO_ROOT, Settings
from tests.conftest import ravdess_file, settings_env
from tests.helpers import csrf_token, multipart, read
from worker.retention import purge_expired_audio


@pytest.fixture(scope="module")
def auth_settings(pg_settings: Settings) -> Settings:
    return pg_settings.model_copy(update={"auth": True})


@pytest.fixture(scope="module")
def auth_app(auth_settings: Settings):  # type: ignore[no-untyped-def]
    from web import create_app

    app = create_app(auth_settings)
    app.config["TESTING"] = True
    return app


@pytest.fixture(scope="module")
def sessions(auth_settings: Settings):  # type: ignore[no-untyped-def]
    engine = make_engine(auth_settings)
    yield make_session_factory(engine)
    engine.dispose()


def _new_key(sessions, name: str, tenant: str | None = None) -> apikeys.NewKey:  # type: ignore[no-untyped-def]
    with sessions() as session:
        new = apikeys.create(session, name, tenant)
        session.commit()
    return new


def _bearer(key: apikeys.NewKey) -> dict[str, str]:
    return {"Authorization": f"Bearer {key.key}"}


def _upload(client, key: apikeys.NewKey | None, name: str = "a.flac", **extra):  # type: ignore[no-untyped-def]
    body = read(ravdess_file(2, "05"))
    headers = {**(_bearer(key) if key else {}), **extra.pop("headers", {})}
    return client.post("/api/v1/jobs", data=multipart([(name, body[1])], **extra),
                       content_type="multipart/form-data", headers=headers)


def _sign_in(client, key: str, next_path: str = ""):  # type: ignore[no-untyped-def]
    token = csrf_token(client, "/login")
    return client.post("/login", data={"key": key, "csrf_token": token, "next": next_path})


def test_api_needs_a_live_key(auth_app, sessions) -> None:  # type: ignore[no-untyped-def]
    client = auth_app.test_client()
    for resp in (client.get("/api/v1/jobs"), _upload(client, None),
                 client.get("/api/v1/jobs", headers={"Authorization": "Bearer ser_not-a-key"})):
        assert resp.status_code == 401 and resp.get_json()["error"]["code"] == "unauthorized"
    assert client.get("/healthz").status_code == 200  # probes stay open
    key = _new_key(sessions, "reader")
    assert client.get("/api/v1/jobs", headers={"X-API-Key": key.key}).status_code == 200
    assert client.get("/api/v1/jobs", headers=_bearer(key)).status_code == 200
    with sessions() as session:
        row = session.get(ApiKey, key.id)
        assert row is not None and row.key_hash == apikeys.digest(key.key) and key.key not in row.key_hash
        assert row.last_used_at is not None
        apikeys.revoke(session, str(key.id))
        session.commit()
    assert client.get("/api/v1/jobs", headers=_bearer(key)).status_code == 401


def test_tenants_see_only_their_own_jobs(auth_app, sessions) -> None:  # type: ignore[no-untyped-def]
    client = auth_app.test_client()
    alice, bob = _new_key(sessions, "alice"), _new_key(sessions, "bob")
    alice_again = _new_key(sessions, "alice-2", tenant=alice.tenant)
    marker = f"alice-{uuid.uuid4().hex[:8]}.flac"
    idem = {"Idempotency-Key": f"same-{uuid.uuid4()}"}
    made = _upload(client, alice, marker, headers=idem)
    assert made.status_code == 202
    job_id, batch_id = made.get_json()["jobs"][0]["id"], made.get_json()["batch_id"]

    # Another key of the same tenant sees it; bob gets 404 everywhere, exactly as for a missing id.
    assert client.get(f"/api/v1/jobs/{job_id}", headers=_bearer(alice_again)).status_code == 200
    for path in (f"/api/v1/jobs/{job_id}", f"/api/v1/jobs/{job_id}/audio", f"/api/v1/batches/{batch_id}"):
        resp = client.get(path, headers=_bearer(bob))
        assert resp.status_code == 404 and resp.get_json()["error"]["code"] == "not_found", path
    assert client.delete(f"/api/v1/jobs/{job_id}", headers=_bearer(bob)).status_code == 404
    assert client.get(f"/api/v1/jobs/{job_id}/audio", headers=_bearer(alice)).status_code == 200
    listed = client.get("/api/v1/jobs?limit=200", headers=_bearer(bob)).get_json()["jobs"]
    assert all(j["filename"] != marker for j in listed)
    assert marker in {j["filename"] for j in client.get("/api/v1/jobs", headers=_bearer(alice)).get_json()["jobs"]}
    exported = client.get("/api/v1/export?format=csv", headers=_bearer(bob)).get_data(as_text=True)
    assert marker not in exported and job_id not in exported
    assert marker in client.get("/api/v1/export?format=json", headers=_bearer(alice)).get_data(as_text=True)
    # Bob's request with alice's idempotency key is his own: a new batch, not her replayed response.
    bobs = _upload(client, bob, "bob.flac", headers=idem)
    assert bobs.status_code == 202 and "Idempotent-Replayed" not in bobs.headers
    assert bobs.get_json()["batch_id"] != batch_id

    # The pages, signed in as bob: same 404s, and the history has none of alice's rows.
    pages = auth_app.test_client()
    assert _sign_in(pages, bob.key).status_code == 303
    assert pages.get(f"/jobs/{job_id}").status_code == 404
    assert pages.get(f"/batches/{batch_id}").status_code == 404
    assert marker not in pages.get("/history").get_data(as_text=True)
    assert pages.get(f"/api/v1/jobs/{job_id}/audio").status_code == 404  # the cookie reaches the API too
    assert _sign_in(pages, alice.key).status_code == 303
    assert marker in pages.get("/history").get_data(as_text=True)
    assert pages.get(f"/jobs/{job_id}").status_code == 200


def test_page_sign_in_session_cookie_and_csrf(auth_app, sessions) -> None:  # type: ignore[no-untyped-def]
    client = auth_app.test_client()
    resp = client.get("/history?status=queued")
    assert resp.status_code == 302 and "/login?next=" in resp.headers["Location"]
    key = _new_key(sessions, "browser")
    # Sign-in itself needs the token the login page issued (no login CSRF).
    assert client.post("/login", data={"key": key.key}).status_code == 403
    assert _sign_in(client, "ser_wrong").status_code == 401
    signed = _sign_in(client, key.key, "/history?status=queued")
    assert signed.status_code == 303 and signed.headers["Location"].endswith("/history?status=queued")
    cookie = signed.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and cookie.startswith("ser_session=")
    page = client.get("/history").get_data(as_text=True)
    assert "signed in: browser" in page
    # Forms: no token → 403; with the token the upload goes through.
    body = read(ravdess_file(3, "05"))
    no_token = client.post("/upload", data=multipart([body]), content_type="multipart/form-data")
    assert no_token.status_code == 403
    token = csrf_token(client, "/")
    ok = client.post("/upload", data=multipart([body], csrf_token=token), content_type="multipart/form-data")
    assert ok.status_code == 303
    # Scripts riding on the cookie send the header; without it a DELETE is refused.
    job_id = client.get("/api/v1/jobs?limit=1").get_json()["jobs"][0]["id"]
    assert client.delete(f"/api/v1/jobs/{job_id}").status_code == 403
    assert client.delete(f"/api/v1/jobs/{job_id}", headers={"X-CSRF-Token": token}).status_code == 204
    # No open redirect through ?next=.
    other = auth_app.test_client()
    assert _sign_in(other, key.key, "//evil.example/x").headers["Location"].endswith("/history")
    # Revoking the key ends its sessions on their next request.
    with sessions() as session:
        apikeys.revoke(session, key.key[:apikeys.SHOWN_PREFIX])
        session.commit()
    assert client.get("/history").status_code == 302
    assert client.post("/logout", data={"csrf_token": token}).status_code in (302, 303, 403)


def test_single_user_mode_needs_no_key_but_forms_need_csrf(client) -> None:  # type: ignore[no-untyped-def]
    page = client.get("/").get_data(as_text=True)
    assert "single-user mode" in page
    assert client.get("/api/v1/jobs").status_code == 200
    resp = client.post("/upload", data=multipart([read(ravdess_file(3, "05"))]), content_type="multipart/form-data")
    assert resp.status_code == 403


@pytest.mark.parametrize(("headers", "status"), [
    ({}, 202),  # a script or the CLI: no browser headers
    ({"Origin": "http://localhost"}, 202),  # the service's own pages (the test client's host)
    ({"Sec-Fetch-Site": "same-origin"}, 202),
    ({"Origin": "https://evil.example"}, 403),  # another site's form POST
    ({"Origin": "null"}, 403),  # a sandboxed frame or a data: page
    ({"Sec-Fetch-Site": "cross-site"}, 403),
    ({"Sec-Fetch-Site": "same-site"}, 403),  # another port of localhost is another program
])
def test_single_user_api_refuses_writes_from_other_sites(client, headers: dict[str, str],  # type: ignore[no-untyped-def]
                                                         status: int) -> None:
    """Without keys, a page on any site could POST a form to a local service's API: browsers say where
    a request comes from, and a write from elsewhere is refused."""
    resp = client.post("/api/v1/jobs", data=multipart([read(ravdess_file(3, "05"))]),
                       content_type="multipart/form-data", headers=headers)
    assert resp.status_code == status, resp.get_data(as_text=True)
    if status == 403:
        assert resp.get_json()["error"]["code"] == "csrf_failed"
        assert client.delete("/api/v1/jobs/00000000-0000-0000-0000-000000000000", headers=headers).status_code == 403


def _limited_app(pg_settings: Settings, **limits: int):  # type: ignore[no-untyped-def]
    from web import create_app

    app = create_app(pg_settings.model_copy(update={"auth": True, **limits}))
    app.config["TESTING"] = True
    return app


def test_upload_rate_limit_answers_429_with_retry_after(pg_settings, sessions) -> None:  # type: ignore[no-untyped-def]
    client = _limited_app(pg_settings, rate_limit_uploads_per_minute=2).test_client()
    key, other = _new_key(sessions, "burst"), _new_key(sessions, "calm")
    sibling = _new_key(sessions, "colleague", tenant=key.tenant)
    assert [_upload(client, key).status_code for _ in range(2)] == [202, 202]
    refused = _upload(client, key)
    assert refused.status_code == 429 and refused.get_json()["error"]["code"] == "rate_limited"
    assert "per API key" in refused.get_json()["error"]["message"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    # Per key: another tenant, and another key of the same tenant, upload as usual.
    assert _upload(client, other).status_code == 202
    assert _upload(client, sibling).status_code == 202
    # The page upload counts against the signed-in key too, and is refused before its body is read.
    page = _limited_app(pg_settings, rate_limit_uploads_per_minute=2).test_client()
    _sign_in(page, key.key)
    form = multipart([read(ravdess_file(3, "05"))], csrf_token=csrf_token(page, "/"))
    assert page.post("/upload", data=form, content_type="multipart/form-data").status_code == 429


def test_files_per_minute_limit(pg_settings, sessions) -> None:  # type: ignore[no-untyped-def]
    client = _limited_app(pg_settings, rate_limit_files_per_minute=3).test_client()
    key = _new_key(sessions, "files")
    body = read(ravdess_file(2, "05"))[1]
    two = [("a.flac", body), ("b.flac", body)]
    first = client.post("/api/v1/jobs", data=multipart(two), content_type="multipart/form-data", headers=_bearer(key))
    assert first.status_code == 202
    again = client.post("/api/v1/jobs", data=multipart(two), content_type="multipart/form-data", headers=_bearer(key))
    assert again.status_code == 429 and "Retry-After" in again.headers


def test_queued_job_cap(pg_settings, sessions) -> None:  # type: ignore[no-untyped-def]
    client = _limited_app(pg_settings, max_queued_jobs=5).test_client()
    key = _new_key(sessions, "backlog")
    sibling = _new_key(sessions, "colleague", tenant=key.tenant)
    # A backlog of five jobs waiting for this key (rows as an earlier upload leaves them).
    with sessions() as session:
        batch = Batch(id=uuid.uuid4(), tenant=key.tenant, api_key_id=key.id, file_count=5, options={})
        session.add(batch)
        session.add_all(Job(id=uuid.uuid4(), batch_id=batch.id, tenant=key.tenant, api_key_id=key.id, position=i,
                            filename=f"{i}.wav", status=JobStatus.QUEUED.value, options={}) for i in range(5))
        session.commit()
    refused = _upload(client, key)
    assert refused.status_code == 429 and refused.get_json()["error"]["code"] == "too_many_queued_jobs"
    assert int(refused.headers["Retry-After"]) >= 1
    assert _upload(client, sibling).status_code == 202  # the cap is the key's, not the tenant's
    with sessions() as session:
        session.execute(sa.update(Job).where(Job.batch_id == batch.id).values(status=JobStatus.FAILED.value))
        session.commit()
    assert _upload(client, key).status_code == 202


def test_retention_deletes_audio_and_keeps_results(pg_settings, client, sessions) -> None:  # type: ignore[no-untyped-def]
    # A job the worker finished 40 days ago, with its audio in storage (rows written directly, so no
    # running worker can race this test for it).
    with ravdess_file(2, "05").open("rb") as fh:
        stored = storage.save_stream(pg_settings.upload_dir, fh, 1 << 30)
    path = storage.path_for(pg_settings.upload_dir, stored.key)
    job_id = uuid.uuid4()
    with sessions() as session:
        batch = Batch(id=uuid.uuid4(), file_count=1, options={})
        session.add(batch)
        session.add(Job(id=job_id, batch_id=batch.id, filename="keep-results.flac", storage_key=stored.key,
                        format="flac", options={}, status=JobStatus.SUCCEEDED.value, emotion="sad", confidence=0.7,
                        finished_at=datetime.now(UTC) - timedelta(days=40)))
        session.flush()
        session.add(Result(job_id=job_id, emotion="sad", confidence=0.7, uncertain=False,
                           probabilities={"sad": 0.7}, model_probabilities={}, model_versions={}, timings_ms={}))
        session.commit()
    assert path.exists()
    kept = pg_settings.model_copy(update={"audio_retention_days": 0})
    assert purge_expired_audio(sessions, kept) == 0 and path.exists()  # 0 keeps audio forever
    assert purge_expired_audio(sessions, pg_settings.model_copy(update={"audio_retention_days": 30})) >= 1
    assert not path.exists()
    resp = client.get(f"/api/v1/jobs/{job_id}/audio")
    assert resp.status_code == 410 and resp.get_json()["error"]["code"] == "audio_deleted"
    body = client.get(f"/api/v1/jobs/{job_id}").get_json()
    assert body["result"]["emotion"] == "sad" and body["audio_url"] is None and body["audio_deleted_at"]


def test_deleting_a_job_removes_its_audio_from_disk(pg_settings, client, sessions) -> None:  # type: ignore[no-untyped-def]
    job_id = _upload(client, None, "to-delete.flac").get_json()["jobs"][0]["id"]
    with sessions() as session:
        key = session.scalar(sa.select(Job.storage_key).where(Job.id == uuid.UUID(job_id)))
    assert key
    path = storage.path_for(pg_settings.upload_dir, key)
    assert path.exists()
    assert client.delete(f"/api/v1/jobs/{job_id}").status_code == 204
    assert not path.exists()
    assert client.get(f"/api/v1/jobs/{job_id}").status_code == 404


def _ser(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ser_cli", *args], env=settings_env(settings),
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)


def test_keys_command_creates_lists_and_revokes(pg_settings: Settings, auth_app) -> None:  # type: ignore[no-untyped-def]
    made = _ser(pg_settings, "keys", "create", "--name", "cli-key", "--json")
    assert made.returncode == 0, made.stderr
    new = json.loads(made.stdout.splitlines()[0])
    assert new["key"].startswith("ser_") and new["tenant"].startswith("t_")
    client = auth_app.test_client()
    assert client.get("/api/v1/jobs", headers={"Authorization": f"Bearer {new['key']}"}).status_code == 200
    listed = _ser(pg_settings, "keys", "list", "--json")
    rows = json.loads(listed.stdout)
    assert any(r["id"] == new["id"] and r["revoked_at"] is None for r in rows)
    assert new["key"] not in listed.stdout  # only the prefix is ever shown again
    joined = _ser(pg_settings, "keys", "create", "--name", "second", "--tenant", new["tenant"], "--json")
    assert json.loads(joined.stdout.splitlines()[0])["tenant"] == new["tenant"]
    assert _ser(pg_settings, "keys", "revoke", new["id"]).returncode == 0
    assert client.get("/api/v1/jobs", headers={"Authorization": f"Bearer {new['key']}"}).status_code == 401
    assert _ser(pg_settings, "keys", "revoke", "nope").returncode == 2


def test_serve_refuses_a_public_address_without_auth(tmp_path: Path) -> None:
    env = settings_env(Settings(data_dir=tmp_path))
    done = subprocess.run([sys.executable, "-m", "ser_cli", "serve", "--host", "0.0.0.0", "--port", "1"],
                          env=env, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert done.returncode == 2 and "without authentication" in done.stderr


def test_export_is_csv_per_tenant(auth_app, sessions) -> None:  # type: ignore[no-untyped-def]
    client = auth_app.test_client()
    key = _new_key(sessions, "exporter")
    for name in ("one.flac", "two.flac"):
        assert _upload(client, key, name).status_code == 202
    rows = list(csv.DictReader(io.StringIO(client.get("/api/v1/export", headers=_bearer(key)).get_data(as_text=True))))
    assert sorted(r["filename"] for r in rows) == ["one.flac", "two.flac"]
    assert all(re.fullmatch(r"[0-9a-f-]{36}", r["job_id"]) for r in rows)
