"""Celery's soft time limit, raised mid-query by a real signal, is not taken for a database outage.

The limit arrives as an exception raised by a SIGUSR1 handler wherever the pool child is. When that
was inside a Postgres query, SQLAlchemy's rollback on the busy connection raised OperationalError
with the limit only as its context; the progress writer took it for an outage, the job ran on past
its deadline and succeeded (seen once in CI), and the connection stayed checked out in an open
transaction holding the job's row lock. Each test blocks a real query on a
row lock held by another connection, delivers the real signal while it waits, then lets the query
finish: psycopg runs Python signal handlers only once its wait returns, as it does in a worker.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from types import FrameType

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session, sessionmaker

from ser_shared.db import make_engine, make_session_factory
from ser_shared.models import Batch, Job
from ser_shared.settings import Settings
from tests.conftest import private_database
from worker.results import ProgressWriter
from worker.tasks import write_with_retry


@pytest.fixture(scope="module")
def factory(pg_settings: Settings) -> Iterator[sessionmaker[Session]]:
    with private_database(pg_settings) as settings:
        engine = make_engine(settings)
        with engine.connect() as conn:  # a mistake in these tests must fail them, not hang them
            conn.execute(text(f"ALTER DATABASE {engine.url.database} SET lock_timeout = '20s'"))
            conn.commit()
        yield make_session_factory(engine)
        engine.dispose()


@pytest.fixture
def soft_limit_signal() -> Iterator[None]:
    """SIGUSR1 raises SoftTimeLimitExceeded, as in a Celery pool child with a soft time limit."""
    def raise_limit(signum: int, frame: FrameType | None) -> None:
        raise SoftTimeLimitExceeded()

    previous = signal.signal(signal.SIGUSR1, raise_limit)
    try:
        yield
    finally:
        signal.signal(signal.SIGUSR1, previous)


def _processing_job(factory: sessionmaker[Session]) -> uuid.UUID:
    batch = Batch(id=uuid.uuid4(), file_count=1, options={})
    job = Job(id=uuid.uuid4(), batch_id=batch.id, filename="x.wav", status="processing", options={},
              size_bytes=1, attempts=1, storage_key="ab/cd/abcd", format="wav")
    with factory() as session:
        session.add_all([batch, job])
        session.commit()
    return job.id


class RowLock:
    """Holds ``FOR UPDATE`` on a job row from another connection until released."""

    def __init__(self, factory: sessionmaker[Session], job_id: uuid.UUID) -> None:
        self.session = factory()
        self.session.execute(select(Job.id).where(Job.id == job_id).with_for_update())

    def release(self) -> None:
        self.session.rollback()
        self.session.close()


class Interrupt:
    """SIGUSR1 to this process after 0.3 s, then the row lock released after 0.6 s."""

    def __init__(self, lock: RowLock) -> None:
        self.signal = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGUSR1))
        self.unlock = threading.Timer(0.6, lock.release)

    def __enter__(self) -> Interrupt:
        self.signal.start()
        self.unlock.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.signal.join()
        self.unlock.join()


def _progress(factory: sessionmaker[Session], job_id: uuid.UUID) -> float | None:
    with factory() as session:
        return session.scalar(select(Job.progress).where(Job.id == job_id))


@pytest.mark.usefixtures("soft_limit_signal")
def test_progress_write_lets_the_time_limit_through(factory: sessionmaker[Session]) -> None:
    job_id = _processing_job(factory)
    with Interrupt(RowLock(factory, job_id)), pytest.raises(SoftTimeLimitExceeded):
        ProgressWriter(factory)(job_id, 0.5)
    # The interrupted connection was thrown away: the next progress write works.
    ProgressWriter(factory)(job_id, 0.75)
    assert _progress(factory, job_id) == 0.75


@pytest.mark.usefixtures("soft_limit_signal")
def test_interrupted_session_leaves_no_transaction_open(factory: sessionmaker[Session]) -> None:
    """The interrupted connection is closed, so its transaction cannot keep the job row locked."""
    job_id = _processing_job(factory)
    with (Interrupt(RowLock(factory, job_id)), pytest.raises(SoftTimeLimitExceeded), factory() as session):
        session.execute(update(Job).where(Job.id == job_id).values(progress=0.1))
        session.commit()
    engine = factory.kw["bind"]
    assert engine.pool.checkedout() == 0
    with engine.connect() as conn:
        open_transactions = conn.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()")).scalar()
    assert open_transactions == 0
    assert _progress(factory, job_id) is None  # the interrupted update was rolled back


@pytest.mark.usefixtures("soft_limit_signal")
def test_result_write_hit_by_the_time_limit_is_finished_not_lost(factory: sessionmaker[Session]) -> None:
    """The analysis is done when the final write is interrupted: the write is redone at once."""
    job_id = _processing_job(factory)
    calls = 0

    def write() -> str:
        nonlocal calls
        calls += 1
        with factory() as session:
            session.execute(update(Job).where(Job.id == job_id).values(progress=1.0))
            session.commit()
        return "stored"

    started = time.monotonic()
    with Interrupt(RowLock(factory, job_id)):
        assert write_with_retry(write, delays=(30.0,)) == "stored"
    assert calls == 2
    assert time.monotonic() - started < 10  # redone at once, not after the outage back-off
    assert _progress(factory, job_id) == 1.0
