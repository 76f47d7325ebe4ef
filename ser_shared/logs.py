"""Logging set-up, called once per entry point, and the context every log line carries.

``SER_LOG_FORMAT=json`` writes one JSON object per line (python-json-logger), for log collectors
that index fields; ``text`` (the default) stays readable in a terminal. Either way the records
carry the context of what is being done: the web tier binds ``request_id`` and ``tenant`` per
request, the worker ``job_id``, ``batch_id`` and ``tenant`` per job (``bind``). A filter on the
root handlers copies the bound fields onto each record, so every logger, ours or a library's,
gets them without passing them by hand.
"""

from __future__ import annotations

import contextvars
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from pythonjsonlogger.json import JsonFormatter

CONTEXT_FIELDS = ("request_id", "job_id", "batch_id", "tenant")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

_context: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("ser_log_context", default=None)


def configure(level: str = "INFO", fmt: Literal["text", "json"] = "text") -> None:
    """Configure the root logger: level, format, and the context filter on its handlers.

    Handlers someone else put on the root logger first (Celery's) are reformatted, not replaced.
    """
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format=TEXT_FORMAT)
    root.setLevel(level.upper())
    formatter: logging.Formatter = (
        JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s",
                      rename_fields={"levelname": "level", "name": "logger"})
        if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    for handler in root.handlers:
        handler.setFormatter(formatter)
        if not any(isinstance(f, ContextFilter) for f in handler.filters):
            handler.addFilter(ContextFilter())
    # alembic announces each of its autogenerate plugins at INFO on every run.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    quiet_tensorflow()


def quiet_tensorflow() -> None:
    """Keep TensorFlow's C++ start-up lines out of the logs of this process and its children; set
    before TensorFlow is imported (it reads these once), and only where the environment has not.

    TF_CPP_MIN_LOG_LEVEL does not reach the oneDNN lines (two at import, and an "E" line about
    bool ops on CPUs without AVX-512 BF16): they are written before TensorFlow reads it. Turning
    oneDNN's custom ops off silences them; on this project's models it changed neither the
    probabilities (to 6 decimals) nor the time per recording.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


class ContextFilter(logging.Filter):
    """Copies the bound context onto each record (fields a record already has are kept)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in (_context.get() or {}).items():
            if not hasattr(record, name):
                setattr(record, name, value)
        return True


def bind_fields(**fields: object) -> contextvars.Token[dict[str, str] | None]:
    """Add fields to this context's log records until ``reset(token)``; None values are left out."""
    current = dict(_context.get() or {})
    current.update({k: str(v) for k, v in fields.items() if v is not None})
    return _context.set(current)


def reset(token: contextvars.Token[dict[str, str] | None]) -> None:
    _context.reset(token)


@contextmanager
def bind(**fields: object) -> Iterator[None]:
    """Log records made inside the block carry ``fields``."""
    token = bind_fields(**fields)
    try:
        yield
    finally:
        reset(token)


def context() -> dict[str, str]:
    """The fields bound now (a copy)."""
    return dict(_context.get() or {})
