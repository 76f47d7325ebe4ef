"""Server-rendered pages: upload, history, job detail, batch."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, redirect, render_template, request, url_for
from werkzeug.wrappers import Response

from ser_shared.emotions import EMOTIONS
from web import queries
from web.context import db, services
from web.serialize import iso
from web.uploads import create_batch, parse_options

bp = Blueprint("pages", __name__)

COLOURS = {"neutral": "#8a8f98", "happy": "#f2b705", "sad": "#3b6fd8", "angry": "#d83b3b",
           "fearful": "#8e44ad", "disgust": "#4f9a3a", "surprised": "#f07c1e"}


@bp.app_context_processor
def _helpers() -> dict[str, object]:
    return {"emotions": EMOTIONS, "colours": COLOURS, "iso": iso, "statuses": queries.STATUSES,
            "dominant": dominant}


def dominant(segments: list[dict[str, Any]] | None, top: int = 3, at_least: float = 0.15) -> list[tuple[str, float]]:
    """A long recording's main emotions: share of its speech per segment label, largest first."""
    if not segments or len(segments) < 2:
        return []
    shares: dict[str, float] = {}
    for seg in segments:
        shares[seg["emotion"]] = shares.get(seg["emotion"], 0.0) + float(seg.get("speech_s") or 0.0)
    total = sum(shares.values()) or 1.0
    ranked = sorted(((e, v / total) for e, v in shares.items()), key=lambda item: -item[1])
    return [(e, share) for e, share in ranked[:top] if share >= at_least]


@bp.get("/")
def upload_form() -> str:
    return render_template("upload.html", settings=services().settings)


@bp.post("/upload")
def upload() -> Response:
    result = create_batch(services(), request.files.getlist("file"), parse_options(request.form.to_dict()))
    return redirect(url_for("pages.batch", batch_id=result.batch.id), code=303)


@bp.get("/history")
def history() -> str:
    args = request.args.to_dict()
    f = queries.parse_filter(args)
    limit = queries.parse_limit(args.get("limit"), default=25)
    jobs, next_cursor = queries.list_jobs(db(), f, limit, args.get("cursor"))
    base = {k: v for k, v in args.items() if k != "cursor" and v}
    return render_template("history.html", jobs=jobs, f=f, args=base, next_cursor=next_cursor,
                           paged=bool(args.get("cursor")))


@bp.get("/jobs/<job_id>")
def job(job_id: str) -> str:
    session = db()
    found = queries.get_job(session, job_id)
    return render_template("job.html", job=found, result=found.result,
                           deliveries=queries.deliveries_for_job(session, found.id))


@bp.get("/batches/<batch_id>")
def batch(batch_id: str) -> str:
    session = db()
    found = queries.get_batch(session, batch_id)
    counts = queries.status_counts(session, found.id)
    done = counts["succeeded"] + counts["failed"]
    return render_template("batch.html", batch=found, counts=counts, done=done)
