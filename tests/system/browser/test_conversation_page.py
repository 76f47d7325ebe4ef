"""A stereo call's job page in Chromium: one lane per speaker on the waveform's time axis, click to play.

The call is real speech (two RAVDESS actors, one per channel, taking turns) uploaded to a server of
its own whose queue no worker reads; its result is stored as the worker stores it
(``tests.conversations``), with the turns where the audio has them. The alignment is measured on the
rendered page: every track's box, and every band against the time it stands for.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import soundfile as sf
from playwright.sync_api import expect

from bench import calls
from bench.calls import Line, build_call, write
from ser_shared.settings import REPO_ROOT, Settings
from tests.conftest import RAVDESS, WorkerProcess, private_database, ravdess_file
from tests.conversations import AGENT, CUSTOMER, call, finish
from tests.live_server import serve
from tests.system.browser.conftest import checked_page, wait_jobs
from web import create_app

pytestmark = pytest.mark.slow  # Chromium

QUEUE = "conversation-page-unread"
RATE = 16000
DURATION = 12.0  # the stored conversation's (tests.conversations.call)
TRACKS = ("#waveform", "#spectrogram", "#lane-0", "#lane-1", "#ruler")


def _stereo_call(path: Path) -> None:
    """The agent's turns on the left channel, the customer's on the right, at the stored segments' times."""
    audio = np.zeros((int(DURATION * RATE), 2), np.float32)
    turns = [(0, AGENT[0], ravdess_file(1, "01")), (1, CUSTOMER[0], ravdess_file(2, "01", statement="02")),
             (0, AGENT[1], ravdess_file(1, "01", statement="02")), (1, CUSTOMER[1], ravdess_file(2, "05"))]
    for side, seg, source in turns:
        speech, rate = sf.read(source, dtype="float32")
        speech = speech[:: rate // RATE]  # 48 kHz to 16 kHz, a picture's worth of quality
        onset = int(np.argmax(np.abs(speech) > 0.05 * np.abs(speech).max()))  # the actor's first sound
        start, length = int(seg["start"] * RATE), int((seg["end"] - seg["start"]) * RATE)
        clip = speech[onset:onset + length]
        audio[start:start + len(clip), side] = clip
    sf.write(path, audio, RATE, subtype="PCM_16")


@pytest.fixture(scope="module")
def call_server(pg_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A server on a database of its own with one analysed stereo call (and a calm one) in it."""
    with private_database(pg_settings, default_queue=QUEUE) as settings:
        app = create_app(settings)
        client = app.test_client()
        path = tmp_path_factory.mktemp("call") / "stereo-call.wav"
        _stereo_call(path)
        ids = []
        for escalation in (True, False):
            resp = client.post("/api/v1/jobs", content_type="multipart/form-data",
                               data={"file": [(path.open("rb"), f"call-{escalation}.wav")], "channels": "split",
                                     "channel_labels": "agent,customer"})
            assert resp.status_code == 202, resp.get_data(as_text=True)
            job_id = resp.get_json()["jobs"][0]["id"]
            channels, conversation, segments = call(escalation=escalation)
            finish(app.extensions["ser"].sessions, uuid.UUID(job_id), channels, conversation, segments)
            ids.append(job_id)
        try:
            with serve(app) as url:
                yield {"url": url, "escalated": ids[0], "calm": ids[1], "channels": call()[0], "app": app}
        finally:
            app.extensions["ser"].engine.dispose()
            redis.Redis.from_url(settings.broker_url or "").delete(QUEUE)


@pytest.fixture
def tab(browser: Any, call_server: dict[str, Any]) -> Iterator[Any]:
    with checked_page(browser, call_server["url"]) as page:
        yield page


def _open(tab: Any, job_id: str) -> None:
    tab.goto(f"/jobs/{job_id}")
    for image in ("img#waveform", "img#spectrogram"):
        tab.locator(image).evaluate("img => img.decode()")


def _box(tab: Any, selector: str) -> dict[str, float]:
    box = tab.locator(selector).bounding_box()
    assert box is not None, selector
    return dict(box)


def _assert_aligned(tab: Any, channels: list[dict[str, Any]], duration: float = DURATION) -> None:
    """Every track spans the same pixels, and each band and escalation mark covers its own seconds."""
    axis = _box(tab, "#waveform")
    assert axis["width"] > 300
    for selector in TRACKS:
        box = _box(tab, selector)
        assert math.isclose(box["x"], axis["x"], abs_tol=0.5), (selector, box, axis)
        assert math.isclose(box["width"], axis["width"], abs_tol=0.5), (selector, box, axis)
    px = axis["width"] / duration
    for ch in channels:
        bands = tab.locator(f"#lane-{ch['index']} rect.segment")
        expect(bands).to_have_count(len(ch["segments"]))
        for k, seg in enumerate(ch["segments"]):
            box = bands.nth(k).bounding_box()
            assert math.isclose(box["x"], axis["x"] + seg["start"] * px, abs_tol=1.0), (ch["label"], k, box)
            assert math.isclose(box["width"], (seg["end"] - seg["start"]) * px, abs_tol=1.0), (ch["label"], k, box)
        marks = tab.locator(f"#lane-{ch['index']} rect.escalation")
        expect(marks).to_have_count(len(ch["metrics"]["escalations"]))
        for k, mark in enumerate(ch["metrics"]["escalations"]):
            box = marks.nth(k).bounding_box()
            assert math.isclose(box["x"], axis["x"] + mark["start"] * px, abs_tol=1.0)
            assert math.isclose(box["x"] + box["width"], axis["x"] + mark["end"] * px, abs_tol=1.0)


def test_lanes_line_up_with_the_waveform_and_spectrogram(tab: Any, call_server: dict[str, Any]) -> None:
    _open(tab, call_server["escalated"])
    expect(tab.locator("svg.lane")).to_have_count(2)
    _assert_aligned(tab, call_server["channels"])
    # The metrics stand beside the lanes, to the right of the axis, each beside its own lane.
    axis, lane, side = _box(tab, "#waveform"), _box(tab, "#lane-1"), _box(tab, "#speaker-metrics-1")
    assert side["x"] >= axis["x"] + axis["width"] and abs(side["y"] - lane["y"]) < 2
    expect(tab.locator("#speaker-metrics-1 [data-metric=talk_share]")).to_have_attribute(
        "data-value", str(call_server["channels"][1]["metrics"]["talk_share"]))
    expect(tab.locator("#escalation-flag")).to_contain_text("customer ends clearly more negative")
    # A band's colour is its emotion's, from its class (the CSP allows no inline style).
    angry = tab.locator("#lane-1 rect.segment").nth(1)
    expect(angry).to_have_attribute("data-emotion", "angry")
    assert angry.evaluate("el => getComputedStyle(el).fill") == "rgb(216, 59, 59)"


def test_alignment_holds_on_a_narrow_screen(tab: Any, call_server: dict[str, Any]) -> None:
    tab.set_viewport_size({"width": 640, "height": 900})
    _open(tab, call_server["escalated"])
    _assert_aligned(tab, call_server["channels"])
    tab.set_viewport_size({"width": 1700, "height": 900})
    _assert_aligned(tab, call_server["channels"])


PLAYING = "() => { const p = document.getElementById('player'); return !p.paused && p.currentTime > 0; }"
# After the pause the player reports its time once more, and every lane's playhead moves there.
HEADS_AT_TIME = f"""() => {{
    const p = document.getElementById('player');
    return [...document.querySelectorAll('#axis .playhead')].every(
        (line) => Math.abs(parseFloat(line.getAttribute('x1')) - 100 * p.currentTime / {DURATION}) < 0.05);
}}"""


def _played_from(tab: Any) -> float:
    """Wait until the player runs, pause it, check the playheads, and return where it was."""
    tab.wait_for_function(PLAYING)
    time: float = tab.evaluate("() => { const p = document.getElementById('player'); p.pause(); "
                               "return p.currentTime; }")
    tab.wait_for_function(HEADS_AT_TIME)
    return time


def _near(start: float, time: float) -> bool:
    return start - 0.01 <= time < start + 1.0  # seeking lands within a sample; then it plays a moment


def test_click_a_band_a_word_or_a_line_to_play_from_there(tab: Any, call_server: dict[str, Any]) -> None:
    _open(tab, call_server["escalated"])
    tab.evaluate("() => { const p = document.getElementById('player'); p.muted = true; }")
    customer = call_server["channels"][1]
    angry = customer["segments"][1]
    tab.locator("#lane-1 rect.segment").nth(1).click()
    assert _near(angry["start"], _played_from(tab))

    word = angry["words"][3]
    tab.locator(f'#lane-1 tspan[data-start="{word["start"]}"]').click()
    assert _near(word["start"], _played_from(tab))

    line = tab.locator("#conversation-transcript li").nth(2)
    start = float(line.get_attribute("data-start") or "nan")
    line.click()
    assert _near(start, _played_from(tab))

    # The keyboard reaches the bands too: Enter on a focused band plays it.
    first = call_server["channels"][0]["segments"][1]
    tab.locator("#lane-0 rect.segment").nth(1).focus()
    tab.keyboard.press("Enter")
    assert _near(first["start"], _played_from(tab))


def test_history_shows_speakers_and_filters_by_escalation(tab: Any, call_server: dict[str, Any]) -> None:
    tab.goto("/history")
    row = tab.locator(f'tr.job-row[data-job-id="{call_server["escalated"]}"]')
    expect(row.locator(".speaker")).to_have_count(2)
    for ch in call_server["channels"]:
        speaker = row.locator(f'.speaker[data-label="{ch["label"]}"]')
        expect(speaker).to_have_attribute("data-emotion", ch["emotion"])
        expect(speaker.locator(f".emo.emo-{ch['emotion']}")).to_be_visible()
    expect(row.locator(".escalation-flag")).to_be_visible()
    expect(tab.locator(f'tr.job-row[data-job-id="{call_server["calm"]}"] .escalation-flag')).to_have_count(0)
    tab.locator('form#filters select[name="escalation"]').select_option("true")
    tab.locator('form#filters button[type="submit"]').click()
    tab.wait_for_url("**escalation=true**")
    expect(tab.locator(f'tr.job-row[data-job-id="{call_server["escalated"]}"]')).to_have_count(1)
    expect(tab.locator(f'tr.job-row[data-job-id="{call_server["calm"]}"]')).to_have_count(0)
    rows = tab.locator("tr.job-row")
    expect(rows.locator(".escalation-flag")).to_have_count(rows.count())  # every row listed escalated


# Six exchanges: the customer calm for three, angry for the last three (enough speech in each third
# of theirs for the call's escalation rule to judge).
TURNING_ANGRY = tuple(
    line for k in range(6) for line in (
        Line(0, calls.AGENT, calls.NEUTRAL, statement=f"0{1 + k % 2}", rep=f"0{1 + k // 2 % 2}", gap_s=0.6),
        Line(1, calls.CUSTOMER, calls.NEUTRAL if k < 3 else calls.ANGRY, "01" if k < 3 else "02",
             statement=f"0{1 + k % 2}", rep=f"0{1 + k // 2 % 2}", gap_s=0.7 if k != 4 else -0.4)))


def test_a_call_the_worker_analysed(page: Any, worker: WorkerProcess, tmp_path: Path) -> None:
    """The same page for a call a real worker split and analysed (``bench.calls``: two actors, the
    customer turning angry, an overlap, crosstalk): lanes as the result has them, on the waveform's axis.
    With SER_SCREENSHOTS=1 it is the README's screenshot of a stereo call."""
    path = write(build_call(RAVDESS, TURNING_ANGRY).audio, tmp_path / "stereo-call.wav")
    resp = page.request.post("/api/v1/jobs", multipart={
        "file": {"name": path.name, "mimeType": "audio/wav", "buffer": path.read_bytes()},
        "channels": "split", "channel_labels": "agent,customer", "transcribe": "whisper"})
    assert resp.status == 202, resp.text()
    (job,) = wait_jobs(page.request, [resp.json()["jobs"][0]["id"]], timeout=180)
    assert job["status"] == "succeeded", job
    for _ in range(240):  # the transcript stage follows the emotion: its words go under the bands
        if job["result"]["transcript"]["status"] != "pending":
            break
        page.wait_for_timeout(500)
        job = page.request.get(f"/api/v1/jobs/{job['id']}").json()
    assert job["result"]["transcript"]["status"] == "succeeded", job["result"]["transcript"]
    channels = job["result"]["channels"]
    _open(page, job["id"])
    expect(page.locator("svg.lane")).to_have_count(len(channels))
    _assert_aligned(page, channels, job["duration_s"])
    expect(page.locator("svg.lane svg.words").first).to_be_visible()
    if os.environ.get("SER_SCREENSHOTS") == "1":
        page.screenshot(path=str(REPO_ROOT / "docs" / "screenshots" / "conversation.png"), full_page=True)


def test_a_history_row_shows_the_speakers_once_its_call_finishes(tab: Any, call_server: dict[str, Any]) -> None:
    """live.js draws a finishing row's speakers and flag as the server-rendered rows have them."""
    app = call_server["app"]
    client = app.test_client()
    resp = client.post("/api/v1/jobs", content_type="multipart/form-data",
                       data={"file": [(ravdess_file(5, "01").open("rb"), "late-call.flac")],
                             "client_reference": "late"})
    job_id = resp.get_json()["jobs"][0]["id"]
    tab.goto("/history?client_reference=late")
    row = tab.locator(f'tr.job-row[data-job-id="{job_id}"]')
    expect(row).to_have_attribute("data-status", "queued")
    expect(row.locator(".speaker")).to_have_count(0)
    channels, conversation, segments = call(escalation=True)
    finish(app.extensions["ser"].sessions, uuid.UUID(job_id), channels, conversation, segments)
    expect(row).to_have_attribute("data-status", "succeeded")
    expect(row.locator(".speaker")).to_have_count(2)
    for ch in channels:
        expect(row.locator(f'.speaker[data-label="{ch["label"]}"] .emo.emo-{ch["emotion"]}')).to_be_visible()
    expect(row.locator(".escalation-flag")).to_be_visible()
