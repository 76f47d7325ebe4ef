"""Full-page screenshots of the main pages, as the README shows them.

They are written to a temporary folder on every run (so the pages are checked to render), and to
docs/screenshots/ only with SER_SCREENSHOTS=1, so CI never rewrites the committed images:

    SER_SCREENSHOTS=1 pytest tests/system/browser/test_screenshots.py
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from ser_shared.settings import REPO_ROOT
from tests.conftest import WorkerProcess, ravdess_file

pytestmark = pytest.mark.slow  # a live server, a real worker and Chromium

DOCS = REPO_ROOT / "docs" / "screenshots"


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def test_screenshots_of_the_main_pages(page: Any, worker: WorkerProcess, finished_jobs: dict[str, Any],
                                       copy_to: Any, tmp_path: Path) -> None:
    out = DOCS if os.environ.get("SER_SCREENSHOTS") == "1" else tmp_path
    out.mkdir(parents=True, exist_ok=True)
    files = [copy_to(ravdess_file(8, code)) for code in ("03", "05", "07")]
    notes = tmp_path / "notes.txt"
    notes.write_text("not a recording")

    page.goto("/")
    page.set_input_files("#file-input", [str(f) for f in files] + [str(notes)])
    for f in files:
        expect(page.locator(f'li.upload-item[data-filename="{f.name}"]')).to_have_attribute(
            "data-status", "succeeded", timeout=90_000)
    page.screenshot(path=str(out / "upload.png"), full_page=True)

    page.goto("/history")
    expect(page.locator("table#history-table tr.job-row")).not_to_have_count(0)
    page.screenshot(path=str(out / "history.png"), full_page=True)

    page.goto(f"/jobs/{finished_jobs['jobs'][0]['id']}")
    for image in ("img#waveform", "img#spectrogram"):
        page.locator(image).evaluate("img => img.decode()")
    page.screenshot(path=str(out / "job.png"), full_page=True)

    page.goto(f"/batches/{finished_jobs['batch_id']}")
    expect(page.locator("table#batch-table tr.job-row")).to_have_count(len(finished_jobs["jobs"]))
    page.screenshot(path=str(out / "batch.png"), full_page=True)

    for name in ("upload.png", "history.png", "job.png", "batch.png"):
        width, height = png_size(out / name)
        assert width == 1280 and height >= 400, (name, width, height)


def test_screenshot_of_the_model_page(page: Any, tmp_path: Path) -> None:
    """/model in a real browser: its picture loads under the policy (the fixture fails on anything the
    policy blocks), the confusion and per-class tables are laid out, and the screenshot is taken."""
    out = DOCS if os.environ.get("SER_SCREENSHOTS") == "1" else tmp_path
    out.mkdir(parents=True, exist_ok=True)
    page.goto("/model")
    image = page.locator("img#reliability-picture")
    image.evaluate("img => img.decode()")
    assert image.evaluate("img => img.naturalWidth") > 100
    expect(page.locator("table#accuracy-table tbody tr")).not_to_have_count(0)
    expect(page.locator("table#cv-confusion-table tbody tr")).to_have_count(7)
    expect(page.locator("table#per-class-table tbody tr")).to_have_count(7)
    page.screenshot(path=str(out / "model-page.png"), full_page=True)
    width, height = png_size(out / "model-page.png")
    assert width == 1280 and height >= 900, (width, height)
