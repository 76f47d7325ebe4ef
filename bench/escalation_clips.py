"""Per-clip emotion predictions of RAVDESS for ``bench.escalation``: each clip's speech span and its
probabilities from the shipped ensemble and from models that never heard its actor.

    python -m bench.escalation_clips [--data ../shared/datasets/ravdess] [--out var/bench/escalation-clips.npz]

Two sources of probabilities, for every file of actors 01-20:

- ``shipped``: the served ensemble (``models/``) on the clip, as the worker analyses a short segment.
  The shipped models were trained on every one of these actors, so these are optimistic.
- ``heldout``: out-of-fold probabilities. The same recipe (scaler, LDA, RandomForest and the LSTM,
  combined with the shipped weight and temperature) retrained five times by the manifest's
  GroupKFold actor folds, each clip predicted by the models of the fold that held its actor out.
  These folds train on clean recordings only (no degraded copies, to keep the run to minutes), so
  their per-clip accuracy is a little below the shipped models' cross-validated figure.

The speech span is Silero's (``ser_ml.vad``): first onset to last offset, with the service's
segment padding added by ``bench.escalation`` when it places the clip on a call's timeline.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ser_shared.settings import REPO_ROOT

DEFAULT_DATA = REPO_ROOT.parent / "shared" / "datasets" / "ravdess"
DEFAULT_OUT = REPO_ROOT / "var" / "bench" / "escalation-clips.npz"
ACTORS = tuple(f"{a:02d}" for a in range(1, 21))
BLOCK = 64  # clips encoded per batch

log = logging.getLogger("bench.escalation_clips")


def _files(data: Path) -> list[Path]:
    files = sorted(p for a in ACTORS for p in (data / f"Actor_{a}").glob("03-01-*.flac"))
    if not files:
        raise SystemExit(f"no RAVDESS files under {data}/Actor_NN/03-01-*.flac (see --data)")
    return files


def _spans_and_features(files: list[Path], ensemble: object) -> tuple[np.ndarray, list[object]]:
    """Silero speech span (onset, offset, speech seconds) and the model features of every file."""
    from ser_ml import vad
    from ser_ml.encoder import SAMPLE_RATE
    from ser_ml.speech_features import speech_clip
    from ser_shared.audio import decode

    spans = np.zeros((len(files), 3), dtype=np.float64)
    feats: list[object] = []
    for start in range(0, len(files), BLOCK):
        clips = []
        for i, path in enumerate(files[start : start + BLOCK], start):
            audio = decode(path, "flac", SAMPLE_RATE, 600.0)
            regions = vad.speech_regions(audio) or [(0.0, audio.size / SAMPLE_RATE)]
            spans[i] = (regions[0][0], regions[-1][1], sum(e - s for s, e in regions))
            clips.append(speech_clip(audio))
        feats.extend(ensemble.features(clips))  # type: ignore[attr-defined]
        log.info("features %d/%d", start + len(clips), len(files))
    return spans, feats


def _heldout(feats: list[object], labels: np.ndarray, groups: np.ndarray, manifest: dict[str, object]
             ) -> np.ndarray:
    """Out-of-fold ensemble probabilities, the folds being the manifest's GroupKFold by actor."""
    from ser_ml.metrics import apply_temperature
    from ser_ml.train.training import Corpus, TrainConfig, cross_validate

    corpus = Corpus([], labels, groups, feats, augmented={})  # type: ignore[arg-type]
    cfg_info = manifest["config"]
    assert isinstance(cfg_info, dict)
    cfg = TrainConfig(folds=int(cfg_info["folds"]), seed=int(cfg_info["seed"]), augment=(), evaluate_conditions=())
    cv = cross_validate(corpus, cfg)
    for fold in cv["folds"]:
        log.info("fold %s actors=%s rf=%.3f lstm=%.3f", fold["fold"], fold["test_actors"],
                 fold["rf"]["accuracy"], fold["lstm"]["accuracy"])
    rule = manifest["ensemble"]
    assert isinstance(rule, dict)
    w = float(rule["weights"]["rf"])
    raw = w * cv["oof"]["rf"] + (1 - w) * cv["oof"]["lstm"]
    return np.asarray(apply_temperature(raw / raw.sum(axis=1, keepdims=True), float(rule["temperature"])))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--models", type=Path, default=REPO_ROOT / "models")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    from ser_ml.inference import Ensemble
    from ser_ml.train.training import seed_everything
    from ser_shared.emotions import EMOTIONS, parse_ravdess_name

    started = time.perf_counter()
    files = _files(args.data)
    ensemble = Ensemble.load(args.models)
    spans, feats = _spans_and_features(files, ensemble)
    shipped = ensemble.predict_proba(feats)["ensemble"]  # type: ignore[arg-type]
    parsed = [parse_ravdess_name(p) for p in files]
    labels = np.array([EMOTIONS.index(p[0]) for p in parsed if p is not None])
    groups = np.array([p[1] for p in parsed if p is not None])
    seed_everything(int(ensemble.manifest["config"]["seed"]))
    heldout = _heldout(feats, labels, groups, ensemble.manifest)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, files=np.array([p.name for p in files]), spans=spans,
                        shipped=shipped, heldout=heldout, classes=np.array(ensemble.classes))
    acc = {name: float((p.argmax(axis=1) == labels).mean()) for name, p in (("shipped", shipped),
                                                                          ("heldout", heldout))}
    log.info("wrote %s clips=%d accuracy=%s seconds=%.0f", args.out, len(files), acc,
             time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
