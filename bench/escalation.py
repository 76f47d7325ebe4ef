"""Escalation on stitched calls of real speech: how often the call flag (and the escalation
moments) fire on calm calls, and how often on calls built to escalate.

    python -m bench.escalation_clips          # once: per-clip predictions (minutes)
    python -m bench.escalation [--calls 200] [--seed 0] [--tune]

A call is two RAVDESS actors taking alternating turns on two channels (agent first, 8-12 turns
each, a turn is one clip or two clips 0.4 s apart, pauses of 0.3-1.5 s between turns and one turn
in ten starting 0.3-1.0 s before the other speaker stops). Each clip becomes one segment, placed on
the timeline where Silero hears its speech and padded as the service pads segments, carrying the
clip's predicted probabilities (``bench.escalation_clips``). ``ser_ml.conversation.analyse`` then
runs on the two tracks with the customer on the second channel, exactly as the worker calls it.

- calm: both speakers neutral, calm or happy throughout (each turn drawn from those);
- escalating: the agent as in calm calls; the customer neutral or calm for the first 50-70% of
  their turns (drawn per call), then one negative emotion (angry, fearful or disgust, drawn per
  call) for the rest;
- negative throughout (shown, not a target): the customer uses that negative emotion from the
  first turn; by definition not an escalation (the customer does not end worse than they began).

Thresholds were chosen with ``--tune`` on actors 01-10 (other seeds) and are reported on calls
of actors 11-20 only; the default run never tunes. Per-clip probabilities come from two sources:
``heldout`` (models that never heard the actor; the honest figure) and ``shipped`` (the served
models, which were trained on all 20 actors: optimistic). Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.escalation_clips import DEFAULT_OUT
from ser_ml import conversation as conv
from ser_ml.vad import SEGMENT_PAD_S
from ser_shared.settings import REPO_ROOT

TUNE_ACTORS = tuple(f"{a:02d}" for a in range(1, 11))
REPORT_ACTORS = tuple(f"{a:02d}" for a in range(11, 21))
CALM = ("01", "02", "03")  # RAVDESS neutral, calm, happy
EARLY = ("01", "02")  # the escalating customer's opening: neutral, calm
NEGATIVE = ("05", "06", "07")  # angry, fearful, disgust
KINDS = ("calm", "escalating", "negative_throughout")
SOURCES = ("heldout", "shipped")
TUNE_SEED_OFFSET = 1_000  # tuning calls never share the reported calls' draws


@dataclass(frozen=True)
class Clip:
    actor: str
    code: str  # RAVDESS emotion field
    onset: float  # speech within the file, seconds
    offset: float
    speech_s: float
    probabilities: dict[str, float]


@dataclass
class Call:
    tracks: list[conv.Track]
    duration_s: float
    turn_to: float | None  # escalating: when the customer's negative part begins
    actors: tuple[str, str] = ("", "")  # the agent's and the customer's RAVDESS actor


def load_clips(path: Path, source: str) -> list[Clip]:
    """The per-clip table written by ``bench.escalation_clips``."""
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run `python -m bench.escalation_clips` first")
    data = np.load(path)
    classes = [str(c) for c in data["classes"]]
    out = []
    for name, (onset, offset, speech), probs in zip(data["files"], data["spans"], data[source], strict=True):
        parts = str(name).split(".")[0].split("-")
        out.append(Clip(parts[6], parts[2], float(onset), float(offset), float(speech),
                        {c: round(float(p), 6) for c, p in zip(classes, probs, strict=True)}))
    return out


def _segment(clip: Clip, at: float, threshold: float) -> tuple[dict[str, Any], float]:
    """The clip's segment with its speech starting at ``at``; returns it and where the speech ends."""
    end = at + clip.offset - clip.onset
    emotion = max(clip.probabilities, key=lambda e: clip.probabilities[e])
    confidence = clip.probabilities[emotion]
    return {"start": round(max(0.0, at - SEGMENT_PAD_S), 3), "end": round(end + SEGMENT_PAD_S, 3),
            "speech_s": round(clip.speech_s, 3), "emotion": emotion, "confidence": confidence,
            "uncertain": confidence < threshold, "probabilities": clip.probabilities}, end


def _codes(kind: str, speaker: int, turn: int, turn_at: int, negative: str) -> tuple[str, ...]:
    """The RAVDESS emotions a turn may be drawn from."""
    if speaker == 0 or kind == "calm":
        return CALM
    if kind == "negative_throughout" or turn >= turn_at:
        return (negative,)
    return EARLY


def build_call(rng: np.random.Generator, pool: dict[tuple[str, str], list[Clip]], actors: Sequence[str],
               kind: str, threshold: float) -> Call:
    """One stitched two-channel call of ``kind`` between two different actors of ``actors``."""
    agent, customer = (str(a) for a in rng.choice(list(actors), size=2, replace=False))
    turns = int(rng.integers(8, 13))
    turn_at = int(round(turns * rng.uniform(0.5, 0.7)))
    negative = str(rng.choice(NEGATIVE))
    segments: list[list[dict[str, Any]]] = [[], []]
    t, turn_to = 0.5, None
    for k in range(2 * turns):
        speaker, turn = k % 2, k // 2
        actor = (agent, customer)[speaker]
        codes = _codes(kind, speaker, turn, turn_at, negative)
        if speaker == 1 and kind == "escalating" and turn == turn_at:
            turn_to = t
        for _ in range(1 if rng.random() < 0.7 else 2):
            options = pool[(actor, str(rng.choice(codes)))]
            seg, end = _segment(options[int(rng.integers(len(options)))], t, threshold)
            segments[speaker].append(seg)
            t = end + 0.4
        t = end - rng.uniform(0.3, 1.0) if rng.random() < 0.1 else end + rng.uniform(0.3, 1.5)
    tracks = [conv.Track(0, "agent", segments[0]), conv.Track(1, "customer", segments[1])]
    return Call(tracks, round(max(s["end"] for s in segments[0] + segments[1]) + 1.0, 3), turn_to,
                (agent, customer))


@dataclass
class Outcome:
    kind: str
    flag: bool
    negative_start: float | None
    negative_end: float | None
    third_s: float
    customer_moments: list[dict[str, Any]]
    agent_moments: list[dict[str, Any]]
    turn_to: float | None
    actors: tuple[str, str] = ("", "")


def analyse_call(call: Call, kind: str, rule: conv.EscalationRule = conv.RULE) -> Outcome:
    metrics, conversation = conv.analyse(call.tracks, call.duration_s, "split", customer=1, rule=rule)
    c = metrics[1]
    return Outcome(kind, conversation["escalation"], c["negative_start"], c["negative_end"], c["talk_s"] / 3,
                   c["escalations"], metrics[0]["escalations"], call.turn_to, call.actors)


def make_calls(clips: list[Clip], actors: Sequence[str], calls: int, seed: int, threshold: float
               ) -> dict[str, list[Call]]:
    pool: dict[tuple[str, str], list[Clip]] = {}
    for clip in clips:
        if clip.actor in actors:
            pool.setdefault((clip.actor, clip.code), []).append(clip)
    out = {}
    for i, kind in enumerate(KINDS):
        rng = np.random.default_rng([seed, i])
        out[kind] = [build_call(rng, pool, actors, kind, threshold) for _ in range(calls)]
    return out


def wilson(hits: int, n: int) -> tuple[float, float]:
    """95% Wilson interval of a rate."""
    if n == 0:
        return 0.0, 1.0
    z, p = 1.96, hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _in_negative_part(o: Outcome) -> bool:
    return o.turn_to is not None and any(m["end"] > o.turn_to for m in o.customer_moments)


def summarise(outcomes: dict[str, list[Outcome]]) -> dict[str, Any]:
    """Rates per kind: the call flag, and moments (any speaker on calm calls; the customer's
    inside the negative part on escalating ones)."""
    calm, esc, neg = outcomes["calm"], outcomes["escalating"], outcomes["negative_throughout"]
    rows = {
        "false_alarm": [o.flag for o in calm],
        "detection": [o.flag for o in esc],
        "flag_negative_throughout": [o.flag for o in neg],
        "calm_calls_with_moment": [bool(o.customer_moments or o.agent_moments) for o in calm],
        "escalating_with_customer_moment_in_negative_part": [_in_negative_part(o) for o in esc],
        "escalating_with_agent_moment": [bool(o.agent_moments) for o in esc],
    }
    out: dict[str, Any] = {}
    for name, hits in rows.items():
        low, high = wilson(sum(hits), len(hits))
        out[name] = {"rate": round(sum(hits) / len(hits), 4), "hits": sum(hits), "n": len(hits),
                     "ci95": [round(low, 4), round(high, 4)]}
    marked: dict[str, int] = {}
    for o in calm:  # which voices the calm calls' moments come from
        for actor, moments in zip(o.actors, (o.agent_moments, o.customer_moments), strict=True):
            if moments:
                marked[actor] = marked.get(actor, 0) + 1
    out["calm_speakers_marked_by_actor"] = dict(sorted(marked.items(), key=lambda kv: (-kv[1], kv[0])))
    out["negative_change"] = {kind: _quartiles([o.negative_end - o.negative_start for o in outcomes[kind]
                                                if o.negative_end is not None and o.negative_start is not None])
                              for kind in KINDS}
    return out


def _quartiles(values: list[float]) -> list[float]:
    return [round(float(q), 3) for q in np.percentile(values, [10, 50, 90])] if values else []


def run(clips: list[Clip], actors: Sequence[str], calls: int, seed: int, threshold: float,
        rule: conv.EscalationRule = conv.RULE) -> dict[str, list[Outcome]]:
    made = make_calls(clips, actors, calls, seed, threshold)
    return {kind: [analyse_call(c, kind, rule) for c in made[kind]] for kind in KINDS}


MARGINS = tuple(round(float(m), 2) for m in np.arange(0.15, 0.56, 0.05))
MOMENT_SPEECH_S = (2.0, 3.0, 4.0, 6.0)
SPREADS = (0.0, 1.0, 1.5, 2.0, 2.5, 3.0)
# What --cross asks of a choice on the tuning half: find this share of the escalations, then
# fire as rarely as possible on calm calls.
MIN_DETECTION = 0.95  # the call flag, on escalating calls
MIN_FOUND = 0.90  # moments: escalating calls with a customer moment in the negative part


def tune(clips: list[Clip], calls: int, seed: int, threshold: float, actors: Sequence[str] = TUNE_ACTORS
         ) -> dict[str, Any]:
    """Rates on ``actors`` only (other draws than the report's) over a grid of the flag's (rise,
    floor) and of the moments' (margin, speech, spread): what the shipped thresholds were chosen from."""
    made = make_calls(clips, actors, calls, seed + TUNE_SEED_OFFSET, threshold)
    flags = []
    base = {kind: [analyse_call(c, kind) for c in made[kind]] for kind in KINDS}
    for rise in np.arange(0.10, 0.51, 0.05):
        for floor in np.arange(0.20, 0.71, 0.05):
            rule = replace(conv.RULE, rise=round(float(rise), 2), floor=round(float(floor), 2))
            rate = {kind: float(np.mean([conv.escalates(o.negative_start, o.negative_end, o.third_s, rule)
                                         for o in base[kind]])) for kind in ("calm", "escalating")}
            flags.append({"rise": rule.rise, "floor": rule.floor, "false_alarm": rate["calm"],
                          "detection": rate["escalating"]})
    moments = []
    for margin in MARGINS:
        for speech in MOMENT_SPEECH_S:
            for spread in SPREADS:
                rule = replace(conv.RULE, margin=margin, moment_speech_s=speech, spread=spread)
                got = {kind: [analyse_call(c, kind, rule) for c in made[kind]] for kind in ("calm", "escalating")}
                moments.append({"margin": margin, "moment_speech_s": speech, "spread": spread,
                                "calm_calls_with_moment": float(np.mean([bool(o.customer_moments or o.agent_moments)
                                                                         for o in got["calm"]])),
                                "escalating_found": float(np.mean([_in_negative_part(o)
                                                                   for o in got["escalating"]]))})
    return {"flag_grid": flags, "moment_grid": moments}


def choose(grids: dict[str, Any]) -> conv.EscalationRule:
    """The rule a tuning half's grids pick, with no judgement left to a person: the call flag with
    the fewest false alarms among those detecting ``MIN_DETECTION`` of escalations (ties: the
    higher detection, then the larger rise and floor, the more cautious); moments with the fewest
    calm calls marked among those finding ``MIN_FOUND`` (ties: the more found, then the larger
    margin, speech and spread). When nothing reaches the bar, the best detection or finding."""
    flags = [f for f in grids["flag_grid"] if f["detection"] >= MIN_DETECTION] or \
        [max(grids["flag_grid"], key=lambda f: f["detection"])]
    flag = min(flags, key=lambda f: (f["false_alarm"], -f["detection"], -f["rise"], -f["floor"]))
    moments = [m for m in grids["moment_grid"] if m["escalating_found"] >= MIN_FOUND] or \
        [max(grids["moment_grid"], key=lambda m: m["escalating_found"])]
    moment = min(moments, key=lambda m: (m["calm_calls_with_moment"], -m["escalating_found"], -m["margin"],
                                         -m["moment_speech_s"], -m["spread"]))
    return replace(conv.RULE, rise=flag["rise"], floor=flag["floor"], margin=moment["margin"],
                   moment_speech_s=moment["moment_speech_s"], spread=moment["spread"])


def cross(clips: list[Clip], calls: int, seed: int, threshold: float) -> dict[str, Any]:
    """Both halves in turn: tune on one (``choose``), report on the other with what it chose.
    Two estimates of how the whole procedure does on ten voices it never tuned on."""
    out: dict[str, Any] = {}
    for tuned, reported in ((TUNE_ACTORS, REPORT_ACTORS), (REPORT_ACTORS, TUNE_ACTORS)):
        rule = choose(tune(clips, calls, seed, threshold, tuned))
        name = f"tuned on {tuned[0]}-{tuned[-1]}, reported on {reported[0]}-{reported[-1]}"
        out[name] = {"rule": rule.__dict__, **summarise(run(clips, reported, calls, seed, threshold, rule))}
    return out


def _print_grids(result: dict[str, Any]) -> None:
    """The flag's false-alarm/detection per (rise, floor) and the moments' rates per (margin, speech),
    one table for each spread factor."""
    flags = result["flag_grid"]
    floors = sorted({f["floor"] for f in flags})
    print("call flag: false alarms % / detection % (rows: rise, columns: floor)")
    print("rise  " + " ".join(f"{f:>7.2f}" for f in floors))
    for rise in sorted({f["rise"] for f in flags}):
        print(f"{rise:4.2f}  " + " ".join(f"{100 * f['false_alarm']:3.0f}/{100 * f['detection']:3.0f}"
                                          for f in flags if f["rise"] == rise))
    speeches = sorted({m["moment_speech_s"] for m in result["moment_grid"]})
    for spread in sorted({m["spread"] for m in result["moment_grid"]}):
        moments = [m for m in result["moment_grid"] if m["spread"] == spread]
        print(f"moments, spread {spread}: calm calls with a moment % / escalations found % (rows: margin, "
              "columns: speech s)")
        print("margin " + " ".join(f"{s:>7.1f}" for s in speeches))
        for margin in sorted({m["margin"] for m in moments}):
            print(f"{margin:5.2f}  " + " ".join(f"{100 * m['calm_calls_with_moment']:3.0f}/"
                                               f"{100 * m['escalating_found']:3.0f}"
                                               for m in moments if m["margin"] == margin))


def _print_summary(heading: str, summary: dict[str, Any]) -> None:
    print(f"\n{heading}:")
    for name, row in summary.items():
        if not isinstance(row, dict) or "rate" not in row:
            continue
        print(f"  {name:50s} {row['rate']:6.1%}  ({row['hits']}/{row['n']}, 95% CI "
              f"{row['ci95'][0]:.1%}-{row['ci95'][1]:.1%})")
    print(f"  calm-call speakers with a moment, by actor: {summary['calm_speakers_marked_by_actor'] or 'none'}")
    for kind, q in summary["negative_change"].items():
        print(f"  negative_end - negative_start, {kind:20s} p10/p50/p90 = {q}")


def _clip_accuracy(clips: list[Clip], actors: Sequence[str]) -> float:
    from ser_shared.emotions import RAVDESS_CODES

    mine = [c for c in clips if c.actor in actors]
    return round(float(np.mean([max(c.probabilities, key=lambda e: c.probabilities[e]) == RAVDESS_CODES[c.code]
                                for c in mine])), 4)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--calls", type=int, default=200, help="calls per kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tune", action="store_true", help="grid-search thresholds on actors 01-10 instead")
    parser.add_argument("--cross", action="store_true",
                        help="tune on each half of the actors in turn (automatic choice), report on the other")
    args = parser.parse_args(argv)
    threshold = float(json.loads((REPO_ROOT / "models" / "manifest.json").read_text())
                      ["ensemble"]["uncertain_threshold"])
    if args.tune:
        result = tune(load_clips(args.clips, "heldout"), args.calls, args.seed, threshold)
        _print_grids(result)
        print(f"automatic choice (--cross): {choose(result)}")
        print(json.dumps(result))
        return 0
    if args.cross:
        result = cross(load_clips(args.clips, "heldout"), args.calls, args.seed, threshold)
        for name, summary in result.items():
            _print_summary(f"held-out probabilities, {name}; rule {summary['rule']}", summary)
        print(json.dumps(result))
        return 0
    print(f"rule: {conv.RULE}; {args.calls} calls per kind, seed {args.seed}")
    report: dict[str, Any] = {"rule": conv.RULE.__dict__, "calls_per_kind": args.calls, "seed": args.seed,
                              "actors": list(REPORT_ACTORS)}
    for source in SOURCES:
        clips = load_clips(args.clips, source)
        summary = summarise(run(clips, REPORT_ACTORS, args.calls, args.seed, threshold))
        summary["clip_accuracy"] = _clip_accuracy(clips, REPORT_ACTORS)
        print(f"\nper-clip accuracy ({source}, actors 11-20): {summary['clip_accuracy']:.1%}")
        _print_summary(f"{source} probabilities, actors 11-20", summary)
        report[source] = summary
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
