"""The worker's database writes on real Postgres: claim and persist are idempotent."""

from __future__ import annotations

import uuid

from sqlalchemy import func, select

from ser_ml.inference import Prediction
from ser_ml.pipeline import Outcome
from ser_shared.db import make_engine, make_session_factory
from ser_shared.models import Batch, Job, Result
from ser_shared.settings import Settings
from worker import results


def _job(factory, **fields) -> uuid.UUID:  # type: ignore[no-untyped-def]
    batch = Batch(id=uuid.uuid4(), file_count=1, options={})
    job = Job(id=uuid.uuid4(), batch_id=batch.id, filename="x.wav", status="queued", options={}, size_bytes=1,
              attempts=0, storage_key="ab/cd/abcd", format="wav", **fields)
    with factory() as session:
        session.add_all([batch, job])
        session.commit()
    return job.id


def _prediction(emotion: str, p: float) -> Prediction:
    probs = {"neutral": 1 - p, emotion: p}
    return Prediction(emotion, p, False, probs, {"rf": probs, "lstm": probs})


def test_persist_twice_keeps_one_result_with_the_latest_values(pg_settings: Settings) -> None:
    factory = make_session_factory(make_engine(pg_settings))
    job_id = _job(factory)
    assert [i.id for i in results.claim(factory, [str(job_id)], pg_settings)] == [job_id]
    results.persist(factory, [Outcome(job_id, _prediction("angry", 0.6))], {"rf": "a", "lstm": "b"})
    results.persist(factory, [Outcome(job_id, _prediction("sad", 0.7))], {"rf": "a", "lstm": "b"})
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(Result).where(Result.job_id == job_id)) == 1
        result = session.get(Result, job_id)
        job = session.get(Job, job_id)
        assert result is not None and result.emotion == "sad" and result.confidence == 0.7
        assert job is not None and job.status == "succeeded" and job.emotion == "sad"


def test_claim_skips_finished_and_fails_jobs_out_of_attempts(pg_settings: Settings) -> None:
    factory = make_session_factory(make_engine(pg_settings))
    done = _job(factory)
    results.claim(factory, [str(done)], pg_settings)
    results.persist(factory, [Outcome(done, _prediction("happy", 0.5))], {})
    worn = _job(factory)
    with factory() as session:
        session.get(Job, worn).attempts = pg_settings.max_attempts  # type: ignore[union-attr]
        session.commit()
    assert results.claim(factory, [str(done), str(worn)], pg_settings) == []
    with factory() as session:
        assert session.get(Job, done).attempts == 1  # type: ignore[union-attr]
        failed = session.get(Job, worn)
        assert failed is not None and failed.status == "failed" and failed.error_code == "too_many_attempts"


def test_failed_outcome_records_code_and_message(pg_settings: Settings) -> None:
    factory = make_session_factory(make_engine(pg_settings))
    job_id = _job(factory)
    results.claim(factory, [str(job_id)], pg_settings)
    results.persist(factory, [Outcome(job_id, error_code="silent_audio", error_message="the recording is silent")], {})
    with factory() as session:
        job = session.get(Job, job_id)
        assert job is not None and (job.status, job.error_code) == ("failed", "silent_audio")
        assert job.finished_at is not None and job.result is None
