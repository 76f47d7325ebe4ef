"""The web tier's Prometheus metrics, served at ``/metrics``, and the request id of each request.

Under gunicorn each worker process counts its own requests; ``web/gunicorn_conf.py`` points
``PROMETHEUS_MULTIPROC_DIR`` at a folder cleared at start, every process writes its values there,
and a scrape (answered by any one process) adds them all up (``MultiProcessCollector``). Without
that variable (``ser serve``'s single process, the tests' in-process apps) the process's own
registry is served.

``/metrics`` needs no sign-in, like ``/healthz``: a scraper has no API key. With
``SER_METRICS_TOKEN`` set it needs ``Authorization: Bearer <token>`` instead.
"""

from __future__ import annotations

import hmac
import os
import time
import uuid

from flask import Blueprint, Flask, Response, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

from ser_shared import logs
from ser_shared.models import Job, JobStatus
from web.context import services

bp = Blueprint("metrics", __name__)

REQUEST_ID_HEADER = "X-Request-ID"
# Both ways in for a batch: the API and the upload page.
UPLOAD_ENDPOINTS = {"api.create_jobs", "pages.upload"}

REQUESTS = Counter("ser_http_requests_total", "HTTP requests answered, by route template and status",
                   ["method", "route", "status"])
LATENCY = Histogram("ser_http_request_duration_seconds", "Time to answer an HTTP request, by route template",
                    ["method", "route"],
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
UPLOADS = Counter("ser_uploads_total", "Upload requests, accepted or refused (code: the error code)",
                  ["outcome", "code"])
FILES = Counter("ser_upload_files_total", "Files in accepted uploads: accepted (queued) or refused by code",
                ["outcome", "code"])


def register(app: Flask) -> None:
    """Count every request (registered before authentication: refusals are counted too)."""
    app.before_request(_start)
    app.after_request(_finish)
    app.teardown_request(_unbind)
    app.register_blueprint(bp)


def _start() -> None:
    g.metrics_started = time.perf_counter()
    # A client's (or the proxy's) request id is kept so one id follows a request across tiers.
    supplied = request.headers.get(REQUEST_ID_HEADER, "")
    g.request_id = supplied if 0 < len(supplied) <= 128 and supplied.isprintable() else uuid.uuid4().hex
    g.log_token = logs.bind_fields(request_id=g.request_id)


def _route() -> str:
    # The template (/api/v1/jobs/<job_id>), never the path: one series per route, not per job.
    return request.url_rule.rule if request.url_rule is not None else "unmatched"


def _finish(response: Response) -> Response:
    route, status = _route(), response.status_code
    REQUESTS.labels(request.method, route, str(status)).inc()
    started = g.get("metrics_started")
    if started is not None:
        LATENCY.labels(request.method, route).observe(time.perf_counter() - started)
    if request.endpoint in UPLOAD_ENDPOINTS and request.method == "POST":
        UPLOADS.labels(*_upload_outcome(response)).inc()
    if "request_id" in g:
        response.headers.setdefault(REQUEST_ID_HEADER, g.request_id)
    return response


def _upload_outcome(response: Response) -> tuple[str, str]:
    if response.status_code < 400:
        return "accepted", ""
    body = response.get_json(silent=True) if response.is_json else None
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return "refused", str(code or response.status_code)


def _unbind(_: BaseException | None) -> None:
    token = g.pop("log_token", None)
    if token is not None:
        logs.reset(token)


def count_files(jobs: list[Job]) -> None:
    """Count a created batch's files: queued ones accepted, the others refused by error code."""
    for job in jobs:
        if job.status == JobStatus.QUEUED.value:
            FILES.labels("accepted", "").inc()
        else:
            FILES.labels("refused", job.error_code or "unknown").inc()


def _registry() -> CollectorRegistry:
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


@bp.get("/metrics")
def metrics() -> Response:
    token = services().settings.metrics_token
    if token is not None:
        presented = request.headers.get("Authorization", "")
        if not hmac.compare_digest(presented.encode(), f"Bearer {token}".encode()):
            return Response("metrics need the bearer token (SER_METRICS_TOKEN)\n", status=401,
                            mimetype="text/plain", headers={"WWW-Authenticate": 'Bearer realm="metrics"'})
    return Response(generate_latest(_registry()), mimetype=CONTENT_TYPE_LATEST)
