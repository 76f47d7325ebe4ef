"""One settings object, read from ``SER_*`` environment variables and validated at start.

Unset database and broker URLs fall back to an embedded default under ``SER_DATA_DIR``: a SQLite
file for the database and kombu's filesystem transport for the queue. Both are real cross-process
stores, so the web and worker processes still talk through them exactly as they would through
Postgres and Redis.
"""

from __future__ import annotations

import os
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
# The data folder's own secret key, when SER_SECRET_KEY is unset (see ``stored_secret``).
SECRET_FILE = "secret_key"


class Settings(BaseSettings):
    """Service configuration; every field maps to ``SER_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="SER_", extra="ignore")

    env: Literal["development", "production", "test"] = "development"
    data_dir: Path = Path("var")
    database_url: str | None = None
    broker_url: str | None = None
    storage_dir: Path | None = None
    # Where uploads are stored: unset, the folder storage_dir (default <data_dir>/uploads), which web
    # and workers must then share; "s3://bucket/prefix", an S3-compatible store (credentials from
    # boto3's standard chain: AWS_* variables, shared files, instance roles).
    storage_url: str | None = None
    s3_endpoint_url: str | None = None  # MinIO or another S3-compatible store; unset: AWS
    # Stored files and objects with no job row (an upload killed mid-request) are removed by the
    # worker's sweep once this old: longer than the slowest upload request ever takes.
    orphan_grace_s: float = Field(default=6 * 3600.0, gt=0)
    models_dir: Path = REPO_ROOT / "models"
    secret_key: str | None = None
    log_level: str = "INFO"
    # "json": one JSON object per log line (request, job, batch ids and tenant as fields).
    log_format: Literal["text", "json"] = "text"
    # gunicorn's access log: every request, only those answered with an error (>= 400; a page
    # polling for progress would otherwise write a line a second), or none.
    access_log: Literal["all", "errors", "off"] = "errors"
    # Prometheus: a bearer token /metrics requires when set (None: open, like /healthz); the port
    # each worker node's main process serves its metrics on (None: no metrics server).
    metrics_token: str | None = None
    worker_metrics_port: int | None = Field(default=None, ge=1, le=65535)

    # Upload limits. The request limit is enforced by werkzeug before the body is parsed.
    max_request_mb: float = Field(default=2048, gt=0)
    max_file_mb: float = Field(default=100, gt=0)
    max_files_per_request: int = Field(default=5000, ge=1)
    # Recordings over a minute are decoded as a stream (bounded memory), so an hour is affordable.
    max_duration_s: float = Field(default=3600, gt=0)
    min_duration_s: float = Field(default=0.1, ge=0)

    # Worker behaviour.
    worker_concurrency: int = Field(default=2, ge=1)
    # A RandomForest call has a fixed cost (every tree is walked once per call), so recordings are
    # analysed in chunks; 32 amortises it to under 1 ms a recording without long task times.
    chunk_size: int = Field(default=32, ge=1, le=512)
    task_soft_time_limit_s: int = Field(default=300, ge=1)
    task_time_limit_s: int = Field(default=360, ge=1)
    max_attempts: int = Field(default=3, ge=1)
    default_queue: str = "cpu"
    # The worker's reconciler runs every sweep_interval_s. It re-sends queued jobs that are in
    # neither the broker's queue nor its unacknowledged set requeue_after_s after they were sent
    # (a broker restart lost them), and requeues jobs still processing stuck_margin_s past the hard
    # time limit (their worker was killed outright), which counts as an attempt.
    sweep_interval_s: float = Field(default=30.0, gt=0)
    requeue_after_s: float = Field(default=60.0, gt=0)
    # Jobs committed while the broker was unreachable (never sent) are sent by the reconciler once
    # they are unqueued_grace_s old: a younger one's upload request may still be sending it.
    unqueued_grace_s: float = Field(default=30.0, ge=0)
    stuck_margin_s: float = Field(default=60.0, ge=0)
    # Each worker node's main process writes a heartbeat every worker_heartbeat_s; a node silent
    # for worker_dead_after_s is dead, and the reconciler takes back what it held (jobs it was
    # analysing are requeued, transcripts it was making are re-sent): within about a minute of a
    # kill -9 of a whole worker, not the hard time limit plus stuck_margin_s (the backstop).
    worker_heartbeat_s: float = Field(default=10.0, gt=0)
    worker_dead_after_s: float = Field(default=30.0, gt=0)
    uncertain_threshold: float | None = Field(default=None, ge=0, le=1)

    # Transcripts (SpeechRecognition): a per-recording budget, after which the transcript is
    # "unavailable" and the emotion result stands; the Google Web Speech key (None: its demo key).
    transcribe_timeout_s: float = Field(default=20.0, gt=0)
    # ... which grows with the speech to transcribe: a recording gets the larger of the two. Whisper
    # tiny.en runs at 0.035 s per speech second on 2 idle cores, about 0.08 loaded (bench/RESULTS.md), so 0.5 leaves a
    # loaded worker room; a 10-minute call is not cut at its first 4 minutes by the 20 s floor.
    transcribe_s_per_speech_s: float = Field(default=0.5, ge=0)
    google_speech_key: str | None = None

    # Webhooks (Standard Webhooks signing). The secret is "whsec_" + base64; without one it is
    # derived from the secret key, so every process of a deployment signs alike.
    webhook_secret: str | None = None
    # Hosts or networks (comma-separated: "127.0.0.1,10.0.0.0/8,hooks.internal") that webhook
    # URLs may resolve to despite the SSRF guard, which otherwise refuses every address that is not
    # globally routable (ser_shared.addresses).
    webhook_allow: str = ""
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    # How long an upload (and a delivery attempt) waits for the webhook host's DNS answer.
    webhook_dns_timeout_s: float = Field(default=3.0, gt=0)
    webhook_retry_base_s: float = Field(default=30.0, gt=0)
    webhook_retry_max_s: float = Field(default=1800.0, gt=0)  # below the broker visibility timeout
    webhook_max_age_s: float = Field(default=86400.0, gt=0)

    # Access. Authentication is on in production and off by default elsewhere: the embedded
    # single-user service then binds to 127.0.0.1 only (see ``ser serve``).
    auth: bool | None = None
    # Secure session cookies (HTTPS only; browsers also accept them on http://localhost).
    cookie_secure: bool | None = None
    session_hours: float = Field(default=12.0, gt=0)
    # Per API key (per tenant when auth is off), over a sliding minute: upload requests, and files
    # in them; and a cap on jobs waiting or running. Over a limit the upload gets 429 with Retry-After.
    rate_limit_uploads_per_minute: int = Field(default=120, ge=1)
    rate_limit_files_per_minute: int = Field(default=20000, ge=1)
    max_queued_jobs: int = Field(default=20000, ge=1)
    # An Idempotency-Key claim is a lease of this many seconds, extended while its request is
    # alive: a request killed outright (kill -9 of gunicorn) frees its key within the lease, and
    # the 409 idempotency_key_in_progress says, in Retry-After, when.
    idempotency_lease_s: float = Field(default=30.0, gt=0)
    # Audio is deleted this many days after its job finished (results stay); 0 keeps it forever.
    audio_retention_days: float = Field(default=30.0, ge=0)

    # Forwarded headers (X-Forwarded-For/-Proto/-Host) are honoured only from this many proxy hops
    # in front of gunicorn, counted from the right (1 behind the shipped nginx); 0 trusts none, so a
    # client cannot pick the scheme or host the service writes into its absolute URLs.
    trusted_proxies: int = Field(default=0, ge=0, le=10)
    # The service's public address ("https://ser.example.com"). When set, absolute URLs (batch_url,
    # job and audio URLs, the API page's examples) are built from it, never from the request's Host.
    public_url: str | None = None

    @field_validator("storage_url")
    @classmethod
    def _s3_url(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme != "s3" or not parts.netloc:
                raise ValueError("SER_STORAGE_URL must be s3://bucket/prefix (unset: the local folder)")
        return value

    @field_validator("database_url", "broker_url", "public_url", "storage_url", "s3_endpoint_url", "metrics_token",
                     mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("public_url")
    @classmethod
    def _origin_only(cls, value: str | None) -> str | None:
        # Scheme and host (and port) only: a path prefix would need the proxy to strip it as well.
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc or "@" in parts.netloc \
                or parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("SER_PUBLIC_URL must be http(s)://host[:port], without a path")
        return f"{parts.scheme}://{parts.netloc}"

    @model_validator(mode="after")
    def _fill_defaults(self) -> Settings:
        if self.env == "production":
            missing = [
                name
                for name, value in (
                    ("SER_DATABASE_URL", self.database_url),
                    ("SER_BROKER_URL", self.broker_url),
                    ("SER_SECRET_KEY", self.secret_key),
                )
                if not value
            ]
            if missing:
                raise ValueError(f"production requires {', '.join(missing)}")
        if self.task_time_limit_s <= self.task_soft_time_limit_s:
            raise ValueError("SER_TASK_TIME_LIMIT_S must exceed SER_TASK_SOFT_TIME_LIMIT_S")
        if self.worker_dead_after_s < 2 * self.worker_heartbeat_s:
            # One late heartbeat (a busy machine, a slow commit) must not declare a node dead.
            raise ValueError("SER_WORKER_DEAD_AFTER_S must be at least twice SER_WORKER_HEARTBEAT_S")
        return self

    @property
    def auth_enabled(self) -> bool:
        return self.auth if self.auth is not None else self.env == "production"

    @property
    def secure_cookies(self) -> bool:
        return self.cookie_secure if self.cookie_secure is not None else self.env == "production"

    @property
    def resolved_data_dir(self) -> Path:
        return self.data_dir.resolve()

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.resolved_data_dir / 'ser.sqlite3'}"

    @property
    def queue_url(self) -> str:
        # kombu's filesystem transport ignores the host, but warns on every connection without one.
        return self.broker_url or "filesystem://localhost/"

    @property
    def upload_dir(self) -> Path:
        return (self.storage_dir or self.resolved_data_dir / "uploads").resolve()

    @property
    def broker_folder(self) -> Path:
        """Folder of the embedded filesystem broker (used only when no broker URL is set)."""
        return self.resolved_data_dir / "broker"

    @property
    def is_embedded(self) -> bool:
        return self.database_url is None or self.broker_url is None

    @property
    def flask_secret(self) -> str:
        """SER_SECRET_KEY, or the data folder's own key (created on first use): every process that
        shares the folder (web, worker, ``ser webhook-secret``) agrees, wherever it was started from."""
        return self.secret_key or stored_secret(self.resolved_data_dir)


class NoStoredSecret(RuntimeError):
    """The data folder holds no secret key (``stored_secret(..., create=False)``)."""


@lru_cache(maxsize=8)
def stored_secret(folder: Path, create: bool = True) -> str:
    """The secret key kept in ``folder/secret_key`` (mode 0600), generated there the first time.

    It belongs to the data folder, not to the path it is reached by: moved, renamed or mounted
    elsewhere, the folder keeps its key. Processes starting together agree: each writes a candidate
    and hard-links it into place, which never replaces a file, so the first link wins. Raises
    NoStoredSecret when ``create`` is False and there is none, OSError when the folder is not writable.
    """
    path = folder / SECRET_FILE
    if path.exists() or not create:
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            raise NoStoredSecret(f"no secret key in {folder} (the service writes {SECRET_FILE} there on first "
                                 "start): is SER_DATA_DIR the service's data folder?") from None
    folder.mkdir(parents=True, exist_ok=True)
    candidate = folder / f".{SECRET_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
    with os.fdopen(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
        handle.write(secrets.token_hex(32) + "\n")
    try:
        os.link(candidate, path)
    except FileExistsError:
        pass  # another process got there first: its key is the folder's
    finally:
        candidate.unlink()
    return path.read_text().strip()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, built on first use (never at import time)."""
    return Settings()
