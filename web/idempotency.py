"""Idempotent uploads: the ``Idempotency-Key`` header, as Stripe and the IETF draft define it.

The first request with a key claims it (a row committed before any work), and its 202 response is
stored with it. A retry with the same key and the same request gets that stored response again,
marked ``Idempotent-Replayed: true``, and creates nothing. The same key with a different request
is a 409, as is a retry while the first request is still running. A request that ends in an error
releases its key, so the client can retry it. Keys expire after 24 hours.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, update
from sqlalchemy.exc import IntegrityError
from werkzeug.datastructures import FileStorage, MultiDict

from ser_shared.errors import BadRequest, Conflict
from ser_shared.models import IdempotencyKey
from web.app import Services

HEADER = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"
KEY_TTL = timedelta(hours=24)
# A claim whose request died (a killed web worker) stops blocking its key after this long.
STALE_CLAIM = timedelta(minutes=10)
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


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value  # SQLite returns naive UTC


def claim(svc: Services, key: str, print_: str) -> Stored | None:
    """Claim ``key`` for this request (None) or return the response stored for it.

    Raises Conflict when the key belongs to a different request or to one still in progress.
    """
    now = datetime.now(UTC)
    with svc.sessions() as session:
        session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < now - KEY_TTL))
        row = session.get(IdempotencyKey, key)
        if row is not None and row.status_code is None and _aware(row.created_at) < now - STALE_CLAIM:
            session.delete(row)
            session.flush()
            row = None
        if row is None:
            session.add(IdempotencyKey(key=key, fingerprint=print_, created_at=now))
            try:
                session.commit()
            except IntegrityError:  # a concurrent request with the same key won the race
                raise Conflict("a request with this Idempotency-Key is in progress; retry later",
                               code="idempotency_key_in_progress") from None
            return None
        session.commit()
        if row.fingerprint != print_:
            raise Conflict("this Idempotency-Key was already used with a different request",
                           code="idempotency_key_reused")
        if row.status_code is None or row.response is None:
            raise Conflict("a request with this Idempotency-Key is in progress; retry later",
                           code="idempotency_key_in_progress")
        return Stored(row.status_code, row.response)


def complete(svc: Services, key: str, status: int, body: dict[str, Any]) -> None:
    with svc.sessions() as session:
        session.execute(update(IdempotencyKey).where(IdempotencyKey.key == key)
                        .values(status_code=status, response=body))
        session.commit()


def release(svc: Services, key: str) -> None:
    with svc.sessions() as session:
        session.execute(delete(IdempotencyKey).where(IdempotencyKey.key == key))
        session.commit()
