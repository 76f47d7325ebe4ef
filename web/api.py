"""JSON API under /api/v1, plus the health endpoints."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request, stream_with_context
from sqlalchemy import text

from ser_shared import storage
from ser_shared.errors import BadRequest, Conflict, Gone, NotFound
from ser_shared.models import Batch, JobStatus
from web import export as export_rows
from web import idempotency, limits, media, openapi, queries
from web.auth import key_id, tenant
from web.context import db, services
from web.serialize import batch_dict, iso, job_dict, job_page, upload_accepted
from web.uploads import LIVE_WEBHOOK, create_batch, open_live_batch, parse_labels, parse_options, parse_webhook

bp = Blueprint("api", __name__)
API = "/api/v1"


@bp.post(f"{API}/jobs")
def create_jobs() -> tuple[Response, int]:
    """Upload one or many recordings (multipart ``file`` fields) as one batch, or add them to a
    live session (``batch_id``).

    With an ``Idempotency-Key`` header, a retry of the same request replays the first response
    instead of creating the jobs again (see ``web.idempotency``).
    """
    svc = services()
    # Before the body is parsed: a client over its limits is turned away without reading its files.
    limits.check(svc, tenant(), key_id())
    files = [f for f in request.files.getlist("file") if f is not None]
    multipart = request.mimetype == "multipart/form-data"
    if multipart and not files and not request.form and (request.content_length or 0) > 0:
        # werkzeug drops a part whose headers are not UTF-8 (a file name in Latin-1, say) without a
        # word: a body with content but not one readable part is that, or a broken multipart body.
        raise BadRequest("the multipart body held no part that could be read: check that its part headers "
                         "(file names included) are UTF-8 and that the boundary matches", code="no_files")
    header = request.headers.get(idempotency.HEADER)
    # Keys are per tenant: two tenants choosing the same key never see each other's response.
    key = f"{tenant()}:{idempotency.validate_key(header)}" if header is not None else None
    lease: idempotency.Lease | None = None
    if key is not None:
        claimed = idempotency.claim(svc, key, idempotency.fingerprint(request.form, files))
        if isinstance(claimed, idempotency.Lease):
            lease = claimed
        else:
            stored = claimed if isinstance(claimed, idempotency.Stored) else _bound_reply(key, claimed)
            replay = jsonify(stored.body)
            replay.headers[idempotency.REPLAYED] = "true"
            return replay, stored.status
    try:
        limits.check(svc, tenant(), key_id(), len(files))
        into = request.form.get("batch_id")
        live = open_live_batch(db(), into, tenant()) if into else None
        options = parse_options(request.form.to_dict())
        if options.get("live") and request.form.get("webhook_url"):
            raise BadRequest(LIVE_WEBHOOK, code="invalid_option")  # before the URL's own checks
        result = create_batch(svc, files, options,
                              parse_labels(request.form, len(files)), parse_webhook(request.form, svc.settings),
                              tenant=tenant(), api_key_id=key_id(), claim=lease, into=live)
    except Exception:
        if lease is not None:
            idempotency.release(svc, lease)  # nothing was created: the client may retry with this key
        raise
    body = upload_accepted(result.batch.id, result.jobs, result.enqueued)
    if key is not None:
        idempotency.complete(svc, key, 202, body)
    return jsonify(body), 202


def _bound_reply(key: str, bound: idempotency.Bound) -> idempotency.Stored:
    """The response for a key whose request committed its batch and died before answering:
    rebuilt from the batch (and stored, so later retries replay it as is). Jobs it did not get to
    enqueue are sent by the worker's sweep of unqueued jobs."""
    found = db().get(Batch, bound.batch_id)
    if found is None:
        raise Conflict("the batch this Idempotency-Key created was deleted; use a new key",
                       code="idempotency_key_reused")
    unsent = any(j.status == JobStatus.QUEUED.value and j.enqueued_at is None for j in found.jobs)
    body = upload_accepted(found.id, list(found.jobs), not unsent)
    idempotency.complete(services(), key, 202, body)
    return idempotency.Stored(202, body)


@bp.get(f"{API}/jobs")
def list_jobs() -> Response:
    f = queries.parse_filter(request.args.to_dict(), tenant())
    limit = queries.parse_limit(request.args.get("limit"))
    jobs, next_cursor = queries.list_jobs(db(), f, limit, request.args.get("cursor"))
    # Segments make long recordings' rows large: listed only on request.
    segments = queries.parse_flag(request.args.get("segments"))
    return jsonify(job_page(jobs, next_cursor, segments, queries.deliveries_by_job(db(), [j.id for j in jobs])))


@bp.get(f"{API}/export")
def export() -> Response:
    """The jobs matching the list filters as CSV (default) or JSON, streamed; ``segments=true``
    gives one row per speech segment."""
    f = queries.parse_filter(request.args.to_dict(), tenant())
    fmt = (request.args.get("format") or "csv").lower()
    if fmt not in ("csv", "json"):
        raise BadRequest("format must be csv or json", code="invalid_parameter")
    segments = queries.parse_flag(request.args.get("segments"))
    factory = services().sessions
    body = (export_rows.csv_stream if fmt == "csv" else export_rows.json_stream)(factory, f, segments)
    name = f"ser-jobs{'-segments' if segments else ''}.{fmt}"
    return Response(stream_with_context(body), mimetype="text/csv" if fmt == "csv" else "application/json",
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})


@bp.get(f"{API}/jobs/<job_id>")
def job(job_id: str) -> Response:
    session = db()
    found = queries.get_job(session, job_id, tenant())
    return jsonify(job_dict(found, queries.deliveries_for_job(session, found.id)))


@bp.get(f"{API}/jobs/<job_id>/audio")
def job_audio(job_id: str) -> Response:
    found = queries.get_job(db(), job_id, tenant())
    if found.audio_deleted_at is not None:
        raise Gone(f"this job's audio was deleted on {iso(found.audio_deleted_at)} (retention); its results remain",
                   code="audio_deleted")
    media.refuse_undecodable(found)
    if not found.storage_key:
        raise NotFound("this job has no stored audio")
    store = storage.store_for(services().settings)
    try:
        if not isinstance(store, storage.LocalStorage):
            assert isinstance(store, storage.S3Storage)
            return media.stream_audio(found, store, found.storage_key)
        path = store.path(found.storage_key)
        if not path.exists():
            raise FileNotFoundError(found.storage_key)
    except FileNotFoundError:
        raise NotFound("this job's audio is gone") from None
    return media.send_audio(found, path)


@bp.delete(f"{API}/jobs/<job_id>")
def delete_job(job_id: str) -> tuple[str, int]:
    """Remove the job, its result and its audio."""
    session = db()
    found = queries.get_job(session, job_id, tenant())
    key = found.storage_key
    session.delete(found)
    session.commit()
    storage.discard(storage.store_for(services().settings), key)
    return "", 204


@bp.get(f"{API}/batches/<batch_id>")
def batch(batch_id: str) -> Response:
    session = db()
    found = queries.get_batch(session, batch_id, tenant())
    return jsonify(batch_dict(found, queries.status_counts(found),
                              queries.deliveries_for_batch(session, found.id)))


@bp.get(f"{API}/openapi.json")
def openapi_document() -> Response:
    """The OpenAPI 3.1 description of this API (public: see ``web.auth.PUBLIC_PATHS``)."""
    return jsonify(openapi.document())


@bp.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    """Ready when the database answers and the broker accepts a connection."""
    checks: dict[str, str] = {}
    svc = services()
    try:
        with svc.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unreachable: {type(exc).__name__}"
    try:
        with svc.celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=3)
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"unreachable: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return jsonify({"status": "ready" if ready else "unavailable", "checks": checks}), 200 if ready else 503
