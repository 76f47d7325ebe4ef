"""The task's soft time limit, which the numeric code must let through.

The pipeline and the transcriber catch broad errors per recording (one bad file fails alone); the
exception Celery raises in a task that ran out of time is not one recording's fault, so they
re-raise it and the task fails the chunk ``time_limit_exceeded``. It is billiard's class (Celery's
process pool, which ``celery.exceptions`` re-exports): importing it loads no Celery app, broker or
settings, so this package stays free of Celery.
"""

from __future__ import annotations

try:
    from billiard.exceptions import SoftTimeLimitExceeded as TimeLimit
except ImportError:  # pragma: no cover - billiard comes with Celery, which every server install has

    class TimeLimit(Exception):  # type: ignore[no-redef]
        """Never raised: without Celery's pool there is no soft time limit."""


__all__ = ["TimeLimit"]
