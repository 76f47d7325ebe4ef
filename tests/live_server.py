"""A WSGI app served from a thread on a free port, and a forwarding proxy that injects faults.

Used by the client tests (``tests/system/test_cli_client.py``, ``tests/system/test_sdk.py``) and the browser
tests (``tests/system/browser``) through the ``live_server`` and ``auth_server`` fixtures in
``tests/conftest.py``.
"""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from flask import Flask
from werkzeug.serving import make_server


@contextmanager
def serve(app: Flask) -> Iterator[str]:
    """Serve ``app`` on a free port of 127.0.0.1 from a thread; yields its base URL."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="live-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FlakyProxy:
    """A forwarding proxy that injects faults, each once, for the first request of its method:

    - ``"drop"`` forwards the request and then hangs up without the answer (a lost response);
    - ``"429"`` answers 429 with ``Retry-After: 1`` and an empty body;
    - ``"503"`` answers 503 with the API's error shape and no Retry-After.

    ``log`` has ``(method, path, fault)`` per request, ``headers`` each request's headers.
    """

    def __init__(self, upstream: str, faults: list[tuple[str, str]]) -> None:
        self.upstream, self.faults = upstream, faults
        self.log: list[tuple[str, str, str | None]] = []
        self.headers: list[dict[str, str]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                proxy.handle(self)

            def do_POST(self) -> None:
                proxy.handle(self)

            def do_DELETE(self) -> None:
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
        self.headers.append(dict(h.headers.items()))
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0)) if h.command == "POST" else None
        if fault == "429":
            self._answer(h, 429, b"", {"Retry-After": "1"})
            return
        if fault == "503":
            error = {"error": {"code": "database_unavailable", "message": "injected by the test proxy"}}
            self._answer(h, 503, json.dumps(error).encode())
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
        self._answer(h, status, payload)

    @staticmethod
    def _answer(h: BaseHTTPRequestHandler, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
        h.send_response(status)
        for name, value in (headers or {}).items():
            h.send_header(name, value)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        h.wfile.write(payload)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
