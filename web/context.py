"""The app's services and request-scoped access to them and to the database session.

``Services`` lives here, not in ``web/app.py``: every module that needs it would otherwise import
the app factory, which imports every blueprint, which import those modules again (an import cycle).
"""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery
from flask import current_app, g
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from ser_shared.settings import Settings


@dataclass
class Services:
    """What ``create_app`` builds once per app, kept in ``app.extensions["ser"]``."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    celery: Celery


def services() -> Services:
    return current_app.extensions["ser"]  # type: ignore[no-any-return]


def db() -> Session:
    """The request's session, opened on first use and closed on teardown."""
    if "db" not in g:
        g.db = services().sessions()
    return g.db  # type: ignore[no-any-return]


def snapshot() -> Session:
    """The request's session, reading one snapshot of the database from here on.

    For pages that show rows and counts from separate queries: a worker that finishes a job
    between the two would otherwise make the counts disagree with the rows (the history page's
    chart counting 11 where its table listed 10). Postgres: a REPEATABLE READ, READ ONLY
    transaction. SQLite: BEGIN, since pysqlite starts no transaction for a SELECT (each would
    read the latest commit). Only for requests that write nothing; the transaction ends with
    the session on teardown.
    """
    session = db()
    if session.in_transaction():  # an earlier read of this request took the default isolation
        session.rollback()
    if session.get_bind().dialect.name == "postgresql":
        session.connection(execution_options={"isolation_level": "REPEATABLE READ", "postgresql_readonly": True})
    else:
        session.connection().exec_driver_sql("BEGIN")
    return session
