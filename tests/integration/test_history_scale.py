"""The history at 100,000 jobs: indexed keyset pages, a one-query summary, a streamed export.

Runs on a Postgres database of its own (created and dropped here, migrated with the real
migrations) so the rows never reach other tests. Timings are printed, not asserted (the machine is
shared and noisy); what is asserted is that the planner uses an index for every page query, that
pages and the export are complete and correct, and that the export's memory does not grow with it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy import event, func, select

from ser_shared.db import make_engine, make_session_factory
from ser_shared.emotions import EMOTIONS
from ser_shared.models import LOCAL_TENANT, Job
from ser_shared.settings import Settings
from tests.conftest import private_database
from web import queries

pytestmark = pytest.mark.slow

N_JOBS = 100_000
N_BATCHES = 200
OTHER_TENANT = "tenant-b"  # 5% of the rows: every query must skip them by index, not by reading them
NOW = datetime(2026, 11, 1, tzinfo=UTC)
# The sort orders beyond the default need (tenant, column, id) indexes and the file-name search
# (ILIKE '%...%') a trigram index; the migrations must have created them.
SORT_AND_SEARCH_INDEXES = {"ix_jobs_tenant_confidence_id", "ix_jobs_tenant_duration_s_id", "ix_jobs_tenant_filename_id",
                           "ix_jobs_filename_trgm"}


@pytest.fixture(scope="module")
def scale_settings(pg_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    data = tmp_path_factory.mktemp("scale")
    with private_database(pg_settings, data_dir=data, storage_dir=data / "uploads") as settings:
        yield settings


def _rows(rng: np.random.Generator) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[uuid.UUID]]:
    batches = [uuid.uuid4() for _ in range(N_BATCHES)]
    statuses = rng.choice(["succeeded", "failed", "queued", "processing"], N_JOBS, p=[0.85, 0.08, 0.04, 0.03])
    emotions = rng.integers(0, len(EMOTIONS), N_JOBS)
    confidences = np.round(rng.beta(4, 2, N_JOBS), 4)
    durations = np.round(rng.uniform(1.0, 60.0, N_JOBS), 2)
    ages = rng.uniform(0, 365 * 86400, N_JOBS)
    tenants = np.where(rng.random(N_JOBS) < 0.05, OTHER_TENANT, LOCAL_TENANT)
    words = ("call", "interview", "meeting", "memo", "lecture", "podcast")
    jobs, results = [], []
    for i in range(N_JOBS):
        job_id, status, created = uuid.uuid4(), str(statuses[i]), NOW - timedelta(seconds=float(ages[i]))
        done = status == "succeeded"
        emotion, confidence = (EMOTIONS[emotions[i]], float(confidences[i])) if done else (None, None)
        duration = None if status == "failed" and i % 2 else float(durations[i])
        error = ("decode_failed", "cannot decode the audio") if status == "failed" else (None, None)
        jobs.append((job_id, batches[i % N_BATCHES], str(tenants[i]), i // N_BATCHES,
                     f"{words[i % len(words)]}-{i:06d}.wav", 64000, "wav", duration, "{}", status, *error,
                     1 if status != "queued" else 0, created, created + timedelta(seconds=5) if done else None,
                     emotion, confidence, created))
        if emotion is not None and confidence is not None:
            probs = dict.fromkeys(EMOTIONS, round((1 - confidence) / 6, 4)) | {emotion: confidence}
            transcript = json.dumps({"status": "succeeded", "engine": "sphinx", "language": "en-US",
                                     "text": f"hello number {i}"}) if i % 3 == 0 else None
            results.append((job_id, emotion, confidence, confidence < 0.45, json.dumps(probs),
                            json.dumps({"rf": probs, "lstm": probs}), '{"rf": "rf-1", "lstm": "lstm-1"}',
                            '{"decode": 3.1, "features": 20.5, "inference": 12.0, "total": 36.0}', transcript,
                            created))
    return jobs, results, batches


@pytest.fixture(scope="module")
def loaded(scale_settings: Settings) -> dict[str, Any]:
    """100,000 jobs and results for the succeeded ones, written with COPY, then ANALYZEd."""
    rng = np.random.default_rng(7)
    started = time.perf_counter()
    jobs, results, batches = _rows(rng)
    built = time.perf_counter() - started
    engine = make_engine(scale_settings)
    present = {ix["name"] for ix in sa.inspect(engine).get_indexes("jobs")}
    assert present >= SORT_AND_SEARCH_INDEXES, f"missing from the migrations: {SORT_AND_SEARCH_INDEXES - present}"
    raw = engine.raw_connection()
    try:
        cur = raw.driver_connection.cursor()  # type: ignore[union-attr]
        with cur.copy("COPY batches (id, tenant, created_at, options, file_count) FROM STDIN") as copy:
            for b in batches:
                copy.write_row((b, LOCAL_TENANT, NOW - timedelta(days=400), "{}", N_JOBS // N_BATCHES))
        with cur.copy("COPY jobs (id, batch_id, tenant, position, filename, size_bytes, format, duration_s, options,"
                      " status, error_code, error_message, attempts, created_at, finished_at, emotion, confidence,"
                      " enqueued_at) FROM STDIN") as copy:
            for row in jobs:
                copy.write_row(row)
        with cur.copy("COPY results (job_id, emotion, confidence, uncertain, probabilities, model_probabilities,"
                      " model_versions, timings_ms, transcript, created_at) FROM STDIN") as copy:
            for row in results:
                copy.write_row(row)
        raw.commit()
        cur.execute("ANALYZE batches")
        cur.execute("ANALYZE jobs")
        cur.execute("ANALYZE results")
        raw.commit()
    finally:
        raw.close()
    print(f"\nbuilt {N_JOBS} rows in {built:.1f} s; COPY + ANALYZE in {time.perf_counter() - started - built:.1f} s")
    return {"engine": engine, "batches": batches, "local": sum(1 for j in jobs if j[2] == LOCAL_TENANT)}


@pytest.fixture(scope="module")
def scale_client(scale_settings: Settings, loaded):  # type: ignore[no-untyped-def]
    from web import create_app

    app = create_app(scale_settings)
    app.config["TESTING"] = True
    return app.test_client()


CASES = [
    "",
    "sort=created_at",
    "sort=-confidence",
    "sort=confidence",
    "sort=-duration",
    "sort=filename",
    "sort=-filename",
    "status=failed",
    "status=processing&sort=-confidence",
    "emotion=angry",
    "emotion=sad&min_confidence=0.8",
    "min_confidence=0.9&sort=-confidence",
    "min_confidence=0.2&max_confidence=0.3",
    "since=2026-10-01&until=2026-10-07",
    "since=2026-06-01&until=2026-06-02&sort=-confidence",
    "q=meeting-0000",
    "q=meeting&sort=-confidence",
    "batch=BATCH",
    "batch=BATCH&sort=filename",
]


def _capture(engine: sa.Engine) -> tuple[list[tuple[str, Any]], Any]:
    statements: list[tuple[str, Any]] = []

    def before(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        statements.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", before)
    return statements, before


def _plans(engine: sa.Engine, statements: list[tuple[str, Any]]) -> list[str]:
    """EXPLAIN of each captured statement that reads the jobs table."""
    plans = []
    with engine.connect() as conn:
        for statement, parameters in statements:
            if "FROM jobs" in statement:
                rows = conn.exec_driver_sql("EXPLAIN " + statement, parameters).all()
                plans.append("\n".join(r[0] for r in rows))
    return plans


@pytest.mark.parametrize("query", CASES)
def test_pages_use_indexes_and_are_quick(scale_client, loaded, query: str) -> None:  # type: ignore[no-untyped-def]
    engine = loaded["engine"]
    query = query.replace("BATCH", str(loaded["batches"][3]))
    args = dict(part.split("=", 1) for part in query.split("&") if part)
    f = queries.parse_filter(args, LOCAL_TENANT)
    factory = make_session_factory(engine)
    statements, listener = _capture(engine)
    try:
        with factory() as session:
            t0 = time.perf_counter()
            first, cursor = queries.list_jobs(session, f, 25, None)
            t1 = time.perf_counter()
            second, _ = queries.list_jobs(session, f, 25, cursor) if cursor else ([], None)
            t2 = time.perf_counter()
            summary = queries.summarize(session, f)
            t3 = time.perf_counter()
    finally:
        event.remove(engine, "before_cursor_execute", listener)
    plans = _plans(engine, statements)
    page_plans = [p for p in plans if "Aggregate" not in p.splitlines()[0]]
    assert page_plans, statements
    for plan in page_plans:
        assert "Seq Scan on jobs" not in plan, plan
    t4 = time.perf_counter()
    resp = scale_client.get(f"/history?{query}")
    t5 = time.perf_counter()
    assert resp.status_code == 200
    # The page and the summary agree with a direct count, and page two continues page one.
    assert len({j.id for j in first} | {j.id for j in second}) == len(first) + len(second)
    assert all(j.tenant == LOCAL_TENANT for j in first + second)
    summary_plan = next((p for p in plans if "Aggregate" in p.splitlines()[0]), "")
    print(f"\n{query or '(no filter)':45s} page1 {1000 * (t1 - t0):7.1f} ms  page2 {1000 * (t2 - t1):7.1f} ms  "
          f"summary {1000 * (t3 - t2):7.1f} ms ({summary.total} jobs)  whole page {1000 * (t5 - t4):7.1f} ms  "
          f"summary plan: {summary_plan.splitlines()[-1].strip() if summary_plan else '?'}")


def test_summary_matches_direct_count(loaded) -> None:  # type: ignore[no-untyped-def]
    factory = make_session_factory(loaded["engine"])
    with factory() as session:
        summary = queries.summarize(session, queries.parse_filter({}, LOCAL_TENANT))
        assert summary.total == loaded["local"]
        angry = session.scalar(select(func.count()).select_from(Job).where(Job.tenant == LOCAL_TENANT,
                                                                           Job.emotion == "angry"))
        assert summary.by_emotion["angry"] == angry


def test_deep_pages_cost_what_the_first_does(scale_client, loaded) -> None:  # type: ignore[no-untyped-def]
    """Keyset paging: the 50th page of 200 is as quick as the first (no OFFSET scan)."""
    for sort in ("-created_at", "confidence"):
        url, timings, seen = f"/api/v1/jobs?limit=200&sort={sort}", [], 0
        for _ in range(50):
            t0 = time.perf_counter()
            body = scale_client.get(url).get_json()
            timings.append(time.perf_counter() - t0)
            seen += len(body["jobs"])
            url = f"/api/v1/jobs?limit=200&sort={sort}&cursor={body['next_cursor']}"
        assert seen == 10_000
        print(f"\nsort {sort}: page 1 {1000 * timings[0]:.1f} ms, page 50 {1000 * timings[-1]:.1f} ms, "
              f"median {1000 * sorted(timings)[25]:.1f} ms (200 rows each)")


def _rss() -> int:
    """This process's resident memory now, in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _export(client, url: str, sample) -> tuple[int, int, int, str]:  # type: ignore[no-untyped-def]
    """Read a streamed export chunk by chunk: (chunks, characters, lines, last characters)."""
    resp = client.get(url, buffered=False)
    assert resp.status_code == 200
    chunks, size, lines, tail = 0, 0, 0, ""
    for chunk in resp.response:
        text = chunk.decode() if isinstance(chunk, bytes) else chunk
        chunks, size, lines = chunks + 1, size + len(text), lines + text.count("\n")
        tail = (tail + text)[-2000:]
        if chunks % 20 == 0:
            sample()
    resp.close()
    return chunks, size, lines, tail


def test_export_of_everything_streams_in_bounded_memory(scale_client, loaded) -> None:  # type: ignore[no-untyped-def]
    # What one page of rows costs in memory (traced), and so what the whole export would cost if
    # memory grew with it.
    batch = loaded["batches"][0]
    tracemalloc.start()
    try:
        _, _, small_lines, _ = _export(scale_client, f"/api/v1/export?format=csv&batch={batch}", lambda: None)
        _, small_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    proportional = small_peak / (small_lines - 1) * loaded["local"]

    start = _rss()
    peak = [start]
    t0 = time.perf_counter()
    chunks, size, lines, tail = _export(scale_client, "/api/v1/export?format=csv", lambda: peak.append(_rss()))
    elapsed = time.perf_counter() - t0
    growth = max(peak) - start
    # Every local job once (header + rows; no field in these rows holds a newline).
    assert lines == loaded["local"] + 1
    uuid.UUID(list(csv.reader(io.StringIO(tail.splitlines()[-1])))[0][0])
    print(f"\nexport: {lines - 1} rows, {size / 1e6:.1f} MB in {chunks} chunks, {elapsed:.1f} s; "
          f"resident memory grew {growth / 1e6:.1f} MB; one page ({small_lines - 1} rows) traced "
          f"{small_peak / 1e6:.1f} MB, so {proportional / 1e6:.0f} MB if it grew with the rows")
    assert chunks > 100
    assert growth < proportional / 10, (growth, proportional)
