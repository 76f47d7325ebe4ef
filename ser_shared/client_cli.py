"""``ser submit|status|history``: the command-line client of a running SER server.

The server is ``--server URL`` (or ``SER_URL``), the key ``--api-key KEY`` (or ``SER_API_KEY``).
Neither is a ``Settings`` field: these commands run on client machines and never read the
server's configuration.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from ser_shared.client import API, DEFAULT_URL, Api, ClientError, LocalFile, explain, idempotency_key, new_salt
from ser_shared.emotions import EMOTIONS

AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac", ".webm"})
EXIT_OK, EXIT_FILES_FAILED, EXIT_USAGE, EXIT_SERVER, EXIT_TIMEOUT = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130  # what a shell reports for Ctrl-C
JOB_COLUMNS = ["job_id", "batch_id", "filename", "status", "created_at", "finished_at", "emotion", "confidence",
               "uncertain", *[f"p_{e}" for e in EMOTIONS], "error_code", "error_message", "transcript"]
SUBMIT_COLUMNS = ["path", *JOB_COLUMNS]
FINISHED = ("succeeded", "failed")
HISTORY_PAGE = 200  # the server's largest page

SUBMIT_EPILOG = """\
Folders are searched for audio (.wav .flac .mp3 .ogg .opus .m4a .aac .webm; hidden files are
skipped), with --recursive also their subfolders; files named directly are always sent. Each
request carries an Idempotency-Key made from its files' names and bytes and the options, so
running the same command again within 24 hours (after a network failure, say) returns the jobs it
created before instead of new ones; --fresh analyses the files again.

exit status:
  0  every file was accepted (and, with --wait, succeeded)
  1  some files failed (rejected by the server, or failed in analysis); they are in the output
  2  usage error: no audio files found, or an --output name that is not .csv or .json
  3  the server could not be reached or refused the request (API key, limits, bad options)
  4  --timeout passed before every job finished; the output holds what was known
"""


# ---- finding files -------------------------------------------------------------------------


def _folder_files(root: Path, recursive: bool) -> tuple[list[LocalFile], list[Path]]:
    found, skipped = [], []
    for path in sorted(root.rglob("*") if recursive else root.iterdir()):
        # Hidden files are skipped: macOS leaves "._name.wav" resource forks beside every recording.
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        if path.suffix.lower() not in AUDIO_EXTENSIONS:
            skipped.append(path)
            continue
        # The folder's own name and the path below it: enough to tell files apart, nothing of this machine.
        name = (Path(root.resolve().name) / path.relative_to(root)).as_posix()
        found.append(LocalFile(path, name, path.stat().st_size))
    return found, skipped


def find_files(paths: list[str], recursive: bool) -> tuple[list[LocalFile], list[Path]]:
    """Audio files under ``paths`` (each once, in a stable order), and the non-audio files skipped.

    Raises ClientError (usage) for a path that does not exist.
    """
    files: list[LocalFile] = []
    skipped: list[Path] = []
    seen: set[Path] = set()
    for arg in paths:
        path = Path(arg)
        if path.is_dir():
            more, skip = _folder_files(path, recursive)
            skipped += skip
        elif path.is_file():
            more = [LocalFile(path, path.name, path.stat().st_size)]
        else:
            raise ClientError(f"no such file or folder: {arg}", EXIT_USAGE)
        for f in more:
            if f.path.resolve() not in seen:
                seen.add(f.path.resolve())
                files.append(f)
    return files, skipped


# ---- progress ------------------------------------------------------------------------------


class Progress:
    """A one-line bar on a terminal; elsewhere (logs, CI) a plain line every few seconds."""

    def __init__(self, label: str, total: int, unit: str, stream: TextIO | None = None, every_s: float = 5.0):
        self.label, self.total, self.unit = label, max(total, 1), unit
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every_s = every_s if not self.tty else 0.1
        self.value = 0
        self.note = ""
        self.last = 0.0
        self.drawn = ""

    def set(self, value: int, note: str = "") -> None:
        self.value, self.note = min(value, self.total), note
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self._draw()

    def advance(self, n: int) -> None:
        self.set(self.value + n, self.note)

    def _fmt(self, value: int) -> str:
        return f"{value / 1e6:.1f}" if self.unit == "MB" else str(value)

    def _line(self) -> str:
        share = self.value / self.total
        bar = "#" * int(share * 30) + "-" * (30 - int(share * 30))
        note = f"  {self.note}" if self.note else ""
        return (f"{self.label} [{bar}] {share * 100:3.0f}%  {self._fmt(self.value)}/{self._fmt(self.total)} "
                f"{self.unit}{note}")

    def _draw(self) -> None:
        self.drawn = self._line()
        if self.tty:
            self.stream.write("\r" + self.drawn + "\033[K")
        else:
            self.stream.write(self.drawn + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self._line() != self.drawn:
            self._draw()
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ---- rows and output -----------------------------------------------------------------------


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


def check_output(name: str | None) -> None:
    if name and Path(name).suffix.lower() not in (".csv", ".json"):
        raise ClientError(f"--output must end in .csv or .json: {name}", EXIT_USAGE)


def csv_text(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
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


# ---- submit --------------------------------------------------------------------------------


def _api(args: argparse.Namespace) -> Api:
    return Api(args.server, args.api_key, retries=args.retries)


def _fields(args: argparse.Namespace) -> dict[str, str]:
    fields = {"transcribe": args.transcribe}
    if args.transcribe != "none":
        fields["language"] = args.language
    return fields


def _batches(files: list[LocalFile], size: int) -> Iterator[list[LocalFile]]:
    for start in range(0, len(files), size):
        yield files[start:start + size]


def upload_all(api: Api, files: list[LocalFile], fields: dict[str, str], batch_size: int,
               salt: str) -> tuple[list[str], dict[str, tuple[LocalFile, dict[str, Any]]]]:
    """Upload in batches; returns the batch ids and, by job id, each file with its upload answer."""
    progress = Progress("uploading", sum(f.size for f in files), "MB")
    batch_ids: list[str] = []
    jobs: dict[str, tuple[LocalFile, dict[str, Any]]] = {}
    chunks = list(_batches(files, batch_size))
    for n, chunk in enumerate(chunks, start=1):
        progress.note = f"batch {n}/{len(chunks)}"
        # A retried request sends its files again: the bar goes back to where this batch began.
        rewind = functools.partial(progress.set, progress.value, progress.note)
        body = api.upload(chunk, fields, idempotency_key(chunk, fields, salt), sent=progress.advance, rewind=rewind)
        batch_ids.append(body["batch_id"])
        # The server answers with the jobs in the order the files were sent.
        for f, job in zip(chunk, body["jobs"], strict=True):
            jobs[job["id"]] = (f, job | {"batch_id": body["batch_id"]})
    progress.finish()
    return batch_ids, jobs


def _finished(job: dict[str, Any]) -> bool:
    """Finished, and no transcript still on its way (the transcript is a stage after the emotion)."""
    transcript = (job.get("result") or {}).get("transcript") or {}
    return job.get("status") in FINISHED and transcript.get("status") != "pending"


def wait_all(api: Api, batch_ids: list[str], jobs: dict[str, dict[str, Any]], timeout_s: float | None) -> bool:
    """Poll the batches until every job is finished, updating ``jobs``; False if ``timeout_s`` passed first."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    progress = Progress("analysing", len(jobs), "jobs")
    pending = list(batch_ids)
    interval = 0.5
    while True:
        for batch_id in list(pending):
            for job in api.get(f"{API}/batches/{batch_id}")["jobs"]:
                jobs[job["id"]] = job
            if all(_finished(j) for j in jobs.values() if j.get("batch_id") == batch_id):
                pending.remove(batch_id)
        done = sum(1 for j in jobs.values() if _finished(j))
        failed = sum(1 for j in jobs.values() if j.get("status") == "failed")
        progress.set(done, f"{failed} failed" if failed else "")
        if not pending:
            progress.finish()
            return True
        if deadline is not None and time.monotonic() >= deadline:
            progress.finish()
            return False
        sleep = interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic()))
        time.sleep(sleep)
        interval = min(interval * 1.5, 5.0)


def _submit_rows(files: list[LocalFile], uploaded: dict[str, tuple[LocalFile, dict[str, Any]]],
                 latest: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    by_path = {f.path: (job_id, job) for job_id, (f, job) in uploaded.items()}
    rows = []
    for f in files:
        job_id, job = by_path[f.path]
        rows.append({"path": str(f.path), **job_row(latest.get(job_id, job))})
    return rows


def _report(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    if args.output:
        write_rows(rows, SUBMIT_COLUMNS, Path(args.output))
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        print(f"wrote {len(rows)} rows to {args.output} ({summary})", file=sys.stderr)
    elif args.wait:
        print(table(rows, ["job_id", "status", "emotion", "confidence", "error_code", "path"]))
    else:
        print(table(rows, ["job_id", "status", "error_code", "path"]))


def _submit(args: argparse.Namespace) -> int:
    check_output(args.output)
    files, skipped = find_files(args.paths, args.recursive)
    if skipped:
        print(f"skipped {len(skipped)} files that are not audio (by extension)", file=sys.stderr)
    if not files:
        raise ClientError("no audio files found" + ("" if args.recursive else " (subfolders need --recursive)"),
                          EXIT_USAGE)
    api = _api(args)
    # A cheap authenticated read first: a missing key or a wrong URL is reported before megabytes are sent.
    api.get(f"{API}/jobs", {"limit": 1})
    batch_ids, uploaded = upload_all(api, files, _fields(args), args.batch_size, new_salt() if args.fresh else "")
    latest = {job_id: job for job_id, (_, job) in uploaded.items()}
    batches = f"{len(batch_ids)} batch" + ("es" if len(batch_ids) > 1 else "")
    print(f"{len(files)} files in {batches}: {', '.join(batch_ids)}", file=sys.stderr)
    complete = True
    if args.wait:
        try:
            complete = wait_all(api, batch_ids, latest, args.timeout)
        except KeyboardInterrupt:
            print(f"\ninterrupted; the jobs go on on the server (ser history --batch {batch_ids[0]})", file=sys.stderr)
            return EXIT_INTERRUPTED
    rows = _submit_rows(files, uploaded, latest)
    _report(rows, args)
    if not complete:
        print(f"--timeout {args.timeout:g} s passed with jobs still running", file=sys.stderr)
        return EXIT_TIMEOUT
    return EXIT_FILES_FAILED if any(r["status"] == "failed" for r in rows) else EXIT_OK


# ---- status and history --------------------------------------------------------------------


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


def _status(args: argparse.Namespace) -> int:
    job = _api(args).get(f"{API}/jobs/{args.job}")
    print(json.dumps(job, indent=2) if args.json else describe_job(job))
    return EXIT_OK


def history(api: Api, filters: dict[str, Any], limit: int, page_size: int = HISTORY_PAGE) -> list[dict[str, Any]]:
    """Up to ``limit`` jobs, newest first, following the server's keyset cursor page by page."""
    jobs: list[dict[str, Any]] = []
    cursor = None
    while len(jobs) < limit:
        page = api.get(f"{API}/jobs", {**filters, "limit": min(page_size, limit - len(jobs)), "cursor": cursor})
        jobs += page["jobs"]
        cursor = page.get("next_cursor")
        if not cursor:
            break
    return jobs


def _history(args: argparse.Namespace) -> int:
    filters = {"status": args.status, "emotion": args.emotion, "q": args.q, "batch_id": args.batch,
               "since": args.since, "until": args.until}
    jobs = history(_api(args), filters, args.limit)
    if args.json:
        print(json.dumps(jobs, indent=2))
    elif args.csv:
        sys.stdout.write(csv_text([job_row(j) for j in jobs], JOB_COLUMNS))
    else:
        print(table([job_row(j) for j in jobs],
                    ["created_at", "job_id", "status", "emotion", "confidence", "error_code", "filename"]))
    return EXIT_OK


# ---- wiring --------------------------------------------------------------------------------


Command = Callable[[argparse.Namespace], int]


def _run(func: Command, args: argparse.Namespace) -> int:
    """Run a client command; a failure becomes one clear line on stderr and an exit status."""
    try:
        return func(args)
    except ClientError as exc:
        print(f"error: {explain(exc, _api(args))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _command(func: Command) -> Command:
    return functools.partial(_run, func)


def _connection_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--server", metavar="URL", default=os.environ.get("SER_URL") or DEFAULT_URL,
                        help=f"base URL of the SER server (env SER_URL; default {DEFAULT_URL})")
    common.add_argument("--api-key", metavar="KEY", default=os.environ.get("SER_API_KEY") or None,
                        help="API key, sent as 'Authorization: Bearer KEY' (env SER_API_KEY)")
    common.add_argument("--retries", type=int, default=4, metavar="N",
                        help="retries of a request after a connection error, 502/503/504 or 429 (default 4)")
    return common


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return number


def _add_submit(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("submit", parents=[common], help="upload recordings or folders for analysis",
                       epilog=SUBMIT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH", help="audio files or folders")
    p.add_argument("--recursive", "-r", action="store_true", help="search folders' subfolders too")
    p.add_argument("--transcribe", choices=["none", "google", "sphinx"], default="none")
    p.add_argument("--language", default="en-US", help="transcript language, BCP-47 (default en-US)")
    p.add_argument("--batch-size", type=_positive, default=100, metavar="N",
                   help="files per upload request (default 100)")
    p.add_argument("--wait", action="store_true", help="wait until every job has finished")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="with --wait: give up after this many seconds")
    p.add_argument("--output", "-o", metavar="FILE", help="write one row per file to FILE.csv or FILE.json")
    p.add_argument("--fresh", action="store_true", help="analyse again files this command already sent")
    p.set_defaults(func=_command(_submit), client=True)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    common = _connection_options()
    _add_submit(sub, common)

    p = sub.add_parser("status", parents=[common], help="show one job's status and result")
    p.add_argument("job", help="job id")
    p.add_argument("--json", action="store_true", help="the API's JSON for the job")
    p.set_defaults(func=_command(_status), client=True)

    p = sub.add_parser("history", parents=[common], help="list jobs, newest first")
    p.add_argument("--status", choices=["queued", "processing", "succeeded", "failed"])
    p.add_argument("--emotion", choices=list(EMOTIONS))
    p.add_argument("--q", help="file name contains")
    p.add_argument("--batch", help="only this batch's jobs")
    p.add_argument("--since", help="created at or after (ISO 8601)")
    p.add_argument("--until", help="created before (ISO 8601)")
    p.add_argument("--limit", type=_positive, default=50, metavar="N", help="at most this many jobs (default 50)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="the API's JSON for each job")
    out.add_argument("--csv", action="store_true", help="one CSV row per job")
    p.set_defaults(func=_command(_history), client=True)
