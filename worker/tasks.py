"""The worker's Celery tasks: thin wrappers that load ids, call the pipeline and persist.

``register(app)`` defines the tasks on one worker app, as closures over that app, when
``create_worker`` builds it; nothing is registered or tuned at import. Why closures rather than
module-level ``@app.task`` or ``shared_task``:

- a module-level ``@app.task`` needs the app at import, which is what tied the worker to the
  environment: importing this module built the environment's app;
- ``shared_task`` registers on *every* app of the process (a sending-only app as well) through an
  import-time side effect, and a task would find its settings through whichever app is current:
  with two worker apps in one process, that is whichever started last.

A closure gets its app, and through it the app's ``Runtime`` (settings, session factory, models),
from the factory call, so two apps with different settings each run their own tasks. Task names
come from ``ser_shared.contracts`` (the web tier sends by name); ``AnalyzeTask`` is the base
class of the analysis tasks, and it finds its runtime through ``self.app``. The task bodies
below the closures take a ``Runtime`` and are plain functions.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from billiard.einfo import ExceptionInfo
from celery import Celery, Task
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from ser_ml import pipeline, transcript_stage
from ser_shared import logs, webhooks
from ser_shared.contracts import ANALYZE, DELIVER_WEBHOOK, TRANSCRIBE
from ser_shared.settings import Settings
from worker import delivery, heartbeat, metrics, results, spool
from worker.runtime import Runtime, runtime_of

log = logging.getLogger(__name__)

# Lost connections are transient (a database restart, a failover): retried with backoff.
RETRY_DB: dict[str, Any] = {"acks_late": True, "autoretry_for": (OperationalError, InterfaceError),
                            "retry_backoff": 2, "retry_backoff_max": 60, "max_retries": 8}


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
        rt = runtime_of(self.app)
        limit = rt.settings.task_time_limit_s
        webhooks.send(self.app, results.fail_all(rt.session_factory(), job_ids, "time_limit_exceeded",
                                                 f"analysis exceeded the {limit} s time limit"))
        results.abandon_transcripts(rt.session_factory(), job_ids, "time_limit",
                                    f"the task exceeded the {limit} s time limit before this transcript")


def register(app: Celery) -> None:
    """Define the worker's tasks on ``app``, which must carry a ``Runtime`` (see the module doc)."""
    rt = runtime_of(app)

    def send_webhooks(delivery_ids: list[str]) -> None:
        webhooks.send(app, delivery_ids)

    # shared=False: Celery's default (shared) also registers a task on every app created later
    # in the process, where this closure, bound to this app's runtime, would shadow that app's own.
    @app.task(name=ANALYZE, base=AnalyzeTask, retry_jitter=True, shared=False, **RETRY_DB)
    def analyze(job_ids: list[str]) -> int:
        """Analyse a chunk of jobs; returns how many were processed. Database hiccups are retried."""
        return analyze_jobs(rt, job_ids, send_webhooks)

    @app.task(name=TRANSCRIBE, base=AnalyzeTask, retry_jitter=True, shared=False, **RETRY_DB)
    def transcribe(job_ids: list[str]) -> int:
        """The transcript stage alone, for finished jobs whose transcript a dead worker left
        pending (sent by the reconciler). Returns how many transcripts were made."""
        return _owed_transcripts(rt.session_factory(), [uuid.UUID(i) for i in job_ids], rt.settings)

    @app.task(name=DELIVER_WEBHOOK, shared=False, **RETRY_DB)
    def deliver_webhook(delivery_id: str) -> None:
        """One delivery attempt; the next one, if any, is scheduled with a countdown."""
        delay = delivery.deliver(rt.session_factory(), rt.settings, delivery_id)
        if delay is not None:
            webhooks.send(app, [delivery_id], countdown=delay)


def analyze_jobs(rt: Runtime, job_ids: list[str], send_webhooks: Callable[[list[str]], None]) -> int:
    """The ``analyze`` task's body: claim, run the pipeline, persist, then the transcript stage."""
    settings, factory = rt.settings, rt.session_factory()
    claimed = results.claim(factory, job_ids, settings, heartbeat.node())
    # Every log line of the chunk names its batch and tenant (and the job, for a chunk of one).
    with logs.bind(batch_id=claimed.batch_id, tenant=claimed.tenant,
                   job_id=job_ids[0] if len(job_ids) == 1 else None):
        return _analyze_claimed(rt, claimed, job_ids, send_webhooks)


def _analyze_claimed(rt: Runtime, claimed: results.Claimed, job_ids: list[str],
                     send_webhooks: Callable[[list[str]], None]) -> int:
    settings, factory = rt.settings, rt.session_factory()
    send_webhooks(claimed.deliveries)  # jobs failed instead of claimed (attempts used up, audio gone)
    inputs = claimed.inputs
    if len(inputs) < len(job_ids):
        # Some are finished already: a redelivered message, after a kill -9 of the pool child
        # that was making their transcripts. Their emotions stand; the transcripts are owed.
        taken = {i.id for i in inputs}
        _owed_transcripts(factory, [u for i in job_ids if (u := uuid.UUID(i)) not in taken], settings)
    if not inputs:
        return 0
    models = rt.ensemble()
    # The spool copies (S3) live until the transcript stage, which reads the recordings again.
    with spool.local_inputs(settings, inputs) as local:
        try:
            outcomes = pipeline.run(models, local, settings, results.ProgressWriter(factory))
        except SoftTimeLimitExceeded:
            log.error("time limit exceeded jobs=%s", job_ids)
            send_webhooks(write_with_retry(lambda: results.fail_all(
                factory, [i.id for i in inputs], "time_limit_exceeded",
                f"analysis took longer than {settings.task_soft_time_limit_s} s")))
            return 0
        metrics.observe_chunk(outcomes)
        send_webhooks(write_with_retry(lambda: results.persist(factory, outcomes, models.versions)))
        _transcripts(factory, outcomes, settings)
    log.info("analysed jobs=%d failed=%d", len(outcomes), sum(o.prediction is None for o in outcomes))
    return len(outcomes)


def _transcripts(factory: sessionmaker[Session], outcomes: list[pipeline.Outcome], settings: Settings) -> None:
    """The transcript stage, after the emotions are stored: its failures never touch them."""
    if not any(o.audio is not None for o in outcomes):
        return
    try:
        transcripts: dict[uuid.UUID, dict[str, Any]] = {}
        for outcome in outcomes:  # one at a time, as transcribe_all does, to time each recording
            started = time.perf_counter()
            made = transcript_stage.transcribe_all([outcome], settings)
            if made:
                metrics.observe_transcript(started)
                transcripts.update(made)
        done = [o for o in outcomes if o.job_id in transcripts]
        with_segments = {o.job_id: o.segments for o in done if o.segments}
        talks: dict[uuid.UUID, results.Talk] = {o.job_id: (o.channels, o.conversation) for o in done if o.channels}
        results.save_transcripts(factory, transcripts, with_segments, talks)
    except SoftTimeLimitExceeded:
        left = {o.job_id: {**(o.transcript or {}), "status": "unavailable", "reason": "time_limit",
                           "message": "the task ran out of time before this transcript"}
                for o in outcomes if o.audio is not None}
        results.save_transcripts(factory, left)


def _owed_transcripts(factory: sessionmaker[Session], job_ids: list[uuid.UUID], settings: Settings) -> int:
    """Make the transcripts still pending among ``job_ids`` from the stored audio (see
    ``results.start_transcripts``); the emotion results are not touched."""
    owed = results.start_transcripts(factory, job_ids, settings, heartbeat.node())
    if not owed:
        return 0
    log.info("transcribing again jobs=%s", [str(o.job.id) for o in owed])
    done: dict[uuid.UUID, dict[str, Any]] = {}
    segments: dict[uuid.UUID, list[dict[str, Any]]] = {}
    talks: dict[uuid.UUID, results.Talk] = {}
    try:
        for item in owed:
            with spool.local_inputs(settings, [item.job]) as (local,):
                done[item.job.id] = transcript_stage.transcribe_stored(local, item.transcript, item.segments,
                                                                       settings, item.channels)
            kept = item.segments
            if item.channels:  # the channels' segments got their text: the conversation follows
                talk = transcript_stage.restore_conversation(item.job.id, item.segments, item.channels,
                                                             item.conversation)
                talks[item.job.id], kept = (talk.channels, talk.conversation), talk.segments
            if kept:
                segments[item.job.id] = kept
    except SoftTimeLimitExceeded:
        results.abandon_transcripts(factory, [o.job.id for o in owed if o.job.id not in done], "time_limit",
                                    "the task ran out of time before this transcript")
    write_with_retry(lambda: results.save_transcripts(factory, done, segments, talks))
    return len(done)
