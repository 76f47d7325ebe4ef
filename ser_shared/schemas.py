"""The service's outward shapes, typed once: what the API answers, what webhooks send, what the
export writes, and the model manifest the worker loads.

Everything else comes from these models: ``web.serialize`` builds them, the OpenAPI document's
component schemas are their JSON schemas (``components()``), the webhook payloads are ``JobEvent``
and ``BatchEvent``, and the export's columns are ``ExportRow``'s fields. Docstrings and field
descriptions become the OpenAPI descriptions.

What the server emits forbids unknown fields (``extra="forbid"``): a key written without a field
here fails validation, so it fails the tests instead of reaching clients undocumented. Fields that
may be left out (rather than sent as null) default to None and are dumped with
``exclude_unset=True``; ``SkipJsonSchema[None]`` keeps that None out of the documented schema.
The manifest is read, not emitted, and its training reports are open-ended: it allows extras.

Strictness is for the tests, not for users: ``build`` raises on a mismatch when ``strict`` (the
default, and every setting but ``SER_ENV=production``), while a production server logs the mismatch
and serves what it has (``model_construct``, unvalidated). A row written by an older worker with a
key this version does not know must not turn yesterday's history into 500s.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from uuid import UUID

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    WithJsonSchema,
    create_model,
)
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue, SkipJsonSchema
from pydantic_core import core_schema

from ser_shared.clock import as_utc, iso  # the one UTC convention; re-exported
from ser_shared.emotions import EMOTIONS

__all__ = [
    "API_MODELS", "CHANNEL_MODES", "DEVICES", "EXPORT_COLUMNS", "REF_TEMPLATE", "STATUSES", "TRANSCRIBE", "Batch",
    "BatchEvent", "Channel", "ChannelMetrics", "Conversation", "ConversationSummary", "Error", "ErrorInfo",
    "Escalation", "ExportRow", "Health", "Interruption", "Job", "JobError", "JobEvent", "JobPage", "JobSummary",
    "Manifest", "Options", "Ready", "Result", "Segment", "SpeakerSummary", "Transcript", "TranscriptLine",
    "UploadAccepted", "WebhookAttempt", "WebhookDelivery", "Word", "components", "iso", "json_schema",
]

# ``ser_shared.models.JobStatus``'s values, written out so that this module (which the numeric
# package imports for the manifest) does not pull in SQLAlchemy; tests/integration/test_schemas.py keeps them equal.
STATUSES = ("queued", "processing", "succeeded", "failed")
DEVICES = ("auto", "cpu", "gpu")
# "none": no transcript (an upload's default). "whisper" is the offline engine; "sphinx" is kept as a name
# for compatibility (see ser_ml.transcribe), "google" needs the network.
TRANSCRIBE = ("none", "whisper", "google", "sphinx")
# How a multi-channel recording is analysed: "auto" splits channels that carry different signals and mixes
# near-copies (ser_ml.channels), "split" analyses each channel as a speaker, "mix" averages them to one.
CHANNEL_MODES = ("auto", "mix", "split")
ENGINES = tuple(t for t in TRANSCRIBE if t != "none")
REF_TEMPLATE = "#/components/schemas/{model}"


# --- field types -----------------------------------------------------------------------------

def _one_of(allowed: Sequence[str]) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value not in allowed:
            raise ValueError(f"{value!r} is not one of {', '.join(allowed)}")
        return value
    return check


def _enum(allowed: Sequence[str]) -> dict[str, Any]:
    return {"type": "string", "enum": list(allowed)}


# Plain strings on the wire and in Python (the ORM stores strings), checked against their lists.
Emotion = Annotated[str, AfterValidator(_one_of(EMOTIONS)), WithJsonSchema(_enum(EMOTIONS))]
Status = Annotated[str, AfterValidator(_one_of(STATUSES)), WithJsonSchema(_enum(STATUSES))]
Device = Annotated[str, AfterValidator(_one_of(DEVICES)), WithJsonSchema(_enum(DEVICES))]
Engine = Annotated[str, AfterValidator(_one_of(ENGINES)), WithJsonSchema(_enum(ENGINES))]
ChannelMode = Annotated[str, AfterValidator(_one_of(CHANNEL_MODES)), WithJsonSchema(_enum(CHANNEL_MODES))]
UtcDateTime = Annotated[datetime, AfterValidator(as_utc), PlainSerializer(iso, return_type=str, when_used="json"),
                        WithJsonSchema({"type": "string", "format": "date-time"})]
Uri = Annotated[str, WithJsonSchema({"type": "string", "format": "uri"})]
Probability = Annotated[float, Field(ge=0, le=1)]
Probabilities = Annotated[dict[str, Probability], Field(description="Probability per emotion (they sum to 1).")]


log = logging.getLogger(__name__)
_strict = True


def set_strict(strict: bool) -> None:
    """Raise on a shape mismatch (tests, development) or log it and serve unvalidated (production)."""
    global _strict
    _strict = strict


class Emitted(BaseModel):
    """Base of every shape the server sends: unknown fields are an error, not an addition."""

    model_config = ConfigDict(extra="forbid")

    @classmethod
    def build(cls, fields: dict[str, Any]) -> Self:
        """``model_validate(fields)``; outside strict mode a mismatch is logged and served as is."""
        try:
            return cls.model_validate(fields)
        except ValidationError:
            if _strict:
                raise
            log.exception("%s does not match its schema; serving it unvalidated", cls.__name__)
            return cls.model_construct(**fields)

    def to_json(self) -> dict[str, Any]:
        """The JSON object as sent: fields left unset are left out, fields set to None are null."""
        return self.model_dump(mode="json", exclude_unset=True)


# --- errors ----------------------------------------------------------------------------------

class ErrorInfo(Emitted):
    code: str = Field(description="Stable, machine-readable.")
    message: str = Field(description="For people.")


class Error(Emitted):
    """Every API error: `{"error": {"code": ..., "message": ...}}`."""

    error: ErrorInfo


class JobError(Emitted):
    """Why a job failed (a stable code and a human message)."""

    code: str
    message: str | None


# --- results ---------------------------------------------------------------------------------

class Transcript(Emitted):
    """The transcript stage: only status, engine and language while it is pending."""

    status: Literal["pending", "succeeded", "unavailable"]
    engine: Engine
    language: str = Field(description="As asked (BCP-47); `und` (undetermined) asks Whisper to detect it.")
    text: str | None = None
    reason: str | None = Field(
        default=None, description="Why it is unavailable: network_error, rate_limited, http_error, no_speech, "
                                  "timeout, engine_missing, engine_error, worker_lost, ...")
    message: str | None = None
    seconds: float | SkipJsonSchema[None] = None
    segments: bool | SkipJsonSchema[None] = Field(default=None,
                                                  description="True when transcribed segment by segment.")
    attempts: int | SkipJsonSchema[None] = Field(
        default=None, description="How many times the transcript stage was started: more than 1 after a worker "
                                  "was killed during it (then `worker_lost` ends it).")
    model: str | SkipJsonSchema[None] = Field(
        default=None, description="The model that made it: `whisper-tiny.en` (English) or `whisper-base` (other "
                                  "languages, detection). Engines `whisper` and `sphinx` (which Whisper now serves).")
    detected_language: str | SkipJsonSchema[None] = Field(
        default=None, description="The language Whisper detected (its code, e.g. `hi`), when `language` was `und`.")
    detected_language_probability: float | SkipJsonSchema[None] = Field(
        default=None, ge=0.0, le=1.0,
        description="Whisper's probability for `detected_language` (0-1). Detection can be wrong on short, "
                    "noisy or synthetic speech; below 0.5, give `language` if you know it.")


class Word(Emitted):
    """One transcribed word and where it was said (seconds from the start of the recording)."""

    start: float
    end: float
    word: str


class Segment(Emitted):
    """One speech segment (times in seconds) with its own prediction."""

    start: float
    end: float
    speech_s: float | SkipJsonSchema[None] = Field(default=None, description="Seconds of speech in the segment.")
    emotion: Emotion
    confidence: float
    uncertain: bool
    probabilities: Probabilities
    transcript: str | None = Field(default=None, description="Only with a segment-wise transcript.")
    words: list[Word] | SkipJsonSchema[None] = Field(
        default=None, description="The transcript's words with their times in the recording (engines that give "
                                  "word timestamps: whisper).")


class Escalation(Emitted):
    """A span where a speaker's negative, aroused emotions (angry, fearful, disgust) rose above their own
    baseline (see the README's "Conversations")."""

    start: float
    end: float
    emotion: Emotion = Field(description="The negative emotion that dominates the span.")
    score: float = Field(description="How far the span's negative share rose above the speaker's baseline (0-1).")


class ChannelMetrics(Emitted):
    """One speaker's share of the conversation."""

    talk_s: float = Field(description="Seconds of speech.")
    talk_share: float = Field(description="This speaker's share of all speech (0-1).")
    words: int | None = Field(description="Words transcribed; null without a transcript.")
    words_per_minute: float | None = Field(description="Words per minute of speech; null without a transcript.")
    longest_monologue_s: float = Field(description="The longest stretch this speaker held the floor.")
    turns: int = Field(description="How many turns (stretches holding the floor) this speaker took.")
    interruptions: int = Field(description="How many times this speaker cut in on another.")
    emotion_share: dict[str, float] = Field(description="Share of this speaker's speech time per emotion.")
    negative_start: float | None = Field(
        description="Share of angry, fearful and disgust in the first third of this speaker's speech.")
    negative_end: float | None = Field(
        description="Share of angry, fearful and disgust in the last third of this speaker's speech.")
    escalations: list[Escalation]


class Channel(Emitted):
    """One speaker: a channel of the recording (a mono recording, or mixed channels, is one)."""

    index: int
    label: str
    emotion: Emotion | None = Field(description="Null when this channel holds no speech.")
    confidence: float | None
    uncertain: bool | None
    probabilities: Probabilities | None
    speech_s: float
    segments: list[Segment] | SkipJsonSchema[None] = Field(
        default=None, description="In time order; left out of job lists unless `segments=true`.")
    metrics: ChannelMetrics


class Interruption(Emitted):
    """A speaker starting while another was still speaking, who then stopped."""

    at: float
    by: int = Field(description="The index of the channel that cut in.")
    of: int = Field(description="The index of the channel that was cut off.")


class TranscriptLine(Emitted):
    """One segment's words in the conversation transcript."""

    start: float
    end: float
    channel: int
    label: str
    text: str


class Conversation(Emitted):
    """The recording as a conversation: who spoke when, overlaps, turns and escalation."""

    channels: Literal["mono", "mix", "split"] = Field(
        description="How the recording was analysed: one channel, channels mixed to one, or one speaker each.")
    duration_s: float
    silence_share: float = Field(description="Share of the recording where nobody speaks.")
    overlap_s: float = Field(description="Seconds where two or more speakers speak at once.")
    overlaps: int
    interruptions: list[Interruption]
    turns: int = Field(description="Changes of the speaker holding the floor, plus one.")
    escalation: bool = Field(description="The customer ends clearly more negative than they started.")
    customer: int | None = Field(description="The channel judged for `escalation`.")
    transcript: list[TranscriptLine] | None = Field(
        default=None, description="Every channel's segments with text, in time order; null without a transcript. "
                                  "Left out of job lists unless `segments=true`, like the segments it is made of.")


class ModelPrediction(Emitted):
    """One model's own probabilities and the version of that model."""

    probabilities: Probabilities
    version: str | None


class Result(Emitted):
    """A finished job's prediction (for the whole recording), per model, and its segments."""

    emotion: Emotion
    confidence: float
    uncertain: bool
    probabilities: Probabilities
    models: dict[str, ModelPrediction] = Field(description="Each model's own probabilities and version.")
    timings_ms: dict[str, float]
    transcript: Transcript | None
    segments: list[Segment] | SkipJsonSchema[None] = Field(
        default=None, description="In time order; left out of job lists unless `segments=true`.")
    channels: list[Channel] | SkipJsonSchema[None] = Field(
        default=None, description="One entry per speaker (channel); results from before this field have none.")
    conversation: Conversation | SkipJsonSchema[None] = None


# --- jobs and batches ------------------------------------------------------------------------

class Options(Emitted):
    """The batch's options: `device` on every upload since the first release; `transcribe` and
    `language` only when a transcript was asked for."""

    device: Device | SkipJsonSchema[None] = None
    transcribe: Engine | SkipJsonSchema[None] = None
    language: str | SkipJsonSchema[None] = None
    channels: ChannelMode | SkipJsonSchema[None] = None
    channel_labels: list[str] | SkipJsonSchema[None] = None
    live: bool | SkipJsonSchema[None] = Field(
        default=None, description="A live session: later uploads with its `batch_id` add to it.")


class WebhookAttempt(Emitted):
    at: UtcDateTime
    status_code: int | None
    latency_ms: float
    error: str | None


class WebhookDelivery(Emitted):
    id: str
    event: str
    url: str
    status: Literal["pending", "delivered", "failed"]
    created_at: UtcDateTime | None
    next_attempt_at: UtcDateTime | None
    attempts: list[WebhookAttempt]


class QueueState(Emitted):
    """Whether the job was handed to the queue (and when), or why that failed."""

    enqueued: bool
    enqueued_at: UtcDateTime | None
    error: str | None


class Job(Emitted):
    """One recording: its status, what is known of the file, and once analysed its result."""

    id: UUID
    batch_id: UUID
    filename: str
    status: Status
    error: JobError | None
    result: Result | None
    size_bytes: int
    content_hash: str | None
    format: str | None
    duration_s: float | None = Field(description="Seconds of audio: what the file's header declares until a worker "
                                                 "decodes it, then what it decoded (and analysed).")
    declared_duration_s: float | None = Field(
        description="What the file's header declares, when the worker decoded a different length (a copy cut "
                    "short decodes in part; the result is for the part decoded); null when they agree.")
    sample_rate: int | None
    channels: int | None
    options: Options
    client_reference: str | None
    metadata: dict[str, Any] | None
    attempts: int
    progress: int = Field(ge=0, le=100)
    queue: QueueState
    created_at: UtcDateTime | None
    started_at: UtcDateTime | None
    finished_at: UtcDateTime | None
    url: Uri
    audio_url: Uri | None
    audio_deleted_at: UtcDateTime | None
    webhooks: list[WebhookDelivery] = Field(
        description="The job's webhook deliveries and their attempts, oldest first; the same wherever the job "
                    "appears (a job, a page of the list, a batch).")


class JobSummary(Emitted):
    """A job as an upload answers it; `error` only for a file refused at upload."""

    id: UUID
    filename: str
    status: Status
    client_reference: str | None
    url: Uri
    error: JobError | SkipJsonSchema[None] = None


class UploadAccepted(Emitted):
    """The answer to an upload: the batch and one job per file, in the order they were sent."""

    batch_id: UUID
    batch_url: Uri
    jobs: list[JobSummary]
    warning: str | SkipJsonSchema[None] = Field(
        default=None, description="Only when the queue was unreachable: the jobs are stored and will be "
                                  "queued when it returns.")


class JobPage(Emitted):
    """One page of the job list; `next_cursor` is null on the last page."""

    jobs: list[Job]
    next_cursor: str | None


class JobCounts(Emitted):
    """Jobs per status."""

    queued: int
    processing: int
    succeeded: int
    failed: int


class Batch(Emitted):
    """The jobs of one upload, with counts per status and the batch's own webhook deliveries."""

    id: UUID
    created_at: UtcDateTime | None
    file_count: int
    options: Options
    counts: JobCounts
    done: bool = Field(description="Every job has succeeded or failed.")
    url: Uri
    webhook_url: str | None
    webhooks: list[WebhookDelivery]
    jobs: list[Job]


class Health(Emitted):
    status: Literal["ok"]


class ReadyChecks(Emitted):
    database: str
    broker: str


class Ready(Emitted):
    status: Literal["ready", "unavailable"]
    checks: ReadyChecks


# --- webhook events --------------------------------------------------------------------------

class SpeakerSummary(Emitted):
    """One speaker (channel) in a webhook's conversation summary: ``result.channels[i]`` in brief."""

    index: int
    label: str
    emotion: Emotion | None = Field(description="Null when this channel holds no speech.")
    confidence: float | None
    talk_share: float = Field(description="This speaker's share of all speech (0-1).")
    escalations: int = Field(description="How many escalation moments this speaker had.")


class ConversationSummary(Emitted):
    """What a `job.succeeded` webhook says of the conversation; the job's `result` has the rest."""

    escalation: bool = Field(description="The customer ends clearly more negative than they started.")
    customer: int | None = Field(description="The channel judged for `escalation`.")
    channels: list[SpeakerSummary]


class JobEventData(Emitted):
    job_id: UUID
    batch_id: UUID
    status: Literal["succeeded", "failed"]
    emotion: Emotion | None
    confidence: float | None
    client_reference: str | None
    error: JobError | None
    conversation: ConversationSummary | None = Field(
        description="Each speaker's emotion and share, and the escalation flag; null for a failed job and "
                    "for results from before conversations.")


class JobEvent(Emitted):
    """The body of a `job.succeeded` or `job.failed` webhook (signed, Standard Webhooks)."""

    type: Literal["job.succeeded", "job.failed"]
    timestamp: UtcDateTime
    data: JobEventData


class BatchEventData(Emitted):
    batch_id: UUID
    file_count: int
    counts: dict[str, int] = Field(description="Jobs per final status (only the statuses that occur).")


class BatchEvent(Emitted):
    """The body of a `batch.completed` webhook: every job of the batch has finished."""

    type: Literal["batch.completed"]
    timestamp: UtcDateTime
    data: BatchEventData


# --- export ----------------------------------------------------------------------------------

def _export_row() -> type[Emitted]:
    """The export's row, column by column in the order the CSV writes them."""
    number = (float | None, ...)
    fields: dict[str, Any] = {
        "job_id": (str, ...), "batch_id": (str, ...), "filename": (str, ...), "client_reference": (str | None, ...),
        "status": (str, ...), "created_at": (UtcDateTime | None, ...), "duration_s": number,
        "segment": (int | None, ...), "start_s": number, "end_s": number, "emotion": (str | None, ...),
        "confidence": number, "uncertain": (bool | None, ...), **{f"p_{e}": number for e in EMOTIONS},
        "error_code": (str | None, ...), "transcript": (str | None, ...),
        # Added with conversations, after every older column (readers that index columns keep working).
        "channel": (int | None, ...), "label": (str | None, ...), "escalation": (bool | None, ...)}
    model: type[Emitted] = create_model(
        "ExportRow", __base__=Emitted, __module__=__name__, __doc__="One exported row: a job, or with "
        "`segments=true` one speech segment of it (then `segment`, `start_s` and `end_s` are set; a "
        "conversation's segments are each speaker's, with `channel` and `label`). `escalation` is the job's "
        "flag, on each of its rows.", **fields)
    return model


ExportRow = _export_row()
EXPORT_COLUMNS: tuple[str, ...] = tuple(ExportRow.model_fields)


# --- the OpenAPI components ------------------------------------------------------------------

# In the document's order (its readable page lists them so).
API_MODELS: tuple[type[BaseModel], ...] = (
    Error, ErrorInfo, JobError, JobSummary, UploadAccepted, Options, Transcript, Word, Segment, ModelPrediction,
    Escalation, ChannelMetrics, Channel, Interruption, TranscriptLine, Conversation, Result,
    WebhookAttempt, WebhookDelivery, QueueState, Job, JobPage, JobCounts, Batch, ExportRow, Health, ReadyChecks,
    Ready, SpeakerSummary, ConversationSummary, JobEventData, JobEvent, BatchEventData, BatchEvent,
)


class OpenAPISchema(GenerateJsonSchema):
    """Pydantic's JSON schema, trimmed for a published API document.

    No titles (the component names say it), no defaults (an omitted field is left out, not
    defaulted), and no ``additionalProperties: false``: the server never sends an unknown field
    (the models forbid them), but the contract lets later versions add fields, and a client
    generated from the document must not reject those.
    """

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False

    def model_schema(self, schema: core_schema.ModelSchema) -> JsonSchemaValue:
        out = super().model_schema(schema)
        out.pop("title", None)
        if out.get("additionalProperties") is False:
            del out["additionalProperties"]
        return out

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        return self.generate_inner(schema["schema"])


def json_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema as the OpenAPI document has it (nested models as ``$defs``)."""
    return model.model_json_schema(ref_template=REF_TEMPLATE, schema_generator=OpenAPISchema)


def components() -> dict[str, dict[str, Any]]:
    """Every API model's schema by name: the document's ``components.schemas``."""
    out: dict[str, dict[str, Any]] = {}
    nested: dict[str, dict[str, Any]] = {}
    for model in API_MODELS:
        schema = json_schema(model)
        nested |= schema.pop("$defs", {})
        out[model.__name__] = schema
    for name, schema in nested.items():
        if out.get(name, schema) != schema:
            raise RuntimeError(f"two different schemas are named {name}")
        out.setdefault(name, schema)
    return out


# --- the model manifest ----------------------------------------------------------------------

class Artifact(BaseModel):
    """A file of the models folder and the sha256 recorded when it was written."""

    model_config = ConfigDict(extra="allow")

    file: str
    sha256: str


class ModelArtifact(Artifact):
    """One of the ensemble's models (its own settings, the LSTM's normalisation, are extras)."""

    version: str


class EnsembleRule(BaseModel):
    """How the models' probabilities are combined, as fitted at training time."""

    model_config = ConfigDict(extra="allow")

    weights: dict[str, float]
    temperature: float = 1.0  # models from before calibration have none
    uncertain_threshold: float


class Manifest(BaseModel):
    """``models/manifest.json``: what the worker checks and loads. The training reports it also
    holds (data, cv, calibration, cross-corpus results) are kept as they are, untyped."""

    model_config = ConfigDict(extra="allow")

    feature_version: str
    sample_rate: int
    classes: list[str]
    encoder: Artifact
    speech_detector: Artifact
    models: dict[str, ModelArtifact]
    ensemble: EnsembleRule

    @classmethod
    def load(cls, path: Path) -> Manifest:
        """Read and validate a manifest; raises OSError, or ValueError when it is not valid JSON or
        not a manifest (pydantic's ValidationError is a ValueError)."""
        return cls.model_validate(json.loads(path.read_text()))

    def artifacts(self) -> dict[str, Artifact]:
        """Every file the manifest names: the encoder, the speech detector and each model."""
        return {"encoder": self.encoder, "speech_detector": self.speech_detector, **self.models}
