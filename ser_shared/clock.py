"""Time in one convention: aware UTC datetimes everywhere in Python, ISO 8601 with a ``Z`` outward.

The database columns go through ``ser_shared.models.UTCDateTime``, which hands back aware UTC on
both backends (SQLite returns naive values, Postgres aware ones in the session's time zone), so
code that reads a row never converts. What is left for code to convert lives here: values parsed
from outside (query strings, cursors) and the one outward text form.

Standard library only: the typed schemas, which the numeric package imports, use it too.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

__all__ = ["as_utc", "iso", "utcnow"]

Timespec = Literal["auto", "seconds", "milliseconds", "microseconds"]


def utcnow() -> datetime:
    """Now, aware, in UTC."""
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """``value`` as aware UTC. A naive value is taken to be UTC already (the text a client sends
    without an offset, a cursor written before the column type returned aware values)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def iso(value: datetime | None, timespec: Timespec = "auto") -> str | None:
    """UTC ISO 8601 with a ``Z`` (the API's one date-time format); None stays None; naive is UTC."""
    return None if value is None else as_utc(value).isoformat(timespec=timespec).replace("+00:00", "Z")
