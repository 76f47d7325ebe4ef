"""Database models (SQLAlchemy 2.x typed mappings). Alembic migrations must match these."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    Uuid,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from ser_shared.clock import as_utc, utcnow

# JSONB on Postgres (indexable, compact), plain JSON text elsewhere.
JSONType = JSON().with_variant(JSONB(), "postgresql")

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """A point in time: aware UTC in Python on every backend, the same DDL as ``DateTime(timezone=True)``.

    Postgres stores ``timestamptz`` and hands back aware values in the session's time zone; SQLite
    has no time zone type and hands back naive text-parsed values (its driver also drops any offset
    on the way in, so a non-UTC value would be stored as the wrong instant). Here both directions
    are normalised: values are converted to UTC on the way in (naive on SQLite, whose stored text
    must compare as text) and come out aware UTC, so reading code never converts and comparisons in
    queries bind correctly on both.

    A naive value on the way in is refused (ValueError, raised by SQLAlchemy as a StatementError):
    whose clock it was read from is unknowable here, and assuming UTC would silently store
    ``datetime.now()`` local time as the wrong instant. Use ``ser_shared.clock.utcnow()`` or
    ``clock.as_utc()`` where a naive value is known to be UTC (text from outside).
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"a timezone-aware datetime is required, got {value!r}")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else as_utc(value)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class JobStatus(StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


FINISHED = (JobStatus.SUCCEEDED.value, JobStatus.FAILED.value)
# ``Job.worker`` of a transcript stage that the reconciler re-sent and no worker has taken yet.
BROKER = "broker"

# Everything belongs to one tenant. With authentication off (the embedded single-user default) that
# is this one; with it on, it is the tenant of the API key that uploaded it.
LOCAL_TENANT = "local"
TENANT_LENGTH = 64


class ApiKey(Base):
    """An API key: only its SHA-256 is stored; the key itself is shown once, at creation."""

    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(100))
    tenant: Mapped[str] = mapped_column(String(TENANT_LENGTH), index=True)
    # The first characters of the key, so a person can tell keys apart in listings and logs.
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Batch(Base):
    """One upload request: one or many recordings."""

    __tablename__ = "batches"
    # Upload rate limits count the recent batches of a key (of the tenant when auth is off).
    __table_args__ = (Index("ix_batches_tenant_created_at", "tenant", "created_at"),
                      Index("ix_batches_api_key_id_created_at", "api_key_id", "created_at"))

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant: Mapped[str] = mapped_column(String(TENANT_LENGTH), default=LOCAL_TENANT,
                                        server_default=LOCAL_TENANT)
    # The key that uploaded it; NULL in single-user mode (no keys) and for rows from before keys.
    api_key_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("api_keys.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    options: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    file_count: Mapped[int] = mapped_column(Integer, default=0)
    # Where job.succeeded / job.failed / batch.completed events go (checked against SSRF at upload).
    webhook_url: Mapped[str | None] = mapped_column(Text)

    jobs: Mapped[list[Job]] = relationship(back_populates="batch", order_by="Job.position")


class Job(Base):
    """One recording and its analysis."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint("status IN ('queued', 'processing', 'succeeded', 'failed')", name="status"),
        # History: one tenant's jobs newest first, optionally narrowed by status or emotion. Every
        # query names the tenant, so it leads each index.
        Index("ix_jobs_tenant_created_at_id", "tenant", "created_at", "id"),
        Index("ix_jobs_tenant_status_created_at", "tenant", "status", "created_at"),
        Index("ix_jobs_tenant_emotion_created_at", "tenant", "emotion", "created_at"),
        Index("ix_jobs_batch_id_position", "batch_id", "position"),
        Index("ix_jobs_tenant_client_reference_created_at", "tenant", "client_reference", "created_at"),
        # History sorted by confidence, duration or name: keyset pages on (value, id).
        Index("ix_jobs_tenant_confidence_id", "tenant", "confidence", "id"),
        Index("ix_jobs_tenant_duration_s_id", "tenant", "duration_s", "id"),
        Index("ix_jobs_tenant_filename_id", "tenant", "filename", "id"),
        # File-name search (ILIKE '%text%'): trigrams on Postgres; a plain index elsewhere.
        Index("ix_jobs_filename_trgm", "filename", postgresql_using="gin",
              postgresql_ops={"filename": "gin_trgm_ops"}),
        # The worker's sweeps (unqueued jobs, stuck jobs, audio past retention) span all tenants.
        Index("ix_jobs_status_created_at", "status", "created_at"),
        Index("ix_jobs_finished_at", "finished_at"),
        # The cap on a key's queued and running jobs.
        Index("ix_jobs_api_key_id_status", "api_key_id", "status"),
        # The reconciler's look for work held by dead workers: few rows are held at any time.
        Index("ix_jobs_worker", "worker"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    batch_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    # Copied from the batch so history queries filter one table.
    tenant: Mapped[str] = mapped_column(String(TENANT_LENGTH), default=LOCAL_TENANT,
                                        server_default=LOCAL_TENANT)
    api_key_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("api_keys.id", ondelete="SET NULL"))
    position: Mapped[int] = mapped_column(Integer, default=0)
    # The client's name for the file: data only, never used to build a path.
    filename: Mapped[str] = mapped_column(String(512))
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    content_hash: Mapped[str | None] = mapped_column(String(64))
    storage_key: Mapped[str | None] = mapped_column(String(128))
    # Set when retention removed the audio (the result stays); storage_key is then NULL.
    audio_deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    format: Mapped[str | None] = mapped_column(String(16))
    # The header's length at upload, then what the worker decoded. When those differ (a copy cut
    # short decodes in part), the header's is kept here: what was analysed is not all the file claims.
    duration_s: Mapped[float | None] = mapped_column(Float)
    declared_duration_s: Mapped[float | None] = mapped_column(Float)
    sample_rate: Mapped[int | None] = mapped_column(Integer)
    channels: Mapped[int | None] = mapped_column(Integer)
    options: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    # The caller's own identifiers (a call id, a study code): stored, filterable, returned as given.
    client_reference: Mapped[str | None] = mapped_column(String(200))
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONType)

    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED.value)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Share of a long recording analysed so far (0..1), written now and then while it runs.
    progress: Mapped[float | None] = mapped_column(Float)
    # NULL while the job waits for the broker (it was down at upload): a sweep enqueues it later.
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    enqueue_error: Mapped[str | None] = mapped_column(Text)
    # Who holds the job's unfinished stage (analysis, or the transcript after the emotion is
    # stored), and since when: a worker node (its liveness is in worker_heartbeats), BROKER for a
    # transcript stage the reconciler re-sent, NULL when nothing is outstanding. A job held by a
    # node whose heartbeat stopped is taken back well before the hard time limit would notice.
    worker: Mapped[str | None] = mapped_column(String(200))
    worker_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    # Denormalised from the result so history filters stay on one indexed table.
    emotion: Mapped[str | None] = mapped_column(String(16))
    confidence: Mapped[float | None] = mapped_column(Float)
    # The conversation's escalation flag (results.conversation), for the history filter.
    escalation: Mapped[bool | None] = mapped_column(Boolean, index=True)

    batch: Mapped[Batch] = relationship(back_populates="jobs")
    result: Mapped[Result | None] = relationship(
        back_populates="job", cascade="all, delete-orphan", passive_deletes=True, uselist=False
    )


class Result(Base):
    """The analysis of one job; keyed by job id so a redelivered task overwrites, never duplicates."""

    __tablename__ = "results"

    job_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    emotion: Mapped[str] = mapped_column(String(16))
    confidence: Mapped[float] = mapped_column(Float)
    uncertain: Mapped[bool] = mapped_column(Boolean)
    probabilities: Mapped[dict[str, float]] = mapped_column(JSONType)
    model_probabilities: Mapped[dict[str, dict[str, float]]] = mapped_column(JSONType)
    model_versions: Mapped[dict[str, str]] = mapped_column(JSONType)
    timings_ms: Mapped[dict[str, float]] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # A stage of its own: {"status": "pending" | "succeeded" | "unavailable", "engine", "language",
    # "text", "reason", "message", "seconds"}; NULL when no transcript was asked for.
    transcript: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    # [{"start", "end", "emotion", "confidence", "uncertain", "probabilities"}] in time order; the
    # recording's own result is their duration-weighted average.
    segments: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONType)
    # One entry per speaker (schemas.Channel) and the conversation (schemas.Conversation); NULL on
    # results from before conversations.
    channels: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONType)
    conversation: Mapped[dict[str, Any] | None] = mapped_column(JSONType)

    job: Mapped[Job] = relationship(back_populates="result")


class IdempotencyKey(Base):
    """A client's ``Idempotency-Key`` and the response its first request got (kept 24 h)."""

    __tablename__ = "idempotency_keys"

    # "<tenant>:<client's key>": two tenants may use the same key without seeing each other's response.
    key: Mapped[str] = mapped_column(String(330), primary_key=True)
    # SHA-256 over the request (fields and each file's bytes): the same key with another request is a 409.
    fingerprint: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    # NULL while the first request is still being processed.
    status_code: Mapped[int | None] = mapped_column(Integer)
    response: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    # The claim of the request in progress: its random token, and a short lease that the live
    # request keeps extending. A request killed outright stops extending it, and its key is free
    # again once the lease has run out (NULL on rows from before leases: created_at + lease).
    owner: Mapped[str | None] = mapped_column(String(32))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Set in the transaction that commits the request's batch: from then on the key means that
    # batch, even if the request dies before it stores its response (a retry gets the batch).
    batch_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)


class WorkerHeartbeat(Base):
    """A worker node's sign of life, written every ``worker_heartbeat_s`` by its main process.

    A table rather than a Redis key: the embedded mode has no Redis, and the jobs it judges are
    in the same database. Rows of nodes gone for a day are pruned by the reconciler.
    """

    __tablename__ = "worker_heartbeats"

    node: Mapped[str] = mapped_column(String(200), primary_key=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class WebhookDelivery(Base):
    """One event for one webhook URL, and every attempt to deliver it (a transactional outbox).

    Rows are written in the same transaction as the state change they announce. The id is derived
    from the job or batch and the event type, so writing an event twice (a redelivered task) is a
    no-op; it is also the ``webhook-id`` receivers use to de-duplicate.
    """

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_status_next", "status", "next_attempt_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    batch_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    event: Mapped[str] = mapped_column(String(32))
    url: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict[str, Any]] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending | delivered | failed
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # [{"at", "status_code", "latency_ms", "error"}], oldest first.
    attempts: Mapped[list[dict[str, Any]]] = mapped_column(JSONType, default=list)
