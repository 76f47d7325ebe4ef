"""Webhooks: Standard Webhooks signatures, the SSRF guard, and delivery by a real worker to a
real local receiver (retries with growing delays, de-duplicable ids, attempts visible in the API)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from ser_shared import webhooks
from ser_shared.db import make_engine, make_session_factory
from ser_shared.errors import BadRequest
from ser_shared.models import Batch, Job, WebhookDelivery
from ser_shared.settings import Settings
from tests.conftest import WorkerProcess, private_database, ravdess_file, wait_for
from tests.helpers import multipart, read
from worker import webhooks as worker_webhooks


def verify(secret: str, headers: dict[str, str], body: bytes, tolerance_s: int = 300) -> bool:
    """A receiver's check, written from the Standard Webhooks specification (not our code)."""
    msg_id, timestamp = headers["webhook-id"], headers["webhook-timestamp"]
    if abs(time.time() - int(timestamp)) > tolerance_s:
        return False
    key = base64.b64decode(secret.split("_", 1)[1])
    expected = base64.b64encode(hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256)
                                .digest()).decode()
    return any(hmac.compare_digest(sig.split(",", 1)[1], expected)
               for sig in headers["webhook-signature"].split() if sig.startswith("v1,"))


class Receiver:
    """An HTTP endpoint on 127.0.0.1 that answers from a script of status codes per event type."""

    def __init__(self) -> None:
        self.script: dict[str, list[int]] = {}
        self.calls: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                planned = receiver.script.get(json.loads(body)["type"], [])
                status = planned.pop(0) if planned else 200
                head = {k.lower(): v for k, v in self.headers.items()}
                receiver.calls.append({"at": time.monotonic(), "headers": head, "body": body, "status": status})
                self.send_response(status)
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [c for c in self.calls if json.loads(c["body"])["type"] == kind]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


def test_signature_matches_the_specification_example() -> None:
    # The worked example of the Standard Webhooks reference libraries.
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    key = base64.b64decode(secret.removeprefix("whsec_"))
    assert webhooks.sign(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == \
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


@pytest.mark.parametrize("url", ["http://127.0.0.1/x", "http://localhost:8000/", "http://10.1.2.3/",
                                 "http://192.168.0.10/", "http://169.254.169.254/latest/meta-data/",
                                 "http://[::1]/", "http://0.0.0.0/", "ftp://example.com/", "not a url",
                                 "http://no-such-host.invalid/"])
def test_ssrf_guard_refuses_private_and_odd_urls(url: str) -> None:
    with pytest.raises(BadRequest) as err:
        webhooks.check_url(url, Settings(env="test"))
    assert err.value.code == "webhook_url_refused"


def test_allowlist_admits_named_hosts_and_networks() -> None:
    assert webhooks.check_url("http://127.0.0.1:9/x", Settings(env="test", webhook_allow="127.0.0.0/8"))
    assert webhooks.check_url("http://localhost/x", Settings(env="test", webhook_allow="localhost"))
    assert webhooks.check_url("http://93.184.216.34/", Settings(env="test")) == "http://93.184.216.34/"


def test_a_hanging_dns_lookup_is_cut_off_at_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """An upload with a webhook waits for DNS at most ``SER_WEBHOOK_DNS_TIMEOUT_S``. The resolver is
    replaced by one that hangs for one name, since no test can make a real DNS server stall."""
    real = socket.getaddrinfo

    def hanging(host: str, *args: Any, **kwargs: Any) -> Any:
        if host == "stalls.example":
            time.sleep(5)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", hanging)
    settings = Settings(env="test", webhook_dns_timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(webhooks.HostUnresolved) as err:
        webhooks.check_url("https://stalls.example/hook", settings)
    assert time.monotonic() - started < 2
    assert err.value.code == "webhook_url_refused" and "within 0.3 s" in err.value.message
    # Other lookups are not stuck behind the hanging one.
    assert webhooks.check_url("http://93.184.216.34/", settings) == "http://93.184.216.34/"


def test_an_unresolvable_host_is_retried_by_the_worker_not_given_up(pg_settings: Settings) -> None:
    """At delivery time a name that does not resolve is a failed attempt (DNS outages pass),
    unlike a host that resolves to a private address, which is refused for good."""
    with private_database(pg_settings) as settings:
        factory = make_session_factory(make_engine(settings))
        ids = {}
        for name, url in (("dns", "http://no-such-host.invalid/hook"), ("private", "http://10.1.2.3/hook")):
            with factory() as session:
                batch = Batch(id=uuid.uuid4(), file_count=1, options={}, webhook_url=url)
                job = Job(id=uuid.uuid4(), batch_id=batch.id, filename="a.wav", status="failed", options={},
                          error_code="silent_audio", finished_at=datetime.now(UTC))
                session.add_all([batch, job])
                ids[name] = webhooks.record_events(session, [job.id])[0]
                session.commit()
        assert worker_webhooks.deliver(factory, settings, ids["dns"]) is not None  # a delay: tried again later
        assert worker_webhooks.deliver(factory, settings, ids["private"]) is None
        with factory() as session:
            dns, private = session.get(WebhookDelivery, ids["dns"]), session.get(WebhookDelivery, ids["private"])
            assert dns is not None and private is not None
            assert dns.status == "pending" and dns.next_attempt_at is not None
            assert "does not resolve" in dns.attempts[0]["error"]
            assert private.status == "failed" and "non-public" in private.attempts[0]["error"]
        factory.kw["bind"].dispose()


def test_refused_url_is_a_400_at_submission(client) -> None:  # type: ignore[no-untyped-def]
    resp = client.post("/api/v1/jobs", data=multipart([read(ravdess_file(1, "05"))],
                                                      webhook_url="http://169.254.169.254/"),
                       content_type="multipart/form-data")
    assert resp.status_code == 400 and resp.get_json()["error"]["code"] == "webhook_url_refused"


def test_events_are_signed_retried_with_growing_delays_and_recorded(
        client, pg_worker: WorkerProcess, pg_settings: Settings, receiver: Receiver) -> None:  # type: ignore[no-untyped-def]
    receiver.script = {"job.failed": [500, 503]}  # the first two attempts of that event fail
    files = [read(ravdess_file(7, "05", "02")), ("notes.wav", b"this is not audio")]
    resp = client.post("/api/v1/jobs", data=multipart(files, webhook_url=receiver.url, client_reference="ref-7"),
                       content_type="multipart/form-data")
    assert resp.status_code == 202, resp.get_data(as_text=True)
    body = resp.get_json()
    good, bad = body["jobs"]
    assert bad["status"] == "failed"
    wait_for(lambda: receiver.events("batch.completed") and receiver.events("job.succeeded")
             and len(receiver.events("job.failed")) >= 3, timeout=120)

    secret = webhooks.public_secret(pg_settings)
    assert all(verify(secret, c["headers"], c["body"]) for c in receiver.calls)
    tampered = dict(receiver.calls[-1]["headers"])
    assert not verify(secret, tampered, receiver.calls[-1]["body"] + b" ")

    # The file rejected at upload is announced first and hit the two failures: three attempts,
    # one id (receivers de-duplicate on it), and each wait longer than the one before.
    failed = receiver.events("job.failed")
    assert [c["status"] for c in failed] == [500, 503, 200]
    assert len({c["headers"]["webhook-id"] for c in failed}) == 1
    gaps = [b["at"] - a["at"] for a, b in zip(failed, failed[1:], strict=False)]
    assert gaps[0] >= 0.3 and gaps[1] > gaps[0] * 1.5, gaps
    event = json.loads(failed[0]["body"])
    assert event["data"]["job_id"] == bad["id"] and event["data"]["error"]["code"] == "unsupported_format"
    assert event["data"]["client_reference"] == "ref-7"

    done = json.loads(receiver.events("batch.completed")[0]["body"])
    assert done["data"] == {"batch_id": body["batch_id"], "file_count": 2, "counts": {"succeeded": 1, "failed": 1}}
    ok = json.loads(receiver.events("job.succeeded")[0]["body"])
    assert ok["data"]["job_id"] == good["id"] and ok["data"]["emotion"]

    # Every attempt is visible through the API, with its status code and latency.
    hooks = wait_for(lambda: [h for h in client.get(bad["url"]).get_json()["webhooks"] if h["status"] == "delivered"])
    assert [a["status_code"] for a in hooks[0]["attempts"]] == [500, 503, 200]
    assert all(a["latency_ms"] >= 0 for a in hooks[0]["attempts"])
    batch = client.get(body["batch_url"]).get_json()
    assert [h["event"] for h in batch["webhooks"]] == ["batch.completed"]
    page = client.get(f"/jobs/{bad['id']}").get_data(as_text=True)  # and on the job page
    assert "Webhooks" in page and page.count("job.failed") == 3 and "503" in page


def test_a_4xx_answer_stops_delivery(client, pg_worker: WorkerProcess, receiver: Receiver) -> None:  # type: ignore[no-untyped-def]
    receiver.script = {"job.failed": [410]}
    resp = client.post("/api/v1/jobs", data=multipart([("bad.wav", b"nope")], webhook_url=receiver.url),
                       content_type="multipart/form-data")
    job = resp.get_json()["jobs"][0]
    hooks = wait_for(lambda: [h for h in client.get(job["url"]).get_json()["webhooks"] if h["status"] == "failed"],
                     timeout=60)
    assert [a["status_code"] for a in hooks[0]["attempts"]] == [410]
    time.sleep(1.5)  # well past the next retry's time: nothing more arrives
    assert len(receiver.events("job.failed")) == 1
