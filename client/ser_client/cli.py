"""``ser submit|status|history`` (also ``ser-client submit|status|history``): the command line of the SDK.

The server is ``--server URL`` (or ``SER_URL``), the key ``--api-key KEY`` (or ``SER_API_KEY``).
These commands run on client machines: they import nothing of the server. The server's ``ser``
command registers them with ``register(sub)``; ``main()`` is the ``ser-client`` console script.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import json
import logging
import os
import secrets
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ser_client._http import DEFAULT_URL, RetryEvent
from ser_client._output import (
    JOB_COLUMNS,
    SUBMIT_COLUMNS,
    csv_text,
    describe_job,
    job_row,
    table,
    write_rows,
)
from ser_client._progress import Progress
from ser_client.client import Client
from ser_client.errors import APIConnectionError, APIStatusError, SERError, WaitTimeoutError
from ser_client.types import EMOTIONS, Job

# The file names the server takes: ser_shared.formats.EXTENSIONS, copied because this distribution
# installs without the server (tests/unit/test_formats.py keeps the two equal).
AUDIO_EXTENSIONS = (".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".m4a",
                    ".mp4", ".aac", ".webm")
EXIT_OK, EXIT_FILES_FAILED, EXIT_USAGE, EXIT_SERVER, EXIT_TIMEOUT = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130  # what a shell reports for Ctrl-C
EXIT_BROKEN_PIPE = 141  # what a shell reports for a command ended by SIGPIPE (`ser history | head`)
HISTORY_PAGE = 200  # the server's largest page
BLOCK = 1 << 20

SUBMIT_EPILOG = f"""\
Folders are searched for audio files ({" ".join(AUDIO_EXTENSIONS)}; hidden
files are skipped), with --recursive also their subfolders; files named directly are always sent. Each
request carries an Idempotency-Key made from its files' names and bytes and the options, so
running the same command again within 24 hours (after a network failure, say) returns the jobs it
created before instead of new ones; --fresh analyses the files again.

exit status:
  0  every file was accepted (and, with --wait, succeeded)
  1  some files failed (rejected by the server, or failed in analysis); they are in the output
  2  usage error: no audio files found, or an --output name that is not .csv or .json
  3  the server could not be reached or refused the request (API key, limits, bad options)
  4  --timeout passed before every job finished; the output holds what was known
  141  the output's reader stopped early (| head); the command stops quietly
"""


class CommandError(Exception):
    """A failure of the command itself (not of a request); ``str()`` is the whole message."""

    def __init__(self, message: str, exit_code: int = EXIT_SERVER) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class LocalFile:
    """A file to upload: where it is here, and the name the server is told."""

    path: Path
    name: str
    size: int


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

    Raises CommandError (usage) for a path that does not exist.
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
            raise CommandError(f"no such file or folder: {arg}", EXIT_USAGE)
        for f in more:
            if f.path.resolve() not in seen:
                seen.add(f.path.resolve())
                files.append(f)
    return files, skipped


# ---- idempotency keys ----------------------------------------------------------------------


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(BLOCK):
            digest.update(block)
    return digest.hexdigest()


def idempotency_key(files: list[LocalFile], fields: Mapping[str, str], salt: str = "") -> str:
    """The same files (names and bytes) with the same options give the same key, so a rerun replays.

    Unchanged from the first client's derivation: a rerun after upgrading still replays.
    """
    digest = hashlib.sha256(b"ser-cli-upload-v1\n" + salt.encode() + b"\n")
    for name in sorted(fields):
        digest.update(f"{name}={fields[name]}\n".encode())
    for f in files:
        digest.update(f"{f.name}\0{file_digest(f.path)}\n".encode())
    return "ser-cli-" + digest.hexdigest()


def new_salt() -> str:
    return secrets.token_hex(8)


# ---- submit --------------------------------------------------------------------------------


def _say_retry(event: RetryEvent) -> None:
    print(f"{event.error}; retrying in {event.delay_s:.1f} s ({event.attempt}/{event.max_retries})",
          file=sys.stderr, flush=True)


def _client(args: argparse.Namespace, retries: list[RetryEvent] | None = None) -> Client:
    """The SDK client of the command's options; each retry is said, and added to ``retries``."""
    def on_retry(event: RetryEvent) -> None:
        _say_retry(event)
        if retries is not None:
            retries.append(event)

    return Client(args.server, args.api_key or "", max_retries=args.retries, on_retry=on_retry)


def _fields(args: argparse.Namespace) -> dict[str, str]:
    """The upload's options. Defaults are left out (the server applies the same ones), so that an
    upload without the newer options keeps the Idempotency-Key it had before they existed."""
    fields = {"transcribe": args.transcribe}
    if args.transcribe != "none":
        fields["language"] = args.language
    if args.channels != "auto":
        fields["channels"] = args.channels
    if args.channel_labels:
        fields["channel_labels"] = args.channel_labels
    return fields


def _batches(files: list[LocalFile], size: int) -> Iterator[list[LocalFile]]:
    for start in range(0, len(files), size):
        yield files[start:start + size]


Uploaded = dict[str, tuple[LocalFile, dict[str, Any]]]


@dataclass
class Sent:
    """What ``upload_all`` did: the batches, each file with its upload answer by job id, and how
    many of the jobs an earlier run of the command had created (answers replayed for its keys)."""

    batch_ids: list[str]
    jobs: Uploaded
    reused: int = 0


def upload_all(client: Client, files: list[LocalFile], fields: dict[str, str], batch_size: int,
               salt: str, retries: list[RetryEvent] | None = None) -> Sent:
    """Upload in batches. ``retries`` (the client's retry events, as they happen) tells a replay of
    this run's own lost answer, which is no earlier run's, from one of an earlier run."""
    progress = Progress("uploading", sum(f.size for f in files), "MB")
    sent = Sent([], {})
    retries = retries if retries is not None else []
    chunks = list(_batches(files, batch_size))
    for n, chunk in enumerate(chunks, start=1):
        start = progress.value
        progress.set(start, f"batch {n}/{len(chunks)}")

        # A retried request sends its files again: the bar goes back to where this batch began.
        def moved(done: int, _total: int | None, start: int = start) -> None:
            progress.set(start + done)

        retried_before = len(retries)
        answer = client.jobs.create([(f.name, f.path) for f in chunk], transcribe=fields["transcribe"],
                                    language=fields.get("language"), channels=fields.get("channels"),
                                    channel_labels=fields.get("channel_labels"), on_progress=moved,
                                    idempotency_key=idempotency_key(chunk, fields, salt))
        if answer.replayed and not any(e.method == "POST" for e in retries[retried_before:]):
            sent.reused += len(answer.jobs)
        sent.batch_ids.append(answer.batch_id)
        # The server answers with the jobs in the order the files were sent.
        for f, job in zip(chunk, answer.jobs, strict=True):
            sent.jobs[job.id] = (f, job.to_dict() | {"batch_id": answer.batch_id})
    progress.finish()
    return sent


def wait_all(client: Client, jobs: dict[str, dict[str, Any]], timeout_s: float | None) -> bool:
    """Poll until every job is finished, updating ``jobs``; False if ``timeout_s`` passed first."""
    progress = Progress("analysing", len(jobs), "jobs")

    def polled(latest: list[Job]) -> None:
        failed = sum(1 for j in latest if j.status == "failed")
        progress.set(sum(1 for j in latest if j.finished), f"{failed} failed" if failed else "")

    try:
        found = client.jobs.wait(list(jobs), timeout=timeout_s, on_poll=polled)
        complete = True
    except WaitTimeoutError as exc:
        found, complete = exc.jobs, False
    jobs.update((j.id, j.to_dict()) for j in found)
    progress.finish()
    return complete


def _submit_rows(files: list[LocalFile], uploaded: Uploaded, latest: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
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


def _reused_notice(reused: int, total: int) -> str:
    """What a rerun says: the server gave back jobs an earlier run created, not new analyses."""
    count = f"{reused} jobs" if reused == total else f"{reused} of {total} jobs"
    return (f"already submitted: reusing {count} (the same files and options were sent within 24 h); "
            "--fresh to analyse again")


def check_output(name: str | None) -> None:
    if name and Path(name).suffix.lower() not in (".csv", ".json"):
        raise CommandError(f"--output must end in .csv or .json: {name}", EXIT_USAGE)


def _submit(args: argparse.Namespace) -> int:
    check_output(args.output)
    files, skipped = find_files(args.paths, args.recursive)
    if skipped:
        kinds = ", ".join(sorted({p.suffix.lower() or "no extension" for p in skipped}))
        print(f"skipped {len(skipped)} file{'s' if len(skipped) != 1 else ''} not named as audio ({kinds}; "
              f"audio is {' '.join(AUDIO_EXTENSIONS)})", file=sys.stderr)
    if not files:
        raise CommandError("no audio files found" + ("" if args.recursive else " (subfolders need --recursive)"),
                           EXIT_USAGE)
    retries: list[RetryEvent] = []
    with _client(args, retries) as client:
        # A cheap authenticated read first: a missing key or a wrong URL is reported before megabytes are sent.
        client.jobs.page(page_size=1)
        sent = upload_all(client, files, _fields(args), args.batch_size, new_salt() if args.fresh else "", retries)
        batch_ids, uploaded = sent.batch_ids, sent.jobs
        latest = {job_id: job for job_id, (_, job) in uploaded.items()}
        if sent.reused:
            print(_reused_notice(sent.reused, len(uploaded)), file=sys.stderr)
        batches = f"{len(batch_ids)} batch" + ("es" if len(batch_ids) > 1 else "")
        print(f"{len(files)} files in {batches}: {', '.join(batch_ids)}", file=sys.stderr)
        complete = True
        if args.wait:
            try:
                complete = wait_all(client, latest, args.timeout)
            except KeyboardInterrupt:
                print(f"\ninterrupted; the jobs go on on the server (ser history --batch {batch_ids[0]})",
                      file=sys.stderr)
                return EXIT_INTERRUPTED
    rows = _submit_rows(files, uploaded, latest)
    _report(rows, args)
    if not complete:
        print(f"--timeout {args.timeout:g} s passed with jobs still running", file=sys.stderr)
        return EXIT_TIMEOUT
    return EXIT_FILES_FAILED if any(r["status"] == "failed" for r in rows) else EXIT_OK


# ---- status and history --------------------------------------------------------------------


def _status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.jobs.get(args.job).to_dict()
    print(json.dumps(job, indent=2) if args.json else describe_job(job))
    return EXIT_OK


def history(client: Client, filters: dict[str, Any], limit: int, page_size: int = HISTORY_PAGE) -> list[dict[str, Any]]:
    """Up to ``limit`` jobs as the API's JSON, newest first, following the keyset cursor page by page."""
    pager = client.jobs.list(page_size=min(page_size, limit), **filters)
    return [job.to_dict() for job in itertools.islice(pager, limit)]


def _history(args: argparse.Namespace) -> int:
    filters = {"status": args.status, "emotion": args.emotion, "q": args.q, "batch_id": args.batch,
               "since": args.since, "until": args.until,
               "escalation": None if args.escalation is None else args.escalation == "true"}
    with _client(args) as client:
        jobs = history(client, filters, args.limit)
    if args.json:
        print(json.dumps(jobs, indent=2))
    elif args.csv:
        sys.stdout.write(csv_text([job_row(j) for j in jobs], JOB_COLUMNS))
    else:
        print(table([job_row(j) for j in jobs],
                    ["created_at", "job_id", "status", "emotion", "confidence", "error_code", "filename"]))
    return EXIT_OK


# ---- failures ------------------------------------------------------------------------------


def explain(exc: SERError, args: argparse.Namespace) -> str:
    """The message to show for a failed request, with what to do about it."""
    if isinstance(exc, APIConnectionError):
        return f"{exc}. Is it running? Point to it with --server URL or the SER_URL environment variable."
    if not isinstance(exc, APIStatusError):
        return str(exc)
    if exc.status == 401:
        if not args.api_key:
            return (f"the server requires an API key ({exc}): pass --api-key KEY or set SER_API_KEY "
                    "(an administrator creates one with 'ser keys create --name NAME')")
        return f"the API key was not accepted: it is invalid or revoked ({exc})"
    if exc.status == 429:
        wait = f"; the server asks to wait {exc.retry_after:.0f} s" if exc.retry_after is not None else ""
        return f"rate limited by the server ({exc.code}): {exc}{wait}"
    if exc.status == 413 or exc.code == "too_many_files":
        return f"{exc} ({exc.code}): send fewer files per request with --batch-size"
    if exc.status == 404 and exc.code != "not_found":
        return f"{args.server.rstrip('/')} answered 404 ({exc}); is --server the base URL of a SER server?"
    return f"{exc} ({exc.code}, HTTP {exc.status})"


# ---- wiring --------------------------------------------------------------------------------


Command = Callable[[argparse.Namespace], int]


def stdout_closed() -> int:
    """The reader of stdout went away (``ser history --json | head``): stop quietly, as the Python
    docs advise (signal module, "Note on SIGPIPE"), with the status a shell gives SIGPIPE."""
    # Python flushes stdout once more at exit; pointed at devnull, that flush cannot fail again.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return EXIT_BROKEN_PIPE


def _run(func: Command, args: argparse.Namespace) -> int:
    """Run a client command; a failure becomes one clear line on stderr and an exit status."""
    try:
        code = func(args)
        sys.stdout.flush()  # inside the try: a closed pipe shows here, not in the flush at exit
        return code
    except BrokenPipeError:
        return stdout_closed()
    except CommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except SERError as exc:
        print(f"error: {explain(exc, args)}", file=sys.stderr)
        return EXIT_SERVER
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
                        help="retries of a request after a connection error, 408, 429, 5xx or an upload "
                             "still in progress (default 4)")
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
    p.add_argument("--transcribe", choices=["none", "whisper", "google", "sphinx"], default="none",
                   help="also transcribe the speech with this engine (whisper: offline)")
    p.add_argument("--language", default="en-US", help="transcript language, BCP-47 (default en-US)")
    p.add_argument("--channels", choices=["auto", "mix", "split"], default="auto",
                   help="a recording's channels: one speaker each (split), mixed to one (mix), or split when "
                        "they carry different signals (auto, the default)")
    p.add_argument("--channel-labels", metavar="LABELS",
                   help="the speakers' names, first channel first, comma-separated (e.g. agent,customer)")
    p.add_argument("--batch-size", type=_positive, default=100, metavar="N",
                   help="files per upload request (default 100)")
    p.add_argument("--wait", action="store_true", help="wait until every job has finished")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="with --wait: give up after this many seconds")
    p.add_argument("--output", "-o", metavar="FILE", help="write one row per file to FILE.csv or FILE.json")
    p.add_argument("--fresh", action="store_true", help="analyse again files this command already sent")
    p.set_defaults(func=_command(_submit), client=True)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``submit``, ``status`` and ``history`` to a command's subparsers (the server's ``ser`` uses this)."""
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
    p.add_argument("--escalation", choices=["true", "false"],
                   help="only conversations whose customer escalated (true) or did not (false)")
    p.add_argument("--since", help="created at or after (ISO 8601)")
    p.add_argument("--until", help="created before (ISO 8601)")
    p.add_argument("--limit", type=_positive, default=50, metavar="N", help="at most this many jobs (default 50)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="the API's JSON for each job")
    out.add_argument("--csv", action="store_true", help="one CSV row per job")
    p.set_defaults(func=_command(_history), client=True)


def build_parser(prog: str = "ser-client") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Client of a SER speech emotion recognition server.")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``ser-client`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
