"""Requests to one SER server over httpx, with retries; the sync and async loops share everything else.

Retried (as the OpenAI and Stripe SDKs do): connection errors and timeouts, 408, 409
``idempotency_key_in_progress`` (the first attempt of the same upload still runs), 429 and
500/502/503/504. Never any other 4xx: a bad request stays bad. The pause is the server's
``Retry-After`` when it sends one (up to ``max_retry_after_s``; a longer one is not waited for),
otherwise exponential backoff with full jitter, so many clients failing at once do not come back
at once. An upload carries an Idempotency-Key that every retry repeats, which is what makes
retrying a POST safe: the server answers a repeat with the first response.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import socket
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx

from ser_client._uploads import Upload
from ser_client._version import __version__
from ser_client.errors import APIConnectionError, APIResponseError, APITimeoutError, SERError, status_error

log = logging.getLogger("ser_client")

DEFAULT_URL = "http://127.0.0.1:8000"
API = "/api/v1"
DEFAULT_TIMEOUT_S = 60.0
# The server reads and probes every file of an upload before it answers, so a large batch takes a while.
UPLOAD_TIMEOUT_S = 600.0
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
IN_PROGRESS = "idempotency_key_in_progress"
# Transport failures worth another try; others (a malformed URL, say) fail the same way every time.
RETRY_TRANSPORT = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
Params = Mapping[str, Any]


@dataclass(frozen=True)
class RetryPolicy:
    """How many retries, and how long to pause before each."""

    max_retries: int = 2
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0
    # A server asking for a longer pause than this is not going to recover within one call.
    max_retry_after_s: float = 300.0

    def delay(self, error: SERError, attempt: int) -> float | None:
        """Seconds to pause before retrying after failed attempt ``attempt`` (0-based), or None: give up."""
        if attempt >= self.max_retries or not retryable(error):
            return None
        if error.retry_after is not None:
            return error.retry_after if error.retry_after <= self.max_retry_after_s else None
        return random.uniform(0.0, min(self.max_delay_s, self.base_delay_s * 2**attempt))  # full jitter


def retryable(error: SERError) -> bool:
    if isinstance(error, APIConnectionError):
        return error.transient
    return error.status in RETRY_STATUSES or (error.status == 409 and error.code == IN_PROGRESS)


@dataclass(frozen=True)
class RetryEvent:
    """Told to ``on_retry`` before each pause: what failed, and retry ``attempt`` of ``max_retries``."""

    error: SERError
    attempt: int
    max_retries: int
    delay_s: float
    method: str
    url: str


RetryHook = Callable[[RetryEvent], None]


def parse_retry_after(headers: httpx.Headers) -> float | None:
    """``Retry-After`` (seconds or an HTTP date) or ``retry-after-ms``, as seconds."""
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
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
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def error_from_response(response: httpx.Response) -> SERError:
    """The exception for an error answer (its body already read)."""
    status = response.status_code
    body: Any = None
    try:
        body = response.json()
        error = body["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        code = f"http_{status}"
        message = response.content.decode(errors="replace").strip()[:200] or f"HTTP {status}"
    return status_error(status, code, message, request_id=response.headers.get("x-request-id"),
                        retry_after=parse_retry_after(response.headers), body=body)


def _why(exc: BaseException) -> str:
    """A short reason for a transport failure, from the OS error underneath httpx's."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError):
            return "connection refused"
        if isinstance(seen, socket.gaierror):
            return "host name not found"
        if isinstance(seen, TimeoutError | httpx.TimeoutException):
            return "timed out"
        seen = seen.__cause__ or seen.__context__
    return str(exc) or type(exc).__name__


def connection_error(exc: httpx.TransportError, base_url: str) -> APIConnectionError:
    cls = APITimeoutError if isinstance(exc, httpx.TimeoutException) else APIConnectionError
    return cls(f"cannot reach the SER server at {base_url} ({_why(exc)})", transient=isinstance(exc, RETRY_TRANSPORT))


def decode(response: httpx.Response, base_url: str) -> Any:
    """The JSON body (None when empty); APIResponseError when it is not JSON."""
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        raise APIResponseError(f"{response.request.url} did not answer with JSON; is {base_url} a SER server?",
                               status=response.status_code) from None


class _Base:
    """Settings and request building shared by the sync and async transports."""

    def __init__(self, base_url: str, api_key: str | None, timeout_s: float, policy: RetryPolicy,
                 on_retry: RetryHook | None, headers: Mapping[str, str] | None) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key or None
        self.timeout_s = timeout_s
        self.policy = policy
        self.on_retry = on_retry
        self.headers = {"Accept": "application/json", "User-Agent": f"ser-client/{__version__}", **(headers or {})}
        if self.api_key:
            self.headers["Authorization"] = f"Bearer {self.api_key}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def _build(self, client: httpx.Client | httpx.AsyncClient, stack: ExitStack, method: str, path: str,
               params: Params | None, upload: Upload | None, headers: Mapping[str, str] | None) -> httpx.Request:
        query = {k: _param(v) for k, v in (params or {}).items() if v is not None and v != ""}
        files = stack.enter_context(upload.opened()) if upload is not None else None
        timeout = max(self.timeout_s, UPLOAD_TIMEOUT_S) if upload is not None else self.timeout_s
        return client.build_request(method, self.url(path), params=query, headers={**self.headers, **(headers or {})},
                                    data=upload.fields if upload is not None else None, files=files,
                                    timeout=timeout)

    def _next_delay(self, error: SERError, attempt: int, upload: Upload | None, method: str, path: str) -> float:
        """The pause before the next attempt; raises ``error`` when there is none to make."""
        delay = None if upload is not None and not upload.replayable else self.policy.delay(error, attempt)
        if delay is None:
            raise error
        event = RetryEvent(error, attempt + 1, self.policy.max_retries, delay, method, self.url(path))
        log.info("retrying %s %s in %.1f s (%d/%d): %s", method, path, delay, attempt + 1,
                 self.policy.max_retries, error)
        if self.on_retry is not None:
            self.on_retry(event)
        return delay


def _param(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple | set | frozenset):
        return ",".join(str(v) for v in value)
    if isinstance(value, datetime):
        return value.isoformat()
    return value


class SyncHTTP(_Base):
    def __init__(self, base_url: str, api_key: str | None, timeout_s: float, policy: RetryPolicy,
                 on_retry: RetryHook | None = None, headers: Mapping[str, str] | None = None,
                 http_client: httpx.Client | None = None) -> None:
        super().__init__(base_url, api_key, timeout_s, policy, on_retry, headers)
        self.client = http_client or httpx.Client(follow_redirects=True)

    def request(self, method: str, path: str, *, params: Params | None = None, upload: Upload | None = None,
                headers: Mapping[str, str] | None = None, stream: bool = False) -> httpx.Response:
        """The response to a successful attempt (open, when ``stream``: the caller closes it)."""
        attempt = 0
        while True:
            try:
                with ExitStack() as stack:
                    request = self._build(self.client, stack, method, path, params, upload, headers)
                    response = self.client.send(request, stream=stream)
            except httpx.TransportError as exc:
                error: SERError = connection_error(exc, self.base_url)
            else:
                if response.status_code < 400:
                    return response
                response.read()
                response.close()
                error = error_from_response(response)
            time.sleep(self._next_delay(error, attempt, upload, method, path))
            attempt += 1

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        return decode(self.request(method, path, **kwargs), self.base_url)

    def close(self) -> None:
        self.client.close()


class AsyncHTTP(_Base):
    def __init__(self, base_url: str, api_key: str | None, timeout_s: float, policy: RetryPolicy,
                 on_retry: RetryHook | None = None, headers: Mapping[str, str] | None = None,
                 http_client: httpx.AsyncClient | None = None) -> None:
        super().__init__(base_url, api_key, timeout_s, policy, on_retry, headers)
        self.client = http_client or httpx.AsyncClient(follow_redirects=True)

    async def request(self, method: str, path: str, *, params: Params | None = None, upload: Upload | None = None,
                      headers: Mapping[str, str] | None = None, stream: bool = False) -> httpx.Response:
        attempt = 0
        while True:
            try:
                with ExitStack() as stack:
                    request = self._build(self.client, stack, method, path, params, upload, headers)
                    response = await self.client.send(request, stream=stream)
            except httpx.TransportError as exc:
                error: SERError = connection_error(exc, self.base_url)
            else:
                if response.status_code < 400:
                    return response
                await response.aread()
                await response.aclose()
                error = error_from_response(response)
            await asyncio.sleep(self._next_delay(error, attempt, upload, method, path))
            attempt += 1

    async def json(self, method: str, path: str, **kwargs: Any) -> Any:
        return decode(await self.request(method, path, **kwargs), self.base_url)

    async def close(self) -> None:
        await self.client.aclose()
