"""The worker's sweeper: re-send what the broker never got or lost, requeue jobs of dead or stuck
workers, and re-send transcripts whose holder is gone. Only the worker runs it; the web tier sends
work through ``ser_shared.enqueue``.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import Celery
from sqlalchemy import Row, delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from ser_shared.contracts import ANALYZE, TRANSCRIBE
from ser_shared.enqueue import chunks, enqueue, queue_for
from ser_shared.models import BROKER, FINISHED, Job, JobStatus, Result, WorkerHeartbeat
from ser_shared.settings import Settings
from worker.orphans import sweep_orphans

log = logging.getLogger(__name__)


def sweep_unqueued(celery: Celery, factory: sessionmaker[Session], settings: Settings,
                   limit: int = 5000) -> int:
    """Enqueue jobs that were committed while the broker was unreachable. Returns how many were sent.

    Jobs younger than ``settings.unqueued_grace_s`` are left alone: their upload request may still
    be enqueuing them.
    """
    cutoff = datetime.now(UTC) - timedelta(seconds=settings.unqueued_grace_s)
    with factory() as session:
        rows = session.execute(
            select(Job.id, Job.options).where(Job.status == JobStatus.QUEUED.value,
                                              Job.enqueued_at.is_(None), Job.created_at <= cutoff)
            .order_by(Job.created_at).limit(limit)
        ).all()
    by_queue: dict[str, list[uuid.UUID]] = {}
    for job_id, options in rows:
        by_queue.setdefault(queue_for(options, settings.default_queue), []).append(job_id)
    sent = 0
    for queue, ids in by_queue.items():
        if enqueue(celery, factory, ids, queue, settings.chunk_size):
            sent += len(ids)
    if rows:
        log.info("sweep found=%d enqueued=%d", len(rows), sent)
    return sent


# kombu's Redis transport: a list per queue (a suffixed list per non-zero priority) and one hash of
# delivered, unacknowledged messages.
REDIS_PRIORITY_SEP = "\x06\x16"
REDIS_PRIORITIES = (3, 6, 9)
REDIS_UNACKED = "unacked"


def _analyze_job_ids(message: dict[str, object]) -> list[str]:
    """The job ids an analyze message carries (none for other tasks or unreadable messages)."""
    headers = message.get("headers")
    if not isinstance(headers, dict) or headers.get("task") != ANALYZE:
        return []
    body = message.get("body")
    properties = message.get("properties")
    try:
        if isinstance(properties, dict) and properties.get("body_encoding") == "base64":
            body = base64.b64decode(str(body))
        args = json.loads(body)[0]  # type: ignore[arg-type]  # task protocol 2: [args, kwargs, embed]
        return [str(i) for i in args[0]]
    except (ValueError, TypeError, IndexError, KeyError):
        return []


def broker_job_ids(celery: Celery, queues: set[str]) -> set[str] | None:
    """Ids of jobs the broker holds: waiting in ``queues`` or delivered and not yet acknowledged.

    None when the transport cannot be inspected (only Redis can): callers then re-send nothing.
    """
    if not celery.conf.broker_url.startswith(("redis://", "rediss://")):
        return None
    raw: list[bytes] = []
    with celery.connection_for_write() as conn:
        client = conn.default_channel.client
        for queue in queues:
            for key in (queue, *(f"{queue}{REDIS_PRIORITY_SEP}{p}" for p in REDIS_PRIORITIES)):
                raw.extend(client.lrange(key, 0, -1))
        # Unacked entries are [message, exchange, routing key]; they cover messages a worker holds
        # (running, prefetched or waiting for a retry countdown).
        unacked = [json.loads(v)[0] for v in client.hvals(REDIS_UNACKED)]
    ids: set[str] = set()
    for message in [json.loads(r) for r in raw] + unacked:
        ids.update(_analyze_job_ids(message))
    return ids


def _send_again(celery: Celery, factory: sessionmaker[Session], settings: Settings,
                rows: Sequence[Row[Any]]) -> int:
    by_queue: dict[str, list[uuid.UUID]] = {}
    for row in rows:
        by_queue.setdefault(queue_for(row.options, settings.default_queue), []).append(row.id)
    return sum(len(ids) for queue, ids in by_queue.items()
               if enqueue(celery, factory, ids, queue, settings.chunk_size))


def requeue_stuck(celery: Celery, factory: sessionmaker[Session], settings: Settings,
                  limit: int = 5000) -> int:
    """Requeue jobs still processing well past the hard time limit: their worker died with them.

    A pool child that dies is noticed by its parent, which requeues the message; this covers the
    whole worker (or its machine) dying, whose unacknowledged message Redis would only restore
    after the visibility timeout. The attempt that was running stays counted, so a job that keeps
    killing its worker ends ``too_many_attempts`` at its next claim.
    """
    now = datetime.now(UTC)
    cutoff = now - timedelta(seconds=settings.task_time_limit_s + settings.stuck_margin_s)
    with factory() as session:
        stuck = session.scalars(select(Job.id).where(Job.status == JobStatus.PROCESSING.value,
                                                     Job.started_at < cutoff)
                                .order_by(Job.started_at).limit(limit)).all()
        # The status condition again in the UPDATE: of two sweepers, or a worker finishing the job
        # just now, only one changes the row.
        rows = session.execute(
            update(Job).where(Job.id.in_(stuck), Job.status == JobStatus.PROCESSING.value, Job.started_at < cutoff)
            .values(status=JobStatus.QUEUED.value, worker=None, worker_at=None, enqueued_at=now, enqueue_error=None)
            .returning(Job.id, Job.options)).all() if stuck else []
        session.commit()
    if rows:
        log.warning("requeued stuck jobs=%d (processing for over %d s)", len(rows),
                    settings.task_time_limit_s + settings.stuck_margin_s)
    return _send_again(celery, factory, settings, rows)


def requeue_lost(celery: Celery, factory: sessionmaker[Session], settings: Settings, suspects: set[uuid.UUID],
                 limit: int = 5000) -> int:
    """Re-send queued jobs that the broker no longer holds (it restarted without persistence).

    A job counts as lost when it was sent at least ``requeue_after_s`` ago, is still queued, and
    its id is in no message waiting in its queue or delivered and unacknowledged, on this pass and
    on the previous one: ``suspects`` holds the ids missing last time (the caller keeps it between
    passes). One look is not enough: a message being delivered is briefly in neither place (popped
    from the list, not yet in the unacknowledged hash), and a busy worker was seen to hit that.
    A needless re-send would still be harmless (claims skip finished jobs; one result row a job).
    """
    now = datetime.now(UTC)
    cutoff = now - timedelta(seconds=settings.requeue_after_s)
    with factory() as session:
        waiting = session.execute(select(Job.id, Job.options).where(Job.status == JobStatus.QUEUED.value,
                                                                    Job.enqueued_at <= cutoff)
                                  .order_by(Job.enqueued_at).limit(limit)).all()
    if not waiting:
        suspects.clear()
        return 0
    held = broker_job_ids(celery, {queue_for(options, settings.default_queue) for _, options in waiting})
    if held is None:
        return 0
    missing = {job_id for job_id, _ in waiting if str(job_id) not in held}
    lost = list(missing & suspects)
    suspects.clear()
    suspects.update(missing - set(lost))
    if not lost:
        return 0
    with factory() as session:
        rows = session.execute(
            update(Job).where(Job.id.in_(lost), Job.status == JobStatus.QUEUED.value, Job.enqueued_at <= cutoff)
            .values(enqueued_at=now).returning(Job.id, Job.options)).all()
        session.commit()
    if rows:
        log.warning("re-sending jobs missing from the broker jobs=%d", len(rows))
    return _send_again(celery, factory, settings, rows)


def live_nodes(session: Session, settings: Settings, now: datetime) -> set[str]:
    """Worker nodes whose heartbeat is younger than ``worker_dead_after_s``."""
    cutoff = now - timedelta(seconds=settings.worker_dead_after_s)
    return set(session.scalars(select(WorkerHeartbeat.node).where(WorkerHeartbeat.seen_at >= cutoff)))


def requeue_orphaned(celery: Celery, factory: sessionmaker[Session], settings: Settings,
                     limit: int = 5000) -> int:
    """Requeue jobs being analysed by a worker node whose heartbeat stopped (a kill -9 of the
    whole worker, or of its machine): within ``worker_dead_after_s`` plus a sweep of the kill,
    where ``requeue_stuck`` waits for the hard time limit. The attempt stays counted, as there.

    Jobs claimed less than ``worker_dead_after_s`` ago are left alone: their node may have started
    just now. A pool child killed alone needs nothing from here: its node is alive, and the
    node's main process requeues the child's message (``task_reject_on_worker_lost``).
    """
    now = datetime.now(UTC)
    cutoff = now - timedelta(seconds=settings.worker_dead_after_s)
    with factory() as session:
        held = session.execute(select(Job.id, Job.worker).where(
            Job.status == JobStatus.PROCESSING.value, Job.worker.is_not(None), Job.worker_at < cutoff)
            .order_by(Job.worker_at).limit(limit)).all()
        if not held:
            return 0
        live = live_nodes(session, settings, now)
        dead = {w for _, w in held if w is not None and w not in live}
        orphans = [job_id for job_id, w in held if w in dead]
        # The holder again in the UPDATE: a job claimed afresh (by a live node) in between is its.
        rows = session.execute(
            update(Job).where(Job.id.in_(orphans), Job.status == JobStatus.PROCESSING.value, Job.worker.in_(dead))
            .values(status=JobStatus.QUEUED.value, worker=None, worker_at=None, enqueued_at=now, enqueue_error=None)
            .returning(Job.id, Job.options)).all() if orphans else []
        session.commit()
    if rows:
        log.warning("requeued jobs of dead workers jobs=%d workers=%s (no heartbeat for %.0f s)", len(rows),
                    ",".join(sorted(dead)), settings.worker_dead_after_s)
    return _send_again(celery, factory, settings, rows)


def give_up_transcript(transcript: dict[str, Any], tried: int) -> dict[str, Any]:
    """A transcript interrupted ``tried`` times, now final: it never stays pending."""
    return {**transcript, "status": "unavailable", "reason": "worker_lost", "text": None,
            "message": f"the transcription was interrupted {tried} times (its worker was killed); giving up"}


def resend_transcripts(celery: Celery, factory: sessionmaker[Session], settings: Settings,
                       judge_heartbeats: bool = True, limit: int = 1000) -> int:
    """Re-send the transcript stage of finished jobs whose holder is gone; returns how many.

    A job's emotion is stored before its transcript is made, in the same task: a kill -9 of the
    whole worker then leaves a finished job with a pending transcript that no message will bring
    back (Redis restores the unacknowledged one only after its visibility timeout, an hour). Held
    jobs are re-sent (as ``ser.transcribe``, holder BROKER) when their node's heartbeat stopped,
    when the holder is BROKER and no worker took the message within the hard time limit plus
    ``stuck_margin_s`` (it was lost), or, as the backstop, when any holder kept it that long. A
    transcript already started ``max_attempts`` times is given up (``worker_lost``) instead.
    """
    now = datetime.now(UTC)
    dead_cutoff = now - timedelta(seconds=settings.worker_dead_after_s)
    stuck_cutoff = now - timedelta(seconds=settings.task_time_limit_s + settings.stuck_margin_s)
    sent: list[tuple[uuid.UUID, dict[str, Any] | None]] = []
    given_up = 0
    with factory() as session:
        held = session.execute(
            select(Job, Result.transcript).outerjoin(Result, Result.job_id == Job.id)
            .where(Job.status.in_(FINISHED), Job.worker.is_not(None)).order_by(Job.worker_at).limit(limit)
            .with_for_update(of=Job, skip_locked=True)).all()
        live = live_nodes(session, settings, now) if held else set()
        for job, transcript in held:
            at = job.worker_at
            if (transcript or {}).get("status") != "pending":
                job.worker = job.worker_at = None  # nothing owed (should not happen): release it
                continue
            overdue = at is None or at < stuck_cutoff
            holder_dead = judge_heartbeats and job.worker not in live and (at is None or at < dead_cutoff)
            if not (overdue or (job.worker != BROKER and holder_dead)):
                continue
            tried = int(transcript.get("attempts") or 0)
            if tried >= settings.max_attempts:
                session.execute(update(Result).where(Result.job_id == job.id)
                                .values(transcript=give_up_transcript(transcript, tried)))
                job.worker = job.worker_at = None
                given_up += 1
                continue
            job.worker, job.worker_at = BROKER, now
            sent.append((job.id, job.options))
        session.commit()
    if given_up:
        log.warning("transcripts given up jobs=%d (interrupted %d times)", given_up, settings.max_attempts)
    if not sent:
        return 0
    by_queue: dict[str, list[uuid.UUID]] = {}
    for job_id, options in sent:
        by_queue.setdefault(queue_for(options, settings.default_queue), []).append(job_id)
    count = 0
    for queue, ids in by_queue.items():
        for chunk in chunks(ids, settings.chunk_size):
            try:
                celery.send_task(TRANSCRIBE, args=[[str(i) for i in chunk]], queue=queue, retry=True,
                                 retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5})
            except Exception as exc:  # held as BROKER: re-sent again once overdue
                log.warning("transcript re-send failed jobs=%d error=%s", len(chunk), exc)
            else:
                count += len(chunk)
    log.warning("re-sent transcripts of lost workers jobs=%d", count)
    return count


HEARTBEAT_KEEP = timedelta(days=1)


def prune_heartbeats(factory: sessionmaker[Session]) -> None:
    """Forget nodes silent for a day (every worker start is a new node)."""
    with factory() as session:
        session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.seen_at < datetime.now(UTC) - HEARTBEAT_KEEP))
        session.commit()


class Reconciler:
    """The worker's sweeper pass over everything the broker never got, lost, or left stuck.

    Keeps, between passes, the jobs seen missing from the broker once (see ``requeue_lost``).
    ``judge_heartbeats`` is False while the sweeping node's own heartbeat has not been steady for
    ``worker_dead_after_s`` (it just started, or the database was out): other nodes' heartbeats
    may then be old only because they could not be written, not because the nodes are dead.
    """

    def __init__(self) -> None:
        self.suspects: set[uuid.UUID] = set()
        self.orphans_swept_at: float | None = None

    def orphans(self, factory: sessionmaker[Session], settings: Settings) -> int:
        """The orphan sweep (worker.orphans), at most once per grace period and at least hourly:
        it lists the whole store, which is cheap for a bucket but not every sweep_interval_s."""
        now = time.monotonic()
        if self.orphans_swept_at is not None and now - self.orphans_swept_at < min(settings.orphan_grace_s, 3600):
            return 0
        self.orphans_swept_at = now
        try:
            return sweep_orphans(factory, settings)
        except Exception:  # the store being out must not stop the requeues above
            log.exception("orphan sweep failed")
            return 0

    def __call__(self, celery: Celery, factory: sessionmaker[Session], settings: Settings,
                 judge_heartbeats: bool = True) -> dict[str, int]:
        counts = {"unqueued": sweep_unqueued(celery, factory, settings),
                  "orphaned": requeue_orphaned(celery, factory, settings) if judge_heartbeats else 0,
                  "stuck": requeue_stuck(celery, factory, settings),
                  "lost": requeue_lost(celery, factory, settings, self.suspects),
                  "transcripts": resend_transcripts(celery, factory, settings, judge_heartbeats),
                  "orphans": self.orphans(factory, settings)}
        prune_heartbeats(factory)
        return counts
