"""Audio format sniffing, cheap probing (web tier) and decoding to float (workers).

libsndfile (through soundfile) reads WAV, FLAC, OGG/Vorbis/Opus, MP3 and AIFF in process; M4A/AAC
and WebM go through ffmpeg, which the worker image installs (``ser_shared.formats`` lists them all).
Everything lands as float32 at the pipeline's sample rate: mono (``decode``, ``stream``: the channels
averaged) or one row per channel (``decode_channels``, ``stream_channels``: a call's speakers kept
apart). The mono functions do no per-channel work at all, so a mono recording pays nothing for the
multi-channel ones.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import soundfile as sf

from ser_shared import formats
from ser_shared.audio_headers import check_wav, flac_length, mp3_length
from ser_shared.errors import (
    AudioTooLong,
    AudioTooShort,
    DecodeFailed,
    InvalidSamples,
    TooManyChannels,
    UnsupportedFormat,
    UnsupportedSampleRate,
)

SOUNDFILE_FORMATS = formats.decoded_by("soundfile")
FFMPEG_FORMATS = formats.decoded_by("ffmpeg")
MIME_TYPES = {f.name: f.mime for f in formats.FORMATS}
# Real recordings run from 8 kHz telephony to 768 kHz studio rates and up to 64-channel arrays. A
# header outside that is hostile or broken; resampling 50 Hz "audio" to 16 kHz would only make noise.
MIN_RATE, MAX_RATE = 4000, 768_000
MAX_CHANNELS = 64
# A float file with a few NaN/inf samples (a glitch in an editing chain) is still a recording: those
# samples become silence. One with more is a broken export, and analysing it would be guessing.
MAX_NONFINITE_SHARE = 0.01
# libsndfile stops where a FLAC's STREAMINFO or an MP3's Xing header says the stream ends. A stream
# holding more than this (MP3 counts include the encoder's delay and padding) is decoded by ffmpeg,
# which reads what is really there: analysing the declared fragment would pass it off as the whole.
UNDERSTATED_SHARE, UNDERSTATED_S = 0.02, 0.5
# How far a decoded length may be from the header's and still be the same recording (declared_if_different).
LENGTH_SLACK_S, LENGTH_SLACK_SHARE = 0.3, 0.02
SF_UNKNOWN_FRAMES = 1 << 62  # libsndfile's frame count for a stream of unknown length (SF_COUNT_MAX)


@dataclass(frozen=True)
class AudioInfo:
    format: str
    sample_rate: int | None
    channels: int | None
    duration_s: float | None


def sniff_format(head: bytes) -> str:
    """Name the container from its first bytes; raise UnsupportedFormat for anything else."""
    if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if head[4:8] == b"ftyp":
        return "m4a"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "webm"
    if head[:3] == b"ID3":
        return "mp3"
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise UnsupportedFormat("this is UTF-16 text, not audio")
    if len(head) >= 2 and head[0] == 0xFF:
        if head[1] & 0xF6 == 0xF0:  # ADTS sync with layer bits 00: raw AAC
            return "aac"
        if head[1] & 0xE0 == 0xE0:  # MPEG audio frame sync
            return "mp3"
    raise UnsupportedFormat(f"not a recognised audio file ({formats.LABELS})")


def probe(path: Path, fmt: str, max_s: float | None = None) -> AudioInfo:
    """Read rate, channels and duration from the header (no full decode), the duration checked
    against the stream where the header may understate it (FLAC, MP3).

    Raises DecodeFailed when the container cannot be parsed, InvalidAudioHeader for a WAV header
    that contradicts itself or its data, and AudioTooLong for a stream that holds more than
    ``max_s`` seconds whatever its header declares.
    """
    if fmt == "wav":
        check_wav(path)  # first: libsndfile's own complaint about such a header is vaguer
    info = _probe_header(path, fmt)
    held = true_length_s(path, fmt, info.duration_s, max_s)
    if held is None:
        return info
    if max_s is not None and held > max_s:
        raise AudioTooLong(_understated_message(info.duration_s, held, max_s))
    return replace(info, duration_s=round(held, 3))


def true_length_s(path: Path, fmt: str, declared_s: float | None, max_s: float | None = None) -> float | None:
    """The seconds a FLAC or MP3 stream really holds when that is clearly more than ``declared_s``
    (or the header declares nothing); None when the header can be believed or the stream not
    measured. MP3 frames are counted only up to just past ``max_s``."""
    if fmt == "flac":
        length = flac_length(path)
    elif fmt == "mp3":
        length = mp3_length(path, None if max_s is None else max_s + 1.0)
    else:
        return None
    if length is None or length.held == 0:
        return None
    held = length.seconds
    if declared_s is None or held > declared_s * (1 + UNDERSTATED_SHARE) + UNDERSTATED_S:
        return held
    return None


def _understated_message(declared_s: float | None, held_s: float, max_s: float) -> str:
    said = "no length" if declared_s is None else f"{declared_s:.1f} s"
    return f"the header declares {said}, but the file holds more audio than the {max_s:.0f} s limit"


def _probe_header(path: Path, fmt: str) -> AudioInfo:
    if fmt in SOUNDFILE_FORMATS:
        try:
            info = sf.info(str(path))
        except (RuntimeError, sf.LibsndfileError) as exc:
            if fmt != "mp3":
                raise DecodeFailed(f"cannot read the {fmt} header: {_reason(exc, path)}") from exc
        else:
            if info.samplerate <= 0 or info.channels <= 0:
                raise DecodeFailed("the header declares no channels or no sample rate")
            check_params(int(info.samplerate), int(info.channels))
            duration = info.frames / info.samplerate if 0 < info.frames < SF_UNKNOWN_FRAMES else None
            return AudioInfo(fmt, int(info.samplerate), int(info.channels), duration)
    return _ffprobe(path, fmt)


def _ffprobe(path: Path, fmt: str) -> AudioInfo:
    exe = shutil.which("ffprobe")
    if exe is None:
        raise DecodeFailed(f"{fmt} needs ffmpeg, which is not installed on this server")
    cmd = [exe, "-v", "error", "-select_streams", "a:0", "-show_entries",
           "stream=sample_rate,channels,duration:format=duration", "-of", "json", str(path)]
    try:
        out = subprocess.run(cmd, capture_output=True, timeout=30, check=True).stdout
        data = json.loads(out or b"{}")
    except (subprocess.SubprocessError, ValueError) as exc:
        raise DecodeFailed(f"cannot read the {fmt} container") from exc
    streams = data.get("streams") or []
    if not streams:
        raise DecodeFailed(f"the {fmt} file has no audio stream")
    stream = streams[0]
    duration = _float(stream.get("duration")) or _float((data.get("format") or {}).get("duration"))
    rate = int(_float(stream.get("sample_rate")) or 0) or None
    channels = int(stream.get("channels") or 0) or None
    check_params(rate, channels)
    return AudioInfo(fmt, rate, channels, duration)


def check_params(rate: int | None, channels: int | None) -> None:
    """Raise UnsupportedSampleRate / TooManyChannels for header values no real recording has
    (None: the container did not say)."""
    if rate is not None and not MIN_RATE <= rate <= MAX_RATE:
        raise UnsupportedSampleRate(f"the sample rate {rate} Hz is outside {MIN_RATE}-{MAX_RATE} Hz")
    if channels is not None and channels > MAX_CHANNELS:
        raise TooManyChannels(f"{channels} channels; at most {MAX_CHANNELS} are accepted")


def _reason(error: BaseException | bytes, path: Path) -> str:
    """A decoder's complaint for the job's error message, without the server's storage path
    (libsndfile and ffmpeg both name the file they opened)."""
    text = error.decode("utf-8", "replace") if isinstance(error, bytes) else str(error)
    lines = text.replace(str(path), "the file").strip().splitlines()
    return (lines[-1] if lines else "no audio")[:200]


def _float(value: object) -> float | None:
    try:
        result = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return result if np.isfinite(result) and result > 0 else None


def check_duration(duration_s: float | None, min_s: float, max_s: float) -> None:
    """Raise AudioTooLong / AudioTooShort when a known duration is outside the limits."""
    if duration_s is None:
        return
    if duration_s > max_s:
        raise AudioTooLong(f"recording is {duration_s:.1f} s; the limit is {max_s:.0f} s")
    if duration_s < min_s:
        raise AudioTooShort(f"recording is {duration_s:.3f} s; at least {min_s:.2f} s is needed")


def declared_if_different(declared_s: float | None, decoded_s: float) -> float | None:
    """``declared_s`` (the header's length) when the decoded length differs from it by more than
    codecs account for, else None. MP3 and AAC add priming and padding (a few hundred ms at low
    rates) and resampling rounds; a copy cut short, or frames a decoder skipped, differ by more."""
    if declared_s is None or abs(declared_s - decoded_s) <= max(LENGTH_SLACK_S, LENGTH_SLACK_SHARE * declared_s):
        return None
    return declared_s


def decode(path: Path, fmt: str, sample_rate: int, max_s: float) -> np.ndarray:
    """Decode to mono float32 at ``sample_rate``, reading at most ``max_s`` (plus a little) seconds.

    Raises DecodeFailed for unreadable data, AudioTooLong when the stream runs past ``max_s``,
    UnsupportedSampleRate / TooManyChannels for absurd headers and InvalidSamples for float data
    that is mostly NaN or infinity, InvalidAudioHeader for a WAV header that contradicts itself.
    A FLAC or MP3 whose header declares less than it holds is decoded whole by ffmpeg.
    """
    data, rate = _read(path, fmt, sample_rate, max_s, 1)
    return resample(_mix(data), rate, sample_rate)


def decode_channels(path: Path, fmt: str, sample_rate: int, max_s: float, channels: int | None = None) -> np.ndarray:
    """``decode`` keeping the channels apart: float32 of shape (channels, samples), each row
    contiguous and in [-1, 1]. Raises like ``decode``.

    ``channels`` is the count the upload's probe found; files that ffmpeg decodes need it (it is
    probed here when not given), libsndfile reads it from the file.
    """
    data, rate = _read(path, fmt, sample_rate, max_s, channels)
    planar = _clean(data)
    if rate != sample_rate:
        planar = resample(planar, rate, sample_rate)
    return np.ascontiguousarray(np.clip(planar, -1.0, 1.0).T, dtype=np.float32)


def _read(path: Path, fmt: str, sample_rate: int, max_s: float, channels: int | None) -> tuple[np.ndarray, int]:
    """The decoded (frames, channels) float32 samples and their rate. ffmpeg's output is at
    ``sample_rate`` already, with ``channels`` channels (1: mixed by ffmpeg; None: as the file has)."""
    if fmt in SOUNDFILE_FORMATS and _soundfile_reads_all(path, fmt, max_s):
        try:
            data, rate = _read_soundfile(path, max_s)
        except (RuntimeError, sf.LibsndfileError, ValueError) as exc:
            if fmt == "wav" or shutil.which("ffmpeg") is None:
                raise DecodeFailed(f"cannot decode the {fmt} data: {_reason(exc, path)}") from exc
            data, rate = _read_ffmpeg(path, sample_rate, max_s, _ffmpeg_channels(path, fmt, channels)), sample_rate
    else:
        data, rate = _read_ffmpeg(path, sample_rate, max_s, _ffmpeg_channels(path, fmt, channels)), sample_rate
    if data.size == 0:
        raise DecodeFailed("the file decodes to no audio samples")
    if data.shape[0] > (max_s + 0.5) * rate:
        raise AudioTooLong(f"recording is longer than the {max_s:.0f} s limit")
    return data, rate


def _ffmpeg_channels(path: Path, fmt: str, channels: int | None) -> int:
    """How many channels to ask ffmpeg for: ``channels`` when known, else what ffprobe finds."""
    if channels is None:
        channels = _ffprobe(path, fmt).channels or 1
    return max(1, min(channels, MAX_CHANNELS))


def _soundfile_reads_all(path: Path, fmt: str, max_s: float) -> bool:
    """False when libsndfile would stop at a length the header understates (ffmpeg decodes then).

    Raises InvalidAudioHeader for a lying WAV header, AudioTooLong when the stream holds more than
    ``max_s`` whatever its header says, DecodeFailed when the rest needs ffmpeg and it is missing.
    """
    if fmt == "wav":
        check_wav(path)
    if fmt not in ("flac", "mp3"):
        return True
    try:
        info = sf.info(str(path))
    except (RuntimeError, sf.LibsndfileError):
        return True  # the decode path reports it, or falls back to ffmpeg
    if info.samplerate <= 0:
        return True
    # No length declared (a FLAC written to a pipe): libsndfile cannot stream such a file either.
    declared = info.frames / info.samplerate if 0 < info.frames < SF_UNKNOWN_FRAMES else None
    held = true_length_s(path, fmt, declared, max_s)
    if held is None:
        return True
    if held > max_s:
        raise AudioTooLong(_understated_message(declared, held, max_s))
    if shutil.which("ffmpeg") is None:
        said = "no length" if declared is None else f"{declared:.1f} s"
        raise DecodeFailed(f"the header declares {said}, but the file holds {held:.1f} s; "
                           "reading all of it needs ffmpeg, which is not installed on this server")
    return False


def _read_soundfile(path: Path, max_s: float) -> tuple[np.ndarray, int]:
    with sf.SoundFile(str(path)) as f:
        rate = int(f.samplerate)
        if rate <= 0 or f.channels <= 0:
            raise ValueError("no channels or no sample rate")
        check_params(rate, int(f.channels))
        # Bounded read: a lying header or a huge file never decodes more than the limit allows.
        frames = int((max_s + 1.0) * rate)
        data = f.read(frames=frames, dtype="float32", always_2d=True)
    return data, rate


def _ffmpeg_command(path: Path, sample_rate: int, max_s: float, channels: int) -> list[str]:
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise DecodeFailed("this format needs ffmpeg, which is not installed on this server")
    return [exe, "-nostdin", "-v", "error", "-i", str(path), "-t", f"{max_s + 1.0:.3f}", "-vn",
            "-ac", str(channels), "-ar", str(sample_rate), "-f", "f32le", "-"]


def _read_ffmpeg(path: Path, sample_rate: int, max_s: float, channels: int = 1) -> np.ndarray:
    """(frames, channels) float32 at ``sample_rate``: ffmpeg mixes to (or spreads over) ``channels``."""
    cmd = _ffmpeg_command(path, sample_rate, max_s, channels)
    proc = subprocess.run(cmd, capture_output=True, timeout=max(60.0, max_s), check=False)
    if proc.returncode != 0 or not proc.stdout:
        raise DecodeFailed(f"cannot decode the audio: {_reason(proc.stderr, path)}")
    usable = len(proc.stdout) // (4 * channels) * 4 * channels
    return np.frombuffer(proc.stdout[:usable], dtype="<f4").reshape(-1, channels)


def resample(audio: np.ndarray, rate: int, target: int) -> np.ndarray:
    """High-quality resampling with soxr (a no-op when the rates match): mono, or (frames, channels)."""
    if rate == target:
        return audio.astype(np.float32, copy=False)
    import soxr  # worker-only dependency

    return soxr.resample(audio, rate, target, quality="HQ").astype(np.float32)


def stream(path: Path, fmt: str, sample_rate: int, max_s: float, block_s: float = 30.0) -> Iterator[np.ndarray]:
    """``decode`` in blocks of about ``block_s`` seconds: mono float32 at ``sample_rate``.

    Memory stays at a block or two whatever the recording's length; the concatenated blocks equal
    ``decode``'s output (soxr's streaming resampler is exact). Raises like ``decode``.
    """
    yield from _stream(path, fmt, sample_rate, max_s, block_s, None)


def stream_channels(path: Path, fmt: str, sample_rate: int, max_s: float, block_s: float = 30.0,
                    channels: int | None = None) -> Iterator[np.ndarray]:
    """``decode_channels`` in blocks of about ``block_s`` seconds, each (channels, samples).

    Memory stays at a block or two of every channel; the blocks joined along their second axis
    equal ``decode_channels``'s output. ``channels`` as there. Raises like ``decode``.
    """
    yield from _stream(path, fmt, sample_rate, max_s, block_s, channels or 0)


def _stream(path: Path, fmt: str, sample_rate: int, max_s: float, block_s: float,
            channels: int | None) -> Iterator[np.ndarray]:
    """Mono blocks (``channels`` None) or planar ones (``channels`` 0: count unknown, or the count)."""
    if fmt in SOUNDFILE_FORMATS and _soundfile_reads_all(path, fmt, max_s):
        try:
            handle = sf.SoundFile(str(path))
        except (RuntimeError, sf.LibsndfileError) as exc:
            if fmt == "wav" or shutil.which("ffmpeg") is None:
                raise DecodeFailed(f"cannot decode the {fmt} data: {_reason(exc, path)}") from exc
        else:
            with handle:
                yield from _stream_soundfile(handle, sample_rate, max_s, block_s, planar=channels is not None)
            return
    count = 1 if channels is None else _ffmpeg_channels(path, fmt, channels or None)
    yield from _stream_ffmpeg(path, sample_rate, max_s, block_s, count, planar=channels is not None)


def _clean(block: np.ndarray) -> np.ndarray:
    """``block`` with non-finite samples set to 0 rather than full scale (an infinity is a glitch,
    not a loud sound), unless there are so many that the block is broken: InvalidSamples then."""
    finite = np.isfinite(block)
    if not finite.all():
        bad = block.size - int(np.count_nonzero(finite))
        if bad > MAX_NONFINITE_SHARE * block.size:
            raise InvalidSamples(f"{bad} of {block.size} samples are NaN or infinite; the file is broken")
        block = np.where(finite, block, np.float32(0.0))
    return block


def _mix(block: np.ndarray) -> np.ndarray:
    """Mono float32 in [-1, 1] from a (frames, channels) block (non-finite samples as ``_clean``).

    The mean accumulates in float64, so channels near the float32 maximum do not overflow to
    infinity when summed.
    """
    block = _clean(block)
    mono = block[:, 0] if block.shape[1] == 1 else block.mean(axis=1, dtype=np.float64)
    return np.clip(mono, -1.0, 1.0).astype(np.float32)


def _planar(block: np.ndarray) -> np.ndarray:
    """(channels, frames) float32 in [-1, 1] from a (frames, channels) block."""
    return np.ascontiguousarray(np.clip(_clean(block), -1.0, 1.0).T, dtype=np.float32)


def _stream_soundfile(handle: sf.SoundFile, sample_rate: int, max_s: float, block_s: float,
                      planar: bool = False) -> Iterator[np.ndarray]:
    import soxr

    rate = int(handle.samplerate)
    if rate <= 0 or handle.channels <= 0:
        raise DecodeFailed("the header declares no channels or no sample rate")
    check_params(rate, int(handle.channels))
    width = int(handle.channels) if planar else 1
    resampler = None
    if rate != sample_rate:
        resampler = soxr.ResampleStream(rate, sample_rate, width, dtype="float32", quality="HQ")
    limit, total = (max_s + 0.5) * rate, 0
    try:
        for block in handle.blocks(blocksize=max(1, int(block_s * rate)), dtype="float32", always_2d=True):
            total += len(block)
            if total > limit:
                raise AudioTooLong(f"recording is longer than the {max_s:.0f} s limit")
            # Planar blocks are resampled as (frames, channels), soxr's layout, and turned after.
            data = np.clip(_clean(block), -1.0, 1.0) if planar else _mix(block)
            out = resampler.resample_chunk(data, last=False) if resampler else data
            if out.size:
                yield np.ascontiguousarray(out.T) if planar else out
    except (RuntimeError, sf.LibsndfileError) as exc:
        raise DecodeFailed(f"cannot decode the audio: {_reason(exc, Path(str(handle.name)))}") from exc
    if total == 0:
        raise DecodeFailed("the file decodes to no audio samples")
    if resampler is not None:
        empty = np.zeros((0, width) if planar else 0, dtype=np.float32)
        tail = resampler.resample_chunk(empty, last=True)
        if tail.size:
            yield np.ascontiguousarray(tail.T) if planar else tail


def _stream_ffmpeg(path: Path, sample_rate: int, max_s: float, block_s: float, channels: int = 1,
                   planar: bool = False) -> Iterator[np.ndarray]:
    cmd = _ffmpeg_command(path, sample_rate, max_s, channels)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    total, frame = 0, 4 * channels
    try:
        while chunk := proc.stdout.read(int(block_s * sample_rate) * frame):
            block = np.frombuffer(chunk[: len(chunk) // frame * frame], dtype="<f4").reshape(-1, channels)
            total += block.shape[0]
            if total > (max_s + 0.5) * sample_rate:
                raise AudioTooLong(f"recording is longer than the {max_s:.0f} s limit")
            yield _planar(block) if planar else _mix(block)
        if proc.wait(timeout=60) != 0 or total == 0:
            raise DecodeFailed(f"cannot decode the audio: {_reason(proc.stderr.read(), path)}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
