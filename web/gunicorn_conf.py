"""gunicorn's settings for ``ser web``: the multiprocess metrics folder and its upkeep.

gunicorn runs several worker processes; each counts its own requests, and a scrape of
``/metrics`` reaches only one of them. prometheus-client's multiprocess mode has every process
write its values to files in ``PROMETHEUS_MULTIPROC_DIR`` and a scrape read them all. The
variable must be set before any process imports prometheus_client (this file is read by the
master before the app is loaded in the workers), the folder must be emptied at start (values of
a previous run would be added to this one's), and a worker that exits must be marked dead so its
gauges stop counting.

``ErrorsOnlyAccessLog`` is the access log of ``SER_ACCESS_LOG=errors``.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from gunicorn.glogging import Logger


def metrics_dir(bind: str) -> Path:
    """The folder for the server listening on ``bind``: in the temporary folder, never the shared
    data folder (two hosts sharing it would clear each other's), and named after the address,
    which no other live server on this host holds (a restart reuses and clears it)."""
    return Path(tempfile.gettempdir()) / "ser-metrics" / ("web-" + re.sub(r"[^\w.-]", "_", bind))


def on_starting(server: Any) -> None:
    """In the master, before any worker forks: an empty folder, named in the environment."""
    folder = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or metrics_dir(str(server.cfg.bind[0])))
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)


def child_exit(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


class ErrorsOnlyAccessLog(Logger):
    """gunicorn's logger, its access log kept to answers of 400 and over: the pages and clients
    poll for progress, and a line per poll buries what went wrong."""

    def access(self, resp: Any, req: Any, environ: Any, request_time: Any) -> None:
        if (getattr(resp, "status_code", None) or 500) >= 400:
            super().access(resp, req, environ, request_time)
