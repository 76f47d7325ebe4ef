"""Request-scoped access to the app's services and database session."""

from __future__ import annotations

from flask import current_app, g
from sqlalchemy.orm import Session

from web.app import Services


def services() -> Services:
    return current_app.extensions["ser"]  # type: ignore[no-any-return]


def db() -> Session:
    """The request's session, opened on first use and closed on teardown."""
    if "db" not in g:
        g.db = services().sessions()
    return g.db  # type: ignore[no-any-return]
