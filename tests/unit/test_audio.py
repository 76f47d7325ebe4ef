"""Sniffing, probing and decoding of real recordings in every accepted container.

The recordings are made here with ffmpeg from one real RAVDESS clip (copied out of the shared,
read-only dataset first), so each format is checked against the same known content: the decoded
signal must have the source's length, and match it sample for sample (lossless) or in level and
shape (lossy). Negative cases use real malformed bytes, never mocks of our own code.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from ser_shared.audio import AudioInfo, check_duration, declared_if_different, decode, probe, sniff_format
from ser_shared.errors import AudioTooLong, AudioTooShort, DecodeFailed, UnsupportedFormat
from tests.conftest import ravdess_file

RATE = 16000
MAX_S = 60.0

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None,
                                reason="ffmpeg/ffprobe are needed to make and read the test recordings")


@dataclass(frozen=True)
class Encoding:
    """One way of re-encoding the source clip, and what the audio module should say about it."""

    name: str
    suffix: str
    ffmpeg_args: tuple[str, ...]
    fmt: str  # what sniff_format must answer
    rates: frozenset[int]  # acceptable header sample rates (Opus may report its 48 kHz clock)
    channels: int
    lossless: bool
    min_corr: float = 0.999  # lossless only: correlation with the decoded original
    level: float = 1.0  # expected RMS of the decoded mono signal relative to the original


ENCODINGS = [
    # Left is the original, right the original at half level: the mono mix must be their average
    # (0.75x), which a decoder keeping only one channel (1.0x or 0.5x) or summing them (1.5x) fails.
    # pan is explicit because ffmpeg's plain "-ac 2" would put the source at -3 dB in both channels.
    Encoding("wav_s16_48k_stereo", ".wav",
             ("-af", "pan=stereo|c0=c0|c1=0.5*c0", "-ar", "48000", "-c:a", "pcm_s16le"),
             "wav", frozenset({48000}), 2, True, level=0.75),
    # 8 kHz drops everything above 4 kHz, so the match with the 16 kHz original is a little lower.
    Encoding("wav_s16_8k", ".wav", ("-ar", "8000", "-c:a", "pcm_s16le"),
             "wav", frozenset({8000}), 1, True, min_corr=0.97),
    Encoding("wav_f32", ".wav", ("-c:a", "pcm_f32le"), "wav", frozenset({16000}), 1, True),
    Encoding("flac", ".flac", ("-c:a", "flac"), "flac", frozenset({16000}), 1, True),
    Encoding("ogg_vorbis", ".ogg", ("-c:a", "libvorbis", "-q:a", "5"),
             "ogg", frozenset({16000}), 1, False),
    Encoding("ogg_opus", ".opus", ("-c:a", "libopus", "-b:a", "48k", "-f", "ogg"),
             "ogg", frozenset({16000, 48000}), 1, False),
    Encoding("mp3", ".mp3", ("-c:a", "libmp3lame", "-b:a", "128k"), "mp3", frozenset({16000}), 1, False),
    Encoding("m4a_aac", ".m4a", ("-c:a", "aac", "-b:a", "128k"), "m4a", frozenset({16000}), 1, False),
    Encoding("webm_opus", ".webm", ("-c:a", "libopus", "-b:a", "48k"),
             "webm", frozenset({16000, 48000}), 1, False),
]


def ffmpeg(*args: str) -> None:
    """Run ffmpeg quietly, failing the test with its message if it fails."""
    proc = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def head(path: Path) -> bytes:
    """The first bytes of a file, as the upload path keeps them for sniffing."""
    with open(path, "rb") as f:
        return f.read(64)


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def best_lag_corr(a: np.ndarray, ref: np.ndarray, max_lag: int) -> float:
    """Highest Pearson correlation of ``a`` with ``ref`` over shifts of up to ``max_lag`` samples.

    Lossy codecs may keep a few milliseconds of encoder delay; the content must still line up.
    """
    n = min(a.size, ref.size) - 2 * max_lag
    core = ref[max_lag : max_lag + n]
    return max(float(np.corrcoef(a[max_lag + lag : max_lag + lag + n], core)[0, 1])
               for lag in range(-max_lag, max_lag + 1, 2))


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A strong-intensity angry RAVDESS clip (loud, voiced), copied out of the shared dataset."""
    dst = tmp_path_factory.mktemp("src") / "source.flac"
    shutil.copy(ravdess_file(1, "05", intensity="02"), dst)
    return dst


@pytest.fixture(scope="module")
def reference(source: Path) -> np.ndarray:
    """The original decoded straight with soundfile (16 kHz mono already): independent of decode()."""
    data, rate = sf.read(str(source), dtype="float32", always_2d=True)
    assert rate == RATE and data.shape[1] == 1
    return data[:, 0]


@pytest.fixture(scope="module")
def encoded(source: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every encoding of the source clip, made once for the module."""
    out = tmp_path_factory.mktemp("encoded")
    files: dict[str, Path] = {}
    for enc in ENCODINGS:
        path = out / f"{enc.name}{enc.suffix}"
        ffmpeg("-i", str(source), *enc.ffmpeg_args, str(path))
        files[enc.name] = path
    return files


@pytest.mark.parametrize("enc", ENCODINGS, ids=lambda e: e.name)
def test_sniff_probe_decode(enc: Encoding, encoded: dict[str, Path], reference: np.ndarray) -> None:
    path = encoded[enc.name]
    src_duration = reference.size / RATE

    fmt = sniff_format(head(path))
    assert fmt == enc.fmt

    info = probe(path, fmt)
    assert isinstance(info, AudioInfo) and info.format == enc.fmt
    assert info.sample_rate in enc.rates
    assert info.channels == enc.channels
    if info.duration_s is None:
        # Only a streamed container (WebM) may lack a duration; probe() documents None for that.
        assert enc.fmt == "webm", f"{enc.name}: probe gave no duration"
    else:
        assert info.duration_s == pytest.approx(src_duration, abs=0.1)

    audio = decode(path, fmt, RATE, MAX_S)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert np.isfinite(audio).all() and np.abs(audio).max() <= 1.0
    assert audio.size / RATE == pytest.approx(src_duration, abs=0.1)

    if enc.lossless:
        n = min(audio.size, reference.size)
        corr = float(np.corrcoef(audio[:n], reference[:n])[0, 1])
        assert corr > enc.min_corr, f"{enc.name}: correlation {corr:.4f} with the original"
        # Same level too: a mono/stereo mix-up or a wrong scale would show here.
        assert rms(audio) == pytest.approx(enc.level * rms(reference), rel=0.03)
    else:
        assert rms(audio) == pytest.approx(enc.level * rms(reference), rel=0.15)
        corr = best_lag_corr(audio, reference, max_lag=RATE // 50)  # +-20 ms
        assert corr > 0.9, f"{enc.name}: best correlation {corr:.4f} with the original"


@pytest.mark.parametrize("enc", ENCODINGS, ids=lambda e: e.name)
def test_an_intact_file_decodes_to_its_declared_length(enc: Encoding, encoded: dict[str, Path]) -> None:
    """Codecs' priming and padding (MP3, AAC, Opus) stay within the slack: an intact file gets no
    "declared vs decoded" notice, whatever its format."""
    path = encoded[enc.name]
    declared = probe(path, enc.fmt).duration_s
    decoded = decode(path, enc.fmt, RATE, MAX_S).size / RATE
    assert declared_if_different(declared, decoded) is None, (declared, decoded)


def test_a_file_cut_short_keeps_its_declared_length(source: Path, tmp_path: Path) -> None:
    whole = source.read_bytes()
    cut = tmp_path / "cut.flac"
    cut.write_bytes(whole[: len(whole) * 64 // 100])  # an incomplete copy: the header promises it all
    declared = probe(source, "flac").duration_s
    assert probe(cut, "flac").duration_s == declared
    decoded = decode(cut, "flac", RATE, MAX_S).size / RATE
    assert decoded < 0.8 * declared
    assert declared_if_different(declared, decoded) == declared
    assert declared_if_different(None, decoded) is None  # a header that declares nothing


# --- sniffing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("head_bytes", "expected"), [
    (b"RIFF\x24\x00\x00\x00WAVEfmt ", "wav"),
    (b"RF64\xff\xff\xff\xffWAVEds64", "wav"),
    (b"fLaC\x00\x00\x00\x22", "flac"),
    (b"OggS\x00\x02", "ogg"),
    (b"\x00\x00\x00\x20ftypM4A \x00\x00\x00\x00", "m4a"),
    (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81", "webm"),
    (b"ID3\x04\x00\x00\x00\x00\x00\x00", "mp3"),
    (b"\xff\xfb\x90\x64", "mp3"),  # MPEG-1 layer III frame without an ID3 tag
    (b"\xff\xf1\x50\x80", "aac"),  # ADTS (raw AAC)
])
def test_sniff_known_headers(head_bytes: bytes, expected: str) -> None:
    assert sniff_format(head_bytes) == expected


def _png() -> bytes:
    return b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(50)


def _elf() -> bytes:
    return b"\x7fELF\x02\x01\x01\x00" + bytes(56)


@pytest.mark.parametrize("content", [
    b"hello, this is not audio at all\n" * 4,
    _png(),
    _elf(),
    b"",
    b"RIFF\x24\x00\x00\x00AVI LIST",  # RIFF but not WAVE
], ids=["text", "png", "elf", "empty", "riff_avi"])
def test_sniff_rejects_non_audio_renamed_wav(content: bytes, tmp_path: Path) -> None:
    # The client's name (".wav") must not matter: only the bytes decide.
    path = tmp_path / "upload.wav"
    path.write_bytes(content)
    with pytest.raises(UnsupportedFormat) as exc:
        sniff_format(head(path))
    assert exc.value.code == "unsupported_format"


# --- malformed containers -----------------------------------------------------------------------


def _probe_then_decode(path: Path) -> None:
    fmt = sniff_format(head(path))
    probe(path, fmt)
    decode(path, fmt, RATE, MAX_S)


@pytest.fixture
def pcm_wav(encoded: dict[str, Path]) -> bytes:
    return encoded["wav_s16_8k"].read_bytes()


@pytest.mark.parametrize("damage", ["truncated_header_20", "truncated_header_40", "garbage_after_wave",
                                    "zeros_after_wave", "header_only"])
def test_malformed_wav_fails_as_decode_failed(damage: str, pcm_wav: bytes, tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    content = {
        "truncated_header_20": pcm_wav[:20],
        "truncated_header_40": pcm_wav[:40],
        "garbage_after_wave": pcm_wav[:12] + rng.integers(0, 256, 4000, dtype=np.uint8).tobytes(),
        "zeros_after_wave": pcm_wav[:12] + bytes(4000),
        "header_only": pcm_wav[:44],  # a valid header whose data chunk holds no samples
    }[damage]
    path = tmp_path / "bad.wav"
    path.write_bytes(content)
    assert sniff_format(head(path)) == "wav"  # it looks like a WAV, so the damage is found later
    with pytest.raises(DecodeFailed) as exc:
        _probe_then_decode(path)
    assert exc.value.code == "decode_failed"


@pytest.mark.parametrize(("magic", "fmt"), [
    (b"\x00\x00\x00\x20ftypM4A ", "m4a"),
    (b"\x1a\x45\xdf\xa3", "webm"),
    (b"fLaC", "flac"),
    (b"OggS", "ogg"),
    (b"ID3", "mp3"),
])
def test_garbage_behind_magic_fails_as_decode_failed(magic: bytes, fmt: str, tmp_path: Path) -> None:
    # Covers both readers: soundfile (flac, ogg, mp3) and the ffprobe/ffmpeg path (m4a, webm).
    path = tmp_path / "bad.bin"
    path.write_bytes(magic + np.random.default_rng(3).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    assert sniff_format(head(path)) == fmt
    with pytest.raises(DecodeFailed):
        _probe_then_decode(path)


def test_corrupted_mp3_decodes_partially_or_fails_cleanly(encoded: dict[str, Path], tmp_path: Path) -> None:
    data = bytearray(encoded["mp3"].read_bytes())
    rng = np.random.default_rng(11)
    for start in range(2000, len(data) - 2000, 3000):  # smash frames all through the stream
        data[start : start + 500] = rng.integers(0, 256, 500, dtype=np.uint8).tobytes()
    path = tmp_path / "corrupt.mp3"
    path.write_bytes(bytes(data))
    fmt = sniff_format(head(path))
    assert fmt == "mp3"
    # Any other exception type would escape the worker's audio-error handling and be retried.
    try:
        probe(path, fmt)
        audio = decode(path, fmt, RATE, MAX_S)
    except DecodeFailed:
        return
    assert audio.dtype == np.float32 and audio.ndim == 1 and audio.size > 0
    assert np.isfinite(audio).all()
    assert audio.size / RATE < 4.2  # never more than the original's ~4.1 s


# --- duration limits ----------------------------------------------------------------------------


@pytest.fixture
def three_second_wav(reference: np.ndarray, tmp_path: Path) -> Path:
    path = tmp_path / "three.wav"
    sf.write(str(path), reference[: 3 * RATE], RATE, subtype="PCM_16")
    return path


def test_decode_refuses_audio_longer_than_max(three_second_wav: Path) -> None:
    with pytest.raises(AudioTooLong) as exc:
        decode(three_second_wav, "wav", RATE, 1.0)
    assert exc.value.code == "audio_too_long"


def test_decode_accepts_audio_within_max(three_second_wav: Path) -> None:
    audio = decode(three_second_wav, "wav", RATE, 5.0)
    assert audio.size == 3 * RATE


def test_decode_refuses_long_audio_through_ffmpeg(three_second_wav: Path, tmp_path: Path) -> None:
    # The ffmpeg path (M4A) bounds its read separately from soundfile's; check it too.
    m4a = tmp_path / "three.m4a"
    ffmpeg("-i", str(three_second_wav), "-c:a", "aac", str(m4a))
    with pytest.raises(AudioTooLong):
        decode(m4a, "m4a", RATE, 1.0)


@pytest.mark.parametrize(("duration", "error", "code"), [
    (10.01, AudioTooLong, "audio_too_long"),
    (3600.0, AudioTooLong, "audio_too_long"),
    (0.05, AudioTooShort, "audio_too_short"),
    (0.0, AudioTooShort, "audio_too_short"),
])
def test_check_duration_rejects(duration: float, error: type[Exception], code: str) -> None:
    with pytest.raises(error) as exc:
        check_duration(duration, 0.1, 10.0)
    assert exc.value.code == code  # type: ignore[attr-defined]


@pytest.mark.parametrize("duration", [None, 0.1, 5.0, 10.0])
def test_check_duration_accepts(duration: float | None) -> None:
    # None: the container did not say; the decoder's own bound applies later.
    check_duration(duration, 0.1, 10.0)


# --- hostile sample values ----------------------------------------------------------------------


def test_nan_and_inf_samples_decode_to_finite(tmp_path: Path) -> None:
    t = np.arange(RATE, dtype=np.float32) / RATE
    samples = (0.5 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    samples[100:200] = np.nan
    samples[300] = np.inf
    samples[301] = -np.inf
    samples[400:410] = 7.5  # out of range for float audio
    path = tmp_path / "hostile.wav"
    sf.write(str(path), samples, RATE, subtype="FLOAT")
    audio = decode(path, sniff_format(head(path)), RATE, MAX_S)
    assert audio.size == RATE
    assert np.isfinite(audio).all()
    assert np.abs(audio).max() <= 1.0
    # The clean part is untouched.
    np.testing.assert_allclose(audio[1000:], samples[1000:], atol=1e-6)
