"""A stereo call through the whole service: upload with the channel options, a real worker, then what the
web tier makes of the stored result (strict API shapes, the job page's lanes, the export's speaker rows,
the webhook's summary, the history row).

The call is two RAVDESS actors on the two channels taking turns, the customer turning angry, with
crosstalk (``bench.calls``). What the analysis finds is the channel work's to test; here every view
must say the same as the stored result.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import select

from bench.calls import ESCALATING, build_call, write
from ser_shared import schemas
from ser_shared.models import WebhookDelivery
from tests.conftest import RAVDESS, WorkerProcess, wait_for
from tests.helpers import multipart

pytestmark = pytest.mark.slow  # a real worker


@pytest.fixture(scope="module")
def analysed(app: Flask, pg_worker: WorkerProcess, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = write(build_call(RAVDESS, ESCALATING).audio, tmp_path_factory.mktemp("call") / "call.wav")
    client = app.test_client()
    reference = f"e2e-call-{uuid.uuid4().hex[:8]}"
    resp = client.post("/api/v1/jobs", content_type="multipart/form-data",
                       data=multipart([(path.name, path.read_bytes())], channels="split",
                                      channel_labels="agent,customer", client_reference=reference,
                                      webhook_url="http://127.0.0.1:9/hook"))
    assert resp.status_code == 202, resp.get_data(as_text=True)
    url = resp.get_json()["jobs"][0]["url"]
    job = wait_for(lambda: (j := client.get(url).get_json())["status"] in ("succeeded", "failed") and j,
                   timeout=180)
    assert job["status"] == "succeeded", job
    return {"job": job, "reference": reference}


def test_the_api_serves_the_workers_conversation_in_its_schema(app: Flask, analysed: dict[str, Any]) -> None:
    job = analysed["job"]
    assert schemas.Job.model_validate(job).to_json() == job  # strict: what the worker stored is the contract
    result = job["result"]
    assert job["options"]["channel_labels"] == ["agent", "customer"] and job["channels"] == 2
    assert [(c["index"], c["label"]) for c in result["channels"]] == [(0, "agent"), (1, "customer")]
    assert result["conversation"]["channels"] == "split" and all(c["segments"] for c in result["channels"])
    listed = app.test_client().get(f"/api/v1/jobs?client_reference={analysed['reference']}").get_json()
    assert schemas.JobPage.model_validate(listed).to_json() == listed
    assert all("segments" not in c for c in listed["jobs"][0]["result"]["channels"])
    flag = "true" if result["conversation"]["escalation"] else "false"
    filtered = app.test_client().get(f"/api/v1/jobs?client_reference={analysed['reference']}&escalation={flag}")
    assert [j["id"] for j in filtered.get_json()["jobs"]] == [job["id"]]


def test_the_job_page_draws_the_workers_lanes(app: Flask, analysed: dict[str, Any]) -> None:
    job = analysed["job"]
    html = app.test_client().get(f"/jobs/{job['id']}").get_data(as_text=True)
    for channel in job["result"]["channels"]:
        start = html.index(f'id="lane-{channel["index"]}"')
        lane = html[start:html.index('class="playhead"', start)]
        assert lane.count('class="segment ') == len(channel["segments"])
        assert lane.count('class="escalation"') == len(channel["metrics"]["escalations"])
        assert f'id="speaker-metrics-{channel["index"]}"' in html
    assert 'id="waveform"' in html and 'id="spectrogram"' in html and 'id="ruler"' in html


def test_export_rows_are_each_speakers_segments(app: Flask, analysed: dict[str, Any]) -> None:
    job = analysed["job"]
    rows = json.loads(app.test_client().get(
        f"/api/v1/export?format=json&segments=true&client_reference={analysed['reference']}").data)
    by_speaker = {(c["index"], c["label"]): len(c["segments"]) for c in job["result"]["channels"]}
    assert {key: sum(1 for r in rows if (r["channel"], r["label"]) == key) for key in by_speaker} == by_speaker
    assert [r["start_s"] for r in rows] == sorted(r["start_s"] for r in rows)
    assert {r["escalation"] for r in rows} == {job["result"]["conversation"]["escalation"]}


def test_the_webhook_summarises_the_conversation(app: Flask, analysed: dict[str, Any]) -> None:
    job = analysed["job"]
    with app.extensions["ser"].sessions() as session:
        (payload,) = [d.payload for d in session.scalars(select(WebhookDelivery).where(
            WebhookDelivery.job_id == uuid.UUID(job["id"]), WebhookDelivery.event == "job.succeeded"))]
    assert schemas.JobEvent.model_validate(payload).to_json() == payload
    conversation = job["result"]["conversation"]
    assert payload["data"]["conversation"] == {
        "escalation": conversation["escalation"], "customer": conversation["customer"],
        "channels": [{"index": c["index"], "label": c["label"], "emotion": c["emotion"], "confidence": c["confidence"],
                      "talk_share": c["metrics"]["talk_share"], "escalations": len(c["metrics"]["escalations"])}
                     for c in job["result"]["channels"]]}


def test_the_history_row_names_each_speaker(app: Flask, analysed: dict[str, Any], tmp_path: Path) -> None:
    job = analysed["job"]
    html = app.test_client().get(f"/history?client_reference={analysed['reference']}").get_data(as_text=True)
    row = html[html.index(f'data-job-id="{job["id"]}"'):]
    row = row[:row.index("</tr>")]
    for channel in job["result"]["channels"]:
        assert f'data-label="{channel["label"]}" data-emotion="{channel["emotion"] or ""}"' in row
    assert ('class="escalation-flag"' in row) == job["result"]["conversation"]["escalation"]
