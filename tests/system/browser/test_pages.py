"""History, job and batch pages in Chromium, against jobs a real worker analysed."""

from __future__ import annotations

import csv
import io
import math
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from playwright.sync_api import expect

from ser_shared.emotions import EMOTIONS

pytestmark = pytest.mark.slow  # a live server, a real worker and Chromium


def test_job_page_shows_charts_images_and_a_playable_recording(page: Any, finished_jobs: dict[str, Any]) -> None:
    job = finished_jobs["jobs"][0]
    result = job["result"]
    page.goto(f"/jobs/{job['id']}")
    bars = page.locator("#chart-ensemble .bar")
    expect(bars).to_have_count(len(EMOTIONS))
    shown = {bars.nth(i).get_attribute("data-emotion"): float(bars.nth(i).get_attribute("data-p") or "nan")
             for i in range(len(EMOTIONS))}
    assert shown.keys() == set(EMOTIONS)
    for emotion, p in result["probabilities"].items():
        assert math.isclose(shown[emotion], p, abs_tol=1e-6)
    assert max(shown, key=lambda e: shown[e]) == result["emotion"]
    assert result["models"], "the result names its models"
    for name in result["models"]:
        expect(page.locator(f"#chart-{name} .bar")).to_have_count(len(EMOTIONS))
        expect(page.locator("#model-versions")).to_contain_text(name)
    expect(page.locator("#timings tr")).not_to_have_count(0)

    player = page.locator("audio#player")
    expect(player).to_have_attribute("src", f"/api/v1/jobs/{job['id']}/audio")
    audio = player.evaluate(
        """async (el) => {
            if (el.readyState < 1) await new Promise((ok, bad) => {
                el.addEventListener("loadedmetadata", ok, {once: true});
                el.addEventListener("error", () => bad(new Error("audio error " + el.error.code)), {once: true});
                el.load();
            });
            el.muted = true;
            await el.play();
            await new Promise(r => setTimeout(r, 400));
            el.pause();
            return {readyState: el.readyState, duration: el.duration, played: el.currentTime};
        }""")
    assert audio["readyState"] >= 1 and audio["played"] > 0
    assert math.isclose(audio["duration"], job["duration_s"], abs_tol=0.1)

    for image in ("img#waveform", "img#spectrogram"):
        size = page.locator(image).evaluate(
            "async (img) => { await img.decode(); return [img.naturalWidth, img.naturalHeight]; }")
        assert size[0] > 100 and size[1] > 50, (image, size)


def test_failed_job_page_explains_the_error(page: Any, finished_jobs: dict[str, Any]) -> None:
    page.goto(f"/jobs/{finished_jobs['failed_id']}")
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_contain_text("decode_failed")
    expect(page.locator("#chart-ensemble")).to_have_count(0)


def rows(page: Any) -> list[dict[str, str]]:
    out = []
    for row in page.locator("table#history-table tr.job-row").all():
        out.append({"id": row.get_attribute("data-job-id") or "", "status": row.get_attribute("data-status") or "",
                    "status_text": row.locator(".status").inner_text().strip(),
                    "emotion_text": row.locator(".emotion").inner_text().strip()})
    return out


def test_history_filters_by_emotion_and_status(page: Any, finished_jobs: dict[str, Any]) -> None:
    emotion = finished_jobs["jobs"][0]["result"]["emotion"]
    expected = {j["id"] for j in finished_jobs["jobs"] if j["result"]["emotion"] == emotion}
    page.goto("/history")
    before = datetime.now(UTC)  # jobs of earlier tests may still be finishing while this one looks
    form = page.locator("form#filters")
    form.locator('select[name="status"]').select_option("succeeded")
    form.locator('select[name="emotion"]').select_option(emotion)
    form.locator('button[type="submit"]').click()
    page.wait_for_url("**/history?*")
    query = parse_qs(urlsplit(page.url).query)
    assert query["status"] == ["succeeded"] and query["emotion"] == [emotion]
    shown = rows(page)
    after = datetime.now(UTC)
    assert expected <= {r["id"] for r in shown}
    assert all(r["status"] == "succeeded" and r["status_text"] == "succeeded" for r in shown), shown
    assert all(emotion in r["emotion_text"].split() for r in shown), shown
    # The same filter through the API gives the same jobs: nothing matching is hidden. A job that
    # finished while the page loaded may or may not be on it; every one finished before must be.
    listed = page.request.get(f"/api/v1/jobs?status=succeeded&emotion={emotion}&limit=200").json()["jobs"]
    # Rows other tests insert as already succeeded carry no finished_at (and some a created_at in the
    # future): they never change, so they count as finished before the page loaded.
    settled = datetime.min.replace(tzinfo=UTC)
    finished = {j["id"]: datetime.fromisoformat(j["finished_at"]) if j["finished_at"] else settled for j in listed}
    assert {i for i, at in finished.items() if at <= before} <= {r["id"] for r in shown}
    assert {r["id"] for r in shown} <= {i for i, at in finished.items() if at <= after}
    chart = page.locator(f'#summary-emotions .bar[data-emotion="{emotion}"]')
    expect(chart).to_have_attribute("data-count", str(len(shown)))

    form.locator('select[name="emotion"]').select_option("")
    form.locator('select[name="status"]').select_option("failed")
    form.locator('button[type="submit"]').click()
    page.wait_for_url("**status=failed**")
    failed = rows(page)
    assert finished_jobs["failed_id"] in {r["id"] for r in failed}
    assert all(r["status"] == "failed" and r["status_text"] == "failed" for r in failed), failed
    # The summary counts every failed job; the table shows one page of them (25 rows). Other tests
    # leave failed jobs in this session's database, so there may be more than a page.
    total = len(page.request.get("/api/v1/jobs?status=failed&limit=200").json()["jobs"])
    assert len(failed) == min(total, 25)
    expect(page.locator('#summary-status [data-status="failed"]')).to_have_attribute("data-count", str(total))


def test_export_csv_carries_the_filter(page: Any, finished_jobs: dict[str, Any]) -> None:
    batch = finished_jobs["batch_id"]
    page.goto("/history")
    page.locator('form#filters input[name="batch"]').fill(batch)
    page.locator('form#filters button[type="submit"]').click()
    page.wait_for_url(f"**batch={batch}**")
    with page.expect_download() as info:
        page.click("a#export-csv")
    download = info.value
    assert download.suggested_filename.endswith(".csv")
    text = open(download.path(), encoding="utf-8").read()  # noqa: SIM115 - read once, closed by GC at test end
    exported = list(csv.DictReader(io.StringIO(text)))
    by_id = {j["id"]: j for j in finished_jobs["jobs"]}
    assert {r["job_id"] for r in exported} == set(by_id)
    for row in exported:
        job = by_id[row["job_id"]]
        assert row["batch_id"] == batch and row["filename"] == job["filename"] and row["status"] == "succeeded"
        assert row["emotion"] == job["result"]["emotion"]
        assert math.isclose(float(row["confidence"]), job["result"]["confidence"], abs_tol=1e-4)
        assert math.isclose(sum(float(row[f"p_{e}"]) for e in EMOTIONS), 1.0, abs_tol=1e-3)


def test_batch_page_shows_progress_distribution_and_rows(page: Any, finished_jobs: dict[str, Any]) -> None:
    jobs = finished_jobs["jobs"]
    page.goto(f"/batches/{finished_jobs['batch_id']}")
    progress = page.locator("progress#batch-progress")
    expect(progress).to_have_attribute("max", str(len(jobs)))
    expect(progress).to_have_attribute("value", str(len(jobs)))
    table_rows = page.locator("table#batch-table tr.job-row")
    expect(table_rows).to_have_count(len(jobs))
    assert [r.get_attribute("data-job-id") for r in table_rows.all()] == [j["id"] for j in jobs]
    counts = {b.get_attribute("data-emotion"): int(b.get_attribute("data-count") or 0)
              for b in page.locator("#batch-distribution .bar").all()}
    for emotion in EMOTIONS:
        assert counts[emotion] == sum(1 for j in jobs if j["result"]["emotion"] == emotion)
    href = page.locator("a#export-csv").get_attribute("href") or ""
    assert urlsplit(href).path == "/api/v1/export"
    assert parse_qs(urlsplit(href).query) == {"format": ["csv"], "batch": [finished_jobs["batch_id"]]}


PROBE = """() => new Promise((resolve) => {
    document.addEventListener("securitypolicyviolation", (e) => resolve(e.violatedDirective), {once: true});
    document.body.insertAdjacentHTML("beforeend", '<p id="csp-probe" style="color: rgb(255, 0, 0)">probe</p>');
    setTimeout(() => resolve(null), 3000);
})"""


def test_pages_draw_their_charts_under_a_policy_that_refuses_inline_style(browser: Any, live_server: str,
                                                                         finished_jobs: dict[str, Any]) -> None:
    """The bars are SVG sized by attributes, so they draw under ``style-src 'self'``; and the policy is
    really enforced (an inline style added afterwards is refused), so the ``page`` fixture's check that
    nothing was blocked means something."""
    context = browser.new_context(base_url=live_server)
    try:
        page = context.new_page()
        job = finished_jobs["jobs"][0]
        response = page.goto(f"/jobs/{job['id']}")
        assert response is not None and "style-src 'self'" in response.headers["content-security-policy"]
        top = job["result"]["emotion"]
        bar = page.locator(f'#chart-ensemble .bar[data-emotion="{top}"]')
        fill, track = bar.locator(".fill").bounding_box(), bar.locator(".track").bounding_box()
        assert fill and track and track["width"] > 50
        assert math.isclose(fill["width"] / track["width"], job["result"]["probabilities"][top], abs_tol=0.02)
        colour = bar.locator(".fill").evaluate("el => getComputedStyle(el).fill")
        assert colour not in ("", "none", "rgb(0, 0, 0)"), colour  # the emotion's colour, from its class
        assert page.evaluate(PROBE) == "style-src-attr"
        assert page.locator("#csp-probe").evaluate("el => getComputedStyle(el).color") != "rgb(255, 0, 0)"
    finally:
        context.close()
