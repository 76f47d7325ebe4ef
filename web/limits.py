"""Per-key upload limits, answered with 429 and Retry-After.

Each API key has its own budget: a runaway script on one key does not lock out the tenant's other
keys or its people signed in to the pages. In single-user mode (authentication off, no keys) the
one local user has the budget. The windows are counted from the batches and jobs tables themselves
(indexed on key and creation time), so every web process sees the same counts without another
store, in the embedded SQLite mode too. Two requests racing at the edge of a limit can both pass;
the limits are meant to stop floods and runaway scripts, not to meter to the exact file.

Why not Flask-Limiter: it counts requests in a store of its own, and the embedded mode has no Redis
(its in-memory store is per process, so each gunicorn worker would grant a full budget). It would
also count refused and failed requests, where these windows count only uploads that were taken; a
per-file cost needs the file count, which is known only after the body is read; and the queued-jobs
cap is not a rate at all but the database's state. Two of the three checks would stay here anyway.
"""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select

from ser_shared.errors import TooManyRequests
from ser_shared.models import Batch, Job, JobStatus
from web.context import Services

WINDOW = timedelta(minutes=1)
# Nothing says when queued work will drain; half a minute is a polite first retry.
QUEUED_RETRY_S = 30


def _retry_after(oldest: datetime | None, now: datetime) -> int:
    """Seconds until the oldest counted request leaves the window."""
    if oldest is None:
        return 1
    return max(1, math.ceil((oldest + WINDOW - now).total_seconds()))


def check(svc: Services, tenant: str, key_id: uuid.UUID | None, files: int = 0) -> None:
    """Raise TooManyRequests if the caller (``key_id``, or ``tenant`` when there is no key) may not
    upload ``files`` more recordings now.

    Called twice per upload: with ``files=0`` before the body is read (requests per minute, and a
    queue already at its cap), then with the request's file count.
    """
    settings = svc.settings
    now = datetime.now(UTC)
    batches_of = Batch.api_key_id == key_id if key_id is not None else Batch.tenant == tenant
    jobs_of = Job.api_key_id == key_id if key_id is not None else Job.tenant == tenant
    per, of = (" per API key", " of this API key") if key_id is not None else ("", "")
    with svc.sessions() as session:
        # min() keeps the column's type, so ``oldest`` comes back aware UTC on SQLite too.
        recent = select(func.count(), func.coalesce(func.sum(Batch.file_count), 0), func.min(Batch.created_at)).where(
            batches_of, Batch.created_at >= now - WINDOW)
        uploads, uploaded_files, oldest = session.execute(recent).one()
        if files == 0:
            if uploads >= settings.rate_limit_uploads_per_minute:
                raise TooManyRequests(
                    f"at most {settings.rate_limit_uploads_per_minute} uploads a minute{per}; wait and retry",
                    retry_after=_retry_after(oldest, now))
        # One request may carry more than the limit when nothing else is in the window.
        elif uploaded_files and uploaded_files + files > settings.rate_limit_files_per_minute:
            raise TooManyRequests(
                f"at most {settings.rate_limit_files_per_minute} files a minute{per} ({uploaded_files} in the "
                "last minute); wait and retry", retry_after=_retry_after(oldest, now))
        waiting = session.scalar(select(func.count()).where(
            jobs_of, Job.status.in_((JobStatus.QUEUED.value, JobStatus.PROCESSING.value)))) or 0
        if waiting and waiting + max(files, 1) > settings.max_queued_jobs:
            raise TooManyRequests(
                f"{waiting} jobs{of} are waiting or running (cap {settings.max_queued_jobs}); "
                "retry when they finish", retry_after=QUEUED_RETRY_S, code="too_many_queued_jobs")
