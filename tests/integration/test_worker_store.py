"""The worker's database writes on real Postgres: claim and persist are idempotent."""

from __future__ import annotations

import uuid

from sqlalchemy import func, select

from ser_ml.inference import Prediction
from ser_ml.pipeline import Outcome
from ser_shared.db import make_engine, make_session_factory
from ser_shared.models import Batch, Job, Result, WebhookDelivery
from ser_shared.settings import Settings
from worker import results


def _job(factory, webhook_url: str | None = None, **fields) -> uuid.UUID:  # type: ignore[no-untyped-def]
    batch = Batch(id=uuid.uuid4(), file_count=1, options={}, webhook_url=webhook_url)
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
    assert [i.id for i in results.claim(factory, [str(job_id)], pg_settings).inputs] == [job_id]
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
    claimed = results.claim(factory, [str(done), str(worn)], pg_settings)
    assert (claimed.inputs, claimed.deliveries) == ([], [])  # nothing to analyse, no webhook to send
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


def test_writes_that_finish_jobs_return_the_webhook_deliveries_they_committed(pg_settings: Settings) -> None:
    """The task sends what these return, after the commit (no callback into Celery from here):
    each finishing write returns exactly the delivery rows it created, and a repeated write none."""
    factory = make_session_factory(make_engine(pg_settings))
    hook = "https://hooks.example.com/ser"

    def pending(ids: list[str]) -> set[tuple[str, str]]:
        with factory() as session:
            rows = session.scalars(select(WebhookDelivery).where(WebhookDelivery.id.in_(ids))).all()
            return {(r.event, r.status) for r in rows}

    succeeded = _job(factory, webhook_url=hook)
    claimed = results.claim(factory, [str(succeeded)], pg_settings)
    assert [i.id for i in claimed.inputs] == [succeeded] and claimed.deliveries == []
    sent = results.persist(factory, [Outcome(succeeded, _prediction("happy", 0.9))], {})
    assert pending(sent) == {("job.succeeded", "pending"), ("batch.completed", "pending")} and len(sent) == 2
    assert results.persist(factory, [Outcome(succeeded, _prediction("sad", 0.9))], {}) == []  # a redelivery

    worn = _job(factory, webhook_url=hook)
    with factory() as session:
        session.get(Job, worn).attempts = pg_settings.max_attempts  # type: ignore[union-attr]
        session.commit()
    claimed = results.claim(factory, [str(worn)], pg_settings)
    assert claimed.inputs == [] and pending(claimed.deliveries) == {("job.failed", "pending"),
                                                                     ("batch.completed", "pending")}

    running = _job(factory, webhook_url=hook)
    results.claim(factory, [str(running)], pg_settings)
    sent = results.fail_all(factory, [running], "time_limit_exceeded", "too slow")
    assert pending(sent) == {("job.failed", "pending"), ("batch.completed", "pending")}
    assert results.fail_all(factory, [running], "time_limit_exceeded", "too slow") == []
    assert results.persist(factory, [Outcome(_job(factory), _prediction("happy", 0.5))], {}) == []  # no webhook
