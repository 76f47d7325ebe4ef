"""This worker node's identity and heartbeat: how the reconciler tells a dead worker's jobs.

A node is one worker main process and its pool children. Its id is made in the main process
before the pool forks, so every child (a replacement after a child was killed too) records the
same holder on the jobs it claims. It carries the host, the main pid and a random part: two
workers on one host, or a worker restarted with a recycled pid, are never taken for each other.

The main process writes the heartbeat from a thread of its own, through the database rather than
the broker: the pool children may all be busy for minutes, and the embedded mode has no Redis.
The main process runs no task, so a heartbeat stops only when the node is gone (or cannot reach
the database, which the reconciler allows for: see ``steady_for``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from ser_shared.db import make_engine, make_session_factory, upsert_insert
from ser_shared.models import WorkerHeartbeat
from ser_shared.settings import Settings

log = logging.getLogger(__name__)

_node: str | None = None


def node() -> str:
    """This node's id (made on first use: in the main process at start, inherited by children)."""
    global _node
    if _node is None:
        _node = f"{host_prefix()}{os.getpid()}:{uuid.uuid4().hex[:8]}"
    return _node


def host_prefix(host: str | None = None) -> str:
    """The start of the ids of this host's nodes (see ``node``)."""
    return f"{(host or socket.gethostname())[:120]}:"


def last_seen(factory: sessionmaker[Session], prefix: str) -> datetime | None:
    """The newest heartbeat of the nodes whose id starts with ``prefix`` (None: no such node)."""
    with factory() as session:
        return session.scalar(select(func.max(WorkerHeartbeat.seen_at))
                              .where(WorkerHeartbeat.node.startswith(prefix, autoescape=True)))


def beat(factory: sessionmaker[Session], node_id: str, started_at: datetime) -> None:
    """Write the node's heartbeat row (insert or refresh)."""
    now = datetime.now(UTC)
    with factory() as session:
        stmt = upsert_insert(session, WorkerHeartbeat).values(node=node_id, started_at=started_at, seen_at=now)
        session.execute(stmt.on_conflict_do_update(index_elements=[WorkerHeartbeat.node], set_={"seen_at": now}))
        session.commit()


class Heartbeat:
    """The heartbeat thread of a worker's main process (its own engine: never shared with children)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.node = node()
        self.started_at = datetime.now(UTC)
        self.factory = make_session_factory(make_engine(settings))
        self._stop = threading.Event()
        self._steady_since: float | None = None  # monotonic time of the first beat of an unbroken run

    def beat_once(self) -> bool:
        try:
            beat(self.factory, self.node, self.started_at)
        except (OperationalError, InterfaceError) as exc:
            if self._steady_since is not None:
                log.warning("heartbeat not written, database unavailable: %s", exc.orig)
            self._steady_since = None
            return False
        if self._steady_since is None:
            self._steady_since = time.monotonic()
        return True

    def close_connections(self) -> None:
        """Close pooled connections (before the pool forks: children must not share a socket)."""
        self.factory.kw["bind"].dispose()

    def steady_for(self) -> float:
        """Seconds this node's heartbeats have been written without a miss.

        The reconciler judges other nodes dead only once this reaches ``worker_dead_after_s``:
        after a database outage every heartbeat is old, and live nodes need that long to write a
        fresh one before their jobs would be taken for orphans.
        """
        return 0.0 if self._steady_since is None else time.monotonic() - self._steady_since

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.wait(self.settings.worker_heartbeat_s):
                self.beat_once()

        threading.Thread(target=loop, name="ser-heartbeat", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
