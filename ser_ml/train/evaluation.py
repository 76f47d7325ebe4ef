"""``ser evaluate``: score the served models on a folder of labelled recordings.

It runs the worker's own path (format sniffing, decoding, resampling, features, the ensemble with
its calibration and threshold, in chunks like a task), so what it measures is what the service
does. Labels come from file names: RAVDESS (``03-01-05-01-01-01-12.wav``, calm merged into
neutral) and the Indian EmoSpeech field recordings (``Env__word-condition-emotion-time-user.flac``).

With a condition other than ``clean`` (``ser_ml.conditions``: telephone, noise:10, reverb, ...)
each recording is decoded, degraded and written as a float WAV to a temporary folder, and the
worker's path analyses that copy: a robustness figure measured the same way as the clean one.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, overload

import numpy as np
import soundfile as sf

from ser_ml import conditions, metrics
from ser_ml.allocator import tune_malloc
from ser_ml.features import SAMPLE_RATE
from ser_ml.inference import Ensemble
from ser_ml.pipeline import JobInput, Outcome, run
from ser_shared.audio import decode, sniff_format
from ser_shared.emotions import EMOTIONS, parse_ravdess_name
from ser_shared.errors import AudioError
from ser_shared.formats import EXTENSIONS
from ser_shared.settings import Settings

AUDIO_SUFFIXES = frozenset(EXTENSIONS)
# The field recordings' self-reported labels; calm is neutral, as in RAVDESS.
FIELD_LABELS = {"calm": "neutral", "neutral": "neutral", "happy": "happy", "sad": "sad", "angry": "angry",
                "fearful": "fearful", "disgust": "disgust", "surprised": "surprised"}
# Babble talkers: at most this many recordings decoded at once, each cut to this many seconds
# (a folder of hour-long recordings must not be held in memory to make the noise for one).
BABBLE_CACHE = 32
BABBLE_MAX_S = 30.0


@dataclass(frozen=True)
class Labelled:
    path: Path
    emotion: str
    corpus: str
    speaker: str


def parse_field_name(path: Path | str) -> tuple[str, str] | None:
    """``(emotion, speaker)`` for an Indian EmoSpeech name, or None if the name does not match."""
    stem = Path(path).stem
    if "__" not in stem:
        return None
    parts = stem.split("__", 1)[1].split("-")
    if len(parts) < 5 or parts[2].lower() not in FIELD_LABELS:
        return None
    return FIELD_LABELS[parts[2].lower()], parts[-1][:12]


def label_of(path: Path) -> Labelled | None:
    ravdess = parse_ravdess_name(path)
    if ravdess is not None:
        return Labelled(path, ravdess[0], "ravdess", ravdess[1])
    field = parse_field_name(path)
    if field is not None:
        return Labelled(path, field[0], "indian_emospeech", field[1])
    return None


def labelled_files(root: Path) -> list[Labelled]:
    """Every labelled audio file under ``root``, sorted by path; unlabelled names are skipped."""
    found = (label_of(p) for p in sorted(root.rglob("*")) if p.suffix.lower() in AUDIO_SUFFIXES)
    return [item for item in found if item is not None]


def _job(item: Labelled) -> JobInput | Outcome:
    """A job input as the web tier would make it (format from the bytes), or the upload-time error."""
    try:
        with item.path.open("rb") as f:
            fmt = sniff_format(f.read(64))
    except AudioError as exc:
        return Outcome(uuid.uuid4(), error_code=exc.code, error_message=exc.message)
    return JobInput(uuid.uuid4(), item.path, fmt)


def condition_seed(path: Path) -> int:
    """The generator seed for a file's condition: from its name, so every run and machine agrees."""
    return int.from_bytes(hashlib.sha256(path.name.encode()).digest()[:8], "little")


class _Recordings(Sequence[np.ndarray]):
    """Recordings as a babble pool, each decoded only if the noise draws it (a few per file)."""

    def __init__(self, paths: list[Path], load: Callable[[Path], np.ndarray]) -> None:
        self._paths, self._load = paths, load

    def __len__(self) -> int:
        return len(self._paths)

    @overload
    def __getitem__(self, index: int) -> np.ndarray: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[np.ndarray]: ...
    def __getitem__(self, index: int | slice) -> np.ndarray | Sequence[np.ndarray]:
        if isinstance(index, slice):
            return _Recordings(self._paths[index], self._load)
        return self._load(self._paths[index])


def _babble_pools(items: list[Labelled], settings: Settings) -> Callable[[Labelled], Sequence[np.ndarray]]:
    """Each item's babble: the folder's other speakers, or its other files where there is one speaker."""

    @lru_cache(maxsize=BABBLE_CACHE)
    def load(path: Path) -> np.ndarray:
        try:
            with path.open("rb") as f:
                fmt = sniff_format(f.read(64))
            audio = decode(path, fmt, SAMPLE_RATE, settings.max_duration_s)
        except AudioError:
            return np.zeros(0, dtype=np.float32)  # a broken file talks no babble; conditions skip it
        return audio[: int(BABBLE_MAX_S * SAMPLE_RATE)].copy()

    def pool(item: Labelled) -> Sequence[np.ndarray]:
        others = [i.path for i in items if i.speaker != item.speaker]
        return _Recordings(others or [i.path for i in items if i.path != item.path], load)

    return pool


def _conditioned_job(item: Labelled, condition: str, babble: Sequence[np.ndarray], settings: Settings,
                     folder: Path) -> JobInput | Outcome:
    """The job for ``item`` under ``condition``: its decoded audio, degraded, as a float WAV in ``folder``."""
    job = _job(item)
    if isinstance(job, Outcome):
        return job
    try:
        audio = decode(item.path, job.format, SAMPLE_RATE, settings.max_duration_s)
    except AudioError as exc:
        return Outcome(job.id, error_code=exc.code, error_message=exc.message)
    degraded = conditions.apply(condition, audio, np.random.default_rng(condition_seed(item.path)), babble)
    path = folder / f"{job.id}.wav"
    # FLOAT keeps the degradation exactly (16-bit would add its own quantisation noise).
    sf.write(path, degraded, SAMPLE_RATE, subtype="FLOAT")
    return JobInput(job.id, path, "wav")


Prepare = Callable[[Labelled], JobInput | Outcome]
Release = Callable[[list[JobInput]], None]


def _keep(jobs: list[JobInput]) -> None:
    """Jobs on the user's own files: nothing to remove."""


@contextmanager
def _preparation(items: list[Labelled], condition: str, settings: Settings) -> Iterator[tuple[Prepare, Release]]:
    """How each item becomes a job, and how a chunk's jobs are let go once analysed.

    ``clean`` jobs point at the files as uploaded; other conditions' at degraded copies, deleted
    chunk by chunk so that one chunk's copies at most are on disk.
    """
    if conditions.parse(condition).kind == "clean":
        yield _job, _keep
        return
    pools = _babble_pools(items, settings)
    with tempfile.TemporaryDirectory(prefix="ser-evaluate-") as name:
        folder = Path(name)

        def release(jobs: list[JobInput]) -> None:
            for job in jobs:
                if job.path.parent == folder:  # never a file of the folder under evaluation
                    job.path.unlink(missing_ok=True)

        yield (lambda item: _conditioned_job(item, condition, pools(item), settings, folder)), release


def analyse(ensemble: Ensemble, items: list[Labelled], settings: Settings, chunk: int = 32,
            condition: str = "clean") -> list[Outcome]:
    """One outcome per item, in order, computed in chunks exactly as a worker task does."""
    outcomes: list[Outcome] = []
    with _preparation(items, condition, settings) as (prepare, release):
        for start in range(0, len(items), chunk):
            prepared = [prepare(item) for item in items[start : start + chunk]]
            jobs = [p for p in prepared if isinstance(p, JobInput)]
            done = iter(run(ensemble, jobs, settings))
            outcomes.extend(p if isinstance(p, Outcome) else next(done) for p in prepared)
            release(jobs)
    return outcomes


def _probs(outcomes: list[Outcome], key: str) -> np.ndarray:
    rows = []
    for o in outcomes:
        assert o.prediction is not None
        source = o.prediction.probabilities if key == "ensemble" else o.prediction.model_probabilities[key]
        rows.append([source[c] for c in EMOTIONS])
    return np.asarray(rows, dtype=np.float64)


def report(ensemble: Ensemble, items: list[Labelled], outcomes: list[Outcome], root: Path,
           condition: str = "clean") -> dict[str, Any]:
    """The evaluation report: metrics over the recordings that were analysed, plus the failures."""
    ok = [(item, o) for item, o in zip(items, outcomes, strict=True) if o.prediction is not None]
    failed = [(item, o) for item, o in zip(items, outcomes, strict=True) if o.prediction is None]
    y = np.array([EMOTIONS.index(item.emotion) for item, _ in ok], dtype=int)
    result: dict[str, Any] = {"root": str(root), "condition": condition, "n": len(ok), "n_failed": len(failed)}
    if not ok:
        return {**result, "accuracy": None, "balanced_accuracy": None, "macro_f1": None, "per_class": {},
                "confusion": {"labels": list(EMOTIONS), "matrix": []}}
    served = [o for _, o in ok]
    ens = _probs(served, "ensemble")
    result.update(metrics.classification(y, ens))
    result["labels_present"] = [c for c in EMOTIONS if (y == EMOTIONS.index(c)).any()]
    # A corpus with fewer labels (the field recordings have four): the same predictions with the
    # argmax taken over its labels only, i.e. as if the service knew which four were possible.
    present = [EMOTIONS.index(c) for c in result["labels_present"]]
    within = np.asarray(present)[ens[:, present].argmax(axis=1)]
    result["accuracy_within_present_labels"] = float(np.mean(within == y))
    result["models"] = {m: {k: v for k, v in metrics.classification(y, _probs(served, m)).items()
                            if k in ("accuracy", "balanced_accuracy", "macro_f1")} for m in ("rf", "lstm")}
    result["model_versions"] = ensemble.versions
    result["calibration"] = metrics.reliability(y, ens)
    flagged = np.array([o.prediction.uncertain for o in served if o.prediction is not None])
    right = ens.argmax(axis=1) == y
    result["uncertain"] = {
        "threshold": ensemble.threshold, "share": round(float(flagged.mean()), 4),
        "accuracy_when_certain": round(float(right[~flagged].mean()), 4) if (~flagged).any() else None,
        "accuracy_when_uncertain": round(float(right[flagged].mean()), 4) if flagged.any() else None,
    }
    result["corpora"] = {c: sum(1 for item, _ in ok if item.corpus == c) for c in sorted({i.corpus for i, _ in ok})}
    result["files"] = [
        {"path": str(item.path.relative_to(root)), "label": item.emotion, "predicted": o.prediction.emotion,
         "confidence": o.prediction.confidence, "uncertain": o.prediction.uncertain}
        for item, o in ok if o.prediction is not None
    ]
    result["failures"] = [{"path": str(item.path.relative_to(root)), "code": o.error_code,
                           "message": o.error_message} for item, o in failed]
    return result


def summary(rep: dict[str, Any]) -> str:
    """A human-readable table of the report."""
    if not rep["n"]:
        return f"no recording could be analysed ({rep['n_failed']} failed), condition {rep['condition']}"
    lines = [f"{rep['n']} recordings ({rep['n_failed']} failed) under {rep['root']}, condition {rep['condition']}",
             f"accuracy {rep['accuracy']:.3f}   balanced accuracy {rep['balanced_accuracy']:.3f}   "
             f"macro-F1 {rep['macro_f1']:.3f}   ECE {rep['calibration']['ece']:.3f}",
             "  ".join(f"{m} accuracy {v['accuracy']:.3f}" for m, v in rep["models"].items()),
             f"{'class':10s} {'precision':>9s} {'recall':>7s} {'f1':>6s} {'support':>8s}"]
    for name, row in rep["per_class"].items():
        if row["support"] or row["predicted"]:
            lines.append(f"{name:10s} {row['precision']:9.3f} {row['recall']:7.3f} {row['f1']:6.3f} "
                         f"{row['support']:8d}")
    u = rep["uncertain"]
    lines.append(f"uncertain below {u['threshold']}: {u['share']:.1%} of recordings; accuracy when certain "
                 f"{u['accuracy_when_certain']}, when uncertain {u['accuracy_when_uncertain']}")
    return "\n".join(lines)


def evaluate(root: Path, models_dir: Path, settings: Settings, json_path: Path | None = None,
             condition: str = "clean") -> dict[str, Any]:
    """Score the models in ``models_dir`` on the labelled recordings under ``root``; write the JSON
    report to ``json_path`` if given. Raises SystemExit when ``root`` holds no labelled recording."""
    conditions.parse(condition)  # a bad name fails before the models load
    tune_malloc()  # as in a worker process
    items = labelled_files(root)
    if not items:
        raise SystemExit(f"no labelled recordings (RAVDESS or Indian EmoSpeech names) under {root}")
    ensemble = Ensemble.load(models_dir)
    rep = report(ensemble, items, analyse(ensemble, items, settings, condition=condition), root, condition)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(rep, indent=2) + "\n")
    return rep


def plot_confusion(rep: dict[str, Any], path: Path) -> None:
    """The report's confusion matrix as a PNG (nothing when no recording was analysed); raises
    ``ser_ml.train.plots.PlotsUnavailable`` without matplotlib."""
    if not rep["n"]:
        return
    from ser_ml.train.plots import confusion_png

    confusion_png(np.asarray(rep["confusion"]["matrix"]), list(EMOTIONS), path,
                  title=f"{Path(rep['root']).name} ({rep['condition']}): accuracy {rep['accuracy']:.3f}, "
                        f"macro-F1 {rep['macro_f1']:.3f}")
