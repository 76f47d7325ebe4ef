"""Training-time augmentation: more speakers' worth of variation from the same recordings.

Applied to the training side of each fold only (the corpus keeps an augmented copy of every file,
and a fold uses the copies of its training actors), never to evaluation or served audio. Only the
LSTM trains on the copies: in cross-validation they lifted it from 0.48 to 0.56 accuracy, while
the RandomForest gained nothing measurable (0.564 -> 0.568 alone, none in the ensemble) and grew
three times larger.
"""

from __future__ import annotations

import numpy as np

from worker import conditions

# Speed perturbation (Ko et al., 2015) shifts pitch, formants and tempo together, as a different
# vocal tract would; white noise at 20 dB SNR stands in for a worse microphone.
AUGMENTATIONS: tuple[str, ...] = ("speed0.9", "speed1.1", "noise20")


def apply(name: str, audio: np.ndarray, seed: int) -> np.ndarray:
    """The augmented copy of ``audio`` (mono float32 at SAMPLE_RATE); ``seed`` makes noise repeatable."""
    if name.startswith("speed"):
        return conditions.speed(audio, float(name.removeprefix("speed")))
    if name.startswith("noise"):
        # Not conditions' ``noise:SNR``, which measures against the active speech only: the shipped
        # models were trained on copies made this way, against the whole clip's power (on RAVDESS
        # about 3 dB below the speech's, so noise20 is roughly noise:white:23), and changing it
        # silently would change what they learn.
        snr_db = float(name.removeprefix("noise"))
        rng = np.random.default_rng(seed)
        power = float(np.mean(audio.astype(np.float64) ** 2))
        noise = rng.standard_normal(audio.size) * np.sqrt(power / 10 ** (snr_db / 10))
        return np.clip(audio + noise, -1.0, 1.0).astype(np.float32)
    raise ValueError(f"unknown augmentation {name!r}")
