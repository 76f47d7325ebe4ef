"""A stereo call uploaded through the real API and analysed by a real worker (Postgres, Redis):
the worker splits it into its speakers and stores the channels and the conversation."""

from __future__ import annotations

import uuid
from pathlib import Path

from bench.calls import SCRIPT, build_call, long_script, write
from ser_shared import schemas
from ser_shared.db import make_engine, make_session_factory
from ser_shared.models import Job, Result
from ser_shared.settings import Settings
from tests.conftest import RAVDESS, WorkerProcess, wait_for
from tests.helpers import multipart


def test_an_uploaded_call_is_stored_speaker_by_speaker(client, pg_worker: WorkerProcess,  # type: ignore[no-untyped-def]
                                                       pg_settings: Settings, tmp_path: Path) -> None:
    call = write(build_call(RAVDESS, SCRIPT).audio, tmp_path / "call.wav")
    resp = client.post("/api/v1/jobs", data=multipart([("call.wav", call.read_bytes())]),
                       content_type="multipart/form-data")
    assert resp.status_code == 202, resp.get_json()
    url = resp.get_json()["jobs"][0]["url"]
    job = wait_for(lambda: (j := client.get(url).get_json())["status"] in ("succeeded", "failed") and j, timeout=120)
    assert job["status"] == "succeeded", job
    with make_session_factory(make_engine(pg_settings))() as session:
        stored, result = session.get(Job, uuid.UUID(job["id"])), session.get(Result, uuid.UUID(job["id"]))
        assert stored is not None and result is not None and stored.channels == 2  # from the upload's probe
        assert result.channels is not None and result.conversation is not None
        entries = [schemas.Channel.build(entry) for entry in result.channels]  # strict: the served shapes
        conversation = schemas.Conversation.build(result.conversation)
        assert [(e.index, e.label, e.emotion) for e in entries] == [(0, "ch0", "neutral"), (1, "ch1", "angry")]
        assert conversation.channels == "split" and conversation.customer == 1
        assert stored.escalation is conversation.escalation is False
        assert len(result.segments or []) == sum(len(e.segments or []) for e in entries)


def test_a_ten_minute_call_with_whisper_transcripts_finishes_and_its_page_renders(  # type: ignore[no-untyped-def]
        client, pg_worker: WorkerProcess, tmp_path: Path) -> None:
    """The issue's size: ten minutes, two speakers, Whisper transcripts. The emotion comes first;
    the transcript stage (its budget grows with the speech) then finishes for the whole call."""
    call = build_call(RAVDESS, long_script(30))
    assert 570 < call.duration_s < 660, call.duration_s
    path = write(call.audio, tmp_path / "ten-minute-call.wav")
    resp = client.post("/api/v1/jobs", content_type="multipart/form-data",
                       data=multipart([(path.name, path.read_bytes())], transcribe="whisper",
                                      channel_labels="agent,customer"))
    assert resp.status_code == 202, resp.get_json()
    url = resp.get_json()["jobs"][0]["url"] + "?segments=true"

    def transcribed() -> dict | None:  # type: ignore[type-arg]
        job = client.get(url).get_json()
        if job["status"] == "failed":
            return job
        done = job["status"] == "succeeded" and job["result"]["transcript"]["status"] != "pending"
        return job if done else None

    job = wait_for(transcribed, timeout=500)
    assert job["status"] == "succeeded", job["error"]
    result = job["result"]
    transcript, conversation = result["transcript"], result["conversation"]
    assert transcript["status"] == "succeeded" and transcript["engine"] == "whisper", transcript
    assert conversation["channels"] == "split" and [c["label"] for c in result["channels"]] == ["agent", "customer"]
    # Every turn of the script is a segment with its words, on its own speaker's lane.
    assert [len(c["segments"]) for c in result["channels"]] == [len(call.of(0)), len(call.of(1))]
    lines = conversation["transcript"]
    assert len(lines) >= 0.9 * len(call.turns)
    assert sum("door" in line["text"].lower() for line in lines) >= 0.8 * len(call.turns)  # "... by the door"
    assert all(c["metrics"]["words_per_minute"] for c in result["channels"])
    html = client.get(f"/jobs/{job['id']}")
    assert html.status_code == 200
    page = html.get_data(as_text=True)
    assert 'id="lane-0"' in page and 'id="lane-1"' in page and page.count('class="segment ') >= len(call.turns)
    print(f"ten-minute call: {call.duration_s:.0f} s, {len(call.turns)} turns, transcript {transcript['seconds']} s")
