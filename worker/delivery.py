"""Delivering one webhook event: claim it, POST it signed, record the attempt, schedule the next.

Retries back off exponentially (``SER_WEBHOOK_RETRY_BASE_S`` doubling, capped at
``SER_WEBHOOK_RETRY_MAX_S``) for up to ``SER_WEBHOOK_MAX_AGE_S`` (24 h); a 4xx answer other than
408 or 429 means the receiver refuses the event, and delivery stops. The schedule lives in the
database (``next_attempt_at``), so a lost broker message only delays an attempt: the sweeper
re-sends due deliveries. The POST goes only to the addresses the SSRF guard checked for this
attempt (``ser_shared.webhooks.Target``), and redirects are recorded, never followed.
"""

from __future__ import annotations

import functools
import http.client
import json
import logging
import socket
import ssl
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks import Webhook

from ser_shared import clock, webhooks
from ser_shared.errors import BadRequest
from ser_shared.models import WebhookDelivery
from ser_shared.settings import Settings
from worker import metrics

log = logging.getLogger(__name__)

LEASE = timedelta(seconds=60)  # an attempt in flight: nobody else sends this event meanwhile
_MAX_ANSWER = 64 * 1024


def signed_headers(key: bytes, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The request headers of one attempt, signed by the Standard Webhooks reference library.

    The library signs text: the body is our own compact JSON (ASCII), so decoding and its
    re-encoding give back the exact bytes that are sent.
    """
    sent_at = datetime.fromtimestamp(timestamp, UTC)
    signature = Webhook(key).sign(msg_id, sent_at, body.decode())
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp), "webhook-signature": signature,
            "content-type": "application/json", "user-agent": "ser-webhooks/1"}


@dataclass(frozen=True)
class Attempt:
    status_code: int | None
    latency_ms: float
    error: str | None


class _PinnedHTTP(http.client.HTTPConnection):
    """HTTP to a checked address; the Host header still names the URL's host."""

    def __init__(self, target: webhooks.Target, address: str, timeout_s: float) -> None:
        super().__init__(target.host, target.port, timeout=timeout_s)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to a checked address; SNI and certificate verification still use the URL's host."""

    def __init__(self, target: webhooks.Target, address: str, timeout_s: float, tls: ssl.SSLContext) -> None:
        super().__init__(target.host, target.port, timeout=timeout_s, context=tls)
        self.address, self.tls = address, tls

    def connect(self) -> None:
        raw = socket.create_connection((self.address, self.port), self.timeout)
        try:
            self.sock = self.tls.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise


@functools.cache
def default_tls() -> ssl.SSLContext:
    """The system's trust store (``SSL_CERT_FILE`` adds a private CA), with hostname checks."""
    return ssl.create_default_context()


def post(target: webhooks.Target, body: bytes, head: dict[str, str], timeout_s: float,
         tls: ssl.SSLContext | None = None) -> Attempt:
    """One signed POST to the target's checked addresses, tried in order until one connects.

    Redirects are recorded as their status, never followed: their destination was not checked.
    """
    started = time.perf_counter()
    code: int | None = None
    error: str | None = "no address to connect to"
    for address in target.addresses:
        conn: http.client.HTTPConnection = (
            _PinnedHTTPS(target, address, timeout_s, tls or default_tls()) if target.scheme == "https"
            else _PinnedHTTP(target, address, timeout_s))
        try:
            conn.connect()
        except OSError as exc:  # refused, unreachable, timed out, TLS refused: try the next address
            error = f"{type(exc).__name__}: {exc}"[:300]
            conn.close()
            continue
        try:
            conn.request("POST", target.path, body=body, headers=head)
            response = conn.getresponse()
            response.read(_MAX_ANSWER)  # the receiver's answer is not used; read a little, politely
            code, error = response.status, None if 200 <= response.status < 300 else f"HTTP {response.status}"
        except (OSError, http.client.HTTPException) as exc:
            code, error = None, f"{type(exc).__name__}: {exc}"[:300]
        finally:
            conn.close()
        break
    return Attempt(code, round((time.perf_counter() - started) * 1000, 1), error)


def retry_delay(attempts: int, settings: Settings) -> float:
    """Seconds before attempt ``attempts + 1``: base, 2x base, 4x base, ..., capped."""
    return min(settings.webhook_retry_base_s * 2 ** max(attempts - 1, 0), settings.webhook_retry_max_s)


def _claim(session: Session, msg_id: str, now: datetime) -> WebhookDelivery | None:
    claimed = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == msg_id, WebhookDelivery.status == "pending",
               WebhookDelivery.next_attempt_at <= now)
        .values(next_attempt_at=now + LEASE)
        .returning(WebhookDelivery.id)
    ).first()
    session.commit()
    return session.get(WebhookDelivery, msg_id) if claimed is not None else None


def deliver(factory: sessionmaker[Session], settings: Settings, msg_id: str) -> float | None:
    """One attempt at one event; returns the delay before the next attempt, or None when done."""
    now = datetime.now(UTC)
    with factory() as session:
        row = _claim(session, msg_id, now)
        if row is None:
            return None  # delivered, given up, deleted, or another attempt is in flight
        body = json.dumps(row.payload, separators=(",", ":")).encode()
        try:
            target = webhooks.resolve(row.url, settings)
        except webhooks.HostUnresolved as exc:
            attempt = Attempt(None, 0.0, exc.message)  # a DNS outage passes: retried like a timeout
            refused = False
        except BadRequest as exc:
            attempt = Attempt(None, 0.0, exc.message)
            refused = True
        else:
            head = signed_headers(webhooks.secret_bytes(settings), row.id, int(time.time()), body)
            attempt = post(target, body, head, settings.webhook_timeout_s)
            refused = False
        record: dict[str, Any] = {"at": clock.iso(now), "status_code": attempt.status_code,
                                  "latency_ms": attempt.latency_ms, "error": attempt.error}
        row.attempts = [*row.attempts, record]
        code = attempt.status_code
        delay: float | None = None
        if code is not None and 200 <= code < 300:
            row.status, row.next_attempt_at = "delivered", None
        elif refused or (code is not None and 400 <= code < 500 and code not in (408, 429)):
            row.status, row.next_attempt_at = "failed", None  # the receiver (or our guard) says no
        elif now - row.created_at >= timedelta(seconds=settings.webhook_max_age_s):
            row.status, row.next_attempt_at = "failed", None
        else:
            delay = retry_delay(len(row.attempts), settings)
            row.next_attempt_at = now + timedelta(seconds=delay)
        session.commit()
        # "pending" after an attempt: it failed and another is scheduled.
        metrics.webhook_attempt(row.status)
        log.info("webhook id=%s event=%s attempt=%d status=%s result=%s", row.id, row.event, len(row.attempts),
                 code, row.status)
        return delay


def due(factory: sessionmaker[Session], limit: int = 500) -> list[str]:
    """Pending deliveries whose next attempt is overdue (their broker message was lost)."""
    cutoff = datetime.now(UTC) - timedelta(seconds=5)
    with factory() as session:
        return list(session.scalars(
            select(WebhookDelivery.id)
            .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= cutoff)
            .order_by(WebhookDelivery.next_attempt_at).limit(limit)))
