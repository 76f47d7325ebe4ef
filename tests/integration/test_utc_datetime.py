"""One time convention: ``ser_shared.clock`` and the ``UTCDateTime`` column type, on SQLite and Postgres.

The column type is what lets the rest of the code stop converting: values come back aware UTC on
both backends (SQLite hands back naive values, Postgres aware ones in the *session's* time zone,
here set to +05:30 so that a missing conversion shows), naive values are refused on the way in, and
comparisons bind correctly whatever offset the compared value carries.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import StatementError

from ser_shared import clock
from ser_shared.models import Base, Batch, Job, UTCDateTime
from ser_shared.settings import Settings

IST = timezone(timedelta(hours=5, minutes=30))
T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)

meta = sa.MetaData()
stamps = sa.Table("utc_type_probe", meta, sa.Column("id", sa.Integer, primary_key=True),
                  sa.Column("at", UTCDateTime, nullable=True))


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    if request.param == "sqlite":
        eng = sa.create_engine(f"sqlite:///{tmp_path / 'probe.db'}")
    else:
        # Not UTC on purpose: psycopg returns timestamptz in the session's zone.
        eng = sa.create_engine(request.getfixturevalue("pg_url"), connect_args={"options": "-c timezone=Asia/Kolkata"})
    meta.create_all(eng)
    try:
        yield eng
    finally:
        meta.drop_all(eng)
        eng.dispose()


def _insert(engine: sa.Engine, *values: datetime | None) -> None:
    with engine.begin() as conn:
        conn.execute(stamps.insert(), [{"id": i, "at": v} for i, v in enumerate(values)])


def test_values_come_back_aware_utc(engine: sa.Engine) -> None:
    _insert(engine, T0, T0.astimezone(IST), None)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(stamps.c.at).order_by(stamps.c.id)).scalars().all()
    assert rows[:2] == [T0, T0]  # the +05:30 value is the same instant, stored as such
    assert all(r is not None and r.tzinfo is UTC for r in rows[:2])
    assert rows[2] is None
    if engine.dialect.name == "sqlite":  # what is stored is naive UTC text, the shape the migrations made
        with engine.connect() as conn:
            stored = conn.execute(sa.text("SELECT at FROM utc_type_probe WHERE id = 1")).scalar()
        assert stored == "2024-03-01 12:00:00.000000"


def test_naive_values_are_refused(engine: sa.Engine) -> None:
    with pytest.raises(StatementError) as caught:
        _insert(engine, datetime(2024, 3, 1, 12, 0))
    assert isinstance(caught.value.orig, ValueError)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(stamps)).scalar() == 0
        # In a comparison too: a naive bound would mean local time on Postgres.
        with pytest.raises(StatementError):
            conn.execute(sa.select(stamps.c.id).where(stamps.c.at < datetime(2024, 3, 1)))


def test_comparisons_and_aggregates_work_in_any_offset(engine: sa.Engine) -> None:
    _insert(engine, T0, T0 + timedelta(hours=1), T0 + timedelta(hours=2))
    since = T0 + timedelta(minutes=30)
    with engine.connect() as conn:
        def after(bound: datetime) -> list[int]:
            query = sa.select(stamps.c.id).where(stamps.c.at >= bound).order_by(stamps.c.id)
            return list(conn.execute(query).scalars())
        assert after(since) == [1, 2]
        # 18:00+05:30 is 12:30Z: SQLite's driver alone would compare the wall-clock text 18:00.
        assert after(since.astimezone(IST)) == [1, 2]
        oldest, newest = conn.execute(sa.select(sa.func.min(stamps.c.at), sa.func.max(stamps.c.at))).one()
    assert (oldest, newest) == (T0, T0 + timedelta(hours=2))
    assert oldest.tzinfo is UTC and newest.tzinfo is UTC  # min()/max() keep the column's type
    assert newest - oldest == timedelta(hours=2)  # arithmetic with aware values needs no conversion


def test_every_model_timestamp_uses_the_utc_type() -> None:
    """A new column written as plain ``DateTime`` would bring naive values back on SQLite."""
    columns = [c for t in Base.metadata.tables.values() for c in t.columns]
    plain = [f"{c.table.name}.{c.name}" for c in columns if isinstance(c.type, sa.DateTime)]
    assert plain == []
    utc = [c for c in columns if isinstance(c.type, UTCDateTime)]
    assert len(utc) >= 15
    # Same DDL as before the type existed (the migrations did not change).
    ddl = str(sa.schema.CreateTable(stamps).compile(dialect=sa.dialects.postgresql.dialect()))
    assert "at TIMESTAMP WITH TIME ZONE" in ddl


def test_clock_helpers() -> None:
    assert clock.utcnow().tzinfo is UTC
    assert clock.as_utc(datetime(2024, 3, 1, 12)) == T0  # naive means UTC
    assert clock.as_utc(T0.astimezone(IST)).tzinfo is UTC
    assert clock.as_utc(T0.astimezone(IST)) == T0
    assert clock.iso(T0.astimezone(IST)) == "2024-03-01T12:00:00Z"
    assert clock.iso(T0 + timedelta(microseconds=5)) == "2024-03-01T12:00:00.000005Z"
    assert clock.iso(T0, "seconds") == "2024-03-01T12:00:00Z"
    assert clock.iso(None) is None


def test_history_filters_and_cursors_on_sqlite(tmp_path: Path) -> None:
    """The embedded mode's history, which once stripped offsets by hand before each comparison:
    ``since`` in any offset, keyset cursors both ways, and a cursor written with a naive time."""
    import base64
    import json
    import uuid

    from ser_shared.db import make_engine, make_session_factory
    from ser_shared.migrate import upgrade
    from web import queries

    settings = Settings(data_dir=tmp_path)
    upgrade(settings)
    engine = make_engine(settings)
    factory = make_session_factory(engine)
    with factory() as session:
        batch = Batch(id=uuid.uuid4(), file_count=5, options={})
        session.add(batch)
        session.add_all([Job(id=uuid.uuid4(), batch_id=batch.id, position=i, filename=f"{i}.wav", status="queued",
                             options={}, size_bytes=1, attempts=0, created_at=T0 - timedelta(minutes=i))
                         for i in range(5)])
        session.commit()

    def page_through(args: dict[str, str]) -> list[str]:
        seen: list[str] = []
        cursor = None
        with factory() as session:
            while True:
                rows, cursor = queries.list_jobs(session, queries.parse_filter(args, "local"), 2, cursor)
                assert all(r.created_at.tzinfo is UTC for r in rows)
                seen += [r.filename for r in rows]
                if cursor is None:
                    return seen

    since = (T0 - timedelta(minutes=3, seconds=30)).astimezone(IST).isoformat()  # 08:26:30Z, said in +05:30
    assert page_through({"since": since}) == ["0.wav", "1.wav", "2.wav", "3.wav"]
    assert page_through({"since": since, "sort": "created_at"}) == ["3.wav", "2.wav", "1.wav", "0.wav"]
    assert page_through({"until": (T0 - timedelta(minutes=2)).isoformat()}) == ["3.wav", "4.wav"]
    with factory() as session:
        one = session.scalars(sa.select(Job).where(Job.filename == "1.wav")).one()
        naive = json.dumps(["-created_at", one.created_at.replace(tzinfo=None).isoformat(), str(one.id)])
        cursor = base64.urlsafe_b64encode(naive.encode()).decode().rstrip("=")
        rows, _ = queries.list_jobs(session, queries.parse_filter({}, "local"), 10, cursor)
    assert [r.filename for r in rows] == ["2.wav", "3.wav", "4.wav"]
    engine.dispose()
