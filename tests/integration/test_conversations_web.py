"""Conversations in the web tier: the upload options, the result's channels and conversation as the API
serves them (strict schemas), the escalation filter, the export's columns, the webhook's summary, and
the job and history pages.

Results are stored as the worker stores them (``tests.conversations.finish``) in a database of this
module's own, whose uploads go to a queue no worker reads: no worker may analyse these jobs over the
results the tests wrote.
"""

from __future__ import annotations

import csv
import io
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import soundfile as sf
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image
from sqlalchemy import select, update

from ser_shared import schemas
from ser_shared.emotions import EMOTIONS
from ser_shared.models import Result, WebhookDelivery
from ser_shared.settings import Settings
from tests.conftest import private_database, ravdess_file
from tests.conversations import call, finish, mono, segment
from tests.helpers import multipart, read
from web import create_app, images

QUEUE = "conversations-web-unread"
HOOK = "http://127.0.0.1:9/hook"  # allowed by the test settings; never delivered here


@pytest.fixture(scope="module")
def conv_app(pg_settings: Settings) -> Iterator[Flask]:
    with private_database(pg_settings, default_queue=QUEUE) as settings:
        app = create_app(settings)
        app.config["TESTING"] = True
        yield app
        app.extensions["ser"].engine.dispose()
        redis.Redis.from_url(settings.broker_url or "").delete(QUEUE)


@pytest.fixture
def client(conv_app: Flask) -> FlaskClient:
    return conv_app.test_client()


def _upload(client: FlaskClient, files: list[tuple[str, bytes]] | None = None, **fields: str) -> dict[str, Any]:
    resp = client.post("/api/v1/jobs", content_type="multipart/form-data",
                       data=multipart(files or [read(ravdess_file(2, "01"))], **fields))
    assert resp.status_code == 202, resp.get_data(as_text=True)
    body: dict[str, Any] = resp.get_json()
    return body


def _stored_call(app: Flask, reference: str, escalation: bool = True, webhook: bool = False,
                 transcript: bool = True) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    """An uploaded job finished with a two-speaker call's result; (job id, channels, conversation)."""
    fields = {"client_reference": reference, "channels": "split", "channel_labels": "agent,customer"}
    if webhook:
        fields["webhook_url"] = HOOK
    job_id = _upload(app.test_client(), **fields)["jobs"][0]["id"]
    channels, conversation, segments = call(escalation=escalation, transcript=transcript)
    finish(app.extensions["ser"].sessions, uuid.UUID(job_id), channels, conversation, segments)
    return job_id, channels, conversation


def _error(resp: Any, code: str) -> str:
    assert resp.status_code == 400, resp.get_data(as_text=True)
    assert resp.get_json()["error"]["code"] == code
    message: str = resp.get_json()["error"]["message"]
    return message


# --- upload options ------------------------------------------------------------------------------

def test_channel_options_are_stored_on_the_batch_and_its_jobs(client: FlaskClient) -> None:
    body = _upload(client, channels="Split", channel_labels=" agent , customer ")
    batch = client.get(f"/api/v1/batches/{body['batch_id']}").get_json()
    expected = {"device": "auto", "channels": "split", "channel_labels": ["agent", "customer"]}
    assert batch["options"] == expected and batch["jobs"][0]["options"] == expected
    default = _upload(client)  # the default (auto) is the worker's: nothing stored
    assert client.get(default["jobs"][0]["url"]).get_json()["options"] == {"device": "auto"}
    auto = _upload(client, channels="auto")
    assert client.get(auto["jobs"][0]["url"]).get_json()["options"] == {"device": "auto", "channels": "auto"}


@pytest.mark.parametrize("labels", ["a,b,c,d,e,f,g,h", "x" * 32, "客户,Kundin", "agent_1,customer-2", "Dr Who,ch 1"])
def test_good_channel_labels_are_kept_as_given(client: FlaskClient, labels: str) -> None:
    body = _upload(client, channel_labels=labels)
    assert client.get(body["jobs"][0]["url"]).get_json()["options"]["channel_labels"] == labels.split(",")


@pytest.mark.parametrize(("fields", "says"), [
    ({"channels": "stereo"}, "channels must be one of auto, mix, split"),
    ({"channel_labels": "a,b,c,d,e,f,g,h,i"}, "at most 8"),
    ({"channel_labels": "agent,,customer"}, "1 to 32"),
    ({"channel_labels": "x" * 33}, "1 to 32"),
    ({"channel_labels": "agent,<b>customer</b>"}, "letters, digits"),
    ({"channel_labels": "agent;customer"}, "letters, digits"),
    ({"channel_labels": "a\x00b"}, "letters, digits"),
    ({"channel_labels": "agent,\u200bcustomer"}, "letters, digits"),
    ({"channel_labels": "agent,Agent"}, "different"),
], ids=["mode", "too-many", "empty", "too-long", "markup", "separator", "nul", "invisible", "repeated"])
def test_bad_channel_options_are_400_invalid_option(client: FlaskClient, fields: dict[str, str], says: str) -> None:
    resp = client.post("/api/v1/jobs", content_type="multipart/form-data",
                       data=multipart([read(ravdess_file(2, "01"))], **fields))
    assert says in _error(resp, "invalid_option")


def test_upload_page_sends_the_channel_options(client: FlaskClient) -> None:
    from tests.helpers import csrf_token

    page = client.get("/").get_data(as_text=True)
    assert 'name="channels"' in page and 'name="channel_labels"' in page
    data = multipart([read(ravdess_file(2, "01"))], csrf_token=csrf_token(client), channels="split",
                     channel_labels="agent,customer")
    resp = client.post("/upload", data=data, content_type="multipart/form-data")
    assert resp.status_code == 303
    batch_id = resp.headers["Location"].rsplit("/", 1)[-1]
    assert client.get(f"/api/v1/batches/{batch_id}").get_json()["options"]["channel_labels"] == ["agent", "customer"]
    bad = multipart([read(ravdess_file(2, "01"))], csrf_token=csrf_token(client), channel_labels="a,a")
    assert client.post("/upload", data=bad, content_type="multipart/form-data").status_code == 400


# --- the result as served ------------------------------------------------------------------------

def test_job_serves_channels_and_conversation_exactly(conv_app: Flask, client: FlaskClient) -> None:
    job_id, channels, conversation = _stored_call(conv_app, "serve")
    body = client.get(f"/api/v1/jobs/{job_id}").get_json()
    assert schemas.Job.model_validate(body).to_json() == body  # strict: nothing undeclared, nothing dropped
    assert body["result"]["channels"] == channels and body["result"]["conversation"] == conversation
    assert [w["word"] for w in body["result"]["channels"][1]["segments"][1]["words"]][:3] == ["this", "is", "the"]
    batch = client.get(f"/api/v1/batches/{body['batch_id']}").get_json()
    assert schemas.Batch.model_validate(batch).to_json() == batch
    assert batch["jobs"][0]["result"]["channels"] == channels


def test_job_lists_leave_channel_segments_and_the_transcript_out_unless_asked(conv_app: Flask,
                                                                           client: FlaskClient) -> None:
    job_id, channels, conversation = _stored_call(conv_app, "listed")
    short = client.get("/api/v1/jobs?client_reference=listed").get_json()
    assert schemas.JobPage.model_validate(short).to_json() == short
    (job,) = short["jobs"]
    assert job["id"] == job_id and "segments" not in job["result"]
    assert [set(ch) for ch in job["result"]["channels"]] == [set(channels[0]) - {"segments"}] * 2
    assert job["result"]["channels"][1]["metrics"] == channels[1]["metrics"]
    assert job["result"]["conversation"] == {k: v for k, v in conversation.items() if k != "transcript"}
    full = client.get("/api/v1/jobs?client_reference=listed&segments=true").get_json()
    assert schemas.JobPage.model_validate(full).to_json() == full
    assert full["jobs"][0]["result"]["channels"] == channels
    assert full["jobs"][0]["result"]["conversation"] == conversation


def test_results_from_before_conversations_have_neither_field(client: FlaskClient) -> None:
    body = _upload(client)
    job = client.get(body["jobs"][0]["url"]).get_json()
    assert job["result"] is None  # queued; and a finished old-style result is covered by test_schemas


def test_a_stored_channel_with_an_undeclared_key_fails_strictly(conv_app: Flask) -> None:
    from pydantic import ValidationError

    from web import serialize

    channels, conversation, segments = call()
    channels[0]["metrics"]["pitch_hz"] = 180.0
    result = Result(job_id=uuid.uuid4(), emotion="neutral", confidence=0.7, uncertain=False,
                    probabilities=segments[0]["probabilities"], model_probabilities={}, model_versions={},
                    timings_ms={}, transcript=None, segments=segments, channels=channels, conversation=conversation)
    with pytest.raises(ValidationError, match="pitch_hz"):
        serialize.result_dict(result, segments=False)


# --- the escalation filter -------------------------------------------------------------------------

def test_escalation_filter_on_the_api_the_export_and_the_history(conv_app: Flask, client: FlaskClient) -> None:
    escalated, _, _ = _stored_call(conv_app, "filter", escalation=True)
    calm, _, _ = _stored_call(conv_app, "filter", escalation=False)
    plain = _upload(client, client_reference="filter")["jobs"][0]["id"]  # no conversation: neither

    def ids(query: str) -> set[str]:
        resp = client.get(f"/api/v1/jobs?client_reference=filter&{query}")
        assert resp.status_code == 200, resp.get_data(as_text=True)
        return {j["id"] for j in resp.get_json()["jobs"]}

    assert ids("") == {escalated, calm, plain}
    assert ids("escalation=true") == ids("escalation=1") == {escalated}
    assert ids("escalation=false") == ids("escalation=no") == {calm}
    for bad in ("maybe", "2"):
        assert "true or false" in _error(client.get(f"/api/v1/jobs?escalation={bad}"), "invalid_parameter")
    exported = json.loads(client.get("/api/v1/export?format=json&client_reference=filter&escalation=true").data)
    assert [r["job_id"] for r in exported] == [escalated] and exported[0]["escalation"] is True
    page = client.get("/history?client_reference=filter&escalation=true").get_data(as_text=True)
    assert escalated in page and calm not in page and plain not in page
    assert '<option value="true" selected>escalated</option>' in page
    assert "escalation=true" in page[page.index('id="export-csv"'):][:300]  # the export link carries it


# --- the export -----------------------------------------------------------------------------------

def test_export_adds_channel_label_and_escalation_at_the_end(conv_app: Flask, client: FlaskClient) -> None:
    job_id, channels, _ = _stored_call(conv_app, "export")
    assert schemas.EXPORT_COLUMNS[-3:] == ("channel", "label", "escalation")
    assert schemas.EXPORT_COLUMNS[:-3][-2:] == ("error_code", "transcript")  # the older columns keep their places
    text = client.get("/api/v1/export?client_reference=export").get_data(as_text=True)
    header, *rows = list(csv.reader(io.StringIO(text)))
    assert header == list(schemas.EXPORT_COLUMNS)
    (row,) = [dict(zip(header, r, strict=True)) for r in rows]
    assert row["job_id"] == job_id and row["channel"] == row["label"] == "" and row["escalation"] == "true"
    assert row["uncertain"] == "false"  # booleans as true/false, not Python's True/False


def test_export_segments_are_each_speakers_in_time_order_with_their_words(conv_app: Flask,
                                                                          client: FlaskClient) -> None:
    job_id, channels, _ = _stored_call(conv_app, "export-seg")
    rows = json.loads(client.get("/api/v1/export?format=json&segments=true&client_reference=export-seg").data)
    for row in rows:
        assert list(row) == list(schemas.EXPORT_COLUMNS)
        assert schemas.ExportRow.model_validate(row).to_json() == row
    expected = sorted(((s["start"], ch["index"], k, ch["label"], s) for ch in channels
                       for k, s in enumerate(ch["segments"])), key=lambda e: e[:3])
    assert [(r["start_s"], r["channel"], r["segment"], r["label"]) for r in rows] == [e[:4] for e in expected]
    for row, (_, _, _, _, seg) in zip(rows, expected, strict=True):
        assert row["job_id"] == job_id and row["escalation"] is True
        assert (row["emotion"], row["end_s"], row["transcript"]) == (seg["emotion"], seg["end"], seg["transcript"])
        assert [row[f"p_{e}"] for e in EMOTIONS] == [seg["probabilities"][e] for e in EMOTIONS]
    text = client.get("/api/v1/export?segments=true&client_reference=export-seg").get_data(as_text=True)
    table = list(csv.DictReader(io.StringIO(text)))
    assert [(r["label"], r["transcript"]) for r in table] == [(r["label"], r["transcript"]) for r in rows]
    assert {r["escalation"] for r in table} == {"true"} and {r["uncertain"] for r in table} <= {"true", "false"}


def test_export_of_a_conversation_without_speech_keeps_the_job_row(conv_app: Flask, client: FlaskClient) -> None:
    job_id = _upload(client, client_reference="export-silent")["jobs"][0]["id"]
    channels, conversation, segments = call()
    for ch in channels:
        ch["segments"] = []
    sessions = conv_app.extensions["ser"].sessions
    finish(sessions, uuid.UUID(job_id), channels, conversation, segments)
    with sessions() as session:  # nobody spoke: no segments at the top either
        session.execute(update(Result).where(Result.job_id == uuid.UUID(job_id)).values(segments=[]))
        session.commit()
    rows = json.loads(client.get("/api/v1/export?format=json&segments=true&client_reference=export-silent").data)
    assert [(r["job_id"], r["segment"], r["channel"]) for r in rows] == [(job_id, None, None)]


# --- the webhook -----------------------------------------------------------------------------------

def _payloads(app: Flask, job_id: str) -> list[dict[str, Any]]:
    with app.extensions["ser"].sessions() as session:
        return [row.payload for row in session.scalars(select(WebhookDelivery).where(
            WebhookDelivery.job_id == uuid.UUID(job_id)))]


def test_job_succeeded_webhook_carries_the_conversation_summary(conv_app: Flask) -> None:
    job_id, channels, _ = _stored_call(conv_app, "hook", webhook=True)
    (payload,) = _payloads(conv_app, job_id)
    assert schemas.JobEvent.model_validate(payload).to_json() == payload
    assert payload["type"] == "job.succeeded"
    assert payload["data"]["conversation"] == {
        "escalation": True, "customer": 1,
        "channels": [{"index": ch["index"], "label": ch["label"], "emotion": ch["emotion"],
                      "confidence": ch["confidence"], "talk_share": ch["metrics"]["talk_share"],
                      "escalations": len(ch["metrics"]["escalations"])} for ch in channels]}
    assert [c["escalations"] for c in payload["data"]["conversation"]["channels"]] == [0, 1]
    calm, _, _ = _stored_call(conv_app, "hook", escalation=False, webhook=True)
    assert _payloads(conv_app, calm)[0]["data"]["conversation"]["escalation"] is False


def test_failed_and_older_jobs_send_a_null_conversation(conv_app: Flask, client: FlaskClient) -> None:
    body = _upload(client, [("noise.wav", b"not audio at all")], webhook_url=HOOK)
    (failed,) = _payloads(conv_app, body["jobs"][0]["id"])
    assert failed["type"] == "job.failed" and failed["data"]["conversation"] is None
    assert schemas.JobEvent.model_validate(failed).to_json() == failed


# --- pages -----------------------------------------------------------------------------------------

def test_job_page_draws_one_lane_per_speaker_with_bands_words_and_escalations(conv_app: Flask,
                                                                               client: FlaskClient) -> None:
    job_id, channels, conversation = _stored_call(conv_app, "page")
    html = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    for ch in channels:
        lane = _element(html, f'id="lane-{ch["index"]}"', 'class="playhead"')
        assert f'data-label="{ch["label"]}"' in lane
        assert lane.count('class="segment ') == len(ch["segments"])
        for seg in ch["segments"]:
            x = f'x="{100 * seg["start"] / 12.0:.3f}%"'
            width = f'width="{100 * (seg["end"] - seg["start"]) / 12.0:.3f}%"'
            assert f'data-start="{seg["start"]}"' in lane and x in lane and width in lane
            assert all(f'<tspan data-start="{w["start"]}">{w["word"]}</tspan>' in lane for w in seg["words"])
        assert lane.count('class="escalation"') == len(ch["metrics"]["escalations"])
        side = _element(html, f'id="speaker-metrics-{ch["index"]}"', "</section>")
        assert f'data-metric="talk_share" data-value="{ch["metrics"]["talk_share"]}"' in side
        assert f'data-metric="turns" data-value="{ch["metrics"]["turns"]}"' in side
        assert f'emo-{ch["emotion"]}' in side
    card = _element(html, 'id="conversation"', "</section>")
    assert 'data-escalation="true"' in card and "customer ends clearly more negative" in card
    assert f'data-metric="silence_share" data-value="{conversation["silence_share"]}"' in card
    lines = _element(html, 'id="conversation-transcript"', "</ol>")
    assert lines.count("<li ") == len(conversation["transcript"]) and "my parcel never arrived" in lines
    assert 'id="ruler"' in html and 'id="timeline"' not in html  # lanes replace the single timeline


def test_a_one_speaker_conversation_is_one_lane(conv_app: Flask, client: FlaskClient) -> None:
    """A mono recording of several segments: one lane (its segments drawn once), judged as a whole."""
    job_id = _upload(client, client_reference="mono")["jobs"][0]["id"]
    segments = [segment(0.5, 2.0, "neutral", 0.7), segment(3.0, 5.5, "angry", 0.8)]
    channels, conversation = mono(segments, 6.0)
    conversation["customer"] = 0  # as ser_ml.conversation judges a single speaker
    finish(conv_app.extensions["ser"].sessions, uuid.UUID(job_id), channels, conversation, segments)
    html = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert html.count('<svg class="track lane"') == 1 and html.count('class="segment ') == len(segments)
    assert "No escalation flagged for ch0 (angry, fearful or disgust: 0% of the first third" in html
    assert "(customer)" not in html


@pytest.mark.parametrize(("probability", "unsure"), [(0.31, True), (0.93, False)])
def test_a_detected_language_is_shown_with_how_sure_whisper_was(conv_app: Flask, client: FlaskClient,
                                                                 probability: float, unsure: bool) -> None:
    job_id = _upload(client, client_reference="detected", transcribe="whisper", language="und")["jobs"][0]["id"]
    segments = [segment(0.5, 2.0, "neutral", 0.7, text="namaste")]
    channels, conversation = mono(segments, 3.0)
    transcript = {"status": "succeeded", "engine": "whisper", "language": "und", "text": "namaste", "reason": None,
                  "message": None, "seconds": 0.4, "model": "whisper-base", "detected_language": "hi",
                  "detected_language_probability": probability}
    finish(conv_app.extensions["ser"].sessions, uuid.UUID(job_id), channels, conversation, segments, transcript)
    stored = client.get(f"/api/v1/jobs/{job_id}").get_json()["result"]["transcript"]
    assert (stored["detected_language"], stored["detected_language_probability"]) == ("hi", probability)
    hint = _element(client.get(f"/jobs/{job_id}").get_data(as_text=True), 'id="transcript"', "</p>")
    assert f'data-probability="{probability}">hi</span> ({round(100 * probability)} % sure' in hint
    assert ("give the language if you know it" in hint) is unsure


def test_history_rows_show_each_speakers_emotion_and_the_flag(conv_app: Flask, client: FlaskClient) -> None:
    escalated, channels, _ = _stored_call(conv_app, "rows", escalation=True)
    calm, _, _ = _stored_call(conv_app, "rows", escalation=False)
    html = client.get("/history?client_reference=rows").get_data(as_text=True)
    row = _element(html, f'data-job-id="{escalated}"', "</tr>")
    for ch in channels:
        assert f'<span class="speaker" data-label="{ch["label"]}" data-emotion="{ch["emotion"]}">' in row
    assert 'class="escalation-flag"' in row
    assert 'class="escalation-flag"' not in _element(html, f'data-job-id="{calm}"', "</tr>")


def _element(html: str, marker: str, end: str) -> str:
    start = html.index(marker)
    return html[start:html.index(end, start)]


# --- the pictures' time axis --------------------------------------------------------------------------

def _columns_with_sound(png_bytes: bytes, kind: str) -> np.ndarray:
    """The picture's columns where it shows sound: the waveform's blue beyond the centre line, or the
    spectrogram's bright cells."""
    pixels = np.asarray(Image.open(io.BytesIO(png_bytes)).convert("RGB")).astype(int)
    if kind == "waveform":
        blue = (np.abs(pixels - images.WAVE_COLOUR).sum(axis=2) < 30).sum(axis=0)
        return np.flatnonzero(blue > 3)
    return np.flatnonzero(pixels.sum(axis=2).max(axis=0) > 400)


@pytest.mark.parametrize(("duration", "burst"), [(10.0, (4.0, 5.0)), (700.0, (300.0, 310.0))],
                         ids=["short", "past-the-drawn-limit"])
def test_pictures_put_each_moment_where_the_lanes_do(tmp_path: Path, duration: float,
                                                       burst: tuple[float, float]) -> None:
    """x is time over the whole recording in both pictures, as on the lanes: a tone burst lands on the
    columns its seconds map to, and a recording longer than what is drawn leaves the rest blank instead
    of stretching what was drawn over the whole width."""
    rate = 8000
    path = tmp_path / "burst.wav"
    with sf.SoundFile(path, "w", rate, 1, "PCM_16") as out:
        for second in range(int(duration)):
            block = np.zeros(rate, np.float32)
            if burst[0] <= second < burst[1]:
                block = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(rate) / rate).astype(np.float32)
            out.write(block)
    expected = (images.WIDTH * burst[0] / duration, images.WIDTH * burst[1] / duration)
    drawn = images.drawn_width(duration)
    assert drawn == (images.WIDTH if duration <= images.MAX_SECONDS else round(800 * 600 / 700))
    for kind in ("waveform", "spectrogram"):
        picture = images.render(path, "wav", kind, duration)
        sound = _columns_with_sound(picture, kind)
        sound = sound[sound < drawn]  # the blank rest is checked below
        assert abs(sound.min() - expected[0]) <= 1.5 and abs(sound.max() + 1 - expected[1]) <= 1.5, (kind, sound)
        if drawn < images.WIDTH:
            pixels = np.asarray(Image.open(io.BytesIO(picture)).convert("RGB"))
            assert (pixels[:, drawn:] == images.BACKGROUND).all()  # not read, not drawn
