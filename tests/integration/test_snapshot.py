"""web.context.snapshot: a page's queries read one state of the database while workers commit.

The history and batch pages list jobs and count them in separate queries; a job that finished
between the two made the chart count one more than the table (a browser test caught it). On
Postgres and on SQLite, a job committed by another connection between two reads of a snapshot
session is not seen by the second read, and is seen by a plain session (so the test can fail).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask import Flask

from ser_shared.db import make_engine, make_session_factory
from ser_shared.migrate import upgrade
from ser_shared.models import Batch, Job
from ser_shared.settings import Settings
from tests.conftest import private_database
from web import create_app
from web.context import db, snapshot


@pytest.fixture(params=["postgresql", "sqlite"])
def app(request: pytest.FixtureRequest, pg_settings: Settings, tmp_path: Path) -> Iterator[Flask]:
    if request.param == "postgresql":
        with private_database(pg_settings) as settings:
            yield create_app(settings)
    else:
        settings = pg_settings.model_copy(update={"database_url": None, "data_dir": tmp_path,
                                                  "storage_dir": tmp_path / "uploads"})
        upgrade(settings)
        yield create_app(settings)


def _finish_a_job(app: Flask) -> None:
    """What a worker does meanwhile: commits a finished job, on a connection of its own."""
    engine = make_engine(app.extensions["ser"].settings)
    try:
        with make_session_factory(engine)() as session:
            batch = Batch(id=uuid.uuid4(), options={}, file_count=1)
            session.add(batch)
            session.add(Job(id=uuid.uuid4(), batch_id=batch.id, position=0, filename="done.wav", status="succeeded",
                            emotion="happy", confidence=0.9, options={}, size_bytes=1, attempts=1))
            session.commit()
    finally:
        engine.dispose()


def _succeeded(session: sa.orm.Session) -> int:
    return int(session.scalar(sa.select(sa.func.count()).select_from(Job).where(Job.status == "succeeded")) or 0)


def test_a_snapshot_does_not_see_a_job_finished_between_its_reads(app: Flask) -> None:
    with app.test_request_context("/history"):
        session = snapshot()
        before = _succeeded(session)
        _finish_a_job(app)
        assert _succeeded(session) == before


def test_a_plain_session_does_see_it(app: Flask) -> None:
    with app.test_request_context("/history"):
        session = db()
        before = _succeeded(session)
        _finish_a_job(app)
        assert _succeeded(session) == before + 1


def test_a_snapshot_taken_after_earlier_reads_still_holds(app: Flask) -> None:
    # A read of the same request under the default isolation (a key lookup, say) comes first.
    with app.test_request_context("/history"):
        _succeeded(db())
        session = snapshot()
        before = _succeeded(session)
        _finish_a_job(app)
        assert _succeeded(session) == before
    with app.test_request_context("/history"):  # the next request sees the job
        assert _succeeded(snapshot()) == before + 1
