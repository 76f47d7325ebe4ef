"""Security headers on every response, pages without inline script or style, and served audio that
can only be audio.

Every page route is rendered with rows that fill it (a finished job with a timeline, a failed one,
a queued one, a batch, the sign-in and delete-confirmation pages, an error page), and each is read
for anything the Content-Security-Policy would block: inline ``<script>`` or ``<style>``, ``style=``
attributes, ``on*=`` handlers, ``javascript:`` addresses, assets from elsewhere.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import update
from werkzeug.test import TestResponse

from ser_shared.db import make_engine, make_session_factory
from ser_shared.emotions import EMOTIONS
from ser_shared.models import Job, Result
from ser_shared.settings import REPO_ROOT, Settings
from tests.conftest import private_database
from tests.helpers import csrf_token, multipart
from web import create_app, media

EXPECTED = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}
HTML = b"<!doctype html><html><body><script>alert(document.cookie)</script></body></html>"


def policy(response: TestResponse) -> dict[str, list[str]]:
    """The response's Content-Security-Policy as directive -> sources."""
    out: dict[str, list[str]] = {}
    for part in response.headers["Content-Security-Policy"].split(";"):
        name, *sources = part.split()
        out[name] = sources
    return out


def assert_secured(response: TestResponse) -> None:
    for name, value in EXPECTED.items():
        assert response.headers.get(name) == value, (response.request.path, name, response.headers)
    csp = policy(response)
    assert csp["frame-ancestors"] == ["'none'"] and csp["object-src"] == ["'none'"]
    assert csp["script-src"] == ["'self'"] and csp["style-src"] == ["'self'"]
    assert "'unsafe-inline'" not in response.headers["Content-Security-Policy"]
    assert "'unsafe-eval'" not in response.headers["Content-Security-Policy"]


def tone_wav(seconds: float = 2.0, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    out = io.BytesIO()
    sf.write(out, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


@dataclass
class Site:
    app: Flask
    client: FlaskClient
    settings: Settings
    wav: bytes
    jobs: dict[str, str] = field(default_factory=dict)  # role -> job id
    batch: str = ""


def _upload(client: FlaskClient, files: list[tuple[str, bytes]]) -> dict[str, Any]:
    resp = client.post("/api/v1/jobs", data=multipart(files), content_type="multipart/form-data")
    assert resp.status_code == 202, resp.get_data(as_text=True)
    body: dict[str, Any] = resp.get_json()
    return body


def _finish(settings: Settings, job_id: str, duration: float) -> None:
    """Write what a worker would for a long recording: a result with segments (a timeline) and timings."""
    probs = dict.fromkeys(EMOTIONS, 0.05) | {"happy": 0.7}
    segments = [{"start": 0.0, "end": 0.8, "emotion": "happy", "confidence": 0.7, "uncertain": False,
                 "probabilities": probs, "speech_s": 0.8},
                {"start": 1.0, "end": 1.9, "emotion": "sad", "confidence": 0.35, "uncertain": True,
                 "probabilities": probs, "speech_s": 0.9}]
    engine = make_engine(settings)
    with make_session_factory(engine)() as session:
        session.execute(update(Job).where(Job.id == uuid.UUID(job_id)).values(
            status="succeeded", emotion="happy", confidence=0.7, duration_s=duration))
        session.add(Result(job_id=uuid.UUID(job_id), emotion="happy", confidence=0.7, uncertain=False,
                           probabilities=probs, model_probabilities={"rf": probs, "lstm": probs},
                           model_versions={"rf": "t", "lstm": "t"}, timings_ms={"decode": 2.0, "total": 9.0},
                           transcript={"status": "succeeded", "engine": "sphinx", "language": "en-US",
                                       "text": "hello there"}, segments=segments))
        session.commit()
    engine.dispose()


def _fail(settings: Settings, job_id: str, code: str) -> None:
    """End a job as the worker does for a file it cannot use: failed with ``code``, file kept."""
    engine = make_engine(settings)
    with make_session_factory(engine)() as session:
        session.execute(update(Job).where(Job.id == uuid.UUID(job_id)).values(
            status="failed", error_code=code, error_message=f"test: {code}"))
        session.commit()
    engine.dispose()


@pytest.fixture(scope="module")
def site(pg_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """An app on a database of its own (no shared worker rewrites these rows), with a job of each kind."""
    store = tmp_path_factory.mktemp("security-store")
    with private_database(pg_settings, storage_dir=store) as settings:
        app = create_app(settings)
        app.config["TESTING"] = True
        site = Site(app, app.test_client(), settings, tone_wav())
        body = _upload(site.client, [("speech.wav", site.wav), ("queued.wav", site.wav), ("page.html", site.wav),
                                     ("undecoded.wav", site.wav), ("partial.wav", site.wav),
                                     ("evil.wav", HTML), ("riff.wav", b"RIFF\0\0\0\0WAVE" + HTML)])
        site.batch = body["batch_id"]
        roles = ["finished", "queued", "html_name", "worker_undecodable", "incomplete", "html_content", "riff_html"]
        site.jobs = {role: job["id"] for role, job in zip(roles, body["jobs"], strict=True)}
        _finish(settings, site.jobs["finished"], 2.0)
        _fail(settings, site.jobs["worker_undecodable"], "decode_failed")
        _fail(settings, site.jobs["incomplete"], "incomplete_audio")
        yield site
        app.extensions["ser"].engine.dispose()


# --- headers everywhere ----------------------------------------------------------------------------


def test_pages_api_static_and_errors_all_carry_the_headers(site: Site) -> None:
    client = site.client
    job = site.jobs["finished"]
    for path in ("/", "/history", "/docs/api", "/model", "/model/pictures/reliability.png", f"/batches/{site.batch}",
                 f"/jobs/{job}",
                 "/static/style.css", "/static/live.js", "/static/upload.js", "/static/csrf.js",
                 "/api/v1/jobs", f"/api/v1/jobs/{job}", "/api/v1/openapi.json", "/healthz",
                 "/no-such-page", f"/jobs/{uuid.uuid4()}", "/api/v1/no-such-thing", f"/api/v1/jobs/{uuid.uuid4()}"):
        resp = client.get(path)
        assert resp.status_code in (200, 404), (path, resp.status_code)
        assert_secured(resp)
    # Errors of every kind: a 400 from the API, a 405, a page's own error.
    assert_secured(client.post("/api/v1/jobs", data={}, content_type="multipart/form-data"))
    assert_secured(client.put("/api/v1/jobs"))
    assert_secured(client.post(f"/jobs/{job}/delete"))  # no CSRF token: 403


def test_refusals_carry_the_headers(site: Site) -> None:
    """A 413 and a 429 come from paths of their own (werkzeug, the limits): they are covered too."""
    small = create_app(site.settings.model_copy(update={"max_request_mb": 0.01}))
    resp = small.test_client().post("/api/v1/jobs", data=multipart([("big.wav", b"RIFF" + b"\0" * 20_000)]),
                                    content_type="multipart/form-data")
    assert resp.status_code == 413
    assert_secured(resp)
    capped = create_app(site.settings.model_copy(update={"max_queued_jobs": 1}))  # the queued job fills it
    resp = capped.test_client().post("/api/v1/jobs", data=multipart([("a.wav", site.wav)]),
                                     content_type="multipart/form-data")
    assert resp.status_code == 429 and resp.headers["Retry-After"]
    assert_secured(resp)
    for app in (small, capped):
        app.extensions["ser"].engine.dispose()


# --- nothing inline on any page --------------------------------------------------------------------


class _Inline(HTMLParser):
    """Collects whatever a strict policy would block, and the page's own assets."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.problems: list[str] = []
        self.assets: list[str] = []
        self.in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k.lower(): v or "" for k, v in attrs}
        if tag == "style":
            self.problems.append("<style> element")
        if tag == "script":
            if not a.get("src"):
                self.problems.append("inline <script>")
            self.in_script = True
        for name, value in a.items():
            if name == "style":
                self.problems.append(f"style attribute on <{tag}>: {value}")
            if name.startswith("on"):
                self.problems.append(f"{name} handler on <{tag}>")
            if name in ("href", "src", "action", "formaction") and value.strip().lower().startswith("javascript:"):
                self.problems.append(f"javascript: address in {name} on <{tag}>")
            if name in ("href", "src") and (tag in ("script", "img", "audio", "source") or
                                            (tag == "link" and a.get("rel") == "stylesheet")):
                self.assets.append(value)

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self.in_script = False

    def handle_data(self, data: str) -> None:
        if self.in_script and data.strip():
            self.problems.append(f"script content: {data.strip()[:60]}")


def read_page(client: FlaskClient, resp: TestResponse) -> _Inline:
    assert resp.mimetype == "text/html", (resp.request.path, resp.status_code)
    assert_secured(resp)
    parser = _Inline()
    parser.feed(resp.get_data(as_text=True))
    assert parser.problems == [], (resp.request.path, parser.problems)
    for asset in parser.assets:
        assert asset.startswith("/") and not asset.startswith("//"), (resp.request.path, asset)
        if not asset.startswith("/jobs/"):  # drawn images are checked on their own pages' tests
            assert client.get(asset).status_code == 200, asset
    return parser


def every_page(site: Site) -> dict[str, tuple[int, TestResponse]]:
    """Each page route, with the status it must answer: name -> (status, response)."""
    client, jobs = site.client, site.jobs
    pages = {path: (200, client.get(path)) for path in (
        "/", "/history", "/history?status=failed", "/docs/api", "/model", f"/batches/{site.batch}",
        *(f"/jobs/{job_id}" for job_id in jobs.values()))}
    pages["unknown job"] = (404, client.get(f"/jobs/{uuid.uuid4()}"))
    pages["unknown page"] = (404, client.get("/no-such-page"))
    # The delete confirmation (the no-script fallback) is a POST without confirm=yes.
    pages["confirm delete"] = (200, client.post(f"/jobs/{jobs['queued']}/delete",
                                                data={"csrf_token": csrf_token(client)}))
    pages["csrf refused"] = (403, client.post(f"/jobs/{jobs['queued']}/delete"))
    return pages


def test_no_page_has_inline_script_style_or_handlers(site: Site) -> None:
    pages = every_page(site)
    for name, (status, resp) in pages.items():
        assert resp.status_code == status, (name, resp.status_code)
        read_page(site.client, resp)
    # The page with everything on it: charts, timeline, timings, player, images.
    html = pages[f"/jobs/{site.jobs['finished']}"][1].get_data(as_text=True)
    assert 'id="player"' in html and 'id="chart-ensemble"' in html and 'id="timings"' in html
    assert 'class="track timeline"' in html and 'class="segment happy emo-happy"' in html
    # The sad segment, 1.0-1.9 s of 2 s: placed and sized by SVG attributes, not a style.
    assert 'x="50.000%" width="45.000%"' in html


def test_sign_in_page_has_nothing_inline(site: Site) -> None:
    secured = create_app(site.settings.model_copy(update={"auth": True}))
    client = secured.test_client()
    read_page(client, client.get("/login"))
    read_page(client, client.get("/docs/api"))  # public with authentication on
    read_page(client, client.get("/model"))  # so is the model card
    secured.extensions["ser"].engine.dispose()


def test_every_emotion_has_its_colour_in_the_stylesheet() -> None:
    """Colours moved from style attributes to emo-<name> classes: an emotion without one is grey."""
    css = (REPO_ROOT / "web" / "static" / "style.css").read_text()
    for emotion in EMOTIONS:
        assert f".emo-{emotion} {{ --emo: #" in css, emotion


# --- served audio ----------------------------------------------------------------------------------


def assert_safe_audio(resp: TestResponse, media_type: str, name_end: str) -> None:
    assert resp.mimetype == media_type
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    disposition = resp.headers["Content-Disposition"]
    assert disposition.startswith("attachment;") and disposition.rstrip('"').endswith(name_end), disposition
    csp = policy(resp)
    assert "sandbox" in csp and csp["default-src"] == ["'none'"] and csp["frame-ancestors"] == ["'none'"]
    assert resp.headers["X-Frame-Options"] == "DENY"


def test_audio_is_typed_from_the_content_and_served_as_an_attachment(site: Site) -> None:
    job = site.jobs["finished"]
    resp = site.client.get(f"/api/v1/jobs/{job}/audio")
    assert resp.status_code == 200 and resp.data == site.wav
    assert_safe_audio(resp, "audio/wav", "speech.wav")
    # Range requests still work, with the same headers.
    part = site.client.get(f"/api/v1/jobs/{job}/audio", headers={"Range": "bytes=0-99"})
    assert part.status_code == 206 and part.data == site.wav[:100]
    assert_safe_audio(part, "audio/wav", "speech.wav")
    assert site.client.get(f"/api/v1/jobs/{job}").get_json()["audio_url"].endswith(f"/api/v1/jobs/{job}/audio")


def test_a_recording_named_as_a_page_downloads_as_audio(site: Site) -> None:
    """Real WAV bytes uploaded as ``page.html``: audio/wav, and a name that no browser opens as a page."""
    resp = site.client.get(f"/api/v1/jobs/{site.jobs['html_name']}/audio")
    assert resp.status_code == 200 and resp.data == site.wav
    assert_safe_audio(resp, "audio/wav", "page.html.wav")


@pytest.mark.parametrize("role", ["html_content", "riff_html", "worker_undecodable"])
def test_a_file_never_decoded_is_not_served(site: Site, role: str) -> None:
    """HTML named ``.wav`` (refused at upload), HTML behind a RIFF header (no decodable header), and a
    stored file the worker could not decode: never served, with a stable error code."""
    job = site.jobs[role]
    resp = site.client.get(f"/api/v1/jobs/{job}/audio")
    assert resp.status_code == 409, resp.get_data(as_text=True)
    assert resp.get_json()["error"]["code"] == "audio_not_decodable"
    assert resp.mimetype == "application/json" and HTML not in resp.data
    assert_secured(resp)
    assert site.client.get(f"/api/v1/jobs/{job}").get_json()["audio_url"] is None
    page = site.client.get(f"/jobs/{job}").get_data(as_text=True)
    assert 'id="player"' not in page and 'id="audio-undecodable"' in page


def test_a_partly_decoded_file_is_still_served(site: Site) -> None:
    """incomplete_audio: the worker read part of it as audio, so it plays (and shows why it failed)."""
    resp = site.client.get(f"/api/v1/jobs/{site.jobs['incomplete']}/audio")
    assert resp.status_code == 200
    assert_safe_audio(resp, "audio/wav", "partial.wav")


def test_unknown_or_missing_format_is_octet_stream() -> None:
    job = Job(filename="x", format=None)
    assert media.media_type(job) == "application/octet-stream" and media.download_name(job) == "x.bin"
    job = Job(filename="dir/../take.FLAC", format="flac")
    assert media.media_type(job) == "audio/flac" and media.download_name(job) == "take.FLAC"
    job = Job(filename="voice.mp3.html", format="mp3")
    assert media.media_type(job) == "audio/mpeg" and media.download_name(job) == "voice.mp3.html.mp3"
