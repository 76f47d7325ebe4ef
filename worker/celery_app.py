"""The worker factory, ``create_worker(settings)``, and the entry point ``celery -A worker.celery_app:app``.

The factory builds a configured Celery app from the settings it is given and reads nothing from
the environment: the broker, queues and time limits (``ser_shared.enqueue.make_celery``, which the
web tier shares), the tasks (``worker.tasks.register``), the app's ``Runtime`` (settings, session
factory, models) and its process lifecycle. Only the module attribute ``app`` reads the
environment, built on first access by the Celery command; importing this module builds nothing.

Models and database engines are built per worker *process*, after the fork: TensorFlow and
database connections do not survive a fork.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery
from celery.signals import worker_init, worker_process_init, worker_ready, worker_shutdown
from sqlalchemy.exc import OperationalError

from ser_ml.inference import Ensemble
from ser_shared import logs, schemas, webhooks
from ser_shared.contracts import QUEUE_GPU
from ser_shared.enqueue import make_celery
from ser_shared.settings import Settings, get_settings
from worker import delivery, metrics, tasks
from worker.heartbeat import Heartbeat
from worker.reconcile import Reconciler
from worker.retention import purge_expired_audio
from worker.runtime import Runtime, attach, runtime_of, tune_process

log = logging.getLogger(__name__)


def create_worker(settings: Settings, *, models: Ensemble | None = None) -> Celery:
    """A worker app for ``settings``, its tasks registered and its lifecycle wired.

    ``models``: models already loaded in this process, shared instead of loaded again (the unit
    tests load them once for several apps); a worker process loads its own at start.
    """
    schemas.set_strict(settings.env != "production")  # webhook payloads are built here
    app = make_celery(settings)
    attach(app, Runtime(settings, models))
    tasks.register(app)
    _Lifecycle(app).connect()
    return app


class _Lifecycle:
    """One worker app's process lifecycle, on Celery's signals.

    Celery's signals are process-wide, so each handler first checks that the event is its own
    app's: ``worker_init``, ``worker_ready`` and ``worker_shutdown`` carry the worker (or its
    consumer), which knows its app; ``worker_process_init`` carries only the node name, which
    ``worker_init`` recorded for this app. The handlers are connected weakly and the app holds
    this object, so an app that is dropped takes its handlers with it.
    """

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.runtime = runtime_of(app)
        self.hostnames: set[str] = set()
        self.queues: set[str] = set()  # what this worker consumes (``--queues``), known at worker_init
        self.heartbeat: Heartbeat | None = None
        self.stop = threading.Event()

    def connect(self) -> None:
        self.app.ser_lifecycle = self
        worker_init.connect(self.on_worker_init)
        worker_process_init.connect(self.on_process_init)
        worker_ready.connect(self.on_ready)
        worker_shutdown.connect(self.on_shutdown)

    def _mine(self, sender: Any) -> bool:
        return getattr(sender, "app", None) is self.app

    def on_worker_init(self, sender: Any = None, **_: Any) -> None:
        """Tune the process, name this node and write its first heartbeat, before the pool forks
        and any job is claimed: children inherit the tuning and the name, and no job is held by a
        node without a heartbeat row."""
        if not self._mine(sender):
            return
        self.hostnames.add(sender.hostname)
        self.queues = set(sender.app.amqp.queues.consume_from or ())
        settings = self.runtime.settings
        logs.configure(settings.log_level, settings.log_format)  # Celery's handlers, our format
        tune_process()
        self.heartbeat = Heartbeat(self.runtime.settings)
        self.heartbeat.beat_once()
        self.heartbeat.close_connections()
        log.info("worker node=%s", self.heartbeat.node)
        metrics.serve(settings)  # the server thread is the main process's: children only count

    def on_process_init(self, sender: Any = None, **_: Any) -> None:
        """In each pool child (or the solo pool's process): logging, own connections, the models."""
        if sender not in self.hostnames:
            return
        logs.configure(self.runtime.settings.log_level, self.runtime.settings.log_format)
        self.runtime.reset_after_fork()
        models = self.runtime.ensemble()
        if QUEUE_GPU in self.queues and not models.on_gpu():
            # It still serves the queue: refusing would strand every device=gpu job until a GPU
            # node comes back. The log says so, and bench.gpu reads the placement from it.
            log.warning("queue=%s consumed without a GPU: TensorFlow sees none usable, the models run on "
                        "the CPU (encoder_device=%s lstm_device=%s)", QUEUE_GPU,
                        models.placement.get("encoder"), models.placement.get("lstm"))

    def on_ready(self, sender: Any = None, **_: Any) -> None:
        """Start the heartbeat and the sweeper (main process only)."""
        if not self._mine(sender):
            return
        beat = self.heartbeat or Heartbeat(self.runtime.settings)
        self.heartbeat, self.stop = beat, threading.Event()
        beat.start()
        threading.Thread(target=self._sweep, args=(beat, self.stop), name="ser-sweeper", daemon=True).start()

    def _sweep(self, beat: Heartbeat, stop: threading.Event) -> None:
        """Periodically re-send what the broker never got or lost, and stuck jobs."""
        reconcile = Reconciler()
        settings = self.runtime.settings
        while not stop.is_set():
            try:
                factory = self.runtime.session_factory()
                reconcile(self.app, factory, settings,
                          judge_heartbeats=beat.steady_for() >= settings.worker_dead_after_s)
                # Webhook attempts whose broker message was lost (a Redis restart) are overdue.
                webhooks.send(self.app, delivery.due(factory))
                purge_expired_audio(factory, settings)
            except OperationalError as exc:
                # An outage is retried next sweep; a traceback every sweep would bury the log.
                log.warning("sweep skipped, database unavailable: %s", exc.orig)
            except Exception:
                log.exception("sweep failed")
            stop.wait(settings.sweep_interval_s)

    def on_shutdown(self, sender: Any = None, **_: Any) -> None:
        if not self._mine(sender):
            return
        self.stop.set()
        if self.heartbeat is not None:
            self.heartbeat.stop()


_entry: Celery | None = None
_entry_lock = threading.Lock()


def __getattr__(name: str) -> Any:
    """``app``: the environment's worker (``get_settings()``), built on first access.

    Only the entry point asks for it: ``celery -A worker.celery_app:app`` (``ser worker``,
    ``ser serve``, the compose file, the Dockerfile and the healthchecks). Code and tests build
    their own with ``create_worker``.
    """
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    global _entry
    with _entry_lock:
        if _entry is None:
            _entry = create_worker(get_settings())
        return _entry
