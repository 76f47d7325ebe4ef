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
               "uncertain", *[f"p_{e}" for e in EMOTIONS], "error_code", "error_message", "transcript",
               "speakers", "escalation"]
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
            "transcript": transcript.get("text"), "speakers": speakers(result) or None,
            "escalation": (result.get("conversation") or {}).get("escalation")}


def speakers(result: dict[str, Any]) -> str:
    """Each speaker's label and emotion, "agent: neutral 0.71; customer: angry 0.64" ("" before conversations)."""
    parts = []
    for channel in result.get("channels") or []:
        emotion, confidence = channel.get("emotion"), channel.get("confidence")
        said = f"{emotion} {confidence:.2f}" if emotion and confidence is not None else "no speech"
        parts.append(f"{channel.get('label')}: {said}")
    return "; ".join(parts)


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
    result = job.get("result") or {}
    lines += _conversation_lines(result)
    transcript = result.get("transcript")
    if transcript:
        text = transcript.get("text") or transcript.get("reason") or ""
        how = str(transcript.get("engine"))
        if transcript.get("detected_language"):
            sure = transcript.get("detected_language_probability")
            how += f", detected {transcript['detected_language']}" + (f" {sure:.0%} sure" if sure is not None else "")
        lines.append(f"transcript  {transcript.get('status')} ({how}): {text}")
    for line in (result.get("conversation") or {}).get("transcript") or []:
        lines.append(f"  {line['start']:7.1f}s  {line['label']}: {line['text']}")
    return "\n".join(lines)


def _conversation_lines(result: dict[str, Any]) -> list[str]:
    """A conversation's speakers (emotion, talk share, words per minute) and its escalation flag."""
    conversation = result.get("conversation")
    channels = result.get("channels") or []
    if not conversation or not channels:
        return []
    lines = []
    for channel in channels:
        metrics = channel.get("metrics") or {}
        emotion = channel.get("emotion") or "no speech"
        confidence = channel.get("confidence")
        wpm = metrics.get("words_per_minute")
        lines.append(f"speaker     {channel.get('label')} (channel {channel.get('index')}): {emotion}"
                     + (f" {confidence:.2f}" if confidence is not None else "")
                     + f", talk {100 * (metrics.get('talk_share') or 0.0):.0f}%"
                     + (f", {wpm:.0f} words/min" if wpm is not None else "")
                     + (f", {len(metrics['escalations'])} escalation moment(s)" if metrics.get("escalations") else ""))
    flag = "yes" if conversation.get("escalation") else "no"
    interruptions = len(conversation.get("interruptions") or [])
    lines.append(f"escalation  {flag} ({conversation.get('turns')} turns, {interruptions} interruptions, "
                 f"silence {100 * (conversation.get('silence_share') or 0.0):.0f}%)")
    return lines
