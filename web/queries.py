"""Read queries for the API and pages: filtered, keyset-paginated job history."""

from __future__ import annotations

import base64
import binascii
import json
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Select, func, select, tuple_
from sqlalchemy.orm import Session, defer, selectinload

from ser_shared.clock import as_utc
from ser_shared.emotions import EMOTIONS
from ser_shared.errors import BadRequest, NotFound
from ser_shared.models import Batch, Job, JobStatus, WebhookDelivery

STATUSES = tuple(s.value for s in JobStatus)
MAX_LIMIT = 200
MAX_IDS = 200
# Sort keys of the history (a leading "-" is descending) and their columns. Each is paged by keyset on
# (column, id); NULLs come last in both directions. Every column has a (tenant, column, id) index.
SORTS = {"created_at": Job.created_at, "confidence": Job.confidence, "duration": Job.duration_s,
         "filename": Job.filename}
SORT_CHOICES = tuple(name for key in SORTS for name in (key, f"-{key}"))
DEFAULT_SORT = "-created_at"
NULLABLE_SORTS = ("confidence", "duration")


@dataclass
class JobFilter:
    # Whose jobs: every query is confined to one tenant (see web.auth).
    tenant: str
    status: str | None = None
    emotion: str | None = None
    batch_id: uuid.UUID | None = None
    since: datetime | None = None
    until: datetime | None = None
    q: str | None = None
    client_reference: str | None = None
    min_confidence: float | None = None
    max_confidence: float | None = None
    # A conversation's escalation flag (Job.escalation); jobs without a conversation match neither value.
    escalation: bool | None = None
    # Live status polling of the rows on a page: a bounded list of job ids.
    ids: tuple[uuid.UUID, ...] | None = None
    sort: str = DEFAULT_SORT


def parse_uuid(value: str, what: str = "id") -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except (ValueError, TypeError) as exc:
        raise NotFound(f"no such {what}") from exc


def _parse_time(value: str | None, name: str) -> datetime | None:
    if not value:
        return None
    try:
        return as_utc(datetime.fromisoformat(value.replace("Z", "+00:00")))
    except ValueError as exc:
        raise BadRequest(f"{name} must be an ISO 8601 date or time", code="invalid_parameter") from exc
    except OverflowError as exc:  # 9999-12-31T23:59-14:00 is after the last UTC time Python has
        raise BadRequest(f"{name} is outside the years 1 to 9999 once converted to UTC",
                         code="invalid_parameter") from exc


def _text_filter(value: str | None, name: str) -> str | None:
    text = (value or "").strip()[:200]
    # PostgreSQL text cannot hold NUL: the query would fail with a 500 (found by the API fuzzing).
    if "\x00" in text:
        raise BadRequest(f"{name} must not contain NUL characters", code="invalid_parameter")
    return text or None


def parse_filter(args: dict[str, str], tenant: str) -> JobFilter:
    """Validate query-string filters for ``tenant``'s jobs; bad values are a 400 with a clear code."""
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
    q = _text_filter(args.get("q"), "q")
    reference = _text_filter(args.get("client_reference"), "client_reference")
    sort = args.get("sort") or DEFAULT_SORT
    if sort not in SORT_CHOICES:
        raise BadRequest(f"sort must be one of {', '.join(SORT_CHOICES)}", code="invalid_parameter")
    return JobFilter(tenant, status, emotion, batch_id, _parse_time(args.get("since"), "since"),
                     _parse_until(args.get("until")), q, reference,
                     min_confidence=_parse_confidence(args.get("min_confidence"), "min_confidence"),
                     max_confidence=_parse_confidence(args.get("max_confidence"), "max_confidence"),
                     escalation=parse_bool(args.get("escalation"), "escalation"),
                     ids=_parse_ids(args.get("ids")), sort=sort)


def parse_bool(value: str | None, name: str, code: str = "invalid_parameter") -> bool | None:
    """``true`` or ``false`` (also 1/0, yes/no, any case); empty is None, anything else a 400 ``code``."""
    text = (value or "").strip().lower()
    if not text:
        return None
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise BadRequest(f"{name} must be true or false", code=code)


def _parse_until(value: str | None) -> datetime | None:
    """The end of a date range, exclusive; a bare date (YYYY-MM-DD) includes that whole day."""
    until = _parse_time(value, "until")
    if until is not None and value is not None and len(value.strip()) == 10:
        until = until + timedelta(days=1) if until < datetime.max.replace(tzinfo=UTC) - timedelta(days=1) else None
    return until


def _parse_confidence(value: str | None, name: str) -> float | None:
    if value is None or not value.strip():
        return None
    try:
        number = float(value)
    except ValueError as exc:
        raise BadRequest(f"{name} must be a number between 0 and 1", code="invalid_parameter") from exc
    if not 0.0 <= number <= 1.0:
        raise BadRequest(f"{name} must be a number between 0 and 1", code="invalid_parameter")
    return number


def _parse_ids(value: str | None) -> tuple[uuid.UUID, ...] | None:
    """Comma-separated job ids, at most MAX_IDS of them."""
    if value is None or not value.strip():
        return None
    parts = [p.strip() for p in value.split(",") if p.strip()]
    if len(parts) > MAX_IDS:
        raise BadRequest(f"ids takes at most {MAX_IDS} job ids", code="invalid_parameter")
    try:
        return tuple(uuid.UUID(p) for p in parts)
    except ValueError as exc:
        raise BadRequest("ids must be comma-separated job UUIDs", code="invalid_parameter") from exc


def _apply(stmt: Select, f: JobFilter) -> Select:
    stmt = stmt.where(Job.tenant == f.tenant)
    if f.status:
        stmt = stmt.where(Job.status == f.status)
    if f.emotion:
        stmt = stmt.where(Job.emotion == f.emotion)
    if f.batch_id:
        stmt = stmt.where(Job.batch_id == f.batch_id)
    if f.client_reference:
        stmt = stmt.where(Job.client_reference == f.client_reference)
    if f.since:
        stmt = stmt.where(Job.created_at >= f.since)
    if f.until:
        stmt = stmt.where(Job.created_at < f.until)
    if f.q:
        escaped = f.q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        stmt = stmt.where(Job.filename.ilike(f"%{escaped}%", escape="\\"))
    if f.min_confidence is not None:
        stmt = stmt.where(Job.confidence >= f.min_confidence)
    if f.max_confidence is not None:
        stmt = stmt.where(Job.confidence <= f.max_confidence)
    if f.escalation is not None:
        stmt = stmt.where(Job.escalation == f.escalation)  # "= true" can use the index; "IS TRUE" cannot
    if f.ids is not None:
        stmt = stmt.where(Job.id.in_(f.ids))
    return stmt


def encode_cursor(job: Job, sort: str = DEFAULT_SORT) -> str:
    """The position of ``job`` in ``sort`` order: the sort, the job's sort value and its id."""
    value = getattr(job, SORTS[sort.lstrip("-")].key)
    raw = json.dumps([sort, value.isoformat() if isinstance(value, datetime) else value, str(job.id)])
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


MAX_CURSOR_NUMBER = 1e15  # durations and confidences are far below; larger is a forged cursor


def _decode_cursor(cursor: str, sort: str) -> tuple[Any, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        cursor_sort, value, job_id = json.loads(raw)
        if cursor_sort != sort:
            raise ValueError("cursor of another sort")
        key = sort.lstrip("-")
        if key == "created_at":
            value = as_utc(datetime.fromisoformat(value))  # naive: a cursor from before UTCDateTime
        elif value is not None and not (isinstance(value, str) if key == "filename" else
                                        isinstance(value, int | float) and not isinstance(value, bool)):
            raise ValueError("cursor value of the wrong type")
        # Values the database cannot compare against: a number beyond float range (a 400-digit
        # integer overflowed the bigint bind as a 500) or a text holding NUL.
        if isinstance(value, int | float) and not (math.isfinite(float(value)) and abs(value) <= MAX_CURSOR_NUMBER):
            raise ValueError("cursor number out of range")
        if isinstance(value, str) and "\x00" in value:
            raise ValueError("cursor text with NUL")
        return value, uuid.UUID(job_id)
    except (ValueError, TypeError, OverflowError, binascii.Error, UnicodeDecodeError) as exc:
        raise BadRequest("cursor is not valid (or belongs to another sort order)", code="invalid_parameter") from exc


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
    """A page in ``f.sort`` order (newest first by default) and the next page's cursor (None at the end).

    Keyset pagination on (sort column, id), so a deep page costs what the first one does. Jobs whose
    sort value is NULL (no confidence yet, no duration) follow all others, by id, in a second query.
    """
    key = f.sort.lstrip("-")
    desc, column = f.sort.startswith("-"), SORTS[key]
    after = _decode_cursor(cursor, f.sort) if cursor else None
    base = _apply(select(Job).options(selectinload(Job.result)), f)
    rows: list[Job] = []
    if after is None or after[0] is not None:
        stmt = base.where(column.is_not(None)) if key in NULLABLE_SORTS else base
        if after is not None:
            position = (after[0], after[1])
            stmt = stmt.where(tuple_(column, Job.id) < position if desc else tuple_(column, Job.id) > position)
        order = (column.desc(), Job.id.desc()) if desc else (column.asc(), Job.id.asc())
        rows = list(session.scalars(stmt.order_by(*order).limit(limit + 1)))
    if len(rows) <= limit and key in NULLABLE_SORTS:
        stmt = base.where(column.is_(None))
        if after is not None and after[0] is None:
            stmt = stmt.where(Job.id < after[1] if desc else Job.id > after[1])
        stmt = stmt.order_by(Job.id.desc() if desc else Job.id.asc()).limit(limit + 1 - len(rows))
        rows += list(session.scalars(stmt))
    next_cursor = encode_cursor(rows[limit - 1], f.sort) if len(rows) > limit else None
    return rows[:limit], next_cursor


@dataclass
class Summary:
    """Aggregates of every job matching a filter (not just one page)."""

    total: int
    by_status: dict[str, int]
    by_emotion: dict[str, int]
    mean_confidence: float | None


def summarize(session: Session, f: JobFilter) -> Summary:
    """Counts per status and per emotion and the mean confidence, in one GROUP BY query."""
    stmt = _apply(select(Job.status, Job.emotion, func.count(), func.count(Job.confidence),
                                  func.sum(Job.confidence)), f).group_by(Job.status, Job.emotion)
    by_status, by_emotion = dict.fromkeys(STATUSES, 0), dict.fromkeys(EMOTIONS, 0)
    rated, confidence_sum = 0, 0.0
    for status, emotion, n, n_conf, conf_sum in session.execute(stmt):
        by_status[status] = by_status.get(status, 0) + n
        if emotion:
            by_emotion[emotion] = by_emotion.get(emotion, 0) + n
        rated, confidence_sum = rated + n_conf, confidence_sum + float(conf_sum or 0.0)
    return Summary(sum(by_status.values()), by_status, by_emotion, confidence_sum / rated if rated else None)


def get_job(session: Session, job_id: str, tenant: str) -> Job:
    """One of ``tenant``'s jobs; another tenant's job is a 404, exactly like a missing one."""
    job = session.get(Job, parse_uuid(job_id, "job"), options=[selectinload(Job.result)])
    if job is None or job.tenant != tenant:
        raise NotFound("no such job")
    return job


def get_batch(session: Session, batch_id: str, tenant: str) -> Batch:
    batch = session.get(Batch, parse_uuid(batch_id, "batch"),
                        options=[selectinload(Batch.jobs).selectinload(Job.result)])
    if batch is None or batch.tenant != tenant:
        raise NotFound("no such batch")
    return batch


def status_counts(batch: Batch) -> dict[str, int]:
    """Counts of the batch's jobs by status, from the job rows already loaded with it.

    Counted from the same rows the answer lists, not by a second query: between two statements a
    job can finish, and a batch whose counts say 6 succeeded while its list shows one of them still
    processing contradicts itself (seen in a test).
    """
    counts = dict.fromkeys(STATUSES, 0)
    for job in batch.jobs:
        counts[job.status] = counts.get(job.status, 0) + 1
    return counts


# Rows of one transaction share created_at (Postgres's now()): the id settles their order.
_DELIVERY_ORDER = (WebhookDelivery.created_at, WebhookDelivery.id)


def deliveries_for_job(session: Session, job_id: uuid.UUID) -> list[WebhookDelivery]:
    return list(session.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
                                .order_by(*_DELIVERY_ORDER)))


def deliveries_by_job(session: Session, job_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, list[WebhookDelivery]]:
    """The webhook deliveries of each of ``job_ids`` (one query; payloads not loaded), oldest first."""
    found: dict[uuid.UUID, list[WebhookDelivery]] = {}
    if not job_ids:
        return found
    rows = session.scalars(select(WebhookDelivery).options(defer(WebhookDelivery.payload))
                           .where(WebhookDelivery.job_id.in_(list(job_ids))).order_by(*_DELIVERY_ORDER))
    for row in rows:
        found.setdefault(row.job_id, []).append(row)  # type: ignore[arg-type]  # IN (...) excludes NULL
    return found


def deliveries_for_batch(session: Session, batch_id: uuid.UUID) -> list[WebhookDelivery]:
    """Every delivery of the batch, its own (no job) and its jobs', oldest first."""
    return list(session.scalars(select(WebhookDelivery).options(defer(WebhookDelivery.payload))
                                .where(WebhookDelivery.batch_id == batch_id).order_by(*_DELIVERY_ORDER)))
