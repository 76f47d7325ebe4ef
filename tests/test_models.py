"""The shipped model artifacts and the training command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ser_shared.audio import decode
from ser_shared.emotions import EMOTIONS
from ser_shared.features import FEATURE_VERSION, SAMPLE_RATE, extract
from ser_shared.settings import REPO_ROOT
from tests.conftest import RAVDESS, ravdess_file

MODELS = REPO_ROOT / "models"


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((MODELS / "manifest.json").read_text())


def test_manifest_describes_the_artifacts(manifest: dict) -> None:
    assert manifest["classes"] == list(EMOTIONS)
    assert manifest["feature_version"] == FEATURE_VERSION
    assert manifest["data"]["actors"] == [f"{i:02d}" for i in range(1, 21)]
    assert set(manifest["models"]) == {"rf", "lstm"}
    for info in manifest["models"].values():
        assert (MODELS / info["file"]).is_file() and info["version"]
    weights = manifest["ensemble"]["weights"]
    assert weights["rf"] + weights["lstm"] == pytest.approx(1.0)
    cv = manifest["cv"]
    assert "by actor" in cv["protocol"]
    for fold in cv["folds"]:  # speaker independence: test actors never overlap between folds
        assert len(fold["test_actors"]) == 4
    assert sorted(a for f in cv["folds"] for a in f["test_actors"]) == manifest["data"]["actors"]


def test_shipped_models_classify_real_speech(manifest: dict) -> None:
    """Trained on these actors, the ensemble should get most of a small sample of them right."""
    from worker.inference import Ensemble

    ensemble = Ensemble.load(MODELS)
    codes = {"01": "neutral", "03": "happy", "04": "sad", "05": "angry", "06": "fearful",
             "07": "disgust", "08": "surprised"}
    files = [(ravdess_file(a, c, "01" if c == "01" else "02"), e) for a in (3, 8, 15) for c, e in codes.items()]
    preds = ensemble.predict([extract(decode(p, "flac", SAMPLE_RATE, 600)) for p, _ in files])
    right = sum(p.emotion == e for p, (_, e) in zip(preds, files, strict=True))
    assert right / len(files) >= 0.7  # training-set actors: a sanity check, not an accuracy claim
    for p in preds:
        assert np.isclose(sum(p.probabilities.values()), 1.0, atol=1e-3)


def test_training_command_writes_loadable_artifacts(tmp_path: Path) -> None:
    """A tiny run of `ser train` (3 files per actor, 2 folds) produces a manifest the worker loads."""
    out = tmp_path / "models"
    cmd = [sys.executable, "-m", "ser_shared.cli", "train", "--data", str(RAVDESS), "--out", str(out),
           "--folds", "2", "--epochs", "2", "--trees", "10", "--limit-per-actor", "7"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "speaker-independent CV" in proc.stdout and "ensemble" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["cv"]["folds"]) == 2 and manifest["data"]["files"] == 140
    from worker.inference import Ensemble

    ensemble = Ensemble.load(out)
    (pred,) = ensemble.predict([extract(decode(ravdess_file(1, "05", "02"), "flac", SAMPLE_RATE, 600))])
    assert pred.emotion in EMOTIONS
