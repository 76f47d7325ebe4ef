"""Idempotent uploads: the ``Idempotency-Key`` header, as Stripe and the IETF draft define it.

The first request with a key claims it (a row committed before any work), and its 202 response is
stored with it. A retry with the same key and the same request gets that stored response again,
marked ``Idempotent-Replayed: true``, and creates nothing. The same key with a different request
is a 409, as is a retry while the first request is still running. A request that ends in an error
releases its key, so the client can retry it. Keys expire after 24 hours.

A claim is a lease of ``idempotency_lease_s`` (30 s by default) that the live request extends as
it stores its files (``Lease.keep``): a request killed outright (kill -9 of gunicorn) stops
extending it, and a retry takes the key over once it has run out. The 409 for a claim still held
carries Retry-After: the seconds left on the lease. Two guards make the takeover safe. The
transaction that commits the batch first checks that this request still holds the key and binds
the key to the batch (``Lease.bind``): a request that lost its lease (it stalled past it and a
retry took over) commits nothing. And a key bound to a batch never expires as a claim: if its
request died after that commit but before storing its response, a retry gets the batch.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from werkzeug.datastructures import FileStorage, MultiDict

from ser_shared.errors import BadRequest, Conflict
from ser_shared.models import IdempotencyKey
from web.context import Services

HEADER = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"
KEY_TTL = timedelta(hours=24)
MAX_KEY_LENGTH = 255


@dataclass(frozen=True)
class Stored:
    status: int
    body: dict[str, Any]


def validate_key(value: str) -> str:
    key = value.strip()
    if not key or len(key) > MAX_KEY_LENGTH or not key.isascii() or not key.isprintable():
        raise BadRequest(f"{HEADER} must be 1-{MAX_KEY_LENGTH} printable ASCII characters",
                         code="invalid_idempotency_key")
    return key


def fingerprint(form: MultiDict[str, str], files: list[FileStorage]) -> str:
    """SHA-256 over the form fields and every file's name and bytes (streams are rewound)."""
    digest = hashlib.sha256(b"POST /api/v1/jobs\n")
    # A multipart part without a name parses with the key None (the API fuzzing sent one, and sorting
    # it against str keys was a 500); nothing reads such parts, so they do not change the request.
    for name in sorted(k for k in form if k is not None):
        for value in form.getlist(name):
            digest.update(f"{name}={value}\n".encode())
    for upload in files:
        digest.update(f"file:{upload.filename}\n".encode())
        start = upload.stream.tell()
        while block := upload.stream.read(1 << 20):
            digest.update(block)
        upload.stream.seek(start)
    return digest.hexdigest()


class InProgress(Conflict):
    """409 ``idempotency_key_in_progress``; ``retry_after`` (seconds) becomes the Retry-After header."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("a request with this Idempotency-Key is in progress; retry later",
                         code="idempotency_key_in_progress")
        self.retry_after = max(1, math.ceil(retry_after))


@dataclass(frozen=True)
class Bound:
    """The key's request committed this batch but did not store its response (it died)."""

    batch_id: uuid.UUID


@dataclass
class Lease:
    """This request's claim on a key: kept alive while the request works, bound to its batch."""

    svc: Services
    key: str
    owner: str = field(default_factory=lambda: secrets.token_hex(16))
    renewed: float = field(default_factory=time.monotonic)

    @property
    def seconds(self) -> float:
        return self.svc.settings.idempotency_lease_s

    def keep(self) -> None:
        """Extend the lease once a third of it has passed (cheap enough to call for every file).

        Raises InProgress when the lease was lost: this request stalled past it and a retry took
        the key over; carrying on would create the batch twice.
        """
        if time.monotonic() - self.renewed < self.seconds / 3:
            return
        with self.svc.sessions() as session:
            held = session.execute(update(IdempotencyKey)
                                   .where(IdempotencyKey.key == self.key, IdempotencyKey.owner == self.owner)
                                   .values(lease_until=datetime.now(UTC) + timedelta(seconds=self.seconds))
                                   .returning(IdempotencyKey.key)).first()
            session.commit()
        self.renewed = time.monotonic()
        if not held:
            raise InProgress(self.seconds)

    def bind(self, session: Session, batch_id: uuid.UUID) -> None:
        """In the transaction that commits ``batch_id``: check that the key is still this request's
        (row lock) and tie it to the batch, so it never expires as a claim again."""
        row = session.scalars(select(IdempotencyKey).where(IdempotencyKey.key == self.key,
                                                           IdempotencyKey.owner == self.owner)
                              .with_for_update()).one_or_none()
        if row is None:
            raise InProgress(self.seconds)
        row.batch_id, row.lease_until = batch_id, None


def _expired(row: IdempotencyKey, now: datetime, lease: timedelta) -> bool:
    if row.status_code is not None or row.batch_id is not None:
        return False
    # Rows from before leases have none: their claim lasts one lease from its creation.
    until = row.lease_until if row.lease_until is not None else row.created_at + lease
    return until < now


def claim(svc: Services, key: str, print_: str) -> Stored | Bound | Lease:
    """Claim ``key`` for this request (a Lease) or return what it already produced.

    Raises Conflict when the key belongs to a different request, InProgress when a live request
    holds it.
    """
    now = datetime.now(UTC)
    lease = Lease(svc, key)
    span = timedelta(seconds=lease.seconds)
    with svc.sessions() as session:
        session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < now - KEY_TTL))
        row = session.get(IdempotencyKey, key)
        if row is not None and _expired(row, now, span):
            # Its request died (or stalled past its lease): take the key over, unless a concurrent
            # retry just did (the conditions again, so only one UPDATE matches).
            taken = session.execute(
                update(IdempotencyKey).where(
                    IdempotencyKey.key == key, IdempotencyKey.status_code.is_(None),
                    IdempotencyKey.batch_id.is_(None),
                    IdempotencyKey.owner.is_(None) if row.owner is None else IdempotencyKey.owner == row.owner,
                    or_(IdempotencyKey.lease_until.is_(None), IdempotencyKey.lease_until < now))
                .values(owner=lease.owner, fingerprint=print_, created_at=now, lease_until=now + span)
                .returning(IdempotencyKey.key)).first()
            session.commit()
            if not taken:
                raise InProgress(lease.seconds)
            return lease
        if row is None:
            session.add(IdempotencyKey(key=key, fingerprint=print_, created_at=now, owner=lease.owner,
                                       lease_until=now + span))
            try:
                session.commit()
            except IntegrityError:  # a concurrent request with the same key won the race
                raise InProgress(lease.seconds) from None
            return lease
        session.commit()
        if row.fingerprint != print_:
            raise Conflict("this Idempotency-Key was already used with a different request",
                           code="idempotency_key_reused")
        if row.status_code is not None and row.response is not None:
            return Stored(row.status_code, row.response)
        if row.batch_id is not None:
            return Bound(row.batch_id)
        until = row.lease_until if row.lease_until is not None else row.created_at + span
        raise InProgress((until - now).total_seconds())


def complete(svc: Services, key: str, status: int, body: dict[str, Any]) -> None:
    with svc.sessions() as session:
        session.execute(update(IdempotencyKey).where(IdempotencyKey.key == key)
                        .values(status_code=status, response=body, lease_until=None))
        session.commit()


def release(svc: Services, lease: Lease) -> None:
    """Free the key of a request that created nothing (only while it is still this request's)."""
    with svc.sessions() as session:
        session.execute(delete(IdempotencyKey).where(IdempotencyKey.key == lease.key,
                                                     IdempotencyKey.owner == lease.owner,
                                                     IdempotencyKey.batch_id.is_(None)))
        session.commit()
