"""Non-speech recordings for *training* the speech detector (``ser_ml.speech_detector``).

Deliberately a separate generator from ``tests/nonspeech.py``: that one is the held-out test set,
and a detector trained on its own functions would be graded on what it memorised. The families
here are broader, and none shares code with the test kinds: each draws its shape (spectral tilt,
pitch, harmonics, vibrato, envelope, cadence, rate) at random, so the detector has to learn "not
speech" rather than "one of fifteen recipes".

``make(family, seed)`` gives one recording: 1–6 s, 16 kHz, float32, peak 0.02–1.0 (log-uniform,
since a level is heard in decibels), finite, in [-1, 1], mostly over a faint noise floor.
``NAMES`` lists the ten ``FAMILIES`` and ``mixture`` (two of them added); ``sample(seed, count)``
draws them in turn.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

RATE = 16000
DURATION_S = (1.0, 6.0)
PEAK = (0.02, 1.0)
Family = Callable[[np.random.Generator, int], np.ndarray]


def _time(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.float64) / RATE


def _tilted_noise(rng: np.random.Generator, n: int, slope: float,
                  band: tuple[float, float] | None = None) -> np.ndarray:
    """Gaussian noise whose power spectrum goes as 1/f**slope (0 white, 1 pink, 2 brown, <0 bluer),
    optionally kept to ``band``; unit RMS."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1.0 / RATE)
    gain = np.maximum(f, 15.0) ** (-slope / 2.0)  # flat below 15 Hz: no inaudible DC drift
    if band is not None:
        gain = gain * ((f >= band[0]) & (f <= band[1]))
    out = np.fft.irfft(spec * gain, n)
    rms = float(np.sqrt(np.mean(out**2)))
    return out / rms if rms > 0 else rng.standard_normal(n)


def _random_band(rng: np.random.Generator) -> tuple[float, float] | None:
    if rng.random() < 0.5:
        return None
    low = float(np.exp(rng.uniform(np.log(20.0), np.log(3000.0))))
    return low, min(7900.0, low * float(np.exp(rng.uniform(np.log(1.5), np.log(40.0)))))


def _slow_drift(rng: np.random.Generator, n: int, depth: float) -> np.ndarray:
    """A smooth level envelope: a few random sinusoids below 4 Hz, 1 ± ``depth``."""
    t = _time(n)
    env = np.zeros(n)
    for _ in range(int(rng.integers(1, 4))):
        env += np.sin(2 * np.pi * rng.uniform(0.05, 4.0) * t + rng.uniform(0, 2 * np.pi))
    return 1.0 + depth * env / max(float(np.max(np.abs(env))), 1e-9)


def _adsr(rng: np.random.Generator, m: int) -> np.ndarray:
    """Attack–decay–sustain–release with random times and sustain level."""
    a = int(m * rng.uniform(0.005, 0.3))
    d = int(m * rng.uniform(0.0, 0.4))
    r = int(m * rng.uniform(0.02, 0.4))
    s = max(m - a - d - r, 0)
    level = rng.uniform(0.2, 1.0)
    env = np.concatenate([np.linspace(0, 1, a, endpoint=False), np.linspace(1, level, d, endpoint=False),
                          np.full(s, level), np.linspace(level, 0, r)])
    return np.pad(env, (0, max(m - env.size, 0)))[:m]


def _timbre(rng: np.random.Generator) -> np.ndarray:
    """Harmonic amplitudes: random, or a saw/square/clarinet-like roll-off with random brightness."""
    k = np.arange(1, int(rng.integers(1, 16)) + 1, dtype=np.float64)
    style = rng.integers(0, 3)
    if style == 0:
        amps = rng.uniform(0, 1, k.size) / k ** rng.uniform(0.0, 2.0)
    elif style == 1:
        amps = 1.0 / k ** rng.uniform(0.5, 2.5)
    else:
        amps = np.where(k % 2 == 1, 1.0 / k ** rng.uniform(0.5, 2.0), 0.0)
    amps[0] = max(amps[0], 0.3)
    return amps


def _harmonic(f0: np.ndarray, amps: np.ndarray, rng: np.random.Generator, inharmonic: float = 0.0) -> np.ndarray:
    """A sum of partials over an instantaneous fundamental ``f0`` (Hz per sample): the fundamental
    always (callers keep it below Nyquist), the others while they stay 200 Hz under it (no aliasing)."""
    phase = 2 * np.pi * np.cumsum(f0) / RATE
    out = np.zeros(f0.size)
    for k, a in enumerate(amps, start=1):
        stretch = k * np.sqrt(1.0 + inharmonic * k * k)  # piano/bell-like stretched partials
        if a == 0 or (k > 1 and float(np.max(f0)) * stretch >= RATE / 2 - 200):
            continue
        out += a * np.sin(stretch * phase + rng.uniform(0, 2 * np.pi))
    return out


def _pitch(rng: np.random.Generator, low: float = 60.0, high: float = 2500.0) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


# ---- families ---------------------------------------------------------------------------------


def coloured_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    """Steady noise of random spectral tilt (violet to beyond brown), maybe band-limited, with drift."""
    x = _tilted_noise(rng, n, rng.uniform(-1.0, 2.5), _random_band(rng))
    return x * _slow_drift(rng, n, rng.uniform(0.0, 0.8))


def noise_bursts(rng: np.random.Generator, n: int) -> np.ndarray:
    """Bursts of noise 10–700 ms long with gaps (steam, a door, a keyboard, rustling)."""
    out = np.zeros(n)
    slope = rng.uniform(-1.0, 2.5)
    pos = int(rng.uniform(0, 0.5) * RATE)
    while pos < n:
        m = min(int(rng.uniform(0.01, 0.7) * RATE), n - pos)
        if m > 8:
            burst = _tilted_noise(rng, m, slope + rng.normal(0, 0.3), _random_band(rng))
            out[pos : pos + m] += burst * _adsr(rng, m) * rng.uniform(0.2, 1.0)
        pos += m + int(rng.uniform(0.02, 0.8) * RATE)
    return out


def tone(rng: np.random.Generator, n: int) -> np.ndarray:
    """A sustained or repeating pitched tone: random harmonics, vibrato, tremolo, slight inharmonicity."""
    t = _time(n)
    f0 = _pitch(rng) * (1 + rng.uniform(0, 0.03) * np.sin(2 * np.pi * rng.uniform(2, 9) * t + rng.uniform(0, 6.3)))
    x = _harmonic(f0, _timbre(rng), rng, rng.choice([0.0, rng.uniform(0, 1e-3)]))
    x *= 1 + rng.uniform(0, 0.5) * np.sin(2 * np.pi * rng.uniform(1, 12) * t)
    if rng.random() < 0.4:  # a beeper or alarm cadence
        period = rng.uniform(0.1, 2.0)
        x *= (t % period) < period * rng.uniform(0.2, 0.8)
    return x


SCALES = (np.array([0, 2, 4, 5, 7, 9, 11]), np.array([0, 3, 5, 7, 10]), np.arange(12))  # major, pentatonic, chromatic


def notes(rng: np.random.Generator, n: int) -> np.ndarray:
    """A line of notes (random scale or free pitches) with a random timbre and ADSR per note;
    sometimes gliding between notes or overlapping (sustain pedal). The nearest thing here to voiced
    speech: pitched, harmonic, changing every tenth of a second or so."""
    out = np.zeros(n)
    amps = _timbre(rng)
    inharm = rng.choice([0.0, rng.uniform(0, 2e-3)])
    base = _pitch(rng, 80.0, 1200.0)
    scale = SCALES[int(rng.integers(len(SCALES)))]
    free = rng.random() < 0.3
    overlap = rng.uniform(1.0, 2.5) if rng.random() < 0.4 else 1.0
    pos = 0
    while pos < n:
        dur = int(rng.uniform(0.06, 0.8) * RATE)
        m = min(int(dur * overlap), n - pos)
        if free:
            f = base * 2 ** rng.uniform(-1, 1.5)
        else:
            f = base * 2 ** ((scale[rng.integers(scale.size)] + 12 * rng.integers(-1, 2)) / 12)
        f0 = np.full(m, f)
        if rng.random() < 0.2:  # portamento from a neighbouring pitch
            f0 *= 2 ** (np.linspace(rng.uniform(-0.3, 0.3), 0, m))
        out[pos : pos + m] += _harmonic(f0, amps, rng, inharm) * _adsr(rng, m) * rng.uniform(0.4, 1.0)
        pos += dur
    return out


def chords(rng: np.random.Generator, n: int) -> np.ndarray:
    """2–5 simultaneous tones (random intervals, shared timbre), held or changing every 0.3–2 s."""
    out = np.zeros(n)
    amps = _timbre(rng)
    pos = 0
    while pos < n:
        m = min(int(rng.uniform(0.3, 2.0) * RATE), n - pos)
        root = _pitch(rng, 70.0, 900.0)
        env = _adsr(rng, m) if rng.random() < 0.6 else np.ones(m)
        for semis in rng.choice(np.arange(1, 25), size=int(rng.integers(1, 5)), replace=False).tolist() + [0]:
            out[pos : pos + m] += _harmonic(np.full(m, root * 2 ** (semis / 12)), amps, rng) * env
        pos += m
    return out


def impulses(rng: np.random.Generator, n: int) -> np.ndarray:
    """An impulse train at 0.5–250 per second (a clock to a buzz), jittered, each impulse ringing
    through a random resonance; sometimes the rate drifts (a slowing motor)."""
    rate = float(np.exp(rng.uniform(np.log(0.5), np.log(250.0))))
    drift = 2 ** rng.uniform(-1, 1) if rng.random() < 0.3 else 1.0
    times, t = [], rng.uniform(0, 1 / rate)
    while t < n / RATE:
        times.append(t)
        r = rate * drift ** (t / (n / RATE))
        t += (1 / r) * (1 + rng.normal(0, rng.uniform(0, 0.2)))
    ring_len = int(rng.uniform(0.001, 0.03) * RATE) + 2
    k = np.arange(ring_len)
    ring = np.exp(-k / (ring_len / rng.uniform(2, 8))) * np.cos(2 * np.pi * rng.uniform(200, 6000) / RATE * k)
    out = np.zeros(n + ring_len)
    for t0 in times:
        i = int(t0 * RATE)
        out[i : i + ring_len] += ring * rng.uniform(0.5, 1.0) * rng.choice([-1.0, 1.0])
    return out[:n]


def sweeps(rng: np.random.Generator, n: int) -> np.ndarray:
    """Frequency sweeps and modulated tones: linear or log chirps either way, sirens (sinusoidal FM),
    wobbles; often amplitude-modulated."""
    t = _time(n)
    lo, hi = sorted([_pitch(rng, 50.0, 7000.0), _pitch(rng, 50.0, 7000.0)])
    style = rng.integers(0, 3)
    if style == 0:  # chirp, possibly repeated
        period = n / RATE / int(rng.integers(1, 4))
        u = (t % period) / period
        u = u if rng.random() < 0.5 else 1 - u
        f = lo * (hi / lo) ** u if rng.random() < 0.5 else lo + (hi - lo) * u
    elif style == 1:  # siren
        f = np.sqrt(lo * hi) * 2 ** (rng.uniform(0.1, 1.5) * np.sin(2 * np.pi * rng.uniform(0.2, 6) * t))
    else:  # wobble: fast FM around a carrier
        f = lo * (1 + rng.uniform(0.01, 0.3) * np.sin(2 * np.pi * rng.uniform(5, 60) * t))
    f = np.minimum(f, 7600.0)
    amps = _timbre(rng) if rng.random() < 0.3 else np.array([1.0])
    x = _harmonic(f, amps, rng)
    if rng.random() < 0.5:
        x *= 1 + rng.uniform(0.2, 1.0) * np.sin(2 * np.pi * rng.uniform(0.5, 40) * t)
    return x


def mains_hum(rng: np.random.Generator, n: int) -> np.ndarray:
    """50 or 60 Hz and random harmonics (a ground loop, a transformer, a fluorescent light), over a
    random noise floor."""
    t = _time(n)
    base = float(rng.choice([50.0, 60.0])) * (1 + rng.normal(0, 0.002))
    x = np.zeros(n)
    for k in range(1, int(rng.integers(2, 40))):
        if rng.random() < 0.7 and base * k < RATE / 2:
            x += rng.uniform(0, 1) / k ** rng.uniform(0, 1.5) * np.sin(2 * np.pi * base * k * t + rng.uniform(0, 6.3))
    x += np.sin(2 * np.pi * base * t)
    return x + _tilted_noise(rng, n, rng.uniform(0, 2)) * 10 ** rng.uniform(-3, -1) * float(np.max(np.abs(x)))


def dual_tones(rng: np.random.Generator, n: int) -> np.ndarray:
    """Signalling tones: one or two random frequencies (not only the DTMF grid), steady or in a
    random on/off cadence, or as dialled digits of random length."""
    t = _time(n)
    if rng.random() < 0.5:  # digits
        out = np.zeros(n)
        pos = int(rng.uniform(0, 0.4) * RATE)
        while pos < n:
            m = min(int(rng.uniform(0.04, 0.4) * RATE), n - pos)
            f1, f2 = rng.uniform(300, 1000), rng.uniform(1000, 2000)
            ramp = np.minimum(1, np.minimum(np.arange(m), m - 1 - np.arange(m)) / (0.002 * RATE))
            pair = np.sin(2 * np.pi * f1 * t[:m]) + rng.uniform(0.5, 1) * np.sin(2 * np.pi * f2 * t[:m])
            out[pos : pos + m] = pair * ramp
            pos += m + int(rng.uniform(0.03, 0.5) * RATE)
        return out
    freqs = rng.uniform(300, 2500, int(rng.integers(1, 3)))
    x = sum((np.sin(2 * np.pi * f * t + rng.uniform(0, 6.3)) for f in freqs), np.zeros(n))
    if rng.random() < 0.7:
        on, off = rng.uniform(0.1, 2.0), rng.uniform(0.1, 4.0)
        x *= (t % (on + off)) < on
    return x


def machinery(rng: np.random.Generator, n: int) -> np.ndarray:
    """Engines, fans, pumps: noise modulated at a firing or blade rate (5–80 Hz) with its harmonics,
    a comb-filtered whine, and a rotating tone; the rate may rise or fall."""
    t = _time(n)
    glide = rng.uniform(-0.5, 0.5) if rng.random() < 0.4 else 0.0
    rate = rng.uniform(5, 80) * 2 ** (glide * t / max(float(t[-1]), 1e-9))
    phase = 2 * np.pi * np.cumsum(rate) / RATE
    pulse = (0.5 + 0.5 * np.cos(phase)) ** rng.uniform(1, 8)
    x = _tilted_noise(rng, n, rng.uniform(0.5, 2.5), _random_band(rng)) * (rng.uniform(0.1, 0.6) + pulse)
    if rng.random() < 0.6:  # the rotation's own tone and harmonics
        x += rng.uniform(0.1, 1.0) * _harmonic(rate * rng.integers(1, 8), _timbre(rng), rng)
    if rng.random() < 0.3:  # comb filter: a fan's blade-pass resonance
        d = int(RATE / rng.uniform(100, 1000))
        x[d:] += rng.uniform(0.3, 0.9) * x[:-d]
    return x


FAMILIES: dict[str, Family] = {
    "coloured_noise": coloured_noise, "noise_bursts": noise_bursts, "tone": tone, "notes": notes,
    "chords": chords, "impulses": impulses, "sweeps": sweeps, "mains_hum": mains_hum,
    "dual_tones": dual_tones, "machinery": machinery,
}


def _mixture(rng: np.random.Generator, n: int, parts: tuple[str, str]) -> np.ndarray:
    """Two of the other families together, the second 0–20 dB below the first."""
    x, y = _unit(FAMILIES[parts[0]](rng, n)), _unit(FAMILIES[parts[1]](rng, n))
    return x + y * 10 ** (-rng.uniform(0, 20) / 20)


def _unit(x: np.ndarray) -> np.ndarray:
    peak = float(np.max(np.abs(x)))
    return x / peak if peak > 0 else x


NAMES: tuple[str, ...] = (*sorted(FAMILIES), "mixture")


def make_with_parts(family: str, seed: int, n: int | None = None) -> tuple[np.ndarray, tuple[str, ...]]:
    """``make``'s recording and the families it is made of (two for a mixture, else itself), so that
    a leave-one-family-out check can also leave out the mixtures holding that family."""
    if family not in NAMES:
        raise ValueError(f"unknown family {family!r}; one of {', '.join(NAMES)}")
    # The family's index joins the seed so two families' seed 0 do not share a random stream; a
    # constant tag keeps these streams apart from tests/nonspeech.py's (which seeds [seed, index]).
    rng = np.random.default_rng([seed, NAMES.index(family), 0x5EED])
    n = int(rng.uniform(*DURATION_S) * RATE) if n is None else n
    if family == "mixture":
        a, b = rng.choice(sorted(FAMILIES), size=2, replace=False)
        parts: tuple[str, ...] = (str(a), str(b))
        x = _mixture(rng, n, (str(a), str(b)))
    else:
        parts = (family,)
        x = FAMILIES[family](rng, n)
    x = _unit(np.nan_to_num(x))
    if rng.random() < 0.7:  # a recorder's noise floor 30–80 dB down: real files are never digitally silent
        x = x + _tilted_noise(rng, n, rng.uniform(0, 2)) * 10 ** (-rng.uniform(30, 80) / 20)
    peak = float(np.exp(rng.uniform(np.log(PEAK[0]), np.log(PEAK[1]))))
    top = float(np.max(np.abs(x)))
    if top == 0:  # no family makes silence, but should one, it must stay silent, not NaN
        return np.zeros(n, dtype=np.float32), parts
    return np.clip(x * (peak / top), -1.0, 1.0).astype(np.float32), parts


def make(family: str, seed: int, n: int | None = None) -> np.ndarray:
    """One recording of ``family`` (1–6 s, or ``n`` samples), float32, peak 0.02–1.0; the same
    samples for the same seed."""
    return make_with_parts(family, seed, n)[0]


def sample(seed: int, count: int) -> list[tuple[str, np.ndarray]]:
    """``count`` recordings, families in turn (mixtures included), seeds derived from ``seed``."""
    return [(NAMES[i % len(NAMES)], make(NAMES[i % len(NAMES)], seed * 1_000_003 + i)) for i in range(count)]
