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
    "EMOTIONS", "FINISHED", "Batch", "Channel", "ChannelMetrics", "Conversation", "ErrorInfo", "Escalation",
    "Interruption", "Job", "JobError", "JobPage", "JobSummary", "ModelPrediction", "QueueState", "Result", "Segment",
    "Transcript", "TranscriptLine", "UploadAccepted", "WebhookDelivery", "Word",
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
    model: str | None = None  # whisper-tiny.en or whisper-base (engines whisper and sphinx)
    detected_language: str | None = None  # Whisper's code for the language it detected (language=und)
    detected_language_probability: float | None = None  # how sure Whisper was of it (0-1; unsure below 0.5)


class Word(Model):
    """One transcribed word and where it was said (seconds from the start of the recording)."""

    start: float
    end: float
    word: str


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
    words: list[Word] | None = None  # with an engine that gives word times (whisper)


class Escalation(Model):
    """A span where a speaker's negative, aroused emotions rose above their own baseline."""

    start: float
    end: float
    emotion: str
    score: float


class ChannelMetrics(Model):
    """One speaker's share of the conversation."""

    talk_s: float
    talk_share: float
    words: int | None = None
    words_per_minute: float | None = None
    longest_monologue_s: float
    turns: int
    interruptions: int
    emotion_share: dict[str, float] = Field(default_factory=dict)
    negative_start: float | None = None
    negative_end: float | None = None
    escalations: list[Escalation] = Field(default_factory=list)


class Channel(Model):
    """One speaker: a channel of the recording (a mono recording, or mixed channels, is one).
    ``segments`` is None where the listing left them out."""

    index: int
    label: str
    emotion: str | None = None
    confidence: float | None = None
    uncertain: bool | None = None
    probabilities: dict[str, float] | None = None
    speech_s: float
    segments: list[Segment] | None = None
    metrics: ChannelMetrics


class Interruption(Model):
    """Channel ``by`` started while channel ``of`` was speaking, and ``of`` then stopped."""

    at: float
    by: int
    of: int


class TranscriptLine(Model):
    """One segment's words in the conversation transcript."""

    start: float
    end: float
    channel: int
    label: str
    text: str


class Conversation(Model):
    """The recording as a conversation: who spoke when, overlaps, turns and escalation."""

    channels: str  # how it was analysed: mono, mix or split
    duration_s: float
    silence_share: float
    overlap_s: float
    overlaps: int
    interruptions: list[Interruption] = Field(default_factory=list)
    turns: int
    escalation: bool
    customer: int | None = None
    transcript: list[TranscriptLine] | None = None  # None without a transcript, or where a listing left it out


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
    # One per speaker, and the conversation; None on results from before conversations.
    channels: list[Channel] | None = None
    conversation: Conversation | None = None


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
