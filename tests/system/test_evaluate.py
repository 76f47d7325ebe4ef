"""`ser evaluate` and the metrics behind it, checked against scikit-learn and the worker's own path."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from sklearn import metrics as skm

from ser_ml import metrics
from ser_shared.emotions import EMOTIONS
from ser_shared.settings import REPO_ROOT, Settings
from tests.conftest import DATASETS, ravdess_file

MODELS = REPO_ROOT / "models"


def _random_case(seed: int, absent: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    present = [c for c in range(len(EMOTIONS)) if c not in absent]
    y = rng.choice(present, size=300)
    logits = rng.normal(size=(300, len(EMOTIONS)))
    logits[np.arange(300), y] += rng.uniform(0, 3, size=300)  # better than chance, not perfect
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, probs


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("absent", [(), (2, 5, 6)])
def test_classification_metrics_match_scikit_learn(absent: tuple[int, ...]) -> None:
    y, probs = _random_case(1, absent)
    pred = probs.argmax(axis=1)
    present = sorted(set(y.tolist()))
    got = metrics.classification(y, probs)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert got["macro_f1"] == pytest.approx(skm.f1_score(y, pred, labels=present, average="macro"))
    p, r, f, s = skm.precision_recall_fscore_support(y, pred, labels=range(len(EMOTIONS)), zero_division=0)
    for i, name in enumerate(EMOTIONS):
        row = got["per_class"][name]
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((p[i], r[i], f[i]), abs=1e-4)
        assert row["support"] == s[i]
    assert got["confusion"]["matrix"] == skm.confusion_matrix(y, pred, labels=range(len(EMOTIONS))).tolist()


def test_expected_calibration_error_by_hand() -> None:
    y, probs = _random_case(2)
    conf, right = probs.max(axis=1), probs.argmax(axis=1) == y
    expected = 0.0
    for low in np.arange(0.0, 1.0, 0.1):  # the textbook definition, one bin at a time
        inside = (conf > low) & (conf <= low + 0.1) if low > 0 else conf <= 0.1
        if inside.any():
            expected += inside.mean() * abs(right[inside].mean() - conf[inside].mean())
    assert metrics.reliability(y, probs)["ece"] == pytest.approx(expected, abs=1e-4)


def test_temperature_scaling_recovers_a_known_temperature() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(scale=2.0, size=(4000, 7))
    truth = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = np.array([rng.choice(7, p=p) for p in truth])
    overconfident = metrics.apply_temperature(truth, 0.5)  # sharpened: what an over-confident model reports
    temperature = metrics.fit_temperature(y, overconfident)
    assert temperature == pytest.approx(2.0, rel=0.1)
    calibrated = metrics.apply_temperature(overconfident, temperature)
    assert metrics.reliability(y, calibrated)["ece"] < metrics.reliability(y, overconfident)["ece"]


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small labelled folder: RAVDESS FLAC, one 48 kHz stereo WAV, field recordings, and junk."""
    root = tmp_path_factory.mktemp("evaluate")
    for actor in (2, 9):
        for code in ("01", "03", "04", "05", "06", "07", "08"):
            src = ravdess_file(actor, code, "02" if code != "01" else "01")
            shutil.copy(src, root / src.name)
    # The original RAVDESS delivery: 48 kHz 16-bit stereo WAV.
    src = ravdess_file(13, "05", "02")
    audio, rate = sf.read(src, dtype="float32")
    import soxr

    up = soxr.resample(audio, rate, 48000)
    sf.write(root / src.with_suffix(".wav").name, np.stack([up, up], axis=1), 48000, subtype="PCM_16")
    for path in sorted((DATASETS / "indian_emospeech").glob("*.flac"))[:6]:
        shutil.copy(path, root / path.name)
    (root / "03-01-05-01-01-01-07.wav").write_text("not audio at all")  # labelled but broken
    (root / "notes.wav").write_bytes(b"RIFF")  # not a labelled name: skipped
    return root


@pytest.fixture(scope="module")
def evaluated(eval_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("report")
    cmd = [sys.executable, "-m", "ser_cli", "evaluate", str(eval_dir), "--json", str(out / "r.json"),
           "--plot", str(out / "cm.png")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accuracy" in proc.stdout and "macro-F1" in proc.stdout
    return json.loads((out / "r.json").read_text()), out


def test_evaluate_report_matches_an_independent_computation(evaluated: tuple[dict, Path]) -> None:
    report, out = evaluated
    # Two of the six field recordings are the word "go" said at a peak of 0.03 in street noise:
    # no speech is found in them (see the model card), so they get no emotion.
    codes = sorted(f["code"] for f in report["failures"])
    assert codes == ["no_speech", "no_speech", "unsupported_format"]
    assert all("__go-" in f["path"] for f in report["failures"] if f["code"] == "no_speech")
    assert report["n"] == 14 + 1 + 6 - 2 and report["n_failed"] == 3
    assert report["corpora"] == {"indian_emospeech": 4, "ravdess": 15}
    labels = [f["label"] for f in report["files"]]
    preds = [f["predicted"] for f in report["files"]]
    present = sorted(set(labels))
    assert report["accuracy"] == pytest.approx(skm.accuracy_score(labels, preds))
    assert report["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, preds))
    assert report["macro_f1"] == pytest.approx(skm.f1_score(labels, preds, labels=present, average="macro"))
    assert report["confusion"]["labels"] == list(EMOTIONS)
    assert report["confusion"]["matrix"] == skm.confusion_matrix(labels, preds, labels=list(EMOTIONS)).tolist()
    assert set(report["per_class"]) == set(EMOTIONS)
    assert (out / "cm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_uses_the_worker_path(evaluated: tuple[dict, Path], eval_dir: Path) -> None:
    """Per-file predictions equal the worker pipeline's, and 48 kHz stereo WAV equals its FLAC."""
    from ser_ml.inference import Ensemble
    from ser_ml.pipeline import JobInput, run

    report, _ = evaluated
    ensemble = Ensemble.load(MODELS)
    settings = Settings(env="test", data_dir=eval_dir)
    by_path = {f["path"]: f for f in report["files"]}
    for name in ("03-01-05-02-01-01-02.flac", "03-01-04-02-01-01-09.flac", "03-01-05-02-01-01-13.wav"):
        fmt = Path(name).suffix.lstrip(".")
        (outcome,) = run(ensemble, [JobInput(uuid.uuid4(), eval_dir / name, fmt)], settings)
        assert outcome.prediction is not None
        assert outcome.prediction.emotion == by_path[name]["predicted"]
        assert outcome.prediction.confidence == pytest.approx(by_path[name]["confidence"], abs=1e-5)
    (flac,) = run(ensemble, [JobInput(uuid.uuid4(), ravdess_file(13, "05", "02"), "flac")], settings)
    wav = by_path["03-01-05-02-01-01-13.wav"]
    assert flac.prediction is not None and flac.prediction.emotion == wav["predicted"]
    assert flac.prediction.confidence == pytest.approx(wav["confidence"], abs=0.05)


def test_shipped_models_reproduce_their_recorded_cross_corpus_figures() -> None:
    """The manifest records what the shipped models scored on the held-out field corpus; so must they now."""
    from ser_ml.inference import Ensemble
    from ser_ml.train.evaluation import analyse, labelled_files, report

    manifest = json.loads((MODELS / "manifest.json").read_text())
    recorded = manifest["cross_corpus"]["indian_emospeech"]
    root = DATASETS / "indian_emospeech"
    items = labelled_files(root)
    ensemble = Ensemble.load(MODELS)
    got = report(ensemble, items, analyse(ensemble, items, Settings(env="test")), root)
    assert got["n"] == recorded["n"] and got["n_failed"] == recorded["n_failed"]
    assert got["n"] + got["n_failed"] == 240
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert got[key] == pytest.approx(recorded[key], abs=0.01)


def test_evaluate_without_matplotlib_prints_the_metrics_and_says_why_there_is_no_plot(tmp_path: Path) -> None:
    """A missing plotting library costs the picture, not the metrics: they are printed and the JSON
    written, one line says what to install, and the exit status says the asked-for plot is missing."""
    data = tmp_path / "data"
    data.mkdir()
    for code in ("03", "05"):
        src = ravdess_file(4, code, "02")
        shutil.copy(src, data / src.name)
    # sys.modules[name] = None is how Python spells "not installed": the import raises ImportError.
    code = ("import sys; sys.modules['matplotlib'] = None; from ser_cli.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    cmd = [sys.executable, "-c", code, "evaluate", str(data), "--json", str(tmp_path / "r.json"),
           "--plot", str(tmp_path / "c.png")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "accuracy" in proc.stdout and "macro-F1" in proc.stdout
    assert json.loads((tmp_path / "r.json").read_text())["n"] == 2
    assert not (tmp_path / "c.png").exists()
    assert "Traceback" not in proc.stderr
    (notice,) = [line for line in proc.stderr.splitlines() if "matplotlib" in line]
    assert "c.png not written" in notice and "ser-service[train]" in notice
