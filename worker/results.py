"""The worker's database writes: claiming jobs and persisting outcomes, both idempotent.

Writes that finish jobs also record their webhook events (rows in ``webhook_deliveries``, in the
same transaction) and return those rows' ids: the caller hands them to the broker after the
commit (``ser_shared.webhooks.send``). Enqueueing is the task's business, not this module's; a
send that never happens is caught by the delivery sweeper, which finds the pending rows.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from ser_ml.pipeline import JobInput, Outcome
from ser_shared.audio import declared_if_different
from ser_shared.db import upsert_insert
from ser_shared.models import BROKER, FINISHED, Job, JobStatus, Result
from ser_shared.settings import Settings
from ser_shared.storage import path_for
from ser_shared.webhooks import record_events
from worker import metrics
from worker.reconcile import give_up_transcript

log = logging.getLogger(__name__)

PENDING = "pending"  # a transcript's status while its stage is owed


@dataclass(frozen=True)
class Claimed:
    """What ``claim`` took on, and the webhook deliveries of the jobs it failed instead."""

    inputs: list[JobInput]
    deliveries: list[str]
    # The chunk's batch and tenant (one batch per message), for the log context.
    batch_id: uuid.UUID | None = None
    tenant: str | None = None


def claim(factory: sessionmaker[Session], job_ids: Sequence[str], settings: Settings,
          holder: str | None = None) -> Claimed:
    """Mark jobs as processing by ``holder`` (this worker node) and count the attempt.

    Finished or deleted jobs are skipped (a redelivered message does nothing here; its transcript
    stage may still be owed, see ``start_transcripts``). A job that has used up its attempts (it
    crashed its worker each time) is failed instead of tried again.
    """
    ids = [uuid.UUID(i) for i in job_ids]
    now = datetime.now(UTC)
    inputs: list[JobInput] = []
    failed: list[uuid.UUID] = []
    codes: list[str] = []
    batch_id, tenant = None, None
    with factory() as session:
        for job in session.scalars(select(Job).where(Job.id.in_(ids)).with_for_update()):
            batch_id, tenant = job.batch_id, job.tenant
            if job.status in FINISHED:
                continue
            if job.attempts >= settings.max_attempts:
                _fail(job, "too_many_attempts",
                      f"the analysis was interrupted {job.attempts} times; giving up", now)
                failed.append(job.id)
                codes.append("too_many_attempts")
                continue
            job.status, job.attempts, job.started_at = JobStatus.PROCESSING.value, job.attempts + 1, now
            job.worker, job.worker_at = holder, now
            if job.storage_key is None or job.format is None:
                _fail(job, "audio_missing", "the stored recording is gone", now)
                failed.append(job.id)
                codes.append("audio_missing")
                continue
            inputs.append(job_input(job, settings))
        deliveries = record_events(session, failed)
        session.commit()
    for code in codes:  # counted once committed: a rolled-back transaction finished nothing
        metrics.job_finished(JobStatus.FAILED.value, code)
    return Claimed(inputs, deliveries, batch_id, tenant)


def job_input(job: Job, settings: Settings) -> JobInput:
    """What the pipeline needs of a stored job: where its recording is, what it holds (from the
    upload's probe) and the options it was uploaded with."""
    assert job.storage_key is not None and job.format is not None
    options = job.options or {}
    return JobInput(job.id, path_for(settings.upload_dir, job.storage_key), job.format,
                    options.get("transcribe"), options.get("language", "en-US"), job.duration_s, job.storage_key,
                    channels=options.get("channels") or "auto", channel_labels=options.get("channel_labels"),
                    channel_count=job.channels)


def _fail(job: Job, code: str, message: str, now: datetime) -> None:
    job.status, job.error_code, job.error_message, job.finished_at = (
        JobStatus.FAILED.value, code, message, now)
    job.emotion = job.confidence = job.escalation = None
    job.worker = job.worker_at = None  # nothing is outstanding: a failed job has no transcript stage


def fail_all(factory: sessionmaker[Session], job_ids: Sequence[uuid.UUID], code: str, message: str) -> list[str]:
    """Fail jobs still running (used when the task as a whole cannot finish, e.g. a time limit).
    Returns the webhook deliveries to send."""
    now = datetime.now(UTC)
    failed: list[uuid.UUID] = []
    with factory() as session:
        for job in session.scalars(select(Job).where(Job.id.in_(job_ids)).with_for_update()):
            if job.status not in FINISHED:
                _fail(job, code, message, now)
                failed.append(job.id)
        # Only the jobs this call finished: a job finished earlier already had its event.
        deliveries = record_events(session, failed)
        session.commit()
    metrics.job_finished(JobStatus.FAILED.value, code, len(failed))
    return deliveries


def _upsert_results(session: Session, rows: list[dict[str, Any]]) -> None:
    """Insert or overwrite each job's single result row (keyed by job id), all rows in one statement.

    One executemany (rendered as a multi-row INSERT ... ON CONFLICT) instead of a statement per job:
    a chunk's results cost one round trip, and the statement compiles once per process.
    """
    if not rows:
        return
    stmt = upsert_insert(session, Result)
    stmt = stmt.on_conflict_do_update(
        index_elements=[Result.job_id], set_={k: stmt.excluded[k] for k in rows[0] if k != "job_id"})
    session.execute(stmt, rows)


def persist(factory: sessionmaker[Session], outcomes: Sequence[Outcome], versions: dict[str, str]) -> list[str]:
    """Write all outcomes of a chunk, and the webhook events they imply, in one transaction.
    Returns the webhook deliveries to send.

    A job delivered twice (a message re-sent while the first delivery was still running) keeps one
    result row, the later one, and gets its webhook event once: only jobs this call finishes get one.
    """
    now = datetime.now(UTC)
    by_id = {o.job_id: o for o in outcomes}
    results: list[dict[str, Any]] = []
    finished: list[uuid.UUID] = []
    with factory() as session:
        for job in session.scalars(select(Job).where(Job.id.in_(list(by_id))).with_for_update()):
            if job.status not in FINISHED:
                finished.append(job.id)
            outcome = by_id[job.id]
            if outcome.duration_s is not None:
                job.declared_duration_s = job.declared_duration_s or declared_if_different(job.duration_s,
                                                                                           outcome.duration_s)
                job.duration_s = outcome.duration_s
            p = outcome.prediction
            if p is None:
                _fail(job, outcome.error_code or "internal_error", outcome.error_message or "", now)
                continue
            results.append({
                "job_id": job.id, "emotion": p.emotion, "confidence": p.confidence,
                "uncertain": p.uncertain, "probabilities": p.probabilities,
                "model_probabilities": p.model_probabilities, "model_versions": versions,
                "timings_ms": outcome.timings_ms, "created_at": now, "transcript": outcome.transcript,
                "segments": outcome.segments, "channels": outcome.channels, "conversation": outcome.conversation,
            })
            job.status, job.finished_at, job.error_code, job.error_message = (
                JobStatus.SUCCEEDED.value, now, None, None)
            job.progress = 1.0
            job.emotion, job.confidence = p.emotion, p.confidence
            job.escalation = _escalation(outcome.conversation)
            if outcome.transcript is None:
                job.worker = job.worker_at = None
            else:
                # The transcript stage follows in the same task, under the same holder: its first
                # attempt. A kill -9 during it leaves the job held, for the redelivered message
                # or the reconciler to take up (see start_transcripts).
                outcome.transcript = results[-1]["transcript"] = {**outcome.transcript, "attempts": 1}
        _upsert_results(session, results)
        deliveries = record_events(session, finished)
        session.commit()
    for job_id in finished:  # only the jobs this call finished: a redelivery counts nothing twice
        outcome = by_id[job_id]
        if outcome.prediction is None:
            metrics.job_finished(JobStatus.FAILED.value, outcome.error_code or "internal_error")
        else:
            metrics.job_finished(JobStatus.SUCCEEDED.value)
    return deliveries


def _escalation(conversation: dict[str, Any] | None) -> bool | None:
    return None if conversation is None else bool(conversation["escalation"])


Talk = tuple[list[dict[str, Any]] | None, dict[str, Any] | None]  # a result's channels and conversation


def save_transcripts(factory: sessionmaker[Session], transcripts: dict[uuid.UUID, dict[str, Any]],
                     segments: dict[uuid.UUID, list[dict[str, Any]]] | None = None,
                     talks: dict[uuid.UUID, Talk] | None = None) -> None:
    """Fill in the transcript stage of results already stored (one transaction); ``segments``
    replaces a result's segments, now carrying their own transcripts, and ``talks`` its channels
    and conversation (words per minute, the conversation transcript). The jobs are then held by
    nobody: their last stage is done."""
    if not transcripts:
        return
    with factory() as session:
        for job_id, transcript in transcripts.items():
            values: dict[str, Any] = {"transcript": transcript}
            if segments and job_id in segments:
                values["segments"] = segments[job_id]
            if talks and job_id in talks:
                values["channels"], values["conversation"] = talks[job_id]
                session.execute(update(Job).where(Job.id == job_id)
                                .values(escalation=_escalation(values["conversation"])))
            session.execute(update(Result).where(Result.job_id == job_id).values(**values))
        session.execute(update(Job).where(Job.id.in_(list(transcripts)), Job.status.in_(FINISHED))
                        .values(worker=None, worker_at=None))
        session.commit()


@dataclass(frozen=True)
class TranscriptInput:
    """A finished job whose transcript is still owed: where its audio is and what was asked."""

    job: JobInput
    transcript: dict[str, Any]
    segments: list[dict[str, Any]] | None
    channels: list[dict[str, Any]] | None = None
    conversation: dict[str, Any] | None = None


def _pending(session: Session, ids: Sequence[uuid.UUID]) -> list[tuple[Job, Result]]:
    rows = session.execute(select(Job, Result).join(Result, Result.job_id == Job.id)
                           .where(Job.id.in_(list(ids)), Job.status.in_(FINISHED))
                           .with_for_update(of=Job)).all()
    return [(job, result) for job, result in rows if (result.transcript or {}).get("status") == PENDING]


def start_transcripts(factory: sessionmaker[Session], job_ids: Sequence[uuid.UUID], settings: Settings,
                      holder: str) -> list[TranscriptInput]:
    """Take up the transcript stage of finished jobs whose transcript is still pending.

    This is how a transcript interrupted by a kill -9 is finished: the redelivered ``analyze``
    message (a pool child killed), or the reconciler's ``transcribe`` message (a whole worker
    killed), lands here. Each start counts an attempt in the transcript; a transcript that was
    interrupted ``max_attempts`` times (the recording kills its worker) is given up as
    ``unavailable`` / ``worker_lost`` instead of tried again, so it can never stay pending.
    """
    now = datetime.now(UTC)
    taken: list[TranscriptInput] = []
    with factory() as session:
        for job, result in _pending(session, job_ids):
            if job.worker not in (None, BROKER, holder):
                # Another node is making it (a duplicate message); should that node die, the
                # reconciler hands the transcript back (BROKER) and re-sends it.
                continue
            transcript = dict(result.transcript or {})
            tried = int(transcript.get("attempts") or 0)
            if tried >= settings.max_attempts:
                result.transcript = give_up_transcript(transcript, tried)
                job.worker = job.worker_at = None
                continue
            result.transcript = {**transcript, "attempts": tried + 1}
            job.worker, job.worker_at = holder, now
            if job.storage_key is None or job.format is None:
                result.transcript = {**result.transcript, "status": "unavailable", "reason": "audio_missing",
                                     "text": None, "message": "the stored recording is gone"}
                job.worker = job.worker_at = None
                continue
            taken.append(TranscriptInput(job_input(job, settings), result.transcript, result.segments,
                                         result.channels, result.conversation))
        session.commit()
    return taken


def abandon_transcripts(factory: sessionmaker[Session], job_ids: Sequence[uuid.UUID], reason: str,
                        message: str) -> None:
    """Mark the pending transcripts of ``job_ids`` unavailable (the task that owed them cannot
    finish, e.g. it was killed for the hard time limit) and release the jobs."""
    with factory() as session:
        for job, result in _pending(session, job_ids):
            result.transcript = {**(result.transcript or {}), "status": "unavailable", "reason": reason,
                                 "text": None, "message": message}
            job.worker = job.worker_at = None
        session.commit()


class ProgressWriter:
    """Writes a job's progress at most every ``interval_s`` (a long recording reports per block)."""

    def __init__(self, factory: sessionmaker[Session], interval_s: float = 2.0) -> None:
        self.factory, self.interval_s = factory, interval_s
        self._last: dict[uuid.UUID, float] = {}

    def __call__(self, job_id: uuid.UUID, done: float) -> None:
        now = time.monotonic()
        if now - self._last.get(job_id, 0.0) < self.interval_s:
            return
        self._last[job_id] = now
        try:
            with self.factory() as session:
                session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.PROCESSING.value)
                                .values(progress=round(min(max(done, 0.0), 1.0), 3)))
                session.commit()
        except (OperationalError, InterfaceError) as exc:
            # Progress is advisory: a database outage must not throw away the analysis under way
            # (its result write is retried when the analysis is done).
            log.warning("progress not recorded job=%s: %s", job_id, exc.orig)
