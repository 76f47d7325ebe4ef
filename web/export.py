"""Export of jobs as CSV or JSON, streamed page by page so 100,000 rows never sit in memory.

Rows follow the list endpoint's filters and order (newest first). With ``segments``, a long
recording gives one row per speech segment (a short one, its single segment), and a conversation one
row per segment of each speaker (``channel``, ``label``). CSV writes booleans as ``true``/``false``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from ser_shared.emotions import EMOTIONS
from ser_shared.models import Job
from ser_shared.schemas import EXPORT_COLUMNS, ExportRow, Segment
from web import queries

PAGE = 500
COLUMNS = list(EXPORT_COLUMNS)  # ExportRow's fields, in its order


def _rows(job: Job, segments: bool) -> Iterator[dict[str, Any]]:
    """The job's rows, each checked against ``ExportRow`` (a column it does not declare is an error)."""
    for row in _raw_rows(job, segments):
        yield ExportRow.build(row).to_json()


def _raw_rows(job: Job, segments: bool) -> Iterator[dict[str, Any]]:
    result = job.result
    base: dict[str, Any] = {
        "job_id": str(job.id), "batch_id": str(job.batch_id), "filename": job.filename,
        "client_reference": job.client_reference, "status": job.status, "created_at": job.created_at,
        "duration_s": job.duration_s, "error_code": job.error_code,
        "transcript": (result.transcript or {}).get("text") if result else None,
        "channel": None, "label": None, "escalation": job.escalation}
    speakers = list(_channel_segment_rows(base, result.channels)) if segments and result and result.channels else []
    if speakers:  # none when no channel holds speech: then the job's own row, as for a job without segments
        yield from speakers
        return
    if segments and result and result.segments:
        for k, seg in enumerate(Segment.build(s) for s in result.segments):
            yield _segment_row(base, k, seg, base["transcript"])
        return
    probs = result.probabilities if result else {}
    yield {**base, "segment": None, "start_s": None, "end_s": None,
           "emotion": result.emotion if result else None, "confidence": result.confidence if result else None,
           "uncertain": result.uncertain if result else None, **{f"p_{e}": probs.get(e) for e in EMOTIONS}}


def _segment_row(base: dict[str, Any], k: int, seg: Segment, fallback: str | None) -> dict[str, Any]:
    """Segment ``k``'s row; a segment without its own transcript (not transcribed segment-wise) shows
    ``fallback``."""
    own = "transcript" in seg.model_fields_set
    return {**base, "segment": k, "start_s": seg.start, "end_s": seg.end, "emotion": seg.emotion,
            "confidence": seg.confidence, "uncertain": seg.uncertain,
            **{f"p_{e}": seg.probabilities.get(e) for e in EMOTIONS},
            "transcript": seg.transcript if own else fallback}


def _channel_segment_rows(base: dict[str, Any], channels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """A conversation's segments, every speaker's, in time order (as the conversation reads); ``segment``
    counts within the speaker's own segments, so (``channel``, ``segment``) names one."""
    # The job's transcript stands in only for a single speaker's segments: of several speakers it is
    # everybody's words, not this segment's.
    fallback = base["transcript"] if len(channels) == 1 else None
    rows = [(seg.start, ch["index"], k, ch["label"], seg) for ch in channels
            for k, seg in enumerate(Segment.build(s) for s in ch.get("segments") or [])]
    for _, index, k, label, seg in sorted(rows, key=lambda row: row[:3]):
        yield {**_segment_row(base, k, seg, fallback), "channel": index, "label": label}


def _all(factory: sessionmaker[Session], f: queries.JobFilter, segments: bool) -> Iterator[dict[str, Any]]:
    cursor: str | None = None
    while True:
        with factory() as session:  # a short session per page: no transaction held across the download
            jobs, cursor = queries.list_jobs(session, f, PAGE, cursor)
            rows = [row for job in jobs for row in _rows(job, segments)]
        yield from rows
        if cursor is None:
            return


def csv_cells(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with its booleans written as the JSON export writes them, ``true``/``false`` (the csv
    module would write Python's ``True``/``False``); None stays an empty cell."""
    return {k: ("true" if v else "false") if isinstance(v, bool) else v for k, v in row.items()}


def csv_stream(factory: sessionmaker[Session], f: queries.JobFilter, segments: bool) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for n, row in enumerate(_all(factory, f, segments), start=1):
        writer.writerow(csv_cells(row))
        if n % 200 == 0:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def json_stream(factory: sessionmaker[Session], f: queries.JobFilter, segments: bool) -> Iterator[str]:
    yield "["
    for n, row in enumerate(_all(factory, f, segments)):
        yield ("," if n else "") + json.dumps(row)
    yield "]\n"
