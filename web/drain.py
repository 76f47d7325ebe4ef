"""Read what is left of a request body before answering, so that a refusal always arrives.

An upload refused before its body is read (429 from the limits, 401/403 from authentication, 413 on
its declared length) leaves the rest of the body on the socket. gunicorn then drains only a little
(64 KiB in its threaded worker) before it gives up and closes the connection, although its response
announced keep-alive: the client's next request on that connection meets a closed socket, and a
client still sending the refused body meets a reset that can discard the answer it was owed.
Reading and discarding the rest here, within bounds, leaves the connection clean for the next
request. A body over the bound is not read at all: its client, sending for a long while, is better
answered at once (it sees the refusal if it reads while it sends, as ``curl`` and browsers do).
"""

from __future__ import annotations

import contextlib
import socket
import time
from typing import IO, cast

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.wsgi import LimitedStream

from web.errors import MALFORMED_BODY

STOP_READING: tuple[type[Exception], ...] = (OSError, ValueError, HTTPException, *MALFORMED_BODY)

# Enough for the refused uploads of ordinary clients (a batch of a few recordings) to be read off the
# wire; reading discards the bytes, so the cost is the bandwidth, which the client spends anyway.
MAX_DRAIN_BYTES = 32 << 20
# A client trickling its body, or stalled, must not hold a server thread for long once it is refused.
MAX_DRAIN_SECONDS = 10.0
CHUNK = 64 << 10


def register(app: Flask) -> None:
    app.after_request(drain_unread_body)


def drain_unread_body(response: Response) -> Response:
    """Discard the request body the handler left unread, when it is within the bounds above."""
    chunked = "chunked" in request.headers.get("Transfer-Encoding", "").lower()
    length = request.content_length
    if not length and not chunked:
        return response
    if length is not None and length > MAX_DRAIN_BYTES:
        return response
    stream = _body_stream()
    if stream is not None:
        _discard(stream, MAX_DRAIN_BYTES, time.monotonic() + MAX_DRAIN_SECONDS)
    return response


def _body_stream() -> IO[bytes] | None:
    """The request body where the handler left off; None when it cannot be read safely."""
    try:
        # werkzeug's stream stops at Content-Length and counts what the handler consumed.
        return request.stream
    except RequestEntityTooLarge:
        # Refused on its declared length before a byte was read: read the raw input, bounded by it.
        environ = request.environ
        if environ.get("wsgi.input_terminated"):
            return environ["wsgi.input"]  # type: ignore[no-any-return]
        if request.content_length is None:
            return None
        return cast(IO[bytes], LimitedStream(environ["wsgi.input"], request.content_length))


def _discard(stream: IO[bytes], limit: int, deadline: float) -> int:
    """Read and drop up to ``limit`` bytes until the stream ends or ``deadline`` passes; the count read.

    Under gunicorn each read waits at most until the deadline (its socket's timeout is set for the
    drain and put back after), so a client that stops sending cannot hold the thread.
    """
    sock = request.environ.get("gunicorn.socket")
    sock = sock if isinstance(sock, socket.socket) else None
    prior = sock.gettimeout() if sock is not None else None
    total = 0
    try:
        while total < limit:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if sock is not None:
                sock.settimeout(remaining)
            data = stream.read(min(CHUNK, limit - total))
            if not data:
                break
            total += len(data)
    except STOP_READING:
        # Timed out, the client went away, a chunked body ran past the limit or is malformed: stop.
        pass
    finally:
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.settimeout(prior)
    return total
