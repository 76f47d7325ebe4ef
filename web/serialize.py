"""JSON shapes of jobs and batches (the API contract)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from flask import url_for

from ser_shared.models import Batch, Job, Result, WebhookDelivery
from web.media import never_decoded


def iso(value: datetime | None) -> str | None:
    """UTC ISO 8601 with a Z; SQLite hands back naive UTC, which is treated as such."""
    if value is None:
        return None
    value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return value.isoformat().replace("+00:00", "Z")


def result_dict(result: Result | None, segments: bool = True) -> dict[str, Any] | None:
    if result is None:
        return None
    out: dict[str, Any] = {
        "emotion": result.emotion,
        "confidence": result.confidence,
        "uncertain": result.uncertain,
        "probabilities": result.probabilities,
        "models": {
            name: {"probabilities": probs, "version": result.model_versions.get(name)}
            for name, probs in result.model_probabilities.items()
        },
        "timings_ms": result.timings_ms,
        "transcript": result.transcript,
    }
    if segments:
        out["segments"] = result.segments or []
    return out


def job_summary(job: Job) -> dict[str, Any]:
    """The short form returned by uploads."""
    out: dict[str, Any] = {"id": str(job.id), "filename": job.filename, "status": job.status,
                           "client_reference": job.client_reference,
                           "url": url_for("api.job", job_id=job.id, _external=True)}
    if job.error_code:
        out["error"] = {"code": job.error_code, "message": job.error_message}
    return out


def delivery_dict(d: WebhookDelivery) -> dict[str, Any]:
    return {"id": d.id, "event": d.event, "url": d.url, "status": d.status, "created_at": iso(d.created_at),
            "next_attempt_at": iso(d.next_attempt_at), "attempts": d.attempts}


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


def job_dict(job: Job, deliveries: list[WebhookDelivery] | None = None, segments: bool = True) -> dict[str, Any]:
    return {
        "id": str(job.id),
        "batch_id": str(job.batch_id),
        "filename": job.filename,
        "status": job.status,
        "error": {"code": job.error_code, "message": job.error_message} if job.error_code else None,
        "result": result_dict(job.result, segments),
        "size_bytes": job.size_bytes,
        "content_hash": job.content_hash,
        "format": job.format,
        "duration_s": job.duration_s,
        "sample_rate": job.sample_rate,
        "channels": job.channels,
        "options": job.options,
        "client_reference": job.client_reference,
        "metadata": job.meta,
        "attempts": job.attempts,
        "progress": _percent(job),
        "queue": {"enqueued": job.enqueued_at is not None, "enqueued_at": iso(job.enqueued_at),
                  "error": job.enqueue_error},
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "url": url_for("api.job", job_id=job.id, _external=True),
        "audio_url": _audio_url(job),
        "audio_deleted_at": iso(job.audio_deleted_at),
        "webhooks": [delivery_dict(d) for d in deliveries or []],
    }


def batch_dict(batch: Batch, counts: dict[str, int],
               deliveries: list[WebhookDelivery] | None = None) -> dict[str, Any]:
    done = counts.get("succeeded", 0) + counts.get("failed", 0)
    return {
        "id": str(batch.id),
        "created_at": iso(batch.created_at),
        "file_count": batch.file_count,
        "options": batch.options,
        "counts": counts,
        "done": done == batch.file_count,
        "url": url_for("api.batch", batch_id=batch.id, _external=True),
        "webhook_url": batch.webhook_url,
        "webhooks": [delivery_dict(d) for d in deliveries or [] if d.job_id is None],
        "jobs": [job_dict(j) for j in batch.jobs],
    }
