"""Long recordings are cut into speech segments, each classified; the recording's result is theirs."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from ser_ml.features import SAMPLE_RATE
from ser_ml.segments import MAX_SEGMENT_S, find_segments
from ser_shared.audio import decode
from ser_shared.settings import REPO_ROOT, Settings
from tests.conftest import WorkerProcess, ravdess_file, wait_for
from tests.helpers import multipart

# Angry, sad and surprised clips that the shipped models classify correctly on their own.
CLIPS = [(3, "05", "angry"), (8, "04", "sad"), (15, "08", "surprised")]


def _stitched(path: Path) -> list[tuple[float, float]]:
    """The three clips with 1.5 s of faint noise between them; returns each clip's interval."""
    rng = np.random.default_rng(0)
    parts, spans, t = [], [], 0.5

    def gap(seconds: float) -> np.ndarray:
        return (rng.standard_normal(int(seconds * SAMPLE_RATE)) * 1e-3).astype(np.float32)

    parts.append(gap(0.5))
    for actor, code, _ in CLIPS:
        clip = decode(ravdess_file(actor, code, "02"), "flac", SAMPLE_RATE, 600.0)
        parts += [clip, gap(1.5)]
        spans.append((t, t + clip.size / SAMPLE_RATE))
        t += clip.size / SAMPLE_RATE + 1.5
    sf.write(path, np.concatenate(parts), SAMPLE_RATE, subtype="PCM_16")
    return spans


def test_a_short_recording_is_one_segment() -> None:
    audio = decode(ravdess_file(1, "05"), "flac", SAMPLE_RATE, 600.0)
    (only,) = find_segments(audio)
    assert only.start == 0.0 and only.end == pytest.approx(audio.size / SAMPLE_RATE, abs=1e-3)


def test_continuous_speech_is_cut_into_utterance_sized_segments() -> None:
    t = np.arange(int(25 * SAMPLE_RATE), dtype=np.float32) / SAMPLE_RATE
    voiced = 0.2 * np.sin(2 * np.pi * 160 * t) * (1.2 + np.sin(2 * np.pi * 3 * t))  # no pauses at all
    segments = find_segments(voiced.astype(np.float32))
    assert len(segments) >= 3
    assert all(s.end - s.start <= MAX_SEGMENT_S + 0.31 for s in segments)
    assert all(a.end <= b.start for a, b in zip(segments, segments[1:], strict=False))


def test_stitched_clips_give_one_segment_each_with_their_labels(tmp_path: Path) -> None:
    from ser_ml.inference import Ensemble
    from ser_ml.pipeline import JobInput, run

    path = tmp_path / "stitched.wav"
    clips = _stitched(path)
    ensemble = Ensemble.load(REPO_ROOT / "models")
    settings = Settings(env="test")
    (outcome,) = run(ensemble, [JobInput(uuid.uuid4(), path, "wav")], settings)
    assert outcome.segments is not None and len(outcome.segments) == len(CLIPS)
    for segment, (start, end), (actor, code, label) in zip(outcome.segments, clips, CLIPS, strict=True):
        # Boundaries fall in the silences: each segment lies within its own clip's span.
        assert start <= segment["start"] < segment["end"] <= end, (segment, start, end)
        (alone,) = run(ensemble, [JobInput(uuid.uuid4(), ravdess_file(actor, code, "02"), "flac")], settings)
        assert alone.prediction is not None and alone.prediction.emotion == label
        assert segment["emotion"] == label
    # The recording's result is the speech-weighted mean of its segments.
    weights = np.array([s["speech_s"] for s in outcome.segments])
    mean = sum(w * np.array(list(s["probabilities"].values())) for w, s in zip(weights, outcome.segments,
                                                                             strict=True)) / weights.sum()
    assert outcome.prediction is not None
    np.testing.assert_allclose(list(outcome.prediction.probabilities.values()), mean, atol=1e-5)


def test_segments_through_the_api(client, pg_worker: WorkerProcess, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "call.wav"
    _stitched(path)
    resp = client.post("/api/v1/jobs", data=multipart([(path.name, path.read_bytes())], client_reference="seg"),
                       content_type="multipart/form-data")
    url = resp.get_json()["jobs"][0]["url"]
    job = wait_for(lambda: (j := client.get(url).get_json())["status"] == "succeeded" and j, timeout=120)
    assert [s["emotion"] for s in job["result"]["segments"]] == [label for _, _, label in CLIPS]
    assert job["progress"] == 100
    listed = client.get("/api/v1/jobs", query_string={"client_reference": "seg"}).get_json()["jobs"]
    assert "segments" not in listed[0]["result"]
    listed = client.get("/api/v1/jobs", query_string={"client_reference": "seg", "segments": "true"}).get_json()
    assert len(listed["jobs"][0]["result"]["segments"]) == len(CLIPS)
    page = client.get(f"/jobs/{job['id']}").get_data(as_text=True)
    assert page.count('class="segment ') == len(CLIPS)
    history = client.get("/history", query_string={"q": "call.wav"}).get_data(as_text=True)
    assert 'class="dominant"' in history and "angry" in history and "surprised" in history


def test_export_streams_jobs_and_optionally_their_segments(client, pg_worker: WorkerProcess,  # type: ignore[no-untyped-def]
                                                           tmp_path: Path) -> None:
    import csv
    import io

    path = tmp_path / "export.wav"
    _stitched(path)
    ref = f"export-{uuid.uuid4()}"
    resp = client.post("/api/v1/jobs", data=multipart([(path.name, path.read_bytes()), ("bad.wav", b"junk")],
                                                      client_reference=ref), content_type="multipart/form-data")
    good = resp.get_json()["jobs"][0]["url"]
    wait_for(lambda: client.get(good).get_json()["status"] == "succeeded", timeout=120)
    flat = client.get("/api/v1/export", query_string={"client_reference": ref})
    assert flat.status_code == 200 and flat.mimetype == "text/csv"
    rows = list(csv.DictReader(io.StringIO(flat.get_data(as_text=True))))
    assert sorted(r["status"] for r in rows) == ["failed", "succeeded"]
    per_segment = client.get("/api/v1/export", query_string={"client_reference": ref, "segments": "true",
                                                             "format": "json"}).get_json()
    segs = [r for r in per_segment if r["status"] == "succeeded"]
    assert [r["emotion"] for r in segs] == [label for _, _, label in CLIPS]
    assert all(r["start_s"] < r["end_s"] for r in segs) and len(per_segment) == len(CLIPS) + 1
    assert client.get("/api/v1/export", query_string={"format": "xml"}).status_code == 400
