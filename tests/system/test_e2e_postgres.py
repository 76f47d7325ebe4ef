"""The production shape end to end: API upload → Postgres → Redis → real worker → poll → pages."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from sqlalchemy import func, select

from ser_shared.contracts import ANALYZE
from ser_shared.db import make_engine, make_session_factory
from ser_shared.emotions import EMOTIONS
from ser_shared.enqueue import make_celery
from ser_shared.models import Job, Result
from ser_shared.settings import Settings
from tests.conftest import ravdess_file, wait_for
from tests.helpers import multipart, read
from worker.reconcile import sweep_unqueued

pytestmark = pytest.mark.slow

GOOD = [(1, "05"), (2, "03"), (3, "04"), (4, "01"), (5, "06"), (6, "08")]


def _poll_batch(client, batch_id: str, timeout: float = 120) -> dict:  # type: ignore[no-untyped-def]
    def done() -> dict | None:
        body = client.get(f"/api/v1/batches/{batch_id}").get_json()
        return body if body["done"] else None

    return wait_for(done, timeout)


@pytest.fixture(scope="module")
def processed_batch(app, pg_worker):  # type: ignore[no-untyped-def]
    """One batch of six real recordings and two broken files, processed by the real worker."""
    client = app.test_client()
    good = [read(ravdess_file(actor, code)) for actor, code in GOOD]
    bad = [("empty.wav", b""), ("notes.wav", b"these are not the samples you are looking for\n" * 20)]
    resp = client.post("/api/v1/jobs", data=multipart(good + bad), content_type="multipart/form-data")
    assert resp.status_code == 202, resp.get_data(as_text=True)
    upload = resp.get_json()
    return upload, _poll_batch(client, upload["batch_id"])


def test_upload_answers_contract(processed_batch) -> None:  # type: ignore[no-untyped-def]
    upload, _ = processed_batch
    uuid.UUID(upload["batch_id"])
    assert [j["filename"] for j in upload["jobs"]][-2:] == ["empty.wav", "notes.wav"]
    queued = [j for j in upload["jobs"] if j["status"] == "queued"]
    assert len(queued) == 6 and all(j["url"].endswith(f"/api/v1/jobs/{j['id']}") for j in queued)
    failed = {j["filename"]: j["error"]["code"] for j in upload["jobs"] if j["status"] == "failed"}
    assert failed == {"empty.wav": "empty_file", "notes.wav": "unsupported_format"}


def test_every_good_file_succeeds_and_bad_ones_fail_alone(processed_batch) -> None:  # type: ignore[no-untyped-def]
    _, batch = processed_batch
    assert batch["counts"] == {"queued": 0, "processing": 0, "succeeded": 6, "failed": 2}
    for job in batch["jobs"][:6]:
        assert job["status"] == "succeeded" and job["error"] is None and job["attempts"] == 1
        result = job["result"]
        assert result["emotion"] in EMOTIONS
        assert set(result["probabilities"]) == set(EMOTIONS)
        assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-3)
        assert result["confidence"] == pytest.approx(max(result["probabilities"].values()), abs=1e-6)
        assert isinstance(result["uncertain"], bool)
        assert set(result["models"]) == {"rf", "lstm"}
        assert all(m["version"] for m in result["models"].values())
        assert job["duration_s"] == pytest.approx(3.5, abs=1.5)
        assert {"decode", "features", "inference", "total"} <= set(result["timings_ms"])


def test_results_equal_direct_computation(processed_batch, pg_settings: Settings) -> None:  # type: ignore[no-untyped-def]
    """What the service stored is what the models compute on the same file in this process."""
    from ser_ml.features import SAMPLE_RATE
    from ser_ml.inference import Ensemble
    from ser_ml.speech_features import speech_clip
    from ser_shared.audio import decode

    _, batch = processed_batch
    ensemble = Ensemble.load(pg_settings.models_dir)
    for job, (actor, code) in zip(batch["jobs"][:6], GOOD, strict=True):
        path = ravdess_file(actor, code)
        (direct,) = ensemble.predict(ensemble.features([speech_clip(decode(path, "flac", SAMPLE_RATE, 600))]))
        assert job["result"]["emotion"] == direct.emotion
        stored = np.array([job["result"]["probabilities"][e] for e in EMOTIONS])
        assert np.allclose(stored, [direct.probabilities[e] for e in EMOTIONS], atol=1e-4)
        assert job["result"]["models"]["rf"]["version"] == ensemble.versions["rf"]


def test_one_result_row_per_job_even_when_redelivered(app, processed_batch, pg_settings: Settings) -> None:  # type: ignore[no-untyped-def]
    """A duplicate delivery of finished jobs changes nothing (acks_late makes redelivery possible)."""
    _, batch = processed_batch
    ids = [j["id"] for j in batch["jobs"][:2]]
    make_celery(pg_settings).send_task(ANALYZE, args=[ids], queue="cpu")
    # One worker process, prefetch 1: once a job uploaded after the duplicate is done,
    # the duplicate has been handled.
    client = app.test_client()
    marker = client.post("/api/v1/jobs", data=multipart([read(ravdess_file(8, "07"))]),
                         content_type="multipart/form-data").get_json()["jobs"][0]["id"]
    wait_for(lambda: client.get(f"/api/v1/jobs/{marker}").get_json()["status"] == "succeeded")
    factory = make_session_factory(make_engine(pg_settings))
    with factory() as session:
        for job_id in ids:
            rows = session.scalar(select(func.count()).select_from(Result).where(Result.job_id == uuid.UUID(job_id)))
            assert rows == 1
            assert session.get(Job, uuid.UUID(job_id)).attempts == 1  # finished jobs are not re-run


def test_pages_show_the_results(app, processed_batch) -> None:  # type: ignore[no-untyped-def]
    client = app.test_client()
    _, batch = processed_batch
    history = client.get(f"/history?batch_id={batch['id']}").get_data(as_text=True)
    for job in batch["jobs"]:
        assert job["filename"] in history
    first = batch["jobs"][0]
    assert first["result"]["emotion"] in history
    filtered = client.get(f"/history?batch_id={batch['id']}&status=failed").get_data(as_text=True)
    assert "empty.wav" in filtered and batch["jobs"][0]["filename"] not in filtered
    page = client.get(f"/jobs/{first['id']}").get_data(as_text=True)
    assert f"/api/v1/jobs/{first['id']}/audio" in page and "<audio" in page
    assert all(e in page for e in EMOTIONS)
    batch_page = client.get(f"/batches/{batch['id']}").get_data(as_text=True)
    assert "8 file(s)" in batch_page and "8 done" in batch_page


def test_upload_survives_a_broker_outage(pg_settings: Settings, pg_worker) -> None:  # type: ignore[no-untyped-def]
    """With the broker unreachable the upload still answers 202, and the jobs run once it is back."""
    from web import create_app

    broken = pg_settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    client = create_app(broken).test_client()
    path = ravdess_file(7, "05")
    resp = client.post("/api/v1/jobs", data=multipart([read(path)]), content_type="multipart/form-data")
    assert resp.status_code == 202
    body = resp.get_json()
    assert "warning" in body
    job_id = body["jobs"][0]["id"]
    job = client.get(f"/api/v1/jobs/{job_id}").get_json()
    assert job["status"] == "queued" and job["queue"]["enqueued"] is False and job["queue"]["error"]
    assert client.get("/readyz").status_code == 503

    factory = make_session_factory(make_engine(pg_settings))
    no_grace = pg_settings.model_copy(update={"unqueued_grace_s": 0})
    assert sweep_unqueued(make_celery(pg_settings), factory, no_grace) >= 1
    good = create_app(pg_settings).test_client()
    final = wait_for(lambda: (j := good.get(f"/api/v1/jobs/{job_id}").get_json())["status"] == "succeeded" and j)
    assert final["queue"]["enqueued"] is True and final["queue"]["error"] is None
    assert final["result"]["emotion"] in EMOTIONS


def _wav_bytes(audio: np.ndarray) -> bytes:
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, audio, 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def test_no_speech_gets_no_emotion_through_the_service(app, pg_worker) -> None:  # type: ignore[no-untyped-def]
    """Noise, a dial tone, a melody and DTMF end `no_speech` (failed, no result); speech in the
    same batch still gets its emotion; the export carries the code."""
    from tests import nonspeech

    client = app.test_client()
    kinds = ["white_noise", "dial_tone", "melody", "dtmf"]
    files = [(f"{k}.wav", _wav_bytes(nonspeech.make(k, seed=3))) for k in kinds]
    files.append(read(ravdess_file(7, "05")))
    resp = client.post("/api/v1/jobs", data=multipart(files), content_type="multipart/form-data")
    assert resp.status_code == 202, resp.get_data(as_text=True)
    batch = _poll_batch(client, resp.get_json()["batch_id"])
    by_name = {j["filename"]: j for j in batch["jobs"]}
    for kind in kinds:
        job = by_name[f"{kind}.wav"]
        assert job["status"] == "failed" and job["error"]["code"] == "no_speech", job
        assert job["result"] is None
    speech = by_name[ravdess_file(7, "05").name]
    assert speech["status"] == "succeeded" and speech["result"]["emotion"] in EMOTIONS
    export = client.get(f"/api/v1/export?batch_id={batch['id']}&format=json").get_json()
    rows = export if isinstance(export, list) else export.get("jobs", export)
    assert sum(1 for r in rows if "no_speech" in str(r)) == len(kinds)
