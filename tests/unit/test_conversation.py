"""ser_ml.conversation on hand-built speakers whose overlaps, interruptions, turns, monologues and
escalation are known; every output is checked against the strict schemas."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from ser_ml import conversation as conv
from ser_ml.conversation import Track, analyse, customer_index
from ser_shared import schemas
from ser_shared.emotions import EMOTIONS


def seg(start: float, end: float, emotion: str = "neutral", negative: float = 0.05, speech: float | None = None,
        text: str | None = None, words: list[str] | None = None) -> dict[str, Any]:
    """A valid schemas.Segment dict: ``negative`` of the probability on angry, the rest on ``emotion``
    (or neutral when ``emotion`` is itself negative)."""
    probs = dict.fromkeys(EMOTIONS, 0.0)
    probs["angry"] = negative
    probs["neutral" if emotion in conv.NEGATIVE else emotion] += 1 - negative
    out: dict[str, Any] = {"start": start, "end": end, "speech_s": end - start if speech is None else speech,
                           "emotion": emotion, "confidence": 0.6, "uncertain": False, "probabilities": probs}
    if text is not None:
        out["transcript"] = text
    if words is not None:
        step = (end - start) / len(words)
        out["words"] = [{"start": start + i * step, "end": start + (i + 1) * step, "word": w}
                        for i, w in enumerate(words)]
    return out


def run(*segments: list[dict[str, Any]], duration: float = 60.0, mode: str = "split",
        customer: int | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """analyse() of one track per argument (labels ch0, ch1, ...), its output validated strictly."""
    tracks = [Track(i, f"ch{i}", list(s)) for i, s in enumerate(segments)]
    metrics, conversation = analyse(tracks, duration, mode, customer)
    for m in metrics:
        assert schemas.ChannelMetrics.model_validate(m).to_json() == m
    assert schemas.Conversation.model_validate(conversation).to_json() == conversation
    return metrics, conversation


# --- talk time, turns, silence ---------------------------------------------------------------

def test_talk_time_is_speech_not_span_and_shares_add_up() -> None:
    no_speech_s = seg(10, 14)
    del no_speech_s["speech_s"]  # the span stands in when the segmenter did not say
    metrics, _ = run([seg(0, 5, speech=3.0), no_speech_s], [seg(6, 9, speech=2.0)])
    assert [m["talk_s"] for m in metrics] == [7.0, 2.0]
    assert [m["talk_share"] for m in metrics] == [pytest.approx(7 / 9, abs=1e-4), pytest.approx(2 / 9, abs=1e-4)]


def test_alternating_turns_without_overlap() -> None:
    a = [seg(0, 3), seg(6.5, 9)]
    b = [seg(3.5, 6), seg(9.5, 12)]
    metrics, c = run(a, b, duration=13.0)
    assert c["turns"] == 4 and [m["turns"] for m in metrics] == [2, 2]
    assert c["overlaps"] == 0 and c["overlap_s"] == 0 and c["interruptions"] == []
    assert c["silence_share"] == pytest.approx((13 - 10.5) / 13, abs=1e-4)
    assert c["channels"] == "split" and c["duration_s"] == 13.0


def test_a_long_pause_by_the_same_speaker_is_not_a_new_turn_but_ends_the_monologue() -> None:
    metrics, c = run([seg(0, 4), seg(4.5, 8), seg(11, 14)])
    assert c["turns"] == 1 and metrics[0]["turns"] == 1
    assert metrics[0]["longest_monologue_s"] == 8.0  # the 0.5 s pause is bridged, the 3 s one is not


def test_the_other_speaker_taking_the_floor_ends_a_monologue() -> None:
    metrics, c = run([seg(0, 4), seg(8, 14)], [seg(4.5, 7.5)])
    assert [m["longest_monologue_s"] for m in metrics] == [6.0, 3.0]
    assert c["turns"] == 3 and [m["turns"] for m in metrics] == [2, 1]


# --- overlaps, backchannels, interruptions ---------------------------------------------------

def test_interruption_who_cut_in_on_whom() -> None:
    metrics, c = run([seg(0, 6), seg(12, 15)], [seg(5, 9)])
    assert c["interruptions"] == [{"at": 5.0, "by": 1, "of": 0}]
    assert [m["interruptions"] for m in metrics] == [0, 1]
    assert c["overlaps"] == 1 and c["overlap_s"] == 1.0
    assert c["turns"] == 3


def test_talking_over_someone_who_carries_on_is_an_overlap_not_an_interruption() -> None:
    _, c = run([seg(0, 10)], [seg(4, 7)])  # the first speaker talks on for 6 s after the cut-in
    assert c["interruptions"] == []
    assert c["overlaps"] == 1 and c["overlap_s"] == 3.0


def test_a_cut_in_that_ends_before_the_speaker_stops_is_no_interruption() -> None:
    _, c = run([seg(0, 6)], [seg(4.5, 5.8, speech=1.1)])  # both talked; the first speaker outlasted it
    assert c["interruptions"] == [] and c["overlaps"] == 1


def test_a_backchannel_overlaps_but_takes_no_turn_and_breaks_no_monologue() -> None:
    metrics, c = run([seg(0, 10)], [seg(4, 4.6, speech=0.4)])
    assert c["overlaps"] == 1 and c["overlap_s"] == 0.6
    assert c["turns"] == 1 and [m["turns"] for m in metrics] == [1, 0]
    assert c["interruptions"] == [] and metrics[0]["longest_monologue_s"] == 10.0
    assert metrics[1]["talk_s"] == 0.4


def test_a_short_answer_in_the_clear_is_a_turn() -> None:
    _, c = run([seg(0, 3), seg(5, 8)], [seg(3.3, 4.0, speech=0.5)])  # "yes." between two questions
    assert c["turns"] == 3
    # Touching the question's padding (0.2 s of its 0.7 s) does not make it a backchannel.
    _, c = run([seg(0, 3.1), seg(5, 8)], [seg(2.9, 3.6, speech=0.5)])
    assert c["turns"] == 3


def test_padding_sized_contact_is_not_an_overlap_nor_an_interruption() -> None:
    _, c = run([seg(0, 3.1)], [seg(2.9, 6)])  # the segments' padding touches: 0.2 s
    assert c["overlaps"] == 0 and c["overlap_s"] == 0 and c["interruptions"] == []


def test_touching_segments_are_one_utterance() -> None:
    # The segmenter cut a 12 s utterance into touching pieces; the other speaker cuts in at 7.5 s
    # and the first talks on until 12: no interruption (as pieces, 0-8 would look cut off).
    _, c = run([seg(0, 8), seg(8, 12)], [seg(7.5, 15)])
    assert c["interruptions"] == []
    assert c["overlaps"] == 1 and c["overlap_s"] == 4.5


def test_overlaps_of_three_speakers() -> None:
    _, c = run([seg(0, 4)], [seg(1, 3)], [seg(2, 5)], duration=6.0)
    assert c["overlaps"] == 1 and c["overlap_s"] == 3.0  # two or more speak from 1 s to 4 s
    assert c["silence_share"] == pytest.approx(1 / 6, abs=1e-4)


# --- emotions and escalation -----------------------------------------------------------------

def calm(n: int, start: float = 0.0) -> list[dict[str, Any]]:
    return [seg(start + 3 * i, start + 3 * i + 2) for i in range(n)]


def angry(n: int, start: float) -> list[dict[str, Any]]:
    return [seg(start + 3 * i, start + 3 * i + 2, "angry", 0.9) for i in range(n)]


def test_emotion_share_weighted_by_speech() -> None:
    metrics, _ = run([seg(0, 3), seg(4, 5, "angry", 0.9)])
    share = metrics[0]["emotion_share"]
    assert share["neutral"] == 0.75 and share["angry"] == 0.25
    assert set(share) == set(EMOTIONS) and sum(share.values()) == pytest.approx(1.0)


def test_escalating_customer_flags_the_call_and_marks_the_moment() -> None:
    customer = calm(6) + angry(3, 18)
    metrics, c = run(calm(9, 100), customer, customer=1)
    m = metrics[1]
    assert m["negative_start"] == 0.05 and m["negative_end"] == 0.9
    assert c["escalation"] is True and c["customer"] == 1
    assert m["escalations"] == [{"start": 18.0, "end": 26.0, "emotion": "angry", "score": 0.85}]
    assert metrics[0]["escalations"] == []


def test_a_calm_call_and_a_customer_angry_throughout_are_not_escalations() -> None:
    _, c = run(calm(9, 100), calm(9), customer=1)
    assert c["escalation"] is False
    metrics, c = run(calm(9, 100), angry(9, 0), customer=1)
    assert c["escalation"] is False  # no rise: they began as they ended
    assert metrics[1]["negative_start"] == 0.9 and metrics[1]["escalations"] == []


def test_the_flag_judges_only_the_customer() -> None:
    _, c = run(calm(6) + angry(3, 18), calm(9, 100), customer=1)  # the agent escalates
    assert c["escalation"] is False
    _, c = run(calm(6) + angry(3, 18), calm(9, 100), customer=0)
    assert c["escalation"] is True
    _, c = run(calm(9, 100), calm(6) + angry(3, 18), customer=None)
    assert c["escalation"] is False and c["customer"] is None


def test_the_flag_needs_enough_speech_in_each_third() -> None:
    short = [seg(0, 1), seg(2, 3), seg(4, 5, "angry", 0.9)]  # a third is 1 s of speech
    metrics, c = run(short, customer=0)
    assert metrics[0]["negative_end"] - metrics[0]["negative_start"] >= conv.RULE.rise
    assert c["escalation"] is False


def test_the_flag_needs_the_end_to_be_negative_enough() -> None:
    mild = [seg(3 * i, 3 * i + 2, negative=0.0) for i in range(6)] + \
           [seg(18 + 3 * i, 20 + 3 * i, negative=0.3) for i in range(3)]
    metrics, c = run(mild, customer=0)
    assert metrics[0]["negative_end"] - metrics[0]["negative_start"] >= conv.RULE.rise
    assert metrics[0]["negative_end"] < conv.RULE.floor
    assert c["escalation"] is False


def test_thirds_split_a_segment_by_its_speech() -> None:
    # 6 s of speech: the first third (2 s) is 1 s of the first segment and 1 s of the middle one.
    metrics, _ = run([seg(0, 1, negative=0.0), seg(2, 6, negative=1.0, emotion="angry"), seg(7, 8, negative=0.0)])
    assert metrics[0]["negative_start"] == 0.5 and metrics[0]["negative_end"] == 0.5


def test_a_moment_needs_enough_speech() -> None:
    one = calm(6) + [seg(18, 20, "angry", 0.9)] + calm(2, 21)
    metrics, _ = run(one)
    assert metrics[0]["escalations"] == []  # one 2 s outburst
    two = calm(6) + [seg(18, 20, "angry", 0.9), seg(21, 23, "angry", 0.9)] + calm(2, 24)
    metrics, _ = run(two)
    assert [(e["start"], e["end"]) for e in metrics[0]["escalations"]] == [(18.0, 23.0)]


def test_a_voice_that_opens_unsteady_needs_a_larger_rise_for_a_moment() -> None:
    # Some voices read as tense to the models now and then even when calm; the same rise is news
    # for a steady voice and not for one whose opening already swung that much (rule.spread).
    rising = [seg(12 + 3 * i, 14 + 3 * i, "angry", 0.6) for i in range(2)]
    steady = [seg(2 * i, 2 * i + 1.9, negative=0.05) for i in range(6)] + rising
    metrics, _ = run(steady)
    assert [(e["start"], e["end"]) for e in metrics[0]["escalations"]] == [(12.0, 17.0)]
    unsteady = [seg(2 * i, 2 * i + 2, negative=0.5 * (i % 2)) for i in range(6)] + rising
    metrics, _ = run(unsteady)
    assert metrics[0]["escalations"] == []  # 0.41 above its opening, whose spread (0.24) asks for 0.48
    no_spread = replace(conv.RULE, spread=0.0)
    metrics, _ = analyse([Track(0, "ch0", unsteady)], 60.0, "mono", rule=no_spread)
    assert [(e["start"], e["end"]) for e in metrics[0]["escalations"]] == [(12.0, 17.0)]


def test_a_moment_names_its_dominant_negative_emotion() -> None:
    fear = []
    for i in range(3):
        s = seg(18 + 3 * i, 20 + 3 * i, "fearful", 0.0)
        s["probabilities"] = {**dict.fromkeys(EMOTIONS, 0.0), "fearful": 0.6, "disgust": 0.2, "neutral": 0.2}
        fear.append(s)
    metrics, _ = run(calm(6) + fear)
    assert [e["emotion"] for e in metrics[0]["escalations"]] == ["fearful"]


# --- words and the transcript ----------------------------------------------------------------

def test_words_per_minute_of_transcribed_speech() -> None:
    segments = [seg(0, 3, text="one two three"), seg(4, 7, words=["four", "five"]), seg(8, 11)]
    metrics, c = run(segments)
    assert metrics[0]["words"] == 5
    assert metrics[0]["words_per_minute"] == 50.0  # 5 words in the 6 s of speech that has a transcript
    assert [line["text"] for line in c["transcript"]] == ["one two three", "four five"]


def test_no_transcript_means_null_words_and_transcript() -> None:
    metrics, c = run(calm(3), calm(3, 50))
    assert all(m["words"] is None and m["words_per_minute"] is None for m in metrics)
    assert c["transcript"] is None


def test_conversation_transcript_in_time_order_with_labels() -> None:
    a = [seg(0, 3, text="hello how can I help"), seg(8, 10, text="sure")]
    b = [seg(3.5, 7, text="my order is late"), seg(11, 12, text="")]
    tracks = [Track(0, "agent", a), Track(1, "customer", b)]
    _, c = analyse(tracks, 12.0, "split", customer_index(["agent", "customer"]))
    assert [(line["start"], line["channel"], line["label"], line["text"]) for line in c["transcript"]] == [
        (0.0, 0, "agent", "hello how can I help"), (3.5, 1, "customer", "my order is late"),
        (8.0, 0, "agent", "sure")]


# --- edge cases ------------------------------------------------------------------------------

def test_one_track_mono() -> None:
    metrics, c = run(calm(6) + angry(3, 18), mode="mono", customer=customer_index(["ch0"]))
    assert c["channels"] == "mono" and c["customer"] == 0 and c["escalation"] is True
    assert c["overlaps"] == 0 and c["interruptions"] == [] and c["turns"] == 1
    assert metrics[0]["talk_share"] == 1.0


def test_a_track_without_speech() -> None:
    metrics, c = run(calm(3), [], customer=1)
    empty = metrics[1]
    assert empty["talk_s"] == 0 and empty["talk_share"] == 0 and empty["turns"] == 0
    assert empty["emotion_share"] == {} and empty["negative_start"] is None and empty["negative_end"] is None
    assert empty["escalations"] == [] and empty["longest_monologue_s"] == 0
    assert c["escalation"] is False and c["turns"] == 1


def test_no_speech_at_all_and_zero_duration() -> None:
    metrics, c = run([], [], duration=10.0)
    assert c["silence_share"] == 1.0 and c["turns"] == 0 and all(m["talk_share"] == 0 for m in metrics)
    _, c = run([], duration=0.0)
    assert c["silence_share"] == 0.0 and c["duration_s"] == 0.0


def test_speech_past_the_end_is_clipped_for_silence() -> None:
    _, c = run([seg(8, 12), seg(13, 14)], duration=10.0)
    assert c["silence_share"] == 0.8


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mode": "stereo"}, "mode"), ({"duration_s": -1.0}, "negative"), ({"customer": 5}, "customer")])
def test_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"tracks": [Track(0, "a", calm(2))], "duration_s": 10.0, "mode": "mono"} | kwargs
    with pytest.raises(ValueError, match=message):
        analyse(**args)
    with pytest.raises(ValueError, match="repeat"):
        analyse([Track(0, "a", []), Track(0, "b", [])], 10.0, "split")


def test_customer_index() -> None:
    assert customer_index(["agent", "customer"]) == 1
    assert customer_index([" Customer", "agent"]) == 0
    assert customer_index(["caller", "agent"], "caller") == 0
    assert customer_index(["ch0", "ch1", "ch2"]) == 1
    assert customer_index(["ch0", "ch1"], None) == 1
    assert customer_index(["ch0"]) == 0
    assert customer_index([]) is None
