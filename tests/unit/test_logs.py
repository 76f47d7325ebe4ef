"""SER_LOG_FORMAT=json: one JSON object per line, carrying the context bound where the line was made."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from flask import Flask

from ser_shared import logs


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """The root logger with one handler writing here, configured for JSON; restored afterwards."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    stream = io.StringIO()
    root.handlers = [logging.StreamHandler(stream)]
    try:
        logs.configure("INFO", "json")
        yield stream
    finally:
        root.handlers, root.level = saved, level


def _records(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]  # every line is one object


def test_json_lines_carry_the_bound_job_context(captured: io.StringIO) -> None:
    log = logging.getLogger("ser.test")
    with logs.bind(job_id="j-1", batch_id="b-1", tenant="acme"):
        log.info("analysed jobs=%d", 3)
    log.warning("outside")
    inside, outside = _records(captured)
    assert inside["message"] == "analysed jobs=3" and inside["level"] == "INFO" and inside["logger"] == "ser.test"
    assert (inside["job_id"], inside["batch_id"], inside["tenant"]) == ("j-1", "b-1", "acme")
    assert outside["message"] == "outside" and not {"job_id", "batch_id", "tenant"} & set(outside)


def test_a_multiline_message_stays_one_line(captured: io.StringIO) -> None:
    try:
        raise ValueError("first\nsecond")
    except ValueError:
        logging.getLogger("ser.test").exception("failed")
    (record,) = _records(captured)
    assert "ValueError: first\nsecond" in str(record["exc_info"])


def test_each_request_binds_its_request_id(app: Flask, captured: io.StringIO) -> None:
    log = logging.getLogger("ser.test")
    with app.test_request_context("/api/v1/jobs", headers={"X-Request-ID": "from-the-proxy"}):
        assert app.preprocess_request() is None
        log.info("in the request")
        app.do_teardown_request()
    with app.test_request_context("/healthz"):  # public: no tenant is asked for
        assert app.preprocess_request() is None
        log.info("a probe")
        app.do_teardown_request()
    log.info("after them")
    during, probe, after = _records(captured)
    assert during["request_id"] == "from-the-proxy" and during["tenant"] == "local"
    assert len(str(probe["request_id"])) == 32 and "tenant" not in probe
    assert "request_id" not in after and "tenant" not in after


def test_request_id_is_answered_and_made_when_missing(app: Flask) -> None:
    client = app.test_client()
    assert client.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["X-Request-ID"] == "abc-123"
    made = client.get("/healthz").headers["X-Request-ID"]
    assert len(made) == 32 and int(made, 16) >= 0
    # A header that could forge log lines is replaced, not echoed.
    assert client.get("/healthz", headers={"X-Request-ID": "x\ty"}).headers["X-Request-ID"] != "x\ty"


def test_metrics_are_open_without_a_token(app: Flask) -> None:
    client = app.test_client()
    client.get("/healthz")
    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.mimetype == "text/plain"
    assert 'ser_http_requests_total{method="GET",route="/healthz",status="200"}' in resp.get_data(as_text=True)
