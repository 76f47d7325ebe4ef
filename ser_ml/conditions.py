"""Reproducible acoustic conditions: the same degradations for training copies and robustness checks.

A condition is named by a short string (``telephone``, ``noise:10``, ``reverb:0.6``, ...) so that a
training recipe, an evaluation report and a person can all say exactly what was done to the audio.
``apply`` is pure: 16 kHz mono float32 in, 16 kHz mono float32 out, every random choice drawn from
the generator it is handed, so one seed gives one output, on any machine.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
import soxr
from scipy import signal

from ser_ml.features import SAMPLE_RATE

CONDITIONS: dict[str, str] = {
    "clean": "the recording unchanged",
    "telephone": "narrow-band phone line: 300-3400 Hz band-pass, 8 kHz, G.711 mu-law (North America, Japan)",
    "telephone:alaw": "the same line with G.711 A-law (Europe and most of the world)",
    "telephone:gsm": "the same line through the GSM 06.10 full-rate codec (ffmpeg libgsm): a 2G mobile call",
    "noise:SNR": "additive noise SNR dB below the active speech; white, pink, brown or (given a pool) babble, "
                 "drawn by the generator",
    "noise:TYPE:SNR": "the same with the noise chosen: TYPE is white, pink, brown or babble",
    "reverb": "a synthetic room, RT60 drawn between 0.2 and 0.8 s",
    "reverb:RT60": "a synthetic room with the given RT60 in seconds",
    "gain:DB": "level change by DB decibels, clipped to [-1, 1]",
    "speed:F": "played F times faster (pitch, formants and tempo together); length divided by F",
    "phone-noisy:SNR": "telephone, then noise:SNR (noise measured against the phone-line speech)",
}
NOISE_TYPES: tuple[str, ...] = ("white", "pink", "brown", "babble")
CODECS: tuple[str, ...] = ("ulaw", "alaw", "gsm")

PHONE_RATE = 8000
PHONE_BAND_HZ = (300.0, 3400.0)
# Speech power is measured over 20 ms frames within this many dB of the loudest: the leading and
# trailing silence of a recording (a second each side in RAVDESS) would otherwise lower the
# "speech" power and make every SNR look better than it sounds.
ACTIVE_FRAME = 320
ACTIVE_RANGE_DB = 40.0
# Coloured noise is shaped from 20 Hz up: below that nothing is heard, and a 1/f^2 spectrum taken
# down to the lowest FFT bin puts most of its power into an inaudible drift, so the named SNR
# would not be the SNR anyone hears.
NOISE_FLOOR_HZ = 20.0
BABBLE_TALKERS = (3, 6)
BABBLE_FADE = 160  # samples, 10 ms
REVERB_RT60_S = (0.2, 0.8)

# Bounds that keep a typo (``gain:200``, ``speed:9``) from silently producing garbage.
_RANGES: dict[str, tuple[float, float]] = {
    "noise": (-20.0, 80.0), "phone-noisy": (-20.0, 80.0), "reverb": (0.05, 5.0),
    "gain": (-80.0, 40.0), "speed": (0.5, 2.0),
}


@dataclass(frozen=True)
class Condition:
    kind: str  # clean, telephone, noise, reverb, gain, speed, phone-noisy
    variant: str | None = None  # the codec of a telephone, the noise type of noise (None: drawn)
    value: float | None = None  # SNR dB, RT60 s (None: drawn), gain dB or speed factor


def _invalid(name: str, why: str) -> ValueError:
    return ValueError(f"{why} in condition {name!r}; valid conditions: {', '.join(CONDITIONS)} "
                      f"(noise TYPE one of {', '.join(NOISE_TYPES)})")


def _number(name: str, text: str, kind: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _invalid(name, f"{text!r} is not a number") from None
    low, high = _RANGES[kind]
    if not low <= value <= high:  # also refuses nan and inf
        raise _invalid(name, f"{kind} value {text} is outside [{low:g}, {high:g}]")
    return value


def parse(name: str) -> Condition:
    """The condition a name stands for; ValueError, listing the valid names, for anything else."""
    kind, *args = name.strip().split(":")
    if kind == "clean" and not args:
        return Condition("clean")
    if kind == "telephone" and len(args) <= 1:
        codec = args[0] if args else "ulaw"
        if codec not in CODECS:
            raise _invalid(name, f"unknown telephone codec {codec!r}")
        return Condition("telephone", codec)
    if kind in ("noise", "phone-noisy") and len(args) == 1:
        return Condition(kind, None, _number(name, args[0], kind))
    if kind == "noise" and len(args) == 2:
        if args[0] not in NOISE_TYPES:
            raise _invalid(name, f"unknown noise type {args[0]!r}")
        return Condition("noise", args[0], _number(name, args[1], kind))
    if kind == "reverb" and len(args) <= 1:
        return Condition("reverb", None, _number(name, args[0], kind) if args else None)
    if kind in ("gain", "speed") and len(args) == 1:
        return Condition(kind, None, _number(name, args[0], kind))
    raise _invalid(name, "unknown name or wrong number of fields")


def apply(name: str, audio: np.ndarray, rng: np.random.Generator,
          babble: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """``audio`` (mono float32 at SAMPLE_RATE) under condition ``name``, all randomness from ``rng``.

    ``babble`` is a pool of other talkers' recordings (same rate) for babble noise; without one,
    ``noise`` draws among the synthetic noises only and ``noise:babble`` is refused. The output
    has the input's length except under ``speed``.
    """
    cond = parse(name)
    x = np.asarray(audio, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"expected mono audio (one dimension), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("audio holds NaN or infinity")
    if cond.kind == "clean" or x.size == 0:
        return x.copy()
    if cond.kind == "telephone":
        out = telephone(x, cond.variant or "ulaw")
    elif cond.kind == "noise":
        assert cond.value is not None
        out = add_noise(x, cond.value, rng, cond.variant, babble)
    elif cond.kind == "phone-noisy":
        assert cond.value is not None
        out = add_noise(telephone(x, "ulaw"), cond.value, rng, None, babble)
    elif cond.kind == "reverb":
        rt60 = cond.value if cond.value is not None else float(rng.uniform(*REVERB_RT60_S))
        out = reverb(x, rt60, rng)
    elif cond.kind == "gain":
        assert cond.value is not None
        out = x.astype(np.float64) * 10 ** (cond.value / 20)
    else:
        assert cond.value is not None
        out = speed(x, cond.value)
    return np.clip(out, -1.0, 1.0).astype(np.float32)


# --- speech level ---------------------------------------------------------------------------


def _frame_powers(x: np.ndarray) -> np.ndarray:
    """Mean power of each 20 ms frame (a shorter clip is one frame; the last partial frame is left out)."""
    x = x.astype(np.float64)
    if x.size < ACTIVE_FRAME:
        return np.array([float(np.mean(x**2)) if x.size else 0.0])
    n = x.size // ACTIVE_FRAME
    return np.mean(x[: n * ACTIVE_FRAME].reshape(n, ACTIVE_FRAME) ** 2, axis=1)


def _active(p: np.ndarray) -> np.ndarray:
    top = float(p.max())
    return p >= top * 10 ** (-ACTIVE_RANGE_DB / 10) if top > 0 else np.zeros(p.size, dtype=bool)


def active_power(x: np.ndarray) -> float:
    """Mean power over the frames within ACTIVE_RANGE_DB of the loudest (0 for silence)."""
    p = _frame_powers(x)
    active = _active(p)
    return float(p[active].mean()) if active.any() else 0.0


def _speech_part(x: np.ndarray) -> np.ndarray:
    """From the first to the last active frame (empty for silence): a talker without the pauses at the ends."""
    active = np.flatnonzero(_active(_frame_powers(x)))
    if active.size == 0:
        return x[:0]
    if x.size < ACTIVE_FRAME:
        return x
    return x[active[0] * ACTIVE_FRAME : (active[-1] + 1) * ACTIVE_FRAME]


# --- telephone ------------------------------------------------------------------------------


@cache
def _phone_band() -> np.ndarray:
    return signal.butter(6, PHONE_BAND_HZ, btype="bandpass", fs=SAMPLE_RATE, output="sos")


def telephone(x: np.ndarray, codec: str = "ulaw") -> np.ndarray:
    """A phone line: band-pass, 8 kHz, the codec both ways, back to 16 kHz, same length.

    The band-pass runs on both sides of the codec, as a line's send and receive filters do
    (ITU-T G.712); the second pass also removes the codec's noise outside the band.
    """
    band = signal.sosfilt(_phone_band(), x.astype(np.float64))
    narrow = np.clip(soxr.resample(band, SAMPLE_RATE, PHONE_RATE, quality="HQ"), -1.0, 1.0)
    if codec == "gsm":
        coded = gsm_round_trip(narrow)
    else:
        coded = g711_decode(g711_encode(narrow, codec), codec).astype(np.float64)
    wide = signal.sosfilt(_phone_band(), soxr.resample(coded, PHONE_RATE, SAMPLE_RATE, quality="HQ"))
    return _fit(wide, x.size)


def _fit(x: np.ndarray, n: int) -> np.ndarray:
    return x[:n] if x.size >= n else np.pad(x, (0, n - x.size))


def _pcm16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(np.asarray(x, dtype=np.float64) * 32768.0), -32768, 32767).astype(np.int32)


# G.711 as in the reference C code (Sun's g711.c, which libsndfile and SoX follow), vectorised.
_ULAW_SEG_END = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])
_ALAW_SEG_END = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF])


def g711_encode(x: np.ndarray, law: str = "ulaw") -> np.ndarray:
    """8-bit G.711 codes (``law`` ulaw or alaw) of float samples in [-1, 1]."""
    pcm = _pcm16(x)
    if law == "ulaw":
        v = pcm >> 2  # 14-bit
        mask = np.where(v < 0, 0x7F, 0xFF)
        v = np.minimum(np.abs(v), 8159) + 33
        seg = np.searchsorted(_ULAW_SEG_END, v)
        code = np.where(seg >= 8, 0x7F, (seg << 4) | ((v >> (seg + 1)) & 0x0F))  # 8: over range
    elif law == "alaw":
        v = pcm >> 3  # 13-bit
        mask = np.where(v >= 0, 0xD5, 0x55)
        v = np.where(v >= 0, v, -v - 1)
        seg = np.searchsorted(_ALAW_SEG_END, v)
        code = np.where(seg >= 8, 0x7F, (seg << 4) | ((v >> np.maximum(seg, 1)) & 0x0F))
    else:
        raise ValueError(f"unknown G.711 law {law!r} (ulaw or alaw)")
    return (code ^ mask).astype(np.uint8)


def g711_decode(codes: np.ndarray, law: str = "ulaw") -> np.ndarray:
    """Float32 samples of 8-bit G.711 codes."""
    c = np.asarray(codes, dtype=np.int32)
    if law == "ulaw":
        c = ~c & 0xFF
        t = (((c & 0x0F) << 3) + 0x84) << ((c >> 4) & 0x07)
        pcm = np.where(c & 0x80, 0x84 - t, t - 0x84)
    elif law == "alaw":
        c = c ^ 0x55
        seg = (c >> 4) & 0x07
        t = ((c & 0x0F) << 4) + np.where(seg == 0, 8, 0x108)
        t = t << np.maximum(seg - 1, 0)
        pcm = np.where(c & 0x80, t, -t)
    else:
        raise ValueError(f"unknown G.711 law {law!r} (ulaw or alaw)")
    return (pcm / 32768.0).astype(np.float32)


def gsm_round_trip(narrow: np.ndarray) -> np.ndarray:
    """8 kHz audio through GSM 06.10 full rate and back, by ffmpeg (libgsm) over pipes.

    Of the narrow-band speech codecs Debian's ffmpeg can encode (libgsm, g723_1, g726, codec2,
    speex; no AMR-NB encoder), GSM full rate is the one a real phone network has carried widely.
    """
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise RuntimeError("telephone:gsm needs ffmpeg (with libgsm) on the PATH")
    quiet = [ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error"]
    raw = ["-f", "f32le", "-ar", str(PHONE_RATE), "-ac", "1"]
    timeout = 60 + narrow.size / PHONE_RATE
    try:
        coded = subprocess.run([*quiet, *raw, "-i", "pipe:0", "-c:a", "libgsm", "-f", "gsm", "pipe:1"],
                               input=narrow.astype("<f4").tobytes(), capture_output=True, check=True,
                               timeout=timeout).stdout
        decoded = subprocess.run([*quiet, "-f", "gsm", "-i", "pipe:0", *raw, "pipe:1"], input=coded,
                                 capture_output=True, check=True, timeout=timeout).stdout
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"ffmpeg GSM round trip failed: {exc.stderr.decode(errors='replace')[-500:]}") from exc
    return _fit(np.frombuffer(decoded, dtype="<f4").astype(np.float64), narrow.size)


# --- noise ----------------------------------------------------------------------------------


def coloured_noise(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-power white, pink (power ~ 1/f) or brown (~ 1/f^2) noise, shaped in the FFT domain."""
    noise = rng.standard_normal(n)
    if kind != "white":
        exponent = {"pink": 0.5, "brown": 1.0}[kind]  # of the amplitude spectrum
        freqs = np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE)
        shape = np.zeros_like(freqs)
        audible = freqs >= NOISE_FLOOR_HZ
        shape[audible] = freqs[audible] ** -exponent
        shaped = np.fft.irfft(np.fft.rfft(noise) * shape, n)
        noise = shaped if np.any(shaped) else noise  # a clip too short to have a bin above 20 Hz
    # Scaled to exactly unit power, so the SNR asked for is the SNR delivered, not one near it.
    return noise / math.sqrt(float(np.mean(noise**2)))


def babble_noise(n: int, pool: Sequence[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Unit-power babble: 3-6 talkers from ``pool``, each from a random point, looped, equally loud."""
    talkers = int(rng.integers(BABBLE_TALKERS[0], BABBLE_TALKERS[1] + 1))
    order = rng.permutation(len(pool))  # different recordings while the pool has enough
    out = np.zeros(n)
    found = 0
    # A silent or empty recording in the pool (a failed decode) is skipped, a bounded number of times.
    for attempt in range(4 * talkers):
        if found == talkers:
            break
        source = _speech_part(np.asarray(pool[int(order[attempt % order.size])], dtype=np.float64))
        if source.size == 0:
            continue
        fade = min(BABBLE_FADE, source.size // 2)  # no click where a looped talker wraps round
        ramp = np.sin(np.linspace(0.0, np.pi / 2, fade)) ** 2
        source = source.copy()
        source[:fade] *= ramp
        source[source.size - fade :] *= ramp[::-1]
        start = int(rng.integers(source.size))
        excerpt = np.resize(np.roll(source, -start), n)  # loops a short talker over a long recording
        power = float(np.mean(excerpt**2))
        if power > 0:
            out += excerpt / math.sqrt(power)
            found += 1
    power = float(np.mean(out**2))
    if power <= 0:
        raise ValueError("the babble pool holds no speech")
    return out / math.sqrt(power)


def add_noise(x: np.ndarray, snr_db: float, rng: np.random.Generator, kind: str | None = None,
              babble: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """``x`` plus noise ``snr_db`` below its active speech power; ``kind`` None draws the type.

    Silence has no speech level to be measured against, so a silent ``x`` comes back unchanged.
    """
    has_pool = babble is not None and len(babble) > 0
    if kind is None:
        choices = NOISE_TYPES if has_pool else NOISE_TYPES[:-1]
        kind = choices[int(rng.integers(len(choices)))]
    if kind == "babble":
        if babble is None or not has_pool:
            raise ValueError("noise:babble needs a babble pool of other talkers' recordings")
        noise = babble_noise(x.size, babble, rng)
    else:
        noise = coloured_noise(kind, x.size, rng)
    level = math.sqrt(active_power(x) / 10 ** (snr_db / 10))
    return x.astype(np.float64) + noise * level


# --- reverb ---------------------------------------------------------------------------------


def room_impulse_response(rt60: float, rng: np.random.Generator) -> np.ndarray:
    """A synthetic room: direct path, 3-6 early reflections, then exponentially decaying noise.

    The diffuse tail falls 60 dB over ``rt60`` seconds (Schroeder's definition) and starts with the
    first reflection; its energy sits 0-6 dB below the direct path's, a talker a metre or two away.
    """
    n = max(int(rt60 * SAMPLE_RATE), 2)
    t = np.arange(n) / SAMPLE_RATE
    envelope = np.exp(-3.0 * math.log(10.0) * t / rt60)  # amplitude: -60 dB at t = rt60
    rir = np.zeros(n)
    delays = np.sort(rng.integers(int(0.002 * SAMPLE_RATE), int(0.030 * SAMPLE_RATE), size=int(rng.integers(3, 7))))
    delays = delays[delays < n]
    signs = rng.choice(np.array([-1.0, 1.0]), size=delays.size)
    rir[delays] += signs * rng.uniform(0.2, 0.7, size=delays.size) * envelope[delays]
    tail = rng.standard_normal(n) * envelope
    tail[: int(delays[0]) if delays.size else 1] = 0.0
    tail_power = float(np.sum(tail**2))
    if tail_power > 0:
        tail *= math.sqrt(10 ** (-rng.uniform(0.0, 6.0) / 10) / tail_power)
    rir += tail
    rir[0] = 1.0
    return rir


def reverb(x: np.ndarray, rt60: float, rng: np.random.Generator) -> np.ndarray:
    """``x`` in a synthetic room: same length, rescaled to the input's peak level."""
    wet = signal.fftconvolve(x.astype(np.float64), room_impulse_response(rt60, rng))[: x.size]
    peak_in, peak_out = float(np.max(np.abs(x))), float(np.max(np.abs(wet)))
    return wet * (peak_in / peak_out) if peak_out > 0 else wet


# --- speed ----------------------------------------------------------------------------------


def speed(x: np.ndarray, factor: float) -> np.ndarray:
    """``x`` played ``factor`` times faster (Ko et al., 2015): resampled from rate*factor to rate."""
    return np.asarray(soxr.resample(x, SAMPLE_RATE * factor, SAMPLE_RATE, quality="HQ"), dtype=np.float32)
