"""The OpenAPI document: valid, complete, true to the running app (schemathesis), and readable.

The fuzzing runs against the real app (Postgres test database, the real Redis broker) with no
worker: uploaded jobs stay queued. What the fuzzing creates is deleted afterwards, so tests that
run later in the same session see neither its rows nor its rate-limit windows nor its messages.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

import jsonschema_rs
import pytest
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import delete, select

from ser_shared import storage
from ser_shared.db import make_engine, make_session_factory
from ser_shared.emotions import EMOTIONS
from ser_shared.models import Batch, IdempotencyKey, Job
from ser_shared.settings import Settings
from tests.conftest import ravdess_file
from tests.helpers import multipart, read
from web import create_app, markup, openapi

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]
FUZZ = settings(max_examples=25, deadline=5000, database=None,
                suppress_health_check=list(HealthCheck))
# Each id operation and which seeded ids it is fuzzed with (name in the path, key in the seed).
ID_PATHS = {"/api/v1/jobs/{job_id}": ("job_id", "job_id"), "/api/v1/jobs/{job_id}/audio": ("job_id", "audio_job_id"),
            "/api/v1/batches/{batch_id}": ("batch_id", "batch_id")}


# --- the document itself ------------------------------------------------------------------------

def test_document_is_valid_openapi() -> None:
    doc = openapi.document()
    schemathesis.openapi.from_dict(doc).validate()
    for name, schema in doc["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(schema), name
    assert doc["info"]["version"] == metadata.version("ser-service")
    broken = openapi.document()
    broken["paths"]["/api/v1/jobs"]["get"]["responses"] = "none"
    with pytest.raises(jsonschema_rs.ValidationError):
        schemathesis.openapi.from_dict(broken).validate()


def _flask_operations(app: Flask) -> set[tuple[str, str]]:
    ops = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint.startswith("api."):
            path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
            ops |= {(m.lower(), path) for m in rule.methods or () if m not in ("HEAD", "OPTIONS")}
    return ops


def test_every_api_route_is_documented_and_nothing_else(app: Flask) -> None:
    doc = openapi.document()
    documented = {(m, path) for path, item in doc["paths"].items() for m in item if m in openapi.METHODS}
    assert _flask_operations(app) == documented
    assert len(documented) >= 10


def test_served_document_is_the_document(client) -> None:  # type: ignore[no-untyped-def]
    resp = client.get("/api/v1/openapi.json")
    assert resp.status_code == 200 and resp.mimetype == "application/json"
    assert resp.get_json() == openapi.document()


def test_auth_on_answers_401_as_documented(pg_settings: Settings) -> None:
    """With keys required the document stays public, and a keyless call gets the documented 401."""
    secured = create_app(pg_settings.model_copy(update={"auth": True}))
    schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", secured)
    for path, method in (("/api/v1/jobs", "GET"), ("/api/v1/export", "GET")):
        case = schema[path][method].Case()
        response = case.call()
        assert response.status_code == 401, response.text
        assert response.json()["error"]["code"] == "unauthorized"
        case.validate_response(response, checks=CHECKS)


# --- fuzzing the running app --------------------------------------------------------------------

def _queue_purge(app: Flask, names: list[str]) -> None:
    with app.extensions["ser"].celery.connection_for_write() as conn:
        for name in names:
            with contextlib.suppress(Exception):  # a queue never declared has nothing to purge
                conn.default_channel.queue_purge(name)


def _delete_since(settings_: Settings, since: datetime) -> int:
    """Delete the batches (their jobs cascade), stored files and idempotency keys made since ``since``."""
    engine = make_engine(settings_)
    try:
        with make_session_factory(engine)() as session:
            keys = list(session.scalars(select(Job.storage_key).join(Batch).where(Batch.created_at >= since)))
            count = len(session.scalars(delete(Batch).where(Batch.created_at >= since).returning(Batch.id)).all())
            session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at >= since))
            session.commit()
    finally:
        engine.dispose()
    for key in keys:
        storage.delete(settings_.upload_dir, key)
    return count


@pytest.fixture(scope="module")
def fuzz_app(pg_settings: Settings) -> Iterator[Flask]:
    """The app as the fuzzer sees it; the upload rate limit is raised so uploads reach the upload code
    (a 429 is a documented answer, but it would stop the fuzzer from testing anything behind it)."""
    settings_ = pg_settings.model_copy(update={"rate_limit_uploads_per_minute": 100_000,
                                               "rate_limit_files_per_minute": 1_000_000})
    started = datetime.now(UTC)
    app = create_app(settings_)
    app.config["TESTING"] = True
    yield app
    pool = app.extensions["ser"].engine.pool
    # No request may leave a connection checked out (a streamed export that never closed, say).
    assert pool.checkedout() == 0, pool.status()
    _queue_purge(app, ["cpu", "gpu"])
    _delete_since(settings_, started)
    app.extensions["ser"].engine.dispose()


@pytest.fixture(scope="module")
def api_schema(fuzz_app: Flask) -> Any:
    return schemathesis.openapi.from_wsgi("/api/v1/openapi.json", fuzz_app)


# Schemathesis' own pytest decorator (``schemathesis.pytest.from_fixture(...).parametrize()``) breaks on
# pytest 9 (it sets ``Function._nodeid``); its strategies under plain pytest parametrisation do the same job.
PARAMETERLESS = ("/healthz", "/readyz", "/api/v1/openapi.json")
OPERATIONS = [(entry["method"], entry["path"]) for entry in openapi.operations(openapi.document())]


# Invalid requests only where there is something to make invalid (parameters or a body).
FUZZ_CASES = [(m, p, mode) for m, p in OPERATIONS for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
              if not (mode == GenerationMode.NEGATIVE and p in PARAMETERLESS)]


@pytest.mark.parametrize(("method", "path", "mode"), FUZZ_CASES, ids=[f"{m} {p}-{mode}" for m, p, mode in FUZZ_CASES])
def test_fuzz_every_operation(api_schema: Any, method: str, path: str, mode: GenerationMode) -> None:
    """Generated valid and invalid requests: no 500, and every answer as documented."""
    operation = api_schema[path][method]

    @FUZZ
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        case.call_and_validate(checks=CHECKS)

    run()


def _seed(app: Flask) -> dict[str, Any]:
    """Real jobs in every state the API shows: queued with audio, succeeded with segments, a
    transcript and model versions, failed at upload, with webhook deliveries and an attempt."""
    from ser_ml.inference import Prediction
    from ser_ml.pipeline import Outcome
    from tests.conversations import mono
    from worker.delivery import deliver
    from worker.results import persist, save_transcripts

    client = app.test_client()
    files = [read(ravdess_file(3, "03")), read(ravdess_file(3, "05")), ("noise.wav", b"not audio at all")]
    resp = client.post("/api/v1/jobs", content_type="multipart/form-data",
                       data=multipart(files, transcribe="sphinx", client_reference="seed",
                                      metadata=json.dumps({"caller": "openapi"}),
                                      webhook_url="http://127.0.0.1:9/hook"))
    assert resp.status_code == 202, resp.get_data(as_text=True)
    body = resp.get_json()
    ids = [uuid.UUID(j["id"]) for j in body["jobs"]]
    svc = app.extensions["ser"]
    probs = {e: round(1 / len(EMOTIONS), 6) for e in EMOTIONS}
    prediction = Prediction("happy", probs["happy"], True, probs, {"rf": probs, "lstm": probs})
    segments = [{"start": 0.0, "end": 1.5, "speech_s": 1.2, "emotion": "happy", "confidence": 0.5,
                 "uncertain": False, "probabilities": probs},
                {"start": 1.5, "end": 3.0, "speech_s": 1.1, "emotion": "sad", "confidence": 0.4,
                 "uncertain": True, "probabilities": probs}]
    # A recording of one speaker: its channel and conversation as the worker stores them, and again
    # once transcribed, the segments then with their words (as whisper gives them).
    channels, conversation = mono(segments, 3.0)
    outcome = Outcome(ids[0], prediction, duration_s=3.0, timings_ms={"decode": 1.0, "total": 2.0},
                      transcript={"status": "pending", "engine": "sphinx", "language": "en-US"}, segments=segments,
                      channels=channels, conversation=conversation)
    persist(svc.sessions, [outcome], {"rf": "rf-1", "lstm": "lstm-1"})
    said = [{**segments[0], "transcript": "kids are", "words": [{"start": 0.1, "end": 0.5, "word": "kids"},
                                                                 {"start": 0.6, "end": 0.9, "word": "are"}]},
            {**segments[1], "transcript": "talking"}]
    save_transcripts(svc.sessions, {ids[0]: {"status": "succeeded", "engine": "sphinx", "language": "en-US",
                                             "text": "kids are talking", "reason": None, "message": None,
                                             "seconds": 0.4, "segments": True}},
                     {ids[0]: said}, {ids[0]: mono(said, 3.0)})
    for delivery in client.get(f"/api/v1/jobs/{ids[2]}").get_json()["webhooks"]:
        deliver(svc.sessions, svc.settings, delivery["id"])  # port 9 refuses: a failed attempt is recorded
    # The third file was refused at upload: it has no audio (a 404 there is right, and tested elsewhere).
    return {"job_id": [str(i) for i in ids], "audio_job_id": [str(i) for i in ids[:2]],
            "batch_id": [body["batch_id"]]}


@pytest.fixture(scope="module")
def seeded(fuzz_app: Flask) -> dict[str, Any]:
    return _seed(fuzz_app)


def test_seeded_jobs_show_every_shape(fuzz_app: Flask, seeded: dict[str, Any]) -> None:
    """The seed really holds a result with segments, a transcript and a recorded webhook attempt, so the
    fuzzing of the id operations below validates those schemas and not only 404s."""
    client = fuzz_app.test_client()
    done = client.get(f"/api/v1/jobs/{seeded['job_id'][0]}").get_json()
    assert done["status"] == "succeeded" and len(done["result"]["segments"]) == 2
    assert done["result"]["transcript"]["status"] == "succeeded"
    failed = client.get(f"/api/v1/jobs/{seeded['job_id'][2]}").get_json()
    assert failed["error"]["code"] == "unsupported_format"
    assert failed["webhooks"] and failed["webhooks"][0]["attempts"][0]["error"]


@pytest.mark.parametrize("path", sorted(ID_PATHS))
def test_fuzz_operations_on_real_ids(api_schema: Any, seeded: dict[str, Any], path: str) -> None:
    """The id operations again, on jobs and batches that exist (the generated ids only ever 404)."""
    name, key = ID_PATHS[path]
    operation = api_schema[path]["GET"]
    statuses: set[int] = set()

    @FUZZ
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        ident = data.draw(st.sampled_from(seeded[key]), label=name)
        case = data.draw(operation.as_strategy(path_parameters={name: ident}))
        response = case.call_and_validate(checks=CHECKS)
        assert response.status_code in (200, 206, 416), response.text
        statuses.add(response.status_code)

    run()
    assert 200 in statuses


def test_fuzz_list_and_export_over_seeded_rows(fuzz_app: Flask, seeded: dict[str, Any]) -> None:
    """The list and export with rows present (the generated filters mostly match nothing)."""
    client = fuzz_app.test_client()
    listed = client.get("/api/v1/jobs?segments=true&client_reference=seed").get_json()
    assert len(listed["jobs"]) == 3
    schema_ = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", fuzz_app)
    for path, query in (("/api/v1/jobs", {"segments": "true", "client_reference": "seed", "limit": "2"}),
                        ("/api/v1/export", {"format": "json", "segments": "true", "client_reference": "seed"}),
                        ("/api/v1/export", {"format": "csv"})):
        case = schema_[path]["GET"].Case(query=query)
        response = case.call_and_validate(checks=CHECKS)
        assert response.status_code == 200
    rows = json.loads(client.get("/api/v1/export?format=json&segments=true&client_reference=seed").data)
    assert len(rows) == 4  # two segments + two single-row jobs


def test_delete_as_documented(fuzz_app: Flask, seeded: dict[str, Any]) -> None:
    schema_ = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", fuzz_app)
    operation = schema_["/api/v1/jobs/{job_id}"]["DELETE"]
    job_id = seeded["job_id"][1]
    for expected in (204, 404):
        case = operation.Case(path_parameters={"job_id": job_id})
        assert case.call_and_validate(checks=CHECKS).status_code == expected
    seeded["job_id"].remove(job_id)
    seeded["audio_job_id"].remove(job_id)


# --- what the fuzzing found (each was a 500) ----------------------------------------------------

@pytest.mark.parametrize("fields", [{"client_reference": "a\x00b"}, {"metadata": '{"a": "x\\u0000"}'},
                                    {"metadata": '{"a\\u0000": 1}'}, {"webhook_url": "http://127.0.0.1:9/a\x00"}],
                         ids=["reference", "metadata-value", "metadata-key", "webhook"])
def test_nul_in_upload_fields_is_400(client, fields: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    resp = client.post("/api/v1/jobs", content_type="multipart/form-data",
                       data=multipart([read(ravdess_file(5, "02"))], **fields))
    assert resp.status_code == 400, resp.get_data(as_text=True)
    assert resp.get_json()["error"]["code"] in ("invalid_parameter", "webhook_url_refused")


@pytest.mark.parametrize("name", ["q", "client_reference"])
def test_nul_in_text_filters_is_400(client, name: str) -> None:  # type: ignore[no-untyped-def]
    for path in ("/api/v1/jobs", "/api/v1/export"):
        resp = client.get(path, query_string={name: "a\x00b"})
        assert resp.status_code == 400 and resp.get_json()["error"]["code"] == "invalid_parameter"


def test_nameless_part_with_idempotency_key_is_not_500(client) -> None:  # type: ignore[no-untyped-def]
    boundary = "x-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data\r\n\r\nnameless\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"device\"\r\n\r\ncpu\r\n--{boundary}--\r\n")
    resp = client.post("/api/v1/jobs", data=body.encode(), headers={"Idempotency-Key": str(uuid.uuid4())},
                       content_type=f"multipart/form-data; boundary={boundary}")
    assert resp.status_code == 400 and resp.get_json()["error"]["code"] == "no_files"


# --- the readable page --------------------------------------------------------------------------

def test_api_page_lists_every_operation(client) -> None:  # type: ignore[no-untyped-def]
    resp = client.get("/docs/api")
    assert resp.status_code == 200
    html = resp.get_data(as_text=True)
    doc = openapi.document()
    for entry in openapi.operations(doc):
        assert f'id="{entry["op"]["operationId"]}"' in html
        assert f"<code>{entry['path']}</code>" in html
    for name in doc["components"]["schemas"]:
        assert f'id="schema-{name}"' in html
    assert "curl" in html and "-F file=@first.wav" in html and "Authorization: Bearer $SER_API_KEY" in html
    # Nothing is fetched from another site: every src/href is local or an in-page anchor.
    for target in re.findall(r'(?:src|href)="([^"]*)"', html):
        assert target.startswith(("/", "#")), target


def test_api_page_renders_the_descriptions_markdown(client) -> None:  # type: ignore[no-untyped-def]
    html = client.get("/docs/api").get_data(as_text=True)
    assert "<strong>Authentication.</strong>" in html and "<strong>Errors</strong>" in html
    assert "<code>Authorization: Bearer &lt;key&gt;</code>" in html  # the document's own <key>, escaped
    assert "<code>bytes=0-99</code>" in html  # a parameter's description, in its table cell
    assert "<code>file</code> part becomes a job" in html  # an operation's description
    prose = re.sub(r"<(pre|code)\b[^>]*>.*?</\1>", "", html, flags=re.S)
    assert "**" not in prose and "`" not in prose


def test_markdown_source_html_is_escaped_not_run() -> None:
    out = markup.block("Hi <script>alert(1)</script> **bold** [x](javascript:alert(1)) <img src=x onerror=y>")
    assert "<script" not in out and "&lt;script&gt;alert(1)&lt;/script&gt;" in out
    assert "<img" not in out and 'href="javascript' not in out
    assert "<strong>bold</strong>" in out
    assert markup.inline("`<b>` <style>p{}</style>") == "<code>&lt;b&gt;</code> &lt;style&gt;p{}&lt;/style&gt;"


def test_nav_links_to_api_page(client) -> None:  # type: ignore[no-untyped-def]
    assert 'href="/docs/api"' in client.get("/history").get_data(as_text=True)


def test_fuzzed_rows_are_cleaned_up(pg_settings: Settings) -> None:
    """The cleanup the fuzzing fixture relies on removes a batch with its jobs and stored file."""
    app = create_app(pg_settings)
    started = datetime.now(UTC)
    resp = app.test_client().post("/api/v1/jobs", content_type="multipart/form-data",
                                  data={"file": [(io.BytesIO(read(ravdess_file(4, "01"))[1]), "a.flac")]})
    job_id = resp.get_json()["jobs"][0]["id"]
    before = {p for p in pg_settings.upload_dir.rglob("*") if p.is_file()}
    assert _delete_since(pg_settings, started) == 1
    assert app.test_client().get(f"/api/v1/jobs/{job_id}").status_code == 404
    assert len(before - {p for p in pg_settings.upload_dir.rglob("*") if p.is_file()}) == 1
    _queue_purge(app, ["cpu"])
    app.extensions["ser"].engine.dispose()
