"""Delivering one webhook event: claim it, POST it signed, record the attempt, schedule the next.

Retries back off exponentially (``SER_WEBHOOK_RETRY_BASE_S`` doubling, capped at
``SER_WEBHOOK_RETRY_MAX_S``) for up to ``SER_WEBHOOK_MAX_AGE_S`` (24 h); a 4xx answer other than
408 or 429 means the receiver refuses the event, and delivery stops. The schedule lives in the
database (``next_attempt_at``), so a lost broker message only delays an attempt: the sweeper
re-sends due deliveries.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from ser_shared import webhooks
from ser_shared.errors import BadRequest
from ser_shared.models import WebhookDelivery
from ser_shared.settings import Settings

log = logging.getLogger(__name__)

LEASE = timedelta(seconds=60)  # an attempt in flight: nobody else sends this event meanwhile


@dataclass(frozen=True)
class Attempt:
    status_code: int | None
    latency_ms: float
    error: str | None


def post(url: str, body: bytes, head: dict[str, str], timeout_s: float) -> Attempt:
    started = time.perf_counter()
    request = urllib.request.Request(url, data=body, headers=head, method="POST")
    try:
        # No redirects are followed into places the SSRF guard did not check: urllib follows 30x
        # for GET/HEAD only, so a POST answered with a redirect is recorded as that status.
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 (checked URL)
            code: int | None = response.status
            error = None
    except urllib.error.HTTPError as exc:
        code, error = exc.code, f"HTTP {exc.code}"
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        code, error = None, f"{type(reason).__name__}: {reason}"[:300]
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
            webhooks.check_url(row.url, settings)
        except webhooks.HostUnresolved as exc:
            attempt = Attempt(None, 0.0, exc.message)  # a DNS outage passes: retried like a timeout
            refused = False
        except BadRequest as exc:
            attempt = Attempt(None, 0.0, exc.message)
            refused = True
        else:
            head = webhooks.headers(webhooks.secret_bytes(settings), row.id, int(time.time()), body)
            attempt = post(row.url, body, head, settings.webhook_timeout_s)
            refused = False
        record: dict[str, Any] = {"at": now.isoformat().replace("+00:00", "Z"), "status_code": attempt.status_code,
                                  "latency_ms": attempt.latency_ms, "error": attempt.error}
        row.attempts = [*row.attempts, record]
        code = attempt.status_code
        created = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=UTC)
        delay: float | None = None
        if code is not None and 200 <= code < 300:
            row.status, row.next_attempt_at = "delivered", None
        elif refused or (code is not None and 400 <= code < 500 and code not in (408, 429)):
            row.status, row.next_attempt_at = "failed", None  # the receiver (or our guard) says no
        elif now - created >= timedelta(seconds=settings.webhook_max_age_s):
            row.status, row.next_attempt_at = "failed", None
        else:
            delay = retry_delay(len(row.attempts), settings)
            row.next_attempt_at = now + timedelta(seconds=delay)
        session.commit()
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
