"""Shared fixtures: a real Postgres test database, a real Redis, real worker processes.

The Postgres database is created per test session (and dropped after); Redis uses a dedicated
database number that is flushed first. Override the servers with SER_TEST_PG_ADMIN_URL and
SER_TEST_REDIS_URL.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa

from ser_shared.settings import REPO_ROOT, Settings

PG_ADMIN_URL = os.environ.get("SER_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("SER_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
DATASETS = Path(os.environ.get("SER_TEST_DATASETS", REPO_ROOT.parent / "shared" / "datasets"))
RAVDESS = DATASETS / "ravdess"


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a child process the same settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SER_")}
    values = {
        "SER_ENV": settings.env, "SER_DATA_DIR": str(settings.data_dir),
        "SER_DATABASE_URL": settings.database_url, "SER_BROKER_URL": settings.broker_url,
        "SER_STORAGE_DIR": str(settings.storage_dir) if settings.storage_dir else None,
        "SER_MODELS_DIR": str(settings.models_dir), "SER_CHUNK_SIZE": str(settings.chunk_size),
        "SER_WORKER_CONCURRENCY": str(settings.worker_concurrency),
        "SER_MAX_FILE_MB": str(settings.max_file_mb), "SER_MAX_DURATION_S": str(settings.max_duration_s),
        "SER_WEBHOOK_ALLOW": settings.webhook_allow, "SER_WEBHOOK_RETRY_BASE_S": str(settings.webhook_retry_base_s),
        "SER_WEBHOOK_TIMEOUT_S": str(settings.webhook_timeout_s), "SER_SECRET_KEY": settings.secret_key,
        "SER_TRANSCRIBE_TIMEOUT_S": str(settings.transcribe_timeout_s),
        "SER_TRANSCRIBE_S_PER_SPEECH_S": str(settings.transcribe_s_per_speech_s),
        "SER_STORAGE_URL": settings.storage_url, "SER_S3_ENDPOINT_URL": settings.s3_endpoint_url,
        "SER_ORPHAN_GRACE_S": str(settings.orphan_grace_s),
    }
    env.update({k: v for k, v in values.items() if v is not None})
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


@contextmanager
def new_database() -> Iterator[str]:
    """The URL of an empty Postgres database of a fresh name, dropped (connections and all) afterwards."""
    name = f"ser_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        try:
            yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
        finally:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    with new_database() as url:
        yield url


@contextmanager
def private_database(base: Settings, **changes: object) -> Iterator[Settings]:
    """``base`` on a migrated database of its own, dropped afterwards.

    For rows no other test may see or touch: the session's shared worker reconciles every job in
    the shared database (re-sends queued ones it cannot find in its broker, fails what it cannot
    decode), which would rewrite rows a test wrote by hand.
    """
    from ser_shared.migrate import upgrade

    with new_database() as url:
        settings = base.model_copy(update={"database_url": url, **changes})
        upgrade(settings)
        yield settings


@pytest.fixture(scope="session")
def redis_url() -> str:
    redis.Redis.from_url(REDIS_URL).flushdb()
    return REDIS_URL


@pytest.fixture(scope="session")
def pg_settings(pg_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Production-shaped settings (Postgres + Redis), migrated once per session."""
    from ser_shared.migrate import upgrade

    data = tmp_path_factory.mktemp("pgdata")
    # Webhooks: the tests' receivers listen on 127.0.0.1, and retries back off from 0.4 s, not 30 s.
    settings = Settings(env="test", database_url=pg_url, broker_url=redis_url, data_dir=data,
                        storage_dir=data / "uploads", chunk_size=4, worker_concurrency=1,
                        webhook_allow="127.0.0.1,localhost", webhook_retry_base_s=0.4, webhook_timeout_s=2.0,
                        secret_key="test-secret-key", transcribe_timeout_s=10.0)
    upgrade(settings)
    return settings


@pytest.fixture(scope="session")
def app(pg_settings: Settings):  # type: ignore[no-untyped-def]
    from web import create_app

    flask_app = create_app(pg_settings)
    flask_app.config["TESTING"] = True
    return flask_app


@pytest.fixture
def client(app):  # type: ignore[no-untyped-def]
    return app.test_client()


# Credentials for the S3 test server (moto accepts any); boto3 reads them from the environment,
# as it would real ones, and worker subprocesses inherit them.
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 HTTP server on this machine (moto's server mode), for the whole session."""
    from moto.server import ThreadedMotoServer

    for name, value in S3_ENV.items():
        os.environ.setdefault(name, value)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> tuple[Any, str]:
    """A fresh, empty bucket on the S3 server and a boto3 client to look into it."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    name = f"ser-test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return client, name


class WorkerProcess:
    """A real Celery worker in a subprocess, started through the `ser worker` command."""

    def __init__(self, settings: Settings, log_path: Path, extra_env: dict[str, str] | None = None) -> None:
        env = settings_env(settings) | (extra_env or {})
        self.log_path = log_path
        self.log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ser_cli", "worker", "--concurrency", "1"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)

    def wait_ready(self, timeout: float = 120) -> None:
        """Block until the worker consumes and its child has loaded the models."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            if "ready." in text and "models loaded" in text:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        raise RuntimeError(f"worker did not become ready:\n{self.log_path.read_text(errors='replace')[-3000:]}")

    def stop(self) -> None:
        from tests.helpers import stop_process

        stop_process(self.proc)
        self.log.close()


@pytest.fixture(scope="session")
def pg_worker(pg_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(pg_settings, tmp_path_factory.mktemp("logs") / "worker.log")
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.stop()


def ravdess_file(actor: int, emotion: str, intensity: str = "01", statement: str = "01",
                 rep: str = "01") -> Path:
    """A RAVDESS file by its name fields (emotion code as in the names: 01..08)."""
    path = RAVDESS / f"Actor_{actor:02d}" / f"03-01-{emotion}-{intensity}-{statement}-{rep}-{actor:02d}.flac"
    if not path.exists():
        raise FileNotFoundError(f"dataset file missing (is ../shared/datasets there?): {path}")
    return path


@pytest.fixture
def copy_to(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Copy dataset files into a temporary folder (never read or write the shared copy in place)."""

    def _copy(src: Path) -> Path:
        dst = tmp_path / src.name
        shutil.copy(src, dst)
        return dst

    return _copy


def wait_for(predicate, timeout: float = 90.0, interval: float = 0.5):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it returns a truthy value; fail with its last value."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met in {timeout} s; last value: {value!r}")


@pytest.fixture(scope="session")
def live_server(pg_settings: Settings):  # type: ignore[no-untyped-def]
    """The test app served on a free port of 127.0.0.1 (authentication off: one local tenant), for
    the client and browser tests.

    Without per-minute upload limits: the client tests upload many batches, and in single-user mode
    every test's uploads share the one local key's budget. (Limits are tested on apps of their own.)
    """
    from tests.live_server import serve
    from web import create_app

    unlimited = create_app(pg_settings.model_copy(update={"rate_limit_uploads_per_minute": 1_000_000,
                                                          "rate_limit_files_per_minute": 10_000_000}))
    with serve(unlimited) as url:
        yield url


@pytest.fixture(scope="session")
def auth_server_url(pg_settings: Settings) -> Iterator[str]:
    """The same database served with authentication on, once per session."""
    from tests.live_server import serve
    from web import create_app

    with serve(create_app(pg_settings.model_copy(update={"auth": True}))) as url:
        yield url


@pytest.fixture
def auth_server(auth_server_url: str, pg_settings: Settings) -> tuple[str, str]:
    """The authenticated server's URL and a fresh API key: a new tenant for each test, so what one
    test uploads is never in another's view."""
    from ser_shared import apikeys
    from ser_shared.db import make_engine, make_session_factory

    engine = make_engine(pg_settings)
    with make_session_factory(engine)() as session:
        key = apikeys.create(session, "live-server-tests").key
        session.commit()
    engine.dispose()
    return auth_server_url, key
