"""Reproducible recordings that hold no speech: noises, tones, music, telephone signals, hum, clicks.

Everything a voice-activity detector must not call speech, made with numpy alone from a seed, at
16 kHz, so a test or a benchmark can name ``("melody", seed=3, peak=0.1)`` and get the same samples
on every machine. ``make(kind, seed, peak)`` gives one recording; ``KINDS`` lists the kinds.

Each recording is 3–5 s (the seed picks the length and the details: pitches, digits, modulation
rates), and is scaled to a realistic peak level (0.1–0.8 of full scale; the seed picks one when
``peak`` is not given). Levels are peaks, not RMS, because that is what a recorder's limiter or a
user's gain sets; a noise then has a far lower RMS than a tone of the same peak, as in life.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

RATE = 16000
Generator = Callable[[np.random.Generator, int], np.ndarray]


def _t(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.float64) / RATE


def _coloured(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Noise whose power falls as 1/f**exponent (0 white, 1 pink, 2 brown), shaped in the spectrum."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1.0 / RATE)
    f[0] = f[1]  # no infinite DC gain
    return np.fft.irfft(spectrum / f ** (exponent / 2.0), n)


def _ramp(x: np.ndarray, seconds: float = 0.01) -> np.ndarray:
    """Fade in and out so a tone burst starts without the click a hard edge would add."""
    k = min(int(seconds * RATE), x.size // 2)
    if k:
        env = np.ones(x.size)
        env[:k] = np.linspace(0.0, 1.0, k)
        env[-k:] = np.linspace(1.0, 0.0, k)
        x = x * env
    return x


def _tones(freqs: list[float], n: int, phase: np.ndarray | None = None) -> np.ndarray:
    t = _t(n)
    ph = np.zeros(len(freqs)) if phase is None else phase
    return sum((np.sin(2 * np.pi * f * t + p) for f, p in zip(freqs, ph, strict=True)), np.zeros(n))


def white(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.standard_normal(n)


def pink(rng: np.random.Generator, n: int) -> np.ndarray:
    return _coloured(rng, n, 1.0)


def brown(rng: np.random.Generator, n: int) -> np.ndarray:
    return _coloured(rng, n, 2.0)


def tone_440(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.sin(2 * np.pi * 440.0 * _t(n) + rng.uniform(0, 2 * np.pi))


def tone_1k(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.sin(2 * np.pi * 1000.0 * _t(n) + rng.uniform(0, 2 * np.pi))


def chord(rng: np.random.Generator, n: int) -> np.ndarray:
    """A major triad on a random root (three sustained tones)."""
    root = 220.0 * 2 ** (rng.integers(0, 12) / 12)
    return _tones([root, root * 2 ** (4 / 12), root * 2 ** (7 / 12)], n, rng.uniform(0, 2 * np.pi, 3))


def melody(rng: np.random.Generator, n: int) -> np.ndarray:
    """A synth line: notes of a pentatonic scale with harmonics and attack-decay envelopes.

    The hardest of these for a detector: pitched, harmonic, and changing every few hundred ms,
    as voiced speech is.
    """
    out = np.zeros(n)
    scale = [0, 2, 4, 7, 9, 12, 14, 16]
    pos = 0
    while pos < n:
        dur = int(rng.choice([0.125, 0.25, 0.25, 0.5]) * RATE)
        f0 = 261.63 * 2 ** (scale[rng.integers(len(scale))] / 12)
        t = _t(min(dur, n - pos))
        note = sum(np.sin(2 * np.pi * f0 * k * t) / k ** 1.5 for k in range(1, 7))
        env = np.minimum(t / 0.01, 1.0) * np.exp(-t * rng.uniform(3.0, 8.0))
        out[pos : pos + t.size] += note * env
        pos += dur
    return out


def clicks(rng: np.random.Generator, n: int) -> np.ndarray:
    """An impulse train (a clock, a ticking relay) with a little jitter and a decaying ring."""
    out = np.zeros(n)
    period = rng.uniform(0.08, 0.5)
    times = np.arange(rng.uniform(0, period), n / RATE, period)
    times = times + rng.normal(0, 0.002, times.size)
    ring = np.exp(-np.arange(80) / 10.0) * np.where(np.arange(80) % 2, -1.0, 1.0)
    for t0 in times:
        i = int(t0 * RATE)
        if 0 <= i < n:
            seg = ring[: n - i]
            out[i : i + seg.size] += seg
    return out


def hum(rng: np.random.Generator, n: int) -> np.ndarray:
    """Mains hum: 50 Hz and its odd and even harmonics, as a ground loop makes."""
    base = rng.choice([50.0, 60.0])
    amps = [1.0, 0.5, 0.35, 0.2, 0.15, 0.1]
    t = _t(n)
    return sum((a * np.sin(2 * np.pi * base * (k + 1) * t + rng.uniform(0, 2 * np.pi))
                for k, a in enumerate(amps)), np.zeros(n)) + 0.01 * rng.standard_normal(n)


def sweep(rng: np.random.Generator, n: int) -> np.ndarray:
    """A logarithmic sine sweep from 100 Hz to 8 kHz (a measurement signal)."""
    f0, f1, dur = 100.0, 7900.0, n / RATE
    t = _t(n)
    k = np.log(f1 / f0)
    return np.sin(2 * np.pi * f0 * dur / k * (np.exp(t / dur * k) - 1.0))


DTMF = {"1": (697, 1209), "2": (697, 1336), "3": (697, 1477), "4": (770, 1209), "5": (770, 1336),
        "6": (770, 1477), "7": (852, 1209), "8": (852, 1336), "9": (852, 1477), "*": (941, 1209),
        "0": (941, 1336), "#": (941, 1477)}


def dtmf(rng: np.random.Generator, n: int) -> np.ndarray:
    """A dialled number: DTMF digits of 70–200 ms with gaps of 60–300 ms."""
    out = np.zeros(n)
    pos = int(rng.uniform(0.05, 0.3) * RATE)
    while pos < n:
        low, high = DTMF[str(rng.choice(list(DTMF)))]
        m = min(int(rng.uniform(0.07, 0.2) * RATE), n - pos)
        out[pos : pos + m] = _ramp(_tones([low, high], m), 0.003)
        pos += m + int(rng.uniform(0.06, 0.3) * RATE)
    return out


def dial_tone(rng: np.random.Generator, n: int) -> np.ndarray:
    return _tones([350.0, 440.0], n, rng.uniform(0, 2 * np.pi, 2))


def busy(rng: np.random.Generator, n: int) -> np.ndarray:
    """The North American busy signal: 480 + 620 Hz, 0.5 s on, 0.5 s off."""
    on = (_t(n) % 1.0) < 0.5
    return _tones([480.0, 620.0], n) * on


def buzzer(rng: np.random.Generator, n: int) -> np.ndarray:
    """A square wave (an alarm buzzer, a cheap beeper) between 200 and 1000 Hz."""
    f = rng.uniform(200.0, 1000.0)
    return np.sign(np.sin(2 * np.pi * f * _t(n) + 1e-3))


def rumble(rng: np.random.Generator, n: int) -> np.ndarray:
    """Low-passed noise whose loudness drifts at 0.2–3 Hz, as wind or passing traffic does."""
    base = _coloured(rng, n, 1.5)
    t = _t(n)
    env = 1.0 + 0.8 * np.sin(2 * np.pi * rng.uniform(0.2, 3.0) * t + rng.uniform(0, 2 * np.pi))
    env *= 1.0 + 0.3 * np.sin(2 * np.pi * rng.uniform(0.05, 0.3) * t)
    return base * env


KINDS: dict[str, Generator] = {
    "white_noise": white, "pink_noise": pink, "brown_noise": brown, "tone_440": tone_440,
    "tone_1k": tone_1k, "chord": chord, "melody": melody, "clicks": clicks, "hum": hum,
    "sweep": sweep, "dtmf": dtmf, "dial_tone": dial_tone, "busy_signal": busy, "buzzer": buzzer,
    "rumble": rumble,
}


def make(kind: str, seed: int = 0, peak: float | None = None) -> np.ndarray:
    """One recording of ``kind``: 3–5 s at 16 kHz, float32, its peak at ``peak`` (0.1–0.8 if None)."""
    # The kind goes into the seed so that seed 0 of two kinds does not share its random stream.
    rng = np.random.default_rng([seed, sorted(KINDS).index(kind)])
    n = int(rng.uniform(3.0, 5.0) * RATE)
    x = KINDS[kind](rng, n)
    level = rng.uniform(0.1, 0.8) if peak is None else peak
    return (x * (level / np.max(np.abs(x)))).astype(np.float32)


def speech_power(clean: np.ndarray) -> float:
    """Mean power of a recording's 10 ms frames within 35 dB of its loudest: its speech, not the
    silence around it (RAVDESS clips open with a second of it, which would halve a plain mean)."""
    x = np.asarray(clean, dtype=np.float64)
    frames = x[: x.size // 160 * 160].reshape(-1, 160)
    power = np.mean(frames**2, axis=1)
    return float(np.mean(power[power >= power.max() * 10 ** (-35 / 10)]))


def with_noise(clean: np.ndarray, snr_db: float, seed: int = 0, power: float | None = None) -> np.ndarray:
    """``clean`` plus white noise ``snr_db`` below its speech power (or below ``power`` if given)."""
    p = speech_power(clean) if power is None else power
    noise = np.random.default_rng(seed).standard_normal(np.asarray(clean).size) * np.sqrt(p / 10 ** (snr_db / 10))
    return (clean + noise).astype(np.float32)
