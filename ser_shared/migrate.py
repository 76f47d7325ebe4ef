"""Run Alembic migrations programmatically with the service settings."""

from __future__ import annotations

from alembic import command
from alembic.config import Config

from ser_shared.settings import REPO_ROOT, Settings


def alembic_config(settings: Settings) -> Config:
    """An Alembic config whose env.py will use ``settings`` for the database URL."""
    cfg = Config(str(REPO_ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(REPO_ROOT / "migrations"))
    cfg.attributes["settings"] = settings
    return cfg


def upgrade(settings: Settings, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` (idempotent: a migrated database is left as is)."""
    if settings.db_url.startswith("sqlite"):
        settings.resolved_data_dir.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(settings), revision)
