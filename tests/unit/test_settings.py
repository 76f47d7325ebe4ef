"""Settings from SER_* environment variables: embedded defaults, production requirements, validation."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from ser_shared.settings import REPO_ROOT, SECRET_FILE, Settings
from ser_shared.webhooks import public_secret

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
    assert s.queue_url == "filesystem://localhost/"
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
    assert s.db_url.startswith("sqlite:///") and s.queue_url == "filesystem://localhost/"


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


# --- the data folder's own secret key ---------------------------------------------------------

# The key web (sessions) and workers (webhooks, via ser_shared.webhooks.secret_bytes) derive theirs from.
PRINT_SECRET = "from ser_shared.settings import get_settings; print(get_settings().flask_secret)"


def _python(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """A fresh interpreter on this checkout, in ``cwd``, with no SER_* setting but ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("SER_")}
    clean["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "client")])
    return subprocess.run([sys.executable, *args], cwd=cwd, env=clean | env, capture_output=True, text=True,
                          timeout=120)


def test_one_secret_per_data_folder_from_any_folder_and_path(tmp_path: Path) -> None:
    """Without SER_SECRET_KEY the key is the data folder's: generated once (0600), then the same for
    every process that uses the folder, started from any folder, by any path to it, even after a move."""
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    service = _python(["-c", PRINT_SECRET], cwd=project)  # as ./scripts/serve runs: ./var
    assert service.returncode == 0, service.stderr
    assert (project / "var" / SECRET_FILE).stat().st_mode & 0o777 == 0o600
    signing = public_secret(Settings(env="test", secret_key=service.stdout.strip())) + "\n"
    printed = _python(["-m", "ser_cli", "webhook-secret"], cwd=elsewhere, SER_DATA_DIR="../project/var")
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == signing
    # From another folder without SER_DATA_DIR: no key made up (and no ./var left behind), a pointer instead.
    lost = _python(["-m", "ser_cli", "webhook-secret"], cwd=elsewhere)
    assert lost.returncode == 1 and "SER_DATA_DIR" in lost.stderr and not lost.stdout
    assert not (elsewhere / "var").exists()
    (project / "var").rename(tmp_path / "volume")  # the same folder, mounted or moved elsewhere
    moved = _python(["-m", "ser_cli", "webhook-secret"], cwd=elsewhere, SER_DATA_DIR=str(tmp_path / "volume"))
    assert moved.stdout == signing


def test_processes_starting_together_agree_on_the_new_key(tmp_path: Path) -> None:
    """Web and worker start at once on a fresh folder: one key is kept, and both use it."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("SER_")}
    env |= {"SER_DATA_DIR": str(tmp_path / "var"), "PYTHONPATH": str(REPO_ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", PRINT_SECRET], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    printed = {p.communicate(timeout=120)[0] for p in procs}
    assert len(printed) == 1 and all(p.returncode == 0 for p in procs)
    assert [p.name for p in (tmp_path / "var").iterdir()] == [SECRET_FILE]  # no candidate left behind
    key = (tmp_path / "var" / SECRET_FILE).read_text().strip()
    assert Settings(env="test", data_dir=tmp_path / "var").flask_secret == key  # the web tier's session key
