"""What the service writes to its database per recording, counted by the code that commits.

docs/SCALING.md builds its capacity figures on this: two commits per upload request (the rows,
then the enqueue mark) and two per chunk (claim, persist), nothing per recording. A change that
adds a write per recording (a progress write, a per-job update) changes these counts and fails
here. ``bench.db_writes`` (whose counter this is) measures the same on Postgres with many more
recordings.
"""

from __future__ import annotations

import math
import time

from celery import Celery
from flask.testing import FlaskClient

from bench.db_writes import counting
from ser_shared.settings import Settings
from tests.conftest import ravdess_file
from tests.helpers import multipart, read
from tests.unit.conftest import running

# Written per node per interval, not per recording: left out of the exact count.
TIMED = ("worker.heartbeat.", "worker.reconcile.")


def test_two_commits_per_request_and_two_per_chunk(client: FlaskClient, worker_app: Celery,
                                                   settings: Settings) -> None:
    files = [read(ravdess_file(actor, code)) for actor in (1, 2) for code in ("01", "03", "04", "05", "06")]
    with counting() as counts:
        resp = client.post("/api/v1/jobs", data=multipart(files), content_type="multipart/form-data")
        assert resp.status_code == 202, resp.get_data(as_text=True)
        urls = [j["url"] for j in resp.get_json()["jobs"]]
        with running(worker_app):
            deadline = time.monotonic() + 120
            while any(client.get(u).get_json()["status"] not in ("succeeded", "failed") for u in urls):
                assert time.monotonic() < deadline, "the jobs did not finish"
                time.sleep(0.2)
    chunks = math.ceil(len(files) / settings.chunk_size)
    per_recording = {site: n for site, n in counts.commits.items() if not site.startswith(TIMED)}
    assert per_recording == {"web.uploads.create_batch": 1, "ser_shared.enqueue._mark": 1,
                             "worker.results.claim": chunks, "worker.results.persist": chunks}, counts.commits
