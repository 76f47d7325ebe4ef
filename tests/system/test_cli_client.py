"""The ``ser submit|status|history`` client, run as a subprocess against a real server and worker.

The web app serves from a thread (werkzeug), the worker is a real Celery process, and the CLI is
``python -m ser_cli`` (the server's ``ser``, which registers the ``ser_client`` package's
commands) with ``SER_URL`` pointing at the server, as a user would run it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from ser_client import Client
from ser_client._progress import Progress
from ser_client.cli import history

from ser_shared.emotions import EMOTIONS
from ser_shared.settings import Settings
from tests.conftest import WorkerProcess, ravdess_file, settings_env
from tests.live_server import FlakyProxy, free_port

pytestmark = pytest.mark.slow

BROKEN_WAV = b"RIFF\x24\x00\x00\x00WAVE" + b"this is not a wave header" * 4
# The files the folder holds (relative path -> RAVDESS source); the broken WAV and a text file join them.
SOURCES = {
    "angry.flac": ravdess_file(1, "05", "02"),
    "happy.flac": ravdess_file(2, "03", "02"),
    "sub/traurig-ärger.flac": ravdess_file(3, "04", "02"),
}


@pytest.fixture(scope="module")
def server(live_server: str, pg_worker: WorkerProcess) -> str:
    """The session's live server, with the session's real worker running."""
    return live_server


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
    return subprocess.run([sys.executable, "-m", "ser_cli", *args], env=env, cwd=cwd,
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
    assert "skipped 1 file not named as audio (.txt;" in proc.stderr
    assert "already submitted" not in proc.stderr
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
        assert row["uncertain"] == json.dumps(job["result"]["uncertain"])  # true/false as in JSON, not True/False


def test_rerun_replays_instead_of_duplicating(first_run: tuple[subprocess.CompletedProcess, list[dict[str, str]]],
                                              server: str, workdir: Path) -> None:
    _, rows = first_run
    folder = folder_of(workdir)
    again = ser("submit", folder, "--recursive", "--wait", "--output", "again.json", "--batch-size", "2",
                url=server, cwd=workdir)
    assert again.returncode == 1, again.stderr
    # Said on the screen, not silently: these are the earlier run's jobs, and how to analyse again.
    assert "already submitted: reusing 4 jobs" in again.stderr and "--fresh to analyse again" in again.stderr
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
    api = Client(server)
    paged = history(api, {"q": folder}, limit=10, page_size=2)
    assert [j["id"] for j in paged] == [j["id"] for j in history(api, {"q": folder}, limit=10)]
    assert len({j["id"] for j in paged}) == len(rows)
    assert len(history(api, {"q": folder}, limit=3, page_size=2)) == 3


def test_ser_client_script_is_the_same_client(first_run: tuple[subprocess.CompletedProcess, list[dict[str, str]]],
                                             server: str, workdir: Path) -> None:
    # The client's own distribution installs ``ser-client``: the same commands as ``ser``'s, same output.
    folder = folder_of(workdir)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SER_")} | {"SER_URL": server}
    script = Path(sys.executable).with_name("ser-client")
    alone = subprocess.run([str(script), "history", "--q", folder, "--json"], env=env, cwd=workdir,
                           capture_output=True, text=True, timeout=120)
    assert alone.returncode == 0, alone.stderr
    via_ser = ser("history", "--q", folder, "--json", url=server, cwd=workdir)
    assert json.loads(alone.stdout) == json.loads(via_ser.stdout) and len(json.loads(alone.stdout)) == 4


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


def test_server_down_is_a_clear_error(workdir: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    proc = ser("submit", folder_of(workdir), "--retries", "1", url=url, cwd=workdir)
    assert proc.returncode == 3
    assert f"error: cannot reach the SER server at {url} (connection refused)" in proc.stderr
    assert "SER_URL" in proc.stderr
    assert proc.stderr.count("retrying in") == 1
    assert time.monotonic() - started < 30


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
    assert "already submitted" not in proc.stderr  # the replay answered this run's own lost request
    assert "retrying in 1.0 s" in proc.stderr  # the 429's Retry-After, honoured
    assert elapsed >= 1.0
    assert [(m, f) for m, _, f in proxy.log] == [("GET", "429"), ("GET", None), ("POST", "drop"), ("POST", None)]
    # The first POST created the jobs and its answer was lost; the retry got them back, not new ones.
    listed = history(Client(server), {"q": folder.name}, limit=50)
    assert len(listed) == 2
    assert {j["id"] for j in listed} == {line.split()[0] for line in proc.stdout.splitlines()[1:]}


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
    # tqdm redraws one line in place (carriage returns) and ends it once.
    assert out.startswith("\r") and out.count("\n") == 1 and out.endswith("\n")
    assert out.rstrip("\n").split("\r")[-1].rstrip().endswith("100%|" + "#" * 30 + "| 10/10 jobs")
    log = io.StringIO()
    bar = Progress("analysing", 4, "jobs", stream=log, every_s=60)
    for _ in range(4):
        bar.advance(1)
    bar.finish()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 2  # the start, then the end; none in between
    assert lines[0].startswith("analysing   0%|") and lines[0].endswith("| 0/4 jobs")
    assert lines[1].endswith("100%|" + "#" * 30 + "| 4/4 jobs")


def test_upload_progress_counts_bytes_and_notes_the_batch() -> None:
    log = io.StringIO()
    bar = Progress("uploading", 3_000_000, "MB", stream=log, every_s=0)
    bar.set(0, "batch 1/2")
    bar.set(1_500_000)
    bar.set(3_000_000, "batch 2/2")
    bar.finish()
    lines = log.getvalue().splitlines()
    assert lines[-2].endswith(" 50%|" + "#" * 15 + " " * 15 + "| 1.50M/3.00MB, batch 1/2")
    assert lines[-1].endswith("100%|" + "#" * 30 + "| 3.00M/3.00MB, batch 2/2")


@pytest.mark.parametrize("argv", [("-m", "ser_cli", "history", "--json"), ("-m", "ser_cli", "history", "--csv"),
                                  ("-m", "ser_client", "history"), ("-m", "ser_cli", "keys", "list", "--json")])
def test_a_reader_that_left_early_ends_the_command_quietly(live_server: str, pg_settings: Settings,
                                                           argv: tuple[str, ...]) -> None:
    """``ser history --json | head``: once head has gone, the next write fails; the command stops
    with the shell's SIGPIPE status and no traceback, client and server commands alike."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # a reader already gone, as head is after its lines: every write fails (EPIPE)
    env = settings_env(pg_settings) | {"SER_URL": live_server}
    try:
        proc = subprocess.run([sys.executable, *argv], stdout=write_end, stderr=subprocess.PIPE, env=env,
                              text=True, timeout=120)
    finally:
        os.close(write_end)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.returncode == 141


def test_fresh_analyses_a_submitted_folder_again(first_run: tuple[subprocess.CompletedProcess, list[dict[str, str]]],
                                                 server: str, workdir: Path) -> None:
    """--fresh sends the same files as new jobs, without the reuse notice; a partial reuse says how much."""
    _, rows = first_run
    folder = folder_of(workdir)
    fresh = ser("submit", folder, "--recursive", "--fresh", "--batch-size", "2", url=server, cwd=workdir)
    assert fresh.returncode in (0, 1), fresh.stderr  # 1: broken.wav is refused at upload
    assert "already submitted" not in fresh.stderr
    new_ids = {line.split()[0] for line in fresh.stdout.splitlines()[1:] if line.strip()}
    assert len(new_ids) == 4 and not new_ids & {r["job_id"] for r in rows}
    # Without sub/: the first batch of two is the first run's (same files, same key), happy.flac alone is new.
    partial = ser("submit", folder, "--batch-size", "2", url=server, cwd=workdir)
    assert "already submitted: reusing 2 of 3 jobs" in partial.stderr, partial.stderr
