"""Python SDK for a SER (speech emotion recognition) server: ``Client``, ``AsyncClient``, typed results.

The command line (``ser submit|status|history``, or ``ser-client``) is ``ser_client.cli``.
"""

from ser_client._http import RetryEvent, RetryPolicy
from ser_client._version import __version__
from ser_client.client import AsyncClient, Client, JobFilters
from ser_client.errors import (
    APIConnectionError,
    APIResponseError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    InternalServerError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RequestTooLargeError,
    SERError,
    WaitTimeoutError,
)
from ser_client.types import (
    Batch,
    Channel,
    Conversation,
    ErrorInfo,
    Job,
    JobError,
    JobPage,
    JobSummary,
    Result,
    Segment,
    UploadAccepted,
)

__all__ = [
    "APIConnectionError", "APIResponseError", "APIStatusError", "APITimeoutError", "AsyncClient",
    "AuthenticationError", "BadRequestError", "Batch", "Channel", "Client", "ConflictError", "Conversation",
    "ErrorInfo", "InternalServerError",
    "Job", "JobError", "JobFilters", "JobPage", "JobSummary", "NotFoundError", "PermissionDeniedError",
    "RateLimitError", "RequestTooLargeError", "Result", "RetryEvent", "RetryPolicy", "SERError", "Segment",
    "UploadAccepted", "WaitTimeoutError", "__version__",
]
