"""Per-tenant upload limits, answered with 429 and Retry-After.

The windows are counted from the batches and jobs tables themselves (indexed on tenant and
creation time), so every web process sees the same counts without another store, in the embedded
SQLite mode too. Two requests racing at the edge of a limit can both pass; the limits are meant
to stop floods and runaway scripts, not to meter to the exact file.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ser_shared.errors import TooManyRequests
from ser_shared.models import Batch, Job, JobStatus
from web.app import Services

WINDOW = timedelta(minutes=1)
# Nothing says when queued work will drain; half a minute is a polite first retry.
QUEUED_RETRY_S = 30


def _naive_if_sqlite(session: Session, value: datetime) -> datetime:
    return value.replace(tzinfo=None) if session.get_bind().dialect.name == "sqlite" else value


def _retry_after(oldest: datetime | None, now: datetime) -> int:
    """Seconds until the oldest counted request leaves the window."""
    if oldest is None:
        return 1
    if oldest.tzinfo is None:
        oldest = oldest.replace(tzinfo=UTC)
    return max(1, math.ceil((oldest + WINDOW - now).total_seconds()))


def check(svc: Services, tenant: str, files: int = 0) -> None:
    """Raise TooManyRequests if ``tenant`` may not upload ``files`` more recordings now.

    Called twice per upload: with ``files=0`` before the body is read (requests per minute, and a
    queue already at its cap), then with the request's file count.
    """
    settings = svc.settings
    now = datetime.now(UTC)
    with svc.sessions() as session:
        since = _naive_if_sqlite(session, now - WINDOW)
        if files == 0:
            count, oldest = session.execute(
                select(func.count(), func.min(Batch.created_at)).where(Batch.tenant == tenant,
                                                                       Batch.created_at >= since)).one()
            if count >= settings.rate_limit_uploads_per_minute:
                raise TooManyRequests(
                    f"at most {settings.rate_limit_uploads_per_minute} uploads a minute; wait and retry",
                    retry_after=_retry_after(oldest, now))
        else:
            count, oldest = session.execute(
                select(func.count(), func.min(Job.created_at)).where(Job.tenant == tenant,
                                                                     Job.created_at >= since)).one()
            # One request may carry more than the limit when nothing else is in the window.
            if count and count + files > settings.rate_limit_files_per_minute:
                raise TooManyRequests(
                    f"at most {settings.rate_limit_files_per_minute} files a minute ({count} in the last "
                    "minute); wait and retry", retry_after=_retry_after(oldest, now))
        waiting = session.scalar(select(func.count()).where(
            Job.tenant == tenant, Job.status.in_((JobStatus.QUEUED.value, JobStatus.PROCESSING.value)))) or 0
        if waiting and waiting + max(files, 1) > settings.max_queued_jobs:
            raise TooManyRequests(
                f"{waiting} jobs are waiting or running (cap {settings.max_queued_jobs}); retry when they finish",
                retry_after=QUEUED_RETRY_S, code="too_many_queued_jobs")
