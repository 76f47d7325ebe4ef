"""``/metrics`` with authentication on: no API key needed, only SER_METRICS_TOKEN, which opens nothing else."""

from __future__ import annotations

from pathlib import Path

from tests.unit.conftest import embedded_settings
from web import create_app

TOKEN = "scrape-token-1"


def test_metrics_take_the_token_not_an_api_key(tmp_path: Path) -> None:
    app = create_app(embedded_settings(tmp_path, auth=True, metrics_token=TOKEN))
    client = app.test_client()
    refused = client.get("/metrics")
    assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == 'Bearer realm="metrics"'
    assert client.get("/metrics", headers={"Authorization": "Bearer ser_not-the-token"}).status_code == 401
    scraped = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert scraped.status_code == 200 and b"ser_http_requests_total" in scraped.data
    # The scrape token is no API key: the API still refuses it.
    assert client.get("/api/v1/jobs", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 401
