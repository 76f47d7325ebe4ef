"""Per-process singletons of a worker: the database session factory and the loaded models."""

from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker

from ser_ml.inference import Ensemble
from ser_shared.db import make_engine, make_session_factory
from ser_shared.settings import get_settings

_factory: sessionmaker[Session] | None = None
_ensemble: Ensemble | None = None


def session_factory() -> sessionmaker[Session]:
    global _factory
    if _factory is None:
        _factory = make_session_factory(make_engine(get_settings()))
    return _factory


def ensemble() -> Ensemble:
    """The models, loaded on first use in this process (at process start in a prefork pool)."""
    global _ensemble
    if _ensemble is None:
        _ensemble = Ensemble.load(get_settings().models_dir)
    return _ensemble


def reset_after_fork() -> None:
    """Drop connections inherited from the parent; each child opens its own."""
    global _factory
    if _factory is not None:
        _factory.kw["bind"].dispose(close=False)
    _factory = None
