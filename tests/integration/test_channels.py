"""Channels are speakers: two-actor calls made of real RAVDESS speech (``bench.calls``), analysed
per channel by the served models.

The call: actor 02 (the agent, neutral) on the left, actor 03 (the customer, angry) on the right,
eight alternating turns with pauses, two overlaps of about a second, each channel leaking into the
other at -25 dB. Also: the same call mixed to mono, through 8 kHz µ-law, duplicated on both
channels, and with one channel dead. The shipped models were trained on these actors among
RAVDESS's 20 (models/MODEL_CARD.md), so the emotion checks are about keeping the speakers apart,
not about accuracy on unseen voices: they compare the two channels rather than trust one label.
"""

from __future__ import annotations

import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.calls import ESCALATING, SCRIPT, SCRIPT_OVERLAPS, Call, build_call, long_script, mulaw_8k, write
from ser_ml import channels, pipeline, vad
from ser_ml.conversation import NEGATIVE
from ser_ml.inference import Ensemble
from ser_ml.pipeline import JobInput, Outcome, run
from ser_ml.segments import frame_energy_db
from ser_shared import schemas
from ser_shared.settings import REPO_ROOT, Settings
from tests.conftest import RAVDESS

LABELS = ["agent", "customer"]
# A segment reaches SEGMENT_PAD_S into the pauses; Silero's probabilities come per 32 ms window,
# with hysteresis, so its edges may fall a window or two from the speech's.
TOL = vad.SEGMENT_PAD_S + 3 * vad.WINDOW_S


@pytest.fixture(scope="module")
def ensemble() -> Ensemble:
    return Ensemble.load(REPO_ROOT / "models")


@pytest.fixture(scope="module")
def settings() -> Settings:
    return Settings(env="test")


@pytest.fixture(scope="module")
def call() -> Call:
    return build_call(RAVDESS, SCRIPT)


@pytest.fixture(scope="module")
def files(call: Call, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("calls")
    stereo = write(call.audio, tmp / "call.wav")
    dead = call.audio.copy()
    dead[1] = np.random.default_rng(5).standard_normal(dead.shape[1]).astype(np.float32) * 1e-4
    return {"stereo": stereo, "mono": write(call.mono(), tmp / "mono.wav"),
            "mulaw": mulaw_8k(stereo, tmp / "call-8k-ulaw.wav"),
            "copies": write(np.stack([call.mono(), call.mono()]), tmp / "copies.wav"),
            "dead": write(dead, tmp / "dead.wav")}


def _run(ensemble: Ensemble, settings: Settings, path: Path, **options: Any) -> Outcome:
    (outcome,) = run(ensemble, [JobInput(uuid.uuid4(), path, "wav", channel_labels=LABELS, **options)], settings)
    assert outcome.error_code is None, outcome.error_message
    for entry in outcome.channels or []:
        schemas.Channel.build(entry)  # strict: exactly the served shape
    schemas.Conversation.build(outcome.conversation or {})
    return outcome


@pytest.fixture(scope="module")
def split(ensemble: Ensemble, settings: Settings, files: dict[str, Path]) -> Outcome:
    return _run(ensemble, settings, files["stereo"])


def _overlapping(segment: dict[str, Any], turns: list[Any]) -> list[Any]:
    return [t for t in turns if min(segment["end"], t.end) > max(segment["start"], t.start)]


def _assert_turns(outcome: Outcome, call: Call) -> None:
    """Each channel has one segment per turn of its speaker, at the turn's time, and none elsewhere."""
    assert outcome.channels is not None
    for entry in outcome.channels:
        turns = call.of(entry["index"])
        assert len(entry["segments"]) == len(turns), (entry["label"], entry["segments"], turns)
        for segment, turn in zip(entry["segments"], turns, strict=True):
            assert abs(segment["start"] - turn.start) <= TOL, (entry["label"], segment, turn)
            assert abs(segment["end"] - turn.end) <= TOL, (entry["label"], segment, turn)


def test_auto_splits_a_call_and_finds_each_turn_on_its_speakers_channel(split: Outcome, call: Call) -> None:
    assert split.mode == "split" and split.conversation is not None and split.conversation["channels"] == "split"
    assert split.channels is not None and [(c["index"], c["label"]) for c in split.channels] == [(0, "agent"),
                                                                                                (1, "customer")]
    _assert_turns(split, call)
    # The recording's segments are both channels' in time order, so old clients still see them all.
    assert split.segments == sorted(split.channels[0]["segments"] + split.channels[1]["segments"],
                                    key=lambda s: s["start"])


def test_real_overlaps_stay_speech_on_both_channels(split: Outcome, call: Call) -> None:
    assert split.channels is not None
    overlaps = [(a, b) for a in call.of(0) for b in call.of(1) if min(a.end, b.end) - max(a.start, b.start) > 0.5]
    assert len(overlaps) == SCRIPT_OVERLAPS
    for a, b in overlaps:
        both = (max(a.start, b.start), min(a.end, b.end))
        for entry in split.channels:
            assert any(s["start"] <= both[0] + TOL and s["end"] >= both[1] - TOL for s in entry["segments"]), \
                (entry["label"], both, entry["segments"])
    assert split.conversation is not None and split.conversation["overlaps"] == SCRIPT_OVERLAPS
    # Each overlap is one speaker cutting in on the other, who stops within a second.
    assert sorted((i["by"], i["of"]) for i in split.conversation["interruptions"]) == [(0, 1), (1, 0)]
    assert split.conversation["turns"] == len(SCRIPT)


def test_crosstalk_never_becomes_a_segment_of_the_wrong_speaker(split: Outcome, call: Call) -> None:
    """Silero alone hears the -25 dB leakage as speech; the channel-energy comparison drops it."""
    assert split.channels is not None
    for entry in split.channels:
        index = entry["index"]
        other = [t for t in call.of(1 - index)
                 if not any(min(t.end, mine.end) > max(t.start, mine.start) for mine in call.of(index))]
        leaked = vad.speech_segments(call.audio[index])
        assert any(_overlapping(s.__dict__, other) for s in leaked), "the leakage should be audible to Silero"
        for segment in entry["segments"]:
            assert _overlapping(segment, call.of(index)), (entry["label"], segment)


def test_each_speaker_gets_their_own_emotion(split: Outcome) -> None:
    assert split.channels is not None and split.prediction is not None
    agent, customer = split.channels
    assert customer["emotion"] == "angry"
    assert customer["probabilities"]["angry"] > agent["probabilities"]["angry"] + 0.5
    assert sum(agent["probabilities"][e] for e in NEGATIVE) < 0.3
    assert all(s["emotion"] not in NEGATIVE for s in agent["segments"])
    # The recording's result: every segment of both channels, weighted by its speech.
    segs = agent["segments"] + customer["segments"]
    weights = np.array([s["speech_s"] for s in segs])
    mean = sum(w * np.array(list(s["probabilities"].values())) for w, s in zip(weights, segs, strict=True))
    np.testing.assert_allclose(list(split.prediction.probabilities.values()), mean / weights.sum(), atol=1e-5)
    assert [c["speech_s"] for c in split.channels] == [round(sum(s["speech_s"] for s in c["segments"]), 3)
                                                       for c in split.channels]


def test_the_mono_mix_is_one_speaker(ensemble: Ensemble, settings: Settings, files: dict[str, Path],
                                     split: Outcome) -> None:
    mono = _run(ensemble, settings, files["mono"])
    assert mono.mode == "mono" and mono.conversation is not None and mono.conversation["channels"] == "mono"
    assert mono.channels is not None and len(mono.channels) == 1
    (only,) = mono.channels
    assert (only["index"], only["label"]) == (0, "agent") and only["segments"] == mono.segments
    assert mono.prediction is not None and only["emotion"] == mono.prediction.emotion
    # Mixed, the two speakers' turns merge into fewer, longer segments than the split call has.
    assert split.segments is not None and len(mono.segments or []) < len(split.segments)


def test_auto_mixes_a_stereo_file_of_one_microphone(ensemble: Ensemble, settings: Settings,
                                                    files: dict[str, Path]) -> None:
    copies = _run(ensemble, settings, files["copies"])
    mono = _run(ensemble, settings, files["mono"])
    assert copies.mode == "mix" and copies.channels is not None and len(copies.channels) == 1
    assert copies.prediction is not None and mono.prediction is not None
    assert copies.prediction.emotion == mono.prediction.emotion
    np.testing.assert_allclose(list(copies.prediction.probabilities.values()),
                               list(mono.prediction.probabilities.values()), atol=2e-3)
    # Asked to split anyway, it does: two channels hearing the same speech.
    forced = _run(ensemble, settings, files["copies"], channels="split")
    assert forced.mode == "split" and forced.channels is not None
    assert [len(c["segments"]) for c in forced.channels] == [len(copies.segments or [])] * 2


def test_asked_to_mix_a_call_it_mixes(ensemble: Ensemble, settings: Settings, files: dict[str, Path]) -> None:
    mixed = _run(ensemble, settings, files["stereo"], channels="mix")
    assert mixed.mode == "mix" and mixed.channels is not None and len(mixed.channels) == 1
    assert mixed.conversation is not None and mixed.conversation["channels"] == "mix"


def test_the_auto_rule_measures(call: Call) -> None:
    """The rule's figures on the test material (the module doc of ser_ml.channels quotes them)."""
    two = channels.decide(np.stack([frame_energy_db(row) for row in call.audio]))
    same = channels.decide(np.stack([frame_energy_db(call.mono())] * 2))
    assert two.mode == "split" and max(two.spreads_db) > 4 * channels.COPY_DB
    assert same.mode == "mix" and same.spreads_db == (0.0, 0.0)


def test_an_8khz_mulaw_call_still_splits(ensemble: Ensemble, settings: Settings, files: dict[str, Path],
                                         call: Call) -> None:
    telephone = _run(ensemble, settings, files["mulaw"])
    assert telephone.mode == "split"
    _assert_turns(telephone, call)
    assert telephone.channels is not None
    agent, customer = telephone.channels
    assert customer["emotion"] == "angry" and customer["probabilities"]["angry"] > agent["probabilities"]["angry"]


def test_a_dead_channel_is_a_speaker_with_no_speech(ensemble: Ensemble, settings: Settings,
                                                    files: dict[str, Path]) -> None:
    dead = _run(ensemble, settings, files["dead"])
    assert dead.mode == "split" and dead.channels is not None
    agent, customer = dead.channels
    assert customer["emotion"] is None and customer["probabilities"] is None and customer["segments"] == []
    assert customer["speech_s"] == 0 and customer["metrics"]["talk_s"] == 0
    assert agent["emotion"] is not None and dead.prediction is not None
    assert dead.prediction.probabilities == agent["probabilities"]  # the recording is its live channel


def test_a_recording_with_speech_on_no_channel_fails_no_speech(ensemble: Ensemble, settings: Settings,
                                                               tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    t = np.arange(16000 * 6) / 16000
    hum = np.stack([0.1 * np.sin(2 * np.pi * 440 * t), 0.05 * rng.standard_normal(t.size)]).astype(np.float32)
    for mode in ("auto", "split"):
        (outcome,) = run(ensemble, [JobInput(uuid.uuid4(), write(hum, tmp_path / "hum.wav"), "wav", channels=mode)],
                         settings)
        assert (outcome.error_code, outcome.channels) == ("no_speech", None)


def test_a_call_that_turns_angry_raises_the_escalation_flag(ensemble: Ensemble, settings: Settings,
                                                            split: Outcome, tmp_path: Path) -> None:
    escalating = build_call(RAVDESS, ESCALATING, seed=1)
    outcome = _run(ensemble, settings, write(escalating.audio, tmp_path / "escalating.wav"))
    assert outcome.conversation is not None and split.conversation is not None
    assert (outcome.conversation["customer"], outcome.conversation["escalation"]) == (1, True)
    assert split.conversation["escalation"] is False  # angry from the first word: no rise
    _assert_turns(outcome, escalating)


def _peak_bytes(ensemble: Ensemble, settings: Settings, path: Path) -> tuple[Outcome, int]:
    tracemalloc.start()
    try:
        outcome = _run(ensemble, settings, path)
        return outcome, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_long_call_is_streamed_channel_by_channel_in_bounded_memory(
        ensemble: Ensemble, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over a minute, a call is streamed: doubling its length (100 s to 200 s) adds next to nothing
    to the memory it takes (decoded whole, the longer one would add its 13 MB at least; streamed,
    the peak stays at 33-37 MB whatever the length, from the 30 s blocks of both channels and the
    encoder), and its result is what decoding it whole gives."""
    short, long = build_call(RAVDESS, long_script(5)), build_call(RAVDESS, long_script(10))
    assert short.duration_s > pipeline.STREAM_OVER_S
    paths = [write(c.audio, tmp_path / f"{i}.wav") for i, c in enumerate((short, long))]
    (streamed, low), (longer, high) = (_peak_bytes(ensemble, settings, path) for path in paths)
    assert streamed.mode == longer.mode == "split" and "vad" not in streamed.timings_ms  # no VAD stage: streamed
    _assert_turns(longer, long)
    grown = long.audio.nbytes - short.audio.nbytes
    assert high - low < 0.5 * grown, (low, high, grown)
    monkeypatch.setattr(pipeline, "STREAM_OVER_S", 1e9)
    whole = _run(ensemble, settings, paths[0])
    assert "vad" in whole.timings_ms and whole.channels is not None and streamed.channels is not None
    for a, b in zip(whole.channels, streamed.channels, strict=True):
        assert [(s["start"], s["end"], s["emotion"]) for s in a["segments"]] == \
            [(s["start"], s["end"], s["emotion"]) for s in b["segments"]]
        np.testing.assert_allclose(list(a["probabilities"].values()), list(b["probabilities"].values()), atol=1e-4)


# --- the worker: what it stores ------------------------------------------------------------------

def _stored_job(factory: Any, settings: Settings, audio: np.ndarray, **options: Any) -> uuid.UUID:
    """A queued job whose recording (``audio``, channels x samples) is in the store, as an upload leaves it."""
    from ser_shared.models import Batch, Job

    key = f"calls/{uuid.uuid4().hex}"
    path = settings.upload_dir / key
    path.parent.mkdir(parents=True, exist_ok=True)
    write(audio, path)
    batch = Batch(id=uuid.uuid4(), file_count=1, options=options)
    job = Job(id=uuid.uuid4(), batch_id=batch.id, filename="call.wav", status="queued", options=options,
              size_bytes=path.stat().st_size, attempts=0, storage_key=key, format="wav",
              duration_s=round(audio.shape[1] / 16000, 3), sample_rate=16000, channels=audio.shape[0])
    with factory() as session:
        session.add_all([batch, job])
        session.commit()
    return job.id


def _valid(result: Any) -> None:
    """The stored channels and conversation are exactly the served shapes (strict schemas)."""
    assert result.channels is not None and result.conversation is not None
    for entry in result.channels:
        schemas.Channel.build(entry)
    schemas.Conversation.build(result.conversation)
    if result.transcript is not None:
        schemas.Transcript.build(result.transcript)


def test_the_worker_stores_a_split_call_once(ensemble: Ensemble, pg_settings: Settings, call: Call) -> None:
    from sqlalchemy import func, select

    from ser_shared.db import make_engine, make_session_factory
    from ser_shared.models import Job, Result
    from worker import results

    factory = make_session_factory(make_engine(pg_settings))
    job_id = _stored_job(factory, pg_settings, call.audio, channels="auto", channel_labels=LABELS)
    (job,) = results.claim(factory, [str(job_id)], pg_settings).inputs
    assert (job.channels, list(job.channel_labels or []), job.channel_count) == ("auto", LABELS, 2)
    outcomes = run(ensemble, [job], pg_settings)
    results.persist(factory, outcomes, ensemble.versions)
    results.persist(factory, outcomes, ensemble.versions)  # a redelivery: one row, the same values
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(Result).where(Result.job_id == job_id)) == 1
        result, stored = session.get(Result, job_id), session.get(Job, job_id)
        assert result is not None and stored is not None
        _valid(result)
        assert [(c["label"], c["emotion"]) for c in result.channels or []] == [("agent", "neutral"),
                                                                              ("customer", "angry")]
        assert result.conversation is not None and result.conversation["channels"] == "split"
        assert result.segments == merged_in_time(result.channels or [])
        assert stored.status == "succeeded" and stored.escalation is False


def merged_in_time(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted((s for e in entries for s in e["segments"]), key=lambda s: (s["start"], s["end"]))


def test_the_transcript_stage_transcribes_each_channel_and_redoes_the_conversation(
        ensemble: Ensemble, pg_settings: Settings) -> None:
    """Agent, customer, agent: the agent's two segments are transcribed one by one, the customer's
    one segment as the channel muted outside it. Both the stage after the analysis and its redo
    from the stored recording (a worker killed during it) attach the text to the right speaker."""
    from ser_shared.db import make_engine, make_session_factory
    from ser_shared.models import Result
    from worker import results, tasks

    small = build_call(RAVDESS, SCRIPT[:3])
    settings = pg_settings.model_copy(update={"transcribe_timeout_s": 60.0})
    factory = make_session_factory(make_engine(settings))
    job_id = _stored_job(factory, settings, small.audio, transcribe="sphinx", channel_labels=LABELS)
    outcomes = run(ensemble, results.claim(factory, [str(job_id)], settings).inputs, settings)
    results.persist(factory, outcomes, ensemble.versions)
    tasks._transcripts(factory, outcomes, settings)
    with factory() as session:
        first = session.get(Result, job_id)
        assert first is not None and first.transcript is not None and first.transcript["status"] == "succeeded"
        _check_transcribed(first, small)
        first_lines = first.conversation["transcript"] if first.conversation else None
        # As if the worker had died during the stage: pending again, made from the stored recording.
        first.transcript = {**first.transcript, "status": "pending", "text": None}
        first.channels = [{**entry, "segments": [{k: v for k, v in s.items() if k not in ("transcript", "words")}
                                                 for s in entry["segments"]]} for entry in first.channels or []]
        session.commit()
    assert tasks._owed_transcripts(factory, [job_id], settings) == 1
    with factory() as session:
        again = session.get(Result, job_id)
        assert again is not None and again.transcript is not None and again.transcript["status"] == "succeeded"
        _check_transcribed(again, small)
        assert again.conversation is not None and again.conversation["transcript"] == first_lines


def _check_transcribed(result: Any, call: Call) -> None:
    _valid(result)
    assert result.conversation["transcript"] is not None
    lines = result.conversation["transcript"]
    # One line per segment that has text, in time order, each under its own speaker's label.
    assert [line["start"] for line in lines] == sorted(line["start"] for line in lines)
    for line in lines:
        assert line["label"] == LABELS[line["channel"]]
        assert any(abs(line["start"] - t.start) <= TOL for t in call.of(line["channel"]))
    assert {line["channel"] for line in lines} == {0, 1}
    # The turns' sentences: "Kids are talking by the door" (agent, customer), then "Dogs are sitting
    # by the door" (agent). Even Sphinx hears their first word, on the channel that said it.
    assert [line["text"].split()[0].strip(".,!?").lower() for line in lines] == ["kids", "kids", "dogs"], lines
    for entry in result.channels:
        assert entry["metrics"]["words"] and entry["metrics"]["words_per_minute"]
    assert result.segments == merged_in_time(result.channels)
