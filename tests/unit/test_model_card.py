"""The model card's pieces, without an app: reading the manifest's reports, the card's Markdown, the
pictures the site may serve. (The page itself: tests/integration/test_model_page.py.)"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from ser_shared.schemas import Manifest
from ser_shared.settings import REPO_ROOT, Settings
from web import markup, model_card

MANIFEST = json.loads((REPO_ROOT / "models" / "manifest.json").read_text())


def served(raw: dict, threshold: float | None = None) -> model_card.Served:
    own = raw["ensemble"]["uncertain_threshold"]
    return model_card.Served(Path("."), Manifest.model_validate(raw), raw, "", threshold or own,
                             threshold is not None and threshold != own)


@pytest.mark.parametrize(("name", "words"), [
    ("clean", "clean studio audio"), ("telephone", "phone line, G.711 µ-law"),
    ("telephone:gsm", "phone line, GSM 06.10"), ("noise:10", "noise at 10 dB SNR"),
    ("reverb:0.6", "room, reverberation time 0.6 s"), ("phone-noisy:10", "noise at 10 dB, then the phone line"),
    ("speed:1.1", "speed ×1.1"), ("something-new:3", "something-new:3"),
])
def test_conditions_in_words(name: str, words: str) -> None:
    assert model_card.describe_condition(name) == words


def test_confusion_rows_shares_and_levels() -> None:
    cm = model_card.confusion([[8, 2], [0, 0]], ["a", "b"])
    assert cm is not None and [r["total"] for r in cm.rows] == [10, 0]
    assert [(c["n"], c["level"], c["right"]) for c in cm.rows[0]["cells"]] == [(8, 8, True), (2, 2, False)]
    assert [r["label"] for r in model_card.confusion([[8, 2], [0, 0]], ["a", "b"], skip_empty=True).rows] == ["a"]
    as_written = model_card.confusion({"labels": ["x", "y"], "matrix": [[1, 0], [0, 1]]}, ["a", "b"])
    assert as_written is not None and as_written.labels == ["x", "y"]
    for bad in (None, [], [[1, 2]], [[1], [2]], {"labels": ["a"], "matrix": []}):
        assert model_card.confusion(bad, ["a", "b"]) is None


def test_per_class_from_the_manifest_or_read_off_its_matrix() -> None:
    # The served manifest records both: its own per-class figures, which agree with its matrix.
    given = {r["label"]: r for r in model_card.per_class(served(MANIFEST)) or []}
    assert set(given) == set(MANIFEST["classes"])
    raw = copy.deepcopy(MANIFEST)
    del raw["cv"]["ensemble"]["per_class"]
    read_off = {r["label"]: r for r in model_card.per_class(served(raw)) or []}
    for label, row in given.items():
        for name in ("precision", "recall", "f1"):
            assert read_off[label][name] == pytest.approx(row[name], abs=5e-5), (label, name)
        assert read_off[label]["support"] == row["support"]
    del raw["cv"]["ensemble"]["confusion"]
    assert model_card.per_class(served(raw)) is None  # a manifest with neither (training runs before them)
    matrix = [[10 if i == j else 0 for j in range(7)] for i in range(7)]
    matrix[0][1] = 5  # 5 neutral files said as happy
    raw["cv"]["ensemble"]["confusion"] = {"labels": raw["classes"], "matrix": matrix}
    rows = {r["label"]: r for r in model_card.per_class(served(raw)) or []}
    assert rows["neutral"]["recall"] == pytest.approx(10 / 15) and rows["neutral"]["support"] == 15
    assert rows["happy"]["precision"] == pytest.approx(10 / 15) and rows["happy"]["recall"] == 1.0
    assert rows["happy"]["f1"] == pytest.approx(2 * (10 / 15) / (10 / 15 + 1))
    raw["cv"]["ensemble"]["per_class"] = {"sad": {"precision": 0.5, "recall": 0.25, "f1": 0.33, "support": 4,
                                                  "predicted": 2}}
    assert model_card.per_class(served(raw)) == [{"label": "sad", "precision": 0.5, "recall": 0.25, "f1": 0.33,
                                                  "support": 4, "predicted": 2}]


def test_worked_example_only_for_the_served_versions() -> None:
    class R:
        emotion, confidence, segments = "sad", 0.7, None
        model_probabilities = {"rf": {"sad": 0.5}, "lstm": {"sad": 0.9}}
        model_versions = {name: m["version"] for name, m in MANIFEST["models"].items()}

    ex = model_card.worked_example(served(MANIFEST), R())
    assert ex is not None and ex["blend"] == pytest.approx(0.6 * 0.5 + 0.4 * 0.9) and not ex["stale"]
    R.model_versions = {"rf": "old", "lstm": "old"}
    assert model_card.worked_example(served(MANIFEST), R()) == {"stale": True, "versions": R.model_versions}
    assert model_card.worked_example(served(MANIFEST), None) is None


def test_the_settings_threshold_overrides_the_manifests(tmp_path: Path) -> None:
    for name in ("manifest.json", "MODEL_CARD.md"):
        (tmp_path / name).write_bytes((REPO_ROOT / "models" / name).read_bytes())
    base = Settings(env="test", data_dir=tmp_path, models_dir=tmp_path)
    assert model_card.served(base).threshold == 0.375 and not model_card.served(base).overridden
    chosen = model_card.served(base.model_copy(update={"uncertain_threshold": 0.5}))
    assert chosen.threshold == 0.5 and chosen.overridden
    (tmp_path / "manifest.json").write_text("{not json")
    assert model_card.served_or_none(base) is None


def test_pictures_are_plain_png_names_of_the_folder(tmp_path: Path) -> None:
    png = (REPO_ROOT / "models" / "reliability.png").read_bytes()
    (tmp_path / "ok.png").write_bytes(png)
    (tmp_path / "fake.png").write_bytes(b"<svg onload=alert(1)>" + b"\0" * 40)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "ok.png").write_bytes(png)
    assert model_card.picture(tmp_path, "ok.png") == tmp_path / "ok.png"
    assert model_card.png_size(tmp_path / "ok.png")[0] > 100
    for name in ("fake.png", "sub/ok.png", "../ok.png", ".png", "ok.PNG.joblib", "missing.png"):
        assert model_card.picture(tmp_path, name) is None, name


def test_card_markdown_tables_headings_and_images() -> None:
    text = ("# Title\n\n## A section\n\n| a | b |\n|---|---|\n| **1** | 2 |\n\n## A section\n\n"
            "![pic](ok.png) ![elsewhere](https://example.com/x.png) <script>alert(1)</script> "
            "[link](javascript:alert(1))\n")
    html = markup.document(text, lambda src: ("/model/pictures/ok.png", 640, 480) if src == "ok.png" else None,
                           shift=1, id_prefix="card-")
    assert '<h2 id="card-title">' in html and '<h3 id="card-a-section">' in html and 'id="card-a-section-2"' in html
    assert "<table>" in html and "<strong>1</strong>" in html
    assert '<img src="/model/pictures/ok.png" alt="pic" width="640" height="480" />' in html
    assert "example.com" not in html  # an address the site does not serve is dropped
    assert "<script>" not in html and 'href="javascript:' not in html


def test_sections_split_at_headings_outside_code() -> None:
    text = "intro\n## One\nbody 1\n```\n## not a heading\n```\n## Two\nbody 2"
    assert markup.sections(text) == [("", "intro"), ("One", "body 1\n```\n## not a heading\n```"), ("Two", "body 2")]
