"""`python -m bench.e2e` still runs end to end in the production shape (authentication on).

The bench once counted every upload answered 401 as nothing and carried on; these tests keep it
honest: a small real run must upload, process and store everything through the authenticated API,
and an API error must stop it loudly. Nothing here races the clock: the speed it prints is not checked.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from ser_shared.settings import REPO_ROOT
from tests.conftest import DATASETS, PG_ADMIN_URL, RAVDESS, REDIS_URL

# The bench FLUSHES its Redis database: not the suite's (9) nor the bench's own default (10), so a
# bench run by hand at the same time is left alone. Its Postgres database is a fresh ser_bench_<hex>.
BENCH_REDIS_URL = os.environ.get("SER_TEST_BENCH_REDIS_URL", REDIS_URL.rsplit("/", 1)[0] + "/11")
RECORDINGS = 50
RUN_TIMEOUT_S = 1500  # generous: two shared cores, TensorFlow loading in every process


def _run_bench(args: list[str], logs: Path) -> tuple[int, str, str]:
    """Run the bench as a subprocess; on a timeout SIGTERM it first, so that it stops its servers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SER_")}  # the bench's own settings only
    stdout, stderr = logs / "bench.out", logs / "bench.err"
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "bench.e2e", *args], cwd=REPO_ROOT, env=env,
                                stdout=out, stderr=err)
        try:
            proc.wait(RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
        finally:
            if proc.poll() is None:  # timed out, or pytest is unwinding: let it clean up, then kill
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(120)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return proc.returncode, stdout.read_text(errors="replace"), stderr.read_text(errors="replace")


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S + 300)
@pytest.mark.skipif(not RAVDESS.is_dir(), reason=f"dataset folder absent: {RAVDESS}")
def test_bench_e2e_small_run_succeeds_with_auth(tmp_path: Path) -> None:
    code, out, err = _run_bench(
        ["--recordings", str(RECORDINGS), "--batch-size", "10", "--upload-concurrency", "2",
         "--concurrency", "1", "--web-workers", "1", "--chunk-size", "8", "--latency-samples", "3",
         "--identity-samples", "5", "--datasets", str(DATASETS), "--pg-admin-url", PG_ADMIN_URL,
         "--redis-url", BENCH_REDIS_URL, "--start-timeout", "600", "--timeout", "900"], tmp_path)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert lines, f"no JSON line (exit {code}); stderr:\n{err[-4000:]}"
    report: dict[str, Any] = json.loads(lines[-1])
    context = f"report: {json.dumps(report)}\nstderr:\n{err[-4000:]}"
    assert report["error"] is None, context
    assert code == 0, context
    assert report["config"]["auth"] is True, context  # the production shape: API keys required
    assert report["recordings"] == report["results_stored"] == report["succeeded"] == RECORDINGS, context
    assert report["all_results_stored"] is True, context
    assert report["failed"] == 0 and report["http_errors"] == 0 and report["failed_requests"] == [], context
    assert report["latency_samples"] == 3 and report["latency_failed"] == 0, context
    assert report["audio_roundtrip"] is True, context
    # The stored results are what the same pipeline computes on each recording alone, in process.
    assert report["identity_samples"] == 5 and report["identity_mismatches"] == [], context
    assert report["identical_to_one_by_one"] is True, context


class _Refuses(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - the http.server hook's name
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = b'{"error": {"code": "unauthorized", "message": "send an API key"}}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def refusing_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Refuses)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_bench_upload_refused_fails_loudly(refusing_server: str) -> None:
    """An upload answered 401 is an error naming the status and the body, never a silent zero."""
    from bench.e2e import ApiError, Clip, Service, run_throughput

    args = argparse.Namespace(batch_size=2, upload_concurrency=2, timeout=5)
    svc = Service(refusing_server, web=None, worker=None, headers={"Authorization": "Bearer ser_x"})  # type: ignore[arg-type]
    clips = [Clip(f"{i}.flac", Path(f"{i}.flac"), b"fLaC") for i in range(5)]
    with pytest.raises(ApiError, match=r"3 of 3 upload requests failed: HTTP 401 .*send an API key") as info:
        run_throughput(args, svc, engine=None, recs=clips)  # type: ignore[arg-type]
    assert info.value.count == 3
