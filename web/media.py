"""Serving a job's stored recording so that it can only ever be audio, or a download.

The bytes are the client's. A file whose name or claimed type says audio can hold HTML, so what is
served is typed from the format the server sniffed from the content (``Job.format``), never from
the upload, is sent as an attachment under a name ending in that format's extension, and carries a
policy that sandboxes it should a browser open it anyway. ``<audio src>`` plays an attachment all
the same. A file the service never decoded is not served at all: it was never shown to be audio.

From an S3 store the bytes are streamed through the app, Range requests answered with ranged
GETs, rather than redirected to a presigned URL: the tenant check, the typing and the policy
above then apply to every byte served, the store need not be reachable by clients, and a
browser's seek costs one ranged GET of what it asked for.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from flask import Response, request, send_file
from werkzeug.exceptions import RequestedRangeNotSatisfiable

from ser_shared import formats
from ser_shared.audio import MIME_TYPES
from ser_shared.errors import Conflict
from ser_shared.models import Job
from ser_shared.storage import S3Storage

# Job error codes meaning the stored bytes were never decoded as audio (the upload check or the
# worker gave up on the container, or on header values no recording has). A file only partly
# decoded (incomplete_audio) or with broken samples (invalid_samples) was read as audio: it plays.
NEVER_DECODED = frozenset({"empty_file", "unsupported_format", "decode_failed", "unsupported_sample_rate",
                           "too_many_channels"})
# Names a downloaded recording may keep; any other gets the sniffed format's extension added, so a
# file uploaded as "page.html" is saved as "page.html.wav", never as a document.
EXTENSIONS = {f.name: f.extensions for f in formats.FORMATS}
# Opened as a page rather than played, the response may run nothing, load nothing, be framed nowhere.
AUDIO_POLICY = "default-src 'none'; media-src 'self'; sandbox; frame-ancestors 'none'"


def never_decoded(job: Job) -> bool:
    """Whether the job's stored file was never shown to be audio (see ``NEVER_DECODED``)."""
    return job.error_code in NEVER_DECODED


def media_type(job: Job) -> str:
    """The type of the stored recording from its sniffed format; octet-stream when there is none."""
    return MIME_TYPES.get(job.format or "", "application/octet-stream")


def download_name(job: Job) -> str:
    """The client's file name without any folder part, ending in an extension of the sniffed format."""
    name = PurePosixPath(job.filename.replace("\\", "/")).name or "recording"
    allowed = EXTENSIONS.get(job.format or "", ())
    if not name.lower().endswith(allowed or (".bin",)):
        name += allowed[0] if allowed else ".bin"
    return name


def refuse_undecodable(job: Job) -> None:
    """Raise Conflict (``audio_not_decodable``) for a job whose file the service never decoded."""
    if never_decoded(job):
        raise Conflict(f"this job's file was never decoded as audio ({job.error_code}), so it is not served",
                       code="audio_not_decodable")


def send_audio(job: Job, path: Path) -> Response:
    """The stored recording as a typed, sandboxed attachment (Range requests answered).

    Raises Conflict (``audio_not_decodable``) for a file the service never decoded.
    """
    refuse_undecodable(job)
    response = send_file(path, mimetype=media_type(job), as_attachment=True, download_name=download_name(job),
                         conditional=True)
    return _guarded(response)


def _guarded(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = AUDIO_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


def stream_audio(job: Job, store: S3Storage, key: str) -> Response:
    """``send_audio`` for an object in S3: streamed in chunks, one ``Range`` answered with a ranged GET.

    Raises Conflict for a file never decoded, FileNotFoundError when the object is gone, and
    416 for a range outside the object.
    """
    refuse_undecodable(job)
    size = store.size(key)
    start, stop, status = 0, size, 200
    wanted = request.range
    if wanted is not None and wanted.units == "bytes" and len(wanted.ranges) == 1:
        bounds = wanted.range_for_length(size)
        if bounds is None:
            raise RequestedRangeNotSatisfiable(length=size)
        (start, stop), status = bounds, 206
    # An empty answer needs no GET (S3 refuses the range "bytes=0--1").
    body = store.get_range(key, start, stop) if stop > start else iter(())
    response = Response(body, status=status, mimetype=media_type(job), direct_passthrough=True)
    response.headers["Content-Length"] = str(stop - start)
    response.headers["Accept-Ranges"] = "bytes"
    if status == 206:
        response.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
    response.headers.set("Content-Disposition", "attachment", filename=download_name(job))
    response.headers["Cache-Control"] = "private, no-cache"
    return _guarded(response)
