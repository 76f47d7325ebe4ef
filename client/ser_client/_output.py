"""Rows, tables and files the command line writes: jobs as the API's JSON, flattened.

The commands print the server's JSON as it came (``status --json``, ``history --json``), so rows
are made from those dicts rather than from the typed models (whose datetimes would reformat).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from ser_client.types import EMOTIONS

JOB_COLUMNS = ["job_id", "batch_id", "filename", "status", "created_at", "finished_at", "emotion", "confidence",
               "uncertain", *[f"p_{e}" for e in EMOTIONS], "error_code", "error_message", "transcript"]
SUBMIT_COLUMNS = ["path", *JOB_COLUMNS]


def job_row(job: dict[str, Any]) -> dict[str, Any]:
    """One flat row for a job (the API's job shape, or the short shape an upload returns)."""
    result = job.get("result") or {}
    error = job.get("error") or {}
    probabilities = result.get("probabilities") or {}
    transcript = result.get("transcript") or {}
    return {"job_id": job.get("id"), "batch_id": job.get("batch_id"), "filename": job.get("filename"),
            "status": job.get("status"), "created_at": job.get("created_at"), "finished_at": job.get("finished_at"),
            "emotion": result.get("emotion"), "confidence": result.get("confidence"),
            "uncertain": result.get("uncertain"), **{f"p_{e}": probabilities.get(e) for e in EMOTIONS},
            "error_code": error.get("code"), "error_message": error.get("message"),
            "transcript": transcript.get("text")}


def csv_text(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """The rows as CSV; booleans as ``true``/``false`` (as in the JSON, and the server's export), None empty."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("true" if v else "false") if isinstance(v, bool) else v for k, v in r.items()}
                     for r in rows)
    return buffer.getvalue()


def write_rows(rows: list[dict[str, Any]], columns: list[str], dest: Path) -> None:
    if dest.suffix.lower() == ".json":
        dest.write_text(json.dumps([{c: r.get(c) for c in columns} for r in rows], indent=2) + "\n")
    else:
        dest.write_text(csv_text(rows, columns), encoding="utf-8")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Aligned columns; the last one is left ragged (paths and messages are long)."""
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def describe_job(job: dict[str, Any]) -> str:
    """A job as a few readable lines."""
    row = job_row(job)
    lines = [f"job         {row['job_id']}", f"file        {row['filename']}",
             f"status      {row['status']}" + (f" ({job.get('progress')}%)" if row["status"] == "processing" else ""),
             f"created     {row['created_at']}", f"finished    {row['finished_at'] or '-'}"]
    if row["error_code"]:
        lines.append(f"error       {row['error_code']}: {row['error_message']}")
    if row["emotion"]:
        flag = "  (uncertain)" if row["uncertain"] else ""
        lines.append(f"emotion     {row['emotion']} {row['confidence']:.2f}{flag}")
        for e in EMOTIONS:
            p = row[f"p_{e}"] or 0.0
            lines.append(f"  {e:<10}{p:5.2f} {'#' * round(p * 30)}")
    transcript = (job.get("result") or {}).get("transcript")
    if transcript:
        text = transcript.get("text") or transcript.get("reason") or ""
        lines.append(f"transcript  {transcript.get('status')} ({transcript.get('engine')}): {text}")
    return "\n".join(lines)
