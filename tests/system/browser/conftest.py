"""Browser fixtures: Debian's Chromium, a real worker, and analysed jobs to look at.

The pages are served by the root conftest's ``live_server`` (authentication off) and
``auth_server`` (authentication on, with a key), the same servers the client tests use.

Chromium is the system one (``/usr/bin/chromium``, which CI installs); Playwright's own browser
downloads are never used. Its fake media flags make ``getUserMedia`` capture a known WAV file, so
the microphone path is tested with real speech.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from ser_shared.settings import Settings
from tests.conftest import WorkerProcess, ravdess_file

CHROMIUM = Path(os.environ.get("SER_TEST_CHROMIUM", "/usr/bin/chromium"))
TERMINAL = ("succeeded", "failed")


@pytest.fixture(scope="session", autouse=True)
def _need_chromium() -> None:
    # Session-scoped and autouse, so the skip comes before the server and worker start.
    if not CHROMIUM.exists():
        pytest.skip(f"browser tests need Chromium at {CHROMIUM} (apt-get install chromium)")


@pytest.fixture(scope="session")
def mic_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A RAVDESS sentence as 16-bit PCM WAV, the form Chromium's fake capture device reads."""
    src = ravdess_file(3, "05", intensity="02")  # angry, strong intensity
    dst = tmp_path_factory.mktemp("mic") / "speech.wav"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(src), "-ac", "1", "-ar", "48000",
                    "-c:a", "pcm_s16le", str(dst)], check=True)
    return dst


@pytest.fixture(scope="session")
def browser(mic_wav: Path) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    args = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
            f"--use-file-for-fake-audio-capture={mic_wav}"]
    if os.geteuid() == 0:
        args.append("--no-sandbox")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=args)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any, live_server: str) -> Iterator[Any]:
    with checked_page(browser, live_server) as tab:
        yield tab


@contextmanager
def checked_page(browser: Any, base_url: str) -> Iterator[Any]:
    """A tab on ``base_url`` that fails the test on any script error or anything the CSP blocked."""
    context = browser.new_context(base_url=base_url, accept_downloads=True, viewport={"width": 1280, "height": 900})
    context.grant_permissions(["microphone"], origin=base_url)
    context.set_default_timeout(20_000)
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    # Chromium reports what the Content-Security-Policy blocked (an inline style, a script) on the console.
    blocked: list[str] = []
    tab.on("console", lambda msg: blocked.append(msg.text) if "Content Security Policy" in msg.text else None)
    try:
        yield tab
    finally:
        context.close()
    # A script error on any page is a failure even when the assertions happened to pass.
    assert not errors, f"JavaScript errors: {errors}"
    assert not blocked, f"blocked by the Content-Security-Policy: {blocked}"


@pytest.fixture(scope="session")
def worker(pg_worker: WorkerProcess) -> WorkerProcess:
    return pg_worker


def wait_jobs(request: Any, ids: list[str], timeout: float = 120.0) -> list[dict[str, Any]]:
    """Poll the API until every job is finished; returns their JSON."""
    deadline = time.monotonic() + timeout
    jobs: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        jobs = [request.get(f"/api/v1/jobs/{i}").json() for i in ids]
        if all(j["status"] in TERMINAL for j in jobs):
            return jobs
        time.sleep(0.5)
    raise AssertionError(f"jobs not finished in {timeout} s: {[(j['id'], j['status']) for j in jobs]}")


@pytest.fixture(scope="session")
def finished_jobs(browser: Any, live_server: str, worker: WorkerProcess,
                  pg_settings: Settings) -> dict[str, Any]:
    """Four RAVDESS recordings analysed in one batch, plus one undecodable file (a failed job)."""
    context = browser.new_context(base_url=live_server)
    try:
        specs = [ravdess_file(1, "03"), ravdess_file(2, "04"), ravdess_file(4, "05"), ravdess_file(5, "01")]
        files = [{"name": p.name, "mimeType": "audio/flac", "buffer": p.read_bytes()} for p in specs]
        resp = _multipart_many(context.request, files)
        ids = [j["id"] for j in resp["jobs"]]
        broken = context.request.post("/api/v1/jobs", multipart={"file": {
            "name": "broken.wav", "mimeType": "audio/wav", "buffer": b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk"}})
        assert broken.status == 202, broken.text()
        jobs = wait_jobs(context.request, ids)
        failed = broken.json()["jobs"][0]
        return {"batch_id": resp["batch_id"], "jobs": jobs, "failed_id": failed["id"]}
    finally:
        context.close()


def _multipart_many(request: Any, files: list[dict[str, Any]]) -> dict[str, Any]:
    """One request with several ``file`` parts (Playwright's multipart dict cannot repeat a name)."""
    boundary = "----ser-test-boundary-7e3f"
    body = b""
    for spec in files:
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{spec['name']}\"\r\n"
                 f"Content-Type: {spec['mimeType']}\r\n\r\n").encode() + spec["buffer"] + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    resp = request.post("/api/v1/jobs", data=body,
                        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert resp.status == 202, resp.text()
    result: dict[str, Any] = resp.json()
    return result

