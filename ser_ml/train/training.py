"""Training: speaker-independent cross-validation, then the shipped models on all actors.

Protocol: GroupKFold by actor (no speaker is ever in both the training and the test side of a
fold). Each fold trains the scaler + RandomForest and the LSTM on the training actors only; the
out-of-fold probabilities give each model's and the ensemble's accuracy and choose the ensemble
weight and the "uncertain" threshold. The final models are then fitted on every actor.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from ser_ml import conditions, lstm
from ser_ml.allocator import tune_malloc
from ser_ml.encoder import SAMPLE_RATE, WhisperEncoder, file_sha256
from ser_ml.features import Features
from ser_ml.inference import MANIFEST, rf_proba
from ser_ml.metrics import apply_temperature, classification, fit_temperature, reliability
from ser_ml.speech_features import ENCODER_LAYERS, FEATURE_VERSION, WHISPER_MODEL, featurise, speech_clip
from ser_ml.whisper_weights import SOURCES, provenance, read_encoder, write_artifact
from ser_shared.audio import decode
from ser_shared.emotions import EMOTIONS, parse_ravdess_name
from ser_shared.errors import SilentAudio

log = logging.getLogger(__name__)

ENCODER_FILE = f"encoder-{WHISPER_MODEL}-L{ENCODER_LAYERS}.npz"

# Training copies: each recipe makes one degraded copy of every training recording, its parameters
# drawn per file. Together they cover what a call centre's audio goes through: phone codecs, noise
# from 0 to 20 dB SNR (including other people talking), rooms, both, and other vocal tracts.
RECIPES: tuple[str, ...] = ("telephone", "noise", "reverb", "phone-noisy", "speed")
# Conditions every test fold is also scored under (never trained on: other seeds, other draws).
EVAL_CONDITIONS: tuple[str, ...] = ("telephone", "telephone:gsm", "noise:20", "noise:10", "noise:0",
                                    "reverb:0.6", "phone-noisy:10")


def recipe_condition(recipe: str, rng: np.random.Generator) -> list[str]:
    """The condition names one copy applies, in order, for a training ``recipe``."""
    if recipe == "telephone":
        return [str(rng.choice(["telephone", "telephone:alaw", "telephone:gsm"]))]
    if recipe == "noise":
        return [f"noise:{rng.choice(conditions.NOISE_TYPES)}:{rng.uniform(0, 20):.1f}"]
    if recipe == "reverb":
        return [f"reverb:{rng.uniform(0.2, 0.9):.2f}", f"noise:{rng.uniform(10, 30):.1f}"]
    if recipe == "phone-noisy":
        return [f"noise:{rng.choice(conditions.NOISE_TYPES)}:{rng.uniform(0, 20):.1f}",
                str(rng.choice(["telephone", "telephone:alaw", "telephone:gsm"]))]
    if recipe == "speed":
        return [f"speed:{rng.choice([0.9, 1.1])}", f"gain:{rng.uniform(-20, 0):.1f}"]
    raise ValueError(f"unknown training recipe {recipe!r}; known: {', '.join(RECIPES)}")


@dataclass
class Corpus:
    paths: list[Path]
    labels: np.ndarray  # class indices into EMOTIONS
    groups: np.ndarray  # actor ids
    feats: list[Features]
    augmented: dict[str, list[Features]]  # training recipe -> features of every file's degraded copy
    conditioned: dict[str, list[Features]] = field(default_factory=dict)  # EVAL_CONDITIONS, for scoring

    def training_set(self, idx: np.ndarray) -> tuple[list[Features], np.ndarray]:
        """Features and labels of files ``idx`` plus those of their degraded copies."""
        sets = [self.feats, *self.augmented.values()]
        return [s[i] for s in sets for i in idx], np.tile(self.labels[idx], len(sets))


@dataclass
class TrainConfig:
    folds: int = 5
    seed: int = 0
    rf_trees: int = 300
    lstm_units: int = 64
    epochs: int = 40
    patience: int = 6
    max_steps: int = 150  # 12 s windows of 80 ms steps
    limit_per_actor: int | None = None  # for quick runs and tests
    augment: tuple[str, ...] = RECIPES
    evaluate_conditions: tuple[str, ...] = EVAL_CONDITIONS


def list_ravdess(root: Path, limit_per_actor: int | None = None) -> list[tuple[Path, str, str]]:
    """``(path, emotion, actor)`` for every RAVDESS-named audio file under ``root``."""
    by_actor: dict[str, list[tuple[Path, str, str]]] = {}
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in (".wav", ".flac")):
        parsed = parse_ravdess_name(path)
        if parsed is not None:
            by_actor.setdefault(parsed[1], []).append((path, parsed[0], parsed[1]))
    items: list[tuple[Path, str, str]] = []
    for files in by_actor.values():
        if limit_per_actor is not None and len(files) > limit_per_actor:
            # Evenly spaced picks: the names sort by emotion, so this keeps every class present.
            picks = np.linspace(0, len(files) - 1, limit_per_actor).round().astype(int)
            files = [files[i] for i in picks]
        items.extend(files)
    return items


def actor_folds(groups: np.ndarray, folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(train, test)`` row indices of each speaker-independent fold: GroupKFold by actor.

    The one place the folds are made: ``ser train``'s cross-validation, the babble pools of its
    training copies and ``ser compare`` all take them from here, so they always agree.
    """
    from sklearn.model_selection import GroupKFold

    return list(GroupKFold(n_splits=folds).split(groups, groups, groups))


def fold_of_actor(groups: np.ndarray, folds: int) -> dict[str, int]:
    """The cross-validation fold each actor is tested in (GroupKFold's own assignment)."""
    out: dict[str, int] = {}
    for k, (_, test) in enumerate(actor_folds(groups, folds)):
        out.update({str(a): k for a in set(groups[test].tolist())})
    return out


def _decode(path: Path) -> np.ndarray:
    return decode(path, path.suffix.lstrip(".").lower(), SAMPLE_RATE, 600.0)


def _versions(path: Path, babble_paths: list[Path], recipes: tuple[str, ...], evals: tuple[str, ...],
              seed: int) -> list[np.ndarray]:
    """The trimmed clip of the recording, of each training copy, then of each scoring condition.

    Babble comes only from ``babble_paths``: other actors of the same cross-validation fold, so
    that a training copy never carries the voice of a speaker it will be tested against.
    """
    tune_malloc()  # joblib's workers are fresh processes
    audio = _decode(path)
    rng = np.random.default_rng(seed)
    picks: list[int] = (rng.choice(len(babble_paths), size=min(8, len(babble_paths)), replace=False).tolist()
                        if babble_paths else [])
    babble = [_decode(babble_paths[i]) for i in picks]
    clips = [speech_clip(audio)]
    for recipe in recipes:
        x = audio
        for name in recipe_condition(recipe, rng):
            x = conditions.apply(name, x, rng, babble)
        clips.append(_clip_or_original(x, audio))
    eval_rng = np.random.default_rng(seed + 7_919)  # scoring draws never share training's
    for name in evals:
        clips.append(_clip_or_original(conditions.apply(name, audio, eval_rng, babble), audio))
    return clips


def _clip_or_original(x: np.ndarray, original: np.ndarray) -> np.ndarray:
    try:
        return speech_clip(x)
    except SilentAudio:
        return speech_clip(original)


def load_corpus(root: Path, encoder: WhisperEncoder, limit_per_actor: int | None = None,
                augment: tuple[str, ...] = (), evaluate: tuple[str, ...] = (), seed: int = 0,
                folds: int = 5, jobs: int = 2, block: int = 64) -> Corpus:
    """Decode, degrade and encode every recording (blocks of files, so memory holds features, not audio)."""
    from joblib import Parallel, delayed

    items = list_ravdess(root, limit_per_actor)
    if not items:
        raise SystemExit(f"no RAVDESS-named audio under {root}")
    groups = np.array([a for _, _, a in items])
    fold = fold_of_actor(groups, folds)
    mates = {a: [p for p, _, b in items if b != a and fold[b] == fold[a]] for a in fold}
    rows: list[list[Features]] = []
    with Parallel(n_jobs=jobs) as parallel:
        for start in range(0, len(items), block):
            part = items[start : start + block]
            versions = parallel(delayed(_versions)(p, mates[a], augment, evaluate, seed * 100_003 + start + i)
                                for i, (p, _, a) in enumerate(part))
            flat = [clip for v in versions for clip in v]
            feats = featurise(encoder, flat)
            per = len(feats) // len(part)
            rows.extend(feats[i * per : (i + 1) * per] for i in range(len(part)))
            log.info("features files=%d/%d", start + len(part), len(items))
    labels = np.array([EMOTIONS.index(e) for _, e, _ in items])
    augmented = {name: [row[k + 1] for row in rows] for k, name in enumerate(augment)}
    conditioned = {name: [row[1 + len(augment) + k] for row in rows] for k, name in enumerate(evaluate)}
    return Corpus([p for p, _, _ in items], labels, groups, [row[0] for row in rows], augmented, conditioned)


def train_speech_detector(out_dir: Path, encoder: WhisperEncoder, data_dir: Path, seed: int,
                          files_per_actor: int | None = None, nonspeech_per_family: int | None = None
                          ) -> dict[str, Any]:
    """Fit the ``no_speech`` second check (``ser_ml.speech_detector``) on RAVDESS speech against
    generated non-speech, write ``speech_detector.joblib``; returns its manifest entry."""
    import joblib

    from ser_ml import speech_detector as sd

    started = time.perf_counter()
    data = sd.build_training_set(encoder, data_dir, seed, files_per_actor=files_per_actor,
                                 nonspeech_per_family=nonspeech_per_family or sd.NONSPEECH_PER_FAMILY)
    model = sd.fit_speech_detector(data.speech(), data.nonspeech(), seed)
    path = out_dir / "speech_detector.joblib"
    joblib.dump(model, path, compress=3)
    log.info("speech detector rows=%d seconds=%.1f", len(data.vectors), time.perf_counter() - started)
    return {"file": path.name, "sha256": file_sha256(path), "model": "StandardScaler → LogisticRegression",
            "speech_rows": int(data.is_speech.sum()), "nonspeech_rows": int((~data.is_speech).sum()),
            "rule": {"sure_speech_s": sd.SURE_SPEECH_S, "no_region_threshold": sd.NO_REGION_THRESHOLD,
                     "short_region_threshold": sd.SHORT_REGION_THRESHOLD}}


def add_speech_detector(models_dir: Path, data_dir: Path, seed: int = 0) -> dict[str, Any]:
    """(Re)train only the speech detector of an existing models folder and record it in its manifest."""
    manifest = json.loads((models_dir / MANIFEST).read_text())
    encoder = WhisperEncoder.load(models_dir / manifest["encoder"]["file"], manifest["encoder"]["sha256"])
    manifest["speech_detector"] = train_speech_detector(models_dir, encoder, data_dir, seed)
    (models_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    field_dir = data_dir.parent / "indian_emospeech"
    if field_dir.is_dir():  # which field recordings get no_speech depends on the detector
        manifest["cross_corpus"] = {"indian_emospeech": cross_corpus(field_dir, models_dir)}
        (models_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest  # type: ignore[no-any-return]


def build_encoder(out_dir: Path) -> tuple[Path, str, dict[str, Any]]:
    """Write the encoder artifact the features use; returns its path, sha256 and provenance."""
    source = SOURCES[WHISPER_MODEL]
    meta = provenance(source, ENCODER_LAYERS)
    path = out_dir / ENCODER_FILE
    digest = write_artifact(read_encoder(source, ENCODER_LAYERS), meta, path)
    return path, digest, meta


def seed_everything(seed: int) -> None:
    import keras
    import tensorflow as tf

    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def rf_pipeline(trees: int, seed: int) -> Any:
    """scaler → shrinkage LDA → RandomForest, one (unfitted) scikit-learn Pipeline.

    The LDA projects the 768 pooled encoder values onto the 6 directions that separate the
    emotions best (with Ledoit-Wolf shrinkage, as 768 dimensions are many for a few thousand
    clips); the forest then draws its non-linear boundaries in that small space. In CV this beat
    the forest on the raw vector by several points (see the model card).
    """
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    return Pipeline([
        ("scaler", StandardScaler()),
        ("lda", LinearDiscriminantAnalysis(solver="eigen", shrinkage="auto")),
        ("rf", RandomForestClassifier(n_estimators=trees, class_weight="balanced_subsample",
                                      min_samples_leaf=4, max_features="sqrt", n_jobs=2,
                                      random_state=seed)),
    ])


def fit_rf(x: np.ndarray, y: np.ndarray, cfg: TrainConfig) -> dict[str, Any]:
    """Fit :func:`rf_pipeline` and wrap it as the served bundle (pipeline, classes, feature version)."""
    pipe = rf_pipeline(cfg.rf_trees, cfg.seed)
    pipe.fit(x, y)
    return {"pipeline": pipe, "classes": list(EMOTIONS), "feature_version": FEATURE_VERSION}


def seq_stats(seqs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    stacked = np.concatenate(seqs, axis=0)
    return stacked.mean(axis=0), stacked.std(axis=0) + 1e-6


def _lstm_arrays(seqs: list[np.ndarray], mean: np.ndarray, std: np.ndarray, max_steps: int) -> np.ndarray:
    return lstm.pad([lstm.normalise(s[:max_steps], mean, std) for s in seqs])


def _class_weights(y: np.ndarray) -> dict[int, float]:
    counts = np.bincount(y, minlength=len(EMOTIONS)).astype(float)
    return {i: float(len(y) / (len(EMOTIONS) * c)) for i, c in enumerate(counts) if c > 0}


def fit_lstm(seqs: list[np.ndarray], y: np.ndarray, cfg: TrainConfig, epochs: int,
             val: tuple[list[np.ndarray], np.ndarray] | None = None) -> tuple[Any, dict[str, Any]]:
    """Train the LSTM; with ``val`` (held-out actors) stop early on its loss and report the epoch."""
    import keras

    mean, std = seq_stats(seqs)
    model = lstm.build_model(seqs[0].shape[1], len(EMOTIONS), units=cfg.lstm_units)
    x = _lstm_arrays(seqs, mean, std, cfg.max_steps)
    callbacks = []
    val_data = None
    if val is not None:
        val_data = (_lstm_arrays(val[0], mean, std, cfg.max_steps), val[1])
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_loss", patience=cfg.patience,
                                                       restore_best_weights=True))
    history = model.fit(x, y, batch_size=32, epochs=epochs, validation_data=val_data, verbose=0,
                        class_weight=_class_weights(y), callbacks=callbacks, shuffle=True)
    losses = history.history.get("val_loss")
    best_epoch = int(np.argmin(losses)) + 1 if losses else epochs
    return model, {"seq_mean": mean.tolist(), "seq_std": std.tolist(), "best_epoch": best_epoch}


def metrics(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    full = classification(y, probs)
    return {k: full[k] for k in ("accuracy", "balanced_accuracy", "macro_f1")}


def _inner_split(groups: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out two training actors for LSTM early stopping (never the test fold's actors)."""
    actors = np.unique(groups)
    rng = np.random.default_rng(seed)
    held = rng.choice(actors, size=min(2, len(actors) - 1), replace=False)
    val = np.isin(groups, held)
    return ~val, val


def _vectors(feats: list[Features]) -> np.ndarray:
    return np.stack([f.vector for f in feats])


def _lstm_proba(model: Any, info: dict[str, Any], feats: list[Features], cfg: TrainConfig) -> np.ndarray:
    return lstm.predict(model, [f.sequence for f in feats], np.asarray(info["seq_mean"], np.float32),
                        np.asarray(info["seq_std"], np.float32), cfg.max_steps)


def cross_validate(corpus: Corpus, cfg: TrainConfig) -> dict[str, Any]:
    """Out-of-fold probabilities and per-fold metrics for the RF, the LSTM and their ensemble,
    on the clean recordings and under each scoring condition."""
    y, groups = corpus.labels, corpus.groups
    sets = {"clean": corpus.feats, **corpus.conditioned}
    oof = {c: {"rf": np.zeros((len(y), len(EMOTIONS))), "lstm": np.zeros((len(y), len(EMOTIONS)))} for c in sets}
    folds: list[dict[str, Any]] = []
    for k, (train, test) in enumerate(actor_folds(groups, cfg.folds)):
        started = time.perf_counter()
        fit_idx, val_idx = _inner_split(groups[train], cfg.seed + k)
        tr, va = train[fit_idx], train[val_idx]
        # Degraded copies of the training actors only; the test actors are scored on originals
        # and on their own, separately drawn, conditions.
        tr_feats, tr_y = corpus.training_set(train)
        bundle = fit_rf(_vectors(tr_feats), tr_y, cfg)
        lstm_feats, lstm_y = corpus.training_set(tr)
        val_feats, val_y = corpus.training_set(va)
        model, info = fit_lstm([f.sequence for f in lstm_feats], lstm_y, cfg, cfg.epochs,
                               val=([f.sequence for f in val_feats], val_y))
        for name, feats in sets.items():
            test_feats = [feats[i] for i in test]
            oof[name]["rf"][test] = rf_proba(bundle, _vectors(test_feats))
            oof[name]["lstm"][test] = _lstm_proba(model, info, test_feats, cfg)
        folds.append({"fold": k, "test_actors": sorted(set(groups[test].tolist())),
                      "lstm_best_epoch": info["best_epoch"],
                      "rf": metrics(y[test], oof["clean"]["rf"][test]),
                      "lstm": metrics(y[test], oof["clean"]["lstm"][test]),
                      "seconds": round(time.perf_counter() - started, 1)})
        log.info("fold=%d actors=%s rf=%.3f lstm=%.3f", k, folds[-1]["test_actors"],
                 folds[-1]["rf"]["accuracy"], folds[-1]["lstm"]["accuracy"])
    return {"oof": oof["clean"], "conditions": oof, "folds": folds}


def condition_table(y: np.ndarray, cv: dict[str, Any], groups: np.ndarray) -> dict[str, Any]:
    """Per scoring condition: each model's and the nested ensemble's out-of-fold metrics.

    The ensemble's weight and temperature for a fold are those chosen on the other folds' clean
    predictions (as served), applied to this fold's degraded copies.
    """
    table: dict[str, Any] = {}
    clean = cv["oof"]
    for name, oof in cv["conditions"].items():
        probs = np.zeros_like(oof["rf"])
        for f in cv["folds"]:
            test = np.isin(groups, f["test_actors"])
            w = choose_weight(y[~test], {k: v[~test] for k, v in clean.items()})
            raw_clean = w * clean["rf"] + (1 - w) * clean["lstm"]
            raw_clean /= raw_clean.sum(axis=1, keepdims=True)
            t = fit_temperature(y[~test], raw_clean[~test])
            raw = w * oof["rf"][test] + (1 - w) * oof["lstm"][test]
            probs[test] = apply_temperature(raw / raw.sum(axis=1, keepdims=True), t)
        table[name] = {"rf": metrics(y, oof["rf"]), "lstm": metrics(y, oof["lstm"]),
                       "ensemble_nested": metrics(y, probs)}
    return table


def choose_weight(y: np.ndarray, oof: dict[str, np.ndarray]) -> float:
    """The RF weight (0..1, step 0.1) that maximises out-of-fold ensemble accuracy."""
    grid = np.round(np.linspace(0, 1, 11), 2)
    scores = [metrics(y, w * oof["rf"] + (1 - w) * oof["lstm"])["accuracy"] for w in grid]
    return float(grid[int(np.argmax(scores))])


def choose_threshold(y: np.ndarray, probs: np.ndarray) -> float:
    """Lowest confidence at which out-of-fold predictions are right at least half the time.

    Below it the ensemble is more often wrong than right, which is what "uncertain" tells a user.
    """
    conf = probs.max(axis=1)
    right = probs.argmax(axis=1) == y
    for t in np.round(np.arange(0.15, 0.95, 0.025), 3):
        band = (conf >= t) & (conf < t + 0.1)
        if band.sum() >= 20 and right[band].mean() >= 0.5:
            return float(t)
    return 0.5


def calibrate(y: np.ndarray, probs: np.ndarray, groups: np.ndarray,
              folds: list[dict[str, Any]]) -> tuple[float, dict[str, Any], np.ndarray]:
    """Temperature for the served ensemble, and an honest calibration error for it.

    The shipped temperature is fitted on all out-of-fold predictions. The reported ECE is
    cross-fitted: each fold's predictions are scaled with a temperature fitted on the other folds,
    so the figure is not measured on the data that chose the temperature.
    """
    temperature = fit_temperature(y, probs)
    crossed = np.zeros_like(probs)
    for f in folds:
        test = np.isin(groups, f["test_actors"])
        crossed[test] = apply_temperature(probs[test], fit_temperature(y[~test], probs[~test]))
    curves = {"uncalibrated": reliability(y, probs), "temperature (cross-fitted)": reliability(y, crossed)}
    info = {"temperature": temperature, "ece_uncalibrated": curves["uncalibrated"]["ece"],
            "ece_cross_fitted": curves["temperature (cross-fitted)"]["ece"], "curves": curves}
    return temperature, info, apply_temperature(probs, temperature)


def summarize(folds: list[dict[str, Any]], key: str, y: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    per_fold = [f[key]["accuracy"] for f in folds]
    f1s = [f[key]["macro_f1"] for f in folds]
    return {**metrics(y, probs), "accuracy_fold_mean": float(np.mean(per_fold)),
            "accuracy_fold_std": float(np.std(per_fold)), "macro_f1_fold_mean": float(np.mean(f1s)),
            "macro_f1_fold_std": float(np.std(f1s))}


def nested_ensemble(y: np.ndarray, oof: dict[str, np.ndarray], groups: np.ndarray,
                    folds: list[dict[str, Any]]) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The ensemble with its weight and temperature chosen without the fold they are scored on.

    The served weight and temperature are chosen on all out-of-fold predictions, which makes the
    ensemble's cross-validation figure slightly optimistic; here each fold gets a weight and a
    temperature fitted on the other folds only, so its figure is an honest estimate.
    """
    probs = np.zeros_like(oof["rf"])
    per_fold = []
    for f in folds:
        test = np.isin(groups, f["test_actors"])
        rest = {k: v[~test] for k, v in oof.items()}
        w = choose_weight(y[~test], rest)
        raw = w * oof["rf"] + (1 - w) * oof["lstm"]
        raw /= raw.sum(axis=1, keepdims=True)
        t = fit_temperature(y[~test], raw[~test])
        probs[test] = apply_temperature(raw[test], t)
        per_fold.append({"fold": f["fold"], "rf_weight": w, "temperature": t, **metrics(y[test], probs[test])})
    return probs, per_fold


def _nested_summary(y: np.ndarray, oof: dict[str, np.ndarray], groups: np.ndarray,
                    folds: list[dict[str, Any]]) -> dict[str, Any]:
    probs, per_fold = nested_ensemble(y, oof, groups, folds)
    acc, f1 = [f["accuracy"] for f in per_fold], [f["macro_f1"] for f in per_fold]
    return {**metrics(y, probs), "accuracy_fold_mean": float(np.mean(acc)), "accuracy_fold_std": float(np.std(acc)),
            "macro_f1_fold_mean": float(np.mean(f1)), "macro_f1_fold_std": float(np.std(f1)), "folds": per_fold}


def _fold_ensemble(folds: list[dict[str, Any]], corpus: Corpus, probs: np.ndarray) -> None:
    for f in folds:
        mask = np.isin(corpus.groups, f["test_actors"])
        f["ensemble"] = metrics(corpus.labels[mask], probs[mask])


def train(data_dir: Path, out_dir: Path, cfg: TrainConfig) -> dict[str, Any]:
    """Build the encoder artifact, cross-validate, fit the final models on all actors, write
    the artifacts (each with its sha256) and the manifest."""
    import joblib

    seed_everything(cfg.seed)
    tune_malloc()
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    encoder_path, encoder_sha, encoder_meta = build_encoder(out_dir)
    encoder = WhisperEncoder.load(encoder_path, encoder_sha)
    corpus = load_corpus(data_dir, encoder, cfg.limit_per_actor, cfg.augment, cfg.evaluate_conditions,
                         cfg.seed, cfg.folds)
    log.info("features files=%d seconds=%.1f", len(corpus.paths), time.perf_counter() - started)
    cv = cross_validate(corpus, cfg)
    y, oof = corpus.labels, cv["oof"]
    w = choose_weight(y, oof)
    raw = w * oof["rf"] + (1 - w) * oof["lstm"]
    raw /= raw.sum(axis=1, keepdims=True)
    temperature, calibration, ens = calibrate(y, raw, corpus.groups, cv["folds"])
    _fold_ensemble(cv["folds"], corpus, ens)
    threshold = choose_threshold(y, ens)
    final_epochs = int(np.median([f["lstm_best_epoch"] for f in cv["folds"]]))

    seed_everything(cfg.seed)
    every, labels = corpus.training_set(np.arange(len(y)))
    bundle = fit_rf(_vectors(every), labels, cfg)
    model, info = fit_lstm([f.sequence for f in every], labels, cfg, final_epochs)
    joblib.dump(bundle, out_dir / "rf.joblib", compress=3)
    model.save(out_dir / "lstm.keras")
    small = cfg.limit_per_actor is not None  # quick runs and tests: a small speech detector too
    detector = train_speech_detector(out_dir, encoder, data_dir, cfg.seed,
                                     files_per_actor=cfg.limit_per_actor, nonspeech_per_family=20 if small else None)
    rf_sha, lstm_sha = file_sha256(out_dir / "rf.joblib"), file_sha256(out_dir / "lstm.keras")
    manifest = {
        "feature_version": FEATURE_VERSION,
        "sample_rate": SAMPLE_RATE,
        "classes": list(EMOTIONS),
        "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "seed": cfg.seed,
        "data": {"corpus": "RAVDESS speech", "actors": sorted(set(corpus.groups.tolist())),
                 "files": len(corpus.paths), "calm": "merged into neutral",
                 "licence": "CC BY-NC-SA 4.0 (inherited by the models)"},
        "config": {k: v for k, v in vars(cfg).items()},
        "encoder": {"file": encoder_path.name, "sha256": encoder_sha, "dtype": "float16",
                    "layer_used": ENCODER_LAYERS, **encoder_meta},
        "cv": {
            "protocol": f"GroupKFold({cfg.folds}) by actor; both models trained on the training actors' "
                        f"recordings plus one degraded copy each per recipe ({', '.join(cfg.augment) or 'none'}), "
                        "babble only from actors of the same fold; LSTM early stopping on 2 training actors; "
                        "ensemble weight and temperature nested (chosen on the other folds)",
            "folds": cv["folds"],
            "rf": summarize(cv["folds"], "rf", y, oof["rf"]),
            "lstm": summarize(cv["folds"], "lstm", y, oof["lstm"]),
            "ensemble": summarize(cv["folds"], "ensemble", y, ens)
            | {k: classification(y, ens)[k] for k in ("per_class", "confusion")},
            "ensemble_nested": _nested_summary(y, oof, corpus.groups, cv["folds"]),
            "conditions": condition_table(y, cv, corpus.groups),
        },
        "ensemble": {"weights": {"rf": w, "lstm": round(1 - w, 2)}, "temperature": temperature,
                     "uncertain_threshold": threshold},
        "speech_detector": detector,
        "calibration": calibration,
        "models": {
            "rf": {"file": "rf.joblib", "sha256": rf_sha, "version": f"rf-{FEATURE_VERSION}-{rf_sha[:10]}",
                   "trees": cfg.rf_trees, "pipeline": "StandardScaler → LDA(shrinkage=auto) → RandomForest"},
            "lstm": {"file": "lstm.keras", "sha256": lstm_sha,
                     "version": f"lstm-{FEATURE_VERSION}-{lstm_sha[:10]}",
                     "epochs": final_epochs, "max_steps": cfg.max_steps,
                     "seq_mean": info["seq_mean"], "seq_std": info["seq_std"]},
        },
        "training_seconds": round(time.perf_counter() - started, 1),
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    field_dir = data_dir.parent / "indian_emospeech"
    if field_dir.is_dir():
        manifest["cross_corpus"] = {"indian_emospeech": cross_corpus(field_dir, out_dir)}
        (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    _plots(out_dir, classification(y, ens)["confusion"]["matrix"], calibration["curves"], manifest)
    return manifest


def cross_corpus(root: Path, models_dir: Path) -> dict[str, Any]:
    """The shipped models on a corpus they never saw, through ``ser evaluate``'s path."""
    from ser_ml.inference import Ensemble
    from ser_ml.train.evaluation import analyse, labelled_files, report
    from ser_shared.settings import Settings

    items = labelled_files(root)
    ensemble = Ensemble.load(models_dir)
    rep = report(ensemble, items, analyse(ensemble, items, Settings(env="test")), root)
    keep = ("n", "n_failed", "accuracy", "balanced_accuracy", "macro_f1", "labels_present",
            "accuracy_within_present_labels", "models", "calibration")
    return {k: rep[k] for k in keep} | {"confusion": rep["confusion"]["matrix"]}


def _plots(out_dir: Path, matrix: list[list[int]], curves: dict[str, Any], manifest: dict[str, Any]) -> None:
    """The model card's pictures, when matplotlib is installed (the ``train`` extra)."""
    try:
        import matplotlib  # noqa: F401

        from ser_ml.train.plots import confusion_png, reliability_png
    except ImportError:
        log.warning("matplotlib not installed: no confusion matrix or reliability diagram written")
        return
    cv = manifest["cv"]["ensemble"]
    confusion_png(np.asarray(matrix), list(EMOTIONS), out_dir / "cv_confusion.png",
                  title=f"ensemble, out-of-fold (unseen actors): accuracy {cv['accuracy']:.3f}")
    reliability_png(curves, out_dir / "reliability.png")


def report(manifest: dict[str, Any]) -> str:
    """A short human summary of the cross-validation figures."""
    lines = [f"speaker-independent CV: {manifest['cv']['protocol']}"]
    for name in ("rf", "lstm", "ensemble", "ensemble_nested"):
        m = manifest["cv"][name]
        lines.append(f"  {name:15s} accuracy {m['accuracy_fold_mean']:.3f} ± {m['accuracy_fold_std']:.3f}"
                     f"  macro-F1 {m['macro_f1_fold_mean']:.3f} ± {m['macro_f1_fold_std']:.3f}"
                     f"  (pooled accuracy {m['accuracy']:.3f})")
    for name, m in manifest["cv"].get("conditions", {}).items():
        lines.append(f"  {name:15s} ensemble {m['ensemble_nested']['accuracy']:.3f} "
                     f"(macro-F1 {m['ensemble_nested']['macro_f1']:.3f}), rf {m['rf']['accuracy']:.3f}, "
                     f"lstm {m['lstm']['accuracy']:.3f}")
    e = manifest["ensemble"]
    lines.append(f"  ensemble weights {e['weights']}, temperature {e['temperature']}, "
                 f"uncertain below {e['uncertain_threshold']}")
    for corpus, m in manifest.get("cross_corpus", {}).items():
        lines.append(f"  cross-corpus {corpus}: accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f} "
                     f"over {m['labels_present']} (n={m['n']})")
    c = manifest["calibration"]
    lines.append(f"  expected calibration error: {c['ece_uncalibrated']:.3f} before, "
                 f"{c['ece_cross_fitted']:.3f} after temperature scaling (cross-fitted)")
    return "\n".join(lines)
