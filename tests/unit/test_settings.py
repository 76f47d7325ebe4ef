"""Settings from SER_* environment variables: embedded defaults, production requirements, validation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from ser_shared.settings import Settings

PRODUCTION = {
    "SER_ENV": "production",
    "SER_DATABASE_URL": "postgresql+psycopg://ser@db/ser",
    "SER_BROKER_URL": "redis://broker:6379/0",
    "SER_SECRET_KEY": "not-a-real-secret",
}


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """A clean SER_* environment (whatever the developer's shell or CI sets), data under tmp_path.

    chdir too, so the relative default data dir ("var") can never point into the repository.
    """
    for name in list(os.environ):
        if name.upper().startswith("SER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def production_env(env: pytest.MonkeyPatch, **overrides: str | None) -> None:
    """Set a complete production environment, then apply overrides (None removes a variable)."""
    for name, value in (PRODUCTION | overrides).items():
        if value is None:
            env.delenv(name, raising=False)
        else:
            env.setenv(name, value)


def error_text(exc: pytest.ExceptionInfo[ValidationError]) -> str:
    return str(exc.value)


def test_embedded_defaults_under_data_dir(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    data = tmp_path / "data"
    env.setenv("SER_DATA_DIR", str(data))
    s = Settings()
    assert s.env == "development"
    assert s.database_url is None and s.broker_url is None
    assert s.db_url == f"sqlite:///{data.resolve() / 'ser.sqlite3'}"
    assert s.queue_url == "filesystem://"
    assert s.is_embedded
    assert s.upload_dir == data.resolve() / "uploads"
    assert s.broker_folder == data.resolve() / "broker"


def test_relative_default_data_dir_resolves_against_cwd(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    s = Settings()
    assert s.db_url == f"sqlite:///{(tmp_path / 'var').resolve() / 'ser.sqlite3'}"


def test_explicit_urls_win(env: pytest.MonkeyPatch) -> None:
    env.setenv("SER_DATABASE_URL", PRODUCTION["SER_DATABASE_URL"])
    env.setenv("SER_BROKER_URL", PRODUCTION["SER_BROKER_URL"])
    s = Settings()
    assert s.db_url == PRODUCTION["SER_DATABASE_URL"]
    assert s.queue_url == PRODUCTION["SER_BROKER_URL"]
    assert not s.is_embedded


@pytest.mark.parametrize("name", ["SER_DATABASE_URL", "SER_BROKER_URL"])
def test_empty_url_counts_as_unset(name: str, env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # docker-compose's "${SER_DATABASE_URL:-}" passes an empty string, which must mean "unset".
    env.setenv("SER_DATA_DIR", str(tmp_path))
    env.setenv(name, "")
    s = Settings()
    assert s.database_url is None and s.broker_url is None
    assert s.db_url.startswith("sqlite:///") and s.queue_url == "filesystem://"


def test_production_complete_is_valid(env: pytest.MonkeyPatch) -> None:
    production_env(env)
    s = Settings()
    assert s.env == "production"
    assert s.db_url == PRODUCTION["SER_DATABASE_URL"]
    assert s.flask_secret == PRODUCTION["SER_SECRET_KEY"]


@pytest.mark.parametrize("missing", ["SER_SECRET_KEY", "SER_DATABASE_URL", "SER_BROKER_URL"])
def test_production_requires_each_setting(missing: str, env: pytest.MonkeyPatch) -> None:
    production_env(env, **{missing: None})
    with pytest.raises(ValidationError) as exc:
        Settings()
    assert missing in error_text(exc)
    # Only the missing one is named, so the operator knows exactly what to set.
    for other in {"SER_SECRET_KEY", "SER_DATABASE_URL", "SER_BROKER_URL"} - {missing}:
        assert other not in error_text(exc)


@pytest.mark.parametrize("blank", ["SER_SECRET_KEY", "SER_DATABASE_URL", "SER_BROKER_URL"])
def test_production_blank_counts_as_missing(blank: str, env: pytest.MonkeyPatch) -> None:
    production_env(env, **{blank: ""})
    with pytest.raises(ValidationError) as exc:
        Settings()
    assert blank in error_text(exc)


def test_production_names_all_missing_settings(env: pytest.MonkeyPatch) -> None:
    env.setenv("SER_ENV", "production")
    with pytest.raises(ValidationError) as exc:
        Settings()
    for name in ("SER_DATABASE_URL", "SER_BROKER_URL", "SER_SECRET_KEY"):
        assert name in error_text(exc)


@pytest.mark.parametrize("value", ["sixteen", "2.5", "", "0", "513"])
def test_invalid_chunk_size(value: str, env: pytest.MonkeyPatch) -> None:
    env.setenv("SER_CHUNK_SIZE", value)
    with pytest.raises(ValidationError) as exc:
        Settings()
    assert "chunk_size" in error_text(exc)


def test_valid_chunk_size_is_an_int(env: pytest.MonkeyPatch) -> None:
    env.setenv("SER_CHUNK_SIZE", "32")
    assert Settings().chunk_size == 32


def test_unknown_env_name_is_rejected(env: pytest.MonkeyPatch) -> None:
    env.setenv("SER_ENV", "staging")
    with pytest.raises(ValidationError):
        Settings()


@pytest.mark.parametrize(("soft", "hard"), [("300", "300"), ("300", "299"), ("600", "360")])
def test_hard_time_limit_must_exceed_soft(soft: str, hard: str, env: pytest.MonkeyPatch) -> None:
    env.setenv("SER_TASK_SOFT_TIME_LIMIT_S", soft)
    env.setenv("SER_TASK_TIME_LIMIT_S", hard)
    with pytest.raises(ValidationError) as exc:
        Settings()
    assert "SER_TASK_TIME_LIMIT_S" in error_text(exc)


def test_hard_time_limit_above_soft_is_valid(env: pytest.MonkeyPatch) -> None:
    env.setenv("SER_TASK_SOFT_TIME_LIMIT_S", "300")
    env.setenv("SER_TASK_TIME_LIMIT_S", "301")
    s = Settings()
    assert (s.task_soft_time_limit_s, s.task_time_limit_s) == (300, 301)


def test_default_time_limits_are_consistent(env: pytest.MonkeyPatch) -> None:
    s = Settings()
    assert s.task_time_limit_s > s.task_soft_time_limit_s
