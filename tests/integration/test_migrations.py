"""Alembic: one head, upgrade from empty Postgres and SQLite, and models == migrations."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from ser_shared.db import make_engine
from ser_shared.migrate import alembic_config, upgrade
from ser_shared.models import Base
from ser_shared.settings import Settings


def _diff(settings: Settings) -> list[object]:
    engine = make_engine(settings)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(ctx, Base.metadata))
    finally:
        engine.dispose()


def test_single_head(tmp_path: Path) -> None:
    script = ScriptDirectory.from_config(alembic_config(Settings(data_dir=tmp_path)))
    assert len(script.get_heads()) == 1


def test_postgres_upgrade_matches_models(pg_settings: Settings) -> None:
    # pg_settings was migrated from an empty database by the fixture.
    assert _diff(pg_settings) == []
    engine = make_engine(pg_settings)
    with engine.connect() as conn:
        tables = set(sa.inspect(conn).get_table_names())
    engine.dispose()
    assert {"batches", "jobs", "results", "alembic_version"} <= tables


def test_sqlite_upgrade_from_empty_matches_models(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    upgrade(settings)
    assert _diff(settings) == []
    upgrade(settings)  # idempotent


def test_downgrade_to_base_and_back(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    upgrade(settings)
    command.downgrade(alembic_config(settings), "base")
    engine = make_engine(settings)
    with engine.connect() as conn:
        assert "jobs" not in sa.inspect(conn).get_table_names()
    engine.dispose()
    upgrade(settings)
    assert _diff(settings) == []


@pytest.mark.parametrize("index", ["ix_jobs_tenant_created_at_id", "ix_jobs_tenant_status_created_at",
                                   "ix_jobs_tenant_emotion_created_at", "ix_jobs_batch_id_position",
                                   "ix_jobs_status_created_at", "ix_jobs_finished_at"])
def test_history_indexes_exist(pg_settings: Settings, index: str) -> None:
    engine = make_engine(pg_settings)
    with engine.connect() as conn:
        names = {ix["name"] for ix in sa.inspect(conn).get_indexes("jobs")}
    engine.dispose()
    assert index in names
