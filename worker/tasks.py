"""Celery tasks: thin wrappers that load ids, call the pipeline and persist."""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from billiard.einfo import ExceptionInfo
from celery import Task
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from threadpoolctl import threadpool_limits

from ser_ml import pipeline
from ser_ml.allocator import tune_malloc
from ser_shared import webhooks
from ser_shared.contracts import ANALYZE, DELIVER_WEBHOOK, TRANSCRIBE
from ser_shared.settings import Settings, get_settings
from worker import delivery, heartbeat, results, runtime
from worker.celery_app import app

log = logging.getLogger(__name__)

BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def limit_blas_threads() -> None:
    """One BLAS thread per worker process, unless the operator set a thread count explicitly.

    The pool already runs one process per core. With OpenBLAS's default of one thread per core on
    top, busy worker processes fight over the cores: feature extraction (small numpy matrix
    products) took about twice the CPU time per recording. Called at import, i.e. in the pool's
    parent before it forks, so every child inherits the limit (and a solo pool has it too).
    """
    if not any(name in os.environ for name in BLAS_THREAD_VARIABLES):
        threadpool_limits(1, user_api="blas")


limit_blas_threads()
tune_malloc()  # before the pool forks: children inherit the allocator settings


T = TypeVar("T")
# Seconds between in-place retries of a result write whose database connection was lost.
WRITE_RETRY_DELAYS_S = (1.0, 2.0, 4.0, 8.0, 15.0)


def write_with_retry(write: Callable[[], T], delays: tuple[float, ...] = WRITE_RETRY_DELAYS_S) -> T:
    """Run a database write, retrying a lost connection in place (about 30 s in all).

    Retrying here keeps the analysis already done; only after that does the task fail over to
    Celery's retry, which analyses the chunk again and counts another attempt. The soft time limit
    striking during the write is not a reason to throw the finished analysis away either: the
    write is redone at once (it is idempotent; the hard limit still bounds it).
    """
    for delay in delays:
        try:
            return write()
        except SoftTimeLimitExceeded:
            log.warning("soft time limit reached while storing results; storing them anyway")
        except (OperationalError, InterfaceError) as exc:
            log.warning("database write failed, retrying in %.0f s: %s", delay, exc.orig)
            time.sleep(delay)
    return write()


class AnalyzeTask(Task):  # type: ignore[misc]
    """Fails a chunk's jobs when its pool child was killed for the hard time limit.

    Celery calls ``on_failure`` in the worker's main process for a hard time limit: the child that
    ignored the soft limit (stuck in native code) is gone and its message acknowledged, so without
    this its jobs would stay ``processing`` until the reconciler requeued them, only to hang again.
    Jobs whose emotion was stored keep it; a transcript they still owed is given up (the node
    holding it is alive, so nothing else would take it up).
    """

    def on_failure(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: ExceptionInfo) -> None:
        if not isinstance(exc, TimeLimitExceeded | SoftTimeLimitExceeded):
            return
        job_ids = [uuid.UUID(i) for i in (args[0] if args else kwargs.get("job_ids", []))]
        log.error("%s jobs=%s", type(exc).__name__, [str(i) for i in job_ids])
        limit = get_settings().task_time_limit_s
        results.fail_all(runtime.session_factory(), job_ids, "time_limit_exceeded",
                       f"analysis exceeded the {limit} s time limit", _send_webhooks)
        results.abandon_transcripts(runtime.session_factory(), job_ids, "time_limit",
                                  f"the task exceeded the {limit} s time limit before this transcript")


# Lost connections are transient (a database restart, a failover): retry with backoff.
@app.task(name=ANALYZE, base=AnalyzeTask, acks_late=True, autoretry_for=(OperationalError, InterfaceError),
          retry_backoff=2, retry_backoff_max=60, retry_jitter=True, max_retries=8)
def analyze(job_ids: list[str]) -> int:
    """Analyse a chunk of jobs; returns how many were processed. Database hiccups are retried."""
    settings = get_settings()
    factory = runtime.session_factory()
    notify = _send_webhooks
    inputs = results.claim(factory, job_ids, settings, notify, heartbeat.node())
    if len(inputs) < len(job_ids):
        # Some are finished already: a redelivered message, after a kill -9 of the pool child
        # that was making their transcripts. Their emotions stand; the transcripts are owed.
        claimed = {i.id for i in inputs}
        _owed_transcripts(factory, [u for i in job_ids if (u := uuid.UUID(i)) not in claimed], settings)
    if not inputs:
        return 0
    models = runtime.ensemble()
    try:
        outcomes = pipeline.run(models, inputs, settings, results.ProgressWriter(factory))
    except SoftTimeLimitExceeded:
        log.error("time limit exceeded jobs=%s", job_ids)
        write_with_retry(lambda: results.fail_all(factory, [i.id for i in inputs], "time_limit_exceeded",
                                                f"analysis took longer than {settings.task_soft_time_limit_s} s",
                                                notify))
        return 0
    write_with_retry(lambda: results.persist(factory, outcomes, models.versions, notify))
    _transcripts(factory, outcomes, settings)
    log.info("analysed jobs=%d failed=%d", len(outcomes), sum(o.prediction is None for o in outcomes))
    return len(outcomes)




def _transcripts(factory: sessionmaker[Session], outcomes: list[pipeline.Outcome], settings: Settings) -> None:
    """The transcript stage, after the emotions are stored: its failures never touch them."""
    if not any(o.audio is not None for o in outcomes):
        return
    try:
        transcripts = pipeline.transcribe_all(outcomes, settings)
        with_segments = {o.job_id: o.segments for o in outcomes
                         if o.job_id in transcripts and o.segments and len(o.segments) > 1}
        results.save_transcripts(factory, transcripts, with_segments)
    except SoftTimeLimitExceeded:
        left = {o.job_id: {**(o.transcript or {}), "status": "unavailable", "reason": "time_limit",
                           "message": "the task ran out of time before this transcript"}
                for o in outcomes if o.audio is not None}
        results.save_transcripts(factory, left)


@app.task(name=TRANSCRIBE, base=AnalyzeTask, acks_late=True, autoretry_for=(OperationalError, InterfaceError),
          retry_backoff=2, retry_backoff_max=60, retry_jitter=True, max_retries=8)
def transcribe(job_ids: list[str]) -> int:
    """The transcript stage alone, for finished jobs whose transcript a dead worker left pending
    (sent by the reconciler). Returns how many transcripts were made."""
    return _owed_transcripts(runtime.session_factory(), [uuid.UUID(i) for i in job_ids], get_settings())


def _owed_transcripts(factory: sessionmaker[Session], job_ids: list[uuid.UUID], settings: Settings) -> int:
    """Make the transcripts still pending among ``job_ids`` from the stored audio (see
    ``results.start_transcripts``); the emotion results are not touched."""
    owed = results.start_transcripts(factory, job_ids, settings, heartbeat.node())
    if not owed:
        return 0
    log.info("transcribing again jobs=%s", [str(o.job.id) for o in owed])
    done: dict[uuid.UUID, dict[str, Any]] = {}
    segments: dict[uuid.UUID, list[dict[str, Any]]] = {}
    try:
        for item in owed:
            done[item.job.id] = pipeline.transcribe_stored(item.job, item.transcript, item.segments, settings)
            if item.segments and len(item.segments) > 1:
                segments[item.job.id] = item.segments
    except SoftTimeLimitExceeded:
        results.abandon_transcripts(factory, [o.job.id for o in owed if o.job.id not in done], "time_limit",
                                  "the task ran out of time before this transcript")
    write_with_retry(lambda: results.save_transcripts(factory, done, segments))
    return len(done)


def _send_webhooks(delivery_ids: list[str]) -> None:
    webhooks.send(app, delivery_ids)


@app.task(name=DELIVER_WEBHOOK, acks_late=True, autoretry_for=(OperationalError, InterfaceError),
          retry_backoff=2, retry_backoff_max=60, max_retries=8)
def deliver_webhook(delivery_id: str) -> None:
    """One delivery attempt; the next one, if any, is scheduled with a countdown."""
    delay = delivery.deliver(runtime.session_factory(), get_settings(), delivery_id)
    if delay is not None:
        webhooks.send(app, [delivery_id], countdown=delay)
