"""The naive reference for the feature pipeline: one librosa call per feature.

Each descriptor is computed the way a typical SER script does it, by its own library call that
recomputes its own spectrogram (melspectrogram, mfcc, rms, spectral_centroid, ...), and pitch
by a per-frame autocorrelation loop. The definitions are the service's (``ser_ml.features``),
so the two must give the same numbers: ``tests/unit/test_features_reference.py`` checks that, and
``python -m bench.features`` times them against each other.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ser_ml import features as F


def descriptors(audio: np.ndarray) -> dict[str, np.ndarray]:
    """The same frame descriptors as ``features.frame_descriptors``, computed feature by feature."""
    import librosa

    x = np.ascontiguousarray(audio, dtype=np.float32)
    sr = F.SAMPLE_RATE
    stft: dict[str, Any] = {"n_fft": F.N_FFT, "hop_length": F.HOP, "win_length": F.WIN, "center": True,
                            "pad_mode": "constant"}
    mel: dict[str, Any] = {"n_mels": F.N_MELS, "fmin": 50.0, "fmax": sr / 2}
    melspec = librosa.feature.melspectrogram(y=x, sr=sr, power=2.0, **stft, **mel)
    logmel = librosa.power_to_db(melspec, ref=1.0, amin=F.AMIN, top_db=F.TOP_DB).T
    mfcc = librosa.feature.mfcc(y=x, sr=sr, n_mfcc=F.N_MFCC, **stft, **mel).T
    rms = librosa.feature.rms(y=x, frame_length=F.WIN, hop_length=F.HOP, center=True, pad_mode="constant")[0]
    centroid = librosa.feature.spectral_centroid(y=x, sr=sr, **stft)[0]
    bandwidth = librosa.feature.spectral_bandwidth(y=x, sr=sr, **stft)[0]
    rolloff = librosa.feature.spectral_rolloff(y=x, sr=sr, roll_percent=F.ROLLOFF, **stft)[0]
    flatness = librosa.feature.spectral_flatness(y=x, amin=F.AMIN, power=2.0, **stft)[0]
    magnitude = np.abs(librosa.stft(x, **stft))  # librosa has no flux of this definition: numpy over its STFT
    share = magnitude / (magnitude.sum(axis=0, keepdims=True) + F.EPS)
    flux = np.r_[0.0, np.maximum(np.diff(share, axis=1), 0.0).sum(axis=0)]
    zcr = librosa.feature.zero_crossing_rate(x, frame_length=F.WIN, hop_length=F.HOP, center=True)[0]
    f0, harmonicity = pitch(x, logmel.shape[0])
    energy_db = 20.0 * np.log10(rms + 1e-5)
    return F.assemble(logmel=logmel, mfcc=mfcc, energy_db=energy_db, centroid=centroid, bandwidth=bandwidth,
                      rolloff=rolloff, flatness=flatness, flux=flux, zcr=zcr, f0=f0, harmonicity=harmonicity)


def pitch(x: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame autocorrelation at 8 kHz, one ``librosa.autocorrelate`` call per frame."""
    import librosa

    low = librosa.resample(x, orig_sr=F.SAMPLE_RATE, target_sr=F.PITCH_RATE, res_type="soxr_hq")
    padded = np.pad(low, (F.PITCH_WIN // 2, F.PITCH_WIN + n * F.PITCH_HOP))
    window = librosa.filters.get_window("hann", F.PITCH_WIN, fftbins=True)
    rows = []
    for k in range(n):
        frame = padded[k * F.PITCH_HOP : k * F.PITCH_HOP + F.PITCH_WIN] * window
        rows.append(librosa.autocorrelate(frame, max_size=F.PITCH_WIN))
    wac = librosa.autocorrelate(window, max_size=F.PITCH_WIN)
    return F.pick_pitch(np.asarray(rows, dtype=np.float32), (wac / wac[0]).astype(np.float32))


def extract(audio: np.ndarray) -> F.Features:
    """Both models' inputs, from the reference descriptors (the statistics are the service's)."""
    return F.extract(audio, descriptors=descriptors)
