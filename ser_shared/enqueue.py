"""The Celery app as both sides configure it, and commit-then-enqueue of job ids.

What the web tier needs to send work; the worker's sweeper that re-sends what was lost is
``worker.reconcile``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from itertools import pairwise

from celery import Celery
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from ser_shared.contracts import ANALYZE, QUEUE_CPU, QUEUE_GPU
from ser_shared.models import Job
from ser_shared.settings import Settings

log = logging.getLogger(__name__)

MARK_BATCH = 500  # job ids per UPDATE when recording what was enqueued


def make_celery(settings: Settings) -> Celery:
    """A Celery app for ``settings``: no result backend (results live in the database)."""
    app = Celery("ser", broker=settings.queue_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        # A worker killed mid-task (OOM, kill -9) leaves the message for redelivery.
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=settings.default_queue,
        task_create_missing_queues=True,
        task_soft_time_limit=settings.task_soft_time_limit_s,
        task_time_limit=settings.task_time_limit_s,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3,
        broker_transport_options=_transport_options(settings),
        # Loading TensorFlow and the models takes several seconds per child process.
        worker_proc_alive_timeout=120,
        worker_hijack_root_logger=False,
    )
    return app


def _transport_options(settings: Settings) -> dict[str, object]:
    if settings.queue_url.startswith("filesystem"):
        folder = settings.broker_folder
        for sub in ("queue", "control", "processed"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        # Producer and consumer share one folder: that folder is the queue.
        return {"data_folder_in": str(folder / "queue"), "data_folder_out": str(folder / "queue"),
                "control_folder": str(folder / "control"), "processed_folder": str(folder / "processed"),
                "store_processed": False}
    # Redis redelivers an unacknowledged task after visibility_timeout: keep it above the worst task.
    return {"visibility_timeout": max(3600, 2 * settings.task_time_limit_s),
            "socket_connect_timeout": 3, "socket_timeout": 10, "max_retries": 1}


def queue_for(options: dict[str, object] | None, default: str = QUEUE_CPU) -> str:
    device = (options or {}).get("device")
    return QUEUE_GPU if device == "gpu" else default


def chunks(ids: Sequence[uuid.UUID], size: int) -> list[list[uuid.UUID]]:
    """The fewest chunks of at most ``size`` ids, as even as possible.

    100 ids at size 16 make seven chunks of 14 or 15, not six of 16 and a straggler of 4: each
    chunk pays a fixed cost for its model calls, and even chunks keep the workers evenly busy.
    """
    if not ids:
        return []
    count = -(-len(ids) // size)
    base, extra = divmod(len(ids), count)
    bounds = [i * base + min(i, extra) for i in range(count + 1)]
    return [list(ids[start:end]) for start, end in pairwise(bounds)]


def enqueue(celery: Celery, factory: sessionmaker[Session], job_ids: Sequence[uuid.UUID],
            queue: str, chunk_size: int) -> bool:
    """Send committed jobs to the broker in chunks and record it on the rows.

    A broker failure is recorded on the jobs (``enqueue_error``) rather than raised: the rows are
    already committed, and a sweep (``sweep_unqueued``) sends them once the broker is back.
    Returns True when every chunk was sent.
    """
    sent: list[uuid.UUID] = []
    failed: list[tuple[list[uuid.UUID], str]] = []
    for chunk in chunks(job_ids, chunk_size):
        try:
            celery.send_task(ANALYZE, args=[[str(i) for i in chunk]], queue=queue, retry=True,
                             retry_policy={"max_retries": 2, "interval_start": 0.2,
                                           "interval_step": 0.5})
        except Exception as exc:  # kombu raises many transport-specific errors here
            log.warning("enqueue failed jobs=%d error=%s", len(chunk), exc)
            failed.append((chunk, f"broker unavailable: {exc}"[:500]))
        else:
            sent.extend(chunk)
    _mark(factory, sent, failed)
    return not failed


def _mark(factory: sessionmaker[Session], sent: list[uuid.UUID],
          failed: list[tuple[list[uuid.UUID], str]]) -> None:
    """Record which jobs reached the broker: one transaction per upload, not one per chunk."""
    now = datetime.now(UTC)
    with factory() as session:
        # Bounded IN lists: a 5000-file upload stays far below any driver's bind-parameter limit.
        for ids in chunks(sent, MARK_BATCH):
            session.execute(update(Job).where(Job.id.in_(ids)).values(enqueued_at=now, enqueue_error=None))
        for ids, error in failed:
            session.execute(update(Job).where(Job.id.in_(ids)).values(enqueued_at=None, enqueue_error=error))
        session.commit()
