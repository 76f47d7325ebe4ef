"""Voice-activity detection: where ``has_speech``'s constant comes from, what it costs, and how the
trained detector's segment boundaries compare with the energy detector's.

    python -m bench.vad [--data ../shared/datasets] [--seeds 10] [--recordings 200] [--limit N]

1. **The rule.** ``has_speech`` is true when the longest speech region is at least
   ``HAS_SPEECH_S``. Measured: the longest region of every RAVDESS and Indian EmoSpeech file, clean
   and with white noise at 10 dB and 0 dB SNR, against the 15 kinds of ``tests/nonspeech.py``
   (``--seeds`` seeds of each, each at peaks 0.05, 0.1, 0.3, 0.8; peaks 0.02 and 1.0 reported
   apart) and the corpus's two "background" recordings (no word said; left out of the speech).
   The constant must lie above the most any non-speech reaches and, ideally, below the least any
   speech reaches; a trade-off table shows what each candidate lets through and refuses.
   SNR is against the speech's power: the mean power of the clean file's 10 ms frames within
   35 dB of its loudest frame (its speech, not its leading silence).
2. **Cost.** ms per 3.5 s of audio on one core: the model (median of interleaved rounds over
   100 clips), the rules after it, and ``speech_segments`` (which adds the frame energies).
3. **Boundaries.** Long recordings made of 6 RAVDESS clips each (all 1,200 files) with gaps of
   0.6–3 s of faint noise (1e-4 RMS) between them, clean and with white noise at 10 dB SNR. A
   clip's true speech runs from the first to the last of its clean 10 ms frames within 35 dB of
   its loudest (and, apart, 30 dB: 35 dB takes in a breath before some quiet clips). Each true
   region is matched to the detected segment overlapping it most; reported: |start| and |end|
   errors (median, p90) and the signed errors (negative: the segment starts or ends early),
   missed regions (no segment overlaps them), merged ones (sharing a segment with a neighbour),
   split ones (overlapped by more than one segment), and false segments (overlapping no region).
   The noise is set from the recording's mean speech power, so its quieter clips are under 10 dB.

Single-threaded, as the worker runs. Prints tables, then one JSON line.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy loads: one core per worker process, as served

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from ser_ml import vad
from ser_ml.segments import Segment, frame_energy_db, segments_from_energy
from ser_shared.settings import REPO_ROOT
from tests.nonspeech import KINDS, make, speech_power, with_noise

RATE = vad.SAMPLE_RATE
PEAKS = (0.05, 0.1, 0.3, 0.8)
OUTSIDE = (0.02, 1.0)  # fainter and louder than a realistic recording: reported apart
SNRS = (None, 10.0, 0.0)  # None: the file as it is
TRUTH_DB = (35.0, 30.0)  # 35 dB takes in breaths ~31 dB under some quiet clips' speech; 30 dB does not


def read(path: Path) -> np.ndarray:
    audio, rate = sf.read(path, dtype="float32", always_2d=True)
    if rate != RATE:
        raise SystemExit(f"{path}: {rate} Hz, expected {RATE}")
    return audio.mean(axis=1)


def truth_region(clean: np.ndarray, within_db: float) -> tuple[float, float]:
    """From the first to the last 10 ms frame of the clean clip within ``within_db`` of its loudest."""
    db = frame_energy_db(clean)
    loud = np.flatnonzero(db >= db.max() - within_db)
    step = vad.FRAME_S
    return float(loud[0] * step), float(min((loud[-1] + 1) * step, clean.size / RATE))


def q(values: list[float], p: float) -> float:
    return round(float(np.percentile(values, p)), 3) if values else float("nan")


# ---- 1. the rule ------------------------------------------------------------------------------

def _stats(probs: np.ndarray) -> tuple[float, float]:
    """(longest region, speech_seconds): what has_speech and the API report."""
    return vad.longest_region_s(np.zeros(0), probabilities=probs), vad.speech_seconds(np.zeros(0), probabilities=probs)


def measure_speech(files: dict[str, list[Path]]) -> dict[str, list[tuple[str, float, float]]]:
    """(file, longest region, speech seconds) per file, keyed by "corpus/condition"."""
    out: dict[str, list[tuple[str, float, float]]] = {}
    for corpus, paths in files.items():
        for k, path in enumerate(paths):
            clean = read(path)
            for snr in SNRS:
                audio = clean if snr is None else with_noise(clean, snr, seed=k)
                key = f"{corpus}/{'clean' if snr is None else f'snr{snr:g}'}"
                out.setdefault(key, []).append((path.name, *_stats(vad.speech_probabilities(audio))))
    return out


def measure_nonspeech(seeds: int, background: list[Path]) -> dict[str, list[tuple[str, float, float]]]:
    """The same for the generated kinds (peaks in PEAKS, and OUTSIDE as a separate group) and the
    Indian EmoSpeech "background" recordings (real places, no word said)."""
    out: dict[str, list[tuple[str, float, float]]] = {}
    for kind in KINDS:
        for seed in range(seeds):
            for peak in (*PEAKS, *OUTSIDE):
                key = kind if peak in PEAKS else f"{kind}@{'/'.join(f'{p:g}' for p in OUTSIDE)}"
                out.setdefault(key, []).append((f"seed {seed} peak {peak:g}",
                                                *_stats(vad.speech_probabilities(make(kind, seed, peak)))))
    for path in background:
        stats = _stats(vad.speech_probabilities(read(path)))
        out.setdefault("indian background (real)", []).append((path.name, *stats))
    return out


def tradeoff(speech: dict[str, list[tuple[str, float, float]]], nonspeech: dict[str, list[tuple[str, float, float]]],
             cutoffs: list[float]) -> list[dict[str, Any]]:
    """For each candidate HAS_SPEECH_S: non-speech let through, speech refused (by group)."""
    rows = []
    for x in cutoffs:
        row: dict[str, Any] = {"has_speech_s": x}
        row["nonspeech_passed"] = sum(v >= x for key, items in nonspeech.items() if "@" not in key for _, v, _ in items)
        row["nonspeech_outside_levels_passed"] = sum(v >= x for key, items in nonspeech.items() if "@" in key
                                                     for _, v, _ in items)
        for key, items in speech.items():
            row[key] = sum(v < x for _, v, _ in items)
        rows.append(row)
    return rows


# ---- 2. cost ----------------------------------------------------------------------------------

def cost(paths: list[Path], rounds: int = 5) -> dict[str, float]:
    clips = [read(p) for p in paths]
    seconds = sum(c.size for c in clips) / RATE
    vad.speech_probabilities(clips[0])  # warm
    methods: dict[str, Callable[[np.ndarray], object]] = {
        "speech_probabilities": vad.speech_probabilities,
        "has_speech": vad.has_speech,
        "speech_segments": vad.speech_segments,
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):  # interleaved, so a burst of load elsewhere hits all of them alike
        for name, method in methods.items():
            t = time.perf_counter()
            for clip in clips:
                method(clip)
            times[name].append((time.perf_counter() - t) * 1000 / seconds * 3.5)
    return {"clips": len(clips), "clip_s_mean": round(seconds / len(clips), 2),
            **{f"{name}_ms_per_3_5s": round(statistics.median(v), 2) for name, v in times.items()}}


# ---- 3. boundaries ----------------------------------------------------------------------------

Recording = tuple[np.ndarray, dict[float, list[tuple[float, float]]], float]


def long_recordings(paths: list[Path], per: int, count: int, seed: int = 0) -> list[Recording]:
    """(audio, true regions, mean speech power) for ``count`` recordings of ``per`` clips each."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(paths))[: per * count]
    out = []
    for r in range(len(order) // per):
        parts, powers, t = [], [], 0.0
        truth: dict[float, list[tuple[float, float]]] = {within: [] for within in TRUTH_DB}
        for i in order[r * per : (r + 1) * per]:
            gap = (rng.standard_normal(int(rng.uniform(0.6, 3.0) * RATE)) * 1e-4).astype(np.float32)
            clip = read(paths[i])
            parts += [gap, clip]
            t += gap.size / RATE
            for within in TRUTH_DB:
                start, end = truth_region(clip, within)
                truth[within].append((t + start, t + end))
            powers.append(speech_power(clip))
            t += clip.size / RATE
        parts.append((rng.standard_normal(RATE) * 1e-4).astype(np.float32))
        out.append((np.concatenate(parts), truth, float(np.mean(powers))))
    return out


def score(truth: list[tuple[float, float]], found: list[Segment]) -> dict[str, Any]:
    """Errors of the segments against the true regions of one recording."""
    def overlap(a: tuple[float, float], s: Segment) -> float:
        return max(0.0, min(a[1], s.end) - max(a[0], s.start))

    owners = [[j for j, s in enumerate(found) if overlap(region, s) > 0] for region in truth]
    def most_overlapping(candidates: list[int], region: tuple[float, float]) -> int | None:
        return max(candidates, key=lambda j: overlap(region, found[j])) if candidates else None

    best = [most_overlapping(o, region) for o, region in zip(owners, truth, strict=True)]
    starts: list[float] = []
    ends: list[float] = []
    missed = merged = 0
    for region, b in zip(truth, best, strict=True):
        if b is None:
            missed += 1
            continue
        if best.count(b) > 1:
            merged += 1  # one segment over this region and a neighbour: the boundary between them is gone
            continue
        starts.append(found[b].start - region[0])
        ends.append(found[b].end - region[1])
    return {"starts": starts, "ends": ends, "missed": missed, "merged": merged,
            "split": sum(len(o) > 1 for o in owners),
            "false": sum(1 for s in found if not any(overlap(r, s) > 0 for r in truth))}


def boundaries(recordings: list[Recording], pads: tuple[float, ...]) -> dict[str, dict[str, Any]]:
    def energy(audio: np.ndarray, _probs: np.ndarray) -> list[Segment]:
        return segments_from_energy(frame_energy_db(audio), audio.size / RATE)

    def silero(pad: float) -> Callable[[np.ndarray, np.ndarray], list[Segment]]:
        return lambda audio, probs: vad.segments_from_probabilities(probs, frame_energy_db(audio), audio.size / RATE,
                                                                     pad_s=pad)

    detectors = {"energy": energy, **{f"silero_pad{pad:g}": silero(pad) for pad in pads}}
    table: dict[str, dict[str, Any]] = {}
    for condition in ("clean", "snr10"):
        totals: dict[tuple[float, str], dict[str, Any]] = {
            (within, name): {"starts": [], "ends": [], "missed": 0, "merged": 0, "split": 0, "false": 0}
                  for within in TRUTH_DB for name in detectors}
        regions = 0
        for r, (audio, truth, power) in enumerate(recordings):
            x = audio if condition == "clean" else with_noise(audio, 10.0, seed=r, power=power)
            probs = vad.speech_probabilities(x)
            regions += len(truth[TRUTH_DB[0]])
            for name, detect in detectors.items():
                found = detect(x, probs)
                for within in TRUTH_DB:
                    for key, value in score(truth[within], found).items():
                        totals[within, name][key] += value
        for (within, name), t in totals.items():
            table[f"{condition}/{within:g}dB/{name}"] = {
                "regions": regions,
                "start_abs_median": q([abs(v) for v in t["starts"]], 50),
                "start_abs_p90": q([abs(v) for v in t["starts"]], 90),
                "end_abs_median": q([abs(v) for v in t["ends"]], 50),
                "end_abs_p90": q([abs(v) for v in t["ends"]], 90),
                "start_signed_median": q(t["starts"], 50), "end_signed_median": q(t["ends"], 50),
                "missed": t["missed"], "merged": t["merged"], "split": t["split"], "false": t["false"]}
    return table


# ---- report -----------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "datasets")
    parser.add_argument("--seeds", type=int, default=10, help="seeds of each non-speech kind")
    parser.add_argument("--recordings", type=int, default=200, help="long recordings of 6 clips each")
    parser.add_argument("--limit", type=int, default=0, help="files per corpus (0: all), for a quick look")
    args = parser.parse_args()
    files = {"ravdess": sorted((args.data / "ravdess").rglob("*.flac")),
             "indian": sorted((args.data / "indian_emospeech").glob("*.flac"))}
    if args.limit:
        files = {k: v[:: max(1, len(v) // args.limit)][: args.limit] for k, v in files.items()}

    started = time.perf_counter()
    vad.speech_probabilities(np.zeros(vad.WINDOW, dtype=np.float32))  # loads the model: once per process
    session_ms = round((time.perf_counter() - started) * 1000, 1)
    background = [p for p in files["indian"] if "__background-" in p.name]  # no word said in these
    files["indian"] = [p for p in files["indian"] if p not in background]
    speech = measure_speech(files)
    nonspeech = measure_nonspeech(args.seeds, background)
    rule = vad.HAS_SPEECH_S
    least = min(v for items in speech.values() for _, v, _ in items)
    most = max(v for key, items in nonspeech.items() if "@" not in key for _, v, _ in items)
    print(f"\n1. longest speech region, s (has_speech when >= {rule} s); speech_seconds median in brackets\n")
    print(f"{'speech':<30} {'files':>5} {'min':>6} {'p1':>6} {'p5':>6} {'median':>15}  {'refused':>7}")
    summary_speech = {}
    for key, items in speech.items():
        longest = [v for _, v, _ in items]
        refused = sorted(name for name, v, _ in items if v < rule)
        summary_speech[key] = {"files": len(items), "min": q(longest, 0), "p1": q(longest, 1), "p5": q(longest, 5),
                               "median": q(longest, 50), "speech_seconds_median": q([t for *_, t in items], 50),
                               "refused": len(refused), "refused_files": refused}
        print(f"{key:<30} {len(items):>5} {q(longest, 0):>6} {q(longest, 1):>6} {q(longest, 5):>6} "
              f"{q(longest, 50):>6} ({q([t for *_, t in items], 50):>6})  {len(refused):>7}")
    print(f"\n{'non-speech':<30} {'clips':>5} {'max':>6} {'passed':>7}  highest")
    summary_non = {}
    for key, items in nonspeech.items():
        longest = [v for _, v, _ in items]
        high = max(items, key=lambda r: r[1])
        passed = sum(v >= rule for v in longest)
        summary_non[key] = {"clips": len(items), "max": q(longest, 100), "passed": passed, "highest": high[0]}
        print(f"{key:<30} {len(items):>5} {q(longest, 100):>6} {passed:>7}  {high[0]}")
    print(f"\nlongest region: max over non-speech (peaks {min(PEAKS):g}–{max(PEAKS):g}) {most:.3f} s; "
          f"rule {rule} s; min over speech {least:.3f} s")
    cutoffs = [round(k * vad.WINDOW_S - vad.WINDOW_S / 2, 3) for k in range(1, 11)]
    trade = tradeoff(speech, nonspeech, cutoffs)
    print("\ntrade-off: non-speech clips let through and speech files refused, per candidate HAS_SPEECH_S\n")
    cols = list(trade[0])
    short = {"nonspeech_passed": "non", "nonspeech_outside_levels_passed": "non@outside"}
    print(" ".join(f"{short.get(c, c):>14}" for c in cols))
    for row in trade:
        print(" ".join(f"{row[c]:>14}" for c in cols))

    ravdess = files["ravdess"]
    costs = cost([ravdess[i] for i in np.linspace(0, len(ravdess) - 1, min(100, len(ravdess))).astype(int)])
    costs = {"model_load_ms": session_ms, **costs}
    print("\n2. cost (one core)\n")
    for key, value in costs.items():
        print(f"{key:<32} {value}")

    recordings = long_recordings(ravdess, 6, args.recordings)
    table = boundaries(recordings, pads=(0.0, vad.SEGMENT_PAD_S, 0.3))
    print("\n3. segment boundaries against the true speech regions (s)\n")
    cols = ["regions", "start_abs_median", "start_abs_p90", "end_abs_median", "end_abs_p90",
            "start_signed_median", "end_signed_median", "missed", "merged", "split", "false"]
    print(f"{'':<30}" + " ".join(f"{c.replace('_abs', '').replace('_signed', '±')[:11]:>11}" for c in cols))
    for name, row in table.items():
        print(f"{name:<30}" + " ".join(f"{row[c]:>11}" for c in cols))

    print(json.dumps({"has_speech_s": rule, "speech_longest_min_s": round(least, 3),
                      "nonspeech_longest_max_s": round(most, 3), "margin_over_nonspeech_s": round(rule - most, 3),
                      "speech": summary_speech, "nonspeech": summary_non, "tradeoff": trade, "cost": costs,
                      "boundaries": table,
                      "segment_pad_s": vad.SEGMENT_PAD_S, "seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
