"""The upload flow: validate → store under a generated key → insert rows → commit → enqueue."""

from __future__ import annotations

import json
import logging
import math
import re
import unicodedata
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import update
from sqlalchemy.orm import Session
from werkzeug.datastructures import FileStorage, MultiDict

from ser_shared import storage, webhooks
from ser_shared.audio import check_duration, probe, sniff_format
from ser_shared.enqueue import enqueue, queue_for
from ser_shared.errors import AudioError, BadRequest, Conflict, NotFound
from ser_shared.models import Batch, Job, JobStatus
from ser_shared.schemas import CHANNEL_MODES, DEVICES, TRANSCRIBE  # the choices the API documents
from ser_shared.settings import Settings
from ser_shared.webhooks import record_events
from web.context import Services
from web.metrics import count_files
from web.queries import parse_bool

log = logging.getLogger(__name__)

# BCP-47 as the engines take it: a language subtag and optional region/script subtags (en-US, hi-IN).
LANGUAGE = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8}){0,2}$")


@dataclass
class UploadResult:
    batch: Batch
    jobs: list[Job]
    enqueued: bool


def clean_filename(name: str | None) -> str:
    """The client's file name as display data: no control characters, bounded length."""
    text = "".join(ch for ch in (name or "") if unicodedata.category(ch)[0] != "C").strip()
    return text[:255] or "unnamed"


def parse_options(form: dict[str, str]) -> dict[str, Any]:
    """Per-batch options from form fields; unknown values are a 400."""
    device = (form.get("device") or "auto").strip().lower()
    if device not in DEVICES:
        raise BadRequest(f"device must be one of {', '.join(DEVICES)}", code="invalid_option")
    transcribe = (form.get("transcribe") or "none").strip().lower()
    if transcribe not in TRANSCRIBE:
        raise BadRequest(f"transcribe must be one of {', '.join(TRANSCRIBE)}", code="invalid_option")
    language = (form.get("language") or "en-US").strip()
    if not LANGUAGE.match(language):
        raise BadRequest("language must be a BCP-47 tag such as en-US or hi-IN", code="invalid_option")
    channels = (form.get("channels") or "").strip().lower()
    if channels and channels not in CHANNEL_MODES:
        raise BadRequest(f"channels must be one of {', '.join(CHANNEL_MODES)}", code="invalid_option")
    options: dict[str, Any] = {"device": device}
    if channels:  # stored only when asked for: without it the worker applies the default, auto
        options["channels"] = channels
    if transcribe != "none":
        options |= {"transcribe": transcribe, "language": language}
    labels = parse_channel_labels(form.get("channel_labels"))
    if labels:
        options["channel_labels"] = labels
    if parse_bool(form.get("live"), "live", code="invalid_option"):
        options["live"] = True
    return options


MAX_CHANNEL_LABELS = 8
MAX_LABEL_LENGTH = 32
# Letters and digits of any script, "-", "_" and spaces (stripped at the ends): a label is shown on pages and
# written to CSV cells, so nothing that could be markup, a separator or invisible.
CHANNEL_LABEL = re.compile(r"[\w\- ]+")


def parse_channel_labels(raw: str | None) -> list[str]:
    """``channel_labels`` ("agent,customer") as a list, first channel first; [] when not given.

    Raises BadRequest (``invalid_option``) for more than MAX_CHANNEL_LABELS labels, an empty, overlong
    or repeated label, or a character other than letters, digits, "-", "_" and spaces."""
    text = (raw or "").strip()
    if not text:
        return []
    labels = [part.strip() for part in text.split(",")]
    if len(labels) > MAX_CHANNEL_LABELS:
        raise BadRequest(f"channel_labels takes at most {MAX_CHANNEL_LABELS} labels", code="invalid_option")
    for label in labels:
        if not 1 <= len(label) <= MAX_LABEL_LENGTH or not CHANNEL_LABEL.fullmatch(label):
            raise BadRequest(f"each of channel_labels must be 1 to {MAX_LABEL_LENGTH} letters, digits, '-', '_' "
                             "or spaces, separated by commas (agent,customer)", code="invalid_option")
    if len({label.casefold() for label in labels}) != len(labels):
        raise BadRequest("channel_labels must be different from one another", code="invalid_option")
    return labels


LIVE_WEBHOOK = ("a live session takes no webhook_url: it has no end to report, and each chunk's result is "
                "there to poll as soon as it is ready")


def open_live_batch(session: Session, batch_id: str, tenant: str) -> Batch:
    """The live session (a batch created with ``live=true``) that an upload with ``batch_id`` adds to.

    Only live sessions grow: an ordinary batch is what was uploaded together, and its
    ``batch.completed`` event must not fire before files that arrive later. A batch of another
    tenant is a 404, as everywhere.
    """
    try:
        key = uuid.UUID(batch_id.strip())
    except ValueError as exc:
        raise BadRequest("batch_id must be a batch's id (a UUID)", code="invalid_parameter") from exc
    batch = session.get(Batch, key)
    if batch is None or batch.tenant != tenant:
        raise NotFound("no such batch")
    if not (batch.options or {}).get("live"):
        raise Conflict("only a live session (a batch created with live=true) takes more files; "
                       "upload without batch_id for a new batch", code="batch_not_live")
    return batch


MAX_REFERENCE = 200
MAX_METADATA_BYTES = 4096


@dataclass(frozen=True)
class Labels:
    """What the caller attaches to its jobs: a reference per file (or one for all) and metadata."""

    references: list[str | None]
    metadata: dict[str, Any] | None


def parse_webhook(form: MultiDict[str, str], settings: Settings) -> str | None:
    """``webhook_url`` if given and allowed (SSRF guard); BadRequest otherwise."""
    url = (form.get("webhook_url") or "").strip()
    if "\x00" in url:  # see _has_nul
        raise BadRequest("webhook_url must not contain NUL characters", code="webhook_url_refused")
    return webhooks.check_url(url, settings) if url else None


# Deeper metadata is refused: storing and serialising it recursed until a RecursionError (a 500).
MAX_METADATA_DEPTH = 32


def _storable_problem(value: Any, depth: int = 0) -> str | None:
    """Why ``value`` cannot be stored as JSON (a phrase to follow the field's name), or None.

    PostgreSQL text and JSONB hold no NUL and no lone UTF-16 surrogate, and JSON has no NaN or
    infinity: each of these failed the insert as a 500 (found by the API fuzzing and an
    independent probe)."""
    if depth > MAX_METADATA_DEPTH:
        return f"is nested more than {MAX_METADATA_DEPTH} levels deep"
    if isinstance(value, str):
        if "\x00" in value:
            return "must not contain NUL characters"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "must be valid Unicode (it holds a lone surrogate such as \\ud800)"
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return "must hold finite numbers only (no NaN, Infinity or out-of-range values like 1e999)"
    items: list[Any] = []
    if isinstance(value, dict):
        items = [x for kv in value.items() for x in kv]
    elif isinstance(value, list):
        items = value
    for item in items:
        problem = _storable_problem(item, depth + 1)
        if problem:
            return problem
    return None


def parse_labels(form: MultiDict[str, str], n_files: int) -> Labels:
    """``client_reference`` once (every job) or once per file (in file order); ``metadata`` a JSON object."""
    given = [r.strip() for r in form.getlist("client_reference")]
    if problem := _storable_problem(given):
        raise BadRequest(f"client_reference {problem}", code="invalid_parameter")
    if any(len(r) > MAX_REFERENCE for r in given):
        raise BadRequest(f"client_reference is limited to {MAX_REFERENCE} characters", code="invalid_parameter")
    if len(given) > 1 and len(given) != n_files:
        raise BadRequest(f"send client_reference once, or once per file ({n_files}); got {len(given)}",
                         code="invalid_parameter")
    references: list[str | None] = list(given) if len(given) == n_files else [given[0] if given else None] * n_files
    metadata = None
    raw = form.get("metadata")
    if raw:
        if len(raw.encode()) > MAX_METADATA_BYTES:
            raise BadRequest(f"metadata is limited to {MAX_METADATA_BYTES} bytes", code="invalid_parameter")
        try:
            metadata = json.loads(raw)
        except RecursionError as exc:
            raise BadRequest(f"metadata is nested more than {MAX_METADATA_DEPTH} levels deep",
                             code="invalid_parameter") from exc
        except ValueError:
            metadata = None
        if not isinstance(metadata, dict):
            raise BadRequest("metadata must be a JSON object", code="invalid_parameter")
        if problem := _storable_problem(metadata):
            raise BadRequest(f"metadata {problem}", code="invalid_parameter")
    return Labels([r or None for r in references], metadata)


def _ingest(svc: Services, store: storage.Storage, job: Job, upload: FileStorage) -> None:
    """Store one file and fill in what its header says; raises AudioError for a bad file.

    The header is checked on the local copy ``receive`` gives, before the file reaches the store:
    a file refused here is never stored (see ser_shared.storage)."""
    settings = svc.settings
    with store.receive(upload.stream, int(settings.max_file_mb * (1 << 20))) as (stored, local):
        job.size_bytes, job.content_hash = stored.size, stored.sha256
        job.format = sniff_format(stored.head)
        info = probe(local, job.format, settings.max_duration_s)
        job.sample_rate, job.channels, job.duration_s = info.sample_rate, info.channels, info.duration_s
        check_duration(info.duration_s, settings.min_duration_s, settings.max_duration_s)
    job.storage_key = stored.key


def _reject(svc: Services, job: Job, exc: AudioError) -> None:
    storage.store_for(svc.settings).delete(job.storage_key)
    job.storage_key = None
    job.status, job.error_code, job.error_message = JobStatus.FAILED.value, exc.code, exc.message
    job.finished_at = datetime.now(UTC)


class Claim(Protocol):
    """An Idempotency-Key claim (``web.idempotency.Lease``) held while the batch is created."""

    def keep(self) -> None: ...

    def bind(self, session: Session, batch_id: uuid.UUID) -> None: ...


def create_batch(svc: Services, files: list[FileStorage], options: dict[str, Any],
                 labels: Labels | None = None, webhook_url: str | None = None, *, tenant: str,
                 api_key_id: uuid.UUID | None = None, claim: Claim | None = None,
                 into: Batch | None = None) -> UploadResult:
    """Create a batch of jobs; a bad file fails alone, the others are queued.

    With ``claim``, the claim's lease is kept alive file by file (storing thousands of files takes
    a while), and the commit of the rows checks that the claim is still this request's.
    With ``into`` (a live session, from ``open_live_batch``), the jobs join that batch instead,
    after its last position, with its options (``options`` is ignored).
    Raises BadRequest for request-level problems (no files, too many).
    """
    files = [f for f in files if f is not None]
    if not files:
        raise BadRequest("send one or more recordings as multipart 'file' fields", code="no_files")
    if len(files) > svc.settings.max_files_per_request:
        raise BadRequest(f"at most {svc.settings.max_files_per_request} files per request",
                         code="too_many_files")
    labels = labels or Labels([None] * len(files), None)
    if options.get("live") and webhook_url:
        raise BadRequest(LIVE_WEBHOOK, code="invalid_option")
    if into is not None:
        batch, options = into, dict(into.options or {})
    else:
        batch = Batch(id=uuid.uuid4(), tenant=tenant, api_key_id=api_key_id, options=options,
                      file_count=len(files), webhook_url=webhook_url)
    jobs: list[Job] = []
    store = storage.store_for(svc.settings)
    for position, upload in enumerate(files):
        if claim is not None:
            try:
                claim.keep()
            except Exception:  # the claim was lost: this request creates nothing, keeps nothing
                for stored in jobs:
                    storage.discard(store, stored.storage_key)
                raise
        job = Job(id=uuid.uuid4(), batch_id=batch.id, tenant=tenant, api_key_id=api_key_id, position=position,
                  options=options,
                  created_at=datetime.now(UTC),
                  filename=clean_filename(upload.filename), status=JobStatus.QUEUED.value, attempts=0,
                  size_bytes=0, client_reference=labels.references[position], meta=labels.metadata)
        try:
            _ingest(svc, store, job, upload)
        except AudioError as exc:
            _reject(svc, job, exc)
        except Exception:  # the store failed (S3 unreachable): keep none of this request's files
            for stored in jobs:
                storage.discard(store, stored.storage_key)
            raise
        jobs.append(job)
    try:
        with svc.sessions() as session:
            if claim is not None:
                claim.bind(session, batch.id)
            if into is None:
                session.add(batch)
            else:
                # Positions are taken in the transaction that adds the jobs: two chunks uploaded at
                # once get different ones, and a request that fails takes none.
                end = session.execute(update(Batch).where(Batch.id == into.id)
                                      .values(file_count=Batch.file_count + len(jobs))
                                      .returning(Batch.file_count)).scalar_one()
                for offset, job in enumerate(jobs):
                    job.position = end - len(jobs) + offset
            session.add_all(jobs)
            # Files rejected here are already finished: their events go out with the batch's rows.
            events = record_events(session, [j.id for j in jobs if j.status != JobStatus.QUEUED.value])
            session.commit()
    except Exception:
        # Nothing half-written: without the rows, the stored files would be orphans.
        for job in jobs:
            storage.discard(store, job.storage_key)
        raise
    count_files(jobs)
    webhooks.send(svc.celery, events)
    queued = [j.id for j in jobs if j.status == JobStatus.QUEUED.value]
    ok = enqueue(svc.celery, svc.sessions, queued, queue_for(options, svc.settings.default_queue),
                 svc.settings.chunk_size) if queued else True
    log.info("batch created batch_id=%s files=%d queued=%d enqueued=%s", batch.id, len(jobs), len(queued), ok)
    return UploadResult(batch, jobs, ok)
