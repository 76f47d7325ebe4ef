"""One error shape for the API, ``{"error": {"code", "message"}}``, mapped in one place."""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify, render_template, request
from flask.typing import ResponseReturnValue
from sqlalchemy.exc import OperationalError
from werkzeug.exceptions import HTTPException

from ser_shared.errors import SERError, TooManyRequests

log = logging.getLogger(__name__)

# A body the server cannot parse (a chunk size that is not hex, a chunk without its terminator) is
# only found when the app reads it, and the server raises its own exception from that read: it is
# the client's mistake, a 400, wherever the read happens (the form parser, the drain of a refusal).
try:
    from gunicorn.http.errors import ParseException as _GunicornParseError

    MALFORMED_BODY: tuple[type[Exception], ...] = (_GunicornParseError,)
except ImportError:  # another WSGI server: its errors arrive as OSError/ValueError, handled alike
    MALFORMED_BODY = ()

HTTP_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed",
              413: "request_too_large", 415: "unsupported_media_type"}


def error_response(status: int, code: str, message: str) -> tuple[Response, int]:
    return jsonify({"error": {"code": code, "message": message}}), status


def _wants_json() -> bool:
    return request.path.startswith("/api/") or request.path in ("/healthz", "/readyz")


def _too_large_message(app: Flask) -> str:
    """What was too large. werkzeug raises the same bare 413 for a body over MAX_CONTENT_LENGTH and
    for a form over its parsing limits; a declared length within the limit means the latter."""
    limit = app.config["MAX_CONTENT_LENGTH"]
    declared = request.content_length
    if declared is not None and declared <= limit:
        return (f"the form is over a parsing limit: more than {app.config['MAX_FORM_PARTS']} parts, or a "
                f"field or part header over {app.config['MAX_FORM_MEMORY_SIZE'] // 1024} KiB")
    return f"request body exceeds {limit // (1 << 20)} MiB"


def register(app: Flask) -> None:
    @app.errorhandler(SERError)
    def _domain(exc: SERError) -> ResponseReturnValue:
        if _wants_json():
            response, status = error_response(exc.http_status, exc.code, exc.message)
        else:
            response = app.make_response(render_template("error.html", code=exc.code, message=exc.message))
            status = exc.http_status
        # A rate limit (429), or an Idempotency-Key claim still held (409): when to try again.
        retry_after = exc.retry_after if isinstance(exc, TooManyRequests) else getattr(exc, "retry_after", None)
        if retry_after is not None:
            response.headers["Retry-After"] = str(retry_after)
        return response, status

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> ResponseReturnValue:
        status = exc.code or 500
        code = HTTP_CODES.get(status, "http_error")
        message = exc.description or exc.name
        if status == 413:
            message = _too_large_message(app)
        if _wants_json():
            return error_response(status, code, message)
        return render_template("error.html", code=code, message=message), status

    for malformed in MALFORMED_BODY:
        @app.errorhandler(malformed)
        def _malformed(exc: Exception) -> ResponseReturnValue:
            message = f"the request body is malformed: {exc}"
            if _wants_json():
                return error_response(400, "malformed_request", message)
            return render_template("error.html", code="malformed_request", message=message), 400

    @app.errorhandler(OperationalError)
    def _db_down(exc: OperationalError) -> ResponseReturnValue:
        log.error("database unavailable: %s", exc.orig)
        if _wants_json():
            return error_response(503, "database_unavailable", "the database is unreachable; try again")
        return render_template("error.html", code="database_unavailable",
                               message="The database is unreachable; try again shortly."), 503

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> ResponseReturnValue:
        log.exception("unhandled error path=%s", request.path)
        if _wants_json():
            return error_response(500, "internal_error", "unexpected server error")
        return render_template("error.html", code="internal_error", message="Unexpected error."), 500
