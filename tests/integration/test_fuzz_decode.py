"""Property-based fuzzing of the decode + feature path (hypothesis).

Random bytes behind every magic number, WAV headers with random fields, and float audio full of
NaN, infinities and huge values go through ``sniff_format`` → ``probe`` → ``decode`` →
``features.extract`` and through the worker's ``pipeline.prepare``. The contract under test: only
the project's own ``SERError`` may escape the building blocks (the worker turns those into a
failed job with a stable code), ``prepare`` never reports ``internal_error``, and whatever is
decoded or extracted is finite, bounded and of the documented shape. Example counts and deadlines
are bounded so the module runs in well under a minute.
"""

from __future__ import annotations

import itertools
import struct
import uuid
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ser_ml.features import SAMPLE_RATE, SEQ_DIM, VECTOR_DIM, extract
from ser_ml.inference import Ensemble
from ser_ml.pipeline import JobInput, prepare
from ser_shared.audio import decode, probe, sniff_format
from ser_shared.errors import SERError
from ser_shared.settings import Settings

MAX_S = 20.0
# Every header the sniffer knows, plus none: the bytes behind them are the fuzzer's.
MAGICS = [b"", b"RIFF\x00\x10\x00\x00WAVE", b"RF64\xff\xff\xff\xffWAVE", b"fLaC", b"OggS", b"FORM\x00\x00\x10\x00AIFF",
          b"\x00\x00\x00\x20ftypM4A ", b"\x1a\x45\xdf\xa3", b"ID3\x03\x00", b"\xff\xfb", b"\xff\xf1"]
FUZZ = settings(max_examples=120, deadline=timedelta(seconds=5), database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
_names = itertools.count()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def worker_settings() -> Settings:
    return Settings(env="test", max_duration_s=MAX_S)


def _write(workdir: Path, data: bytes) -> Path:
    path = workdir / f"f{next(_names)}.bin"
    path.write_bytes(data)
    return path


def _through(path: Path) -> np.ndarray | None:
    """The web tier's and the worker's steps on one file; returns the decoded audio, or None when a
    domain error (the only kind allowed to escape) ended it."""
    try:
        with open(path, "rb") as f:
            fmt = sniff_format(f.read(64))
        probe(path, fmt)
        audio = decode(path, fmt, SAMPLE_RATE, MAX_S)
    except SERError:
        return None
    assert audio.dtype == np.float32 and audio.ndim == 1 and audio.size > 0
    assert np.isfinite(audio).all() and float(np.abs(audio).max()) <= 1.0
    assert audio.size <= (MAX_S + 1.0) * SAMPLE_RATE  # the decode bound held whatever the header said
    _features(audio[: 10 * SAMPLE_RATE])
    return audio


def _features(audio: np.ndarray) -> None:
    try:
        feats = extract(audio)
    except SERError:
        return
    assert feats.vector.shape == (VECTOR_DIM,) and feats.sequence.shape[1] == SEQ_DIM
    # A NaN here would make the RandomForest raise for the whole chunk, failing its other recordings.
    assert np.isfinite(feats.vector).all() and np.isfinite(feats.sequence).all()


@pytest.fixture(scope="module")
def ensemble(worker_settings: Settings) -> Ensemble:
    return Ensemble.load(worker_settings.models_dir)


def _prepare_is_clean(path: Path, fmt: str, worker_settings: Settings, ensemble: Ensemble) -> None:
    prepared = prepare(JobInput(uuid.uuid4(), path, fmt), worker_settings, ensemble)
    assert prepared.outcome.error_code != "internal_error", prepared.outcome.error_message
    # A NaN in the encoder's output would make the RF pipeline raise for the whole chunk.
    for feats in ensemble.features(prepared.clips):
        assert np.isfinite(feats.vector).all() and np.isfinite(feats.sequence).all()


@FUZZ
@given(magic=st.sampled_from(MAGICS), body=st.binary(max_size=3000))
def test_random_bytes_behind_any_magic(magic: bytes, body: bytes, workdir: Path) -> None:
    _through(_write(workdir, magic + body))


def _wav(tag: int, channels: int, rate: int, bits: int, align: int, data_size: int | None, body: bytes) -> bytes:
    fmt = struct.pack("<HHIIHH", tag, channels, rate, (rate * max(align, 1)) & 0xFFFFFFFF, align, bits)
    size = len(body) if data_size is None else data_size
    riff = (4 + 8 + len(fmt) + 8 + size) & 0xFFFFFFFF
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVEfmt " + struct.pack("<I", len(fmt)) + fmt
            + b"data" + struct.pack("<I", size) + body)


wav_fields = st.fixed_dictionaries({
    "tag": st.sampled_from([1, 3, 6, 7, 0xFFFE]) | st.integers(0, 0xFFFF),
    "channels": st.integers(0, 10) | st.integers(0, 0xFFFF),
    "rate": st.sampled_from([8000, 16000, 44100, 192000]) | st.integers(0, 0xFFFFFFFF),
    "bits": st.sampled_from([8, 16, 24, 32, 64]) | st.integers(0, 0xFFFF),
    "align": st.integers(0, 64),
    "data_size": st.none() | st.integers(0, 0xFFFFFFFF),
    "body": st.binary(min_size=0, max_size=8000),
})


@settings(FUZZ, max_examples=400)  # each example takes milliseconds: fuzz the headers harder
@given(fields=wav_fields)
def test_wav_headers_with_random_fields(fields: dict, workdir: Path, worker_settings: Settings,
                                        ensemble: Ensemble) -> None:
    path = _write(workdir, _wav(**fields))
    _through(path)
    _prepare_is_clean(path, "wav", worker_settings, ensemble)


@st.composite
def hostile_floats(draw: st.DrawFn) -> np.ndarray:
    """(frames, channels) float audio: a tone or noise, with a share of NaN/±inf/huge values."""
    frames = draw(st.integers(1, 3 * SAMPLE_RATE))
    channels = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([0.0, 1e-6, 0.3, 1.0, 40.0, 3e38]))
    with np.errstate(over="ignore"):  # 3e38 * noise overflows float32 to infinity on purpose
        audio = (scale * rng.standard_normal((frames, channels))).astype(np.float32)
    for value in (np.nan, np.inf, -np.inf, np.float32(3.4e38), np.float32(-3.4e38)):
        share = draw(st.sampled_from([0.0, 0.0, 0.001, 0.02, 1.0]))
        audio[rng.random(audio.shape) < share] = value
    return audio


@FUZZ
@given(audio=hostile_floats(), subtype=st.sampled_from(["FLOAT", "DOUBLE"]))
def test_float_audio_with_nan_inf_and_huge_values(audio: np.ndarray, subtype: str, workdir: Path,
                                                  worker_settings: Settings, ensemble: Ensemble) -> None:
    path = workdir / f"f{next(_names)}.wav"
    sf.write(str(path), audio, SAMPLE_RATE, subtype=subtype)
    decoded = _through(path)
    bad_share = 1.0 - np.isfinite(audio).mean()
    if decoded is not None and bad_share > 0:
        # The documented policy: a few non-finite samples are silenced, never turned into full scale.
        assert bad_share <= 0.01
    _prepare_is_clean(path, "wav", worker_settings, ensemble)


@FUZZ
@given(samples=st.lists(st.floats(-1.0, 1.0, width=32), min_size=1, max_size=4000))
def test_extract_on_any_bounded_signal(samples: list[float]) -> None:
    # Decoded audio is always finite and within [-1, 1]; on any such signal, of any length, the
    # features are either SilentAudio or finite.
    _features(np.asarray(samples, dtype=np.float32))
