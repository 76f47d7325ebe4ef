"""Who is asking, and may they: API keys, page sign-in, CSRF.

- API clients present a key (``Authorization: Bearer <key>`` or ``X-API-Key``).
- Pages sign in once with a key at ``/login``; the signed session cookie (HttpOnly, SameSite=Lax,
  Secure in production) then carries the key's id, re-checked on every request so a revoked key
  ends its sessions at once.
- Every state-changing request that rides on the cookie must carry the session's CSRF token (a
  form field, or the ``X-CSRF-Token`` header for scripts). Requests with a key in a header need
  none: a browser never adds that header on its own.
- With authentication off (the embedded single-user default) everything is the local tenant, and
  page forms still carry CSRF tokens: another site must not be able to post to a local service.

Why not Flask-WTF's CSRFProtect: the check here is conditional per request (only requests that ride
on the session cookie; a key in a header needs none; ``/login`` is checked before any session
exists). CSRFProtect would have to run with its default check off and be called from this same
``_authenticate``, plus an error handler to turn its 400 ``CSRFError`` into our 403 ``csrf_failed``,
and a ``g`` cache to clear at sign-in; and its tokens expire (an hour by default) where ours live
as long as the session. More code and a dependency for the same ten lines.
"""

from __future__ import annotations

import hmac
import secrets
import uuid
from urllib.parse import urlsplit

from flask import Blueprint, Flask, g, redirect, render_template, request, session, url_for
from markupsafe import Markup
from werkzeug.wrappers import Response

from ser_shared import apikeys, logs
from ser_shared.errors import Forbidden, Unauthorized
from ser_shared.models import LOCAL_TENANT
from web.context import db, services

bp = Blueprint("auth", __name__)

CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
# Reachable without signing in: probes, the sign-in page itself, static files, the API description and
# the model card (both describe the service, not anyone's data).
# /metrics has a check of its own (SER_METRICS_TOKEN, see web/metrics.py): a scraper has no API key.
PUBLIC_ENDPOINTS = {"api.healthz", "api.readyz", "static", "auth.login", "auth.login_submit", "pages.api_docs",
                    "pages.model", "pages.model_picture", "metrics.metrics"}
PUBLIC_PATHS = {"/api/v1/openapi.json"}


def tenant() -> str:
    """The tenant of the current request (set by ``_authenticate`` before any view runs)."""
    return str(g.tenant)


def key_id() -> uuid.UUID | None:
    """The API key behind the current request; None in single-user mode (there are no keys)."""
    value = g.get("key_id")
    return value if isinstance(value, uuid.UUID) else None


def csrf_token() -> str:
    token = session.get(CSRF_FIELD)
    if not token:
        token = session[CSRF_FIELD] = secrets.token_urlsafe(32)
    return str(token)


def csrf_field() -> Markup:
    return Markup('<input type="hidden" name="{}" value="{}">').format(CSRF_FIELD, csrf_token())


def _check_csrf() -> None:
    if request.method in SAFE_METHODS:
        return
    sent = request.headers.get(CSRF_HEADER) or request.form.get(CSRF_FIELD) or ""
    expected = session.get(CSRF_FIELD) or ""
    if not expected or not hmac.compare_digest(str(sent), str(expected)):
        raise Forbidden("missing or stale CSRF token; reload the page and try again", code="csrf_failed")


def _refuse_cross_site() -> None:
    """Single-user mode's API has no key, so a browser's cookie-less cross-site form POST would be
    enough to submit or delete jobs on a local service from any web page. Browsers say where such a
    request comes from (``Sec-Fetch-Site``, ``Origin``); scripts and the CLI send neither."""
    if request.method in SAFE_METHODS:
        return
    site = request.headers.get("Sec-Fetch-Site")
    origin = request.headers.get("Origin")
    if site in ("cross-site", "same-site") or (origin is not None and origin != request.host_url.rstrip("/")):
        raise Forbidden("a write from another web site is refused: this service runs without API keys",
                        code="csrf_failed")


def _presented_key() -> str | None:
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return request.headers.get("X-API-Key")


def _authenticate() -> Response | None:
    g.tenant = LOCAL_TENANT
    g.key_name = None
    g.key_id = None
    # No route (a 404 in the making, e.g. /favicon.ico): nothing to protect.
    if request.endpoint is None or request.endpoint in PUBLIC_ENDPOINTS or request.path in PUBLIC_PATHS:
        return None
    api = request.blueprint == "api"
    if not services().settings.auth_enabled:
        logs.bind_fields(tenant=LOCAL_TENANT)
        if api:
            _refuse_cross_site()
        else:
            _check_csrf()
        return None
    key = _presented_key()
    if key is not None:
        row = apikeys.authenticate(db(), key)
        if row is None:
            raise Unauthorized("the API key is unknown or revoked")
        g.tenant, g.key_name, g.key_id = row.tenant, row.name, row.id
        logs.bind_fields(tenant=row.tenant)  # unbound with the request id, at teardown
        return None
    key_id = session.get("key_id")
    row = apikeys.by_id(db(), key_id) if key_id else None
    if row is None:
        if key_id:
            session.clear()  # its key was revoked
        if api:
            raise Unauthorized("send an API key: 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
        return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))
    g.tenant, g.key_name, g.key_id = row.tenant, row.name, row.id
    logs.bind_fields(tenant=row.tenant)
    _check_csrf()
    return None


def _safe_next(target: str | None) -> str:
    """Only same-site relative paths: ``next`` must not become an open redirect."""
    if not target or not target.startswith("/") or target.startswith("//") or urlsplit(target).netloc:
        return url_for("pages.history")
    return target


@bp.get("/login")
def login() -> str | Response:
    if not services().settings.auth_enabled:
        return redirect(url_for("pages.upload_form"))
    return render_template("login.html", next=request.args.get("next", ""), error=None)


@bp.post("/login")
def login_submit() -> tuple[str, int] | Response:
    _check_csrf()
    row = apikeys.authenticate(db(), (request.form.get("key") or "").strip())
    if row is None:
        return render_template("login.html", next=request.form.get("next", ""),
                               error="That key is unknown or revoked."), 401
    # A fresh session (new CSRF token) at sign-in: nothing set before it carries over.
    session.clear()
    session.permanent = True
    session["key_id"] = str(row.id)
    csrf_token()
    return redirect(_safe_next(request.form.get("next")), code=303)


@bp.post("/logout")
def logout() -> Response:
    session.clear()
    return redirect(url_for("auth.login"), code=303)


def register(app: Flask) -> None:
    settings = app.extensions["ser"].settings
    app.config.update(
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.secure_cookies,
        SESSION_COOKIE_NAME="ser_session",
        PERMANENT_SESSION_LIFETIME=int(settings.session_hours * 3600),
    )
    app.before_request(_authenticate)
    app.register_blueprint(bp)

    @app.context_processor
    def _auth_helpers() -> dict[str, object]:
        return {"csrf_field": csrf_field, "csrf_token": csrf_token, "auth_enabled": settings.auth_enabled,
                "key_name": g.get("key_name")}
