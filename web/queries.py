"""Read queries for the API and pages: filtered, keyset-paginated job history."""

from __future__ import annotations

import base64
import binascii
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Select, and_, func, or_, select
from sqlalchemy.orm import Session, selectinload

from ser_shared.emotions import EMOTIONS
from ser_shared.errors import BadRequest, NotFound
from ser_shared.models import Batch, Job, JobStatus, WebhookDelivery

STATUSES = tuple(s.value for s in JobStatus)
MAX_LIMIT = 200


@dataclass
class JobFilter:
    status: str | None = None
    emotion: str | None = None
    batch_id: uuid.UUID | None = None
    since: datetime | None = None
    until: datetime | None = None
    q: str | None = None
    client_reference: str | None = None


def parse_uuid(value: str, what: str = "id") -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except (ValueError, TypeError) as exc:
        raise NotFound(f"no such {what}") from exc


def _parse_time(value: str | None, name: str) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise BadRequest(f"{name} must be an ISO 8601 date or time", code="invalid_parameter") from exc
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def parse_filter(args: dict[str, str]) -> JobFilter:
    """Validate query-string filters; bad values are a 400 with a clear code."""
    status = args.get("status") or None
    if status and status not in STATUSES:
        raise BadRequest(f"status must be one of {', '.join(STATUSES)}", code="invalid_parameter")
    emotion = args.get("emotion") or None
    if emotion and emotion not in EMOTIONS:
        raise BadRequest(f"emotion must be one of {', '.join(EMOTIONS)}", code="invalid_parameter")
    batch = args.get("batch_id") or args.get("batch") or None
    try:
        batch_id = uuid.UUID(batch) if batch else None
    except ValueError as exc:
        raise BadRequest("batch_id must be a UUID", code="invalid_parameter") from exc
    q = (args.get("q") or "").strip()[:200] or None
    reference = (args.get("client_reference") or "").strip()[:200] or None
    return JobFilter(status, emotion, batch_id, _parse_time(args.get("since"), "since"),
                     _parse_time(args.get("until"), "until"), q, reference)


def _db_time(session: Session, value: datetime) -> datetime:
    # SQLite stores naive UTC; Postgres compares aware timestamps.
    return value.replace(tzinfo=None) if session.get_bind().dialect.name == "sqlite" else value


def _apply(session: Session, stmt: Select, f: JobFilter) -> Select:
    if f.status:
        stmt = stmt.where(Job.status == f.status)
    if f.emotion:
        stmt = stmt.where(Job.emotion == f.emotion)
    if f.batch_id:
        stmt = stmt.where(Job.batch_id == f.batch_id)
    if f.client_reference:
        stmt = stmt.where(Job.client_reference == f.client_reference)
    if f.since:
        stmt = stmt.where(Job.created_at >= _db_time(session, f.since))
    if f.until:
        stmt = stmt.where(Job.created_at < _db_time(session, f.until))
    if f.q:
        escaped = f.q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        stmt = stmt.where(Job.filename.ilike(f"%{escaped}%", escape="\\"))
    return stmt


def encode_cursor(job: Job) -> str:
    raw = f"{job.created_at.isoformat()}|{job.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        stamp, job_id = raw.split("|")
        return datetime.fromisoformat(stamp), uuid.UUID(job_id)
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise BadRequest("cursor is not valid", code="invalid_parameter") from exc


def parse_flag(value: str | None) -> bool:
    """A boolean query parameter: 1, true or yes (any case) is on; anything else off."""
    return (value or "").strip().lower() in ("1", "true", "yes")


def parse_limit(value: str | None, default: int = 50) -> int:
    try:
        limit = int(value) if value else default
    except ValueError as exc:
        raise BadRequest("limit must be an integer", code="invalid_parameter") from exc
    if not 1 <= limit <= MAX_LIMIT:
        raise BadRequest(f"limit must be between 1 and {MAX_LIMIT}", code="invalid_parameter")
    return limit


def list_jobs(session: Session, f: JobFilter, limit: int, cursor: str | None) -> tuple[list[Job], str | None]:
    """Newest first; returns a page and the cursor of the next page (None at the end)."""
    stmt = _apply(session, select(Job).options(selectinload(Job.result)), f)
    if cursor:
        created, job_id = _decode_cursor(cursor)
        stmt = stmt.where(or_(Job.created_at < created, and_(Job.created_at == created, Job.id < job_id)))
    rows = list(session.scalars(stmt.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    next_cursor = encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return rows[:limit], next_cursor


def get_job(session: Session, job_id: str) -> Job:
    job = session.get(Job, parse_uuid(job_id, "job"), options=[selectinload(Job.result)])
    if job is None:
        raise NotFound("no such job")
    return job


def get_batch(session: Session, batch_id: str) -> Batch:
    batch = session.get(Batch, parse_uuid(batch_id, "batch"),
                        options=[selectinload(Batch.jobs).selectinload(Job.result)])
    if batch is None:
        raise NotFound("no such batch")
    return batch


def status_counts(session: Session, batch_id: uuid.UUID) -> dict[str, int]:
    rows = session.execute(select(Job.status, func.count()).where(Job.batch_id == batch_id)
                           .group_by(Job.status)).all()
    counts = dict.fromkeys(STATUSES, 0)
    counts.update({status: n for status, n in rows})
    return counts


def deliveries_for_job(session: Session, job_id: uuid.UUID) -> list[WebhookDelivery]:
    return list(session.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
                                .order_by(WebhookDelivery.created_at)))


def deliveries_for_batch(session: Session, batch_id: uuid.UUID) -> list[WebhookDelivery]:
    return list(session.scalars(select(WebhookDelivery).where(WebhookDelivery.batch_id == batch_id,
                                                              WebhookDelivery.job_id.is_(None))))
