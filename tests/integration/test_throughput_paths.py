"""The batched paths tuned for throughput: even chunks, one-statement result writes, one BLAS thread."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy import func, select

from ser_ml.inference import Prediction
from ser_ml.pipeline import Outcome
from ser_shared.db import make_engine, make_session_factory
from ser_shared.enqueue import chunks
from ser_shared.models import Batch, Job, Result
from ser_shared.settings import REPO_ROOT, Settings
from worker import results


@pytest.mark.parametrize("n", [0, 1, 4, 15, 16, 17, 100, 1000])
@pytest.mark.parametrize("size", [1, 4, 16, 50])
def test_chunks_are_few_even_bounded_and_in_order(n: int, size: int) -> None:
    ids = [uuid.uuid4() for _ in range(n)]
    parts = chunks(ids, size)
    assert [i for part in parts for i in part] == ids
    assert len(parts) == -(-n // size)
    assert all(0 < len(part) <= size for part in parts)
    assert not parts or max(map(len, parts)) - min(map(len, parts)) <= 1


def _prediction(emotion: str, p: float) -> Prediction:
    probs = {"neutral": round(1 - p, 6), emotion: p}
    return Prediction(emotion, p, False, probs, {"rf": probs, "lstm": probs})


def test_persist_writes_a_whole_chunk_and_overwrites_on_redelivery(pg_settings: Settings) -> None:
    factory = make_session_factory(make_engine(pg_settings))
    batch = Batch(id=uuid.uuid4(), file_count=3, options={})
    jobs = [Job(id=uuid.uuid4(), batch_id=batch.id, position=i, filename=f"{i}.wav", status="queued", options={},
                size_bytes=1, attempts=0, storage_key="ab/cd/abcd", format="wav") for i in range(3)]
    with factory() as session:
        session.add_all([batch, *jobs])
        session.commit()
    ids = [j.id for j in jobs]
    results.claim(factory, [str(i) for i in ids], pg_settings)
    first = [Outcome(ids[0], _prediction("angry", 0.6), timings_ms={"total": 1.0}),
             Outcome(ids[1], _prediction("sad", 0.7), timings_ms={"total": 2.0}),
             Outcome(ids[2], error_code="silent_audio", error_message="the recording is silent")]
    results.persist(factory, first, {"rf": "a", "lstm": "b"})
    results.persist(factory, [Outcome(ids[0], _prediction("happy", 0.8)), first[1], first[2]], {"rf": "a", "lstm": "b"})
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(Result).where(Result.job_id.in_(ids))) == 2
        rows = {r.job_id: r for r in session.scalars(select(Result).where(Result.job_id.in_(ids)))}
        assert (rows[ids[0]].emotion, rows[ids[0]].confidence) == ("happy", 0.8)
        assert (rows[ids[1]].emotion, rows[ids[1]].timings_ms) == ("sad", {"total": 2.0})
        found = session.scalars(select(Job).where(Job.id.in_(ids)))
        states = {j.id: (j.status, j.emotion, j.error_code) for j in found}
    assert states == {ids[0]: ("succeeded", "happy", None), ids[1]: ("succeeded", "sad", None),
                      ids[2]: ("failed", None, "silent_audio")}


def _blas_threads_before_and_after_worker_init(tmp_path: Path, extra: dict[str, str]) -> tuple[str, str]:
    """BLAS thread counts in a fresh process: after importing the worker's modules and building
    its app (nothing tuned yet), and after a worker is set up from that app (``worker_init``)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SER_") and k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update({"SER_DATA_DIR": str(tmp_path)}, **extra)
    code = ("import threadpoolctl, worker.tasks\n"
            "from ser_shared.settings import get_settings\n"
            "from worker.celery_app import create_worker\n"
            "def blas(): return sorted({i['num_threads'] for i in threadpoolctl.threadpool_info() "
            "if i['user_api'] == 'blas'})\n"
            "app = create_worker(get_settings())\n"
            "before = blas()\n"
            "app.WorkController(pool='threads', hostname='blas@test', without_heartbeat=True, "
            "without_mingle=True, without_gossip=True)\n"
            "print(before, blas(), sep='|')\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                         check=True, timeout=120).stdout.strip().splitlines()[-1]
    before, after = out.split("|")
    return before, after


def test_worker_processes_run_blas_single_threaded_unless_told_otherwise(tmp_path: Path) -> None:
    before, after = _blas_threads_before_and_after_worker_init(tmp_path, {})
    assert after == "[1]"
    if (os.cpu_count() or 1) > 1:
        assert before != "[1]"  # importing the worker and building its app tune nothing
        assert _blas_threads_before_and_after_worker_init(tmp_path, {"OPENBLAS_NUM_THREADS": "2"})[1] == "[2]"
