"""The upload page in Chromium: file input, drop, client-side checks, live status, microphone."""

from __future__ import annotations

import base64
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from playwright.sync_api import expect

from ser_shared.emotions import EMOTIONS
from tests.conftest import WorkerProcess, ravdess_file
from tests.system.browser.conftest import wait_jobs

pytestmark = pytest.mark.slow  # a live server, a real worker and Chromium

DONE = 90_000  # ms: a cold worker's first chunk included


def item(page: Any, filename: str) -> Any:
    return page.locator(f'li.upload-item[data-filename="{filename}"]')


def expect_succeeded(page: Any, filename: str) -> dict[str, str]:
    """Wait for the item to read succeeded; return what it shows."""
    row = item(page, filename)
    expect(row).to_have_attribute("data-status", "succeeded", timeout=DONE)
    expect(row.locator(".status .state")).to_have_text("succeeded")
    link = row.locator("a.job-link")
    job_id = row.get_attribute("data-job-id") or ""
    expect(link).to_have_attribute("href", f"/jobs/{job_id}")
    return {"job_id": job_id, "emotion": row.locator(".emotion").inner_text(),
            "progress": row.locator("progress").get_attribute("value") or ""}


def api_posts(page: Any) -> list[str]:
    """Record every POST the page sends to the jobs endpoint."""
    sent: list[str] = []
    page.on("request", lambda r: sent.append(r.url) if r.method == "POST" and "/api/v1/jobs" in r.url else None)
    return sent


def test_file_input_uploads_a_batch_and_shows_each_result(page: Any, worker: WorkerProcess, copy_to: Any) -> None:
    files = [copy_to(ravdess_file(6, code)) for code in ("03", "04", "06")]
    page.goto("/")
    sent = api_posts(page)
    page.set_input_files("#file-input", [str(f) for f in files])
    shown = [expect_succeeded(page, f.name) for f in files]
    assert len(sent) == 1  # three small files travel as one group
    jobs = wait_jobs(page.request, [s["job_id"] for s in shown])
    for s, job in zip(shown, jobs, strict=True):
        assert job["status"] == "succeeded"
        assert s["emotion"] == job["result"]["emotion"] and s["emotion"] in EMOTIONS
        assert s["progress"] == "100"
    assert len({j["batch_id"] for j in jobs}) == 1
    batch_link = page.locator("#upload-batches a.batch-link")
    expect(batch_link).to_have_attribute("href", f"/batches/{jobs[0]['batch_id']}")


def test_dropped_file_is_uploaded(page: Any, worker: WorkerProcess) -> None:
    src = ravdess_file(7, "05")
    page.goto("/")
    page.evaluate(
        """([name, b64]) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, {type: "audio/flac"}));
            const zone = document.getElementById("drop-zone");
            for (const type of ["dragenter", "dragover", "drop"]) {
                zone.dispatchEvent(new DragEvent(type, {dataTransfer: dt, bubbles: true, cancelable: true}));
            }
        }""",
        [src.name, base64.b64encode(src.read_bytes()).decode()])
    shown = expect_succeeded(page, src.name)
    job = wait_jobs(page.request, [shown["job_id"]])[0]
    assert job["filename"] == src.name and job["format"] == "flac"
    assert job["size_bytes"] == src.stat().st_size  # every byte arrived


def expect_folder_uploaded(page: Any, recordings: list[Path]) -> None:
    """Each recording of the folder became a succeeded job with all its bytes; the one note in it
    was skipped and counted, never listed."""
    shown = [expect_succeeded(page, f.name) for f in recordings]
    expect(page.locator("#upload-message")).to_contain_text("1 file(s) in the folder are not recordings")
    expect(item(page, "notes.txt")).to_have_count(0)
    jobs = sorted(wait_jobs(page.request, [s["job_id"] for s in shown]), key=lambda j: j["filename"])
    assert [j["filename"] for j in jobs] == sorted(f.name for f in recordings)
    assert all(j["status"] == "succeeded" for j in jobs)
    assert [j["size_bytes"] for j in jobs] == [f.stat().st_size for f in sorted(recordings, key=lambda f: f.name)]


def test_chosen_folder_uploads_its_recordings_and_skips_the_rest(page: Any, worker: WorkerProcess,
                                                                  tmp_path: Path) -> None:
    """A folder with a subfolder and a note in it, picked through the folder input (Chromium's
    webkitdirectory; a synthetic drop cannot carry directory entries)."""
    folder = tmp_path / "calls"
    (folder / "monday").mkdir(parents=True)
    sources = [ravdess_file(8, "03"), ravdess_file(8, "05"), ravdess_file(9, "04")]
    targets = [folder / sources[0].name, folder / sources[1].name, folder / "monday" / sources[2].name]
    for src, dst in zip(sources, targets, strict=True):
        dst.write_bytes(src.read_bytes())
    (folder / "notes.txt").write_text("call notes, not audio\n")
    page.goto("/")
    expect(page.locator(".folder-pick")).to_be_visible()
    page.set_input_files("#folder-input", str(folder))
    expect_folder_uploaded(page, targets)


def test_dropped_folder_is_walked_page_by_page_and_its_recordings_uploaded(page: Any, worker: WorkerProcess) -> None:
    """A dropped folder, with a subfolder and a note. Chromium will not put a directory into a
    synthetic drop, so the drop carries stand-in entries with the FileSystemEntry interface
    (``webkitGetAsEntry``, ``createReader``, ``readEntries`` handing the listing out in pages as
    Chromium does past 100 entries, ``file``) around real File objects; the walk, the filtering
    and the upload are the page's own."""
    sources = [ravdess_file(10, "03"), ravdess_file(10, "06"), ravdess_file(11, "04")]
    payload = [[src.name, base64.b64encode(src.read_bytes()).decode()] for src in sources]
    page.goto("/")
    page.evaluate(
        """(files) => {
            const real = files.map(([name, b64]) =>
                new File([Uint8Array.from(atob(b64), c => c.charCodeAt(0))], name, {type: "audio/flac"}));
            const fileEntry = (f) => ({isFile: true, isDirectory: false, name: f.name, file: (ok) => ok(f)});
            const dirEntry = (name, pages) => ({isFile: false, isDirectory: true, name, createReader: () => {
                let i = 0;
                return {readEntries: (ok) => setTimeout(() => ok(i < pages.length ? pages[i++] : []), 0)};
            }});
            const note = new File(["call notes, not audio"], "notes.txt", {type: "text/plain"});
            const monday = dirEntry("monday", [[fileEntry(real[2])]]);
            const calls = dirEntry("calls", [[fileEntry(real[0]), fileEntry(note)], [monday, fileEntry(real[1])]]);
            const ev = new Event("drop", {bubbles: true, cancelable: true});
            Object.defineProperty(ev, "dataTransfer", {value: {items: [{webkitGetAsEntry: () => calls}], files: []}});
            document.getElementById("drop-zone").dispatchEvent(ev);
        }""",
        payload)
    expect_folder_uploaded(page, sources)


def test_wrong_type_and_oversized_files_are_refused_without_a_request(page: Any, tmp_path: Path) -> None:
    page.goto("/")
    sent = api_posts(page)
    limit = int(page.locator("#upload-form").get_attribute("data-max-file-bytes") or 0)
    assert limit > 0
    notes = tmp_path / "notes.txt"
    notes.write_text("not audio")
    page.set_input_files("#file-input", [str(notes)])
    # An oversized file is built in the page: a zero-filled buffer, never sent anywhere.
    page.evaluate(
        """(size) => {
            const dt = new DataTransfer();
            dt.items.add(new File([new Uint8Array(size)], "huge.wav", {type: "audio/wav"}));
            document.getElementById("drop-zone").dispatchEvent(
                new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
        }""", limit + 1)
    txt, big = item(page, "notes.txt"), item(page, "huge.wav")
    expect(txt).to_have_attribute("data-status", "rejected")
    expect(txt.locator(".status")).to_contain_text("not an audio file this service reads")
    expect(txt.locator(".status")).to_contain_text(".flac")
    expect(big).to_have_attribute("data-status", "rejected")
    expect(big.locator(".status")).to_contain_text(re.compile(r"too large: [\d.]+ MiB; the limit is [\d.]+ MiB"))
    expect(page.locator("#upload-message")).to_be_visible()
    expect(big.locator("a.job-link")).to_have_count(0)
    page.wait_for_timeout(500)  # a request, if one were sent, would have started by now
    assert sent == []


def envelope(data: bytes) -> np.ndarray:
    """RMS per 10 ms of any audio ffmpeg reads, at 16 kHz mono: robust to Opus coding and gain."""
    pcm = subprocess.run(["ffmpeg", "-v", "error", "-i", "pipe:0", "-ac", "1", "-ar", "16000", "-f", "s16le", "-"],
                         input=data, capture_output=True, check=True).stdout
    x = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768
    n = len(x) // 160
    return np.sqrt((x[: n * 160].reshape(n, 160) ** 2).mean(axis=1))


def best_match(recorded: np.ndarray, source: np.ndarray) -> float:
    """Highest correlation of the recording's envelope with the (looping) source's at any start."""
    looped = np.tile(source, 3)
    best = -1.0
    for lag in range(len(source)):
        y = looped[lag: lag + len(recorded)]
        x, y = recorded - recorded.mean(), y - y.mean()
        best = max(best, float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum() + 1e-12)))
    return best


def test_microphone_recording_becomes_a_job_with_a_result(page: Any, worker: WorkerProcess, mic_wav: Path) -> None:
    page.goto("/")
    expect(page.locator("#recorder")).to_be_visible()
    page.click("#record-start")
    expect(page.locator("#record-status")).to_contain_text("Recording… 3 s", timeout=10_000)
    page.click("#record-stop")
    expect(page.locator("#record-status")).to_contain_text("sending it for analysis")
    row = page.locator("li.upload-item").first
    name = row.get_attribute("data-filename") or ""
    assert re.fullmatch(r"recording-\d{8}-\d{6}\.webm", name), name
    shown = expect_succeeded(page, name)
    assert shown["emotion"] in EMOTIONS
    job = wait_jobs(page.request, [shown["job_id"]])[0]
    # What arrived is Chromium's Opus-in-WebM capture of the speech file, decoded by the server.
    assert job["format"] == "webm" and job["result"]["emotion"] == shown["emotion"]
    assert job["duration_s"] is None or 1.5 < job["duration_s"] < 10
    assert job["size_bytes"] > 5_000
    # The recording is the speech file Chromium was told to capture, not its default beep: measured,
    # that file matches at about 0.82, other RAVDESS sentences at most 0.63 and a beep about 0.3.
    recorded = envelope(page.request.get(f"/api/v1/jobs/{job['id']}/audio").body())
    match = best_match(recorded, envelope(mic_wav.read_bytes()))
    print(f"microphone recording: {len(recorded) / 100:.1f} s, envelope correlation {match:.2f}")
    assert len(recorded) > 150 and match > 0.7, match


def test_plain_form_still_uploads_without_javascript(browser: Any, live_server: str, copy_to: Any) -> None:
    context = browser.new_context(base_url=live_server, java_script_enabled=False)
    try:
        page = context.new_page()
        page.goto("/")
        expect(page.locator("#upload-submit")).to_be_visible()
        src = copy_to(ravdess_file(9, "02"))
        page.set_input_files("#file-input", [str(src)])
        page.click("#upload-submit")
        page.wait_for_url(re.compile(r"/batches/[0-9a-f-]{36}$"))
        expect(page.locator("table#batch-table tr.job-row")).to_have_count(1)
        expect(page.locator("table#batch-table")).to_contain_text(src.name)
    finally:
        context.close()


def test_upload_with_authentication_on_sends_the_csrf_token(browser: Any, auth_server: tuple[str, str],
                                                            worker: WorkerProcess, copy_to: Any) -> None:
    url, key = auth_server
    context = browser.new_context(base_url=url)
    try:
        page = context.new_page()
        page.goto("/")
        page.wait_for_url(re.compile(r"/login\?next=/$"))
        page.fill('#login-form input[name="key"]', key)
        page.click('#login-form button[type="submit"]')
        page.wait_for_url(f"{url}/")
        token = page.locator('meta[name="csrf-token"]').get_attribute("content")
        assert token
        headers: list[dict[str, str]] = []
        page.on("request", lambda r: headers.append(r.headers) if r.method == "POST" else None)
        src = copy_to(ravdess_file(10, "06"))
        page.set_input_files("#file-input", [str(src)])
        shown = expect_succeeded(page, src.name)
        assert [h.get("x-csrf-token") for h in headers] == [token]
        # The session alone is not enough: the same POST without the header is refused.
        status = page.evaluate("""async () => {
            const body = new FormData();
            body.append("file", new File([new Uint8Array(64)], "x.wav"));
            return (await fetch("/api/v1/jobs", {method: "POST", body})).status;
        }""")
        assert status == 403
        assert page.request.get(f"/api/v1/jobs/{shown['job_id']}").json()["status"] == "succeeded"
    finally:
        context.close()


def test_progress_is_shown_per_file_while_uploading(page: Any, worker: WorkerProcess, tmp_path: Path) -> None:
    wavs = []
    for actor in (11, 12):
        wav = tmp_path / f"actor{actor}.wav"
        subprocess.run(["ffmpeg", "-v", "error", "-i", str(ravdess_file(actor, "03")), "-ar", "48000", "-ac", "2",
                        "-c:a", "pcm_s16le", str(wav)], check=True)
        wavs.append(wav)
    page.goto("/")
    # Throttled to 512 KiB/s, the two files (about 1.3 MB each) take a few seconds to send.
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": -1,
                                                  "uploadThroughput": 512 * 1024})
    page.evaluate("""() => {
        window.progressLog = [];
        setInterval(() => window.progressLog.push(
            Array.from(document.querySelectorAll("li.upload-item progress"), p => p.value)), 50);
    }""")
    page.set_input_files("#file-input", [str(w) for w in wavs])
    for wav in wavs:
        expect_succeeded(page, wav.name)
    # Items are listed newest first: column 1 is the first file, column 0 the second.
    log = [row for row in page.evaluate("window.progressLog") if len(row) == 2]
    second, first = [r[0] for r in log], [r[1] for r in log]
    assert any(0 < v < 100 for v in first) and any(0 < v < 100 for v in second), log
    assert first == sorted(first) and second == sorted(second)
    # One request, in file order: the second file only moves once the first is through.
    assert all(f == 100 for f, s in zip(first, second, strict=True) if s > 0)
