"""``ser worker --check``, the liveness probe compose and Kubernetes run: the heartbeat row, no broker."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from ser_shared.db import make_engine, make_session_factory
from ser_shared.models import WorkerHeartbeat
from ser_shared.settings import Settings
from tests.conftest import REPO_ROOT, private_database, settings_env
from worker.heartbeat import beat, host_prefix


@pytest.fixture
def settings(pg_settings: Settings) -> Iterator[Settings]:
    # A broker nobody listens on: the check must not need one.
    with private_database(pg_settings, broker_url="redis://127.0.0.1:1/0") as private:
        yield private


def _check(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ser_cli", "worker", "--check", *args],
                          env=settings_env(settings), cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)


def _age(settings: Settings, node: str, seconds: float) -> None:
    factory = make_session_factory(make_engine(settings))
    with factory() as session:
        seen = datetime.now(UTC) - timedelta(seconds=seconds)
        session.execute(update(WorkerHeartbeat).where(WorkerHeartbeat.node == node).values(seen_at=seen))
        session.commit()


def test_check_follows_this_hosts_heartbeat(settings: Settings) -> None:
    assert _check(settings).returncode == 1  # no worker on this host yet
    node = f"{host_prefix()}4242:abcd1234"
    factory = make_session_factory(make_engine(settings))
    beat(factory, node, datetime.now(UTC))
    fresh = _check(settings)
    assert fresh.returncode == 0, fresh.stderr
    _age(settings, node, settings.worker_dead_after_s + 5)
    stale = _check(settings)
    assert stale.returncode == 1 and "last heartbeat" in stale.stderr


def test_another_hosts_heartbeat_does_not_count(settings: Settings) -> None:
    factory = make_session_factory(make_engine(settings))
    beat(factory, "elsewhere-host:1:00000000", datetime.now(UTC))
    assert _check(settings).returncode == 1
    assert _check(settings, "--node", "elsewhere-host:").returncode == 0


def test_unreachable_database_is_unhealthy(settings: Settings) -> None:
    gone = settings.model_copy(update={"database_url": "postgresql+psycopg://ser@127.0.0.1:1/none"})
    result = _check(gone)
    assert result.returncode == 1 and "database unavailable" in result.stderr
