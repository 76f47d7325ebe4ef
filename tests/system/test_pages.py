"""History, job and batch pages: filters, sorting, keyset pages, summary, charts, images, delete, export.

The filter tests run on a batch of synthetic job rows written straight into Postgres (known values,
so each filter's answer is known); the job and batch page tests on real uploads analysed by a real
worker.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import struct
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from ser_shared import storage
from ser_shared.db import make_engine, make_session_factory
from ser_shared.emotions import EMOTIONS
from ser_shared.models import Batch, Job, Result
from ser_shared.settings import REPO_ROOT, Settings
from tests.conftest import private_database, ravdess_file, wait_for
from tests.helpers import multipart, read
from web import images

# ---------------------------------------------------------------------------------------------
# A small reader of the pages' contract: rows, elements by id, bars.


@dataclass
class Page:
    rows: list[dict[str, str]] = field(default_factory=list)
    by_id: dict[str, dict[str, str]] = field(default_factory=dict)
    bars: dict[str, list[dict[str, str]]] = field(default_factory=dict)  # chart id -> its .bar elements
    cells: dict[str, dict[str, str]] = field(default_factory=dict)  # job id -> cell class -> text
    status_counts: dict[str, int] = field(default_factory=dict)  # from #summary-status
    text: str = ""


class _Reader(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.page = Page()
        self.chart: str | None = None
        self.row: str | None = None
        self.cell: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        classes = a.get("class", "").split()
        if "id" in a:
            self.page.by_id[a["id"]] = {"tag": tag, **a}
        if tag == "div" and "chart" in classes:
            self.chart = a.get("id")
            self.page.bars[self.chart or ""] = []
        if "bar" in classes and self.chart is not None:
            self.page.bars[self.chart].append(a)
        if tag == "li" and "data-status" in a and "data-count" in a:
            self.page.status_counts[a["data-status"]] = int(a["data-count"])
        if tag == "tr" and "job-row" in classes:
            self.page.rows.append(a)
            self.row = a["data-job-id"]
            self.page.cells[self.row] = {}
        if tag == "td" and self.row is not None:
            self.cell = classes[0] if classes else ""
            self.page.cells[self.row][self.cell] = ""
        if self.row is not None and "uncertain" in classes:
            self.page.cells[self.row]["uncertain-marker"] = "yes"
        if self.row is not None and "confbar" in classes:
            self.page.cells[self.row]["data-confidence"] = a.get("data-confidence", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self.row = self.cell = None
        elif tag == "td":
            self.cell = None

    def handle_data(self, data: str) -> None:
        self.page.text += data
        if self.row is not None and self.cell is not None:
            self.page.cells[self.row][self.cell] += data


def parse(html: str) -> Page:
    reader = _Reader()
    reader.feed(html)
    return reader.page


def get_page(client, url: str) -> Page:  # type: ignore[no-untyped-def]
    resp = client.get(url)
    assert resp.status_code == 200, resp.get_data(as_text=True)[:2000]
    return parse(resp.get_data(as_text=True))


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height of a PNG, after checking its signature and every chunk's CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF, tag
        chunks.append((tag, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    width, height = struct.unpack(">II", chunks[0][1][:8])
    raw = zlib.decompress(b"".join(body for tag, body in chunks if tag == b"IDAT"))
    assert len(raw) == height * (1 + 3 * width)  # 8-bit RGB scanlines, each with its filter byte
    return width, height


# ---------------------------------------------------------------------------------------------
# Synthetic history: 61 jobs in one batch, values chosen so every filter and sort has work to do.

N_SYNTHETIC = 61
STATUS_CYCLE = ("succeeded", "succeeded", "failed", "queued", "succeeded", "processing", "succeeded")
BASE_TIME = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _spec(i: int) -> dict[str, Any]:
    status = STATUS_CYCLE[i % len(STATUS_CYCLE)]
    done = status == "succeeded"
    return {
        "id": uuid.UUID(int=(i * 7919) % (1 << 64) + (1 << 100)),  # ids not in insertion order
        "filename": f"syn-{(i * 37) % 101:03d}-{EMOTIONS[i % 7]}.wav",
        "status": status,
        "emotion": EMOTIONS[(i + i // 7) % 7] if done else None,
        "confidence": round(0.2 + ((i * 13) % 80) / 100, 2) if done else None,
        # Some share a value, so the id tie-break matters; failed ones have no duration.
        "duration_s": None if status == "failed" else float(1 + (i % 9)),
        # Spread over 15 days, several per day; two jobs share each timestamp.
        "created_at": BASE_TIME + timedelta(hours=6 * (i // 2)),
    }


@pytest.fixture(scope="module")
def synthetic(pg_settings: Settings) -> Iterator[dict[str, Any]]:
    """The synthetic rows, in a database of their own (see ``private_database``), with an app on it."""
    with private_database(pg_settings) as settings:
        engine = make_engine(settings)
        try:
            yield _write_synthetic(make_session_factory(engine), settings)
        finally:
            engine.dispose()


def _write_synthetic(factory: sessionmaker[Session], settings: Settings) -> dict[str, Any]:
    from web import create_app

    app = create_app(settings)
    app.config["TESTING"] = True
    specs = [_spec(i) for i in range(N_SYNTHETIC)]
    with factory() as session:
        batch = Batch(file_count=len(specs), options={})
        session.add(batch)
        session.flush()
        for position, s in enumerate(specs):
            job = Job(batch_id=batch.id, position=position, size_bytes=1000, **s)
            if s["status"] == "failed":
                job.error_code, job.error_message = "decode_failed", "cannot decode the audio: test"
            session.add(job)
            if s["status"] == "succeeded":
                probs = dict.fromkeys(EMOTIONS, (1 - s["confidence"]) / 6) | {s["emotion"]: s["confidence"]}
                session.add(Result(job_id=s["id"], emotion=s["emotion"], confidence=s["confidence"],
                                   uncertain=s["confidence"] < 0.4, probabilities=probs,
                                   model_probabilities={"rf": probs, "lstm": probs},
                                   model_versions={"rf": "t", "lstm": "t"}, timings_ms={"total": 1.0},
                                   transcript={"status": "succeeded", "engine": "sphinx", "language": "en-US",
                                               "text": f"words of job {position} " * 12}))
        session.commit()
        return {"batch": str(batch.id), "specs": specs, "factory": factory, "client": app.test_client()}


def _expected(specs: list[dict[str, Any]], sort: str = "-created_at", **conditions: Any) -> list[str]:
    """The ids the history should list, in order: the reference implementation of filter + sort."""
    def keep(s: dict[str, Any]) -> bool:
        return all(check(s) for check in conditions.values())

    key = {"created_at": "created_at", "confidence": "confidence", "duration": "duration_s",
           "filename": "filename"}[sort.lstrip("-")]
    chosen = [s for s in specs if keep(s)]
    present = sorted((s for s in chosen if s[key] is not None), key=lambda s: (s[key], s["id"]),
                     reverse=sort.startswith("-"))
    missing = sorted((s for s in chosen if s[key] is None), key=lambda s: s["id"], reverse=sort.startswith("-"))
    return [str(s["id"]) for s in present + missing]


def _walk(client, url: str) -> list[str]:  # type: ignore[no-untyped-def]
    """Every job id on every page, following a#next-page."""
    ids: list[str] = []
    pages = 0
    while url:
        page = get_page(client, url)
        ids += [r["data-job-id"] for r in page.rows]
        url = page.by_id.get("next-page", {}).get("href", "").replace("&amp;", "&")
        pages += 1
        assert pages < 100
    return ids


SORTS = ["-created_at", "created_at", "confidence", "-confidence", "duration", "-duration", "filename", "-filename"]


@pytest.mark.parametrize("sort", SORTS)
def test_pages_of_each_sort_give_each_job_once_in_order(synthetic, sort: str) -> None:  # type: ignore[no-untyped-def]
    client = synthetic["client"]
    ids = _walk(client, f"/history?batch={synthetic['batch']}&sort={sort}&limit=7")
    assert ids == _expected(synthetic["specs"], sort)
    assert len(set(ids)) == N_SYNTHETIC


FILTERS = {
    "status=failed": {"s": lambda s: s["status"] == "failed"},
    "emotion=sad": {"e": lambda s: s["emotion"] == "sad"},
    "min_confidence=0.5": {"c": lambda s: s["confidence"] is not None and s["confidence"] >= 0.5},
    "min_confidence=0.3&max_confidence=0.6": {"c": lambda s: s["confidence"] is not None
                                              and 0.3 <= s["confidence"] <= 0.6},
    # Dates are whole days: "until" includes its own day.
    "since=2026-03-04&until=2026-03-06": {"d": lambda s: datetime(2026, 3, 4, tzinfo=UTC) <= s["created_at"]
                                          < datetime(2026, 3, 7, tzinfo=UTC)},
    "q=-ANGRY": {"q": lambda s: "-angry" in s["filename"]},
    "status=succeeded&emotion=happy&min_confidence=0.4": {
        "s": lambda s: s["status"] == "succeeded", "e": lambda s: s["emotion"] == "happy",
        "c": lambda s: s["confidence"] is not None and s["confidence"] >= 0.4},
}


@pytest.mark.parametrize("query", list(FILTERS))
@pytest.mark.parametrize("sort", ["-created_at", "confidence"])
def test_each_filter_narrows_correctly(synthetic, query: str, sort: str) -> None:  # type: ignore[no-untyped-def]
    client = synthetic["client"]
    expected = _expected(synthetic["specs"], sort, **FILTERS[query])
    assert 0 < len(expected) < N_SYNTHETIC
    assert _walk(client, f"/history?batch={synthetic['batch']}&{query}&sort={sort}&limit=10") == expected


def test_batch_filter_keeps_other_batches_out(synthetic) -> None:  # type: ignore[no-untyped-def]
    client = synthetic["client"]
    factory = synthetic["factory"]
    with factory() as session:
        other = Batch(file_count=1, options={})
        session.add(other)
        session.flush()
        session.add(Job(batch_id=other.id, filename="syn-other.wav", status="queued", created_at=BASE_TIME))
        session.commit()
        other_id = str(other.id)
    assert [r["data-job-id"] for r in get_page(client, f"/history?batch={other_id}").rows] != []
    mine = _walk(client, f"/history?batch={synthetic['batch']}&q=syn-&limit=50")
    assert len(mine) == N_SYNTHETIC  # the other batch's syn-other.wav matches q but not the batch


def test_rows_carry_the_contract(synthetic) -> None:  # type: ignore[no-untyped-def]
    client = synthetic["client"]
    page = get_page(client, f"/history?batch={synthetic['batch']}&limit=50")
    specs = {str(s["id"]): s for s in synthetic["specs"]}
    assert {"filters", "history-table", "summary", "summary-emotions", "summary-status", "summary-mean",
            "export-csv", "export-json", "next-page"} <= set(page.by_id)
    for row in page.rows:
        spec, cells = specs[row["data-job-id"]], page.cells[row["data-job-id"]]
        assert row["data-status"] == spec["status"] == cells["status"].strip()
        if spec["emotion"]:
            assert spec["emotion"] in cells["emotion"]
            assert float(cells["data-confidence"]) == pytest.approx(spec["confidence"])
            assert ("uncertain-marker" in cells) == (spec["confidence"] < 0.4)
            assert cells["transcript"].startswith("words of job") and len(cells["transcript"]) <= 80
        else:
            assert cells["data-confidence"] == "" and "uncertain-marker" not in cells
    # The live script and the styles are the app's own, not fetched from anywhere else.
    html = client.get(f"/history?batch={synthetic['batch']}").get_data(as_text=True)
    assert re.findall(r'(?:src|href)="(https?:)?//', html) == []
    assert client.get("/static/live.js").status_code == 200


@pytest.mark.parametrize("query", ["", "status=succeeded", "min_confidence=0.5", "since=2026-03-05",
                                   "q=-sad", "q=-happy"])
def test_summary_equals_direct_counts(synthetic, query: str) -> None:  # type: ignore[no-untyped-def]
    client = synthetic["client"]
    page = get_page(client, f"/history?batch={synthetic['batch']}&{query}")
    batch_id = uuid.UUID(synthetic["batch"])
    conditions = [Job.batch_id == batch_id]
    if query == "status=succeeded":
        conditions.append(Job.status == "succeeded")
    elif query == "min_confidence=0.5":
        conditions.append(Job.confidence >= 0.5)
    elif query == "since=2026-03-05":
        conditions.append(Job.created_at >= datetime(2026, 3, 5, tzinfo=UTC))
    elif query.startswith("q="):
        conditions.append(Job.filename.contains(query[2:]))
    with synthetic["factory"]() as session:
        def count(*extra: Any) -> int:
            return int(session.scalar(select(func.count()).select_from(Job).where(*conditions, *extra)) or 0)

        bars = {b["data-emotion"]: int(b["data-count"]) for b in page.bars["summary-emotions"]}
        assert bars == {e: count(Job.emotion == e) for e in EMOTIONS}
        mean = session.scalar(select(func.avg(Job.confidence)).where(*conditions))
        totals = {s: count(Job.status == s) for s in ("queued", "processing", "succeeded", "failed")}
    assert page.status_counts == totals
    shown = page.by_id["summary-mean"]["data-mean"]
    assert (shown == "") if mean is None else (float(shown) == pytest.approx(float(mean)))


def test_export_links_carry_the_filter(synthetic) -> None:  # type: ignore[no-untyped-def]
    client = synthetic["client"]
    page = get_page(client, f"/history?batch={synthetic['batch']}&status=succeeded&sort=confidence&limit=5")
    href = page.by_id["export-csv"]["href"].replace("&amp;", "&")
    assert "limit" not in href and "cursor" not in href
    rows = list(csv.DictReader(io.StringIO(client.get(href).get_data(as_text=True))))
    assert [r["job_id"] for r in rows] == _expected(synthetic["specs"], "confidence",
                                                    s=lambda s: s["status"] == "succeeded")
    body = json.loads(client.get(page.by_id["export-json"]["href"].replace("&amp;", "&")).get_data(as_text=True))
    assert [r["job_id"] for r in body] == [r["job_id"] for r in rows]


def test_ids_filter_for_live_polling(synthetic) -> None:  # type: ignore[no-untyped-def]
    client = synthetic["client"]
    wanted = [str(s["id"]) for s in synthetic["specs"][3:9]]
    body = client.get(f"/api/v1/jobs?ids={','.join(wanted)}").get_json()
    assert sorted(j["id"] for j in body["jobs"]) == sorted(wanted)
    assert {j["status"] for j in body["jobs"]} == {s["status"] for s in synthetic["specs"][3:9]}
    too_many = ",".join(str(uuid.uuid4()) for _ in range(201))
    assert client.get(f"/api/v1/jobs?ids={too_many}").status_code == 400
    resp = client.get("/api/v1/jobs?ids=not-a-uuid")
    assert resp.status_code == 400 and resp.get_json()["error"]["code"] == "invalid_parameter"


@pytest.mark.parametrize("query", ["sort=size", "min_confidence=2", "max_confidence=x", "until=yesterday"])
def test_bad_filters_are_400(client, query: str) -> None:  # type: ignore[no-untyped-def]
    resp = client.get(f"/api/v1/jobs?{query}")
    assert resp.status_code == 400 and resp.get_json()["error"]["code"] == "invalid_parameter"


def test_cursor_of_another_sort_is_refused(synthetic) -> None:  # type: ignore[no-untyped-def]
    client = synthetic["client"]
    first = client.get(f"/api/v1/jobs?batch={synthetic['batch']}&sort=confidence&limit=3").get_json()
    resp = client.get(f"/api/v1/jobs?batch={synthetic['batch']}&sort=filename&cursor={first['next_cursor']}")
    assert resp.status_code == 400


@pytest.mark.parametrize("value", ["abc", True, {"x": 1}, [1]])
def test_crafted_cursor_is_400_not_500(client, value: Any) -> None:  # type: ignore[no-untyped-def]
    raw = json.dumps(["confidence", value, str(uuid.uuid4())]).encode()
    cursor = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    resp = client.get(f"/api/v1/jobs?sort=confidence&cursor={cursor}")
    assert resp.status_code == 400 and resp.get_json()["error"]["code"] == "invalid_parameter"


# ---------------------------------------------------------------------------------------------
# Real jobs from the real worker.

REAL = [(1, "05"), (2, "03"), (3, "04")]


@pytest.fixture(scope="module")
def real_batch(app, pg_worker, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    client = app.test_client()
    silent = tmp_path_factory.mktemp("silent") / "silence.wav"
    sf.write(silent, np.zeros(32000, dtype=np.float32), 16000)
    files = [read(ravdess_file(actor, code)) for actor, code in REAL] + [read(silent)]
    resp = client.post("/api/v1/jobs", data=multipart(files, transcribe="sphinx"), content_type="multipart/form-data")
    assert resp.status_code == 202, resp.get_data(as_text=True)
    url = resp.get_json()["batch_url"]

    def done() -> dict[str, Any] | None:
        body = client.get(url).get_json()
        pending = [j for j in body["jobs"] if j["result"] and j["result"]["transcript"]
                   and j["result"]["transcript"]["status"] == "pending"]
        return body if body["done"] and not pending else None

    return wait_for(done, timeout=180)  # type: ignore[no-any-return]


@pytest.mark.slow
def test_job_page_shows_charts_images_audio_timings_versions(client, real_batch) -> None:  # type: ignore[no-untyped-def]
    for job in real_batch["jobs"][:3]:
        assert job["status"] == "succeeded", job
        page = get_page(client, f"/jobs/{job['id']}")
        result = job["result"]
        charts = {"chart-ensemble": result["probabilities"]} | {
            f"chart-{name}": m["probabilities"] for name, m in result["models"].items()}
        assert set(charts) == {"chart-ensemble", "chart-rf", "chart-lstm"}
        for chart, probs in charts.items():
            bars = {b["data-emotion"]: float(b["data-p"]) for b in page.bars[chart]}
            assert bars == pytest.approx(probs, abs=1e-9)
        player = page.by_id["player"]
        assert player["tag"] == "audio" and player["src"] == f"/api/v1/jobs/{job['id']}/audio"
        for name, size in (("waveform", (images.WIDTH, images.WAVE_HEIGHT)),
                           ("spectrogram", (images.WIDTH, images.SPEC_HEIGHT))):
            resp = client.get(page.by_id[name]["src"])
            assert resp.status_code == 200 and resp.mimetype == "image/png"
            assert png_size(resp.data) == size
            again = client.get(page.by_id[name]["src"], headers={"If-None-Match": resp.headers["ETag"]})
            assert again.status_code == 304
        html = client.get(f"/jobs/{job['id']}").get_data(as_text=True)
        timings = html[html.index('id="timings"'):html.index("</table>", html.index('id="timings"'))]
        assert set(re.findall(r'data-stage="(\w+)"', timings)) == set(result["timings_ms"])
        versions = html[html.index('id="model-versions"'):html.index("</dl>", html.index('id="model-versions"'))]
        assert all(m["version"] in versions for m in result["models"].values())
        transcript = html[html.index('id="transcript"'):html.index("</div>", html.index('id="transcript"'))]
        assert result["transcript"]["status"] == "succeeded"
        assert (result["transcript"]["text"] or "(no words") in transcript
        assert "error" not in page.by_id and "delete-form" in page.by_id


@pytest.mark.slow
def test_failed_job_says_why_in_plain_words(client, real_batch) -> None:  # type: ignore[no-untyped-def]
    failed = real_batch["jobs"][3]
    assert failed["status"] == "failed" and failed["error"]["code"] == "silent_audio"
    html = client.get(f"/jobs/{failed['id']}").get_data(as_text=True)
    error = html[html.index('id="error"'):html.index("</div>", html.index('id="error"'))]
    assert "The recording is silent" in error and "silent_audio" in error
    assert 'id="chart-ensemble"' not in html and 'id="waveform"' not in html


@pytest.mark.slow
def test_job_page_note_retraces_the_workers_result(client, real_batch) -> None:  # type: ignore[no-untyped-def]
    """The note's account of the ensemble, checked on real results: the served weights and temperature
    (read from the manifest the worker loaded) turn the models' probabilities into the worker's own
    confidence, and the note's blend is that weighted sum."""
    rule = json.loads((REPO_ROOT / "models" / "manifest.json").read_text())["ensemble"]
    weights, temperature = rule["weights"], rule["temperature"]
    for job in real_batch["jobs"][:3]:
        result = job["result"]
        models = {m: result["models"][m]["probabilities"] for m in weights}
        blend = {c: sum(w * models[m][c] for m, w in weights.items()) for c in EMOTIONS}
        scaled = {c: np.exp(np.log(max(p, 1e-7)) / temperature) for c, p in blend.items()}
        calibrated = {c: float(v / sum(scaled.values())) for c, v in scaled.items()}
        assert not result["segments"] or len(result["segments"]) == 1  # one clip: no averaging of parts
        assert calibrated == pytest.approx(result["probabilities"], abs=2e-4)
        # A temperature below 1 lifts the leading emotion above the blend, so possibly above both models.
        top = result["emotion"]
        assert (result["confidence"] > blend[top]) == (temperature < 1)
        page = get_page(client, f"/jobs/{job['id']}")
        assert page.by_id["model-link"]["href"] == "/model"
        assert float(page.by_id["worked-example"]["data-blend"]) == pytest.approx(blend[top], abs=1e-6)
        assert f"after calibration {100 * result['confidence']:.1f}" in page.text.replace("\xa0", " ")
        html = client.get(f"/jobs/{job['id']}").get_data(as_text=True)
        assert f'data-threshold="{rule["uncertain_threshold"]}"' in html


@pytest.mark.slow
def test_batch_page_progress_distribution_and_exports(client, real_batch) -> None:  # type: ignore[no-untyped-def]
    page = get_page(client, f"/batches/{real_batch['id']}")
    progress = page.by_id["batch-progress"]
    assert progress["tag"] == "progress" and progress["value"] == progress["max"] == "4"
    assert [r["data-job-id"] for r in page.rows] == [j["id"] for j in real_batch["jobs"]]
    assert "batch-table" in page.by_id
    counts = {e: sum(1 for j in real_batch["jobs"] if j["result"] and j["result"]["emotion"] == e) for e in EMOTIONS}
    assert {b["data-emotion"]: int(b["data-count"]) for b in page.bars["batch-distribution"]} == counts
    csv_rows = list(csv.DictReader(io.StringIO(client.get(page.by_id["export-csv"]["href"]).get_data(as_text=True))))
    assert sorted(r["job_id"] for r in csv_rows) == sorted(j["id"] for j in real_batch["jobs"])
    json_rows = client.get(page.by_id["export-json"]["href"]).get_json()
    assert sorted(r["job_id"] for r in json_rows) == sorted(j["id"] for j in real_batch["jobs"])


@pytest.mark.slow
def test_images_say_gone_after_retention(client, real_batch, pg_settings: Settings) -> None:  # type: ignore[no-untyped-def]
    job_id = real_batch["jobs"][2]["id"]
    factory = make_session_factory(make_engine(pg_settings))
    with factory() as session:
        key = session.get(Job, uuid.UUID(job_id)).storage_key  # type: ignore[union-attr]
        session.execute(update(Job).where(Job.id == uuid.UUID(job_id))
                        .values(storage_key=None, audio_deleted_at=datetime.now(UTC)))
        session.commit()
    storage.delete(pg_settings.upload_dir, key)
    page = get_page(client, f"/jobs/{job_id}")
    assert "player" not in page.by_id and "waveform" not in page.by_id and "audio-gone" in page.by_id
    assert "chart-ensemble" in page.by_id  # the results stay
    assert client.get(f"/jobs/{job_id}/waveform.png").status_code == 410


@pytest.mark.slow
def test_delete_asks_first_then_removes_job_and_audio(client, real_batch, pg_settings: Settings) -> None:  # type: ignore[no-untyped-def]
    job_id = real_batch["jobs"][1]["id"]
    html = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    form = html[html.index('id="delete-form"'):html.index("</form>", html.index('id="delete-form"'))]
    token = re.search(r'name="csrf_token" value="([^"]+)"', form)
    assert token and "data-confirm=" in form
    factory = make_session_factory(make_engine(pg_settings))
    with factory() as session:
        key = session.get(Job, uuid.UUID(job_id)).storage_key  # type: ignore[union-attr]
    path = storage.path_for(pg_settings.upload_dir, key or "")
    assert path.exists()

    assert client.post(f"/jobs/{job_id}/delete", data={"confirm": "yes"}).status_code == 403  # no CSRF token
    ask = client.post(f"/jobs/{job_id}/delete", data={"csrf_token": token.group(1)})
    assert ask.status_code == 200 and 'id="confirm-delete-form"' in ask.get_data(as_text=True)
    assert client.get(f"/api/v1/jobs/{job_id}").status_code == 200  # asking deleted nothing

    done = client.post(f"/jobs/{job_id}/delete", data={"csrf_token": token.group(1), "confirm": "yes"})
    assert done.status_code == 303 and done.headers["Location"].endswith(f"/batches/{real_batch['id']}")
    assert client.get(f"/api/v1/jobs/{job_id}").status_code == 404
    assert client.get(f"/jobs/{job_id}").status_code == 404
    assert not path.exists()
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(Result).where(Result.job_id == uuid.UUID(job_id))) == 0
    wait_for(lambda: job_id not in client.get(f"/batches/{real_batch['id']}").get_data(as_text=True), timeout=5)


# ---------------------------------------------------------------------------------------------
# The images themselves (numpy only), on audio made here.


def test_spectrogram_puts_a_tone_in_its_mel_band(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rate = 48000  # read at a third of its rate: the images need no more than 16 kHz
    t = np.arange(rate * 2) / rate
    path = tmp_path / "tone.wav"
    sf.write(path, np.stack([0.5 * np.sin(2 * np.pi * 1000 * t)] * 2, axis=1).astype(np.float32), rate)
    samples, got_rate = images.load(path, "wav")
    assert got_rate == 16000 and samples.size == t.size // 3
    levels = images.mel_db(samples, got_rate)
    n_fft = 1 << int(round(np.log2(got_rate * 0.032)))
    bank = images.mel_filterbank(got_rate, n_fft)
    centre = np.fft.rfftfreq(n_fft, 1 / got_rate)[bank.argmax(axis=1)]
    loudest = int(np.median(levels.argmax(axis=0)))
    assert abs(centre[loudest] - 1000) < 120, (centre[loudest], loudest)
    image = images.spectrogram(samples, got_rate)
    assert image.shape == (images.SPEC_HEIGHT, images.WIDTH, 3) and image.dtype == np.uint8
    assert png_size(images.png(image)) == (images.WIDTH, images.SPEC_HEIGHT)


def test_long_recording_is_read_only_up_to_the_limit(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rate = 8000
    minutes = int(images.MAX_SECONDS // 60) + 2
    path = tmp_path / "long.flac"
    with sf.SoundFile(path, "w", rate, 1, format="FLAC") as out:
        for minute in range(minutes):
            # Quiet for the first minutes, loud only past the limit: the picture must not see it.
            level = 0.9 if minute * 60 >= images.MAX_SECONDS else 0.05
            out.write((level * np.sin(np.arange(rate * 60) * 0.3)).astype(np.float32))
    samples, got_rate = images.load(path, "flac")
    assert got_rate == rate and samples.size == int(images.MAX_SECONDS * rate)
    assert float(np.abs(samples).max()) < 0.06
    wave = images.waveform(samples)
    assert wave.shape == (images.WAVE_HEIGHT, images.WIDTH, 3)
    # Normalised to the peak it saw: the envelope spans nearly the whole height.
    drawn = np.all(wave == images.WAVE_COLOUR, axis=2).any(axis=1)
    assert drawn.sum() > 0.9 * images.WAVE_HEIGHT
