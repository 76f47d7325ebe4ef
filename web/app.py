"""Application factory: settings in, a configured Flask app out; nothing global."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from flask import Flask, g

from ser_shared import schemas, storage
from ser_shared.db import make_engine, make_session_factory
from ser_shared.enqueue import make_celery
from ser_shared.settings import Settings, get_settings
from web.context import Services


def create_app(settings: Settings | None = None) -> Flask:
    """Build the app; ``settings`` defaults to the environment's."""
    settings = settings or get_settings()
    schemas.set_strict(settings.env != "production")
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=settings.flask_secret,
        # werkzeug answers 413 before parsing a body larger than this.
        MAX_CONTENT_LENGTH=int(settings.max_request_mb * (1 << 20)),
        MAX_FORM_PARTS=settings.max_files_per_request + 100,
        # Parsed file parts above 1 MiB spool to disk, so a large batch does not sit in memory.
        MAX_FORM_MEMORY_SIZE=1 << 20,
        JSON_SORT_KEYS=False,
    )
    engine = make_engine(settings)
    app.extensions["ser"] = Services(settings, engine, make_session_factory(engine), make_celery(settings))
    if not settings.storage_url:
        settings.upload_dir.mkdir(parents=True, exist_ok=True)
    # Upload copies a killed web process left in its own spool (the workers' sweep cannot reach
    # this disk when web runs elsewhere); only ones past the grace, so no live request's.
    storage.clear_spool(settings, datetime.now(UTC) - timedelta(seconds=settings.orphan_grace_s))

    @app.teardown_appcontext
    def _close_session(_: BaseException | None) -> None:
        session = g.pop("db", None)
        if session is not None:
            session.close()

    from web import api, auth, drain, errors, metrics, pages, proxy, security

    # Forwarded headers and the public URL: see web/proxy.py (gunicorn itself trusts none).
    app.wsgi_app = proxy.wrap(app.wsgi_app, settings)  # type: ignore[method-assign,assignment]
    metrics.register(app)  # before auth: refused requests are counted and carry a request id
    auth.register(app)
    app.register_blueprint(api.bp)
    app.register_blueprint(pages.bp)
    errors.register(app)
    security.register(app)  # headers on every response: see web/security.py
    drain.register(app)  # a refusal's unread body is read first: see web/drain.py
    return app
