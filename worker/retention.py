"""Audio retention: recordings are deleted a configured time after their job finished.

Results, transcripts and segments stay; the job records when its audio went. The row is updated
before the file is removed: a crash in between leaves an unreferenced file that nothing serves,
never a row pointing at audio that is gone.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from ser_shared import storage
from ser_shared.models import FINISHED, Job
from ser_shared.settings import Settings

log = logging.getLogger(__name__)

PASS_LIMIT = 1000


def purge_expired_audio(factory: sessionmaker[Session], settings: Settings, now: datetime | None = None) -> int:
    """Delete the audio of jobs finished more than ``audio_retention_days`` ago. Returns how many."""
    if settings.audio_retention_days <= 0:
        return 0
    now = now or datetime.now(UTC)
    cutoff = now - timedelta(days=settings.audio_retention_days)
    purged = 0
    with factory() as session:
        while True:
            rows = session.execute(
                select(Job.id, Job.storage_key).where(Job.status.in_(FINISHED), Job.storage_key.is_not(None),
                                                      Job.finished_at < cutoff).limit(PASS_LIMIT)).all()
            if not rows:
                break
            ids = [job_id for job_id, _ in rows]
            session.execute(update(Job).where(Job.id.in_(ids)).values(storage_key=None, audio_deleted_at=now))
            session.commit()
            store = storage.store_for(settings)
            for _, key in rows:
                storage.discard(store, key)
            purged += len(rows)
    if purged:
        log.info("retention deleted audio jobs=%d older_than_days=%s", purged, settings.audio_retention_days)
    return purged
