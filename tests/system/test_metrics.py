"""What operators see: both tiers' Prometheus metrics, scraped over HTTP during a real batch and
checked against the database, and the JSON log lines both tiers write.

The web tier runs as ``ser web`` runs it (gunicorn, two workers, multiprocess metrics), the worker
as ``ser worker`` (prefork: the pool child counts, the main process serves).
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from ser_shared.db import make_engine, make_session_factory
from ser_shared.models import Job, WebhookDelivery
from ser_shared.settings import Settings
from tests.conftest import WorkerProcess, private_database, ravdess_file, wait_for
from tests.fault_tools import RedisServer
from tests.proxy_tools import Gunicorn, free_port

pytestmark = pytest.mark.slow

TOKEN = "metrics-test-token"
QUEUE = "cpu"
GOOD = [(1, "05"), (2, "03"), (3, "04"), (4, "01")]
REQUEST_ID = "req-metrics-test-0001"


@dataclass
class Stack:
    settings: Settings
    web: Gunicorn
    worker: WorkerProcess
    worker_port: int
    batch: dict[str, object]
    during: dict[str, dict]  # type: ignore[type-arg]  # scrapes taken while the batch was running
    hooks: list[bytes] = field(default_factory=list)  # webhook bodies the receiver got


class Hooks:
    """A webhook receiver that answers 204 to every POST and keeps the bodies."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        bodies = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                bodies.append(self.rfile.read(int(self.headers.get("content-length", 0))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"


def _request(url: str, *, data: bytes | None = None, headers: dict[str, str] | None = None
             ) -> tuple[int, bytes, dict[str, str]]:
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def _multipart(files: list[tuple[str, bytes]], **fields: str) -> tuple[bytes, str]:
    boundary = "metricsboundary7d3"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in fields.items()]
    parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
             f"Content-Type: application/octet-stream\r\n\r\n".encode() + body + b"\r\n" for name, body in files]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@pytest.fixture(scope="module")
def stack(pg_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("metrics")
    # A broker of its own: the session's shared worker must take none of these jobs or webhooks,
    # and this worker none of other tests' messages.
    broker = RedisServer(workdir)
    broker.start()
    with private_database(pg_settings, broker_url=broker.url) as settings:
        env = {"SER_METRICS_TOKEN": TOKEN, "SER_LOG_FORMAT": "json"}
        port = free_port()
        worker = WorkerProcess(settings, workdir / "worker.log", env | {"SER_WORKER_METRICS_PORT": str(port)})
        web = Gunicorn(settings, workdir, env, workers=2)
        hooks = Hooks()
        try:
            worker.wait_ready()
            base = f"http://127.0.0.1:{web.port}"
            body, ctype = _multipart([(p.name, p.read_bytes()) for p in (ravdess_file(a, e) for a, e in GOOD)]
                                     + [("notes.wav", b"not audio at all\n" * 40)], webhook_url=hooks.url,
                                     transcribe="sphinx")
            status, raw, _ = _request(f"{base}/api/v1/jobs", data=body,
                                      headers={"Content-Type": ctype, "X-Request-ID": REQUEST_ID})
            assert status == 202, raw
            batch_id = json.loads(raw)["batch_id"]
            # While the batch runs: both endpoints answer, and the upload is counted already (the
            # web tier counts before it answers).
            during = {"web": _scrape(f"{base}/metrics", TOKEN), "worker": _scrape(f"http://127.0.0.1:{port}/metrics")}
            # A whole upload refused: no file at all.
            empty, ectype = _multipart([])
            assert _request(f"{base}/api/v1/jobs", data=empty, headers={"Content-Type": ectype})[0] == 400

            def finished() -> dict[str, object] | None:
                got = json.loads(_request(f"{base}/api/v1/batches/{batch_id}")[1])
                # Done, transcripts too (they follow the emotions).
                owed = [j for j in got["jobs"] if ((j["result"] or {}).get("transcript") or {}).get("status")
                        in (None, "pending") and j["status"] == "succeeded"]
                return got if got["done"] and not owed else None

            batch = wait_for(finished, 240)
            factory = make_session_factory(make_engine(settings))

            def delivered() -> bool:
                with factory() as session:
                    return not session.scalar(select(func.count()).where(WebhookDelivery.status == "pending"))

            wait_for(delivered, 120)
            yield Stack(settings, web, worker, port, batch, during, hooks.bodies)
        finally:
            hooks.server.shutdown()
            web.stop()
            worker.stop()
            broker.kill()


def _scrape(url: str, token: str | None = None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, raw, _ = _request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    assert status == 200, raw
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(raw.decode()) for s in family.samples}


def _value(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return float(samples.get((name, tuple(sorted(labels.items()))), 0.0))


def test_web_metrics_count_what_was_sent(stack: Stack) -> None:
    web = _scrape(f"http://127.0.0.1:{stack.web.port}/metrics", TOKEN)
    assert _value(web, "ser_uploads_total", outcome="accepted", code="") == 1
    assert _value(web, "ser_uploads_total", outcome="refused", code="no_files") == 1
    assert _value(web, "ser_upload_files_total", outcome="accepted", code="") == len(GOOD)
    assert _value(web, "ser_upload_files_total", outcome="refused", code="unsupported_format") == 1
    assert _value(web, "ser_http_requests_total", method="POST", route="/api/v1/jobs", status="202") == 1
    assert _value(web, "ser_http_requests_total", method="POST", route="/api/v1/jobs", status="400") == 1
    # Polls are counted by template, never by batch id (one series per route).
    polls = _value(web, "ser_http_requests_total", method="GET", route="/api/v1/batches/<batch_id>", status="200")
    assert polls >= 1
    assert not any(str(stack.batch["id"]) in dict(labels).get("route", "") for _, labels in web)
    assert _value(web, "ser_http_request_duration_seconds_count", method="POST", route="/api/v1/jobs") == 2


def test_scrapes_during_the_batch(stack: Stack) -> None:
    assert _value(stack.during["web"], "ser_uploads_total", outcome="accepted", code="") == 1
    assert _value(stack.during["web"], "ser_upload_files_total", outcome="accepted", code="") == len(GOOD)
    assert ("ser_queue_depth", (("queue", QUEUE),)) in stack.during["worker"]
    assert sum(v for (name, _), v in stack.during["worker"].items() if name == "ser_jobs_finished_total") <= len(GOOD)


def test_metrics_need_the_token_when_set(stack: Stack) -> None:
    url = f"http://127.0.0.1:{stack.web.port}/metrics"
    status, _, headers = _request(url)
    assert status == 401 and headers.get("WWW-Authenticate", "").startswith("Bearer")
    assert _request(url, headers={"Authorization": "Bearer wrong"})[0] == 401
    status, body, headers = _request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and b"ser_http_requests_total" in body
    assert headers.get("X-Content-Type-Options") == "nosniff"  # the security headers stay


def test_worker_metrics_match_the_database(stack: Stack) -> None:
    worker = _scrape(f"http://127.0.0.1:{stack.worker_port}/metrics")
    factory = make_session_factory(make_engine(stack.settings))
    with factory() as session:
        # Jobs the worker finished: the file refused at upload never reached it.
        rows = session.execute(select(Job.status, Job.error_code, func.count())
                               .where(Job.started_at.is_not(None)).group_by(Job.status, Job.error_code)).all()
        refused_at_upload = session.scalar(select(func.count()).where(Job.started_at.is_(None),
                                                                      Job.status == "failed"))
    in_db = {(status, code or ""): n for status, code, n in rows}
    counted = {(dict(labels)["status"], dict(labels)["error_code"]): v
               for (name, labels), v in worker.items() if name == "ser_jobs_finished_total"}
    assert in_db == {("succeeded", ""): len(GOOD)}
    assert {k: v for k, v in counted.items() if v} == in_db
    assert refused_at_upload == 1
    for stage in ("decode", "features", "inference", "transcript"):
        assert _value(worker, "ser_stage_duration_seconds_count", stage=stage) == len(GOOD), stage
    assert _value(worker, "ser_chunk_recordings_sum") == len(GOOD)
    assert (("ser_queue_depth", (("queue", QUEUE),))) in worker
    assert _value(worker, "ser_queue_depth", queue=QUEUE) == 0  # all done


def test_webhook_deliveries_match_the_database_and_the_receiver(stack: Stack) -> None:
    worker = _scrape(f"http://127.0.0.1:{stack.worker_port}/metrics")
    factory = make_session_factory(make_engine(stack.settings))
    with factory() as session:
        by_status = dict(session.execute(select(WebhookDelivery.status, func.count())
                                         .group_by(WebhookDelivery.status)).all())
    # One event per job (the refused file's included) and batch.completed, each delivered at its
    # first attempt: the receiver got every one once.
    assert len(stack.hooks) == len(GOOD) + 2
    assert by_status == {"delivered": len(stack.hooks)}
    assert _value(worker, "ser_webhook_deliveries_total", outcome="delivered") == len(stack.hooks)
    assert _value(worker, "ser_webhook_deliveries_total", outcome="pending") == 0


def _json_lines(path: Path) -> list[dict[str, object]]:
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))  # a line that starts as JSON must be one whole object
    return lines


def test_logs_are_json_with_their_context(stack: Stack) -> None:
    batch_id = str(stack.batch["id"])
    web = _json_lines(stack.web.log_path)
    created = [r for r in web if str(r.get("message", "")).startswith("batch created")]
    assert len(created) == 1 and created[0]["request_id"] == REQUEST_ID and created[0]["level"] == "INFO"
    worker = _json_lines(stack.worker.log_path)
    analysed = [r for r in worker if str(r.get("message", "")).startswith("analysed")]
    assert analysed and all(r["batch_id"] == batch_id and r["tenant"] for r in analysed)
