"""The upload page's live microphone: a running timeline of chunk results, kept as one batch.

Chromium's fake capture device plays a RAVDESS sentence in a loop (see conftest.mic_wav); the page
cuts it into chunks of a few seconds, sends each as a job of one live session and draws each result
on the timeline as it arrives. A real worker analyses them.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import WorkerProcess
from tests.system.browser.test_screenshots import DOCS, png_size

pytestmark = pytest.mark.slow  # a live server, a real worker and Chromium

DONE = "#live-timeline rect.done"


def wait_until(page: Any, check: Any, timeout_s: float, what: str) -> None:
    """Poll ``check()`` from Python: the page's CSP forbids the eval that wait_for_function needs."""
    for _ in range(int(timeout_s * 4)):
        if check():
            return
        page.wait_for_timeout(250)
    raise AssertionError(f"not within {timeout_s} s: {what}")


def test_live_session_grows_a_timeline_and_keeps_its_chunks(page: Any, worker: WorkerProcess,
                                                            tmp_path: Path) -> None:
    page.goto("/")
    page.click("#live-start")
    # The timeline grows while the speech plays: one result, then more.
    done = page.locator(DONE)
    wait_until(page, lambda: done.count() >= 1, 90, "a first result")  # a cold worker's first chunk included
    wait_until(page, lambda: done.count() >= 4, 60, "four results")
    page.click("#live-stop")
    wait_until(page, lambda: page.locator("#live").get_attribute("data-state") == "stopped", 60, "the stop")

    # Written to docs/screenshots only with SER_SCREENSHOTS=1 (see test_screenshots).
    shot = (DOCS if os.environ.get("SER_SCREENSHOTS") == "1" else tmp_path) / "live.png"
    page.locator("#live").screenshot(path=str(shot))
    assert png_size(shot)[0] > 600
    rects = page.locator("#live-timeline rect")
    shown = [{"emotion": rects.nth(i).get_attribute("data-emotion"),
              "job": rects.nth(i).get_attribute("data-job-id"),
              "latency_ms": int(rects.nth(i).get_attribute("data-latency-ms") or -1)}
             for i in range(rects.count())]
    batch_id = page.locator("#live").get_attribute("data-batch-id")
    batch = page.request.get(f"/api/v1/batches/{batch_id}").json()

    # Every chunk on the timeline is a job of the session, in order, with the result it shows.
    assert batch["options"]["live"] is True
    # Four results were on screen at the stop; its last cut adds a fifth unless under 0.5 s.
    assert batch["file_count"] == len(batch["jobs"]) == len(shown) >= 4
    assert [s["job"] for s in shown] == [j["id"] for j in batch["jobs"]]
    for s, job in zip(shown, batch["jobs"], strict=True):
        assert job["status"] in ("succeeded", "failed")
        assert s["emotion"] == (job["result"]["emotion"] if job["status"] == "succeeded" else "")
        assert 0.4 < job["duration_s"] < 4.4, job["duration_s"]  # cut at a pause, never past 4 s
    assert sum(j["status"] == "succeeded" for j in batch["jobs"]) >= 3
    latencies = [s["latency_ms"] for s in shown if s["latency_ms"] >= 0]
    print(f"live chunks: {len(shown)}, end-of-chunk to result on screen: median "
          f"{statistics.median(latencies)} ms, max {max(latencies)} ms")

    # The session is then a batch like any other, with its timeline on the batch page.
    page.goto(f"/batches/{batch_id}")
    session = page.locator("#session-timeline rect")
    assert session.count() == len(shown)
    assert [session.nth(i).get_attribute("data-emotion") for i in range(session.count())] == \
        [s["emotion"] for s in shown]
