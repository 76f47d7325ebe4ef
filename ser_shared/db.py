"""Engine and session factories. Nothing is connected at import time."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.orm import Session, sessionmaker

from ser_shared.settings import Settings


def make_engine(settings: Settings) -> Engine:
    """Build the engine for the configured database; SQLite gets WAL and a busy timeout."""
    url = settings.db_url
    if url.startswith("sqlite"):
        settings.resolved_data_dir.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)
    event.listen(engine, "handle_error", _drop_interrupted_connection)
    return engine


def _drop_interrupted_connection(context: ExceptionContext) -> None:
    """Close a connection whose call was interrupted by Celery's soft time limit.

    The limit is raised by a signal handler wherever the worker's child happens to be. Inside a
    database call it leaves the driver mid-command: SQLAlchemy's rollback then failed with
    "another command is already in progress", that OperationalError replaced the time limit (so
    handlers of database errors swallowed it and the job ran past its deadline), and the
    connection stayed checked out, idle in a transaction that held the job's row lock. Treated as
    a disconnect, the connection is closed (the server rolls back) and the time limit itself
    propagates. SQLAlchemy already does this for KeyboardInterrupt.
    """
    if isinstance(context.original_exception, SoftTimeLimitExceeded):
        context.is_disconnect = True


def _sqlite_pragmas(dbapi_conn: object, _record: object) -> None:
    # WAL lets the web process read while a worker writes; foreign keys are off by default in SQLite.
    cursor = dbapi_conn.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def upsert_insert(session: Session, table: Any) -> Any:
    """``INSERT`` with ``ON CONFLICT`` support for the session's dialect (Postgres or SQLite)."""
    from sqlalchemy.dialects import postgresql, sqlite

    return (postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert)(table)
