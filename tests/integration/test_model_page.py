"""The model page (/model) and the job page's note: both show the served models' own numbers.

The numbers come from the configured models folder (``SER_MODELS_DIR``): the tests read the real
one, then a copy with numbers changed, to show the page follows the folder and holds nothing
hard-coded. Job rows are written straight into a database of their own (no worker rewrites them).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from ser_shared.db import make_engine, make_session_factory
from ser_shared.emotions import EMOTIONS
from ser_shared.models import Batch, Job, Result
from ser_shared.settings import REPO_ROOT, Settings
from tests.conftest import private_database
from tests.integration.test_security_headers import assert_secured, read_page
from web import create_app

MODELS = REPO_ROOT / "models"
SERVED = json.loads((MODELS / "manifest.json").read_text())
SERVED_VERSIONS = {name: m["version"] for name, m in SERVED["models"].items()}
# What the web tier may read of the models folder; the copies hold only these (no model weights).
CARD_FILES = ("manifest.json", "MODEL_CARD.md", "cv_confusion.png", "reliability.png")


# --- reading a page -----------------------------------------------------------------------------


@dataclass
class Page:
    html: str
    by_id: dict[str, dict[str, str]] = field(default_factory=dict)
    text_by_id: dict[str, str] = field(default_factory=dict)  # text inside each element with an id
    rows: dict[str, list[dict[str, str]]] = field(default_factory=dict)  # table id -> its <tr> attributes
    cells: dict[str, list[list[str]]] = field(default_factory=dict)  # table id -> body rows' <td> texts


class _Reader(HTMLParser):
    VOID = {"img", "br", "input", "meta", "link", "hr", "source", "rect"}

    def __init__(self, page: Page) -> None:
        super().__init__(convert_charrefs=True)
        self.page = page
        self.open: list[tuple[str, str | None]] = []  # (tag, id) of open elements
        self.table: str | None = None
        self.in_body = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if "id" in a:
            self.page.by_id[a["id"]] = {"tag": tag, **a}
            self.page.text_by_id.setdefault(a["id"], "")
        if tag == "table" and a.get("id"):
            self.table = a["id"]
            self.page.rows[self.table], self.page.cells[self.table] = [], []
        if tag == "tbody":
            self.in_body = True
        if tag == "tr" and self.table and self.in_body:
            self.page.rows[self.table].append(a)
            self.page.cells[self.table].append([])
        if tag == "td" and self.table and self.in_body:
            self.page.cells[self.table][-1].append("")
        if tag not in self.VOID:
            self.open.append((tag, a.get("id")))

    def handle_endtag(self, tag: str) -> None:
        while self.open:
            name, _ = self.open.pop()
            if name == tag:
                break
        if tag == "table":
            self.table = None
        if tag == "tbody":
            self.in_body = False

    def handle_data(self, data: str) -> None:
        for _, element_id in self.open:
            if element_id:
                self.page.text_by_id[element_id] += data
        if self.table and self.in_body and self.page.cells.get(self.table) and self.page.cells[self.table][-1] \
                and self.open and self.open[-1][0] == "td":
            self.page.cells[self.table][-1][-1] += data


def get(client: FlaskClient, url: str, status: int = 200) -> Page:
    resp = client.get(url)
    assert resp.status_code == status, (url, resp.status_code, resp.get_data(as_text=True)[:1500])
    page = Page(resp.get_data(as_text=True))
    _Reader(page).feed(page.html)
    return page


def served_threshold(page: Page) -> float:
    """The threshold the page states (its one ``data-threshold``)."""
    found = re.findall(r'class="served-threshold" data-threshold="([\d.]+)"', page.html)
    assert len(found) == 1, found
    return float(found[0])


def words(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("\xa0", " ")).strip()


# --- the site: jobs of each kind, and apps on copies of the models folder -------------------------


def copy_models(dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in CARD_FILES:
        shutil.copy(MODELS / name, dst / name)
    return dst


def rewrite(folder: Path, change: Any) -> dict[str, Any]:
    """Apply ``change`` to the folder's manifest and write it back, with a new modification time."""
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest, indent=2))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    return manifest


def probabilities(top: str, p: float) -> dict[str, float]:
    return dict.fromkeys(EMOTIONS, (1 - p) / 6) | {top: p}


def calibrated(p: float, temperature: float) -> float:
    """The top probability after temperature scaling, for a distribution with the rest spread evenly."""
    rest = (1 - p) / 6
    return 1 / (1 + 6 * math.exp((math.log(rest) - math.log(p)) / temperature))


# A result as the served rule makes it: RF 80 % and LSTM 79 % on angry blend to 79.6 %, and the
# served temperature (below 1) lifts that above both models: what the note explains.
BLEND = SERVED["ensemble"]["weights"]["rf"] * 0.80 + SERVED["ensemble"]["weights"]["lstm"] * 0.79
CALIBRATED = round(calibrated(BLEND, SERVED["ensemble"]["temperature"]), 6)


@dataclass
class Site:
    settings: Settings
    client: FlaskClient
    jobs: dict[str, str]  # role -> job id
    apps: list[Flask] = field(default_factory=list)

    def app(self, **changes: Any) -> FlaskClient:
        """A client of an app on the same database with other settings (a models folder, a threshold)."""
        app = create_app(self.settings.model_copy(update=changes))
        app.config["TESTING"] = True
        self.apps.append(app)
        return app.test_client()


def _write_jobs(settings: Settings) -> dict[str, str]:
    """A result by the served models, one by other versions, a queued job and a failed one."""
    engine = make_engine(settings)
    jobs: dict[str, str] = {}
    with make_session_factory(engine)() as session:
        batch = Batch(file_count=4, options={})
        session.add(batch)
        session.flush()
        for position, role in enumerate(("served", "stale", "queued", "failed")):
            job = Job(id=uuid.uuid4(), batch_id=batch.id, position=position, filename=f"{role}.wav", size_bytes=100,
                      status={"queued": "queued", "failed": "failed"}.get(role, "succeeded"))
            if role == "failed":
                job.error_code, job.error_message = "no_speech", "test: no speech"
            session.add(job)
            jobs[role] = str(job.id)
            if job.status == "succeeded":
                session.add(Result(job_id=job.id, emotion="angry", confidence=CALIBRATED, uncertain=False,
                                   probabilities=probabilities("angry", CALIBRATED),
                                   model_probabilities={"rf": probabilities("angry", 0.80),
                                                        "lstm": probabilities("angry", 0.79)},
                                   model_versions=SERVED_VERSIONS if role == "served" else {"rf": "t", "lstm": "t"},
                                   timings_ms={"total": 1.0}))
        session.commit()
    engine.dispose()
    return jobs


@pytest.fixture(scope="module")
def site(pg_settings: Settings) -> Iterator[Site]:
    with private_database(pg_settings, models_dir=MODELS) as settings:
        app = create_app(settings)
        app.config["TESTING"] = True
        s = Site(settings, app.test_client(), _write_jobs(settings), [app])
        yield s
        for a in s.apps:
            a.extensions["ser"].engine.dispose()


# --- /model shows the served manifest ------------------------------------------------------------


def test_model_page_shows_the_served_manifests_numbers(site: Site) -> None:
    page = get(site.client, "/model")
    cv = SERVED["cv"]
    shown = {r["data-model"]: float(r["data-accuracy"]) for r in page.rows["accuracy-table"]}
    assert shown == {k: cv[k]["accuracy_fold_mean"] for k in ("rf", "lstm", "ensemble", "ensemble_nested")}
    table = {r["data-condition"]: float(r["data-accuracy"]) for r in page.rows["conditions-table"]}
    assert table == {name: m["ensemble_nested"]["accuracy"] for name, m in cv["conditions"].items()}
    noise = page.cells["conditions-table"][list(table).index("noise:0")]
    n0 = cv["conditions"]["noise:0"]
    printed = [n0["ensemble_nested"]["accuracy"], n0["ensemble_nested"]["macro_f1"], n0["rf"]["accuracy"],
               n0["lstm"]["accuracy"]]
    assert noise[1:] == [f"{v:.3f}" for v in printed]  # ensemble, macro-F1, RF, LSTM, to 3 places
    assert [words(c[0]) for c in page.cells["fold-table"]] == [", ".join(f["test_actors"]) for f in cv["folds"]]
    assert words(page.text_by_id["cv-protocol"]) == cv["protocol"]
    # Classes, data and licence, versions.
    assert [words(t) for t in re.findall(r'<li data-class="(\w+)"', page.html)] == SERVED["classes"]
    assert "CC BY-NC-SA 4.0" in page.text_by_id["data-licence"]
    assert page.by_id["data-files"]["data-files"] == str(SERVED["data"]["files"])
    versions = words(page.text_by_id["served-versions"])
    encoder = SERVED["encoder"]["sha256"][:12]
    for expected in (*SERVED_VERSIONS.values(), SERVED["feature_version"], "Whisper tiny.en", encoder):
        assert expected in versions
    # The ensemble rule, with the served threshold.
    assert served_threshold(page) == SERVED["ensemble"]["uncertain_threshold"]
    weights = dict(re.findall(r'data-model="(\w+)" data-weight="([\d.]+)"', page.html))
    assert {k: float(v) for k, v in weights.items()} == SERVED["ensemble"]["weights"]
    assert words(page.text_by_id["calibration-temperature"]) == str(SERVED["calibration"]["temperature"])
    # Cross-corpus: its confusion matrix as a table, only the labels the corpus has.
    cross = SERVED["cross_corpus"]["indian_emospeech"]
    rows = page.rows["confusion-indian_emospeech"]
    assert [r["data-label"] for r in rows] == cross["labels_present"]
    first = [int(n) for n in re.findall(r'data-n="(\d+)"', page.html.split('id="confusion-indian_emospeech"')[1])[:7]]
    assert first == cross["confusion"][0]


def test_model_page_renders_the_card(site: Site) -> None:
    """Known weaknesses from the card's own section; the whole card as HTML, its pictures served here."""
    page = get(site.client, "/model")
    card = (MODELS / "MODEL_CARD.md").read_text()
    limits = card.split("## Limits and what is still weak", 1)[1]
    assert "Acted English speech from 20 actors." in words(page.text_by_id["weaknesses"])
    assert "**" not in page.text_by_id["weaknesses"] and "<strong>Acted English speech" in page.html
    assert "LSTM overfits fast" in limits and "LSTM overfits fast" in page.text_by_id["weaknesses"]
    full = page.html.split('id="full-card"', 1)[1]
    assert "<table>" in full and "|---|" not in full and "**Speaker-independent**" not in full
    assert 'src="/model/pictures/cv_confusion.png" alt="confusion matrix" width="' in full
    assert 'src="/model/pictures/reliability.png" alt="reliability diagram"' in full
    assert 'id="card-limits-and-what-is-still-weak"' in full
    # The confusion matrix and per-class figures: the served manifest records them, so they are tables
    # (the picture is linked); a manifest that holds the matrix only as a picture is tested below.
    served_cm = SERVED["cv"]["ensemble"]["confusion"]["matrix"]
    assert [[int(n) for n in row[:7]] for row in page.cells["cv-confusion-table"]] == served_cm
    assert "confusion-picture" not in page.by_id and 'href="/model/pictures/cv_confusion.png"' in page.html
    recall = {r["data-class"]: float(r["data-recall"]) for r in page.rows["per-class-table"]}
    assert recall == {c: v["recall"] for c, v in SERVED["cv"]["ensemble"]["per_class"].items()}
    assert "per-class-missing" not in page.by_id
    assert page.by_id["reliability-picture"]["src"] == "/model/pictures/reliability.png"
    assert page.by_id["reliability-picture"]["alt"] and page.by_id["reliability-picture"]["width"]


def test_a_changed_models_folder_changes_the_page(site: Site, tmp_path: Path) -> None:
    """Numbers changed in a copy of the models folder appear on the page: none is hard-coded. A
    newer manifest's confusion matrix becomes a table, with per-class figures read off it."""
    folder = copy_models(tmp_path / "models")
    client = site.app(models_dir=folder)
    before = get(client, "/model")
    assert "0.6123" not in before.html

    matrix = [[20 if i == j else (3 if j == (i + 1) % 7 else 0) for j in range(7)] for i in range(7)]
    matrix[2][0] = 9  # sad taken for neutral 9 times

    def change(m: dict[str, Any]) -> None:
        m["cv"]["ensemble_nested"]["accuracy_fold_mean"] = 0.6123
        m["cv"]["conditions"]["noise:0"]["ensemble_nested"]["accuracy"] = 0.4321
        m["cv"]["ensemble"]["confusion"] = {"labels": m["classes"], "matrix": matrix}
        del m["cv"]["ensemble"]["per_class"]  # read off the matrix instead
        m["data"]["licence"] = "CC BY-NC-SA 4.0 (test copy)"
        m["models"]["rf"]["version"] = "rf-fv4-testcopy01"
        m["ensemble"] = {"weights": {"rf": 0.55, "lstm": 0.45}, "temperature": 1.07, "uncertain_threshold": 0.41}
        m["calibration"]["temperature"] = 1.07

    rewrite(folder, change)
    card = folder / "MODEL_CARD.md"
    card.write_text(card.read_text().replace("## Limits and what is still weak\n",
                                             "## Limits and what is still weak\n- **A test weakness**: xyzzy.\n"))
    page = get(client, "/model")
    accuracy = {r["data-model"]: float(r["data-accuracy"]) for r in page.rows["accuracy-table"]}
    assert accuracy["ensemble_nested"] == 0.6123 and "0.612 ±" in page.html
    assert {r["data-condition"]: float(r["data-accuracy"]) for r in page.rows["conditions-table"]}["noise:0"] == 0.4321
    assert "(test copy)" in page.text_by_id["data-licence"]
    assert "rf-fv4-testcopy01" in page.text_by_id["served-versions"]
    assert "xyzzy" in page.text_by_id["weaknesses"]
    rule = words(page.text_by_id["ensemble-rule"])
    assert "55 % of the RandomForest’s plus 45 % of the LSTM’s" in rule and "41 %" in rule
    assert "never higher than the more confident model’s" in rule  # a temperature above 1 softens
    # The confusion matrix as a table: counts per cell, the diagonal marked; per class read off it.
    cm = page.cells["cv-confusion-table"]
    assert [[int(n) for n in row[:7]] for row in cm] == matrix
    assert [r["data-label"] for r in page.rows["cv-confusion-table"]] == SERVED["classes"]
    table = page.html.split('id="cv-confusion-table"', 1)[1].split("</table>", 1)[0]
    assert table.count('class="num cm cm-') == 49 and table.count(' right"') == 7
    assert '<td class="num cm cm-8 right" data-n="20"' in table  # 20 of 23: a dark cell
    recall = {r["data-class"]: float(r["data-recall"]) for r in page.rows["per-class-table"]}
    assert recall["sad"] == pytest.approx(20 / 32) and recall["neutral"] == pytest.approx(20 / 23)
    assert "confusion-picture" not in page.by_id  # the table replaces the picture
    # The job page's note follows the same folder.
    note = get(client, f"/jobs/{site.jobs['queued']}")
    assert note.by_id["uncertain-explained"] and "41 %" in words(note.text_by_id["uncertain-explained"])


def test_a_manifest_without_the_matrix_shows_its_picture(site: Site, tmp_path: Path) -> None:
    """Training runs before the matrix was recorded left it only as a picture: the page shows the
    picture (with a text alternative) and points to the card for the per-class figures."""
    folder = copy_models(tmp_path / "models")

    def drop(m: dict[str, Any]) -> None:
        del m["cv"]["ensemble"]["confusion"], m["cv"]["ensemble"]["per_class"]

    rewrite(folder, drop)
    page = get(site.app(models_dir=folder), "/model")
    assert "cv-confusion-table" not in page.by_id and "per-class-table" not in page.by_id
    assert page.by_id["confusion-picture"]["src"] == "/model/pictures/cv_confusion.png"
    assert page.by_id["confusion-picture"]["alt"] and "per-class-missing" in page.by_id


def test_settings_threshold_is_the_served_one(site: Site) -> None:
    """SER_UNCERTAIN_THRESHOLD overrides the manifest's for the workers, so the pages say so too."""
    client = site.app(uncertain_threshold=0.5)
    page = get(client, "/model")
    assert "set by this server; the model’s own is 0.375" in page.text_by_id["served-rule"]
    job = get(client, f"/jobs/{site.jobs['served']}")
    assert job.by_id["uncertain-explained"] and "50 %" in words(job.text_by_id["uncertain-explained"])
    assert "model’s own, from testing, is 37.5 %" in words(job.text_by_id["uncertain-explained"])


# --- the pictures ---------------------------------------------------------------------------------


def test_pictures_are_png_with_the_headers_and_nothing_else_is_served(site: Site, tmp_path: Path) -> None:
    for name in ("cv_confusion.png", "reliability.png"):
        resp = site.client.get(f"/model/pictures/{name}")
        assert resp.status_code == 200 and resp.mimetype == "image/png"
        assert resp.data == (MODELS / name).read_bytes()
        assert_secured(resp)
        again = site.client.get(f"/model/pictures/{name}", headers={"If-None-Match": resp.headers["ETag"]})
        assert again.status_code == 304
    # Model weights, the manifest, the card, other folders and a non-PNG named .png are not served.
    folder = copy_models(tmp_path / "models")
    (folder / "page.png").write_bytes(b"<html><script>alert(1)</script></html>")
    shutil.copy(MODELS / "speech_detector.joblib", folder / "speech_detector.joblib")
    client = site.app(models_dir=folder)
    for name in ("speech_detector.joblib", "manifest.json", "MODEL_CARD.md", "page.png",
                 "..%2Fmodels%2Freliability.png", "%2Fetc%2Fpasswd", ".png", "missing.png"):
        resp = client.get(f"/model/pictures/{name}")
        assert resp.status_code == 404, name
        assert resp.mimetype == "text/html" and b"alert(1)" not in resp.data
        assert_secured(resp)


def test_model_page_has_nothing_inline_and_every_asset_loads(site: Site) -> None:
    """The strict policy holds: no inline script or style; the pictures it shows are served."""
    parser = read_page(site.client, site.client.get("/model"))
    assert "/model/pictures/reliability.png" in parser.assets
    assert "/model/pictures/cv_confusion.png" in parser.assets


def test_model_page_is_public_with_authentication_on(site: Site) -> None:
    """Like the API reference, the card describes the service, not anyone's data."""
    client = site.app(auth=True)
    assert client.get("/model").status_code == 200
    assert client.get("/model/pictures/reliability.png").status_code == 200
    assert client.get(f"/jobs/{site.jobs['served']}").status_code in (302, 401)


def test_without_a_manifest_the_page_says_so_and_job_pages_still_render(site: Site, tmp_path: Path) -> None:
    empty = tmp_path / "no-models"
    empty.mkdir()
    client = site.app(models_dir=empty)
    page = get(client, "/model", status=503)
    assert "model_manifest_unavailable" in page.html
    job = get(client, f"/jobs/{site.jobs['served']}")
    assert job.by_id["model-link"]["href"] == "/model" and "uncertain-explained" not in job.by_id


# --- the job page's note ---------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["served", "stale", "queued", "failed"])
def test_every_job_page_links_to_the_model_and_explains_the_result(site: Site, role: str) -> None:
    page = get(site.client, f"/jobs/{site.jobs[role]}")
    assert page.by_id["model-link"]["href"] == "/model" and page.by_id["nav-model"]["href"] == "/model"
    ensemble = words(page.text_by_id["ensemble-explained"])
    assert "60 % of the RandomForest’s plus 40 % of the LSTM’s" in ensemble
    assert str(SERVED["ensemble"]["temperature"]) in ensemble
    assert "a little higher than both models’ own" in ensemble  # the served temperature is below 1
    uncertain = words(page.text_by_id["uncertain-explained"])
    assert "below 37.5 %" in uncertain
    assert served_threshold(page) == SERVED["ensemble"]["uncertain_threshold"]
    read_page(site.client, site.client.get(f"/jobs/{site.jobs[role]}"))  # nothing inline


def test_the_note_retraces_a_served_result(site: Site) -> None:
    """0.6 x 80 % + 0.4 x 79 % = 79.6 %, then calibration: the stored 80.6 %, above both models."""
    assert CALIBRATED > 0.80
    page = get(site.client, f"/jobs/{site.jobs['served']}")
    assert float(page.by_id["worked-example"]["data-blend"]) == pytest.approx(BLEND)
    assert words(page.text_by_id["worked-example"]) == (
        "For this recording: angry at 80.0 % (RandomForest pipeline) and 79.0 % (LSTM); blended 79.6 %; "
        f"after calibration {100 * CALIBRATED:.1f} %.")
    stale = get(site.client, f"/jobs/{site.jobs['stale']}")
    assert "other model versions than the ones served now" in words(stale.text_by_id["worked-example"])
    for role in ("queued", "failed"):
        assert "worked-example" not in get(site.client, f"/jobs/{site.jobs[role]}").by_id
