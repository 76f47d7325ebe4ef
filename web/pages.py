"""Server-rendered pages: upload, history, job detail, batch, the model card."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

from flask import Blueprint, flash, make_response, redirect, render_template, request, send_file, url_for
from markupsafe import Markup
from werkzeug.wrappers import Response

from ser_shared import formats, storage
from ser_shared.emotions import EMOTIONS
from ser_shared.errors import Gone, NotFound
from ser_shared.models import Batch, Job
from web import images, limits, markup, media, model_card, openapi, queries, timeline
from web.auth import key_id, tenant
from web.context import db, services, snapshot
from web.serialize import iso
from web.uploads import MAX_CHANNEL_LABELS, MAX_LABEL_LENGTH, TRANSCRIBE, create_batch, parse_options

bp = Blueprint("pages", __name__)

# Each emotion's colour is in static/style.css (its emo-<name> class), with the rest of the look.
EMOJI = {"neutral": "\U0001F610", "happy": "\U0001F604", "sad": "\U0001F622", "angry": "\U0001F620",
         "fearful": "\U0001F628", "disgust": "\U0001F616", "surprised": "\U0001F632"}
# Job error codes in plain words for the job page; the code and the worker's message are shown too.
ERROR_WORDS = {
    "empty_file": "The file was empty.",
    "unsupported_format": "This is not an audio format the service can read.",
    "file_too_large": "The file is larger than the upload limit.",
    "audio_too_long": "The recording is longer than the service accepts.",
    "audio_too_short": "The recording is too short to analyse.",
    "decode_failed": "The file could not be decoded as audio; it may be damaged or not really audio.",
    "silent_audio": "The recording is silent: there was no speech to analyse.",
    "no_speech": "No speech was found in the recording (only noise, tones or music), so it has no emotion to give.",
    "incomplete_audio": "Only part of the recording could be decoded: the file is cut short or damaged.",
    "invalid_audio_header": "The file's header contradicts itself or its data (for example 7 bits per sample); "
                            "decoding by it would give noise, so it was not analysed.",
    "unsupported_sample_rate": "The file declares a sample rate no recorder produces; it is probably damaged.",
    "too_many_channels": "The file declares more channels than any recording has; it is probably damaged.",
    "invalid_samples": "Too many samples in the file are not numbers (NaN or infinity); the export is broken.",
    "audio_missing": "The stored recording was gone before it could be analysed.",
    "time_limit_exceeded": "The analysis took longer than the server allows for one job.",
    "too_many_attempts": "The analysis was tried several times and never finished; it was given up.",
    "internal_error": "Something went wrong on the server while analysing this recording.",
}


@bp.app_context_processor
def _helpers() -> dict[str, object]:
    return {"emotions": EMOTIONS, "iso": iso, "statuses": queries.STATUSES,
            "dominant": dominant, "emoji": EMOJI, "sorts": queries.SORT_CHOICES,
            # A callable, so the manifest is read only by the pages that show it (the job page's note).
            "served_model": lambda: model_card.served_or_none(services().settings),
            "worked_example": model_card.worked_example}


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


# What the upload page's script accepts before sending; the server still sniffs the content, this
# only spares the user an upload that would fail (names as browsers and recorders give them).
UPLOAD_EXTENSIONS = formats.EXTENSIONS


@bp.get("/")
def upload_form() -> str:
    return render_template("upload.html", settings=services().settings, extensions=UPLOAD_EXTENSIONS,
                           transcribe_choices=TRANSCRIBE, format_labels=formats.LABELS,
                           labels_max_length=MAX_CHANNEL_LABELS * (MAX_LABEL_LENGTH + 1) - 1)


@bp.post("/upload")
def upload() -> Response:
    svc = services()
    # Before the body is parsed, as in the API: a caller over its limits is not read at all.
    limits.check(svc, tenant(), key_id())
    files = request.files.getlist("file")
    limits.check(svc, tenant(), key_id(), len(files))
    result = create_batch(svc, files, parse_options(request.form.to_dict()), tenant=tenant(), api_key_id=key_id())
    return redirect(url_for("pages.batch", batch_id=result.batch.id), code=303)


@bp.get("/docs/api")
def api_docs() -> str:
    """The API reference, rendered from the same OpenAPI document the API serves."""
    doc = openapi.document()
    return render_template("api.html", doc=doc, operations=openapi.operations(doc), type_label=openapi.type_label,
                           response_content=openapi.response_content, curl_example=openapi.curl_example,
                           markdown=markup.block, markdown_inline=markup.inline, base=request.url_root.rstrip("/"))


@bp.get("/history")
def history() -> str:
    args = request.args.to_dict()
    f = queries.parse_filter(args, tenant())
    limit = queries.parse_limit(args.get("limit"), default=25)
    session = snapshot()  # the summary counts the same jobs the table lists
    jobs, next_cursor = queries.list_jobs(session, f, limit, args.get("cursor"))
    base = {k: v for k, v in args.items() if k != "cursor" and v}
    return render_template("history.html", jobs=jobs, f=f, args=base, next_cursor=next_cursor,
                           paged=bool(args.get("cursor")), summary=queries.summarize(session, f),
                           export_args={k: v for k, v in base.items() if k != "limit"})


@bp.get("/jobs/<job_id>")
def job(job_id: str) -> str:
    session = db()
    found = queries.get_job(session, job_id, tenant())
    # A file never decoded as audio is not offered to the player: the audio endpoint refuses it.
    undecodable = media.never_decoded(found)
    span = timeline.axis_seconds(found, found.result)
    lanes = timeline.lanes(found.result, span)
    return render_template("job.html", job=found, result=found.result,
                           deliveries=queries.deliveries_for_job(session, found.id),
                           audio_available=not undecodable and _audio_stored(found),
                           audio_undecodable=undecodable, error_words=ERROR_WORDS,
                           span=span, lanes=lanes, bands=[] if lanes else timeline.segment_bands(found.result, span),
                           ticks=timeline.ticks(span), clock=timeline.clock, picture_limit_s=images.MAX_SECONDS)


def _audio_stored(found: Job) -> bool:
    """Whether the job's recording is still stored (not deleted by retention or by hand)."""
    if not found.storage_key or found.audio_deleted_at is not None:
        return False
    return storage.store_for(services().settings).exists(found.storage_key)


@bp.get("/jobs/<job_id>/<any(waveform, spectrogram):kind>.png")
def job_image(job_id: str, kind: str) -> Response:
    """The waveform or mel spectrogram of the job's recording, drawn on request (bounded cost).

    Loaded through ``queries.get_job`` like the page, so the same access rules apply.
    """
    found = queries.get_job(db(), job_id, tenant())
    gone = Gone("this job's recording is no longer stored, so it cannot be drawn", code="audio_deleted")
    if not found.storage_key or found.audio_deleted_at is not None:
        raise gone
    try:
        with storage.store_for(services().settings).local_copy(found.storage_key) as path:
            picture = images.render(path, found.format, kind, found.duration_s)
    except FileNotFoundError:
        raise gone from None
    response = make_response(picture)
    response.mimetype = "image/png"
    # The audio of a job never changes, so neither does its picture: the browser may keep it.
    response.headers["Cache-Control"] = "private, max-age=86400"
    response.set_etag(f"{found.id}-{kind}-{images.WIDTH}-{images.LAYOUT}")
    return response.make_conditional(request)


@bp.post("/jobs/<job_id>/delete")
def delete_job(job_id: str) -> str | Response:
    """Delete the job, its result and its audio; without ``confirm=yes`` first ask (no-JS fallback)."""
    session = db()
    found = queries.get_job(session, job_id, tenant())
    if request.form.get("confirm") != "yes":
        return render_template("confirm_delete.html", job=found)
    batch_id, key = found.batch_id, found.storage_key
    session.delete(found)
    session.commit()
    storage.discard(storage.store_for(services().settings), key)
    flash(f"Deleted {found.filename}.")
    return redirect(url_for("pages.batch", batch_id=batch_id), code=303)


@bp.get("/batches/<batch_id>")
def batch(batch_id: str) -> str:
    session = snapshot()  # the summary counts the same jobs the table lists
    found = queries.get_batch(session, batch_id, tenant())
    counts = queries.status_counts(found)
    done = counts["succeeded"] + counts["failed"]
    return render_template("batch.html", batch=found, counts=counts, done=done, chunks=live_chunks(found),
                           summary=queries.summarize(session, queries.JobFilter(tenant(), batch_id=found.id)))


@dataclass(frozen=True)
class Chunk:
    """A live session's job on the session's time axis (chunks follow one another without gaps)."""

    job: Job
    start: float
    duration: float


def live_chunks(batch: Batch) -> list[Chunk]:
    """The jobs of a live session, placed end to end in upload order; empty for other batches."""
    if not (batch.options or {}).get("live"):
        return []
    chunks, at = [], 0.0
    for j in batch.jobs:  # in position order
        duration = j.duration_s or 0.0
        chunks.append(Chunk(j, at, duration))
        at += duration
    return chunks


@bp.get("/model")
def model() -> str:
    """The model card of the models being served, from the models folder's manifest and card."""
    served = model_card.served(services().settings)
    pictures = {name: _picture(served.folder, name)
                for name in (model_card.CONFUSION_PICTURE, model_card.RELIABILITY_PICTURE)}
    folder, root = str(served.folder), request.script_root
    return render_template(
        "model.html", s=served, card=model_card, pictures=pictures,
        weaknesses=_rendered(folder, model_card.weaknesses(served), 2, "weak-", root),
        full_card=_rendered(folder, served.card, 1, "card-", root))


@lru_cache(maxsize=8)
def _rendered(folder: str, text: str, shift: int, id_prefix: str, root: str) -> Markup:
    """The card's Markdown as HTML, once per text (rendering it takes tens of milliseconds). The
    script root is part of the key: the pictures' addresses depend on it."""
    return markup.document(text, partial(_picture, Path(folder)), shift=shift, id_prefix=id_prefix)


def _picture(folder: Path, src: str) -> tuple[str, int | None, int | None] | None:
    """A picture the card names, as its address here and its size; None unless it is a PNG of the
    models folder itself (a card's other addresses are not served)."""
    path = model_card.picture(folder, src)
    if path is None:
        return None
    width, height = model_card.png_size(path)
    return url_for("pages.model_picture", name=path.name), width, height


@bp.get("/model/pictures/<name>")
def model_picture(name: str) -> Response:
    """A PNG of the models folder (the confusion matrix, the reliability diagram); nothing else there."""
    path = model_card.picture(Path(services().settings.models_dir), name)
    if path is None:
        raise NotFound(f"the models folder has no picture named {name}")
    # Conditional (ETag and Last-Modified from the file): a retrained model's picture is fetched anew.
    return send_file(path, mimetype="image/png", conditional=True, max_age=3600)
