"""The orphan sweep: stored files and objects that no job row refers to, left by a crash.

An upload stores each file before the request commits its job rows (the rows must not point at
audio that is not there), so a web process killed in between leaves stored files with no row,
and one killed while writing leaves a ``.part`` file (folder store) or an incomplete multipart
upload (S3). After ``orphan_grace_s`` (longer than any upload request takes, so a request still
running is never robbed) the worker's reconciler removes them, on both backends, along with
whatever a killed worker left in its own spool folder.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from itertools import islice

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from ser_shared import storage
from ser_shared.models import Job
from ser_shared.settings import Settings

log = logging.getLogger(__name__)

BATCH = 500


def _batches(entries: Iterable[storage.Entry]) -> Iterator[list[storage.Entry]]:
    it = iter(entries)
    while batch := list(islice(it, BATCH)):
        yield batch


def sweep_orphans(factory: sessionmaker[Session], settings: Settings, now: datetime | None = None) -> int:
    """Remove stored files, objects and unfinished writes older than the grace that no job row
    refers to. Returns how many were removed."""
    cutoff = (now or datetime.now(UTC)) - timedelta(seconds=settings.orphan_grace_s)
    store = storage.store_for(settings)
    removed = storage.clear_spool(settings, cutoff)
    old = (e for e in store.entries() if e.modified < cutoff)
    for batch in _batches(old):
        keys = [e.key for e in batch if not e.partial]
        with factory() as session:
            known = set(session.scalars(select(Job.storage_key).where(Job.storage_key.in_(keys)))) if keys else set()
        for entry in batch:
            if entry.partial:
                store.remove_partial(entry)
            elif entry.key in known:
                continue
            else:
                store.delete(entry.key)
            removed += 1
            log.info("orphan removed key=%s partial=%s modified=%s", entry.key, entry.partial,
                     entry.modified.isoformat())
    return removed
