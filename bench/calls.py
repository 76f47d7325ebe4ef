"""Two-speaker "calls" made of real speech, and what analysing one per channel costs.

    python -m bench.calls [--data ../shared/datasets] [--rounds 5] [--long-rounds 10]

A call (``build_call``) puts two RAVDESS actors on the left and right channels of a 16 kHz
recording, taking turns as a script says: pauses between turns, some turns starting before the
other speaker has finished (overlaps), and each channel leaking into the other at ``crosstalk_db``
(-25 dB), a few milliseconds late, as a telephone hybrid or a shared room does. Every clip is cut
to its speech first (Silero's regions of the clip alone), so the script's times are the speech's:
``Call.turns`` is the ground truth the tests compare the analysis with. The tests build their
calls with it too.

The benchmark: the emotion analysis (``pipeline.run``, no transcript) of a stereo call
(``channels=auto``, which splits it into its two speakers) against the same call mixed to mono,
CPU time, interleaved over ``--rounds`` rounds in one process, one core: a 20 s call (decoded
whole) and one of ``--long-rounds`` times the script (streamed, over a minute). The issue's
bound: the stereo call costs at most twice its mono mix (it holds two speakers' speech). Prints a
table, then one JSON line.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy loads: one core per worker process, as served

import argparse
import functools
import json
import statistics
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from ser_shared.settings import REPO_ROOT

RATE = 16000
NEUTRAL, ANGRY = "01", "05"
EMOTIONS = {"01": "neutral", "02": "calm", "03": "happy", "04": "sad", "05": "angry", "06": "fearful",
            "07": "disgust", "08": "surprised"}
CROSSTALK_DB = -25.0
CROSSTALK_DELAY_S = 0.004
NOISE_DBFS = -65.0  # each channel's own line noise
SPEECH_DBFS = -26.0  # every turn's speech level, as a line's automatic gain control evens it out


@dataclass(frozen=True)
class Line:
    """One turn of a script: who speaks (channel, RAVDESS actor), what (emotion code, intensity,
    statement, repetition), and the pause before it (negative: it starts that long before the
    previous turn ends, an overlap)."""

    channel: int
    actor: int
    emotion: str
    intensity: str = "01"
    statement: str = "01"
    rep: str = "01"
    gap_s: float = 0.8


@dataclass(frozen=True)
class Turn:
    """Where a turn's speech is in the call (seconds), on which channel, and its acted emotion."""

    channel: int
    start: float
    end: float
    emotion: str


@dataclass(frozen=True)
class Call:
    audio: np.ndarray  # (2, samples) float32 at RATE
    turns: tuple[Turn, ...]

    @property
    def duration_s(self) -> float:
        return self.audio.shape[1] / RATE

    def mono(self) -> np.ndarray:
        return self.audio.mean(axis=0).astype(np.float32)

    def of(self, channel: int) -> list[Turn]:
        return [t for t in self.turns if t.channel == channel]


AGENT, CUSTOMER = 2, 3  # RAVDESS actors: a calm agent, a customer who is angry
# Alternating turns with pauses; the customer cuts in on the agent once (the agent stops 1 s later)
# and the agent on the customer once: two overlaps of about a second, two interruptions, 8 turns.
SCRIPT = (
    Line(0, AGENT, NEUTRAL, statement="01", gap_s=0.5),
    Line(1, CUSTOMER, ANGRY, "02", "01", gap_s=0.9),
    Line(0, AGENT, NEUTRAL, statement="02", gap_s=0.8),
    Line(1, CUSTOMER, ANGRY, "02", "02", gap_s=-1.0),
    Line(0, AGENT, NEUTRAL, statement="01", rep="02", gap_s=1.0),
    Line(1, CUSTOMER, ANGRY, "02", "01", rep="02", gap_s=0.7),
    Line(0, AGENT, NEUTRAL, statement="02", rep="02", gap_s=-0.9),
    Line(1, CUSTOMER, ANGRY, "02", "02", rep="02", gap_s=0.8),
)
SCRIPT_OVERLAPS = 2
# The customer starts calm and ends angry (the call's escalation flag), no overlaps; each third of
# the customer's speech is over 3 s (ser_ml.conversation.THIRD_SPEECH_S).
ESCALATING = (
    Line(0, AGENT, NEUTRAL, statement="01", gap_s=0.5),
    Line(1, CUSTOMER, NEUTRAL, statement="01", gap_s=0.8),
    Line(0, AGENT, NEUTRAL, statement="02", gap_s=0.8),
    Line(1, CUSTOMER, NEUTRAL, statement="02", gap_s=0.9),
    Line(0, AGENT, NEUTRAL, statement="01", rep="02", gap_s=0.8),
    Line(1, CUSTOMER, NEUTRAL, statement="01", rep="02", gap_s=0.7),
    Line(0, AGENT, NEUTRAL, statement="02", rep="02", gap_s=1.0),
    Line(1, CUSTOMER, ANGRY, "02", "01", gap_s=0.7),
    Line(0, AGENT, NEUTRAL, statement="01", gap_s=0.9),
    Line(1, CUSTOMER, ANGRY, "02", "02", gap_s=0.8),
    Line(0, AGENT, NEUTRAL, statement="02", gap_s=0.8),
    Line(1, CUSTOMER, ANGRY, "02", "01", rep="02", gap_s=0.7),
)


def long_script(rounds: int) -> tuple[Line, ...]:
    """SCRIPT over and over (``rounds`` times: about 20 s each), a longer pause between rounds."""
    return tuple(Line(line.channel, line.actor, line.emotion, line.intensity, line.statement, line.rep,
                      1.5 if i == 0 and r else line.gap_s)
                 for r in range(rounds) for i, line in enumerate(SCRIPT))


def ravdess_path(root: Path, line: Line) -> Path:
    return root / f"Actor_{line.actor:02d}" / (
        f"03-01-{line.emotion}-{line.intensity}-{line.statement}-{line.rep}-{line.actor:02d}.flac")


@functools.lru_cache(maxsize=64)
def speech_of(path: Path) -> np.ndarray:
    """A RAVDESS clip at RATE cut to its speech (from Silero's first region to its last, 30 ms
    either side: the silence before and after would only lengthen the pauses), its speech level
    (the power of its 10 ms frames within 30 dB of the loudest) set to SPEECH_DBFS."""
    from ser_ml import vad
    from ser_ml.segments import frame_energy_db
    from ser_shared.audio import decode

    audio = decode(path, "flac", RATE, 600.0)
    regions = vad.speech_regions(audio)
    if not regions:
        raise ValueError(f"no speech found in {path}")
    start = max(0, int((regions[0][0] - 0.03) * RATE))
    end = min(audio.size, int((regions[-1][1] + 0.03) * RATE))
    clip = audio[start:end]
    energy = frame_energy_db(clip)
    level = 10 * np.log10(np.mean(10 ** (energy[energy > energy.max() - 30] / 10)))
    return (clip * 10 ** ((SPEECH_DBFS - level) / 20)).astype(np.float32)


def build_call(ravdess: Path, script: Sequence[Line] = SCRIPT, crosstalk_db: float = CROSSTALK_DB,
               lead_s: float = 0.5, tail_s: float = 0.6, seed: int = 0) -> Call:
    """The script as a two-channel recording (see the module doc), and where each turn is."""
    clips = [speech_of(ravdess_path(ravdess, line)) for line in script]
    turns: list[Turn] = []
    t = lead_s
    for i, (line, clip) in enumerate(zip(script, clips, strict=True)):
        start = t if i == 0 else max(0.0, turns[-1].end + line.gap_s)
        turns.append(Turn(line.channel, round(start, 3), round(start + clip.size / RATE, 3),
                          EMOTIONS[line.emotion]))
        t = turns[-1].end
    total = int((max(turn.end for turn in turns) + tail_s) * RATE)
    clean = np.zeros((2, total), dtype=np.float32)
    for turn, clip in zip(turns, clips, strict=True):
        at = int(turn.start * RATE)
        clean[turn.channel, at : at + clip.size] += clip
    audio = clean.copy()
    if crosstalk_db is not None:
        gain, delay = 10 ** (crosstalk_db / 20), int(CROSSTALK_DELAY_S * RATE)
        audio[0, delay:] += gain * clean[1, : total - delay]
        audio[1, delay:] += gain * clean[0, : total - delay]
    rng = np.random.default_rng(seed)
    audio += (10 ** (NOISE_DBFS / 20) * rng.standard_normal(audio.shape)).astype(np.float32)
    return Call(np.clip(audio, -1.0, 1.0).astype(np.float32), tuple(turns))


def write(audio: np.ndarray, path: Path, rate: int = RATE) -> Path:
    """(channels, samples) or mono float audio as 16-bit PCM WAV."""
    sf.write(path, audio.T if audio.ndim == 2 else audio, rate, subtype="PCM_16", format="WAV")
    return path


def mulaw_8k(wav: Path, path: Path) -> Path:
    """``wav`` as a telephone would carry it: 8 kHz G.711 µ-law in WAV (ffmpeg)."""
    import subprocess

    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(wav), "-ar", "8000", "-acodec", "pcm_mulaw",
                    str(path)], check=True, timeout=60)
    return path


def _cpu_ms(run) -> float:  # type: ignore[no-untyped-def]
    started = time.process_time()
    run()
    return (time.process_time() - started) * 1000


def compare(ensemble, call: Call, folder: Path, rounds: int) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """CPU ms of the stereo call (``channels=auto``, which splits it) and of its mono mix, interleaved."""
    from ser_ml.pipeline import JobInput, run
    from ser_shared.settings import Settings

    settings = Settings(env="test")
    stereo, mono = write(call.audio, folder / "call.wav"), write(call.mono(), folder / "mono.wav")
    jobs = {"stereo": JobInput(uuid.uuid4(), stereo, "wav"), "mono": JobInput(uuid.uuid4(), mono, "wav")}
    outcomes = {name: run(ensemble, [job], settings)[0] for name, job in jobs.items()}  # warm-up
    if outcomes["stereo"].mode != "split":
        raise SystemExit(f"the stereo call was not split: {outcomes['stereo'].mode}")
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(rounds):
        for name, job in jobs.items():
            times[name].append(_cpu_ms(lambda job=job: run(ensemble, [job], settings)))
    ms = {name: statistics.median(v) for name, v in times.items()}
    return {"duration_s": round(call.duration_s, 1), "ms": {k: round(v, 1) for k, v in ms.items()},
            "ratio": round(ms["stereo"] / ms["mono"], 3),
            "segments": {k: len(o.segments or []) for k, o in outcomes.items()},
            "speech_s": {k: round(sum(s["speech_s"] for s in o.segments or []), 1) for k, o in outcomes.items()}}


def main(argv: list[str] | None = None) -> None:
    from ser_ml.inference import Ensemble

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "datasets")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--long-rounds", type=int, default=10, help="script repeats of the streamed call (~20 s each)")
    args = p.parse_args(argv)
    ravdess = args.data / "ravdess"
    ensemble = Ensemble.load(REPO_ROOT / "models")
    calls = {"short": build_call(ravdess), "streamed": build_call(ravdess, long_script(args.long_rounds))}
    with tempfile.TemporaryDirectory() as tmp:
        rows = {name: compare(ensemble, call, Path(tmp), args.rounds) for name, call in calls.items()}
    print(f"CPU ms per analysis, median of {args.rounds} interleaved rounds, one core")
    print(f"{'call':>10} {'length':>8} {'stereo (split)':>15} {'mono mix':>10} {'ratio':>7}  segments, speech analysed")
    for name, r in rows.items():
        print(f"{name:>10} {r['duration_s']:7.1f}s {r['ms']['stereo']:15.1f} {r['ms']['mono']:10.1f} "
              f"{r['ratio']:6.2f}x  {r['segments']['stereo']} vs {r['segments']['mono']}, "
              f"{r['speech_s']['stereo']} s vs {r['speech_s']['mono']} s")
    print("bound: stereo <= 2x its mono mix")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
