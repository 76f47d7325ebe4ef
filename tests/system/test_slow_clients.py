"""Fifty slow clients do not stall the production web tier: nginx in front of gunicorn.

gunicorn's threaded workers give a request a thread for as long as its client takes, so eight
connections trickling a ``POST /login`` body (no key needed) held every thread and ``/healthz``
timed out. The production shape puts nginx in front (``deploy/nginx/ser.conf.template``, the
file docker-compose mounts; rendered here exactly as the nginx image renders it), which reads
every request whole before gunicorn sees it and takes whole responses off gunicorn however
slowly the client reads them.

The test runs ``ser web``'s gunicorn (auth on, Postgres, Redis; no worker: an upload only has to
be stored and enqueued) behind that nginx and opens 50 slow connections: 22 bodies trickled one
byte a second and 8 exports never read (24 MiB each, through a 4 KiB receive window), then, once
gunicorn has handed every export over in full, 20 headers trickled one line a second (after them
because nginx rightly drops a header still unfinished after 10 s). Meanwhile ``/healthz`` and a
real authenticated upload must each answer within a second, three times: that is the promise
(a latency bound, and a generous one for requests that take milliseconds here). The second test aims
the same clients at gunicorn alone and shows that ``/healthz`` then gets no answer at all, so the
first test's clients are really slow enough to matter.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa

from ser_shared import apikeys
from ser_shared.db import make_engine, make_session_factory
from ser_shared.emotions import EMOTIONS
from ser_shared.models import Batch, Job, Result
from ser_shared.settings import Settings
from tests.conftest import private_database
from tests.proxy_tools import Gunicorn, Nginx, tone_wav

SLOW_BODIES, SLOW_HEADERS, SLOW_READERS = 22, 20, 8
TRICKLE_S = 1.0
# Each slow reader's export: EXPORT_ROWS jobs with a long transcript each, 24 MiB of CSV that costs
# gunicorn little to write but is more than the kernel's socket buffers on the way take in.
EXPORT_ROWS = 400
TRANSCRIPT = "slowly " * (24 * (1 << 20) // EXPORT_ROWS // 7)
PRODUCTION = {"SER_ENV": "production", "SER_AUTH": "true", "SER_TRUSTED_PROXIES": "1"}
WAV = tone_wav()


@pytest.fixture(scope="module")
def settings(pg_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    data = tmp_path_factory.mktemp("slow-clients")
    with private_database(pg_settings, data_dir=data, storage_dir=data / "uploads",
                          default_queue="slow-clients-test") as private:  # no worker listens here
        yield private


@pytest.fixture(scope="module")
def api_key(settings: Settings) -> str:
    """A key whose tenant owns EXPORT_ROWS jobs, so that its export is large."""
    engine = make_engine(settings)
    try:
        with make_session_factory(engine)() as session:
            key = apikeys.create(session, "slow-clients")
            session.commit()
        fill_export(engine, key.tenant)
    finally:
        engine.dispose()
    return key.key


def fill_export(engine: sa.Engine, tenant: str) -> None:
    batch, now = uuid.uuid4(), datetime.now(UTC)
    probs = dict.fromkeys(EMOTIONS, 1 / len(EMOTIONS))
    jobs = [{"id": uuid.uuid4(), "batch_id": batch, "tenant": tenant, "position": i, "filename": f"call-{i:04d}.wav",
             "size_bytes": 1, "format": "wav", "options": {}, "status": "succeeded", "attempts": 1,
             "created_at": now - timedelta(seconds=i), "finished_at": now, "emotion": "neutral",
             "confidence": probs["neutral"]} for i in range(EXPORT_ROWS)]
    results = [{"job_id": job["id"], "emotion": "neutral", "confidence": probs["neutral"], "uncertain": True,
                "probabilities": probs, "model_probabilities": {"rf": probs, "lstm": probs},
                "model_versions": {"rf": "test", "lstm": "test"}, "timings_ms": {"total": 1.0},
                "transcript": {"status": "succeeded", "engine": "sphinx", "language": "en-US", "text": TRANSCRIPT},
                "created_at": now} for job in jobs]
    with engine.begin() as conn:
        conn.execute(sa.insert(Batch), [{"id": batch, "tenant": tenant, "file_count": EXPORT_ROWS, "options": {},
                                         "created_at": now}])
        conn.execute(sa.insert(Job), jobs)
        conn.execute(sa.insert(Result), results)


class SlowClients:
    """Connections that trickle a body or headers, and exports whose answers are never read."""

    def __init__(self, port: int, key: str) -> None:
        self.port = port
        self.bodies = [self._connect() for _ in range(SLOW_BODIES)]
        for sock in self.bodies:  # no key needed: the sign-in form is public
            sock.sendall(b"POST /login HTTP/1.1\r\nHost: ser.test\r\nContent-Type: application/x-www-form-urlencoded"
                         b"\r\nContent-Length: 1000000\r\n\r\napi_key=")
        self.headers: list[socket.socket] = []
        self.readers = [self._connect(rcvbuf=4096) for _ in range(SLOW_READERS)]
        for sock in self.readers:  # sent whole; the answer is never read
            sock.sendall(f"GET /api/v1/export?format=csv HTTP/1.1\r\nHost: ser.test\r\n"
                         f"Authorization: Bearer {key}\r\n\r\n".encode())
        self.stopping = threading.Event()
        self.trickler = threading.Thread(target=self._trickle, daemon=True)
        self.trickler.start()

    def open_headers(self) -> None:
        """Start the header tricklers (separately: a proxy may rightly cut them off after a while)."""
        for _ in range(SLOW_HEADERS):
            sock = self._connect()
            sock.sendall(b"GET /healthz?slow-headers HTTP/1.1\r\nHost: ser.test\r\n")
            self.headers.append(sock)

    def _connect(self, rcvbuf: int | None = None) -> socket.socket:
        sock = socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: fixes the window
        sock.connect(("127.0.0.1", self.port))
        return sock

    def _trickle(self) -> None:
        n = 0
        while not self.stopping.wait(TRICKLE_S):
            n += 1
            for sock in self.bodies:
                _send(sock, b"x")
            for sock in list(self.headers):
                _send(sock, f"X-Slow-{n}: {n}\r\n".encode())

    def held(self, socks: list[socket.socket]) -> int:
        """How many of ``socks`` the server still holds open without having answered."""
        return sum(_open_and_unanswered(sock) for sock in socks)

    def close(self) -> None:
        self.stopping.set()
        self.trickler.join(timeout=10)
        for sock in (*self.bodies, *self.headers, *self.readers):
            sock.close()


def _send(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):  # the server gave up on this one (nginx's header timeout, say)
        sock.send(data)


def _open_and_unanswered(sock: socket.socket) -> bool:
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True  # nothing to read, and not closed
    except OSError:
        return False
    return False  # an answer (an error, say) or the end of the connection


def timed(call: Callable[[], requests.Response]) -> tuple[int | None, float]:
    """(status, seconds); status None when no answer came within the call's timeout."""
    started = time.monotonic()
    try:
        status: int | None = call().status_code
    except requests.Timeout:
        status = None
    return status, time.monotonic() - started


def requests_logged(web: Gunicorn, start: str) -> int:
    """Requests gunicorn finished (its access log writes a line once the response is sent)."""
    return sum(f'"{start}' in line for line in web.log_text().splitlines())


def exports_done(web: Gunicorn, timeout: float = 60) -> None:
    """Wait until gunicorn has sent every slow reader's export in full (to nginx, which keeps it).

    gunicorn logs a request once it is over, also when the connection broke off halfway, so the
    logged body size tells a finished export from one cut off (by nginx's 30 s send timeout).
    """
    def logged() -> list[tuple[str, str]]:
        return re.findall(r'"GET /api/v1/export[^"]*" (\d{3}) (\d+|-)', web.log_text())

    deadline = time.monotonic() + timeout
    while len(lines := logged()) < SLOW_READERS and time.monotonic() < deadline:
        time.sleep(0.5)
    full = EXPORT_ROWS * len(TRANSCRIPT)
    sent = [int(size) if size.isdigit() else 0 for _, size in lines]
    assert len(sent) == SLOW_READERS and min(sent) >= full, (
        f"gunicorn sent {sum(n >= full for n in sent)} of {SLOW_READERS} exports in full within {timeout:.0f} s "
        f"(bytes sent: {sent}): slow clients are holding its threads (is the proxy buffering?)")


def test_fifty_slow_clients_do_not_stall_the_web_tier_behind_nginx(settings: Settings, api_key: str,
                                                                   tmp_path: Path) -> None:
    web = Gunicorn(settings, tmp_path, PRODUCTION)
    proxy: Nginx | None = None
    slow: SlowClients | None = None
    base, bearer = "", {"Authorization": f"Bearer {api_key}"}

    def healthz() -> requests.Response:
        return requests.get(f"{base}/healthz", timeout=5)

    def upload() -> requests.Response:
        return requests.post(f"{base}/api/v1/jobs", files={"file": ("tone.wav", WAV, "audio/wav")}, headers=bearer,
                             timeout=5)

    try:
        proxy = Nginx(web.port, tmp_path)
        base = f"http://127.0.0.1:{proxy.port}"
        assert upload().status_code == 202  # the path works (and is warm) before the clients arrive

        slow = SlowClients(proxy.port, api_key)
        started = time.monotonic()
        exports_done(web)
        exported_s = time.monotonic() - started
        slow.open_headers()
        time.sleep(2 * TRICKLE_S)  # every trickling client is mid-request
        headers_held = slow.held(slow.headers)  # nginx allows 10 s for a whole header
        answers = [(timed(healthz), timed(upload)) for _ in range(3)]
        bodies_held = slow.held(slow.bodies)
    finally:
        if slow is not None:
            slow.close()
        if proxy is not None:
            proxy.stop()
        web.stop()
    print(f"\nbehind nginx, with {SLOW_BODIES + SLOW_HEADERS + SLOW_READERS} slow clients: exports off gunicorn "
          f"in {exported_s:.1f} s; "
          + ", ".join(f"healthz {h[0]} in {h[1] * 1000:.0f} ms, upload {u[0]} in {u[1] * 1000:.0f} ms"
                      for h, u in answers))
    for (health_status, health_s), (upload_status, upload_s) in answers:
        assert health_status == 200 and health_s < 1.0, answers
        assert upload_status == 202 and upload_s < 1.0, answers
    # The trickling clients were still held throughout, and gunicorn never saw one of their requests.
    assert (bodies_held, headers_held) == (SLOW_BODIES, SLOW_HEADERS)
    assert requests_logged(web, "POST /login") == 0
    assert requests_logged(web, "GET /healthz?slow-headers") == 0


def test_gunicorn_alone_is_stalled_by_the_same_clients(settings: Settings, api_key: str, tmp_path: Path) -> None:
    """The contrast, and the proof that the clients above are slow enough to matter: without the
    proxy, the same 50 connections take every gunicorn thread and ``/healthz`` gets no answer. The
    bound (3 s) is not a latency claim: the clients would hold the threads for days.

    One worker (4 threads): with two, the kernel decides which worker accepts each connection, and
    it may hand all 50 to one of them, leaving the other free (seen here); behind the proxy that
    does not matter, as gunicorn never sees a slow client.
    """
    web = Gunicorn(settings, tmp_path, PRODUCTION, workers=1)
    slow: SlowClients | None = None
    try:
        slow = SlowClients(web.port, api_key)
        slow.open_headers()
        time.sleep(2 * TRICKLE_S)
        status, seconds = timed(lambda: requests.get(f"http://127.0.0.1:{web.port}/healthz", timeout=3))
    finally:
        if slow is not None:
            slow.close()  # first: closing them frees the threads, so gunicorn can stop promptly
        web.stop()
    print(f"\ngunicorn alone: /healthz {status} after {seconds:.1f} s")
    assert status is None, f"/healthz answered {status} in {seconds:.2f} s while gunicorn's threads were held"


def test_an_oversized_upload_is_refused_by_the_proxy_in_the_apis_error_shape(settings: Settings,
                                                                             tmp_path: Path) -> None:
    """The proxy's size limit is the app's (SER_MAX_REQUEST_MB): refused before the body is read,
    with the same JSON error the app gives, and gunicorn never sees it."""
    web = Gunicorn(settings, tmp_path, PRODUCTION | {"SER_MAX_REQUEST_MB": "1"})
    try:
        proxy = Nginx(web.port, tmp_path, max_request_mb=1)
        try:
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
                sock.sendall(b"POST /api/v1/jobs HTTP/1.1\r\nHost: ser.test\r\nContent-Type: multipart/form-data; "
                             b"boundary=b\r\nContent-Length: 21474836480\r\n\r\n--b\r\n")  # 20 GiB announced
                answer = b""
                while chunk := sock.recv(65536):
                    answer += chunk
        finally:
            proxy.stop()
    finally:
        web.stop()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and b"application/json" in head, head
    assert json.loads(body)["error"] == {"code": "request_too_large", "message": "request body exceeds 1 MiB"}
    assert requests_logged(web, "POST /api/v1/jobs") == 0
