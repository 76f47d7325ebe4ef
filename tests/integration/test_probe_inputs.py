"""Inputs an independent probe turned into 500s: each now gets a 400 with the JSON error shape
and a message that says what is wrong."""

from __future__ import annotations

import base64
import json

import pytest

from tests.conftest import ravdess_file
from tests.helpers import multipart, read


def _upload(client, **fields: str):  # type: ignore[no-untyped-def]
    data = multipart([read(ravdess_file(1, "05"))], **fields)
    return client.post("/api/v1/jobs", data=data, content_type="multipart/form-data")


@pytest.mark.parametrize(("metadata", "says"), [
    ('{"a": NaN}', "finite"),
    ('{"a": Infinity}', "finite"),
    ('{"a": 1e999}', "finite"),
    ('{"a": "\\ud800"}', "surrogate"),
    ('{"\\udfff": 1}', "surrogate"),
    ('{"a": ' + "[" * 1900 + "]" * 1900 + "}", "nested"),  # 3.8 kB: within the size limit
    ('{"a": ' + "[" * 40 + "]" * 40 + "}", "nested"),
    ('{"a": "x\\u0000y"}', "NUL"),
])
def test_unstorable_metadata_is_400(client, metadata: str, says: str) -> None:  # type: ignore[no-untyped-def]
    resp = _upload(client, metadata=metadata)
    assert resp.status_code == 400, resp.get_data(as_text=True)
    error = resp.get_json()["error"]
    assert error["code"] == "invalid_parameter" and says in error["message"]


def test_reasonable_metadata_still_accepted(client) -> None:  # type: ignore[no-untyped-def]
    resp = _upload(client, metadata=json.dumps({"call": {"agent": "a1", "score": 0.5, "tags": ["x", 1e300]}}))
    assert resp.status_code == 202, resp.get_data(as_text=True)


@pytest.mark.parametrize("query", [
    "since=9999-12-31T23:59:59-14:00",
    "since=0001-01-01T00:00:00%2B14:00",
    "until=0001-01-01T00:00%2B14:00",
])
def test_dates_beyond_utc_range_are_400(client, query: str) -> None:  # type: ignore[no-untyped-def]
    resp = client.get(f"/api/v1/jobs?{query}")
    assert resp.status_code == 400, resp.get_data(as_text=True)
    assert resp.get_json()["error"]["code"] == "invalid_parameter"
    assert "years 1 to 9999" in resp.get_json()["error"]["message"]


def _cursor(sort: str, value: object) -> str:
    raw = json.dumps([sort, value, "00000000-0000-0000-0000-000000000001"])
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


@pytest.mark.parametrize(("sort", "value"), [
    ("duration", 10**400),
    ("-duration", -(10**30)),
    ("confidence", 10**20),
    ("filename", "a\x00b"),
])
def test_forged_cursors_are_400(client, sort: str, value: object) -> None:  # type: ignore[no-untyped-def]
    resp = client.get(f"/api/v1/jobs?sort={sort}&cursor={_cursor(sort, value)}")
    assert resp.status_code == 400, resp.get_data(as_text=True)
    assert resp.get_json()["error"]["code"] == "invalid_parameter"


def test_a_real_cursor_still_pages(client) -> None:  # type: ignore[no-untyped-def]
    for _ in range(3):
        assert _upload(client).status_code == 202
    first = client.get("/api/v1/jobs?sort=duration&limit=1").get_json()
    assert first["next_cursor"]
    second = client.get(f"/api/v1/jobs?sort=duration&limit=1&cursor={first['next_cursor']}")
    assert second.status_code == 200 and len(second.get_json()["jobs"]) == 1


def test_too_many_form_parts_says_so(client, app) -> None:  # type: ignore[no-untyped-def]
    """A form over the parts limit is a 413 that names the parts limit, not the 2 GiB body limit."""
    parts = app.config["MAX_FORM_PARTS"] + 10
    resp = client.post("/api/v1/jobs", data={"client_reference": ["r"] * parts}, content_type="multipart/form-data")
    assert resp.status_code == 413
    error = resp.get_json()["error"]
    assert error["code"] == "request_too_large"
    assert f"more than {app.config['MAX_FORM_PARTS']} parts" in error["message"]


def test_a_file_name_that_is_not_utf8_is_named_as_the_problem(client) -> None:  # type: ignore[no-untyped-def]
    """The form parser drops a part whose headers are not UTF-8; the answer says so instead of
    only "send a file"."""
    wav = read(ravdess_file(1, "05"))[1]
    body = (b'--B\r\nContent-Disposition: form-data; name="file"; filename="caf\xe9.wav"\r\n'
            b"Content-Type: audio/wav\r\n\r\n" + wav + b"\r\n--B--\r\n")
    resp = client.post("/api/v1/jobs", data=body, content_type="multipart/form-data; boundary=B")
    assert resp.status_code == 400
    error = resp.get_json()["error"]
    assert error["code"] == "no_files" and "UTF-8" in error["message"]
