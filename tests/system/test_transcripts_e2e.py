"""Transcripts as a job stage, through the real API and a real worker (Postgres, Redis)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import WorkerProcess, ravdess_file, wait_for
from tests.helpers import multipart, read

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng makes the test speech")


def _speech(tmp_path: Path, text: str, voice: str = "en-us+f2", speed: int = 150) -> tuple[str, bytes]:
    out = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(out), text], check=True)
    return out.name, out.read_bytes()


def _finished(client, url: str) -> dict | None:  # type: ignore[no-untyped-def]
    job = client.get(url).get_json()
    transcript = (job.get("result") or {}).get("transcript") or {}
    return job if job["status"] == "succeeded" and transcript.get("status") != "pending" else None


@pytest.mark.parametrize("engine", ["whisper", "sphinx"])
def test_offline_transcript_comes_back_with_the_emotion(client, pg_worker: WorkerProcess,  # type: ignore[no-untyped-def]
                                                         tmp_path: Path, engine: str) -> None:
    """Whisper tiny.en, asked for as whisper or, by an old client, as sphinx (which Whisper now serves)."""
    resp = client.post("/api/v1/jobs", data=multipart([_speech(tmp_path, "we are going to the market this afternoon")],
                                                      transcribe=engine, language="en-US"),
                       content_type="multipart/form-data")
    assert resp.status_code == 202
    job = wait_for(lambda: _finished(client, resp.get_json()["jobs"][0]["url"]), timeout=120)
    transcript = job["result"]["transcript"]
    assert transcript["status"] == "succeeded" and transcript["engine"] == engine, transcript
    assert transcript["model"] == "whisper-tiny.en"
    words = set(transcript["text"].lower().split())
    assert len(words & {"going", "market", "afternoon"}) >= 2, transcript
    assert job["result"]["emotion"] and job["options"]["transcribe"] == engine
    (segment,) = job["result"]["segments"]  # a short recording: one segment, with its words in it
    assert segment["transcript"] == transcript["text"]
    assert [w["word"] for w in segment["words"]] == transcript["text"].split()
    assert all(segment["start"] <= w["start"] <= w["end"] <= segment["end"] for w in segment["words"])


def test_hindi_speech_comes_back_in_devanagari(client, pg_worker: WorkerProcess,  # type: ignore[no-untyped-def]
                                                tmp_path: Path) -> None:
    resp = client.post("/api/v1/jobs", data=multipart([_speech(tmp_path, "मेरा नाम राम है और मैं दिल्ली में रहता हूँ",
                                                               voice="hi", speed=130)],
                                                      transcribe="whisper", language="hi-IN"),
                       content_type="multipart/form-data")
    assert resp.status_code == 202
    job = wait_for(lambda: _finished(client, resp.get_json()["jobs"][0]["url"]), timeout=120)
    transcript = job["result"]["transcript"]
    assert (transcript["status"], transcript["model"], transcript["language"]) == ("succeeded", "whisper-base",
                                                                                   "hi-IN"), transcript
    assert sum("\u0900" <= ch <= "\u097f" for ch in transcript["text"]) >= 5, transcript
    assert job["result"]["emotion"]


def test_unreachable_google_leaves_the_emotion_intact(client, pg_worker: WorkerProcess) -> None:  # type: ignore[no-untyped-def]
    # This machine reaches no Google endpoint: the transcript must say so, the emotion must stand.
    resp = client.post("/api/v1/jobs", data=multipart([read(ravdess_file(8, "05", "02"))], transcribe="google",
                                                      language="hi-IN"),
                       content_type="multipart/form-data")
    job = wait_for(lambda: _finished(client, resp.get_json()["jobs"][0]["url"]), timeout=120)
    transcript = job["result"]["transcript"]
    assert transcript["status"] == "unavailable" and transcript["reason"] in ("network_error", "timeout")
    assert transcript["language"] == "hi-IN" and transcript["text"] is None
    assert transcript["seconds"] <= 10.0 + 2.0  # bounded by SER_TRANSCRIBE_TIMEOUT_S (10 s in the tests)
    assert job["result"]["emotion"] and job["error"] is None


@pytest.mark.parametrize("fields", [{"transcribe": "vosk"}, {"transcribe": "google", "language": "english!"}])
def test_bad_transcript_options_are_400(client, fields: dict) -> None:  # type: ignore[no-untyped-def]
    resp = client.post("/api/v1/jobs", data=multipart([read(ravdess_file(8, "03"))], **fields),
                       content_type="multipart/form-data")
    assert resp.status_code == 400 and resp.get_json()["error"]["code"] == "invalid_option"


def test_each_segment_of_a_long_recording_gets_its_own_transcript(tmp_path: Path) -> None:
    import uuid

    import numpy as np
    import soundfile as sf

    from ser_ml.features import SAMPLE_RATE
    from ser_ml.inference import Ensemble
    from ser_ml.pipeline import JobInput, run
    from ser_ml.transcript_stage import transcribe_all
    from ser_shared import schemas
    from ser_shared.audio import decode
    from ser_shared.settings import REPO_ROOT, Settings

    sentences = ["we are going to the market this afternoon", "the weather is cold and windy today",
                 "please open the window in the kitchen"]
    pause = np.zeros(int(1.5 * SAMPLE_RATE), dtype=np.float32)
    parts = [pause]
    for k, text in enumerate(sentences):
        (tmp_path / f"s{k}").mkdir()
        name, _ = _speech(tmp_path / f"s{k}", text)
        parts += [decode(tmp_path / f"s{k}" / name, "wav", SAMPLE_RATE, 600.0), pause]
    path = tmp_path / "three.wav"
    sf.write(path, np.concatenate(parts), SAMPLE_RATE, subtype="PCM_16")
    settings = Settings(env="test", transcribe_timeout_s=60.0)
    job = JobInput(uuid.uuid4(), path, "wav", transcribe="whisper", language="en-US")
    (outcome,) = run(Ensemble.load(REPO_ROOT / "models"), [job], settings)
    assert outcome.segments is not None and len(outcome.segments) == 3
    transcript = transcribe_all([outcome], settings)[job.id]
    assert transcript["status"] == "succeeded" and transcript["segments"] is True
    for segment, text in zip(outcome.segments, sentences, strict=True):
        heard = set(re.sub(r"[^\w\s]", "", segment["transcript"] or "").lower().split())
        assert len(heard & set(text.split()) - {"the", "is", "in", "to", "are", "and"}) >= 2, (segment, text)
        # Word times are the recording's: inside this segment, in order.
        times = [(w["start"], w["end"]) for w in segment["words"]]
        assert times and all(segment["start"] <= a <= b <= segment["end"] for a, b in times), (segment, times)
        assert all(b1 <= a2 for (_, b1), (a2, _) in zip(times, times[1:], strict=False))
        schemas.Segment.model_validate(segment)  # what the worker stores is the served shape
