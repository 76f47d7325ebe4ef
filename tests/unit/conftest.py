"""The unit tier: no services, everything in this process.

The web app and the worker are built by their factories on settings of the tests' own: a SQLite
database and kombu's filesystem broker under a temporary folder (the embedded default of
``ser serve``, a real cross-process queue). The worker runs in a thread of the test process
(``celery.contrib.testing.worker``) and consumes what the web app sent through that folder; no
task runs eagerly. The models are loaded once per session and shared by every worker app.

These tests never reach Postgres or Redis: asking for a fixture of the root conftest that does
fails the test before it connects (``pytest_runtest_setup``), and the settings are built with
explicit embedded URLs, whatever the environment says.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker
from flask import Flask
from flask.testing import FlaskClient

from ser_ml.inference import Ensemble
from ser_shared.settings import REPO_ROOT, Settings

# Root-conftest fixtures that reach a service (Postgres, Redis, a subprocess worker, a live server).
SERVICE_FIXTURES = frozenset({"pg_url", "pg_settings", "redis_url", "pg_worker", "live_server", "auth_server",
                              "auth_server_url"})


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Fail a unit test that asks for a service, before any fixture is set up (a session-scoped
    fixture would otherwise connect first)."""
    wanted = SERVICE_FIXTURES & set(getattr(item, "fixturenames", ()))
    if wanted:
        pytest.fail(f"unit tests use no services; {item.nodeid} asks for {sorted(wanted)}: "
                    "move it out of tests/unit", pytrace=False)


def embedded_settings(data_dir: Path, **changes: Any) -> Settings:
    """Settings on a SQLite database and a filesystem broker under ``data_dir``, migrated.

    The URLs are given explicitly (None: embedded), so a developer's SER_DATABASE_URL or
    SER_BROKER_URL can never point a unit test at a server.
    """
    from ser_shared.migrate import upgrade

    settings = Settings(env="test", data_dir=data_dir, database_url=None, broker_url=None, storage_dir=None,
                        models_dir=REPO_ROOT / "models", secret_key="unit-test-secret", chunk_size=4,
                        worker_concurrency=1, **changes)
    assert settings.db_url.startswith("sqlite:") and settings.queue_url == "filesystem://localhost/"
    upgrade(settings)
    return settings


@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return embedded_settings(tmp_path_factory.mktemp("unit-data"))


@pytest.fixture(scope="session")
def models() -> Ensemble:
    """The served models, loaded once for the session (TensorFlow makes this the lane's main cost)."""
    return Ensemble.load(REPO_ROOT / "models")


def unit_worker(settings: Settings, models: Ensemble) -> Celery:
    """``create_worker(settings)`` sharing the session's models, polling its queue folder every 0.1 s
    (kombu's default is 1 s: a second of idle waiting per job, nothing else changes)."""
    from worker.celery_app import create_worker

    worker = create_worker(settings, models=models)
    worker.conf.broker_transport_options = {**worker.conf.broker_transport_options, "polling_interval": 0.1}
    return worker


@pytest.fixture(scope="session")
def worker_app(settings: Settings, models: Ensemble) -> Celery:
    return unit_worker(settings, models)


@pytest.fixture(scope="session")
def app(settings: Settings) -> Flask:
    """The web app on the unit settings (shadows the root conftest's Postgres-backed ``app``)."""
    from web import create_app

    flask_app = create_app(settings)
    flask_app.config["TESTING"] = True
    return flask_app


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@contextmanager
def running(worker: Celery) -> Iterator[Any]:
    """A real worker for ``worker`` in a thread of this process: solo pool, consuming its broker.

    Started where a test needs it, so the test can put messages in the queue before anything
    consumes them.
    """
    with start_worker(worker, pool="solo", perform_ping_check=False, shutdown_timeout=60,
                      hostname=f"unit-{uuid.uuid4().hex[:8]}@localhost") as controller:
        yield controller

