"""Long recordings: streamed decoding equals whole decoding, and 30 minutes run in bounded memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from ser_ml.features import SAMPLE_RATE
from ser_ml.segments import EnergyMeter, frame_energy_db
from ser_shared.audio import decode, decode_channels, stream, stream_channels
from ser_shared.settings import REPO_ROOT
from tests.conftest import RAVDESS, settings_env


@pytest.mark.parametrize(("fmt", "rate", "channels"), [("wav", 48000, 2), ("flac", 16000, 1), ("m4a", 44100, 1),
                                                       ("flac", 8000, 3), ("m4a", 44100, 2)])
def test_streamed_decode_equals_whole_decode(tmp_path: Path, fmt: str, rate: int, channels: int) -> None:
    rng = np.random.default_rng(3)
    audio = (0.1 * rng.standard_normal((rate * 7, channels))).astype(np.float32)
    wav = tmp_path / "x.wav"
    sf.write(wav, audio, rate, subtype="PCM_16")
    path = wav
    if fmt != "wav":
        path = tmp_path / f"x.{fmt}"
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(wav), "-ar", str(rate), str(path)], check=True)
    whole = decode(path, fmt, SAMPLE_RATE, 600.0)
    blocks = list(stream(path, fmt, SAMPLE_RATE, 600.0, block_s=1.3))
    assert len(blocks) > 3
    joined = np.concatenate(blocks)
    assert joined.size == whole.size
    np.testing.assert_allclose(joined, whole, atol=1e-6)
    meter = EnergyMeter()
    for block in blocks:
        meter.feed(block)
    np.testing.assert_array_equal(meter.finish(), frame_energy_db(whole))
    # Channel by channel: (channels, samples) blocks that join to the whole decode, whose mean is the mono one.
    apart = decode_channels(path, fmt, SAMPLE_RATE, 600.0)
    planar = list(stream_channels(path, fmt, SAMPLE_RATE, 600.0, block_s=1.3))
    assert apart.shape == (channels, whole.size) and all(b.shape[0] == channels for b in planar)
    np.testing.assert_allclose(np.concatenate(planar, axis=1), apart, atol=1e-6)
    if fmt != "m4a":  # ffmpeg's own downmix is louder than the channels' mean
        np.testing.assert_allclose(apart.mean(axis=0), whole, atol=1e-6)


PROBE = """
import json, resource, sys, uuid
from pathlib import Path
from ser_ml.allocator import tune_malloc
from ser_shared.settings import get_settings
from ser_ml.inference import Ensemble
from ser_ml.pipeline import JobInput, run
tune_malloc()
ensemble = Ensemble.load(get_settings().models_dir)
path = Path(sys.argv[1])
(outcome,) = run(ensemble, [JobInput(uuid.uuid4(), path, "flac")], get_settings())
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "segments": len(outcome.segments or []), "emotion": outcome.prediction and outcome.prediction.emotion,
                  "duration_s": outcome.duration_s, "ms": outcome.timings_ms["total"]}))
"""


def _speech(path: Path, seconds: float) -> int:
    """Real clips with short pauses between them, joined to ``seconds``, written as FLAC; returns
    how many clips it holds."""
    clips = [decode(p, "flac", SAMPLE_RATE, 600.0) for p in sorted(RAVDESS.rglob("*.flac"))[:60]]
    rng = np.random.default_rng(0)
    parts, total, i = [], 0, 0
    while total < seconds * SAMPLE_RATE:
        pause = (1e-3 * rng.standard_normal(int(SAMPLE_RATE * rng.uniform(0.3, 1.5)))).astype(np.float32)
        parts += [clips[i % len(clips)], pause]
        total += clips[i % len(clips)].size + pause.size
        i += 1
    sf.write(path, np.concatenate(parts)[: int(seconds * SAMPLE_RATE)], SAMPLE_RATE, subtype="PCM_16")
    return i


def _run(path: Path, pg_settings) -> dict:  # type: ignore[no-untyped-def]
    proc = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, timeout=600,
                          cwd=REPO_ROOT, env=settings_env(pg_settings))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_thirty_minutes_in_bounded_memory(tmp_path: Path, pg_settings) -> None:  # type: ignore[no-untyped-def]
    """The worker's path on 2 and 30 minutes of speech, each in a fresh process: the longer one's
    peak RSS may exceed the shorter one's by at most 100 MB (a whole-file decode and its
    spectrogram would add over 2 GB)."""
    short, long = tmp_path / "two.flac", tmp_path / "thirty.flac"
    _speech(short, 120)
    clips = _speech(long, 1800)
    a, b = _run(short, pg_settings), _run(long, pg_settings)
    assert b["duration_s"] == pytest.approx(1800, abs=0.01) and b["emotion"]
    assert b["segments"] >= 0.9 * clips  # about one segment per clip: the whole recording was analysed
    assert b["peak_mb"] - a["peak_mb"] < 100, (a, b)


def test_progress_is_reported_while_a_long_recording_runs(tmp_path: Path) -> None:
    import uuid

    from ser_ml.inference import Ensemble
    from ser_ml.pipeline import JobInput, run
    from ser_shared.settings import Settings

    path = tmp_path / "three.flac"
    _speech(path, 180)
    seen: list[float] = []
    (outcome,) = run(Ensemble.load(REPO_ROOT / "models"), [JobInput(uuid.uuid4(), path, "flac")],
                     Settings(env="test"), on_progress=lambda _, done: seen.append(done))
    assert outcome.prediction is not None
    assert len(seen) >= 3 and seen == sorted(seen) and 0 < seen[0] < 1 and seen[-1] == 1.0
