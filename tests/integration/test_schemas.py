"""One typed schema (``ser_shared.schemas``) for every outward shape.

What the API serves, what webhooks send and what the export writes, for a database seeded with a
job of every shape (tests/integration/test_openapi.py's seed), validates against the models and is exactly
their JSON; the OpenAPI document's components are the models' JSON schemas; a key the models do
not declare fails; the client's types declare every field the server sends; the manifest loads typed.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, get_args

import pytest
import ser_client
from flask import Flask
from pydantic import BaseModel, ValidationError
from sqlalchemy import select

from ser_shared import schemas
from ser_shared.emotions import EMOTIONS
from ser_shared.models import JobStatus, Result, WebhookDelivery
from ser_shared.settings import REPO_ROOT, Settings
from tests.integration.test_openapi import _delete_since, _queue_purge, _seed
from web import create_app, openapi, serialize

MODELS = REPO_ROOT / "models"


@pytest.fixture(scope="module")
def seeded_app(pg_settings: Settings) -> Iterator[tuple[Flask, dict[str, Any]]]:
    """The app over a database holding a job of every shape; removed again afterwards."""
    started = datetime.now(UTC)
    # Limits raised as for the fuzzing: earlier tests' uploads in this minute must not refuse the seed.
    app = create_app(pg_settings.model_copy(update={"rate_limit_uploads_per_minute": 100_000,
                                                    "rate_limit_files_per_minute": 1_000_000}))
    app.config["TESTING"] = True
    seeded = _seed(app)
    yield app, seeded
    _queue_purge(app, ["cpu", "gpu"])
    _delete_since(pg_settings, started)
    app.extensions["ser"].engine.dispose()


def _served(app: Flask, seeded: dict[str, Any]) -> list[tuple[type[schemas.Emitted], dict[str, Any]]]:
    """Every JSON body the API serves for the seeded rows, with the model it must be."""
    client = app.test_client()
    out: list[tuple[type[schemas.Emitted], dict[str, Any]]] = []
    for job_id in seeded["job_id"]:
        out.append((schemas.Job, client.get(f"/api/v1/jobs/{job_id}").get_json()))
    for query in ("client_reference=seed", "client_reference=seed&segments=true", "client_reference=seed&limit=1"):
        out.append((schemas.JobPage, client.get(f"/api/v1/jobs?{query}").get_json()))
    out.append((schemas.Batch, client.get(f"/api/v1/batches/{seeded['batch_id'][0]}").get_json()))
    return out


def test_every_served_shape_is_exactly_its_model(seeded_app: tuple[Flask, dict[str, Any]]) -> None:
    app, seeded = seeded_app
    served = _served(app, seeded)
    jobs = [body for model, body in served if model is schemas.Job]
    # The seed really holds the shapes: segments with transcripts, a transcript, a failed job, attempts.
    assert any(j["result"] and len(j["result"]["segments"]) == 2 for j in jobs)
    assert any(j["result"] and j["result"].get("conversation") and j["result"]["channels"][0]["segments"][0]["words"]
               for j in jobs)
    assert any(j["error"] for j in jobs) and any(d["attempts"] for j in jobs for d in j["webhooks"])
    for model, body in served:
        parsed = model.model_validate(body)
        assert parsed.to_json() == body, model.__name__  # nothing the model does not say, nothing left out
    listed = next(body for model, body in served if model is schemas.JobPage)
    assert all("segments" not in (j["result"] or {}) for j in listed["jobs"])  # left out unless asked


def test_upload_answer_is_its_model(seeded_app: tuple[Flask, dict[str, Any]]) -> None:
    from tests.conftest import ravdess_file
    from tests.helpers import multipart, read

    app, _ = seeded_app
    resp = app.test_client().post("/api/v1/jobs", content_type="multipart/form-data",
                                  data=multipart([read(ravdess_file(2, "01")), ("bad.wav", b"not audio")],
                                                 client_reference="schemas"))
    body = resp.get_json()
    assert resp.status_code == 202
    assert schemas.UploadAccepted.model_validate(body).to_json() == body
    assert "error" not in body["jobs"][0] and body["jobs"][1]["error"]["code"] == "unsupported_format"


def test_webhook_payloads_are_events(seeded_app: tuple[Flask, dict[str, Any]]) -> None:
    app, seeded = seeded_app
    with app.extensions["ser"].sessions() as session:
        rows = session.scalars(select(WebhookDelivery).where(
            WebhookDelivery.batch_id == uuid.UUID(seeded["batch_id"][0]))).all()
        payloads = [(row.event, row.payload) for row in rows]
    assert {"job.succeeded", "job.failed"} <= {event for event, _ in payloads}
    for event, payload in payloads:
        model = schemas.BatchEvent if event == "batch.completed" else schemas.JobEvent
        assert payload["type"] == event
        assert model.model_validate(payload).to_json() == payload


def test_export_rows_are_export_rows(seeded_app: tuple[Flask, dict[str, Any]]) -> None:
    app, _ = seeded_app
    client = app.test_client()
    rows = json.loads(client.get("/api/v1/export?format=json&segments=true&client_reference=seed").data)
    assert len(rows) == 4 and [r["segment"] for r in rows if r["segment"] is not None] == [0, 1]
    for row in rows:
        assert list(row) == list(schemas.EXPORT_COLUMNS)
        assert schemas.ExportRow.model_validate(row).to_json() == row
    header = next(csv.reader(io.StringIO(client.get("/api/v1/export?format=csv").get_data(as_text=True))))
    assert header == list(schemas.EXPORT_COLUMNS)
    assert schemas.EXPORT_COLUMNS[:7] == ("job_id", "batch_id", "filename", "client_reference", "status",
                                          "created_at", "duration_s")
    assert [c for c in schemas.EXPORT_COLUMNS if c.startswith("p_")] == [f"p_{e}" for e in EMOTIONS]


def test_export_csv_writes_booleans_as_the_json_does(seeded_app: tuple[Flask, dict[str, Any]]) -> None:
    """`uncertain` is true/false in the CSV, as in the JSON (not Python's True/False); null is empty."""
    app, _ = seeded_app
    client = app.test_client()
    query = "segments=true&client_reference=seed"
    as_json = json.loads(client.get(f"/api/v1/export?format=json&{query}").data)
    as_csv = list(csv.DictReader(io.StringIO(client.get(f"/api/v1/export?format=csv&{query}").get_data(as_text=True))))
    assert {r["uncertain"] for r in as_json} == {True, False, None}  # the seed has each
    assert [r["uncertain"] for r in as_csv] == [{True: "true", False: "false", None: ""}[r["uncertain"]]
                                                for r in as_json]


# --- unknown keys fail -----------------------------------------------------------------------

def test_a_key_without_a_field_fails(seeded_app: tuple[Flask, dict[str, Any]]) -> None:
    app, seeded = seeded_app
    body = app.test_client().get(f"/api/v1/jobs/{seeded['job_id'][0]}").get_json()
    for place in (body, body["result"], body["result"]["segments"][0], body["result"]["transcript"], body["queue"]):
        place["undocumented"] = 1
        with pytest.raises(ValidationError, match="undocumented"):
            schemas.Job.model_validate(body)
        del place["undocumented"]
    schemas.Job.model_validate(body)


def test_serialiser_refuses_what_the_schema_does_not_say() -> None:
    """A key written into a stored segment or transcript without a field fails at serialising,
    and so in any test that serves it, instead of reaching clients undocumented."""
    probs = dict.fromkeys(EMOTIONS, round(1 / len(EMOTIONS), 6))
    segment = {"start": 0.0, "end": 1.0, "speech_s": 0.8, "emotion": "sad", "confidence": 0.4, "uncertain": False,
               "probabilities": probs}
    result = Result(job_id=uuid.uuid4(), emotion="sad", confidence=0.4, uncertain=False, probabilities=probs,
                    model_probabilities={"rf": probs}, model_versions={"rf": "rf-1"}, timings_ms={"total": 1.0},
                    transcript=None, segments=[segment])
    assert serialize.result_dict(result)["segments"] == [segment]
    result.segments = [{**segment, "pitch_hz": 180.0}]
    with pytest.raises(ValidationError, match="pitch_hz"):
        serialize.result_dict(result)
    result.segments = [segment]
    result.transcript = {"status": "succeeded", "engine": "sphinx", "language": "en-US", "words": 3}
    with pytest.raises(ValidationError, match="words"):
        serialize.result_dict(result)


# --- the OpenAPI document --------------------------------------------------------------------

def test_document_components_are_the_models_schemas() -> None:
    doc = openapi.document()
    assert doc["openapi"].startswith("3.1")  # nullability as JSON Schema's anyOf with null
    components = doc["components"]["schemas"]
    assert components == schemas.components()
    for model in schemas.API_MODELS:
        generated = schemas.json_schema(model)
        for name, nested in generated.pop("$defs", {}).items():
            assert components[name] == nested, name
        assert components[model.__name__] == generated, model.__name__
    # Every reference in the document resolves to a component.
    refs = {r.rsplit("/", 1)[-1] for r in _refs(doc) if r.startswith("#/components/schemas/")}
    assert refs and refs <= set(components)
    assert {"Job", "Batch", "JobEvent", "BatchEvent"} <= refs


def test_document_describes_fields_and_enums() -> None:
    job = openapi.document()["components"]["schemas"]["Job"]
    assert job["description"] and "additionalProperties" not in job and "title" not in job
    assert job["properties"]["status"]["enum"] == list(schemas.STATUSES)
    assert job["properties"]["result"] == {"anyOf": [{"$ref": "#/components/schemas/Result"}, {"type": "null"}]}
    result = openapi.document()["components"]["schemas"]["Result"]
    assert "segments" not in result["required"] and result["properties"]["segments"]["type"] == "array"
    assert result["properties"]["probabilities"]["description"]


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def test_lists_kept_in_one_place() -> None:
    from web import uploads

    assert tuple(s.value for s in JobStatus) == schemas.STATUSES
    assert tuple(schemas.JobCounts.model_fields) == schemas.STATUSES
    assert uploads.DEVICES is schemas.DEVICES and uploads.TRANSCRIBE is schemas.TRANSCRIBE
    assert get_args(schemas.Transcript.model_fields["status"].annotation) == ("pending", "succeeded", "unavailable")


# --- the client's types --------------------------------------------------------------------

# Fields the server sends that the client (``client/ser_client/types.py``) does not declare yet; it
# keeps them as extras. To be closed in the client, then removed here.
CLIENT_GAPS: set[tuple[str, str]] = set()  # (model, field) the client may lag behind on; none today


def _extras(model: BaseModel, path: str = "") -> Iterator[str]:
    """Every field a client model received but does not declare (``CLIENT_GAPS`` aside), as a dotted path."""
    for key in model.model_extra or {}:
        if (type(model).__name__, key) not in CLIENT_GAPS:
            yield f"{path}{key}"
    for name in type(model).model_fields:
        value = getattr(model, name)
        for k, item in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(item, BaseModel):
                yield from _extras(item, f"{path}{name}[{k}]." if isinstance(value, list) else f"{path}{name}.")
        if isinstance(value, dict):
            for key, item in value.items():
                if isinstance(item, BaseModel):
                    yield from _extras(item, f"{path}{name}.{key}.")


def test_client_types_declare_every_field_the_server_sends(seeded_app: tuple[Flask, dict[str, Any]]) -> None:
    """The client is its own distribution and does not import these models; it is checked against
    them: every property of a schema it has a type for is a field of that type, and the seeded
    JSON parses with nothing left over as an undeclared extra."""
    components = openapi.document()["components"]["schemas"]
    shared = [name for name in components if isinstance(getattr(ser_client.types, name, None), type)]
    assert {"Job", "Result", "Segment", "Transcript", "Batch", "JobPage", "UploadAccepted"} <= set(shared)
    missing = {(name, field) for name in shared for field in components[name]["properties"]
               if field not in getattr(ser_client.types, name).model_fields}
    assert missing == CLIENT_GAPS  # a gap closed in the client: take it out of CLIENT_GAPS
    app, seeded = seeded_app
    client_types = {schemas.Job: ser_client.Job, schemas.JobPage: ser_client.types.JobPage,
                    schemas.Batch: ser_client.Batch}
    for model, body in _served(app, seeded):
        parsed = client_types[model].model_validate(body)
        assert list(_extras(parsed)) == [], model.__name__
        assert parsed.to_dict() == body


# --- the model manifest --------------------------------------------------------------------

def test_manifest_loads_typed() -> None:
    from ser_ml.inference import verify_models
    from ser_ml.speech_features import FEATURE_VERSION

    manifest = schemas.Manifest.load(MODELS / "manifest.json")
    assert manifest.feature_version == FEATURE_VERSION and tuple(manifest.classes) == EMOTIONS
    assert set(manifest.artifacts()) == {"encoder", "speech_detector", "rf", "lstm"}
    assert manifest.models["lstm"].version.startswith("lstm-") and 0 < manifest.ensemble.uncertain_threshold < 1
    assert manifest.model_extra and "cv" in manifest.model_extra  # the training reports are kept
    raw = json.loads((MODELS / "manifest.json").read_text())
    assert manifest.model_dump(mode="json", exclude_unset=True) == raw
    assert verify_models(MODELS) == manifest


def test_manifest_without_what_is_loaded_asks_to_retrain(tmp_path: Path) -> None:
    from ser_ml.encoder import ArtifactError
    from ser_ml.inference import verify_models

    shutil.copy(MODELS / "manifest.json", tmp_path / "manifest.json")
    raw = json.loads((tmp_path / "manifest.json").read_text())
    del raw["speech_detector"]  # as manifests from before the speech detector
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ValidationError, match="speech_detector"):
        schemas.Manifest.load(tmp_path / "manifest.json")
    with pytest.raises(ArtifactError, match="speech_detector.*retrain"):
        verify_models(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="unreadable"):
        verify_models(tmp_path)


def test_production_serves_a_stored_shape_it_does_not_know() -> None:
    """Strict in tests; in production a row an older worker wrote with an unknown key is logged and
    served as it is, not turned into a 500."""
    stored = {"start": 0.0, "end": 1.5, "emotion": "calm", "confidence": 0.5, "probabilities": {"calm": 1.0},
              "legacy_key": 1}
    with pytest.raises(ValidationError):
        schemas.Segment.build(stored)
    schemas.set_strict(False)
    try:
        served = schemas.Segment.build(stored)
    finally:
        schemas.set_strict(True)
    # Served without the key it cannot describe; what it can describe is as stored.
    assert served.to_json() == {k: v for k, v in stored.items() if k != "legacy_key"}


def test_listed_jobs_carry_the_webhooks_their_own_page_shows(seeded_app: tuple[Flask, dict[str, Any]]) -> None:
    """A job's `webhooks` in the list and in its batch are what GET /jobs/<id> says, attempts and all:
    an empty list there would say that nothing was sent."""
    app, seeded = seeded_app
    client = app.test_client()
    own = {j: client.get(f"/api/v1/jobs/{j}").get_json()["webhooks"] for j in seeded["job_id"]}
    assert any(d["attempts"] for deliveries in own.values() for d in deliveries)
    listed = client.get("/api/v1/jobs", query_string={"ids": ",".join(seeded["job_id"])}).get_json()["jobs"]
    assert {j["id"]: j["webhooks"] for j in listed} == own
    batch = client.get(f"/api/v1/batches/{seeded['batch_id'][0]}").get_json()
    assert {j["id"]: j["webhooks"] for j in batch["jobs"]} == own
    assert all(d["id"] not in {o["id"] for ds in own.values() for o in ds} for d in batch["webhooks"])
