"""Webhooks: Standard Webhooks signatures, the SSRF guard, and delivery by a real worker to a
real local receiver (retries with growing delays, de-duplicable ids, attempts visible in the API)."""

from __future__ import annotations

import dataclasses
import json
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from ser_shared import webhooks
from ser_shared.db import make_engine, make_session_factory
from ser_shared.errors import BadRequest
from ser_shared.models import Batch, Job, WebhookDelivery
from ser_shared.settings import Settings
from tests.conftest import WorkerProcess, private_database, ravdess_file, wait_for
from tests.helpers import multipart, read
from worker import delivery


def verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """A receiver's check, by the Standard Webhooks reference library (not our code); it also
    refuses timestamps more than five minutes away, against replays."""
    try:
        Webhook(secret).verify(body, headers)
    except WebhookVerificationError:
        return False
    return True


class Receiver:
    """An HTTP(S) endpoint that answers from a script of status codes per event type."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None) -> None:
        self.script: dict[str, list[int]] = {}
        self.calls: list[dict[str, Any]] = []
        self.redirect_to = ""
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                planned = receiver.script.get(json.loads(body)["type"], [])
                status = planned.pop(0) if planned else 200
                head = {k.lower(): v for k, v in self.headers.items()}
                receiver.calls.append({"at": time.monotonic(), "method": "POST", "path": self.path,
                                       "headers": head, "body": body, "status": status})
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", receiver.redirect_to)
                self.end_headers()

            def do_GET(self) -> None:  # noqa: N802 (a followed redirect would arrive as a GET)
                receiver.calls.append({"at": time.monotonic(), "method": "GET", "path": self.path})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"{'https' if tls else 'http'}://{host}:{self.port}/hook"

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [c for c in self.calls if c["method"] == "POST" and json.loads(c["body"])["type"] == kind]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


def test_signature_matches_the_specification_example() -> None:
    # The worked example of the Standard Webhooks reference libraries, with the secret configured
    # the way the README says (SER_WEBHOOK_SECRET=whsec_<base64>).
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    key = webhooks.secret_bytes(Settings(env="test", webhook_secret=secret))
    head = delivery.signed_headers(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
    assert head["webhook-signature"] == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    assert head["webhook-id"] == "msg_p5jXN8AQM9LWM0D4loKWxJek" and head["webhook-timestamp"] == "1614265330"
    assert head["content-type"] == "application/json"


def test_a_fresh_signature_verifies_and_a_changed_byte_does_not(tmp_path: Path) -> None:
    # No SER_WEBHOOK_SECRET nor SER_SECRET_KEY: the key derived from the data folder's own (kept out of ./var).
    settings = Settings(env="test", data_dir=tmp_path)
    body = b'{"type":"job.succeeded","data":{"emotion":"happy"}}'
    head = delivery.signed_headers(webhooks.secret_bytes(settings), "msg_1", int(time.time()), body)
    assert verify(webhooks.public_secret(settings), head, body)
    assert not verify(webhooks.public_secret(settings), head, body.replace(b"happy", b"angry"))
    assert not verify(webhooks.public_secret(Settings(env="test", secret_key="another")), head, body)
    stale = delivery.signed_headers(webhooks.secret_bytes(settings), "msg_1", int(time.time()) - 3600, body)
    assert not verify(webhooks.public_secret(settings), stale, body)  # a replay an hour later


@pytest.mark.parametrize("url", ["http://127.0.0.1/x", "http://localhost:8000/", "http://10.1.2.3/",
                                 "http://192.168.0.10/", "http://169.254.169.254/latest/meta-data/",
                                 "http://[::1]/", "http://0.0.0.0/", "ftp://example.com/", "not a url",
                                 "http://no-such-host.invalid/", "http://example.com:99999/", "http://example.com:x/"])
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
    assert time.monotonic() - started < 4  # cut off near 0.3 s, not after the 5 s hang
    assert err.value.code == "webhook_url_refused" and "within 0.3 s" in err.value.message
    # Other lookups are not stuck behind the hanging one.
    assert webhooks.check_url("http://93.184.216.34/", settings) == "http://93.184.216.34/"


def test_an_unresolvable_host_is_retried_by_the_worker_not_given_up(pg_settings: Settings) -> None:
    """At delivery time a name that does not resolve is a failed attempt (DNS outages pass),
    unlike a host that resolves to a private address, which is refused for good."""
    with private_database(pg_settings) as settings:
        factory = make_session_factory(make_engine(settings))
        ids = {name: _failed_job_event(factory, url)
               for name, url in (("dns", "http://no-such-host.invalid/hook"), ("private", "http://10.1.2.3/hook"))}
        assert delivery.deliver(factory, settings, ids["dns"]) is not None  # a delay: tried again later
        assert delivery.deliver(factory, settings, ids["private"]) is None
        with factory() as session:
            dns, private = session.get(WebhookDelivery, ids["dns"]), session.get(WebhookDelivery, ids["private"])
            assert dns is not None and private is not None
            assert dns.status == "pending" and dns.next_attempt_at is not None
            assert "does not resolve" in dns.attempts[0]["error"]
            assert private.status == "failed" and "non-public" in private.attempts[0]["error"]
        factory.kw["bind"].dispose()


@pytest.mark.parametrize("url", ["http://169.254.169.254/", "http://example.com:99999/"])  # the port was a 500
def test_refused_url_is_a_400_at_submission(client, url: str) -> None:  # type: ignore[no-untyped-def]
    resp = client.post("/api/v1/jobs", data=multipart([read(ravdess_file(1, "05"))], webhook_url=url),
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


def _failed_job_event(factory: Any, url: str) -> str:
    """A finished job of a batch with this webhook URL; returns its event's delivery id."""
    with factory() as session:
        batch = Batch(id=uuid.uuid4(), file_count=1, options={}, webhook_url=url)
        job = Job(id=uuid.uuid4(), batch_id=batch.id, filename="a.wav", status="failed", options={},
                  error_code="silent_audio", finished_at=datetime.now(UTC))
        session.add_all([batch, job])
        msg_id = webhooks.record_events(session, [job.id])[0]
        session.commit()
    return msg_id


def test_delivery_goes_to_the_address_that_was_checked_when_dns_changes(
        pg_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS rebinding: the name answers an allowed address to the check and another one after it.
    The POST must go to the checked address, and the name is looked up once per attempt. The
    resolver is replaced for that one name, since no test can run a rebinding DNS server here."""
    checked = Receiver("127.0.0.2")
    trap = Receiver("127.0.0.1", port=checked.port)  # where a second lookup would send the POST
    lookups: list[str] = []
    real = socket.getaddrinfo

    def rebinding(host: str, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != "rebind.example":
            return real(host, port, *args, **kwargs)
        lookups.append(host)
        return real("127.0.0.2" if len(lookups) == 1 else "127.0.0.1", port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    try:
        with private_database(pg_settings) as settings:
            settings = settings.model_copy(update={"webhook_allow": "127.0.0.2/32"})
            factory = make_session_factory(make_engine(settings))
            msg_id = _failed_job_event(factory, f"http://rebind.example:{checked.port}/hook?tenant=a")
            assert delivery.deliver(factory, settings, msg_id) is None
            with factory() as session:
                row = session.get(WebhookDelivery, msg_id)
                assert row is not None and row.status == "delivered"
            factory.kw["bind"].dispose()
    finally:
        checked.server.shutdown()
        trap.server.shutdown()
    assert lookups == ["rebind.example"] and trap.calls == []
    assert len(checked.calls) == 1
    assert checked.calls[0]["headers"]["host"] == f"rebind.example:{checked.port}"
    assert checked.calls[0]["path"] == "/hook?tenant=a"


def test_the_next_checked_address_is_tried_when_one_refuses(receiver: Receiver) -> None:
    target = webhooks.Target(receiver.url, "http", "hooks.test", receiver.port, "/hook",
                             ("127.0.0.3", "127.0.0.1"))  # nothing listens on the first
    attempt = delivery.post(target, b'{"type": "job.failed"}', {"content-type": "application/json"}, 5)
    assert attempt.status_code == 200 and attempt.error is None
    assert len(receiver.calls) == 1 and receiver.calls[0]["headers"]["host"] == f"hooks.test:{receiver.port}"


def test_a_redirect_is_recorded_not_followed(receiver: Receiver) -> None:
    trap = Receiver()
    try:
        receiver.script = {"job.failed": [302]}
        receiver.redirect_to = trap.url
        target = webhooks.resolve(receiver.url, Settings(env="test", webhook_allow="127.0.0.1"))
        attempt = delivery.post(target, b'{"type": "job.failed"}', {}, 5)
    finally:
        trap.server.shutdown()
    assert attempt.status_code == 302 and attempt.error == "HTTP 302"
    assert trap.calls == []


def _certificate(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}"],
                   check=True, capture_output=True)
    return cert, key


def test_https_to_a_checked_address_verifies_the_certificate_for_the_url_host(tmp_path: Path) -> None:
    """Connecting to the checked address must not weaken TLS: SNI and the certificate check still
    use the URL's host name (which does not resolve at all here: ``.test`` is reserved)."""
    cert, key = _certificate(tmp_path, "hooks.test")
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    receiver = Receiver(tls=server_tls)
    client_tls = ssl.create_default_context(cafile=str(cert))
    body = b'{"type": "job.succeeded"}'
    target = webhooks.Target(f"https://hooks.test:{receiver.port}/hook", "https", "hooks.test", receiver.port,
                             "/hook", ("127.0.0.1",))
    try:
        good = delivery.post(target, body, {"content-type": "application/json"}, 5, tls=client_tls)
        wrong_name = dataclasses.replace(target, host="other.test", url=f"https://other.test:{receiver.port}/hook")
        refused = delivery.post(wrong_name, body, {}, 5, tls=client_tls)
        untrusted = delivery.post(target, body, {}, 5, tls=ssl.create_default_context())
    finally:
        receiver.server.shutdown()
    assert good.status_code == 200 and good.error is None
    assert receiver.calls[0]["headers"]["host"] == f"hooks.test:{receiver.port}"
    assert refused.status_code is None and refused.error is not None and "Hostname mismatch" in refused.error
    assert untrusted.status_code is None and untrusted.error is not None
    assert "CERTIFICATE_VERIFY_FAILED" in untrusted.error
    assert len(receiver.calls) == 1
