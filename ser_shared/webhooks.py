"""Webhooks: events, Standard Webhooks signatures, the SSRF guard, and the delivery schedule.

Events (``job.succeeded``, ``job.failed``, ``batch.completed``) are rows written in the same
transaction as the state change they announce (``record_events``), then handed to the
``ser.deliver_webhook`` task after the commit. Delivery itself is in ``worker.delivery``.

Signing follows https://www.standardwebhooks.com: headers ``webhook-id``, ``webhook-timestamp``
and ``webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">``. The key is derived here
from the settings alone (``ser webhook-secret`` prints it); the signature itself is made by the
``standardwebhooks`` library in ``worker.delivery``, the only place that sends.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
import socket
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from celery import Celery
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from ser_shared.addresses import address_is_public
from ser_shared.contracts import DELIVER_WEBHOOK, QUEUE_CPU
from ser_shared.db import upsert_insert
from ser_shared.errors import BadRequest
from ser_shared.models import FINISHED, Batch, Job, WebhookDelivery
from ser_shared.schemas import BatchEvent, JobEvent
from ser_shared.settings import Settings

log = logging.getLogger(__name__)

NAMESPACE = uuid.UUID("5b0f4c1e-8f55-4c33-9a5e-0f5f3f9b7a11")  # for deterministic delivery ids
MAX_URL = 2048


# --- signing ---------------------------------------------------------------------------------

def secret_bytes(settings: Settings) -> bytes:
    """The signing key: the configured ``whsec_`` secret, or one derived from the secret key (which,
    unset, is the data folder's own: ``Settings.flask_secret``)."""
    if settings.webhook_secret:
        return base64.b64decode(settings.webhook_secret.removeprefix("whsec_"))
    return hmac.new(settings.flask_secret.encode(), b"ser-webhooks", hashlib.sha256).digest()


def public_secret(settings: Settings) -> str:
    """The secret in the ``whsec_`` form a receiver configures."""
    return "whsec_" + base64.b64encode(secret_bytes(settings)).decode()



# --- SSRF guard ------------------------------------------------------------------------------

def _allowed(host: str, addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address], allow: str) -> bool:
    for entry in (e.strip() for e in allow.split(",") if e.strip()):
        if entry.lower() == host.lower():
            return True
        try:
            net = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            continue
        if addresses and all(a in net for a in addresses):
            return True
    return False


class HostUnresolved(BadRequest):
    """The webhook host did not resolve (in time). At submission that refuses the URL; before a
    delivery attempt it is a failed attempt to retry later, since DNS outages pass."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="webhook_url_refused")


# getaddrinfo cannot be interrupted: it runs on these threads so that a caller waits at most the
# configured time. A lookup still hanging holds its thread until the system resolver gives up.
_LOOKUPS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ser-dns")


def _resolve(host: str, port: int, timeout_s: float) -> list[Any]:
    lookup = _LOOKUPS.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        return lookup.result(timeout=timeout_s)
    except TimeoutError as exc:
        lookup.cancel()  # still queued behind hanging lookups: never start it
        raise HostUnresolved(f"webhook_url host {host!r} did not resolve within {timeout_s:g} s") from exc
    except (socket.gaierror, UnicodeError) as exc:
        raise HostUnresolved(f"webhook_url host {host!r} does not resolve") from exc


@dataclass(frozen=True)
class Target:
    """A webhook URL with the addresses its host resolved to when it was checked.

    Delivery connects to these addresses and to no other: looking the name up again would let a
    DNS answer that changed after the check (DNS rebinding) send the POST to an internal address,
    and would be a second lookup without a time limit.
    """

    url: str
    scheme: str
    host: str
    port: int
    path: str  # path and query, as sent in the request line
    addresses: tuple[str, ...]


def resolve(url: str, settings: Settings) -> Target:
    """The checked target if webhooks may be sent to ``url``; BadRequest(``webhook_url_refused``)
    otherwise.

    Refuses other schemes, and hosts that resolve to any address that is not globally routable
    (``ser_shared.addresses.address_is_public``: loopback, private, shared, link-local with the
    cloud metadata services, documentation, multicast, reserved, and IPv6 forms that carry such an
    IPv4 address), unless the host or its network is in ``SER_WEBHOOK_ALLOW``. Checked at
    submission and again before each attempt, since DNS answers can change.
    """
    url = url.strip()
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:  # a port out of range or not a number
        raise BadRequest("webhook_url has an invalid port", code="webhook_url_refused") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname or len(url) > MAX_URL:
        raise BadRequest("webhook_url must be an http(s) URL with a host", code="webhook_url_refused")
    host = parts.hostname
    infos = _resolve(host, port, settings.webhook_dns_timeout_s)
    addresses = list(dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos))
    if not _allowed(host, addresses, settings.webhook_allow):
        for addr in addresses:
            if not address_is_public(addr):
                raise BadRequest(f"webhook_url resolves to a non-public address ({addr}); allow it with "
                                 "SER_WEBHOOK_ALLOW if that is intended", code="webhook_url_refused")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(url, parts.scheme, host, port, path, tuple(str(a) for a in addresses))


def check_url(url: str, settings: Settings) -> str:
    """The URL, stripped, if webhooks may be sent there (see ``resolve``)."""
    return resolve(url, settings).url


# --- events ----------------------------------------------------------------------------------

def _delivery(batch: Batch, job: Job | None, event: JobEvent | BatchEvent, now: datetime) -> dict[str, Any]:
    """The outbox row for one event; its payload is the event's JSON, exactly as it will be POSTed."""
    subject = job.id if job is not None else batch.id
    msg_id = "msg_" + uuid.uuid5(NAMESPACE, f"{subject}:{event.type}").hex
    return {"id": msg_id, "batch_id": batch.id, "job_id": job.id if job else None, "event": event.type,
            "url": batch.webhook_url, "payload": event.to_json(), "created_at": now, "status": "pending",
            "next_attempt_at": now, "attempts": []}


def conversation_summary(job: Job) -> dict[str, Any] | None:
    """The compact conversation of a succeeded job's webhook (``schemas.ConversationSummary``): each
    speaker's emotion, confidence, talk share and escalation count, and the call's escalation flag.

    None for a failed job and for results stored before conversations (no ``channels``)."""
    result = job.result
    if job.status != "succeeded" or result is None or not result.channels or not result.conversation:
        return None
    speakers = [{"index": ch["index"], "label": ch["label"], "emotion": ch.get("emotion"),
                 "confidence": ch.get("confidence"), "talk_share": ch["metrics"]["talk_share"],
                 "escalations": len(ch["metrics"].get("escalations") or [])} for ch in result.channels]
    return {"escalation": bool(result.conversation.get("escalation")),
            "customer": result.conversation.get("customer"), "channels": speakers}


def record_events(session: Session, job_ids: Sequence[uuid.UUID]) -> list[str]:
    """Write the events that these jobs' (now flushed) state implies; returns the new delivery ids.

    A finished job gets ``job.succeeded`` or ``job.failed``; a batch whose jobs are all finished
    gets ``batch.completed``. Call before the commit that finishes the jobs.
    """
    if not job_ids:
        return []
    session.flush()
    now = datetime.now(UTC)
    rows: list[dict[str, Any]] = []
    # The result is loaded for the conversation summary (in this transaction: the worker writes it just before).
    jobs = session.scalars(select(Job).join(Batch).options(selectinload(Job.result))
                           .where(Job.id.in_(list(job_ids)), Batch.webhook_url.is_not(None))).all()
    batches: dict[uuid.UUID, Batch] = {}
    for job in jobs:
        if job.status not in FINISHED:
            continue
        data = {"job_id": job.id, "batch_id": job.batch_id, "status": job.status,
                "emotion": job.emotion, "confidence": job.confidence, "client_reference": job.client_reference,
                "error": {"code": job.error_code, "message": job.error_message} if job.error_code else None,
                "conversation": conversation_summary(job)}
        event = JobEvent.build({"type": f"job.{job.status}", "timestamp": now, "data": data})
        rows.append(_delivery(job.batch, job, event, now))
        batches[job.batch_id] = job.batch
    for batch in batches.values():
        open_jobs = session.scalar(select(Job.id).where(Job.batch_id == batch.id, Job.status.not_in(FINISHED))
                                   .limit(1))
        if open_jobs is None:
            counts: dict[str, int] = {}
            for status in session.scalars(select(Job.status).where(Job.batch_id == batch.id)):
                counts[status] = counts.get(status, 0) + 1
            completed = BatchEvent.build({"type": "batch.completed", "timestamp": now, "data": {
                "batch_id": batch.id, "file_count": batch.file_count, "counts": counts}})
            rows.append(_delivery(batch, None, completed, now))
    if not rows:
        return []
    inserted = session.execute(upsert_insert(session, WebhookDelivery).on_conflict_do_nothing(index_elements=["id"])
                               .returning(WebhookDelivery.id), rows)
    return [row[0] for row in inserted]


def send(celery: Celery, delivery_ids: Sequence[str], countdown: float | None = None) -> None:
    """Hand deliveries to the worker; a failure here is safe (the sweeper finds pending rows)."""
    for msg_id in delivery_ids:
        try:
            celery.send_task(DELIVER_WEBHOOK, args=[msg_id], queue=QUEUE_CPU, countdown=countdown,
                             retry=True, retry_policy={"max_retries": 1, "interval_start": 0.2})
        except Exception as exc:  # kombu raises transport-specific errors
            log.warning("webhook enqueue failed id=%s error=%s", msg_id, exc)
