"""Offline speech-to-text: word error rate and speed of Whisper tiny.en, Whisper base and PocketSphinx.

    python -m bench.asr [--data ../shared/datasets] [--sentences 20] [--actors 24] [--json out.json]

One run, the same audio for every engine:

1. **espeak-ng English**: the fixed ``SENTENCES`` (Harvard sentences, IEEE 1969), spoken by espeak-ng
   with one fixed voice and speed (``VOICE``, ``SPEED``), each a clip of its own.
2. **RAVDESS**: its two sentences ("Kids are talking by the door", "Dogs are sitting by the door")
   from actors 1-20 (``--actors``; odd actors are men, even ones women, so 10 of each), each
   sentence neutral (normal intensity) and angry (strong intensity), first repetition: 4 files per
   actor, 80 in all.

Word error rate (WER) is the word-level Levenshtein distance between the reference and the
engine's text, both lowercased with punctuation removed (:func:`normalise`), summed over the clips
and divided by the number of reference words. Real-time factor (RTF) is processing seconds over
audio seconds: wall time (``wall``) and CPU time of the process (``cpu``; all threads, so up to 2x
the wall time for Whisper on 2 threads).

3. **Long recording**: the espeak sentences one after another with 0.8 s pauses, transcribed as the
   worker does a long recording: its speech segments (here the sentences, 0.3 s padding) packed into
   Whisper windows of up to 28 s (``ser_ml.whisper_asr``); PocketSphinx decodes each segment.

The engines as the service runs (ran) them: Whisper through ``ser_ml.whisper_asr`` (faster-whisper,
int8, 2 threads, greedy, word timestamps on; English forced for both models), PocketSphinx 5 with
the US-English model SpeechRecognition bundles (the service's former ``sphinx`` engine), one thread
(it has no other mode), its decoder built once. Model loading is reported apart, not in the RTF.
Prints a Markdown table (with each Whisper's ratio to Sphinx), then one JSON line.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # numpy single-threaded; Whisper sets its own 2 threads

import argparse
import json
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from ser_ml import whisper_asr
from ser_shared.audio import decode
from ser_shared.settings import REPO_ROOT

RATE = 16000
VOICE, SPEED = "en-us+f2", 150  # the voice and words per minute of the tests' synthetic speech
SENTENCES = (
    "the birch canoe slid on the smooth planks",
    "glue the sheet to the dark blue background",
    "it is easy to tell the depth of a well",
    "these days a chicken leg is a rare dish",
    "rice is often served in round bowls",
    "the juice of lemons makes fine punch",
    "the box was thrown beside the parked truck",
    "the hogs were fed chopped corn and garbage",
    "four hours of steady work faced us",
    "a large size in stockings is hard to sell",
    "the boy was there when the sun rose",
    "a rod is used to catch pink salmon",
    "the source of the huge river is the clear spring",
    "kick the ball straight and follow through",
    "help the woman get back to her feet",
    "a pot of tea helps to pass the evening",
    "smoky fires lack flame and heat",
    "the soft cushion broke the man's fall",
    "the salt breeze came across from the sea",
    "the girl at the booth sold fifty bonds",
)
RAVDESS_TEXT = {"01": "kids are talking by the door", "02": "dogs are sitting by the door"}
RAVDESS_TAKES = (("01", "01"), ("05", "02"))  # (emotion, intensity): neutral normal, angry strong
PAUSE_S = 0.8
PAD_S = 0.3


# --- word error rate ------------------------------------------------------------------------------

def normalise(text: str) -> list[str]:
    """Lowercase words without punctuation: "Kids are talking, by the door." -> kids are talking by the door.
    An apostrophe inside a word stays (man's); hyphens and other marks separate words."""
    text = re.sub(r"(?<=\w)'(?=\w)", "\0", text.lower())
    return re.sub(r"[^\w\0]+", " ", text).replace("\0", "'").split()


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    """Word-level Levenshtein distance: substitutions + deletions + insertions, each costing 1."""
    previous = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        current = [i]
        for j, h in enumerate(hyp, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h)))
        previous = current
    return previous[-1]


def wer(pairs: list[tuple[str, str]]) -> float:
    """Corpus WER of (reference, hypothesis) pairs: all errors over all reference words."""
    errors = sum(edit_distance(normalise(ref), normalise(hyp)) for ref, hyp in pairs)
    words = sum(len(normalise(ref)) for ref, _ in pairs)
    return errors / words if words else float("nan")


# --- the engines ----------------------------------------------------------------------------------

Recognise = Callable[[np.ndarray], str]


def whisper(name: str) -> tuple[Recognise, Callable[[np.ndarray, list[tuple[float, float]]], list[str]]]:
    """One clip, and segments of a long recording (packed as the worker packs them)."""
    model = whisper_asr.model(name)

    def spans(audio: np.ndarray, segments: list[tuple[float, float]]) -> list[str]:
        session = whisper_asr.Session(model, "en", whisper_asr.PRIOR_COST[name])
        return [h.text for h in whisper_asr.transcribe_spans(session, audio, segments, float("inf"))]

    return (lambda audio: spans(audio, [(0.0, audio.size / RATE)])[0]), spans


def sphinx() -> tuple[Recognise, Callable[[np.ndarray, list[tuple[float, float]]], list[str]]]:
    """PocketSphinx with SpeechRecognition's bundled US-English model, as the service's old engine."""
    import pocketsphinx
    import speech_recognition

    data = Path(speech_recognition.__file__).parent / "pocketsphinx-data" / "en-US"
    config = pocketsphinx.Config()
    config.set_string("-hmm", str(data / "acoustic-model"))
    config.set_string("-lm", str(data / "language-model.lm.bin"))
    config.set_string("-dict", str(data / "pronounciation-dictionary.dict"))
    config.set_string("-logfn", os.devnull)
    decoder = pocketsphinx.Decoder(config)

    def one(audio: np.ndarray) -> str:
        pcm = np.round(np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
        decoder.start_utt()
        decoder.process_raw(pcm, False, True)
        decoder.end_utt()
        hyp = decoder.hyp()
        return hyp.hypstr if hyp is not None else ""

    def spans(audio: np.ndarray, segments: list[tuple[float, float]]) -> list[str]:
        return [one(audio[int(a * RATE):int(b * RATE)]) for a, b in segments]

    return one, spans


ENGINES: dict[str, Callable[[], tuple[Recognise, Any]]] = {
    "whisper tiny.en": lambda: whisper("tiny.en"),
    "whisper base": lambda: whisper("base"),
    "sphinx": sphinx,
}


# --- the audio ------------------------------------------------------------------------------------

@dataclass
class Clip:
    corpus: str
    name: str
    text: str
    audio: np.ndarray

    @property
    def seconds(self) -> float:
        return self.audio.size / RATE


def espeak_clips(count: int, folder: Path) -> list[Clip]:
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng is needed for the synthetic sentences")
    clips = []
    for k, text in enumerate(SENTENCES[:count]):
        path = folder / f"s{k:02d}.wav"
        subprocess.run(["espeak-ng", "-v", VOICE, "-s", str(SPEED), "-w", str(path), text], check=True,
                       capture_output=True)
        clips.append(Clip("espeak", path.name, text, decode(path, "wav", RATE, 600)))
    return clips


def ravdess_clips(root: Path, actors: int, limit: int | None = None) -> list[Clip]:
    clips: list[Clip] = []
    for actor in range(1, actors + 1):
        for emotion, intensity in RAVDESS_TAKES:
            for statement, text in RAVDESS_TEXT.items():
                if limit is not None and len(clips) >= limit:
                    return clips
                path = root / f"Actor_{actor:02d}" / f"03-01-{emotion}-{intensity}-{statement}-01-{actor:02d}.flac"
                if not path.exists():
                    raise SystemExit(f"missing RAVDESS file: {path}")
                clips.append(Clip("ravdess", path.name, text, decode(path, "flac", RATE, 600)))
    return clips


def long_recording(clips: list[Clip]) -> tuple[np.ndarray, list[tuple[float, float]]]:
    pause = np.zeros(int(PAUSE_S * RATE), dtype=np.float32)
    parts, spans, at = [pause], [], PAUSE_S
    for clip in clips:
        spans.append((at - PAD_S, at + clip.seconds + PAD_S))
        parts += [clip.audio, pause]
        at += clip.seconds + PAUSE_S
    return np.concatenate(parts), spans


# --- the run --------------------------------------------------------------------------------------

@dataclass
class Score:
    load_s: float = 0.0
    pairs: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    wall: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    audio: dict[str, float] = field(default_factory=dict)
    samples: dict[str, list[tuple[str, str]]] = field(default_factory=dict)


def measure(engine: str, corpora: dict[str, list[Clip]], long_audio: np.ndarray,
            long_spans: list[tuple[float, float]], long_texts: list[str]) -> Score:
    score = Score()
    started = time.perf_counter()
    one, spans = ENGINES[engine]()
    score.load_s = time.perf_counter() - started
    one(corpora["espeak"][0].audio)  # warm-up (first-call allocations), not counted
    for corpus, clips in corpora.items():
        wall = cpu = 0.0
        pairs = []
        for clip in clips:
            w0, c0 = time.perf_counter(), time.process_time()
            hyp = one(clip.audio)
            wall += time.perf_counter() - w0
            cpu += time.process_time() - c0
            pairs.append((clip.text, hyp))
        score.pairs[corpus], score.wall[corpus], score.cpu[corpus] = pairs, wall, cpu
        score.audio[corpus] = sum(c.seconds for c in clips)
        score.samples[corpus] = pairs[:2]
    w0, c0 = time.perf_counter(), time.process_time()
    hyps = spans(long_audio, long_spans)
    score.wall["long"], score.cpu["long"] = time.perf_counter() - w0, time.process_time() - c0
    score.audio["long"] = long_audio.size / RATE
    score.pairs["long"] = list(zip(long_texts, hyps, strict=True))
    return score


def table(scores: dict[str, Score]) -> tuple[str, dict[str, Any]]:
    corpora = ("espeak", "ravdess", "long")
    rows: list[str] = []
    summary: dict[str, dict[str, Any]] = {}
    head = ("| engine | WER espeak | WER RAVDESS | WER long | RTF clips (wall / cpu) | RTF long (wall / cpu) "
            "| load s |")
    rows += [head, "|" + "---|" * 7]
    ref = scores.get("sphinx")
    for name, s in scores.items():
        w = {c: wer(s.pairs[c]) for c in corpora}
        clips_wall = (s.wall["espeak"] + s.wall["ravdess"]) / (s.audio["espeak"] + s.audio["ravdess"])
        clips_cpu = (s.cpu["espeak"] + s.cpu["ravdess"]) / (s.audio["espeak"] + s.audio["ravdess"])
        long_wall, long_cpu = s.wall["long"] / s.audio["long"], s.cpu["long"] / s.audio["long"]
        summary[name] = {"wer": w, "rtf_clips_wall": clips_wall, "rtf_clips_cpu": clips_cpu,
                         "rtf_long_wall": long_wall, "rtf_long_cpu": long_cpu, "load_s": s.load_s,
                         "audio_s": s.audio, "samples": s.samples}
        rows.append(f"| {name} | {w['espeak']:.3f} | {w['ravdess']:.3f} | {w['long']:.3f} "
                    f"| {clips_wall:.3f} / {clips_cpu:.3f} | {long_wall:.3f} / {long_cpu:.3f} | {s.load_s:.2f} |")
    if ref is not None:
        rows += ["", "Ratio to Sphinx (same run; below 1 is better):", "",
                 "| engine | WER espeak | WER RAVDESS | WER long | RTF clips (wall) | RTF long (wall) |",
                 "|" + "---|" * 6]
        base = summary["sphinx"]
        for name, row in summary.items():
            if name == "sphinx":
                continue
            row_wer, base_wer = cast(dict[str, float], row["wer"]), cast(dict[str, float], base["wer"])
            ratios = [row_wer[c] / base_wer[c] if base_wer[c] else float("nan") for c in corpora]
            ratios += [cast(float, row["rtf_clips_wall"]) / cast(float, base["rtf_clips_wall"]),
                       cast(float, row["rtf_long_wall"]) / cast(float, base["rtf_long_wall"])]
            rows.append(f"| {name} | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")
    return "\n".join(rows), summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "datasets")
    parser.add_argument("--sentences", type=int, default=len(SENTENCES))
    parser.add_argument("--actors", type=int, default=20)
    parser.add_argument("--ravdess-limit", type=int, help="only the first N RAVDESS files (a quick run)")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        corpora = {"espeak": espeak_clips(args.sentences, Path(tmp)),
                   "ravdess": ravdess_clips(args.data / "ravdess", args.actors, args.ravdess_limit)}
    long_audio, long_spans = long_recording(corpora["espeak"])
    long_texts = [c.text for c in corpora["espeak"]]
    for corpus, clips in corpora.items():
        print(f"{corpus}: {len(clips)} clips, {sum(c.seconds for c in clips):.1f} s of audio")
    print(f"long: {long_audio.size / RATE:.1f} s, {len(long_spans)} segments; cores: {os.cpu_count()}, "
          f"load average before: {os.getloadavg()[0]:.2f}")
    scores = {}
    for engine in args.engines.split(","):
        scores[engine] = measure(engine, corpora, long_audio, long_spans, long_texts)
        print(f"{engine}: done; e.g. {scores[engine].samples['ravdess'][:1]}", flush=True)
    text, summary = table(scores)
    print(f"load average after: {os.getloadavg()[0]:.2f}\n")
    print(text)
    line = json.dumps({"asr": summary}, default=float)
    print(line)
    if args.json:
        args.json.write_text(line + "\n")


if __name__ == "__main__":
    main()
