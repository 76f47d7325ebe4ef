"""The worker's Celery app (``celery -A worker.celery_app:app``) and its process lifecycle.

Models and database engines are built per worker *process*, after the fork: TensorFlow and
database connections do not survive a fork.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery.signals import worker_init, worker_process_init, worker_ready, worker_shutdown
from sqlalchemy.exc import OperationalError

from ser_shared import logs, webhooks
from ser_shared.enqueue import make_celery
from ser_shared.settings import get_settings
from worker import delivery, runtime
from worker.heartbeat import Heartbeat
from worker.reconcile import Reconciler
from worker.retention import purge_expired_audio

log = logging.getLogger(__name__)

app = make_celery(get_settings())
app.conf.include = ["worker.tasks"]
_stop = threading.Event()
_heartbeat: Heartbeat | None = None


@worker_init.connect
def _first_heartbeat(**_: Any) -> None:
    """Name this node and write its first heartbeat before the pool forks and any job is claimed:
    children inherit the name, and no job is held by a node without a heartbeat row."""
    global _heartbeat
    _heartbeat = Heartbeat(get_settings())
    _heartbeat.beat_once()
    _heartbeat.close_connections()
    log.info("worker node=%s", _heartbeat.node)


@worker_process_init.connect
def _load_models(**_: Any) -> None:
    logs.configure(get_settings().log_level)
    runtime.reset_after_fork()
    runtime.ensemble()


@worker_ready.connect
def _start_sweeper(**_: Any) -> None:
    """Periodically re-send what the broker never got or lost, and stuck jobs (main process only)."""

    reconcile = Reconciler()
    beat = _heartbeat or Heartbeat(get_settings())
    beat.start()

    def loop() -> None:
        while not _stop.is_set():
            try:
                settings = get_settings()
                reconcile(app, runtime.session_factory(), settings,
                          judge_heartbeats=beat.steady_for() >= settings.worker_dead_after_s)
                # Webhook attempts whose broker message was lost (a Redis restart) are overdue.
                webhooks.send(app, delivery.due(runtime.session_factory()))
                purge_expired_audio(runtime.session_factory(), get_settings())
            except OperationalError as exc:
                # An outage is retried next sweep; a traceback every sweep would bury the log.
                log.warning("sweep skipped, database unavailable: %s", exc.orig)
            except Exception:
                log.exception("sweep failed")
            _stop.wait(get_settings().sweep_interval_s)

    threading.Thread(target=loop, name="ser-sweeper", daemon=True).start()


@worker_shutdown.connect
def _stop_sweeper(**_: Any) -> None:
    _stop.set()
    if _heartbeat is not None:
        _heartbeat.stop()
