"""The Python SDK (``client/``, the ``ser-client`` distribution) against a real server and worker.

Paging, retries (through a proxy that injects 429s, 503s and lost answers), typed results, the
async client, errors as classes; and that the client installs and imports without the server.
"""

from __future__ import annotations

import asyncio
import csv
import importlib.metadata
import io
import json
import random
import re
import shutil
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import ser_client
from ser_client import (
    APIConnectionError,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Batch,
    Client,
    ConflictError,
    InternalServerError,
    Job,
    NotFoundError,
    RateLimitError,
    Result,
    RetryEvent,
    RetryPolicy,
    Segment,
    SERError,
    UploadAccepted,
    WaitTimeoutError,
)
from ser_client._http import parse_retry_after
from ser_client.errors import APIStatusError, status_error

from ser_shared.emotions import EMOTIONS
from ser_shared.settings import REPO_ROOT
from tests.conftest import WorkerProcess, ravdess_file
from tests.live_server import FlakyProxy, free_port

# A file the server refuses at upload (it cannot be decoded): a failed job at once, no work for the worker.
BROKEN_WAV = b"RIFF\x24\x00\x00\x00WAVE" + b"this is not a wave header" * 4
SERVER_PACKAGES = ("flask", "werkzeug", "celery", "kombu", "sqlalchemy", "alembic", "psycopg", "redis",
                   "tensorflow", "numpy", "ser_shared", "web", "worker")


T = TypeVar("T")


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` in a thread of its own: the browser tests' Playwright (sync API) keeps an
    event loop running in the main thread for the session, where ``asyncio.run`` refuses to start."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()



def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


# ---- the distribution ----------------------------------------------------------------------


def test_client_declares_no_server_dependency() -> None:
    declared = tomllib.loads((REPO_ROOT / "client" / "pyproject.toml").read_text())["project"]["dependencies"]
    installed = importlib.metadata.requires("ser-client") or []
    assert sorted(map(_name, declared)) == sorted(map(_name, installed)) == ["httpx", "pydantic", "tqdm"]
    server = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert not any(p.startswith("ser_client") or p.startswith("client")
                   for p in server["tool"]["setuptools"]["packages"]["find"]["include"])


def test_client_imports_and_runs_with_the_server_packages_blocked(tmp_path: Path) -> None:
    # Any import of a server package fails in the child: the client must never need one.
    program = f"""
import importlib.abc, sys
BLOCKED = {SERVER_PACKAGES!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("blocked server package: " + name)
sys.meta_path.insert(0, Block())
import ser_client, ser_client.cli
from ser_client import AsyncClient, Client
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not loaded, loaded
sys.argv = ["ser-client", "submit", "--help"]
ser_client.cli.main()
"""
    proc = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "usage: ser-client submit" in proc.stdout and "exit status:" in proc.stdout
    script = subprocess.run([str(Path(sys.executable).with_name("ser-client")), "--help"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert script.returncode == 0 and "{submit,status,history}" in script.stdout


def test_client_emotions_are_the_servers() -> None:
    assert ser_client.types.EMOTIONS == EMOTIONS


def test_typed_job_has_every_field_of_the_openapi_job() -> None:
    from web.openapi import document

    schemas = document()["components"]["schemas"]
    for model, name in ((Job, "Job"), (Result, "Result"), (Segment, "Segment"), (Batch, "Batch"),
                        (UploadAccepted, "UploadAccepted")):
        assert set(schemas[name]["properties"]) <= set(model.model_fields), name


# ---- the retry policy ----------------------------------------------------------------------


def _status(status: int, code: str = "x", retry_after: float | None = None) -> APIStatusError:
    return status_error(status, code, "message", retry_after=retry_after)


def test_retry_policy_retries_what_can_pass_and_nothing_else() -> None:
    policy = RetryPolicy(max_retries=3)
    for status in (408, 429, 500, 502, 503, 504):
        assert policy.delay(_status(status), 0) is not None, status
    assert policy.delay(_status(409, "idempotency_key_in_progress"), 0) is not None
    assert policy.delay(APIConnectionError("refused"), 0) is not None
    for status in (400, 401, 403, 404, 405, 410, 413, 415, 422):
        assert policy.delay(_status(status), 0) is None, status
    assert policy.delay(_status(409, "idempotency_key_reused"), 0) is None
    assert policy.delay(APIConnectionError("no http:// in the URL", transient=False), 0) is None
    assert policy.delay(_status(503), 3) is None  # the retries are spent


def test_retry_policy_honours_retry_after_and_otherwise_jitters_fully() -> None:
    policy = RetryPolicy(max_retries=10, base_delay_s=0.5, max_delay_s=8.0, max_retry_after_s=300)
    assert policy.delay(_status(429, retry_after=7.0), 0) == 7.0
    assert policy.delay(_status(503, retry_after=0.0), 5) == 0.0
    assert policy.delay(_status(429, retry_after=301.0), 0) is None  # not going to recover within the call
    random.seed(18)
    for attempt, cap in ((0, 0.5), (2, 2.0), (6, 8.0)):
        delays = [policy.delay(_status(502), attempt) for _ in range(400)]
        assert all(d is not None and 0.0 <= d <= cap for d in delays)
        # Full jitter: spread over the whole range, not bunched at the cap.
        assert min(d for d in delays if d is not None) < cap * 0.1 and max(d for d in delays if d) > cap * 0.9


def test_retry_after_reads_seconds_dates_and_milliseconds() -> None:
    assert parse_retry_after(httpx.Headers({"Retry-After": "3"})) == 3.0
    assert parse_retry_after(httpx.Headers({"retry-after-ms": "1500", "Retry-After": "9"})) == 1.5
    assert parse_retry_after(httpx.Headers({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})) == 0.0
    assert parse_retry_after(httpx.Headers({"Retry-After": "soon"})) is None
    assert parse_retry_after(httpx.Headers()) is None


# ---- against a live server -----------------------------------------------------------------


@pytest.fixture(scope="module")
def server(live_server: str, pg_worker: WorkerProcess) -> str:
    """The session's live server, with the session's real worker running."""
    return live_server


def _broken(prefix: str, n: int) -> list[tuple[str, bytes]]:
    return [(f"{prefix}/broken-{k}.wav", BROKEN_WAV) for k in range(n)]


@pytest.mark.slow
def test_auto_paging_follows_the_cursor_over_every_page(live_server: str) -> None:
    prefix = f"paging_{uuid.uuid4().hex[:8]}"
    with Client(live_server) as client:
        created = client.jobs.create(_broken(prefix, 5))
        pager = client.jobs.list(q=prefix, page_size=2)
        pages = list(pager.pages())
        walked = list(pager)
        whole = client.jobs.page(q=prefix, page_size=200)
    assert [len(p.jobs) for p in pages] == [2, 2, 1] and pages[-1].next_cursor is None
    assert all(isinstance(j, Job) for j in walked)
    assert [j.id for j in walked] == [j.id for j in whole.jobs]  # the same jobs in the same order as one page
    assert sorted(j.id for j in walked) == sorted(j.id for j in created.jobs)

    async def walk() -> list[str]:
        async with AsyncClient(live_server) as client:
            return [job.id async for job in client.jobs.list(q=prefix, page_size=2)]

    assert run_async(walk()) == [j.id for j in walked]


@pytest.mark.slow
def test_upload_wait_and_typed_results(server: str, tmp_path: Path) -> None:
    prefix = f"typed_{uuid.uuid4().hex[:8]}"
    angry = shutil.copy(ravdess_file(1, "05", "02"), tmp_path / "angry.flac")
    happy = ravdess_file(2, "03", "02").read_bytes()
    sad = io.BytesIO(ravdess_file(3, "04", "02").read_bytes())
    progress: list[tuple[int, int | None]] = []
    with Client(server) as client:
        # A path, (name, bytes) and (name, open file): every form streams in one multipart body.
        answer = client.jobs.create([(f"{prefix}/angry.flac", angry), (f"{prefix}/happy.flac", happy),
                                     (f"{prefix}/sad.flac", sad)],
                                    client_reference="sdk-test", metadata={"case": prefix},
                                    on_progress=lambda sent, total: progress.append((sent, total)))
        jobs = client.jobs.wait([j.id for j in answer.jobs], timeout=300)
        full = client.jobs.get(jobs[0].id)
        batch = client.batches.get(answer.batch_id)
        raw = httpx.get(f"{server}/api/v1/jobs/{jobs[0].id}").json()
        csv_path = tmp_path / "export.csv"
        written = client.export(csv_path, batch_id=answer.batch_id)
        as_json = io.BytesIO()
        client.export(as_json, format="json", batch_id=answer.batch_id)
    total = Path(angry).stat().st_size + len(happy) + len(sad.getvalue())
    assert progress[0] == (0, total) and progress[-1] == (total, total)
    assert isinstance(answer, UploadAccepted) and [j.filename for j in answer.jobs] == [
        f"{prefix}/angry.flac", f"{prefix}/happy.flac", f"{prefix}/sad.flac"]
    assert [j.id for j in jobs] == [j.id for j in answer.jobs]  # in the order given
    for job in jobs:
        assert job.status == "succeeded" and job.finished and isinstance(job.result, Result)
        assert job.result.emotion in EMOTIONS and job.client_reference == "sdk-test"
        assert sum(job.result.probabilities.values()) == pytest.approx(1.0, abs=1e-3)
        assert isinstance(job.created_at, datetime) and job.created_at.tzinfo is not None
        assert job.metadata == {"case": prefix}
    assert full.result is not None and full.result.segments and isinstance(full.result.segments[0], Segment)
    assert all(s.start < s.end and s.emotion in EMOTIONS for s in full.result.segments)
    assert full.to_dict() == raw  # the JSON as the server sent it
    assert isinstance(batch, Batch) and batch.done and batch.counts.get("succeeded") == 3
    assert {j.id for j in batch.jobs} == {j.id for j in jobs} and all(isinstance(j, Job) for j in batch.jobs)
    rows = list(csv.DictReader(csv_path.read_text().splitlines()))
    assert written == csv_path.stat().st_size and sorted(r["job_id"] for r in rows) == sorted(j.id for j in jobs)
    assert sorted(r["job_id"] for r in json.loads(as_json.getvalue())) == sorted(j.id for j in jobs)


@pytest.mark.slow
def test_async_client_uploads_and_waits(server: str, tmp_path: Path) -> None:
    name = f"async_{uuid.uuid4().hex[:8]}.flac"
    path = shutil.copy(ravdess_file(4, "03", "02"), tmp_path / name)

    async def run() -> tuple[UploadAccepted, list[Job], Job]:
        async with AsyncClient(server) as client:
            answer = await client.jobs.create([path])
            jobs = await client.jobs.wait([answer.jobs[0].id], timeout=300)
            return answer, jobs, await client.jobs.get(answer.jobs[0].id)

    answer, [job], full = run_async(run())
    assert answer.jobs[0].filename == name and job.id == answer.jobs[0].id
    assert job.status == "succeeded" and job.result is not None and job.result.emotion in EMOTIONS
    assert full.result is not None and full.result.segments


@pytest.mark.slow
def test_rate_limit_and_server_error_are_retried(live_server: str) -> None:
    proxy = FlakyProxy(live_server, [("GET", "429"), ("GET", "503")])
    events: list[RetryEvent] = []
    try:
        with Client(proxy.url, max_retries=3, on_retry=events.append) as client:
            started = time.monotonic()
            page = client.jobs.page(page_size=1)
            elapsed = time.monotonic() - started
    finally:
        proxy.stop()
    assert page.jobs is not None
    assert [(m, f) for m, _, f in proxy.log] == [("GET", "429"), ("GET", "503"), ("GET", None)]
    assert [type(e.error) for e in events] == [RateLimitError, InternalServerError]
    assert events[0].delay_s == 1.0 and elapsed >= 1.0  # the 429's Retry-After, honoured
    assert 0.0 <= events[1].delay_s <= 1.0  # backoff for retry 2: full jitter up to 0.5 * 2**1
    assert [e.attempt for e in events] == [1, 2] and events[1].error.code == "database_unavailable"


@pytest.mark.slow
def test_lost_upload_answer_is_retried_with_the_same_idempotency_key(live_server: str) -> None:
    prefix = f"lost_{uuid.uuid4().hex[:8]}"
    proxy = FlakyProxy(live_server, [("POST", "drop")])
    events: list[RetryEvent] = []
    try:
        with Client(proxy.url, on_retry=events.append) as client:
            answer = client.jobs.create(_broken(prefix, 2))
            mine = f"my-key-{uuid.uuid4().hex}"
            again = client.jobs.create(_broken(prefix, 2), idempotency_key=mine)
            replay = client.jobs.create(_broken(prefix, 2), idempotency_key=mine)
    finally:
        proxy.stop()
    posts = [h for (m, _, _), h in zip(proxy.log, proxy.headers, strict=True) if m == "POST"]
    keys = [h["Idempotency-Key"] for h in posts]
    assert [f for m, _, f in proxy.log if m == "POST"] == ["drop", None, None, None]
    assert keys[0] == keys[1] and keys[0].startswith("ser-sdk-") and keys[2] == keys[3] == mine
    assert len(events) == 1 and isinstance(events[0].error, APIConnectionError)
    # The first POST created the batch and its answer was lost; the retry got it back, not a new one.
    listed = list(Client(live_server).jobs.list(q=prefix))
    assert len(listed) == 4
    assert {j.id for j in answer.jobs} | {j.id for j in again.jobs} == {j.id for j in listed}
    assert replay.batch_id == again.batch_id


@pytest.mark.slow
def test_errors_are_classes_with_status_and_code(live_server: str, auth_server: tuple[str, str]) -> None:
    events: list[RetryEvent] = []
    with Client(live_server, on_retry=events.append) as client:
        with pytest.raises(NotFoundError) as missing:
            client.jobs.get(str(uuid.uuid4()))
        with pytest.raises(BadRequestError) as bad:
            client.jobs.page(status="bogus")
        created = client.jobs.create(_broken(f"errors_{uuid.uuid4().hex[:8]}", 1), idempotency_key="errors-key-"
                                     + uuid.uuid4().hex)
        client.jobs.delete(created.jobs[0].id)
        with pytest.raises(NotFoundError):
            client.jobs.get(created.jobs[0].id)
        with pytest.raises(NotFoundError):
            client.jobs.wait([created.jobs[0].id])
        key = "reused-" + uuid.uuid4().hex
        client.jobs.create(_broken("reused", 1), idempotency_key=key)
        with pytest.raises(ConflictError) as reused:
            client.jobs.create(_broken("reused-other", 1), idempotency_key=key)
    assert (missing.value.status, missing.value.code) == (404, "not_found")
    assert (bad.value.status, bad.value.code) == (400, "invalid_parameter") and "status" in bad.value.message
    assert (reused.value.status, reused.value.code) == (409, "idempotency_key_reused")
    assert events == []  # none of these is worth a retry
    url, key = auth_server
    with pytest.raises(AuthenticationError) as anonymous:
        Client(url, api_key="").jobs.page()
    assert anonymous.value.status == 401 and isinstance(anonymous.value, SERError)
    with pytest.raises(AuthenticationError):
        Client(url, api_key="ser_not-a-real-key").jobs.page()
    assert Client(url, api_key=key).jobs.page().jobs == []  # a new key is a new tenant
    down = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(APIConnectionError) as refused:
        Client(down, max_retries=0).jobs.page()
    assert str(refused.value) == f"cannot reach the SER server at {down} (connection refused)"
    assert refused.value.status is None


@pytest.mark.slow
def test_wait_timeout_carries_the_jobs_known(server: str, tmp_path: Path) -> None:
    path = shutil.copy(ravdess_file(5, "02", "01"), tmp_path / f"wait_{uuid.uuid4().hex[:8]}.flac")
    with Client(server) as client:
        answer = client.jobs.create([path], transcribe="sphinx")
        # A transcript takes the worker over a second, so the job cannot be finished at the first poll.
        with pytest.raises(WaitTimeoutError) as late:
            client.jobs.wait([answer.jobs[0].id], timeout=0)
    [job] = late.value.jobs
    assert job.id == answer.jobs[0].id and not job.finished
