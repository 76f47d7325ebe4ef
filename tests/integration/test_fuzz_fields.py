"""Property-based fuzzing of every query parameter and upload form field (the audio has its own
fuzzing in test_fuzz_decode.py): whatever string, number or structure arrives, the answer is a
success or a 4xx with the JSON error shape, never a 5xx.

Not fuzzed here: ``webhook_url`` (a random host name would wait on DNS; the SSRF guard has its own
tests in test_webhooks.py). Runs derandomised, so CI sees the same examples every time.
"""

from __future__ import annotations

import io
import json
from datetime import timedelta
from typing import Any

import numpy as np
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FUZZ = settings(max_examples=150, deadline=timedelta(seconds=5), database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# Text a URL or a form can carry: any code point but lone surrogates (no client can encode those
# as UTF-8; JSON escapes for them are fuzzed through the metadata strategy instead).
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
NUMBERS = st.one_of(st.integers(min_value=-(10**400), max_value=10**400).map(str),
                    st.floats(allow_nan=True, allow_infinity=True).map(repr))
DATES = st.one_of(st.datetimes().map(lambda d: d.isoformat()),
                  st.tuples(st.datetimes(), st.integers(-14, 14)).map(lambda p: f"{p[0].isoformat()}{p[1]:+03d}:00"))
VALUE = st.one_of(TEXT, NUMBERS, DATES, st.sampled_from(["", " ", "-", "null", "true", "0", "-1", "1e999", "NaN"]))
LIST_PARAMS = ["status", "emotion", "batch_id", "since", "until", "q", "min_confidence", "max_confidence", "ids",
               "sort", "limit", "cursor", "segments"]
# Values that JSON text can carry but a database cannot store are listed first so that the
# fuzzer reaches them (they were 500s): non-finite numbers, lone surrogates, NUL.
JSON_LEAF = st.one_of(st.sampled_from([float("nan"), float("inf"), float("-inf"), "\ud800", "x\x00", 10**30]),
                      st.none(), st.booleans(), st.floats(allow_nan=True, allow_infinity=True),
                      st.integers(-(10**30), 10**30), TEXT)
JSON = st.recursive(JSON_LEAF, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(TEXT, inner, max_size=4)), max_leaves=12)
METADATA = st.one_of(st.dictionaries(TEXT, JSON, min_size=1, max_size=4).map(lambda v: json.dumps(v, allow_nan=True)),
                     VALUE)


def _check(resp: Any) -> None:
    assert resp.status_code < 500, (resp.status_code, resp.get_data(as_text=True)[:500])
    if resp.status_code >= 400:
        body = resp.get_json()
        assert set(body) == {"error"} and body["error"]["code"] and body["error"]["message"]


def _wav() -> bytes:
    buf = io.BytesIO()
    t = np.arange(8000) / 16000
    sf.write(buf, (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


WAV = _wav()


@FUZZ
@given(params=st.dictionaries(st.sampled_from(LIST_PARAMS), VALUE, max_size=5))
def test_list_query_parameters(client, params: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    _check(client.get("/api/v1/jobs", query_string=params))


@FUZZ
@given(params=st.dictionaries(st.sampled_from([*LIST_PARAMS, "format"]), VALUE, max_size=5))
def test_export_query_parameters(client, params: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    resp = client.get("/api/v1/export", query_string=params)
    if resp.status_code == 200:
        resp.get_data()  # the stream itself must not fail half way
    _check(resp)


@FUZZ
@given(fields=st.fixed_dictionaries({}, optional={
    "device": VALUE, "transcribe": VALUE, "language": VALUE, "client_reference": VALUE,
    "metadata": METADATA,
}), filename=TEXT)
def test_upload_form_fields(client, fields: dict[str, str], filename: str) -> None:  # type: ignore[no-untyped-def]
    data: dict[str, Any] = {"file": [(io.BytesIO(WAV), filename or "a.wav")], **fields}
    _check(client.post("/api/v1/jobs", data=data, content_type="multipart/form-data"))
