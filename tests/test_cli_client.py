"""The ``ser submit|status|history`` client, run as a subprocess against a real server and worker.

The web app serves from a thread (werkzeug), the worker is a real Celery process, and the CLI is
``python -m ser_shared.cli`` with ``SER_URL`` pointing at the server, as a user would run it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from werkzeug.serving import make_server

from ser_shared import apikeys
from ser_shared.client import Api
from ser_shared.client_cli import Progress, history
from ser_shared.db import make_engine, make_session_factory
from ser_shared.emotions import EMOTIONS
from ser_shared.settings import Settings
from tests.conftest import WorkerProcess, ravdess_file

pytestmark = pytest.mark.slow

BROKEN_WAV = b"RIFF\x24\x00\x00\x00WAVE" + b"this is not a wave header" * 4
# The files the folder holds (relative path -> RAVDESS source); the broken WAV and a text file join them.
SOURCES = {
    "angry.flac": ravdess_file(1, "05", "02"),
    "happy.flac": ravdess_file(2, "03", "02"),
    "sub/traurig-ärger.flac": ravdess_file(3, "04", "02"),
}


class ServerThread:
    """A WSGI app on a free loopback port, served from a thread."""

    def __init__(self, app: Flask) -> None:
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(app: Flask, pg_worker: WorkerProcess) -> Iterator[str]:
    running = ServerThread(app)
    yield running.url
    running.stop()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working folder holding ``calls_<random>/`` with audio, a subfolder, a text file and a broken WAV."""
    root = tmp_path_factory.mktemp("cli")
    folder = root / f"calls_{uuid.uuid4().hex[:8]}"
    for rel, src in SOURCES.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, folder / rel)
    (folder / "broken.wav").write_bytes(BROKEN_WAV)
    (folder / "notes.txt").write_text("not audio\n")
    (folder / "._angry.flac").write_bytes(b"\0\5\26\7 AppleDouble")  # hidden: a macOS resource fork
    return root


def folder_of(workdir: Path) -> str:
    return next(p.name for p in workdir.iterdir() if p.name.startswith("calls_"))


def ser(*args: str, url: str, cwd: Path, key: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SER_")} | {"SER_URL": url}
    if key:
        env["SER_API_KEY"] = key
    return subprocess.run([sys.executable, "-m", "ser_shared.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def api_job(url: str, job_id: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/api/v1/jobs/{job_id}", timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def first_run(server: str, workdir: Path) -> tuple[subprocess.CompletedProcess, list[dict[str, str]]]:
    """``ser submit FOLDER --recursive --wait --output results.csv`` in batches of two files."""
    proc = ser("submit", folder_of(workdir), "--recursive", "--wait", "--output", "results.csv",
               "--batch-size", "2", "--timeout", "120", url=server, cwd=workdir)
    with (workdir / "results.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return proc, rows


def test_submit_wait_writes_one_row_per_file(first_run: tuple[subprocess.CompletedProcess, list[dict[str, str]]],
                                             server: str, workdir: Path) -> None:
    proc, rows = first_run
    folder = folder_of(workdir)
    assert proc.returncode == 1, proc.stderr  # the broken file failed: documented as exit status 1
    assert "skipped 1 files that are not audio" in proc.stderr
    assert "4 files in 2 batches" in proc.stderr
    by_path = {Path(r["path"]).relative_to(folder).as_posix(): r for r in rows}
    # --recursive found sub/; notes.txt and the hidden ._angry.flac were left out.
    assert sorted(by_path) == sorted([*SOURCES, "broken.wav"])
    broken = by_path.pop("broken.wav")
    assert (broken["status"], broken["error_code"], broken["emotion"]) == ("failed", "decode_failed", "")
    assert broken["job_id"]
    for rel, row in by_path.items():
        assert row["status"] == "succeeded", row
        # The row says what the API says for that job, the name the server keeps included.
        job = api_job(server, row["job_id"])
        assert job["filename"] == f"{folder}/{rel}"
        assert row["emotion"] == job["result"]["emotion"] and row["emotion"] in EMOTIONS
        probabilities = {e: float(row[f"p_{e}"]) for e in EMOTIONS}
        assert probabilities == pytest.approx(job["result"]["probabilities"])
        assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-3)
        assert float(row["confidence"]) == pytest.approx(job["result"]["confidence"])
        assert row["uncertain"] in ("True", "False")


def test_rerun_replays_instead_of_duplicating(first_run: tuple[subprocess.CompletedProcess, list[dict[str, str]]],
                                              server: str, workdir: Path) -> None:
    _, rows = first_run
    folder = folder_of(workdir)
    again = ser("submit", folder, "--recursive", "--wait", "--output", "again.json", "--batch-size", "2",
                url=server, cwd=workdir)
    assert again.returncode == 1, again.stderr
    replayed = json.loads((workdir / "again.json").read_text())
    assert {r["job_id"] for r in replayed} == {r["job_id"] for r in rows}
    assert all(isinstance(r["confidence"], float) for r in replayed if r["status"] == "succeeded")
    listed = ser("history", "--q", folder, "--json", url=server, cwd=workdir)
    assert listed.returncode == 0, listed.stderr
    assert sorted(j["id"] for j in json.loads(listed.stdout)) == sorted(r["job_id"] for r in rows)


def test_status_shows_one_job(first_run: tuple[subprocess.CompletedProcess, list[dict[str, str]]],
                              server: str, workdir: Path) -> None:
    _, rows = first_run
    done = next(r for r in rows if r["status"] == "succeeded")
    text = ser("status", done["job_id"], url=server, cwd=workdir)
    assert text.returncode == 0, text.stderr
    assert f"job         {done['job_id']}" in text.stdout
    assert f"emotion     {done['emotion']} " in text.stdout
    as_json = ser("status", done["job_id"], "--json", url=server, cwd=workdir)
    assert json.loads(as_json.stdout)["result"]["emotion"] == done["emotion"]
    failed = ser("status", next(r["job_id"] for r in rows if r["status"] == "failed"), url=server, cwd=workdir)
    assert "error       decode_failed:" in failed.stdout
    missing = ser("status", str(uuid.uuid4()), url=server, cwd=workdir)
    assert missing.returncode == 3
    assert "no such job" in missing.stderr


def test_history_filters_formats_and_pages(first_run: tuple[subprocess.CompletedProcess, list[dict[str, str]]],
                                           server: str, workdir: Path) -> None:
    _, rows = first_run
    folder = folder_of(workdir)
    failed = ser("history", "--q", folder, "--status", "failed", "--csv", url=server, cwd=workdir)
    listed = list(csv.DictReader(failed.stdout.splitlines()))
    assert [(r["filename"], r["error_code"]) for r in listed] == [(f"{folder}/broken.wav", "decode_failed")]
    table = ser("history", "--q", folder, url=server, cwd=workdir)
    assert table.stdout.splitlines()[0].split() == ["created_at", "job_id", "status", "emotion", "confidence",
                                                    "error_code", "filename"]
    assert len(table.stdout.splitlines()) == 1 + len(rows)
    # Pages of two follow the keyset cursor to the same jobs, in the same order, as one page of all.
    api = Api(server)
    paged = history(api, {"q": folder}, limit=10, page_size=2)
    assert [j["id"] for j in paged] == [j["id"] for j in history(api, {"q": folder}, limit=10)]
    assert len({j["id"] for j in paged}) == len(rows)
    assert len(history(api, {"q": folder}, limit=3, page_size=2)) == 3


def test_without_recursive_the_subfolder_is_left_out(server: str, workdir: Path) -> None:
    folder = workdir / f"solo_{uuid.uuid4().hex[:8]}"
    shutil.copytree(workdir / folder_of(workdir), folder)
    proc = ser("submit", folder.name, url=server, cwd=workdir)
    assert proc.returncode == 1, proc.stderr  # the broken WAV is rejected at upload
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["job_id", "status", "error_code", "path"]
    paths = sorted(line.split()[-1] for line in lines[1:])
    assert paths == sorted(f"{folder.name}/{n}" for n in ("angry.flac", "happy.flac", "broken.wav"))
    assert any("failed" in line and "decode_failed" in line for line in lines[1:])


def test_timeout_writes_what_is_known_and_exits_4(server: str, workdir: Path) -> None:
    folder = workdir / f"slow_{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    shutil.copy(workdir / folder_of(workdir) / "happy.flac", folder / "happy.flac")
    # A transcript takes the worker over a second, so no job can be finished at the first poll.
    proc = ser("submit", folder.name, "--transcribe", "sphinx", "--wait", "--timeout", "0", "--output", "slow.json",
               url=server, cwd=workdir)
    assert proc.returncode == 4, proc.stderr
    assert "--timeout 0 s passed with jobs still running" in proc.stderr
    [row] = json.loads((workdir / "slow.json").read_text())
    assert row["path"] == f"{folder.name}/happy.flac" and row["job_id"]
    assert row["status"] in ("queued", "processing", "succeeded")
    assert row["status"] != "succeeded" or row["transcript"] is None  # the transcript was still pending


def test_bad_output_name_and_empty_folder_are_usage_errors(server: str, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x")
    empty = ser("submit", "empty", url=server, cwd=tmp_path)
    assert empty.returncode == 2 and "no audio files found" in empty.stderr
    bad = ser("submit", "empty", "--output", "results.xlsx", url=server, cwd=tmp_path)
    assert bad.returncode == 2 and "--output must end in .csv or .json" in bad.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_server_down_is_a_clear_error(workdir: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    proc = ser("submit", folder_of(workdir), "--retries", "1", url=url, cwd=workdir)
    assert proc.returncode == 3
    assert f"error: cannot reach the SER server at {url} (connection refused)" in proc.stderr
    assert "SER_URL" in proc.stderr
    assert proc.stderr.count("retrying in") == 1
    assert time.monotonic() - started < 30


class FlakyProxy:
    """A forwarding proxy that injects faults: ``("POST", "drop")`` forwards the request and then
    hangs up without the answer (a lost response); ``("GET", "429")`` answers 429 with Retry-After: 1."""

    def __init__(self, upstream: str, faults: list[tuple[str, str]]) -> None:
        self.upstream, self.faults, self.log = upstream, faults, []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                proxy.handle(self)

            def do_POST(self) -> None:
                proxy.handle(self)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def _fault(self, method: str) -> str | None:
        for k, (m, action) in enumerate(self.faults):
            if m == method:
                del self.faults[k]
                return action
        return None

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        fault = self._fault(h.command)
        self.log.append((h.command, h.path, fault))
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0)) if h.command == "POST" else None
        if fault == "429":
            h.send_response(429)
            h.send_header("Retry-After", "1")
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        headers = {k: v for k, v in h.headers.items() if k.lower() not in ("host", "connection")}
        request = urllib.request.Request(self.upstream + h.path, data=body, headers=headers, method=h.command)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                status, payload = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, payload = exc.code, exc.read()
        if fault == "drop":
            h.close_connection = True
            return
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        h.wfile.write(payload)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_lost_response_and_rate_limit_are_retried_without_duplicates(server: str, workdir: Path) -> None:
    folder = workdir / f"flaky_{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    for name in ("angry.flac", "happy.flac"):
        shutil.copy(workdir / folder_of(workdir) / name, folder / name)
    proxy = FlakyProxy(server, [("GET", "429"), ("POST", "drop")])
    try:
        started = time.monotonic()
        proc = ser("submit", folder.name, url=proxy.url, cwd=workdir)
        elapsed = time.monotonic() - started
    finally:
        proxy.stop()
    assert proc.returncode == 0, proc.stderr
    assert "rate_limited" not in proc.stderr and proc.stderr.count("retrying in") == 2
    assert "retrying in 1.0 s" in proc.stderr  # the 429's Retry-After, honoured
    assert elapsed >= 1.0
    assert [(m, f) for m, _, f in proxy.log] == [("GET", "429"), ("GET", None), ("POST", "drop"), ("POST", None)]
    # The first POST created the jobs and its answer was lost; the retry got them back, not new ones.
    listed = history(Api(server), {"q": folder.name}, limit=50)
    assert len(listed) == 2
    assert {j["id"] for j in listed} == {line.split()[0] for line in proc.stdout.splitlines()[1:]}


@pytest.fixture(scope="module")
def auth_server(pg_settings: Settings) -> Iterator[tuple[str, str]]:
    """The same database behind an app with authentication on, and a live key for it."""
    from web import create_app

    app = create_app(pg_settings.model_copy(update={"auth": True}))
    sessions = make_session_factory(make_engine(pg_settings))
    with sessions() as session:
        key = apikeys.create(session, "cli-test").key
        session.commit()
    running = ServerThread(app)
    yield running.url, key
    running.stop()


def test_api_key_missing_invalid_and_valid(auth_server: tuple[str, str], tmp_path: Path) -> None:
    url, key = auth_server
    missing = ser("history", url=url, cwd=tmp_path)
    assert missing.returncode == 3
    assert "requires an API key" in missing.stderr and "SER_API_KEY" in missing.stderr
    wrong = ser("history", "--api-key", "ser_not-a-real-key", url=url, cwd=tmp_path)
    assert wrong.returncode == 3 and "API key was not accepted" in wrong.stderr
    good = ser("history", "--json", url=url, cwd=tmp_path, key=key)
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout) == []  # a new key is a new tenant: it sees none of the other jobs


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_one_redrawn_line_on_a_terminal_and_plain_lines_elsewhere() -> None:
    screen = Terminal()
    bar = Progress("uploading", 10, "jobs", stream=screen)
    for _ in range(10):
        bar.advance(1)
    bar.finish()
    out = screen.getvalue()
    assert out.startswith("\r") and out.count("\n") == 1 and out.endswith("100%  10/10 jobs\033[K\n")
    log = io.StringIO()
    bar = Progress("analysing", 4, "jobs", stream=log, every_s=60)
    for _ in range(4):
        bar.advance(1)
    bar.finish()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 2  # the first step, then the end; none in between
    assert "  25%  1/4 jobs" in lines[0] and lines[1].endswith("100%  4/4 jobs")
