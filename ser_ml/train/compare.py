"""``ser compare``: classical classifiers side by side on ``ser train``'s features and folds.

Every model sees exactly what the served RandomForest sees in ``ser train``'s cross-validation:
the 768-value encoder vector of each recording (``load_corpus``, the same training copies drawn
with the same seeds), the same GroupKFold-by-actor folds (``actor_folds``), training rows from the
training actors' recordings and their degraded copies (``Corpus.training_set``), and a test fold of
the test actors' clean originals. No actor is ever on both sides of a fold.

Hyper-parameters are fixed (below, with the reasons); nothing is tuned, so no choice is made on a
test fold. The report (``report.json``, ``report.md``, one confusion PNG per model) gives each
model's out-of-fold accuracy, macro-F1, per-class precision/recall/F1 and its fit and predict time.
It is a command of its own (``ser compare``), not ``ser train --compare``: it writes a report and never
touches the models folder, and it shares ``ser train``'s options for the features and the folds.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from ser_ml.features import Features
from ser_ml.metrics import classification
from ser_ml.speech_features import FEATURE_VERSION, WHISPER_MODEL
from ser_ml.train.training import RECIPES, Corpus, actor_folds, build_encoder, list_ravdess, load_corpus, rf_pipeline
from ser_shared.emotions import EMOTIONS

log = logging.getLogger(__name__)

MODEL_NAMES: tuple[str, ...] = ("svm", "knn", "logreg", "hgb", "mlp", "rf")
CACHE_VERSION = 1


@dataclass
class CompareConfig:
    folds: int = 5
    seed: int = 0
    rf_trees: int = 300
    augment: tuple[str, ...] = RECIPES
    limit_per_actor: int | None = None
    models: tuple[str, ...] = MODEL_NAMES
    quick: bool = False  # small settings for smoke tests: the figures are not comparable
    cache: Path | None = None  # where to keep the features between runs
    jobs: int = 2


@dataclass(frozen=True)
class Candidate:
    name: str
    title: str
    why: str  # the reason for its fixed settings, for the report
    build: Callable[[], Any] = field(repr=False)  # a fresh, unfitted estimator


def candidates(cfg: CompareConfig) -> dict[str, Candidate]:
    """The models, each a fresh scikit-learn estimator per fold, with fixed hyper-parameters.

    Scaling is part of each pipeline, so it too is fitted on the training rows only. Where the
    estimator supports it, classes are weighted (neutral has 12 files per actor, the others 8).
    """
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    seed, quick = cfg.seed, cfg.quick
    # Each training recording comes with one copy per recipe, near-duplicates of it: k counts
    # five recordings' worth of rows, or the vote is one recording's copies agreeing with themselves.
    k = 5 * (1 + len(cfg.augment))
    rounds, hidden, epochs, trees = (20, 64, 30, 20) if quick else (200, 256, 200, cfg.rf_trees)
    all_models = [
        Candidate("svm", "SVM (RBF kernel)", "scikit-learn defaults (C=1, gamma='scale'), balanced class weights",
                  lambda: make_pipeline(StandardScaler(), SVC(kernel="rbf", C=1.0, gamma="scale",
                                                              class_weight="balanced", random_state=seed))),
        Candidate("knn", "k-nearest neighbours", f"k={k} (5 recordings × their {1 + len(cfg.augment)} rows), "
                  "distance-weighted, Euclidean on standardised features",
                  lambda: make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=k, weights="distance"))),
        Candidate("logreg", "logistic regression", "L2, C=1 (scikit-learn default), balanced class weights",
                  lambda: make_pipeline(StandardScaler(), LogisticRegression(
                      C=1.0, class_weight="balanced", max_iter=300 if quick else 3000, random_state=seed))),
        # No class weights here: with them, scikit-learn's boosting fitted about 6 times slower on
        # these 768 features (timed on one fold before any result), and the imbalance is mild.
        Candidate("hgb", "gradient boosting (histogram)", f"{rounds} rounds of 31-leaf trees at rate 0.1 "
                  "(scikit-learn's defaults otherwise; no early stopping: its validation split would be "
                  "random, not by actor), no class weights",
                  lambda: HistGradientBoostingClassifier(
                      max_iter=rounds, learning_rate=0.1, max_leaf_nodes=31, early_stopping=False,
                      random_state=seed)),
        Candidate("mlp", "MLP", f"one hidden layer of {hidden} ReLU units, Adam, L2 1e-3, up to {epochs} epochs "
                  "(no early stopping: a random validation split would hold copies of training recordings)",
                  lambda: make_pipeline(StandardScaler(), MLPClassifier(
                      hidden_layer_sizes=(hidden,), alpha=1e-3, max_iter=epochs, random_state=seed))),
        Candidate("rf", "RandomForest (served pipeline)", f"`ser train`'s own: scaler → shrinkage LDA (6 "
                  f"directions) → {trees} trees, min_samples_leaf=4, balanced class weights",
                  lambda: rf_pipeline(trees, seed)),
    ]
    known = {c.name: c for c in all_models}
    unknown = [m for m in cfg.models if m not in known]
    if unknown:
        raise ValueError(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODEL_NAMES)}")
    return {m: known[m] for m in cfg.models}


# --- features: `ser train`'s, optionally kept in a file between runs --------------------------------


def _cache_key(data_dir: Path, cfg: CompareConfig, encoder_sha: str) -> dict[str, Any]:
    """Everything the features depend on: a cache made under another key is not used."""
    names = [p.name for p, _, _ in list_ravdess(data_dir, cfg.limit_per_actor)]
    return {"cache_version": CACHE_VERSION, "feature_version": FEATURE_VERSION, "encoder_sha256": encoder_sha,
            "data": str(data_dir.resolve()), "files": names, "augment": list(cfg.augment), "seed": cfg.seed,
            "folds": cfg.folds, "limit_per_actor": cfg.limit_per_actor}


def _save_cache(path: Path, key: dict[str, Any], corpus: Corpus) -> None:
    """Write the corpus's vectors (clean and each training copy) with the key they were made under."""
    copies = enumerate(corpus.augmented.values())
    arrays: dict[str, Any] = {f"copy_{i}": np.stack([f.vector for f in feats]) for i, feats in copies}
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:  # a file object, so numpy does not append its own suffix
        np.savez_compressed(out, key=np.array(json.dumps(key)), paths=np.array([str(p) for p in corpus.paths]),
                            labels=corpus.labels, groups=corpus.groups,
                            clean=np.stack([f.vector for f in corpus.feats]),
                            durations=np.array([f.duration_s for f in corpus.feats]), **arrays)


def _vector_only(vectors: np.ndarray, durations: np.ndarray) -> list[Features]:
    empty = np.zeros((0, 0), np.float32)  # the comparison never reads the LSTM's sequences
    return [Features(v, empty, float(d)) for v, d in zip(vectors, durations, strict=True)]


def _load_cache(path: Path, key: dict[str, Any]) -> Corpus | None:
    """The cached corpus (vectors only), or None when there is none or it was made under another key."""
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        if json.loads(str(z["key"])) != key:
            log.info("feature cache path=%s made with other data or settings: recomputing", path)
            return None
        durations = z["durations"]
        copies = {name: _vector_only(z[f"copy_{i}"], durations) for i, name in enumerate(key["augment"])}
        return Corpus([Path(p) for p in z["paths"]], z["labels"], z["groups"], _vector_only(z["clean"], durations),
                      copies)


def features(data_dir: Path, cfg: CompareConfig) -> tuple[Corpus, dict[str, Any]]:
    """``ser train``'s corpus (clean recordings and their training copies), from the cache when it fits."""
    from ser_ml.encoder import WhisperEncoder

    with tempfile.TemporaryDirectory() as tmp:
        encoder_path, encoder_sha, _ = build_encoder(Path(tmp))  # the same artifact `ser train` builds
        key = _cache_key(data_dir, cfg, encoder_sha) if cfg.cache else {}
        corpus = _load_cache(cfg.cache, key) if cfg.cache else None
        info: dict[str, Any] = {"feature_version": FEATURE_VERSION, "encoder": f"Whisper {WHISPER_MODEL}",
                                "encoder_sha256": encoder_sha, "training_copies": list(cfg.augment),
                                "cache": "used" if corpus else ("written" if cfg.cache else "off")}
        if corpus is not None:
            return corpus, info
        started = time.perf_counter()
        encoder = WhisperEncoder.load(encoder_path, encoder_sha)
        corpus = load_corpus(data_dir, encoder, cfg.limit_per_actor, cfg.augment, (), cfg.seed, cfg.folds, cfg.jobs)
        info["extraction_seconds"] = round(time.perf_counter() - started, 1)
    if cfg.cache:
        _save_cache(cfg.cache, key, corpus)
    return corpus, info


# --- cross-validation ------------------------------------------------------------------------------


def _one_hot(pred: np.ndarray) -> np.ndarray:
    return np.eye(len(EMOTIONS))[np.asarray(pred, dtype=int)]


def _fit_predict(candidate: Candidate, x: np.ndarray, y: np.ndarray, x_test: np.ndarray
                 ) -> tuple[np.ndarray, float, float, list[str]]:
    """Fit a fresh estimator, predict the test rows; returns predictions, fit and predict seconds
    and the warnings raised (convergence warnings belong in the report, not on the terminal)."""
    model = candidate.build()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        started = time.perf_counter()
        model.fit(x, y)
        fitted = time.perf_counter()
        pred = model.predict(x_test)
        done = time.perf_counter()
    return np.asarray(pred), fitted - started, done - fitted, sorted({str(w.message)[:200] for w in caught})


def _fold_plan(corpus: Corpus, cfg: CompareConfig) -> list[dict[str, Any]]:
    """Each fold's indices and the actors on each side, as the models will see them."""
    plan = []
    for k, (train, test) in enumerate(actor_folds(corpus.groups, cfg.folds)):
        _, rows_y = corpus.training_set(train)
        plan.append({"fold": k, "train": train, "test": test,
                     "test_actors": sorted(set(corpus.groups[test].tolist())),
                     "train_actors": sorted(set(corpus.groups[train].tolist())),
                     "test_files": int(test.size), "train_rows": int(rows_y.size)})
    return plan


def cross_validate(corpus: Corpus, cfg: CompareConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every model on every fold; returns the fold plan and each model's out-of-fold results."""
    plan = _fold_plan(corpus, cfg)
    models = candidates(cfg)
    y = corpus.labels
    clean = np.stack([f.vector for f in corpus.feats])
    oof = {m: np.full(len(y), -1) for m in models}
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in models}
    for fold in plan:
        feats, rows_y = corpus.training_set(fold["train"])
        x = np.stack([f.vector for f in feats])
        test = fold["test"]
        for name, candidate in models.items():
            pred, fit_s, predict_s, caught = _fit_predict(candidate, x, rows_y, clean[test])
            oof[name][test] = pred
            scores = classification(y[test], _one_hot(pred))
            runs[name].append({"fold": fold["fold"], "accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"],
                               "fit_seconds": round(fit_s, 3), "predict_seconds": round(predict_s, 4),
                               "warnings": caught})
            log.info("fold=%d model=%s accuracy=%.3f macro_f1=%.3f fit_s=%.1f", fold["fold"], name,
                     scores["accuracy"], scores["macro_f1"], fit_s)
    results = {name: _summary(models[name], y, oof[name], runs[name]) for name in models}
    return plan, results


def _summary(candidate: Candidate, y: np.ndarray, pred: np.ndarray, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Pooled out-of-fold metrics, their spread over folds, and the times."""
    pooled = classification(y, _one_hot(pred))
    acc, f1 = [r["accuracy"] for r in runs], [r["macro_f1"] for r in runs]
    fit, predict = [r["fit_seconds"] for r in runs], [r["predict_seconds"] for r in runs]
    return {
        "title": candidate.title, "settings": candidate.why, "estimator": " ".join(repr(candidate.build()).split()),
        "accuracy": pooled["accuracy"], "balanced_accuracy": pooled["balanced_accuracy"],
        "macro_f1": pooled["macro_f1"],
        "accuracy_fold_mean": float(np.mean(acc)), "accuracy_fold_std": float(np.std(acc)),
        "macro_f1_fold_mean": float(np.mean(f1)), "macro_f1_fold_std": float(np.std(f1)),
        "per_class": pooled["per_class"], "confusion": pooled["confusion"],
        "fit_seconds_per_fold": float(np.mean(fit)), "predict_seconds_per_fold": float(np.mean(predict)),
        "predict_ms_per_clip": float(1000 * sum(predict) / len(y)),
        "folds": [{k: v for k, v in r.items() if k != "warnings"} for r in runs],
        "warnings": sorted({w for r in runs for w in r["warnings"]}),
    }


# --- the report ------------------------------------------------------------------------------------


def command_line(data_dir: Path, out_dir: Path, cfg: CompareConfig) -> str:
    """The ``ser compare`` command that makes this report again (with the thread limit it ran under)."""
    threads = os.environ.get("OMP_NUM_THREADS")
    parts = [f"OMP_NUM_THREADS={threads} ser compare" if threads else "ser compare", f"--data {data_dir}",
             f"--out {out_dir}", f"--folds {cfg.folds}", f"--seed {cfg.seed}",
             f"--trees {cfg.rf_trees}", f"--augment {','.join(cfg.augment) or 'none'}"]
    if cfg.limit_per_actor is not None:
        parts.append(f"--limit-per-actor {cfg.limit_per_actor}")
    if tuple(cfg.models) != MODEL_NAMES:
        parts.append(f"--models {','.join(cfg.models)}")
    if cfg.quick:
        parts.append("--quick")
    return " ".join(parts)


def compare(data_dir: Path, out_dir: Path, cfg: CompareConfig) -> dict[str, Any]:
    """Cross-validate every model on ``ser train``'s features and folds; write report.json,
    report.md and the confusion matrices to ``out_dir``; returns the report.

    Raises ValueError for an unknown model name, SystemExit when ``data_dir`` holds no RAVDESS audio.
    """
    candidates(cfg)  # an unknown model name fails before minutes of feature extraction
    started = time.perf_counter()
    corpus, feature_info = features(data_dir, cfg)
    plan, results = cross_validate(corpus, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = _images(out_dir, results)
    y = corpus.labels
    report = {
        "command": command_line(data_dir, out_dir, cfg),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": cfg.quick,
        "data": {"corpus": "RAVDESS speech", "root": str(data_dir), "files": len(y),
                 "actors": sorted(set(corpus.groups.tolist())), "classes": list(EMOTIONS),
                 "files_per_class": {c: int((y == i).sum()) for i, c in enumerate(EMOTIONS)}},
        "features": feature_info | {"vector_dim": int(corpus.feats[0].vector.size)},
        "protocol": {"description": _protocol(cfg), "folds": [{k: v for k, v in f.items() if k not in ("train", "test")}
                                                            for f in plan]},
        "hyperparameters": "fixed before the run (see each model's settings); nothing tuned, on any fold",
        "machine": _machine(),
        "images": images,
        "models": results,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "report.md").write_text(markdown(report))
    return report


def _protocol(cfg: CompareConfig) -> str:
    copies = ", ".join(cfg.augment) or "none"
    return (f"GroupKFold({cfg.folds}) by actor, `ser train`'s own folds (`actor_folds`): no actor is in both the "
            f"training and the test side of a fold. Each model is trained on the training actors' recordings plus "
            f"one degraded copy of each per recipe ({copies}; babble only from actors of the same fold), as `ser "
            f"train` trains the RandomForest, and tested on the test actors' clean recordings. Scores are pooled "
            f"over the out-of-fold predictions of all files, and also given per fold (mean ± standard deviation).")


def _machine() -> dict[str, Any]:
    """What the times were measured on: CPUs, load, and the thread pools the models could use."""
    import sklearn
    from threadpoolctl import threadpool_info

    pools = {f"{p['internal_api']}_threads": p["num_threads"] for p in threadpool_info()}
    threads = ", ".join(f"{k.removesuffix('_threads')} {v}" for k, v in sorted(pools.items()))
    return {"cpus": os.cpu_count(), "scikit_learn": sklearn.__version__,
            "load_average_1min_at_end": round(os.getloadavg()[0], 2), **pools,
            "timing": f"wall-clock seconds on this machine; thread pools: {threads or 'none found'}; the "
                      "RandomForest fits and predicts with 2 joblib threads (n_jobs=2, as served)"}


def _images(out_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """One confusion-matrix PNG per model, when matplotlib (the ``train`` extra) is installed."""
    try:
        import matplotlib  # noqa: F401

        from ser_ml.train.plots import confusion_png
    except ImportError:
        log.warning("matplotlib not installed: no confusion-matrix images (pip install -e '.[train]')")
        return {"written": False, "reason": "matplotlib not installed (pip install -e '.[train]')"}
    for name, r in results.items():
        r["image"] = f"confusion-{name}.png"
        confusion_png(np.asarray(r["confusion"]["matrix"]), list(EMOTIONS), out_dir / r["image"],
                      title=f"{r['title']}: out-of-fold accuracy {r['accuracy']:.3f}")
    return {"written": True}


def _ranked(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return sorted(report["models"].items(), key=lambda kv: -kv[1]["macro_f1_fold_mean"])


def _results_table(report: dict[str, Any]) -> list[str]:
    lines = ["| model | accuracy (mean ± std over folds) | macro-F1 (mean ± std) | pooled accuracy | pooled macro-F1 "
             "| fit s per fold | predict ms per clip |", "|---|---|---|---|---|---|---|"]
    for _, r in _ranked(report):
        lines.append(f"| {r['title']} | {r['accuracy_fold_mean']:.3f} ± {r['accuracy_fold_std']:.3f} "
                     f"| {r['macro_f1_fold_mean']:.3f} ± {r['macro_f1_fold_std']:.3f} | {r['accuracy']:.3f} "
                     f"| {r['macro_f1']:.3f} | {r['fit_seconds_per_fold']:.2f} | {r['predict_ms_per_clip']:.3f} |")
    return lines


def _fold_table(report: dict[str, Any]) -> list[str]:
    ranked = _ranked(report)
    lines = ["| test actors | " + " | ".join(r["title"] for _, r in ranked) + " |",
             "|---|" + "---|" * len(ranked)]
    for k, fold in enumerate(report["protocol"]["folds"]):
        cells = [f"{r['folds'][k]['accuracy']:.3f}" for _, r in ranked]
        lines.append(f"| {', '.join(fold['test_actors'])} | " + " | ".join(cells) + " |")
    return lines


def _class_table(report: dict[str, Any]) -> list[str]:
    ranked = _ranked(report)
    lines = ["| class (files) | " + " | ".join(r["title"] for _, r in ranked) + " |",
             "|---|" + "---|" * len(ranked)]
    for c in EMOTIONS:
        if report["data"]["files_per_class"][c] == 0:  # e.g. a subset without this class
            lines.append(f"| {c} (0) | " + " | ".join("—" for _ in ranked) + " |")
            continue
        cells = [f"{r['per_class'][c]['precision']:.2f} / {r['per_class'][c]['recall']:.2f} / "
                 f"{r['per_class'][c]['f1']:.2f}" for _, r in ranked]
        lines.append(f"| {c} ({report['data']['files_per_class'][c]}) | " + " | ".join(cells) + " |")
    return lines


def _images_section(report: dict[str, Any]) -> list[str]:
    if not report["images"]["written"]:
        return [f"Images were skipped: {report['images']['reason']}."]
    return [f"![{r['title']}]({r['image']})" for _, r in _ranked(report)]


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: protocol, the results table, per fold, per class, settings, images."""
    d, feats = report["data"], report["features"]
    actors = d["actors"]
    lines = [
        "# Classical model comparison", "",
        f"Made by `{report['command']}` ({report['created_at']}, {report['seconds']:.0f} s in all).", "",
    ]
    if report["quick"]:
        lines += ["**Quick run** (`--quick`): small settings for a smoke test; these figures are not comparable.", ""]
    lines += [
        "## Data, features and protocol",
        f"- **Data**: {d['corpus']}, {d['files']} files of {len(actors)} actors ({actors[0]}–{actors[-1]}); "
        "calm counted as neutral; " + ", ".join(f"{c} {n}" for c, n in d["files_per_class"].items()) + ".",
        f"- **Features**: `ser train`'s ({feats['feature_version']}): the mean and standard deviation of the "
        f"second block of {feats['encoder']}'s encoder, {feats['vector_dim']} values per recording "
        + (f"(extracted in {feats['extraction_seconds']:.0f} s)." if "extraction_seconds" in feats
           else "(read from a feature cache made by the same code, data and settings)."),
        f"- **Folds**: {report['protocol']['description']}",
        f"- **Hyper-parameters**: {report['hyperparameters']}.",
        f"- **Timing**: {report['machine']['timing']} ({report['machine']['cpus']} CPUs, scikit-learn "
        f"{report['machine']['scikit_learn']}; 1-minute load average at the end "
        f"{report['machine']['load_average_1min_at_end']}: other work on the machine slows every model). "
        "Fit time is per fold; predict time is per test clip "
        "(a fold's clips predicted in one call). Compare times within one report only.", "",
        "## Results (unseen actors, clean recordings; sorted by macro-F1)", "", *_results_table(report), "",
        "### Accuracy per fold", "", *_fold_table(report), "",
        "### Per class: precision / recall / F1 (out of fold, all files)", "", *_class_table(report), "",
        "## Models and their settings", "",
    ]
    for name, r in report["models"].items():
        lines.append(f"- **{r['title']}** (`{name}`): {r['settings']}.  \n  `{r['estimator']}`")
        lines += [f"  - warning: {w}" for w in r["warnings"]]
    lines += ["", "## Confusion matrices (out of fold, rows: true class)", "", *_images_section(report), ""]
    return "\n".join(lines)


def summary(report: dict[str, Any]) -> str:
    """A few lines for the terminal: each model's accuracy and macro-F1, and where the report is."""
    lines = [f"speaker-independent comparison ({len(report['protocol']['folds'])} folds by actor, "
             f"{report['data']['files']} files):"]
    for name, r in _ranked(report):
        lines.append(f"  {name:7s} accuracy {r['accuracy_fold_mean']:.3f} ± {r['accuracy_fold_std']:.3f}  "
                     f"macro-F1 {r['macro_f1_fold_mean']:.3f} ± {r['macro_f1_fold_std']:.3f}  "
                     f"fit {r['fit_seconds_per_fold']:.1f} s/fold  predict {r['predict_ms_per_clip']:.3f} ms/clip")
    return "\n".join(lines)
