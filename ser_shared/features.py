"""The one feature pipeline, shared by training, evaluation and the workers.

Everything derives from a single framing of the signal: one power STFT feeds the mel bands,
MFCCs and spectral shape; one autocorrelation pass (computed through the FFT) gives pitch and
voicing. The utterance vector (for the RandomForest) is a set of statistics over these frame
descriptors; the frame sequence (for the LSTM) is a pooled, per-utterance-normalised view of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.fft import dct

from ser_shared.errors import SilentAudio

FEATURE_VERSION = "fv2"
SAMPLE_RATE = 16000
N_FFT = 512
WIN = 400  # 25 ms
HOP = 160  # 10 ms
N_MELS = 64
N_MFCC = 20
PITCH_WIN = 640  # 40 ms: two periods of a 50 Hz voice
PITCH_FFT = 2048
F0_MIN, F0_MAX = 60.0, 500.0
VOICING_THRESHOLD = 0.45
OCTAVE_TOLERANCE = 0.9
SEQ_POOL = 3  # LSTM steps of 30 ms
SILENCE_DBFS = -70.0
TRIM_DB = 40.0
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


@lru_cache(maxsize=1)
def _windows() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    win = np.hanning(WIN + 2)[1:-1].astype(np.float32)
    pwin = np.hanning(PITCH_WIN + 2)[1:-1].astype(np.float32)
    # Autocorrelation of the window itself: dividing by it removes the taper's bias toward short lags.
    wac = np.fft.irfft(np.abs(np.fft.rfft(pwin, PITCH_FFT)) ** 2)[:PITCH_WIN]
    return win, pwin, (wac / wac[0]).astype(np.float32)


def _frames(x: np.ndarray, length: int, n: int) -> np.ndarray:
    """``n`` frames of ``length`` samples every HOP samples, centred on k*HOP (zero-padded)."""
    pad = length // 2
    need = (n - 1) * HOP + length
    padded = np.zeros(need, dtype=np.float32)
    end = min(x.size, need - pad)
    padded[pad : pad + end] = x[:end]
    return np.lib.stride_tricks.sliding_window_view(padded, length)[::HOP][:n]


def frame_descriptors(audio: np.ndarray) -> dict[str, np.ndarray]:
    """Frame-level descriptors at a 10 ms hop: log-mel, MFCC, energy, spectral shape, pitch."""
    x = np.ascontiguousarray(audio, dtype=np.float32)
    n = max(1, 1 + x.size // HOP)
    win, pwin, wac = _windows()
    frames = _frames(x, WIN, n)
    power = np.abs(np.fft.rfft(frames * win, N_FFT)).astype(np.float32) ** 2  # (n, 257)
    logmel = 10.0 * np.log10(power @ _mel_basis() + EPS)
    mfcc = dct(logmel, type=2, norm="ortho", axis=1)[:, :N_MFCC].astype(np.float32)
    rms = np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1)).astype(np.float32)
    energy_db = 20.0 * np.log10(rms + 1e-5)
    freqs = np.linspace(0.0, SAMPLE_RATE / 2, power.shape[1], dtype=np.float32)
    total = power.sum(axis=1) + EPS
    centroid = (power @ freqs) / total
    bandwidth = np.sqrt(np.maximum((power @ freqs**2) / total - centroid**2, 0.0))
    cumulative = np.cumsum(power, axis=1)
    rolloff = freqs[np.minimum((cumulative < 0.85 * total[:, None]).sum(axis=1), freqs.size - 1)]
    flatness = np.exp(np.mean(np.log(power + EPS), axis=1)) / (np.mean(power, axis=1) + EPS)
    mag = np.sqrt(power)
    norm_mag = mag / (mag.sum(axis=1, keepdims=True) + EPS)
    flux = np.r_[0.0, np.sum(np.maximum(np.diff(norm_mag, axis=0), 0.0), axis=1)].astype(np.float32)
    signs = np.signbit(frames)
    zcr = np.mean(signs[:, 1:] != signs[:, :-1], axis=1).astype(np.float32)
    f0, harmonicity = _pitch(_frames(x, PITCH_WIN, n) * pwin, wac)
    voiced = (harmonicity > VOICING_THRESHOLD) & (energy_db > energy_db.max() - 35.0)
    return {
        "logmel": logmel, "mfcc": mfcc, "energy_db": energy_db, "centroid": centroid / 1000.0,
        "bandwidth": bandwidth / 1000.0, "rolloff": rolloff / 1000.0, "flatness": flatness,
        "flux": flux, "zcr": zcr, "f0": np.where(voiced, f0, 0.0).astype(np.float32),
        "harmonicity": harmonicity, "voiced": voiced,
    }


def _pitch(frames: np.ndarray, wac: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """F0 and harmonicity (normalised autocorrelation peak) per frame, via one FFT per frame."""
    spec = np.fft.rfft(frames, PITCH_FFT)
    ac = np.fft.irfft(np.abs(spec) ** 2, PITCH_FFT)[:, :PITCH_WIN].astype(np.float32)
    ac = ac / (ac[:, :1] + EPS) / np.maximum(wac, 1e-3)
    lo, hi = int(SAMPLE_RATE / F0_MAX), int(SAMPLE_RATE / F0_MIN)
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
    peak = region[np.arange(region.shape[0]), idx]
    # Parabolic interpolation around the peak for sub-sample lag precision.
    left = region[np.arange(region.shape[0]), np.maximum(idx - 1, 0)]
    right = region[np.arange(region.shape[0]), np.minimum(idx + 1, region.shape[1] - 1)]
    denom = left - 2 * peak + right
    shift = np.where(np.abs(denom) > EPS, 0.5 * (left - right) / np.where(denom == 0, 1, denom), 0.0)
    lag = lo + idx + np.clip(shift, -0.5, 0.5)
    return (SAMPLE_RATE / lag).astype(np.float32), np.clip(peak, 0.0, 1.0).astype(np.float32)


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


def extract(audio: np.ndarray) -> Features:
    """Both models' inputs from mono float32 audio at SAMPLE_RATE.

    Raises SilentAudio when nothing in the recording rises above digital near-silence.
    """
    if audio.size == 0 or float(np.max(np.abs(audio))) < 10 ** (SILENCE_DBFS / 20):
        raise SilentAudio("the recording is silent")
    d = frame_descriptors(audio)
    span = _active_span(d["energy_db"])
    trimmed = {k: v[span] for k, v in d.items()}
    return Features(utterance_vector(trimmed), frame_sequence(trimmed), audio.size / SAMPLE_RATE)


VECTOR_DIM = 20 * 6 + 20 * 2 + 16 * 3 + 6 * 5 + 6 + 3 + 13 + 2
SEQ_DIM = N_MFCC * 2 + 7
