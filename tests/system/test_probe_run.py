"""Our own rerun of the independent probe (``bench.probe``) against gunicorn as ``ser web`` runs it,
with authentication on: well over a thousand kinds of hostile request, and not one 5xx or lost answer."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from bench.probe import run_probe
from ser_cli.cli import _web_argv
from ser_shared import apikeys
from ser_shared.db import make_engine, make_session_factory
from ser_shared.settings import REPO_ROOT, Settings
from tests.conftest import private_database, settings_env, wait_for
from tests.fault_tools import free_port
from tests.helpers import stop_process

# Nobody reads this queue: the probe's uploads only need the web tier, and must not reach a worker.
QUEUE = "probe-unread"


@pytest.fixture(scope="module")
def service(pg_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    tmp = tmp_path_factory.mktemp("probe")
    with private_database(pg_settings, env="production", default_queue=QUEUE, data_dir=tmp / "data",
                          storage_dir=tmp / "uploads") as settings:
        factory = make_session_factory(make_engine(settings))
        with factory() as session:
            key = apikeys.create(session, "probe").key
            session.commit()
        port = free_port()
        env = settings_env(settings) | {
            "SER_DEFAULT_QUEUE": QUEUE, "SER_RATE_LIMIT_UPLOADS_PER_MINUTE": "1000000",
            "SER_RATE_LIMIT_FILES_PER_MINUTE": "10000000", "SER_MAX_QUEUED_JOBS": "1000000"}
        with open(tmp / "web.log", "wb") as log:
            proc = subprocess.Popen(_web_argv("127.0.0.1", port, 2), env=env, cwd=REPO_ROOT, stdout=log,
                                    stderr=subprocess.STDOUT)
            try:
                import requests

                def up() -> bool:
                    try:
                        return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
                    except requests.RequestException:
                        return False

                wait_for(up, 60, 0.2)
                yield f"http://127.0.0.1:{port}", key
            finally:
                stop_process(proc)
                redis.Redis.from_url(settings.broker_url or "").delete(QUEUE)


def test_no_hostile_request_gets_a_5xx_or_no_answer(service: tuple[str, str], tmp_path: Path) -> None:
    base, key = service
    report = run_probe(base, key)
    summary = report.summary()
    print("\n" + json.dumps(summary))
    assert summary["kinds"] > 1000  # type: ignore[operator]
    assert report.statuses["seed:good_upload"] == 202  # the probe's uploads reach the checks behind auth
    assert report.server_errors == [] and report.no_answer == []
    # The probe is not a no-op: refusals of every kind were seen.
    assert {s for s in report.statuses.values() if s} >= {200, 202, 400, 401, 404, 405, 413, 414, 416}

