"""HTTP client of the JSON API, standard library only (a client machine needs nothing but this package).

Transient failures (connection errors, 502/503/504, 429 with its ``Retry-After``, and a 409 for an
upload whose first attempt is still running) are retried a few times with backoff. Uploads carry an
``Idempotency-Key`` derived from their content, which is what makes retrying a POST safe: the server
answers a repeat with the first response instead of creating the jobs again.
"""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import json
import secrets
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

DEFAULT_URL = "http://127.0.0.1:8000"
API = "/api/v1"
# Statuses worth another try: the server or a proxy in front of it is briefly unable to answer.
TRANSIENT_STATUSES = (502, 503, 504)
BLOCK = 1 << 20
MAX_BACKOFF_S = 30.0
# A server asking for a longer pause than this is not going to recover within one command.
MAX_RETRY_AFTER_S = 300.0


class ClientError(Exception):
    """A failure the user has to know about; ``str()`` is the whole message."""

    def __init__(self, message: str, exit_code: int = 3) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ApiError(ClientError):
    """The server answered with an error (``{"error": {"code", "message"}}``)."""

    def __init__(self, message: str, status: int, code: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.retry_after = status, code, retry_after


class Unreachable(ClientError):
    """No HTTP answer at all: refused, unresolvable, reset or timed out."""


@dataclass(frozen=True)
class LocalFile:
    """A file to upload: where it is here, and the name the server is told."""

    path: Path
    name: str
    size: int


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds: a number, or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _quote(name: str) -> str:
    """A file name for a quoted Content-Disposition parameter (UTF-8, as browsers send it)."""
    return name.replace("\\", "\\\\").replace('"', '\\"').replace("\r", " ").replace("\n", " ")


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(BLOCK):
            digest.update(block)
    return digest.hexdigest()


def idempotency_key(files: list[LocalFile], fields: Mapping[str, str], salt: str = "") -> str:
    """The same files (names and bytes) with the same options give the same key, so a rerun replays."""
    digest = hashlib.sha256(b"ser-cli-upload-v1\n" + salt.encode() + b"\n")
    for name in sorted(fields):
        digest.update(f"{name}={fields[name]}\n".encode())
    for f in files:
        digest.update(f"{f.name}\0{file_digest(f.path)}\n".encode())
    return "ser-cli-" + digest.hexdigest()


def new_salt() -> str:
    return secrets.token_hex(8)


class Multipart:
    """A streamed ``multipart/form-data`` body: its length up front, its bytes read block by block."""

    def __init__(self, files: list[LocalFile], fields: Mapping[str, str]) -> None:
        self.boundary = "ser-" + secrets.token_hex(16)
        self.files = files
        self.fields = dict(fields)
        self.length = sum(len(p) for p in self._field_parts()) + len(self._closing()) + sum(
            len(self._file_head(f)) + f.size + 2 for f in files)

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def _field_parts(self) -> list[bytes]:
        return [(f'--{self.boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n').encode()
                for name, value in self.fields.items()]

    def _file_head(self, f: LocalFile) -> bytes:
        return (f'--{self.boundary}\r\nContent-Disposition: form-data; name="file"; filename="{_quote(f.name)}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n").encode()

    def _closing(self) -> bytes:
        return f"--{self.boundary}--\r\n".encode()

    def chunks(self, sent: Callable[[int], None]) -> Iterator[bytes]:
        """The body; ``sent`` is told how many file bytes went out (for a progress bar).

        Raises ClientError if a file changed size since it was listed (the length is already sent).
        """
        yield from self._field_parts()
        for f in self.files:
            yield self._file_head(f)
            left = f.size
            with f.path.open("rb") as handle:
                while left > 0 and (block := handle.read(min(BLOCK, left))):
                    left -= len(block)
                    sent(len(block))
                    yield block
            if left:
                raise ClientError(f"{f.path} changed while it was being sent; run the command again")
            yield b"\r\n"
        yield self._closing()


def _error_from(status: int, retry_after: str | None, body: bytes) -> ApiError:
    try:
        error = json.loads(body)["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        code, message = f"http_{status}", body.decode(errors="replace").strip()[:200] or f"HTTP {status}"
    return ApiError(message, status, code, _retry_after(retry_after))


class Api:
    """Calls to one SER server, with retries; every method raises ClientError subclasses only."""

    def __init__(self, base_url: str, api_key: str | None = None, retries: int = 4,
                 timeout_s: float = 60.0, say: Callable[[str], None] | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key or None
        self.retries = max(0, retries)
        self.timeout_s = timeout_s
        self.say = say or (lambda text: print(text, file=sys.stderr, flush=True))

    def url(self, path: str, params: Mapping[str, Any] | None = None) -> str:
        query = {k: v for k, v in (params or {}).items() if v not in (None, "")}
        return self.base_url + path + (("?" + urllib.parse.urlencode(query)) if query else "")

    def get(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        return self._call("GET", self.url(path, params), lambda: None, {}, self.timeout_s)

    def upload(self, files: list[LocalFile], fields: Mapping[str, str], key: str,
               sent: Callable[[int], None] = lambda n: None, rewind: Callable[[], None] = lambda: None) -> Any:
        """POST the files as one batch; ``rewind`` is called before a retry resends the body."""
        body = Multipart(files, fields)
        headers = {"Content-Type": body.content_type, "Content-Length": str(body.length), "Idempotency-Key": key}
        first = True

        def make_body() -> Iterable[bytes]:
            nonlocal first
            if not first:
                rewind()
            first = False
            return body.chunks(sent)

        # The server reads and probes every file before it answers, so a large batch takes a while.
        return self._call("POST", self.url(f"{API}/jobs"), make_body, headers, max(self.timeout_s, 600.0))

    def _call(self, method: str, url: str, make_body: Callable[[], Iterable[bytes] | None],
              headers: dict[str, str], timeout_s: float) -> Any:
        for attempt in range(self.retries + 1):
            try:
                return self._once(method, url, make_body(), headers, timeout_s)
            except (ApiError, Unreachable) as exc:
                delay = self._retry_delay(exc, attempt)
                if delay is None or attempt == self.retries:
                    raise
                self.say(f"{exc}; retrying in {delay:.1f} s ({attempt + 1}/{self.retries})")
                time.sleep(delay)
        raise AssertionError("unreachable")  # the loop returns or raises

    def _retry_delay(self, exc: ClientError, attempt: int) -> float | None:
        """Seconds to wait before retrying ``exc``, or None when retrying cannot help."""
        backoff = min(MAX_BACKOFF_S, 0.5 * 2**attempt)
        if isinstance(exc, Unreachable):
            return backoff
        assert isinstance(exc, ApiError)
        transient = (exc.status in TRANSIENT_STATUSES or exc.status == 429
                     or exc.code == "idempotency_key_in_progress")
        if not transient:
            return None
        if exc.retry_after is not None:
            return exc.retry_after if exc.retry_after <= MAX_RETRY_AFTER_S else None
        return backoff

    def _once(self, method: str, url: str, body: Iterable[bytes] | None, headers: dict[str, str],
              timeout_s: float) -> Any:
        request = urllib.request.Request(url, data=body, method=method,
                                         headers={"Accept": "application/json", **headers})
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 - URL from the user
                return self._decode(response, url)
        except urllib.error.HTTPError as exc:
            raise _error_from(exc.code, exc.headers.get("Retry-After"), exc.read()) from None
        except urllib.error.URLError as exc:
            raise Unreachable(self._unreachable(exc.reason)) from None
        except (http.client.HTTPException, ConnectionError, TimeoutError) as exc:
            raise Unreachable(self._unreachable(exc)) from None

    def _decode(self, response: IO[bytes], url: str) -> Any:
        raw = response.read()
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            raise ClientError(f"{url} did not answer with JSON; is {self.base_url} a SER server?") from None

    def _unreachable(self, reason: object) -> str:
        if isinstance(reason, ConnectionRefusedError):
            why = "connection refused"
        elif isinstance(reason, socket.gaierror):
            why = "host name not found"
        elif isinstance(reason, TimeoutError):
            why = "timed out"
        else:
            why = str(reason) or type(reason).__name__
        return f"cannot reach the SER server at {self.base_url} ({why})"


def explain(exc: ClientError, api: Api) -> str:
    """The message to show for a failure, with what to do about it."""
    if isinstance(exc, Unreachable):
        return f"{exc}. Is it running? Point to it with --server URL or the SER_URL environment variable."
    if not isinstance(exc, ApiError):
        return str(exc)
    if exc.status == 401:
        if api.api_key is None:
            return (f"the server requires an API key ({exc}): pass --api-key KEY or set SER_API_KEY "
                    "(an administrator creates one with 'ser keys create --name NAME')")
        return f"the API key was not accepted: it is invalid or revoked ({exc})"
    if exc.status == 429:
        wait = f"; the server asks to wait {exc.retry_after:.0f} s" if exc.retry_after is not None else ""
        return f"rate limited by the server ({exc.code}): {exc}{wait}"
    if exc.status == 413 or exc.code == "too_many_files":
        return f"{exc} ({exc.code}): send fewer files per request with --batch-size"
    if exc.status == 404 and exc.code != "not_found":
        return f"{api.base_url} answered 404 ({exc}); is --server the base URL of a SER server?"
    return f"{exc} ({exc.code}, HTTP {exc.status})"
