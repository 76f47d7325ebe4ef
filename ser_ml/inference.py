"""The served ensemble: a Whisper encoder under a RandomForest pipeline and an LSTM, loaded once
per worker process, after every artifact's hash has been checked against the manifest."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from ser_ml import lstm
from ser_ml.encoder import ArtifactError, WhisperEncoder, file_sha256
from ser_ml.features import Features
from ser_ml.metrics import apply_temperature
from ser_ml.speech_features import FEATURE_VERSION, featurise
from ser_shared.emotions import EMOTIONS
from ser_shared.schemas import Manifest

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Prediction:
    emotion: str
    confidence: float
    uncertain: bool
    probabilities: dict[str, float]
    model_probabilities: dict[str, dict[str, float]]


def _as_dict(classes: Sequence[str], probs: np.ndarray) -> dict[str, float]:
    return {c: round(float(p), 6) for c, p in zip(classes, probs, strict=True)}


def rf_proba(bundle: dict[str, Any], x: np.ndarray) -> np.ndarray:
    """RandomForest pipeline probabilities over all classes (a class absent in training gets zero)."""
    pipe = bundle["pipeline"]
    out = np.zeros((x.shape[0], len(EMOTIONS)), dtype=np.float32)
    out[:, pipe.classes_] = pipe.predict_proba(x)
    return out


def verify_models(models_dir: Path) -> Manifest:
    """Check that the manifest is for this code and every artifact is present and unaltered.

    Run before a worker starts (``ser worker``) and again when a process loads the models, so a
    missing or corrupt file stops the worker with one clear message instead of failing every job.
    Returns the manifest.
    """
    path = models_dir / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: train the models with `ser train`")
    try:
        manifest = Manifest.load(path)
    except ValidationError as exc:  # a manifest from an older release lacks what this code loads
        first = exc.errors()[0]
        raise ArtifactError(f"{path} does not describe models this code can load ({'.'.join(map(str, first['loc']))}: "
                            f"{first['msg']}): retrain with `ser train`") from exc
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path} is unreadable: {exc}") from exc
    if manifest.feature_version != FEATURE_VERSION:
        raise ArtifactError(
            f"the models in {models_dir} were trained on features {manifest.feature_version!r}, "
            f"this code computes {FEATURE_VERSION!r}: retrain with `ser train`")
    for name, info in manifest.artifacts().items():
        file = models_dir / info.file
        if not file.is_file():
            raise ArtifactError(f"model artifact {file} ({name}) is missing")
        if (got := file_sha256(file)) != info.sha256:
            raise ArtifactError(f"model artifact {file} ({name}) has sha256 {got}, the manifest records "
                                f"{info.sha256}: the file is corrupt or from another training run")
    return manifest


class Ensemble:
    """Both models plus the combination rule recorded at training time."""

    def __init__(self, manifest: dict[str, Any], rf_bundle: dict[str, Any], lstm_model: Any,
                 encoder: WhisperEncoder, speech_detector: Any) -> None:
        self.manifest = manifest
        self.encoder = encoder
        self.speech_detector = speech_detector
        self.classes: list[str] = list(manifest["classes"])
        self.rf_bundle = rf_bundle
        # One tree-walking thread per worker process: the pool already uses the cores.
        rf_bundle["pipeline"][-1].n_jobs = 1
        self.lstm = lstm_model
        info = manifest["models"]["lstm"]
        self.seq_mean = np.asarray(info["seq_mean"], dtype=np.float32)
        self.seq_std = np.asarray(info["seq_std"], dtype=np.float32)
        self.max_steps = int(info["max_steps"])
        self.weights = manifest["ensemble"]["weights"]
        # Temperature fitted on out-of-fold predictions (1.0: models from before calibration).
        self.temperature = float(manifest["ensemble"].get("temperature", 1.0))
        self.threshold = float(manifest["ensemble"]["uncertain_threshold"])
        self.versions = {name: m["version"] for name, m in manifest["models"].items()}
        self.placement: dict[str, str] = {}  # find_placement(), recorded by load()

    @classmethod
    def load(cls, models_dir: Path, threads: int | None = 1) -> Ensemble:
        """Load the manifest and every artifact; logs the versions and the load time.

        ``threads``: TensorFlow's thread pools for this process. One by default, because the
        worker pool already runs one process per core and two pools of two threads each fight
        over two cores; None leaves TensorFlow's default (a GPU worker with a solo pool).
        """
        import joblib
        import keras
        import tensorflow as tf

        if threads is not None:
            try:
                tf.config.threading.set_intra_op_parallelism_threads(threads)
                tf.config.threading.set_inter_op_parallelism_threads(threads)
            except RuntimeError:
                pass  # TensorFlow already running in this process (training, tests): keep its pools

        started = time.perf_counter()
        manifest = verify_models(models_dir)
        rf_bundle = joblib.load(models_dir / manifest.models["rf"].file)
        model = keras.models.load_model(models_dir / manifest.models["lstm"].file, compile=False)
        encoder = WhisperEncoder.load(models_dir / manifest.encoder.file)  # hash checked above
        detector = joblib.load(models_dir / manifest.speech_detector.file)
        ensemble = cls(manifest.model_dump(mode="json", exclude_unset=True), rf_bundle, model, encoder, detector)
        ensemble.predict_clips([_warmup_clip()])  # build the graphs now, not on the first job
        ensemble.placement = ensemble.find_placement()

        gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
        log.info("models loaded versions=%s load_ms=%.0f devices=%s encoder_device=%s lstm_device=%s",
                 ensemble.versions, (time.perf_counter() - started) * 1000, gpus or "cpu",
                 ensemble.placement["encoder"], ensemble.placement["lstm"])
        return ensemble

    def find_placement(self) -> dict[str, str]:
        """Where TensorFlow runs each model in this process, as it reports it: the device of the
        encoder's and the LSTM's outputs on a short call (``GPU:0``, ``CPU:0``).

        A GPU worker logs it at start (``Ensemble.load``): the evidence that the models run on the
        GPU, since TensorFlow falls back to the CPU silently when it finds no usable GPU.
        """
        import tensorflow as tf

        from ser_ml.encoder import short_device

        out = self.lstm(tf.zeros((1, 2, int(self.lstm.input_shape[-1])), tf.float32), training=False)
        return {"encoder": self.encoder.output_device(), "lstm": short_device(out.device)}

    def on_gpu(self) -> bool:
        """True when both TensorFlow models run on a GPU in this process."""
        return bool(self.placement) and all(d.startswith("GPU") for d in self.placement.values())

    def rf_proba(self, vectors: np.ndarray) -> np.ndarray:
        return rf_proba(self.rf_bundle, vectors)

    def lstm_proba(self, seqs: Sequence[np.ndarray]) -> np.ndarray:
        return lstm.predict(self.lstm, seqs, self.seq_mean, self.seq_std, self.max_steps)

    def features(self, clips: Sequence[np.ndarray]) -> list[Features]:
        """The models' inputs for trimmed speech clips (``speech_features.speech_clip``)."""
        return featurise(self.encoder, clips)

    def no_speech(self, silero_longest_s: float, feats: Sequence[Features]) -> bool:
        """The ``no_speech`` rule for one recording: Silero's longest speech region and the speech
        detector's probability on its clips (the most speech-like one counts)."""
        from ser_ml.speech_detector import is_no_speech, speech_probability

        if not feats:
            return True
        prob = float(speech_probability(self.speech_detector, np.stack([f.vector for f in feats])).max())
        return is_no_speech(silero_longest_s, prob)

    def predict_clips(self, clips: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        return self.predict_proba(self.features(clips))

    def predict_proba(self, feats: Sequence[Features]) -> dict[str, np.ndarray]:
        """Per-model and ensemble probabilities for a batch: one RF call, batched LSTM calls."""
        rf = self.rf_proba(np.stack([f.vector for f in feats]))
        lstm_p = self.lstm_proba([f.sequence for f in feats])
        combined = self.weights["rf"] * rf + self.weights["lstm"] * lstm_p
        calibrated = apply_temperature(combined / combined.sum(axis=1, keepdims=True), self.temperature)
        return {"rf": rf, "lstm": lstm_p, "ensemble": calibrated.astype(np.float32)}

    def predict(self, feats: Sequence[Features], threshold: float | None = None) -> list[Prediction]:
        probs = self.predict_proba(feats)
        return [self.combine(probs, [i], np.ones(1), threshold) for i in range(len(feats))]

    def combine(self, probs: dict[str, np.ndarray], rows: Sequence[int], weights: np.ndarray,
                threshold: float | None = None) -> Prediction:
        """One prediction from several rows of ``predict_proba`` (a recording's segments), each
        model's probabilities averaged with ``weights`` (the segments' durations)."""
        w = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        idx = list(rows)
        mean = {m: probs[m][idx][0] if len(idx) == 1 else (probs[m][idx] * w[:, None]).sum(axis=0)
                for m in ("rf", "lstm", "ensemble")}
        p = mean["ensemble"]
        best = int(np.argmax(p))
        cut = self.threshold if threshold is None else threshold
        return Prediction(
            emotion=self.classes[best],
            confidence=round(float(p[best]), 6),
            uncertain=bool(p[best] < cut),
            probabilities=_as_dict(self.classes, p),
            model_probabilities={m: _as_dict(self.classes, mean[m]) for m in ("rf", "lstm")},
        )


def _warmup_clip() -> np.ndarray:
    from ser_ml.encoder import SAMPLE_RATE

    t = np.arange(SAMPLE_RATE, dtype=np.float32) / SAMPLE_RATE
    return (0.1 * np.sin(2 * np.pi * 150 * t) * (1 + 0.3 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)

