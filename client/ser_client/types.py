"""Typed results: the API's JSON shapes as pydantic models (the OpenAPI document's component names).

Every model allows extra fields (``extra="allow"``): the API only ever adds fields, and an old client
must keep working against a newer server. Statuses and emotions are plain strings for the same
reason. ``to_dict()`` gives back the JSON exactly as the server sent it.
"""

from __future__ import annotations

import copy
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidatorFunctionWrapHandler, model_validator

__all__ = [
    "EMOTIONS", "FINISHED", "Batch", "ErrorInfo", "Job", "JobError", "JobPage", "JobSummary", "ModelPrediction",
    "QueueState", "Result", "Segment", "Transcript", "UploadAccepted", "WebhookDelivery",
]

# The emotion classes, in the API's order (tests/system/test_sdk.py checks them against the server's list).
EMOTIONS = ("neutral", "happy", "sad", "angry", "fearful", "disgust", "surprised")
# Job statuses after which a job no longer changes (its transcript aside, see ``Job.finished``).
FINISHED = ("succeeded", "failed")
TRANSCRIPT_PENDING = "pending"


class Model(BaseModel):
    """Base of every result: unknown fields kept, and the JSON as received."""

    model_config = ConfigDict(extra="allow")
    _raw: dict[str, Any] | None = PrivateAttr(default=None)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_raw(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        model = handler(data)
        if isinstance(data, dict) and isinstance(model, Model):
            model._raw = data
        return model

    def to_dict(self) -> dict[str, Any]:
        """The JSON object as the server sent it (key order and formats included)."""
        return copy.deepcopy(self._raw) if self._raw is not None else self.model_dump(mode="json")


class JobError(Model):
    """Why a job failed: a stable code and a message for people."""

    code: str
    message: str | None = None


ErrorInfo = JobError


class Transcript(Model):
    """The transcript stage: only status, engine and language while it is ``pending``."""

    status: str
    engine: str | None = None
    language: str | None = None
    text: str | None = None
    reason: str | None = None
    message: str | None = None
    seconds: float | None = None
    segments: bool | None = None
    attempts: int | None = None  # more than 1 after a worker was killed during the transcript


class Segment(Model):
    """One speech segment (times in seconds) with its own prediction."""

    start: float
    end: float
    speech_s: float | None = None
    emotion: str
    confidence: float
    uncertain: bool
    probabilities: dict[str, float]
    transcript: str | None = None


class ModelPrediction(Model):
    """One model's own probabilities and version."""

    probabilities: dict[str, float]
    version: str | None = None


class Result(Model):
    """A finished job's prediction. ``segments`` is None where the listing left them out."""

    emotion: str
    confidence: float
    uncertain: bool
    probabilities: dict[str, float]
    models: dict[str, ModelPrediction] = Field(default_factory=dict)
    timings_ms: dict[str, float] = Field(default_factory=dict)
    transcript: Transcript | None = None
    segments: list[Segment] | None = None


class QueueState(Model):
    enqueued: bool
    enqueued_at: datetime | None = None
    error: str | None = None


class WebhookDelivery(Model):
    id: str
    event: str
    url: str
    status: str
    created_at: datetime | None = None
    next_attempt_at: datetime | None = None
    attempts: list[dict[str, Any]] = Field(default_factory=list)


class Job(Model):
    """A job: one recording, its status and, once analysed, its result."""

    id: str
    batch_id: str | None = None
    filename: str
    status: str
    error: JobError | None = None
    result: Result | None = None
    size_bytes: int | None = None
    content_hash: str | None = None
    format: str | None = None
    duration_s: float | None = None
    # What the file's header declares, when the worker decoded a different length (None: they agree).
    declared_duration_s: float | None = None
    sample_rate: int | None = None
    channels: int | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    client_reference: str | None = None
    metadata: dict[str, Any] | None = None
    attempts: int | None = None
    progress: int | None = None
    queue: QueueState | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    url: str | None = None
    audio_url: str | None = None
    audio_deleted_at: datetime | None = None
    webhooks: list[WebhookDelivery] = Field(default_factory=list)

    @property
    def finished(self) -> bool:
        """Succeeded or failed, and no transcript still on its way (it is a stage after the emotion)."""
        transcript = self.result.transcript if self.result else None
        return self.status in FINISHED and (transcript is None or transcript.status != TRANSCRIPT_PENDING)


class JobSummary(Model):
    """A job as an upload answers it; ``error`` only for a file refused at upload."""

    id: str
    filename: str
    status: str
    client_reference: str | None = None
    url: str | None = None
    error: JobError | None = None


class UploadAccepted(Model):
    """The answer to ``jobs.create``: the batch and one job per file, in the order they were sent."""

    batch_id: str
    batch_url: str | None = None
    jobs: list[JobSummary]
    # Only when the queue was unreachable: the jobs are stored and queued when it returns.
    warning: str | None = None
    _replayed: bool = PrivateAttr(default=False)

    @property
    def replayed(self) -> bool:
        """True when the server answered with the jobs an earlier request with the same
        Idempotency-Key created (``Idempotent-Replayed: true``), instead of creating them."""
        return self._replayed


class JobPage(Model):
    """One page of the job list; ``next_cursor`` is None on the last page."""

    jobs: list[Job]
    next_cursor: str | None = None


class Batch(Model):
    """The jobs of one upload, with counts per status."""

    id: str
    created_at: datetime | None = None
    file_count: int
    options: dict[str, Any] = Field(default_factory=dict)
    counts: dict[str, int] = Field(default_factory=dict)
    done: bool
    url: str | None = None
    webhook_url: str | None = None
    webhooks: list[WebhookDelivery] = Field(default_factory=list)
    jobs: list[Job] = Field(default_factory=list)
