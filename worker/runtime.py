"""What a worker app's tasks share, and the process tuning a worker process applies.

A ``Runtime`` belongs to one worker app (``create_worker`` attaches it): the settings the app was
built with, and what is built from them on first use in each process — the database session
factory and the loaded models. Nothing here reads the environment, so two worker apps with
different settings can live in one process (the unit tests run them side by side).
"""

from __future__ import annotations

import os
import threading
from typing import Any

from sqlalchemy.orm import Session, sessionmaker
from threadpoolctl import threadpool_limits

from ser_ml.allocator import tune_malloc
from ser_ml.inference import Ensemble
from ser_shared.db import make_engine, make_session_factory
from ser_shared.settings import Settings

BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
_ATTRIBUTE = "ser_runtime"


class Runtime:
    """A worker app's settings, and its session factory and models, each built once per process."""

    def __init__(self, settings: Settings, models: Ensemble | None = None) -> None:
        self.settings = settings
        self._factory: sessionmaker[Session] | None = None
        self._ensemble = models
        # A threads pool runs tasks side by side: two first uses must not load the models twice.
        self._lock = threading.Lock()

    def session_factory(self) -> sessionmaker[Session]:
        with self._lock:
            if self._factory is None:
                self._factory = make_session_factory(make_engine(self.settings))
            return self._factory

    def ensemble(self) -> Ensemble:
        """The models, loaded on first use in this process (at process start in a prefork pool)."""
        with self._lock:
            if self._ensemble is None:
                self._ensemble = Ensemble.load(self.settings.models_dir)
            return self._ensemble

    def reset_after_fork(self) -> None:
        """Drop database connections inherited from the parent; each child opens its own.

        The lock is made anew too: a fork copies it in whatever state another thread held it.
        """
        self._lock = threading.Lock()
        if self._factory is not None:
            self._factory.kw["bind"].dispose(close=False)
        self._factory = None


def attach(app: Any, runtime: Runtime) -> None:
    """Give ``app`` (a Celery app) its runtime; its tasks and signal handlers find it there."""
    setattr(app, _ATTRIBUTE, runtime)


def runtime_of(app: Any) -> Runtime:
    """The runtime of a worker app built by ``worker.celery_app.create_worker``.

    Raises LookupError for any other Celery app (the web tier's sending-only app has none).
    """
    runtime = getattr(app, _ATTRIBUTE, None)
    if not isinstance(runtime, Runtime):
        raise LookupError(f"{app!r} is not a worker app: build it with worker.celery_app.create_worker")
    return runtime


def limit_blas_threads() -> None:
    """One BLAS thread per worker process, unless the operator set a thread count explicitly.

    The pool already runs one process per core. With OpenBLAS's default of one thread per core on
    top, busy worker processes fight over the cores: feature extraction (small numpy matrix
    products) took about twice the CPU time per recording.
    """
    if not any(name in os.environ for name in BLAS_THREAD_VARIABLES):
        threadpool_limits(1, user_api="blas")


def tune_process() -> None:
    """The process-wide settings of a worker: BLAS threads and the allocator (ser_ml.allocator).

    Called when a process becomes a worker (Celery's ``worker_init``, in the pool's parent before
    it forks), so every child inherits them and a solo pool has them too; never at import, so a
    test or a tool that imports the worker's modules keeps its own process settings.
    """
    limit_blas_threads()
    tune_malloc()
