"""The one feature pipeline, shared by training, evaluation and the workers.

Everything derives from a single framing of the signal: one power STFT feeds the mel bands,
MFCCs and spectral shape; one autocorrelation pass at 8 kHz (computed through the FFT) gives pitch
and voicing. The utterance vector (for the RandomForest) is a set of statistics over these frame
descriptors; the frame sequence (for the LSTM) is a pooled, per-utterance-normalised view of them.

The descriptors follow librosa's definitions, so ``bench/reference.py`` can recompute each one
with its own librosa call (the naive way, about four times slower) and the tests check both agree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import fft as sfft
from scipy.fft import dct

from ser_shared.errors import SilentAudio

FEATURE_VERSION = "fv3"
SAMPLE_RATE = 16000
N_FFT = 512
WIN = 400  # 25 ms
HOP = 160  # 10 ms
N_MELS = 64
N_MFCC = 20
TOP_DB = 80.0  # log-mel floor below the loudest bin, as librosa's power_to_db
PITCH_RATE = 8000  # pitch is tracked at half rate: 500 Hz needs nothing above 4 kHz
PITCH_WIN = 320  # 40 ms at 8 kHz: two periods of a 50 Hz voice
PITCH_HOP = HOP * PITCH_RATE // SAMPLE_RATE
PITCH_FFT = 512  # >= PITCH_WIN + the longest lag (133), so the autocorrelation does not wrap
F0_MIN, F0_MAX = 60.0, 500.0
VOICING_THRESHOLD = 0.45
OCTAVE_TOLERANCE = 0.9
ROLLOFF = 0.85
SEQ_POOL = 3  # LSTM steps of 30 ms
SILENCE_DBFS = -70.0
TRIM_DB = 40.0
AMIN = 1e-10
EPS = 1e-10


@dataclass(frozen=True)
class Features:
    vector: np.ndarray  # (VECTOR_DIM,) float32, for the RandomForest
    sequence: np.ndarray  # (steps, SEQ_DIM) float32, for the LSTM
    duration_s: float


@lru_cache(maxsize=1)
def _mel_basis() -> np.ndarray:
    import librosa  # filters only; imported lazily so importing this module stays cheap

    return librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=50.0,
                               fmax=SAMPLE_RATE / 2).astype(np.float32).T  # (freq, mels)


def hann(n: int) -> np.ndarray:
    """Periodic Hann window (the one librosa's STFT uses)."""
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)).astype(np.float32)


@lru_cache(maxsize=1)
def _constants() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    pwin = hann(PITCH_WIN)
    # Autocorrelation of the window itself: dividing by it removes the taper's bias toward short lags.
    wac = np.fft.irfft(np.abs(np.fft.rfft(pwin, PITCH_FFT)) ** 2)[:PITCH_WIN]
    freqs = np.linspace(0.0, SAMPLE_RATE / 2, N_FFT // 2 + 1, dtype=np.float32)
    return hann(WIN), pwin, (wac / wac[0]).astype(np.float32), freqs


def _frames(x: np.ndarray, length: int, n: int, hop: int = HOP, mode: str = "constant") -> np.ndarray:
    """``n`` frames of ``length`` samples every ``hop`` samples, centred on k*hop (padded by ``mode``)."""
    pad = length // 2
    need = (n - 1) * hop + length
    if mode == "edge":
        padded = np.pad(x, (pad, max(0, need - pad - x.size)), mode="edge")[:need]
    else:
        padded = np.zeros(need, dtype=np.float32)
        end = min(x.size, need - pad)
        padded[pad : pad + end] = x[:end]
    return np.lib.stride_tricks.sliding_window_view(padded, length)[::hop][:n]


def power_spectrogram(x: np.ndarray, frames: np.ndarray | None = None) -> np.ndarray:
    """|STFT|^2, (frames, N_FFT//2+1): 25 ms periodic-Hann frames every 10 ms, centred, zero-padded."""
    if frames is None:
        frames = _frames(x, WIN, 1 + x.size // HOP)
    return _power(frames, _constants()[0], N_FFT)


def _power(frames: np.ndarray, window: np.ndarray, n_fft: int) -> np.ndarray:
    """|rfft|^2 of windowed frames, zero-padded to ``n_fft`` in one preallocated buffer."""
    buf = np.zeros((frames.shape[0], n_fft), dtype=np.float32)
    np.multiply(frames, window, out=buf[:, : frames.shape[1]])
    spec = sfft.rfft(buf, axis=1)
    return np.square(spec.real) + np.square(spec.imag)


def frame_descriptors(audio: np.ndarray) -> dict[str, np.ndarray]:
    """Frame-level descriptors at a 10 ms hop: log-mel, MFCC, energy, spectral shape, pitch.

    One power spectrogram feeds every spectral descriptor; pitch comes from one FFT-based
    autocorrelation of the signal at 8 kHz. The definitions follow librosa's (periodic Hann,
    centred frames, Slaney mel, power_to_db with an 80 dB floor), which ``bench.reference`` checks.
    """
    x = np.ascontiguousarray(audio, dtype=np.float32)
    n = 1 + x.size // HOP
    frames = _frames(x, WIN, n)
    power = power_spectrogram(x, frames)
    freqs = _constants()[3]
    mel = power @ _mel_basis()
    logmel = 10.0 * np.log10(np.maximum(mel, AMIN))
    logmel = np.maximum(logmel, logmel.max() - TOP_DB)
    mfcc = dct(logmel, type=2, norm="ortho", axis=1)[:, :N_MFCC]
    energy_db = 20.0 * np.log10(np.sqrt(np.einsum("ij,ij->i", frames, frames) / WIN) + 1e-5)
    mag = np.sqrt(power)
    total = mag.sum(axis=1) + EPS
    centroid = (mag @ freqs) / total
    bandwidth = np.sqrt(np.maximum((mag @ freqs**2) / total - centroid**2, 0.0))
    # The first bin holding ROLLOFF of the magnitude (0 Hz for a silent frame, as librosa).
    below = np.cumsum(mag, axis=1) < ROLLOFF * mag.sum(axis=1)[:, None]
    rolloff = freqs[np.minimum(below.sum(axis=1), freqs.size - 1)]
    clipped = np.maximum(power, AMIN)
    flatness = np.exp(np.mean(np.log(clipped), axis=1)) / np.mean(clipped, axis=1)
    norm_mag = mag / total[:, None]
    flux = np.r_[0.0, np.sum(np.maximum(np.diff(norm_mag, axis=0), 0.0), axis=1)]
    zframes = _frames(np.where(np.abs(x) <= 1e-10, 0.0, x), WIN, n, mode="edge")
    signs = np.signbit(zframes)
    zcr = np.count_nonzero(signs[:, 1:] != signs[:, :-1], axis=1) / WIN
    f0, harmonicity = pitch_track(x, n)
    return assemble(logmel=logmel, mfcc=mfcc, energy_db=energy_db, centroid=centroid, bandwidth=bandwidth,
                    rolloff=rolloff, flatness=flatness, flux=flux, zcr=zcr, f0=f0, harmonicity=harmonicity)


def assemble(*, logmel: np.ndarray, mfcc: np.ndarray, energy_db: np.ndarray, centroid: np.ndarray,
             bandwidth: np.ndarray, rolloff: np.ndarray, flatness: np.ndarray, flux: np.ndarray, zcr: np.ndarray,
             f0: np.ndarray, harmonicity: np.ndarray) -> dict[str, np.ndarray]:
    """The descriptor dictionary (float32, kHz for frequencies) with the voicing decision."""
    f32 = np.float32
    voiced = (harmonicity > VOICING_THRESHOLD) & (energy_db > energy_db.max() - 35.0)
    return {
        "logmel": logmel.astype(f32), "mfcc": mfcc.astype(f32), "energy_db": energy_db.astype(f32),
        "centroid": (centroid / 1000.0).astype(f32), "bandwidth": (bandwidth / 1000.0).astype(f32),
        "rolloff": (rolloff / 1000.0).astype(f32), "flatness": flatness.astype(f32), "flux": flux.astype(f32),
        "zcr": zcr.astype(f32), "f0": np.where(voiced, f0, 0.0).astype(f32),
        "harmonicity": harmonicity.astype(f32), "voiced": voiced,
    }


def pitch_track(x: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """F0 (Hz) and harmonicity (normalised autocorrelation peak) for ``n`` frames at the 10 ms hop."""
    import soxr

    low = soxr.resample(x, SAMPLE_RATE, PITCH_RATE, quality="HQ").astype(np.float32)
    _, pwin, wac, _ = _constants()
    power = _power(_frames(low, PITCH_WIN, n, hop=PITCH_HOP), pwin, PITCH_FFT)
    ac = sfft.irfft(power, PITCH_FFT, axis=1)[:, :PITCH_WIN]
    return pick_pitch(ac, wac)


def pick_pitch(ac: np.ndarray, wac: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """F0 and harmonicity from raw per-frame autocorrelations (lags 0..PITCH_WIN-1 at PITCH_RATE)."""
    ac = ac / (ac[:, :1] + EPS) / np.maximum(wac, 1e-3)
    lo, hi = int(PITCH_RATE / F0_MAX), int(PITCH_RATE / F0_MIN)
    region = ac[:, lo:hi]
    # Multiples of the period peak almost as high as the period itself (and the window correction
    # lifts them further), so take the shortest-lag local maximum close to the best one rather
    # than the best one: that avoids reporting a half or a third of the true pitch.
    inner = region[:, 1:-1]
    is_peak = np.zeros_like(region, dtype=bool)
    is_peak[:, 1:-1] = (inner >= region[:, :-2]) & (inner >= region[:, 2:])
    best = region.max(axis=1, keepdims=True)
    candidates = is_peak & (region >= OCTAVE_TOLERANCE * best)
    idx = np.where(candidates.any(axis=1), np.argmax(candidates, axis=1), np.argmax(region, axis=1))
    rows = np.arange(region.shape[0])
    peak = region[rows, idx]
    # Parabolic interpolation around the peak for sub-sample lag precision.
    left = region[rows, np.maximum(idx - 1, 0)]
    right = region[rows, np.minimum(idx + 1, region.shape[1] - 1)]
    denom = left - 2 * peak + right
    shift = np.where(np.abs(denom) > EPS, 0.5 * (left - right) / np.where(denom == 0, 1, denom), 0.0)
    lag = lo + idx + np.clip(shift, -0.5, 0.5)
    return (PITCH_RATE / lag).astype(np.float32), np.clip(peak, 0.0, 1.0).astype(np.float32)


def _active_span(energy_db: np.ndarray) -> slice:
    """Frames between the first and last one within TRIM_DB of the loudest (silence trimming)."""
    active = np.flatnonzero(energy_db > energy_db.max() - TRIM_DB)
    return slice(int(active[0]), int(active[-1]) + 1)


def _stats(m: np.ndarray, which: tuple[str, ...]) -> list[np.ndarray]:
    """Column statistics of an (n, d) array; percentiles in one vectorised call."""
    out: list[np.ndarray] = []
    pct = [p for p in ("p10", "p50", "p90") if p in which]
    if "mean" in which:
        out.append(m.mean(axis=0))
    if "std" in which:
        out.append(m.std(axis=0))
    if pct:
        q = np.percentile(m, [int(p[1:]) for p in pct], axis=0)
        out.extend(q)
    if "slope" in which:
        t = np.arange(m.shape[0], dtype=np.float32)
        t = (t - t.mean()) / (t.std() + EPS)
        out.append((t @ (m - m.mean(axis=0))) / max(m.shape[0], 1))
    return out


def _f0_stats(f0: np.ndarray, voiced: np.ndarray, harm: np.ndarray, energy: np.ndarray) -> np.ndarray:
    if voiced.sum() < 3:
        return np.zeros(13, dtype=np.float32)
    st = 12.0 * np.log2(f0[voiced] / 55.0)  # semitones above A1
    p10, p50, p90 = np.percentile(st, [10, 50, 90])
    t = np.flatnonzero(voiced).astype(np.float32)
    slope = np.polyfit(t / 100.0, st, 1)[0] if t.size > 1 else 0.0
    both = voiced[1:] & voiced[:-1]
    dst = np.abs(np.diff(12.0 * np.log2(np.maximum(f0, 1.0) / 55.0)))[both]
    jitter = float(np.mean(dst)) if dst.size else 0.0
    shimmer = float(np.mean(np.abs(np.diff(energy))[both])) if both.any() else 0.0
    edges = np.diff(np.r_[0, voiced.astype(np.int8), 0])
    n_seg = int((edges == 1).sum())
    return np.array([st.mean(), st.std(), p10, p50, p90, p90 - p10, slope, jitter, shimmer,
                     voiced.mean(), harm[voiced].mean(), n_seg / (voiced.size / 100.0),
                     voiced.sum() / max(n_seg, 1) / 100.0], dtype=np.float32)


def utterance_vector(d: dict[str, np.ndarray]) -> np.ndarray:
    """Statistics over the active span: the RandomForest's input."""
    mfcc, logmel, energy = d["mfcc"], d["logmel"], d["energy_db"]
    dmfcc = np.diff(mfcc, axis=0) if mfcc.shape[0] > 1 else np.zeros_like(mfcc)
    bands = logmel.reshape(logmel.shape[0], 16, N_MELS // 16).mean(axis=2)
    spectral = np.stack([d[k] for k in ("centroid", "bandwidth", "rolloff", "flatness", "flux", "zcr")], 1)
    energy_rel = (energy - energy.max())[:, None]
    denergy = np.diff(energy)[:, None] if energy.size > 1 else np.zeros((1, 1), np.float32)
    parts = [
        *_stats(mfcc, ("mean", "std", "p10", "p50", "p90", "slope")),
        *_stats(dmfcc, ("mean", "std")),
        *_stats(bands - bands.mean(), ("mean", "std", "p90")),
        *_stats(spectral, ("mean", "std", "p10", "p50", "p90")),
        *_stats(energy_rel, ("mean", "std", "p10", "p50", "p90", "slope")),
        *_stats(denergy, ("std", "p10", "p90")),
        _f0_stats(d["f0"], d["voiced"], d["harmonicity"], energy),
        np.array([energy.size / 100.0, float(energy.max())], dtype=np.float32),
    ]
    return np.concatenate([np.ravel(p) for p in parts]).astype(np.float32)


def frame_sequence(d: dict[str, np.ndarray]) -> np.ndarray:
    """Pooled frame features for the LSTM: MFCC (mean-normalised), deltas, prosody, shape."""
    mfcc = d["mfcc"] - d["mfcc"].mean(axis=0)
    dmfcc = np.gradient(d["mfcc"], axis=0) if d["mfcc"].shape[0] > 1 else np.zeros_like(mfcc)
    f0, voiced = d["f0"], d["voiced"]
    median_st = np.median(12.0 * np.log2(f0[voiced] / 55.0)) if voiced.any() else 0.0
    f0_rel = np.where(voiced, 12.0 * np.log2(np.maximum(f0, 1.0) / 55.0) - median_st, 0.0)
    cols = [
        mfcc, dmfcc,
        (d["energy_db"] - d["energy_db"].max())[:, None] / 10.0,
        f0_rel[:, None] / 12.0, voiced[:, None].astype(np.float32), d["harmonicity"][:, None],
        d["centroid"][:, None], d["flatness"][:, None], d["zcr"][:, None] * 10.0,
    ]
    seq = np.concatenate(cols, axis=1).astype(np.float32)
    steps = max(1, seq.shape[0] // SEQ_POOL)
    seq = seq[: steps * SEQ_POOL] if seq.shape[0] >= SEQ_POOL else seq
    return seq.reshape(steps, -1, seq.shape[1]).mean(axis=1)


def extract(audio: np.ndarray,
            descriptors: Callable[[np.ndarray], dict[str, np.ndarray]] | None = None) -> Features:
    """Both models' inputs from mono float32 audio at SAMPLE_RATE.

    ``descriptors`` replaces the frame-descriptor stage (the benchmark's naive reference uses it).
    Raises SilentAudio when nothing in the recording rises above digital near-silence.
    """
    if audio.size == 0 or float(np.max(np.abs(audio))) < 10 ** (SILENCE_DBFS / 20):
        raise SilentAudio("the recording is silent")
    d = (descriptors or frame_descriptors)(audio)
    span = _active_span(d["energy_db"])
    trimmed = {k: v[span] for k, v in d.items()}
    return Features(utterance_vector(trimmed), frame_sequence(trimmed), audio.size / SAMPLE_RATE)


VECTOR_DIM = 20 * 6 + 20 * 2 + 16 * 3 + 6 * 5 + 6 + 3 + 13 + 2
SEQ_DIM = N_MFCC * 2 + 7
