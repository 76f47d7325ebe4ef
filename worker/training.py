"""Training: speaker-independent cross-validation, then the shipped models on all actors.

Protocol: GroupKFold by actor (no speaker is ever in both the training and the test side of a
fold). Each fold trains the scaler + RandomForest and the LSTM on the training actors only; the
out-of-fold probabilities give each model's and the ensemble's accuracy and choose the ensemble
weight and the "uncertain" threshold. The final models are then fitted on every actor.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from ser_shared.audio import decode
from ser_shared.emotions import EMOTIONS, parse_ravdess_name
from ser_shared.features import FEATURE_VERSION, SAMPLE_RATE, Features, extract
from ser_shared.memory import tune_malloc
from worker import augment as augmentation
from worker import lstm
from worker.augment import AUGMENTATIONS
from worker.inference import MANIFEST, rf_proba
from worker.metrics import apply_temperature, classification, fit_temperature, reliability

log = logging.getLogger(__name__)


@dataclass
class Corpus:
    paths: list[Path]
    labels: np.ndarray  # class indices into EMOTIONS
    groups: np.ndarray  # actor ids
    feats: list[Features]
    augmented: dict[str, list[Features]]  # augmentation name -> features of every file's copy

    def lstm_training_set(self, idx: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """Sequences and labels of files ``idx`` plus those of their augmented copies."""
        sets = [self.feats, *self.augmented.values()]
        return [s[i].sequence for s in sets for i in idx], np.tile(self.labels[idx], len(sets))


@dataclass
class TrainConfig:
    folds: int = 5
    seed: int = 0
    rf_trees: int = 500
    lstm_units: int = 64
    epochs: int = 60
    patience: int = 8
    max_steps: int = 400  # 12 s windows of 30 ms steps
    limit_per_actor: int | None = None  # for quick runs and tests
    augment: tuple[str, ...] = AUGMENTATIONS


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


def _featurise(path: Path, augment: tuple[str, ...], seed: int) -> list[Features]:
    """Features of the recording and of each augmented copy (decoded once)."""
    tune_malloc()  # joblib's workers are fresh processes
    audio = decode(path, path.suffix.lstrip(".").lower(), SAMPLE_RATE, 600.0)
    return [extract(audio)] + [extract(augmentation.apply(name, audio, seed)) for name in augment]


def load_corpus(root: Path, limit_per_actor: int | None = None, augment: tuple[str, ...] = (),
                seed: int = 0, jobs: int = 2) -> Corpus:
    from joblib import Parallel, delayed

    items = list_ravdess(root, limit_per_actor)
    if not items:
        raise SystemExit(f"no RAVDESS-named audio under {root}")
    rows = Parallel(n_jobs=jobs, batch_size=16)(
        delayed(_featurise)(p, augment, seed * 100_003 + i) for i, (p, _, _) in enumerate(items))
    labels = np.array([EMOTIONS.index(e) for _, e, _ in items])
    groups = np.array([a for _, _, a in items])
    augmented = {name: [row[k + 1] for row in rows] for k, name in enumerate(augment)}
    return Corpus([p for p, _, _ in items], labels, groups, [row[0] for row in rows], augmented)


def seed_everything(seed: int) -> None:
    import keras
    import tensorflow as tf

    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def fit_rf(x: np.ndarray, y: np.ndarray, cfg: TrainConfig) -> dict[str, Any]:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x)
    rf = RandomForestClassifier(n_estimators=cfg.rf_trees, class_weight="balanced_subsample",
                                min_samples_leaf=1, max_features="sqrt", n_jobs=2,
                                random_state=cfg.seed)
    rf.fit(scaler.transform(x), y)
    return {"scaler": scaler, "rf": rf, "classes": list(EMOTIONS), "feature_version": FEATURE_VERSION}


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


def cross_validate(corpus: Corpus, cfg: TrainConfig) -> dict[str, Any]:
    """Out-of-fold probabilities and per-fold metrics for the RF, the LSTM and their ensemble."""
    from sklearn.model_selection import GroupKFold

    y, groups = corpus.labels, corpus.groups
    vectors = np.stack([f.vector for f in corpus.feats])
    seqs = [f.sequence for f in corpus.feats]
    oof = {"rf": np.zeros((len(y), len(EMOTIONS))), "lstm": np.zeros((len(y), len(EMOTIONS)))}
    folds: list[dict[str, Any]] = []
    for k, (train, test) in enumerate(GroupKFold(n_splits=cfg.folds).split(vectors, y, groups)):
        started = time.perf_counter()
        bundle = fit_rf(vectors[train], y[train], cfg)
        oof["rf"][test] = rf_proba(bundle, vectors[test])
        fit_idx, val_idx = _inner_split(groups[train], cfg.seed + k)
        tr, va = train[fit_idx], train[val_idx]
        # Augmented copies of the training actors only; the test actors are scored on originals.
        tr_seqs, tr_y = corpus.lstm_training_set(tr)
        model, info = fit_lstm(tr_seqs, tr_y, cfg, cfg.epochs, val=([seqs[i] for i in va], y[va]))
        oof["lstm"][test] = lstm.predict(model, [seqs[i] for i in test], np.asarray(info["seq_mean"], np.float32),
                                         np.asarray(info["seq_std"], np.float32), cfg.max_steps)
        folds.append({"fold": k, "test_actors": sorted(set(groups[test].tolist())),
                      "lstm_best_epoch": info["best_epoch"],
                      "rf": metrics(y[test], oof["rf"][test]),
                      "lstm": metrics(y[test], oof["lstm"][test]),
                      "seconds": round(time.perf_counter() - started, 1)})
        log.info("fold=%d actors=%s rf=%.3f lstm=%.3f", k, folds[-1]["test_actors"],
                 folds[-1]["rf"]["accuracy"], folds[-1]["lstm"]["accuracy"])
    return {"oof": oof, "folds": folds}


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


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:10]


def train(data_dir: Path, out_dir: Path, cfg: TrainConfig) -> dict[str, Any]:
    """Cross-validate, fit the final models on all actors, write artifacts and the manifest."""
    import joblib

    seed_everything(cfg.seed)
    tune_malloc()
    started = time.perf_counter()
    corpus = load_corpus(data_dir, cfg.limit_per_actor, cfg.augment, cfg.seed)
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
    bundle = fit_rf(np.stack([f.vector for f in corpus.feats]), y, cfg)
    seqs, labels = corpus.lstm_training_set(np.arange(len(y)))
    model, info = fit_lstm(seqs, labels, cfg, final_epochs)
    out_dir.mkdir(parents=True, exist_ok=True)
    joblib.dump(bundle, out_dir / "rf.joblib", compress=3)
    model.save(out_dir / "lstm.keras")
    manifest = {
        "feature_version": FEATURE_VERSION,
        "sample_rate": SAMPLE_RATE,
        "classes": list(EMOTIONS),
        "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "seed": cfg.seed,
        "data": {"corpus": "RAVDESS speech", "actors": sorted(set(corpus.groups.tolist())),
                 "files": len(corpus.paths), "calm": "merged into neutral"},
        "config": {k: v for k, v in vars(cfg).items()},
        "cv": {
            "protocol": f"GroupKFold({cfg.folds}) by actor; LSTM early stopping on 2 training actors; "
                        f"LSTM also on augmented copies ({', '.join(cfg.augment) or 'none'}) of training actors",
            "folds": cv["folds"],
            "rf": summarize(cv["folds"], "rf", y, oof["rf"]),
            "lstm": summarize(cv["folds"], "lstm", y, oof["lstm"]),
            "ensemble": summarize(cv["folds"], "ensemble", y, ens),
            "ensemble_nested": _nested_summary(y, oof, corpus.groups, cv["folds"]),
        },
        "ensemble": {"weights": {"rf": w, "lstm": round(1 - w, 2)}, "temperature": temperature,
                     "uncertain_threshold": threshold},
        "calibration": calibration,
        "models": {
            "rf": {"file": "rf.joblib", "version": f"rf-{FEATURE_VERSION}-{_digest(out_dir / 'rf.joblib')}",
                   "trees": cfg.rf_trees},
            "lstm": {"file": "lstm.keras",
                     "version": f"lstm-{FEATURE_VERSION}-{_digest(out_dir / 'lstm.keras')}",
                     "epochs": final_epochs, "max_steps": cfg.max_steps,
                     "seq_mean": info["seq_mean"], "seq_std": info["seq_std"]},
        },
        "training_seconds": round(time.perf_counter() - started, 1),
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    field = data_dir.parent / "indian_emospeech"
    if field.is_dir():
        manifest["cross_corpus"] = {"indian_emospeech": cross_corpus(field, out_dir)}
        (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    _plots(out_dir, classification(y, ens)["confusion"]["matrix"], calibration["curves"], manifest)
    return manifest


def cross_corpus(root: Path, models_dir: Path) -> dict[str, Any]:
    """The shipped models on a corpus they never saw, through ``ser evaluate``'s path."""
    from ser_shared.settings import Settings
    from worker.evaluation import analyse, labelled_files, report
    from worker.inference import Ensemble

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

        from worker.plots import confusion_png, reliability_png
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
