"""`ser serve` with nothing configured: SQLite + filesystem broker, gunicorn + a Celery worker."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

from ser_shared.emotions import EMOTIONS
from ser_shared.settings import REPO_ROOT
from tests.conftest import ravdess_file, wait_for

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    data = tmp_path_factory.mktemp("embedded")
    port = _free_port()
    # A user's environment: nothing that quiets TensorFlow or Python's warnings (ser must do that).
    quieting = ("SER_", "TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS", "PYTHONWARNINGS")
    env = {k: v for k, v in os.environ.items() if not k.startswith(quieting)}
    env.update({"SER_DATA_DIR": str(data), "SER_WORKER_CONCURRENCY": "1"})
    log = open(data / "serve.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "ser_cli", "serve", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return requests.get(f"{base}/readyz", timeout=5).status_code == 200
        except requests.RequestException:  # not listening yet, or still booting
            return False

    try:
        wait_for(ready, 90)
        yield base, data, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def test_serve_prints_url_and_uses_embedded_stores(served) -> None:  # type: ignore[no-untyped-def]
    base, data, _ = served
    text = (data / "serve.log").read_text(errors="replace")
    assert f"running at {base}/" in text
    assert (data / "ser.sqlite3").is_file() and (data / "broker" / "queue").is_dir()


def test_embedded_flow_end_to_end(served) -> None:  # type: ignore[no-untyped-def]
    base, data, _ = served
    paths = [ravdess_file(9, "05", "02"), ravdess_file(10, "04", "02"), ravdess_file(11, "03", "02")]
    files = [("file", (p.name, p.read_bytes(), "audio/flac")) for p in paths]
    files.append(("file", ("broken.mp3", b"\xff\xfb\x90\x00" + b"\x00" * 400, "audio/mpeg")))
    resp = requests.post(f"{base}/api/v1/jobs", files=files, timeout=30)
    assert resp.status_code == 202, resp.text
    batch_id = resp.json()["batch_id"]

    def finished() -> dict | None:
        body = requests.get(f"{base}/api/v1/batches/{batch_id}", timeout=5).json()
        return body if body["done"] else None

    batch = wait_for(finished, 120)
    assert batch["counts"]["succeeded"] == 3
    assert batch["counts"]["failed"] == 1 and batch["jobs"][3]["error"]["code"] == "decode_failed"
    assert all(j["result"]["emotion"] in EMOTIONS for j in batch["jobs"][:3])
    history = requests.get(f"{base}/history", timeout=5).text
    assert all(p.name in history for p in paths)
    stored = [p for p in (data / "uploads").rglob("*") if p.is_file()]
    assert len(stored) == 3  # the broken file was not kept


# Lines `ser serve` printed before: start-up banners and warnings no user acts on, and a line per poll.
NOISE = {
    "TensorFlow's oneDNN notices": "oneDNN",
    "absl's pre-init notice": "absl::InitializeLog",
    "Celery's superuser warning": "superuser privileges",
    "Celery's banner": "[tasks]",
    "kombu's missing-host warning": "No hostname was supplied",
    "alembic's plugin list": "setup plugin",
    "gunicorn's start-up lines": "Booting worker",
}


def test_serve_shows_the_url_and_what_matters(served) -> None:  # type: ignore[no-untyped-def]
    """After start-up, an analysis and a page's worth of polling, the screen holds the URL, the
    mode, the work done and the one failed request: no banners, no line per successful poll."""
    base, data, _ = served
    for _ in range(5):
        assert requests.get(f"{base}/api/v1/jobs?limit=1", timeout=5).status_code == 200
    missing = requests.get(f"{base}/api/v1/jobs/00000000-0000-0000-0000-000000000000", timeout=5)
    assert missing.status_code == 404
    time.sleep(1)  # gunicorn writes the access line once the response is sent
    text = (data / "serve.log").read_text(errors="replace")
    assert f"SER service running at {base}/ in single-user mode" in text
    assert "models loaded" in text and "analysed jobs=" in text
    assert '"GET /api/v1/jobs/00000000-0000-0000-0000-000000000000 HTTP/1.1" 404' in text
    assert not re.search(r'" [23]\d\d ', text), "an access line for a successful request"
    heard = {name: marker for name, marker in NOISE.items() if marker in text}
    assert not heard, f"noise in the output: {heard}\n{text[-3000:]}"


def test_sigterm_stops_web_and_worker(served) -> None:  # type: ignore[no-untyped-def]
    base, _, proc = served
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    time.sleep(1)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{base}/healthz", timeout=2)
    leftover = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert leftover == []
