"""Waveform and mel-spectrogram images of a stored recording, drawn with numpy alone.

The web tier stays light (no librosa, no soxr, no plotting library): audio is read with soundfile
(ffmpeg for the containers it cannot read), at most ``MAX_SECONDS`` of it, reduced to about 16 kHz by
averaging neighbouring samples, and the images have a fixed size whatever the recording's length, so
one image costs a bounded amount of work and memory.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import soundfile as sf

from ser_shared import audio as audio_io
from ser_shared.errors import DecodeFailed

WIDTH = 800
# Bumped when the same recording draws differently (its ETag changes): 2 = the x axis is the whole
# recording, blank past MAX_SECONDS; spectrogram frames centred on their columns.
LAYOUT = 2
WAVE_HEIGHT = 120
N_MELS = 80
MEL_ROW_PX = 2
SPEC_HEIGHT = N_MELS * MEL_ROW_PX
MAX_SECONDS = 600.0
TARGET_RATE = 16000
FMAX = 8000.0
DYNAMIC_RANGE_DB = 80.0

BACKGROUND = (250, 250, 252)
WAVE_COLOUR = (47, 111, 222)
AXIS_COLOUR = (205, 210, 220)
# A perceptually ordered dark-to-bright ramp (close to viridis) for spectrogram levels.
RAMP = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], dtype=np.float64)


def load(path: Path, fmt: str | None) -> tuple[np.ndarray, float]:
    """Mono float32 samples (the first ``MAX_SECONDS`` at most) and their rate.

    Raises DecodeFailed when the file cannot be read.
    """
    if fmt in audio_io.SOUNDFILE_FORMATS:
        try:
            return _load_soundfile(path)
        except (RuntimeError, sf.LibsndfileError, ValueError) as exc:
            if fmt == "wav":
                raise DecodeFailed(f"cannot decode the {fmt} data: {exc}") from exc
    # Containers libsndfile cannot read: ffmpeg decodes straight to the target rate, bounded in time.
    samples = audio_io._read_ffmpeg(path, TARGET_RATE, MAX_SECONDS)  # the shared, bounded ffmpeg decoder
    return samples[: int(MAX_SECONDS * TARGET_RATE)], float(TARGET_RATE)


def _load_soundfile(path: Path) -> tuple[np.ndarray, float]:
    with sf.SoundFile(str(path)) as f:
        rate = int(f.samplerate)
        if rate <= 0 or f.channels <= 0:
            raise ValueError("no channels or no sample rate")
        # Averaging `factor` samples is a crude low-pass, plenty for a picture, and keeps memory at
        # one float per output sample (about 38 MB for the longest read) whatever the file's own rate.
        factor = max(1, rate // TARGET_RATE)
        frames = int(MAX_SECONDS * rate)
        known = f.frames if f.seekable() and f.frames > 0 else frames
        samples = np.empty(min(frames, known) // factor + 1, np.float32)
        filled = 0
        for block in f.blocks(blocksize=factor * 65536, frames=frames, dtype="float32", always_2d=True):
            usable = len(block) // factor * factor
            reduced = block[:usable].mean(axis=1, dtype=np.float32).reshape(-1, factor).mean(axis=1)
            # Cleaned block by block: whole-array passes would each allocate temporaries as large as the audio.
            reduced = np.clip(np.nan_to_num(reduced, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)
            if filled + len(reduced) > len(samples):  # a header that undercounts its frames
                samples = np.resize(samples, filled + len(reduced))
            samples[filled:filled + len(reduced)] = reduced
            filled += len(reduced)
    if filled == 0:
        raise DecodeFailed("the file decodes to no audio samples")
    return samples[:filled], rate / factor


def png(rgb: np.ndarray) -> bytes:
    """Encode an (height, width, 3) uint8 array as an 8-bit RGB PNG."""
    height, width, _ = rgb.shape
    # Each scanline starts with filter type 0 (none); zlib does the compression.
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rgb.reshape(height, width * 3)], axis=1)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
            + chunk(b"IEND", b""))


def waveform(samples: np.ndarray, width: int = WIDTH, height: int = WAVE_HEIGHT) -> np.ndarray:
    """Min/max envelope per pixel column, scaled to the recording's peak, as an RGB array."""
    if samples.size < width:
        samples = np.pad(samples, (0, width - samples.size))
    columns = samples[: samples.size // width * width].reshape(width, -1)
    highs, lows = columns.max(axis=1), columns.min(axis=1)
    peak = max(float(highs.max()), -float(lows.min()), 1e-4)
    top = np.round((1.0 - highs / peak) * (height - 1) / 2).astype(int)
    bottom = np.round((1.0 - lows / peak) * (height - 1) / 2).astype(int)
    rows = np.arange(height)[:, None]
    image = np.empty((height, width, 3), np.uint8)
    image[:] = BACKGROUND
    image[height // 2, :] = AXIS_COLOUR
    image[(rows >= top[None, :]) & (rows <= bottom[None, :])] = WAVE_COLOUR
    return image


def mel_filterbank(rate: float, n_fft: int, n_mels: int = N_MELS, fmax: float = FMAX) -> np.ndarray:
    """Triangular filters evenly spaced on the HTK mel scale: (n_mels, n_fft // 2 + 1)."""
    top = min(fmax, rate / 2)
    mels = np.linspace(0.0, 2595.0 * np.log10(1.0 + top / 700.0), n_mels + 2)
    edges = 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
    freqs = np.fft.rfftfreq(n_fft, 1.0 / rate)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs[None, :] - lower) / (centre - lower)
    falling = (upper - freqs[None, :]) / (upper - centre)
    return np.maximum(0.0, np.minimum(rising, falling))


def mel_db(samples: np.ndarray, rate: float, columns: int = WIDTH) -> np.ndarray:
    """Log-mel power (dB, top at 0, floored at -DYNAMIC_RANGE_DB) of at most ``columns`` frames: (n_mels, frames).

    Frames are spread evenly over the recording, so a long one is sampled, not computed in full.
    """
    n_fft = 1 << int(round(np.log2(rate * 0.032)))  # ~32 ms windows
    # Half a window of silence at each end: frame k is then centred on its own moment, so the picture's
    # columns span 0 to the recording's end, as the waveform's and the page's timeline do.
    samples = np.pad(samples, (n_fft // 2, n_fft // 2))
    if samples.size < n_fft:
        samples = np.pad(samples, (0, n_fft - samples.size))
    hop = max(1, n_fft // 4)
    count = min(columns, 1 + (samples.size - n_fft) // hop)
    starts = np.linspace(0, samples.size - n_fft, count).astype(np.int64)
    frames = samples[starts[:, None] + np.arange(n_fft)[None, :]] * np.hanning(n_fft)[None, :]
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    mel = mel_filterbank(rate, n_fft) @ power.T
    db = 10.0 * np.log10(np.maximum(mel, 1e-10))
    return np.maximum(db - db.max(), -DYNAMIC_RANGE_DB)


def spectrogram(samples: np.ndarray, rate: float, width: int = WIDTH) -> np.ndarray:
    """The mel spectrogram as an RGB array (low frequencies at the bottom), ``SPEC_HEIGHT`` x ``width``."""
    levels = 1.0 + mel_db(samples, rate, width) / DYNAMIC_RANGE_DB  # 0 (quiet) .. 1 (loudest)
    # Stretch the frames to the full width (nearest neighbour) and each mel band to MEL_ROW_PX rows.
    picked = levels[:, (np.arange(width) * levels.shape[1]) // width]
    rows = np.repeat(picked[::-1], MEL_ROW_PX, axis=0)
    position = rows * (len(RAMP) - 1)
    low = np.clip(np.floor(position).astype(int), 0, len(RAMP) - 2)
    frac = (position - low)[..., None]
    return np.round(RAMP[low] * (1.0 - frac) + RAMP[low + 1] * frac).astype(np.uint8)


def drawn_width(duration_s: float | None, width: int = WIDTH) -> int:
    """Columns that hold the recording: all of them, or for a recording past MAX_SECONDS (which is not
    read) the share of the width its first MAX_SECONDS take, so that x stays proportional to time."""
    if not duration_s or duration_s <= MAX_SECONDS:
        return width
    return max(1, round(width * MAX_SECONDS / duration_s))


def render(path: Path, fmt: str | None, kind: str, duration_s: float | None = None) -> bytes:
    """The PNG of ``kind`` ("waveform" or "spectrogram") for the recording at ``path``, ``WIDTH``
    columns for ``duration_s`` (the whole recording; the job page's timeline spans the same).

    Raises DecodeFailed when the audio cannot be read.
    """
    samples, rate = load(path, fmt)
    if samples.size == 0:
        raise DecodeFailed("the file decodes to no audio samples")
    drawn = drawn_width(duration_s)
    image = waveform(samples, drawn) if kind == "waveform" else spectrogram(samples, rate, drawn)
    if drawn < WIDTH:
        blank = np.empty((image.shape[0], WIDTH - drawn, 3), np.uint8)
        blank[:] = BACKGROUND
        image = np.concatenate([image, blank], axis=1)
    return png(image)
