"""A refused upload gets its refusal, on kept-alive connections too, against a real gunicorn.

An upload turned away before its body is read (429 for the caller's limits, 413 for its size) leaves
the body's bytes in flight. If the server then closes the socket with them unread, the kernel answers
with a reset and the client, still sending, loses the response it was owed. ``web.drain`` reads and
discards what is left (within bounds) before the answer goes out; this test holds the server to it.

The limit that refuses is the queue cap: one job waits (no worker runs here) and the cap is one, so
every later upload is refused with 429 before its body is read, however long the test takes.
"""

from __future__ import annotations

import http.client
import io
import socket
import subprocess
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import redis
import soundfile as sf

from ser_cli.cli import _web_argv
from ser_shared.settings import REPO_ROOT, Settings
from tests.conftest import private_database, settings_env, wait_for
from tests.helpers import stop_process

CONNECTIONS = 4
REQUESTS_PER_CONNECTION = 75  # 300 refused uploads in all
BODY_BYTES = 256 * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", "/healthz")
        return conn.getresponse().status == 200
    except OSError:
        return False


# Nobody reads this queue: a job accepted here stays queued (the session's worker would analyse it
# and so lift the queue cap these tests rely on).
UNREAD_QUEUE = "keepalive-unread"
# Only the limit under test may refuse: the per-minute limits are shared with other tests' uploads.
NO_RATE_LIMITS = {"SER_RATE_LIMIT_UPLOADS_PER_MINUTE": "1000000", "SER_RATE_LIMIT_FILES_PER_MINUTE": "10000000"}


@contextmanager
def serve(settings: Settings, tmp_path: Path, extra_env: dict[str, str]) -> Iterator[int]:
    """The web tier as ``ser web`` runs it (gunicorn, threaded workers), with ``extra_env`` settings,
    on a database of its own whose jobs go to a queue no worker reads."""
    port = _free_port()
    with private_database(settings) as own:
        env = (settings_env(own) | {"SER_STORAGE_DIR": str(tmp_path / "store"), "SER_DEFAULT_QUEUE": UNREAD_QUEUE}
               | NO_RATE_LIMITS | extra_env)
        log = open(tmp_path / "gunicorn.log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(_web_argv("127.0.0.1", port, 1), env=env, cwd=REPO_ROOT, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: _answers(port), timeout=60, interval=0.3)
            yield port
        finally:
            stop_process(proc)
            log.close()
            redis.Redis.from_url(own.broker_url or "").delete(UNREAD_QUEUE)


def multipart_body(name: str, content: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            "Content-Type: audio/wav\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def tone_wav(seconds: float = 1.0, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    out = io.BytesIO()
    sf.write(out, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


@dataclass
class Outcome:
    statuses: list[int] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)  # requests that got no response, and why
    closed_by_server: int = 0  # responses after which the server did not keep the connection


def upload_many(port: int, body: bytes, content_type: str, count: int) -> Outcome:
    """``count`` uploads one after another on one kept-alive connection (reopened only if closed)."""
    outcome = Outcome()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        for i in range(count):
            try:
                conn.request("POST", "/api/v1/jobs", body=body,
                             headers={"Content-Type": content_type, "Accept": "application/json"})
                response = conn.getresponse()
                response.read()
            except (ConnectionError, http.client.HTTPException, OSError) as exc:
                outcome.lost.append(f"request {i}: {type(exc).__name__}: {exc}")
                conn.close()
                continue
            outcome.statuses.append(response.status)
            if response.will_close:
                outcome.closed_by_server += 1
                conn.close()
    finally:
        conn.close()
    return outcome


def hammer(port: int, body: bytes, content_type: str) -> list[Outcome]:
    with ThreadPoolExecutor(CONNECTIONS) as pool:
        return list(pool.map(lambda _: upload_many(port, body, content_type, REQUESTS_PER_CONNECTION),
                             range(CONNECTIONS)))


def fill_the_queue(port: int) -> None:
    """One accepted job that no worker takes: from now on every upload is over the queue cap."""
    body, content_type = multipart_body("tone.wav", tone_wav())
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/api/v1/jobs", body=body, headers={"Content-Type": content_type})
    status = conn.getresponse().status
    conn.close()
    assert status == 202, status


def test_every_refused_upload_over_keepalive_gets_its_429(pg_settings: Settings, tmp_path: Path) -> None:
    with serve(pg_settings, tmp_path, {"SER_MAX_QUEUED_JOBS": "1"}) as port:
        fill_the_queue(port)
        outcomes = hammer(port, *multipart_body("big.wav", b"RIFF" + bytes(range(256)) * (BODY_BYTES // 256)))
    lost = [why for o in outcomes for why in o.lost]
    statuses = [s for o in outcomes for s in o.statuses]
    assert lost == [], f"{len(lost)} of {CONNECTIONS * REQUESTS_PER_CONNECTION} refusals never arrived: {lost[:5]}"
    assert statuses == [429] * (CONNECTIONS * REQUESTS_PER_CONNECTION)
    # The drained body leaves the connection clean, so it is kept for the next request.
    assert sum(o.closed_by_server for o in outcomes) == 0


def test_every_too_large_upload_over_keepalive_gets_its_413(pg_settings: Settings, tmp_path: Path) -> None:
    """Over a 1 MiB request limit (but within what the server drains): 413, every time."""
    with serve(pg_settings, tmp_path, {"SER_MAX_REQUEST_MB": "1"}) as port:
        outcomes = hammer(port, *multipart_body("huge.wav", b"RIFF" + b"\0" * (1 << 20)))
    lost = [why for o in outcomes for why in o.lost]
    assert lost == [], f"{len(lost)} refusals never arrived: {lost[:5]}"
    assert [s for o in outcomes for s in o.statuses] == [413] * (CONNECTIONS * REQUESTS_PER_CONNECTION)


STALLED = 4  # as many as ``ser web``'s threads per worker: unbounded drains would hold them all


def test_a_refused_upload_that_stalls_does_not_hold_a_thread(pg_settings: Settings, tmp_path: Path) -> None:
    """Clients that announce 1 MiB, send 1 KiB and stop: each still gets its 429 once the drain gives
    up, the server then closes the connection, and the threads are free for the next request.
    (Without the drain's read timeout each thread would wait on its client for good.)"""
    with serve(pg_settings, tmp_path, {"SER_MAX_QUEUED_JOBS": "1"}) as port:
        fill_the_queue(port)
        head = ("POST /api/v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                f"Content-Length: {1 << 20}\r\n\r\n").encode()
        socks = [socket.create_connection(("127.0.0.1", port), timeout=120) for _ in range(STALLED)]
        try:
            for sock in socks:
                sock.sendall(head + b"--b\r\n" + b"x" * 1024)
            for sock in socks:
                received = b""
                while chunk := sock.recv(65536):  # until the server closes (the timeout fails the test)
                    received += chunk
                assert received.startswith(b"HTTP/1.1 429 "), received[:200]
        finally:
            for sock in socks:
                sock.close()
        assert _answers(port)
