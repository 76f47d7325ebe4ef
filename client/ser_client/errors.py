"""Every failure the SDK raises is a ``SERError``; the subclass says what kind.

The API answers errors as ``{"error": {"code", "message"}}``: ``code`` is stable and meant for
programs, ``message`` for people. Like the OpenAI and Stripe SDKs, each HTTP status that callers
handle differently has a class of its own, so ``except RateLimitError`` reads as what it means.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ser_client.types import Job

__all__ = [
    "APIConnectionError", "APIResponseError", "APIStatusError", "APITimeoutError", "AuthenticationError",
    "BadRequestError", "ConflictError", "InternalServerError", "NotFoundError", "PermissionDeniedError",
    "RateLimitError", "RequestTooLargeError", "SERError", "WaitTimeoutError", "status_error",
]


class SERError(Exception):
    """Base class. ``str(error)`` is the message; ``status`` and ``code`` are None without an HTTP answer."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 request_id: str | None = None, retry_after: float | None = None, body: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.request_id = request_id
        # Seconds the server asked to wait (its Retry-After header), when it said.
        self.retry_after = retry_after
        self.body = body


class APIConnectionError(SERError):
    """No HTTP answer at all: refused, unresolvable, reset, or the answer was lost on the way.

    ``transient`` is False for a failure that a retry would repeat (a URL without http://, say).
    """

    def __init__(self, message: str, *, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient


class APITimeoutError(APIConnectionError):
    """The server did not answer within the timeout."""


class APIResponseError(SERError):
    """An answer that is not what a SER server sends (not JSON): usually the wrong base URL."""


class APIStatusError(SERError):
    """The server answered with an error status (4xx or 5xx)."""

    status: int


class BadRequestError(APIStatusError):
    """400: a parameter or option is invalid; ``code`` says which kind."""


class AuthenticationError(APIStatusError):
    """401: no API key was sent, or it is invalid or revoked."""


class PermissionDeniedError(APIStatusError):
    """403."""


class NotFoundError(APIStatusError):
    """404: no such job or batch (or one of another tenant), or not a SER server's URL."""


class ConflictError(APIStatusError):
    """409: for instance an Idempotency-Key reused with another request."""


class RequestTooLargeError(APIStatusError):
    """413: too many files or bytes in one request."""


class RateLimitError(APIStatusError):
    """429: over the API key's rate limit or queued-jobs cap; ``retry_after`` says when to try again."""


class InternalServerError(APIStatusError):
    """5xx: the server or a proxy in front of it failed."""


class WaitTimeoutError(SERError):
    """``jobs.wait`` gave up before every job finished; ``jobs`` holds what was known then."""

    def __init__(self, message: str, jobs: list[Job]) -> None:
        super().__init__(message, code="wait_timeout")
        self.jobs = jobs


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError, 401: AuthenticationError, 403: PermissionDeniedError, 404: NotFoundError,
    409: ConflictError, 413: RequestTooLargeError, 429: RateLimitError,
}


def status_error(status: int, code: str, message: str, *, request_id: str | None = None,
                 retry_after: float | None = None, body: Any = None) -> APIStatusError:
    """The exception for an error answer with ``status``."""
    cls = _BY_STATUS.get(status) or (InternalServerError if status >= 500 else APIStatusError)
    return cls(message, status=status, code=code, request_id=request_id, retry_after=retry_after, body=body)
