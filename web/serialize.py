"""The API's JSON for jobs, batches and uploads, built as the models of ``ser_shared.schemas``.

Each builder validates what it builds, so a field the models do not declare fails here (and in
the tests) rather than reaching clients undocumented. The ``*_dict`` functions give the JSON
(``Emitted.to_json``: a field left out stays out, a None is a null).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from flask import url_for

from ser_shared import schemas
from ser_shared.models import Batch, Job, Result, WebhookDelivery
from ser_shared.schemas import iso
from web.media import never_decoded

__all__ = ["batch_dict", "delivery_dict", "iso", "job_dict", "job_page", "job_summary", "result_dict",
           "upload_accepted"]


def result_model(result: Result | None, segments: bool = True) -> schemas.Result | None:
    """A job's result; ``segments=False`` leaves its segments out (job lists, unless asked)."""
    if result is None:
        return None
    fields: dict[str, Any] = {
        "emotion": result.emotion,
        "confidence": result.confidence,
        "uncertain": result.uncertain,
        "probabilities": result.probabilities,
        "models": {name: {"probabilities": probs, "version": result.model_versions.get(name)}
                   for name, probs in result.model_probabilities.items()},
        "timings_ms": result.timings_ms,
        "transcript": result.transcript,
    }
    if segments:
        fields["segments"] = result.segments or []
    # Results from before conversations have neither; then both are left out, as before.
    if result.channels is not None:
        fields["channels"] = [_channel(ch, segments) for ch in result.channels]
    if result.conversation is not None:
        fields["conversation"] = _conversation(result.conversation, segments)
    return schemas.Result.build(fields)


def _channel(stored: dict[str, Any], segments: bool) -> dict[str, Any]:
    """One speaker as stored; its segments only with ``segments`` (the rule of the result's own)."""
    channel = {k: v for k, v in stored.items() if k != "segments"}
    if segments:
        channel["segments"] = stored.get("segments") or []
    return channel


def _conversation(stored: dict[str, Any], segments: bool) -> dict[str, Any]:
    """The conversation as stored; its transcript (made of the segments' text, as long) only with ``segments``."""
    return dict(stored) if segments else {k: v for k, v in stored.items() if k != "transcript"}


def result_dict(result: Result | None, segments: bool = True) -> dict[str, Any] | None:
    model = result_model(result, segments)
    return None if model is None else model.to_json()


def _error(job: Job) -> dict[str, Any] | None:
    return {"code": job.error_code, "message": job.error_message} if job.error_code else None


def job_summary(job: Job) -> dict[str, Any]:
    """The short form returned by uploads (``error`` only for a file refused at upload)."""
    fields: dict[str, Any] = {"id": job.id, "filename": job.filename, "status": job.status,
                              "client_reference": job.client_reference,
                              "url": url_for("api.job", job_id=job.id, _external=True)}
    if job.error_code:
        fields["error"] = _error(job)
    return schemas.JobSummary.build(fields).to_json()


def delivery_model(d: WebhookDelivery) -> schemas.WebhookDelivery:
    return schemas.WebhookDelivery.build(
        {"id": d.id, "event": d.event, "url": d.url, "status": d.status, "created_at": d.created_at,
         "next_attempt_at": d.next_attempt_at, "attempts": d.attempts})


def delivery_dict(d: WebhookDelivery) -> dict[str, Any]:
    return delivery_model(d).to_json()


def _percent(job: Job) -> int:
    """0-100: finished jobs 100, long recordings by segments done, anything else 0."""
    if job.status in ("succeeded", "failed"):
        return 100
    return int(round(100 * (job.progress or 0.0)))


def _audio_url(job: Job) -> str | None:
    """Where the recording is served; None when it is not stored, or was never decoded as audio
    (the endpoint refuses those, see ``web.media``)."""
    if not job.storage_key or never_decoded(job):
        return None
    return url_for("api.job_audio", job_id=job.id, _external=True)


def job_model(job: Job, deliveries: Sequence[WebhookDelivery] = (), segments: bool = True) -> schemas.Job:
    return schemas.Job.build({
        "id": job.id,
        "batch_id": job.batch_id,
        "filename": job.filename,
        "status": job.status,
        "error": _error(job),
        "result": result_model(job.result, segments),
        "size_bytes": job.size_bytes,
        "content_hash": job.content_hash,
        "format": job.format,
        "duration_s": job.duration_s,
        "declared_duration_s": job.declared_duration_s,
        "sample_rate": job.sample_rate,
        "channels": job.channels,
        "options": job.options,
        "client_reference": job.client_reference,
        "metadata": job.meta,
        "attempts": job.attempts,
        "progress": _percent(job),
        "queue": {"enqueued": job.enqueued_at is not None, "enqueued_at": job.enqueued_at,
                  "error": job.enqueue_error},
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "url": url_for("api.job", job_id=job.id, _external=True),
        "audio_url": _audio_url(job),
        "audio_deleted_at": job.audio_deleted_at,
        "webhooks": [delivery_model(d) for d in deliveries],
    })


def job_dict(job: Job, deliveries: Sequence[WebhookDelivery] | None = None, segments: bool = True) -> dict[str, Any]:
    return job_model(job, deliveries or (), segments).to_json()


def job_page(jobs: Sequence[Job], next_cursor: str | None, segments: bool,
             deliveries: Mapping[uuid.UUID, Sequence[WebhookDelivery]]) -> dict[str, Any]:
    """One page of the job list, each job with its webhook deliveries (``deliveries`` by job id)."""
    return schemas.JobPage(jobs=[job_model(j, deliveries.get(j.id, ()), segments) for j in jobs],
                           next_cursor=next_cursor).to_json()


def batch_dict(batch: Batch, counts: dict[str, int],
               deliveries: Sequence[WebhookDelivery] | None = None) -> dict[str, Any]:
    """The batch with its jobs; ``deliveries`` are all of the batch's, its own and its jobs'."""
    done = counts.get("succeeded", 0) + counts.get("failed", 0)
    by_job: dict[uuid.UUID, list[WebhookDelivery]] = {}
    for d in deliveries or ():
        if d.job_id is not None:
            by_job.setdefault(d.job_id, []).append(d)
    return schemas.Batch.build({
        "id": batch.id,
        "created_at": batch.created_at,
        "file_count": batch.file_count,
        "options": batch.options,
        "counts": counts,
        "done": done == batch.file_count,
        "url": url_for("api.batch", batch_id=batch.id, _external=True),
        "webhook_url": batch.webhook_url,
        "webhooks": [delivery_model(d) for d in deliveries or () if d.job_id is None],
        "jobs": [job_model(j, by_job.get(j.id, ())) for j in batch.jobs],
    }).to_json()


def upload_accepted(batch_id: uuid.UUID, jobs: Sequence[Job], enqueued: bool) -> dict[str, Any]:
    """The answer to an upload; ``warning`` only when the queue could not be reached."""
    fields: dict[str, Any] = {"batch_id": batch_id,
                              "batch_url": url_for("api.batch", batch_id=batch_id, _external=True),
                              "jobs": [job_summary(j) for j in jobs]}
    if not enqueued:
        fields["warning"] = "queue unavailable: jobs are stored and will be queued when it returns"
    return schemas.UploadAccepted.build(fields).to_json()
