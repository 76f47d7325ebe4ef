"""`ser compare` on a small RAVDESS subset: the report, its metrics and its speaker-independent folds.

Six actors, eight files each (every class present), one training copy per file, three folds and
the ``--quick`` model settings: about 30 s on an idle machine of two cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ser_ml.train.compare import MODEL_NAMES, CompareConfig, _load_cache, _save_cache, markdown
from ser_ml.train.training import RECIPES, Corpus, TrainConfig, fold_of_actor, list_ravdess
from ser_shared.emotions import EMOTIONS
from ser_shared.settings import REPO_ROOT
from tests.conftest import RAVDESS

ACTORS = ["01", "02", "03", "04", "05", "06"]
PER_ACTOR = 8
FOLDS = 3
METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "accuracy_fold_mean", "accuracy_fold_std",
           "macro_f1_fold_mean", "macro_f1_fold_std")


def _ser(*args: str) -> subprocess.CompletedProcess[str]:
    # One thread per library: on a shared machine, OpenMP and BLAS threads fighting over two cores
    # made these tiny fits several times slower; the figures do not depend on it.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, "-m", "ser_cli", "compare", *args], capture_output=True, text=True,
                          timeout=600, cwd=REPO_ROOT, env=env)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ravdess")
    for actor in ACTORS:
        shutil.copytree(RAVDESS / f"Actor_{actor}", root / f"Actor_{actor}")
    return root


@pytest.fixture(scope="module")
def run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str]:
    out = tmp_path_factory.mktemp("comparison")
    proc = _ser("--data", str(data), "--out", str(out), "--folds", str(FOLDS), "--limit-per-actor",
                str(PER_ACTOR), "--augment", "telephone", "--quick")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "report.json").read_text()), proc.stdout


def test_report_files_exist_for_every_model(run: tuple[Path, dict[str, Any], str]) -> None:
    out, report, stdout = run
    assert set(report["models"]) == set(MODEL_NAMES)
    assert report["images"]["written"]  # matplotlib is in the test environment (the train extra)
    for name in MODEL_NAMES:
        png = out / f"confusion-{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert report["models"][name]["image"] == png.name
        assert f"  {name} " in stdout  # the terminal summary names every model
    md = (out / "report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    for r in report["models"].values():  # a results row, a settings line and an image for each
        assert sum(line.startswith(f"| {r['title']} |") for line in rows) == 1, r["title"]
        assert f"**{r['title']}**" in md and f"]({r['image']})" in md
    assert f"GroupKFold({FOLDS}) by actor" in md and "--quick" in report["command"]


def test_every_model_has_every_metric_in_range(run: tuple[Path, dict[str, Any], str]) -> None:
    _, report, _ = run
    n = len(ACTORS) * PER_ACTOR
    assert report["data"]["files"] == n and all(report["data"]["files_per_class"][c] > 0 for c in EMOTIONS)
    for name, r in report["models"].items():
        for key in METRICS:
            assert 0.0 <= r[key] <= 1.0, (name, key)
        matrix = np.asarray(r["confusion"]["matrix"])
        assert matrix.sum() == n and r["accuracy"] == pytest.approx(np.trace(matrix) / n)
        assert matrix.sum(axis=1).tolist() == [report["data"]["files_per_class"][c] for c in EMOTIONS]
        for c in EMOTIONS:
            scores = r["per_class"][c]
            assert all(0.0 <= scores[k] <= 1.0 for k in ("precision", "recall", "f1")), (name, c)
            assert scores["support"] == report["data"]["files_per_class"][c]
        assert r["accuracy"] > 0.3, name  # chance is 1/7; the majority class is 1/3 of the files
        assert len(r["folds"]) == FOLDS
        assert min(f["accuracy"] for f in r["folds"]) <= r["accuracy"] <= max(f["accuracy"] for f in r["folds"])
        assert r["fit_seconds_per_fold"] > 0 and r["predict_ms_per_clip"] > 0
        assert all(f["fit_seconds"] > 0 and f["predict_seconds"] > 0 for f in r["folds"])


def test_folds_are_speaker_independent_and_ser_trains(run: tuple[Path, dict[str, Any], str], data: Path) -> None:
    _, report, _ = run
    folds = report["protocol"]["folds"]
    assert len(folds) == FOLDS
    for f in folds:
        assert not set(f["train_actors"]) & set(f["test_actors"]), f  # no speaker on both sides
        assert sorted(f["train_actors"] + f["test_actors"]) == ACTORS
        assert f["test_files"] == PER_ACTOR * len(f["test_actors"])
        assert f["train_rows"] == 2 * PER_ACTOR * len(f["train_actors"])  # each file and its telephone copy
    assert sorted(a for f in folds for a in f["test_actors"]) == ACTORS  # every actor tested exactly once
    # The same assignment `ser train` makes for these files.
    groups = np.array([actor for _, _, actor in list_ravdess(data, PER_ACTOR)])
    train_fold = fold_of_actor(groups, FOLDS)
    assert {a: f["fold"] for f in folds for a in f["test_actors"]} == train_fold


def test_markdown_says_when_images_were_skipped(run: tuple[Path, dict[str, Any], str]) -> None:
    _, report, _ = run
    without = {**report, "images": {"written": False, "reason": "matplotlib not installed"}}
    md = markdown(without)
    assert "Images were skipped: matplotlib not installed." in md and "![" not in md
    assert "| model | accuracy" in md  # the figures are still there


def test_unknown_model_is_refused_before_any_work(tmp_path: Path) -> None:
    proc = _ser("--data", str(tmp_path), "--out", str(tmp_path / "out"), "--models", "svm,xgboost")
    assert proc.returncode != 0 and "unknown model(s) xgboost" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_feature_cache_is_used_only_under_its_own_key(tmp_path: Path) -> None:
    from ser_ml.features import Features

    rng = np.random.default_rng(0)
    feats = [[Features(rng.normal(size=4).astype(np.float32), np.zeros((0, 0), np.float32), 1.5) for _ in range(3)]
             for _ in range(2)]
    corpus = Corpus([Path(f"{i}.flac") for i in range(3)], np.array([0, 1, 2]), np.array(["01", "02", "03"]),
                    feats[0], {"telephone": feats[1]})
    key = {"augment": ["telephone"], "seed": 0}
    _save_cache(tmp_path / "f.npz", key, corpus)
    back = _load_cache(tmp_path / "f.npz", key)
    assert back is not None and back.groups.tolist() == ["01", "02", "03"]
    rows, labels = back.training_set(np.array([0, 2]))  # the same rows `ser train` would train on
    want, want_labels = corpus.training_set(np.array([0, 2]))
    np.testing.assert_array_equal(np.stack([f.vector for f in rows]), np.stack([f.vector for f in want]))
    assert labels.tolist() == want_labels.tolist()
    assert _load_cache(tmp_path / "f.npz", {**key, "seed": 1}) is None  # made under other settings


def test_defaults_are_ser_trains() -> None:
    from ser_cli.cli import AUGMENTATIONS, COMPARE_MODELS

    assert CompareConfig().augment == RECIPES and AUGMENTATIONS.split(",") == list(RECIPES)
    assert COMPARE_MODELS.split(",") == list(MODEL_NAMES)
    assert CompareConfig().folds == TrainConfig().folds and CompareConfig().rf_trees == TrainConfig().rf_trees
