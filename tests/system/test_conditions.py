"""Acoustic conditions do what their names say, measured on real speech, and repeat exactly by seed."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from ser_ml import conditions
from ser_ml.features import SAMPLE_RATE
from ser_shared.audio import decode
from ser_shared.settings import REPO_ROOT
from tests.conftest import ravdess_file

RANDOM = ("noise:10", "noise:white:10", "noise:pink:10", "noise:brown:10", "noise:babble:10", "reverb",
          "reverb:0.6", "phone-noisy:10")
FIXED = ("clean", "telephone", "telephone:alaw", "gain:-20", "speed:0.9")


def _has_libgsm() -> bool:
    if shutil.which("ffmpeg") is None:
        return False
    encoders = subprocess.run(["ffmpeg", "-hide_banner", "-encoders"], capture_output=True, text=True).stdout
    return " libgsm " in encoders


needs_gsm = pytest.mark.skipif(not _has_libgsm(), reason="ffmpeg with libgsm not installed")


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    return decode(ravdess_file(4, "03", "02"), "flac", SAMPLE_RATE, 600.0)


@pytest.fixture(scope="module")
def pool() -> list[np.ndarray]:
    """Other actors' recordings, as a caller would hand them in for babble."""
    return [decode(ravdess_file(actor, "01", "01", statement), "flac", SAMPLE_RATE, 600.0)
            for actor in (1, 3, 6, 8) for statement in ("01", "02")]


def _speech_power(x: np.ndarray) -> float:
    """Mean power of the 25 ms frames within 40 dB of the loudest: the talker, not the pauses around."""
    n = x.size // 400
    p = np.mean(x[: n * 400].astype(np.float64).reshape(n, 400) ** 2, axis=1)
    return float(p[p >= p.max() * 1e-4].mean())


def _snr_db(clean: np.ndarray, noisy: np.ndarray) -> float:
    return 10 * np.log10(_speech_power(clean) / np.mean((noisy.astype(np.float64) - clean) ** 2))


def _band_db(x: np.ndarray, low: float, high: float) -> float:
    """Share of the signal's energy between ``low`` and ``high`` Hz, in dB."""
    power = np.abs(np.fft.rfft(x.astype(np.float64))) ** 2
    freqs = np.fft.rfftfreq(x.size, 1 / SAMPLE_RATE)
    return float(10 * np.log10(power[(freqs >= low) & (freqs < high)].sum() / power.sum()))


def _tone(*freqs: float, seconds: float = 2.0) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return sum(0.1 * np.sin(2 * np.pi * f * t) for f in freqs).astype(np.float32)


def _tone_level_db(x: np.ndarray, freq: float) -> float:
    """Level of the component at ``freq`` (Hann window, peak within 20 Hz)."""
    spectrum = np.abs(np.fft.rfft(x[4000:-4000] * np.hanning(x.size - 8000)))
    freqs = np.fft.rfftfreq(x.size - 8000, 1 / SAMPLE_RATE)
    return float(20 * np.log10(spectrum[np.abs(freqs - freq) < 20].max() + 1e-12))


# --- telephone ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["telephone", "telephone:alaw", pytest.param("telephone:gsm", marks=needs_gsm)])
def test_telephone_keeps_the_phone_band_only(clip: np.ndarray, name: str) -> None:
    tones = _tone(150.0, 1000.0, 4500.0)
    out = conditions.apply(name, tones, np.random.default_rng(0))
    assert out.size == tones.size and out.dtype == np.float32
    for freq in (150.0, 4500.0):
        assert _tone_level_db(out, freq) < _tone_level_db(tones, freq) - 40
    # Lossy, not lost: the 1 kHz tone comes through within a couple of dB.
    assert _tone_level_db(out, 1000.0) == pytest.approx(_tone_level_db(tones, 1000.0), abs=2.0)

    speech = conditions.apply(name, clip, np.random.default_rng(0))
    assert speech.size == clip.size and np.isfinite(speech).all()
    # RAVDESS speech has about 1/100 of its energy below 250 Hz and 1/50 above 3.6 kHz; a phone
    # line leaves well under 1/3000 of either.
    assert _band_db(clip, 0, 250) > -25 and _band_db(clip, 3600, 8000) > -20
    assert _band_db(speech, 0, 250) < -35
    assert _band_db(speech, 3600, 8000) < -35
    # and keeps the talker in time: the line adds no delay a listener (or a segmenter) would notice.
    lag = np.argmax(np.correlate(speech[16000:32000], conditions.telephone(clip)[16000:32000], "full")) - 15999
    assert abs(lag) <= 8


@pytest.mark.parametrize("law,subtype", [("ulaw", "ULAW"), ("alaw", "ALAW")])
def test_g711_round_trip_error_is_bounded_and_agrees_with_libsndfile(law: str, subtype: str) -> None:
    pcm = np.arange(-32768, 32768, dtype=np.int16)
    x = pcm / 32768.0
    codes = conditions.g711_encode(x, law)
    back = conditions.g711_decode(codes, law)
    # Logarithmic steps: the error is at most half a step, 1/32 of the magnitude, plus the smallest step.
    inside = np.abs(x) < 0.99
    assert np.all(np.abs(back - x)[inside] <= np.abs(x[inside]) / 32 + 3e-4)
    # The decoder is libsndfile's, code for code; the encoder picks the same code except, for a few
    # negative values on a decision boundary, its neighbour (libsndfile truncates, G.711's reference rounds down).
    all_codes = np.arange(256, dtype=np.uint8)
    theirs, _ = sf.read(io.BytesIO(all_codes.tobytes()), format="RAW", subtype=subtype, samplerate=8000,
                        channels=1, dtype="float32")
    np.testing.assert_array_equal(conditions.g711_decode(all_codes, law), theirs)
    buf = io.BytesIO()
    sf.write(buf, pcm, 8000, format="RAW", subtype=subtype)
    their_codes = np.frombuffer(buf.getvalue(), dtype=np.uint8)
    differ = codes != their_codes
    assert differ.mean() < 0.01
    step = np.abs(back[differ] - conditions.g711_decode(their_codes[differ], law))
    assert np.all(step <= np.abs(x[differ]) / 16 + 1e-3)


def test_g711_on_speech_keeps_its_signal_to_quantisation_ratio(clip: np.ndarray) -> None:
    for law in ("ulaw", "alaw"):
        back = conditions.g711_decode(conditions.g711_encode(clip, law), law)
        assert _snr_db(clip, back) > 30  # G.711's ~38 dB on a speech-level signal


# --- noise --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["noise:10", "noise:white:10", "noise:pink:10", "noise:brown:10",
                                  "noise:babble:10"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noise_has_the_named_snr_against_the_speech(clip: np.ndarray, pool: list[np.ndarray], name: str,
                                                   seed: int) -> None:
    out = conditions.apply(name, clip, np.random.default_rng(seed), pool)
    assert out.size == clip.size and out.dtype == np.float32
    assert _snr_db(clip, out) == pytest.approx(10.0, abs=1.0)
    # The noise runs through the pauses too (the leading half second of RAVDESS is silence).
    head = slice(0, SAMPLE_RATE // 4)
    assert np.mean((out[head] - clip[head]).astype(np.float64) ** 2) > 0.1 * _speech_power(clip) / 10


@pytest.mark.parametrize("kind,slope_db", [("white", -12.0), ("pink", 0.0), ("brown", 12.0)])
def test_noise_colours_have_their_spectral_slopes(kind: str, slope_db: float) -> None:
    """Octave 250-500 Hz against octave 4-8 kHz: white is flat per hertz, pink per octave, brown falls 6 dB/octave."""
    noise = conditions.coloured_noise(kind, 10 * SAMPLE_RATE, np.random.default_rng(0))
    assert np.mean(noise**2) == pytest.approx(1.0)
    assert _band_db(noise, 250, 500) - _band_db(noise, 4000, 8000) == pytest.approx(slope_db, abs=1.5)


def test_babble_is_other_talkers(clip: np.ndarray, pool: list[np.ndarray]) -> None:
    babble = conditions.babble_noise(clip.size, pool, np.random.default_rng(0))
    assert np.mean(babble**2) == pytest.approx(1.0)
    # Speech-shaped: most of its energy in the voice band, unlike white noise.
    assert _band_db(babble, 100, 4000) > -1.5
    with pytest.raises(ValueError, match="babble pool"):
        conditions.apply("noise:babble:10", clip, np.random.default_rng(0))
    with pytest.raises(ValueError, match="no speech"):
        conditions.babble_noise(clip.size, [np.zeros(100, np.float32), np.zeros(0, np.float32)],
                                np.random.default_rng(0))


def test_random_noise_type_uses_babble_only_with_a_pool(clip: np.ndarray, pool: list[np.ndarray]) -> None:
    short = clip[: SAMPLE_RATE // 2]
    kinds_without = {_kind_drawn(short, s, None) for s in range(40)}
    kinds_with = {_kind_drawn(short, s, pool) for s in range(40)}
    assert kinds_without == {"white", "pink", "brown"}
    assert kinds_with == {"white", "pink", "brown", "babble"}


def _kind_drawn(x: np.ndarray, seed: int, pool: list[np.ndarray] | None) -> str:
    """Which explicit type ``noise:10`` chose: the one that gives the same output from the same seed."""
    out = conditions.apply("noise:10", x, np.random.default_rng(seed), pool)
    for kind in conditions.NOISE_TYPES:
        rng = np.random.default_rng(seed)
        rng.integers(4 if pool else 3)  # the draw of the type itself
        if kind == "babble" and not pool:
            continue
        noise = (conditions.babble_noise(x.size, pool, rng) if kind == "babble" and pool
                 else conditions.coloured_noise(kind, x.size, rng))
        if np.allclose(out - x, noise * np.sqrt(conditions.active_power(x) / 10), atol=1e-6):
            return kind
    raise AssertionError("no noise type reproduces the output")


def test_phone_noisy_is_a_phone_line_then_noise(clip: np.ndarray) -> None:
    line = conditions.apply("telephone", clip, np.random.default_rng(0))
    out = conditions.apply("phone-noisy:10", clip, np.random.default_rng(0))
    assert _snr_db(line, out) == pytest.approx(10.0, abs=1.0)


# --- reverb -------------------------------------------------------------------------------


def test_room_impulse_response_decays_at_its_rt60() -> None:
    for rt60 in (0.3, 0.6):
        rir = conditions.room_impulse_response(rt60, np.random.default_rng(0))
        # Schroeder backward integration of the diffuse tail (past the direct path and the early
        # reflections, which would put the -5 dB point at time zero); T20 extrapolated to 60 dB.
        tail = rir[int(0.04 * SAMPLE_RATE) :]
        decay = 10 * np.log10(np.cumsum(tail[::-1] ** 2)[::-1] / np.sum(tail**2))
        t5, t25 = np.argmax(decay < -5), np.argmax(decay < -25)
        assert 3 * (t25 - t5) / SAMPLE_RATE == pytest.approx(rt60, rel=0.15)
        assert rir[0] == 1.0 and np.argmax(np.abs(rir)) == 0  # the direct path comes first and loudest


def _after_db(x: np.ndarray, end: int, reference: float) -> float:
    """Energy of the 300 ms after sample ``end``, in dB against ``reference`` power."""
    window = x[end : end + int(0.3 * SAMPLE_RATE)].astype(np.float64)
    return float(10 * np.log10(np.mean(window**2) / reference + 1e-30))


def test_reverb_lengthens_the_decay_and_keeps_length_and_peak(clip: np.ndarray) -> None:
    # A tone that stops dead: whatever follows it is the room.
    burst = np.concatenate([_tone(440.0, seconds=1.0), np.zeros(SAMPLE_RATE, np.float32)])
    tails = {}
    for name in ("reverb:0.2", "reverb:0.8", "reverb"):
        out = conditions.apply(name, burst, np.random.default_rng(3))
        assert out.size == burst.size and out.dtype == np.float32
        assert np.max(np.abs(out)) == pytest.approx(np.max(np.abs(burst)), rel=1e-5)
        tails[name] = _after_db(out, SAMPLE_RATE + SAMPLE_RATE // 10, _speech_power(burst))
    assert _after_db(burst, SAMPLE_RATE, 1.0) == -300  # nothing at all
    # From 100 ms after the tone: a 0.2 s room has fallen 30 dB, a 0.8 s one under 8 dB.
    assert tails["reverb:0.2"] > -60
    assert tails["reverb:0.8"] > tails["reverb:0.2"] + 15
    assert tails["reverb:0.2"] - 1 < tails["reverb"] < tails["reverb:0.8"] + 1  # RT60 drawn in 0.2-0.8 s

    # Real speech: the room fills the pause after the last word.
    frames = np.mean(clip[: clip.size // 320 * 320].astype(np.float64).reshape(-1, 320) ** 2, axis=1)
    last_word = (np.flatnonzero(frames > frames.max() * 1e-3)[-1] + 1) * 320
    wet = conditions.apply("reverb:0.8", clip, np.random.default_rng(3))
    assert wet.size == clip.size
    power = _speech_power(clip)
    assert _after_db(wet, last_word, power) > _after_db(clip, last_word, power) + 6


# --- gain, speed --------------------------------------------------------------------------


def test_gain_scales_and_clips(clip: np.ndarray) -> None:
    quiet = conditions.apply("gain:-20", clip, np.random.default_rng(0))
    np.testing.assert_allclose(quiet, clip * 0.1, rtol=1e-5, atol=1e-9)
    loud = conditions.apply("gain:30", clip, np.random.default_rng(0))
    assert np.max(np.abs(loud)) == 1.0
    small = np.abs(clip) < 0.02
    np.testing.assert_allclose(loud[small], clip[small] * 10 ** 1.5, rtol=1e-5)


@pytest.mark.parametrize("factor", [0.9, 1.1, 1.5])
def test_speed_changes_length_by_the_factor(clip: np.ndarray, factor: float) -> None:
    out = conditions.apply(f"speed:{factor}", clip, np.random.default_rng(0))
    assert out.dtype == np.float32
    assert out.size == pytest.approx(clip.size / factor, rel=1e-3)


# --- every condition ----------------------------------------------------------------------


@pytest.mark.parametrize("name", RANDOM + FIXED)
def test_same_seed_same_output_different_seed_different(clip: np.ndarray, pool: list[np.ndarray], name: str) -> None:
    a = conditions.apply(name, clip, np.random.default_rng(11), pool)
    b = conditions.apply(name, clip, np.random.default_rng(11), pool)
    c = conditions.apply(name, clip, np.random.default_rng(12), pool)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float32 and np.isfinite(a).all() and np.max(np.abs(a)) <= 1.0
    if name in RANDOM:
        assert not np.array_equal(a, c)
    else:
        np.testing.assert_array_equal(a, c)
    if name == "clean":
        np.testing.assert_array_equal(a, clip)


@pytest.mark.parametrize("name", RANDOM + FIXED)
def test_silence_and_empty_audio_stay_finite(pool: list[np.ndarray], name: str) -> None:
    for audio in (np.zeros(SAMPLE_RATE, dtype=np.float32), np.zeros(0, dtype=np.float32),
                  np.full(100, 0.01, dtype=np.float32)):
        out = conditions.apply(name, audio, np.random.default_rng(0), pool)
        assert out.dtype == np.float32 and np.isfinite(out).all()
        if not name.startswith("speed"):
            assert out.size == audio.size
    # Silence has no speech level to put noise under: it stays silent.
    assert not conditions.apply("noise:10", np.zeros(800, np.float32), np.random.default_rng(0)).any()


@pytest.mark.parametrize("name", ["", "loud", "clean:1", "noise", "noise:ten", "noise:purple:10", "noise:white:10:1",
                                  "noise:nan", "reverb:0", "reverb:-1", "speed:0", "speed:inf", "gain:1e9",
                                  "telephone:amr", "telephone:gsm:1", "phone-noisy"])
def test_invalid_names_are_refused_with_the_valid_ones_listed(clip: np.ndarray, name: str) -> None:
    with pytest.raises(ValueError, match="valid conditions: clean, telephone") as err:
        conditions.apply(name, clip, np.random.default_rng(0))
    assert "noise:SNR" in str(err.value) and "phone-noisy:SNR" in str(err.value)
    with pytest.raises(ValueError):
        conditions.parse(name)


def test_names_parse_to_their_parameters() -> None:
    assert conditions.parse("noise:pink:-5") == conditions.Condition("noise", "pink", -5.0)
    assert conditions.parse("telephone") == conditions.Condition("telephone", "ulaw")
    assert conditions.parse("reverb") == conditions.Condition("reverb", None, None)
    assert conditions.parse("speed:1.1") == conditions.Condition("speed", None, 1.1)


# --- ser evaluate --condition ---------------------------------------------------------------


def test_evaluation_seeds_by_name_and_takes_babble_from_other_speakers(tmp_path: Path) -> None:
    from ser_ml.train.evaluation import _babble_pools, condition_seed, labelled_files
    from ser_shared.settings import Settings

    # A stable hash of the name (sha256), not Python's salted hash(): the same on every run and machine.
    assert condition_seed(Path("a/03-01-05-02-01-01-02.flac")) == condition_seed(Path("03-01-05-02-01-01-02.flac"))
    assert condition_seed(Path("03-01-05-02-01-01-02.flac")) == 273543882541868466
    for actor, code in ((2, "03"), (2, "04"), (9, "05")):
        src = ravdess_file(actor, code, "02")
        shutil.copy(src, tmp_path / src.name)
    items = labelled_files(tmp_path)
    pools = _babble_pools(items, Settings(env="test"))
    for item in items:
        pool = pools(item)
        expected = 1 if item.speaker == "02" else 2  # actor 9's pool: actor 2's two files
        assert len(pool) == expected and all(p.size > 0 for p in pool)
        assert all(p.speaker != item.speaker for p in items if p.path in pool._paths)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four RAVDESS recordings of two actors (so babble has another talker)."""
    root = tmp_path_factory.mktemp("conditions_eval")
    for actor, code in ((2, "05"), (2, "01"), (9, "04"), (9, "03")):
        src = ravdess_file(actor, code, "02" if code != "01" else "01")
        shutil.copy(src, root / src.name)
    return root


def test_ser_evaluate_records_the_condition(tiny_dir: Path, tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    cmd = [sys.executable, "-m", "ser_cli", "evaluate", str(tiny_dir), "--condition", "telephone",
           "--json", str(tmp_path / "out.json")]
    env = {**os.environ, "TMPDIR": str(scratch), "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "condition telephone" in proc.stdout
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["condition"] == "telephone"
    assert report["n"] == 4 and report["n_failed"] == 0
    # The degraded copies are gone. (onnxruntime, which runs the VAD, leaves its own telemetry
    # session id, ".ses", in the temporary folder: not ours.)
    assert not [p for p in scratch.iterdir() if not p.name.startswith(".")]
    assert not any(p.suffix == ".wav" for p in tiny_dir.iterdir())  # and none was written beside the originals


def test_ser_evaluate_refuses_an_unknown_condition_before_loading_models(tiny_dir: Path) -> None:
    cmd = [sys.executable, "-m", "ser_cli", "evaluate", str(tiny_dir), "--condition", "underwater"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert proc.returncode != 0
    assert "valid conditions: clean, telephone" in proc.stderr
    assert "models loaded" not in proc.stderr
