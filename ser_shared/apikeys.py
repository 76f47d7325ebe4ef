"""API keys: created and revoked by the ``ser keys`` command, checked by the web tier.

A key is 32 random bytes (``ser_`` + URL-safe base64). Only its SHA-256 is stored: with that much
entropy a fast hash is enough (nobody can brute-force 256 bits), and a lookup is one indexed
equality, unlike a salted slow hash that would have to be tried against every key.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from ser_shared.errors import BadRequest, NotFound
from ser_shared.models import TENANT_LENGTH, ApiKey

KEY_PREFIX = "ser_"
SHOWN_PREFIX = 12
# last_used_at is informative; writing it on every request would turn each read into a write.
TOUCH_EVERY = timedelta(minutes=5)
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class NewKey:
    id: uuid.UUID
    name: str
    tenant: str
    key: str  # the only time the key exists in clear


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create(session: Session, name: str, tenant: str | None = None) -> NewKey:
    """A new key for ``tenant`` (a new tenant of its own when None). The caller commits."""
    name = name.strip()
    if not name or len(name) > 100:
        raise BadRequest("a key needs a name of 1-100 characters", code="invalid_parameter")
    if tenant is None:
        tenant = "t_" + secrets.token_hex(8)
    elif not TENANT_PATTERN.match(tenant) or len(tenant) > TENANT_LENGTH:
        raise BadRequest("tenant: 1-64 letters, digits, '.', '_' or '-'", code="invalid_parameter")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(id=uuid.uuid4(), name=name, tenant=tenant, prefix=key[:SHOWN_PREFIX], key_hash=digest(key),
                 created_at=datetime.now(UTC))
    session.add(row)
    session.flush()
    return NewKey(row.id, name, tenant, key)


def authenticate(session: Session, key: str) -> ApiKey | None:
    """The live key row for ``key``, or None (unknown or revoked)."""
    if not key.startswith(KEY_PREFIX) or len(key) > 200:
        return None
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == digest(key)))
    if row is None or row.revoked_at is not None:
        return None
    touch(session, row)
    return row


def by_id(session: Session, key_id: str | uuid.UUID) -> ApiKey | None:
    """A live key by id (a signed-in page session re-checks its key on every request)."""
    try:
        ident = key_id if isinstance(key_id, uuid.UUID) else uuid.UUID(str(key_id))
    except ValueError:
        return None
    row = session.get(ApiKey, ident)
    return row if row is not None and row.revoked_at is None else None


def touch(session: Session, row: ApiKey) -> None:
    now = datetime.now(UTC)
    last = row.last_used_at
    if last is None or now - last > TOUCH_EVERY:
        session.execute(update(ApiKey).where(ApiKey.id == row.id).values(last_used_at=now))
        session.commit()


def revoke(session: Session, key_id: str) -> ApiKey:
    """Revoke a key by id or by its shown prefix; takes effect on the next request. The caller commits."""
    condition = ApiKey.prefix == key_id
    with contextlib.suppress(ValueError):  # not an id: a prefix
        condition = or_(condition, ApiKey.id == uuid.UUID(key_id))
    matches = list(session.scalars(select(ApiKey).where(condition)))
    if len(matches) != 1:
        raise NotFound("no such key" if not matches else "that prefix matches several keys; use the id")
    row = matches[0]
    if row.revoked_at is None:
        row.revoked_at = datetime.now(UTC)
    return row


def listing(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at)))
