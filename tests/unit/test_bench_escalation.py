"""bench.escalation's written-down choice of thresholds and its stitched calls, on made-up clips
(the real per-clip table takes minutes to make; docs/CONVERSATIONS.md has its figures)."""

from __future__ import annotations

import numpy as np

from bench import escalation as esc
from ser_shared.emotions import EMOTIONS


def flag(rise: float, floor: float, false_alarm: float, detection: float) -> dict[str, float]:
    return {"rise": rise, "floor": floor, "false_alarm": false_alarm, "detection": detection}


def moment(margin: float, speech: float, spread: float, calm: float, found: float) -> dict[str, float]:
    return {"margin": margin, "moment_speech_s": speech, "spread": spread, "calm_calls_with_moment": calm,
            "escalating_found": found}


def test_choose_takes_the_fewest_false_alarms_that_still_detect_enough() -> None:
    grids = {
        "flag_grid": [flag(0.10, 0.20, 0.00, 0.90),  # quiet but misses too much
                      flag(0.15, 0.30, 0.02, 0.99),
                      flag(0.20, 0.35, 0.00, 0.97),
                      flag(0.25, 0.40, 0.00, 0.97)],  # ties with the one above: the more cautious
        "moment_grid": [moment(0.15, 2.0, 0.0, 0.00, 0.80),
                        moment(0.35, 3.0, 0.0, 0.01, 0.90),
                        moment(0.35, 3.0, 2.0, 0.01, 0.90),  # ties: the larger spread
                        moment(0.30, 3.0, 0.0, 0.04, 0.92)],
    }
    rule = esc.choose(grids)
    assert (rule.rise, rule.floor) == (0.25, 0.40)
    assert (rule.margin, rule.moment_speech_s, rule.spread) == (0.35, 3.0, 2.0)


def test_choose_falls_back_to_the_best_detection_when_nothing_reaches_the_bar() -> None:
    grids = {"flag_grid": [flag(0.3, 0.4, 0.0, 0.80), flag(0.2, 0.3, 0.1, 0.90)],
             "moment_grid": [moment(0.4, 4.0, 0.0, 0.0, 0.5), moment(0.2, 2.0, 1.0, 0.3, 0.7)]}
    rule = esc.choose(grids)
    assert (rule.rise, rule.floor, rule.margin, rule.spread) == (0.2, 0.3, 0.2, 1.0)


def _clip(actor: str, code: str, negative: float) -> esc.Clip:
    probs = dict.fromkeys(EMOTIONS, 0.0)
    probs["angry"] = negative
    probs["neutral"] = 1 - negative
    return esc.Clip(actor, code, 0.2, 2.2, 2.0, probs)


def test_stitched_calls_escalate_only_when_built_to_and_name_their_actors() -> None:
    actors = ("01", "02", "03")
    clips = [_clip(a, code, 0.9 if code in esc.NEGATIVE else 0.05)
             for a in actors for code in (*esc.CALM, *esc.NEGATIVE) for _ in range(2)]
    made = esc.make_calls(clips, actors, calls=20, seed=0, threshold=0.5)
    outcomes = {kind: [esc.analyse_call(c, kind) for c in made[kind]] for kind in esc.KINDS}
    summary = esc.summarise(outcomes)
    assert summary["false_alarm"]["rate"] == 0.0 and summary["calm_calls_with_moment"]["rate"] == 0.0
    assert summary["detection"]["rate"] == 1.0
    assert summary["escalating_with_customer_moment_in_negative_part"]["rate"] == 1.0
    assert summary["flag_negative_throughout"]["rate"] == 0.0
    for call in made["calm"]:
        assert call.actors[0] != call.actors[1] and set(call.actors) <= set(actors)
    assert np.all([o.turn_to is not None for o in outcomes["escalating"]])
