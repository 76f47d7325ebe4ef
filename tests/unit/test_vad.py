"""The trained voice-activity detector: no speech in noise, tones, music and signals; speech in speech.

The full measurement (all 1,438 speech files, 10 seeds of each kind at four levels) is
``python -m bench.vad``; these are samples of it, cheap enough for the fast lane.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from ser_ml import vad
from ser_ml.segments import (
    FRAME_S,
    MAX_SEGMENT_S,
    MIN_GAP_S,
    MIN_SEGMENT_S,
    MIN_SPEECH_S,
    PAD_S,
    WHOLE_UP_TO_S,
    Segment,
    frame_energy_db,
    segments_from_energy,
    segments_from_flags,
)
from ser_ml.vad import HAS_SPEECH_S
from ser_shared.errors import AudioError, NoSpeech
from ser_shared.settings import REPO_ROOT
from tests.conftest import DATASETS, RAVDESS
from tests.nonspeech import KINDS, make, with_noise

INDIAN = DATASETS / "indian_emospeech"

# Speech that Silero VAD v6 does not find, listed by bench/vad.py: in this sample, short command
# words (shouted, or one whose loudest frame is at -42 dBFS), named by the start of their names.
# Strict xfails: the blind spot stays documented, and a better detector or rule turns them into
# passes that ask for this list to be updated.
KNOWN_MISSES = {
    ("clean", "House__go-safe-angry-20190713145212"),
    ("snr10", "House__go-safe-angry-20190713145212"),
    ("clean", "Roads__stop-safe-happy-20190729212019"),
    ("snr10", "Roads__stop-safe-happy-20190729212019"),
    ("clean", "webservice__stop-safe-fearful-1566229173537"),
}
# Shouted and screamed RAVDESS clips (strong intensity; actor 06's fearful voice sits near 900 Hz),
# outside the sample below, refused clean and at 10 dB.
SHOUTED = ["Actor_06/03-01-06-02-02-02-06.flac", "Actor_06/03-01-05-02-01-01-06.flac",
           "Actor_18/03-01-05-02-02-01-18.flac"]


def _ravdess_sample() -> list[str]:
    """40 files: two per actor, spread over the eight emotions, both intensities and statements."""
    names = []
    for actor in range(1, 21):
        for k, shift in enumerate((0, 4)):
            emotion = 1 + (actor - 1 + shift) % 8
            intensity = 1 if emotion == 1 else 1 + (actor + k) % 2  # neutral has no strong intensity
            fields = f"{emotion:02d}-{intensity:02d}-{k + 1:02d}-{k + 1:02d}-{actor:02d}"
            names.append(f"Actor_{actor:02d}/03-01-{fields}.flac")
    return names


def _indian_sample() -> list[str]:
    """20 of the command-word recordings, evenly over the sorted names (every place and keyword)."""
    words = sorted(p.name for p in INDIAN.glob("*.flac") if "__background-" not in p.name)
    return [words[i] for i in np.linspace(0, len(words) - 1, 20).round().astype(int)] if words else []


def _cases(names: list[str]) -> list[object]:
    cases: list[object] = []
    for name in names:
        for condition in ("clean", "snr10"):
            base = name.split("/")[-1]
            known = any(c == condition and base.startswith(prefix) for c, prefix in KNOWN_MISSES)
            marks = [pytest.mark.xfail(strict=True, reason="Silero VAD v6 misses this word")] if known else []
            cases.append(pytest.param(name, condition, marks=marks, id=f"{base[:44]}-{condition}"))
    return cases


@pytest.mark.xfail(strict=True, reason="Silero VAD v6 misses shouted and screamed speech (bench/vad.py)")
@pytest.mark.parametrize("name", SHOUTED)
def test_known_blind_spot_shouted_speech(name: str) -> None:
    assert vad.has_speech(_read(RAVDESS / name))


def _assert_speech(audio: np.ndarray) -> None:
    probs = vad.speech_probabilities(audio)
    assert vad.has_speech(audio, probabilities=probs), vad.speech_regions(audio, probabilities=probs)
    assert vad.speech_segments(audio, probabilities=probs), "has_speech, so there is a segment to analyse"


def _read(path: Path) -> np.ndarray:
    audio, rate = sf.read(path, dtype="float32")
    assert rate == vad.SAMPLE_RATE and audio.ndim == 1
    return audio


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_non_speech_has_no_speech(kind: str) -> None:
    for seed in (0, 1):
        for peak in (0.1, 0.3, 0.8):
            audio = make(kind, seed, peak)
            assert 3.0 <= audio.size / vad.SAMPLE_RATE <= 5.0 and np.max(np.abs(audio)) == pytest.approx(peak)
            assert not vad.has_speech(audio), (kind, seed, peak, vad.speech_regions(audio))


def test_non_speech_is_reproducible() -> None:
    np.testing.assert_array_equal(make("melody", 3), make("melody", 3))
    assert not np.array_equal(make("melody", 3), make("melody", 4))


@pytest.mark.parametrize(("name", "condition"), _cases(_ravdess_sample()))
def test_ravdess_speech_has_speech(name: str, condition: str) -> None:
    clean = _read(RAVDESS / name)
    audio = clean if condition == "clean" else with_noise(clean, 10.0)
    _assert_speech(audio)


@pytest.mark.parametrize(("name", "condition"), _cases(_indian_sample()))
def test_indian_command_words_have_speech(name: str, condition: str) -> None:
    clean = _read(INDIAN / name)
    audio = clean if condition == "clean" else with_noise(clean, 10.0)
    _assert_speech(audio)


def test_probabilities_one_per_window_between_0_and_1() -> None:
    audio = _read(RAVDESS / _ravdess_sample()[0])
    probs = vad.speech_probabilities(audio)
    assert probs.dtype == np.float32 and probs.shape == (-(-audio.size // vad.WINDOW),)
    assert probs.min() >= 0.0 and probs.max() <= 1.0 and probs.max() > 0.9
    assert vad.speech_probabilities(np.zeros(0, dtype=np.float32)).shape == (0,)
    assert vad.speech_probabilities(np.zeros(100, dtype=np.float32)).shape == (1,)


def test_streamed_probabilities_equal_whole() -> None:
    audio = np.concatenate([_read(RAVDESS / name) for name in _ravdess_sample()[:3]])
    meter = vad.SpeechMeter()
    for start in range(0, audio.size, 7_777):  # blocks that do not line up with the windows
        meter.feed(audio[start : start + 7_777])
    np.testing.assert_array_equal(meter.finish(), vad.speech_probabilities(audio))


def test_regions_have_hysteresis_and_minimum_lengths() -> None:
    w = vad.WINDOW_S
    probs = np.array([0.0] * 5 + [0.9] * 10 + [0.4] * 5 + [0.1] * 10 + [0.9] * 2 + [0.0] * 10
                     + [0.8] * 8 + [0.2] * 2 + [0.8] * 8, dtype=np.float32)
    regions = vad.regions_from_probabilities(probs)
    # 0.4 holds the first region (above NEG_THRESHOLD); two windows (64 ms) are too short to keep;
    # a 64 ms dip does not split the last one.
    assert regions == [(round(5 * w, 3), round(20 * w, 3)), (round(42 * w, 3), round(60 * w, 3))]
    assert vad.speech_seconds(np.zeros(0), probabilities=probs) == pytest.approx(33 * w, abs=1e-3)
    assert vad.has_speech(np.zeros(0), probabilities=probs)
    assert not vad.has_speech(np.zeros(0), probabilities=np.r_[np.zeros(5), np.full(6, 0.9)].astype(np.float32))


def test_three_clips_with_gaps_give_three_segments_at_their_speech() -> None:
    rate, gap = vad.SAMPLE_RATE, np.zeros(2 * vad.SAMPLE_RATE, dtype=np.float32)
    parts, truth, t = [], [], 0.0
    for name in ("Actor_03/03-01-05-02-01-01-03.flac", "Actor_08/03-01-04-02-01-01-08.flac",
                 "Actor_15/03-01-08-02-01-01-15.flac"):
        clip = _read(RAVDESS / name)
        # The clip's speech: its 10 ms frames within 30 dB of its loudest. (35 dB would start the
        # second clip at a breath 0.4 s before its first word, 31 dB under its peak.)
        level = frame_energy_db(clip)
        loud = np.flatnonzero(level >= level.max() - 30.0)
        truth.append((t + loud[0] * FRAME_S, t + (loud[-1] + 1) * FRAME_S))
        parts += [clip, gap]
        t += (clip.size + gap.size) / rate
    segments = vad.speech_segments(np.concatenate(parts))
    assert len(segments) == 3, segments
    for seg, (start, end) in zip(segments, truth, strict=True):
        assert abs(seg.start - start) <= 0.3 and abs(seg.end - end) <= 0.3, (seg, start, end)
        assert 0 < seg.speech_s <= seg.end - seg.start


def test_no_speech_gives_no_segments_while_the_energy_detector_keeps_the_whole() -> None:
    tone = make("dial_tone", 0, 0.5)
    assert vad.speech_segments(tone) == []
    energy = np.full(400, -100.0, dtype=np.float32)  # nothing stands out: analysed whole, as before
    assert segments_from_energy(energy, 4.0) == [Segment(0.0, 4.0, 0.0)]


def test_model_loads_lazily_without_importing_faster_whisper() -> None:
    code = ("import sys, numpy as np; import ser_ml.vad as v; assert 'onnxruntime' not in sys.modules; "
            "v.speech_probabilities(np.zeros(16000, dtype=np.float32)); "
            "assert 'onnxruntime' in sys.modules and 'faster_whisper' not in sys.modules; "
            "assert v.model_path().name == 'silero_vad_v6.onnx'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_no_speech_is_an_audio_error_with_its_own_code() -> None:
    from web.pages import ERROR_WORDS

    error = NoSpeech("no speech in the recording")
    assert isinstance(error, AudioError) and error.code == "no_speech" and error.http_status == 422
    assert "no_speech" in ERROR_WORDS


def _readme_segment_rules() -> str:
    readme = (REPO_ROOT / "README.md").read_text()
    start = readme.index("- **Segment boundaries**")
    return " ".join(readme[start:readme.index("\n- **", start + 1)].split())


def test_a_word_between_pauses_is_a_short_segment_as_the_readme_says() -> None:
    """Segments are not kept to 2-8 s: a word alone between pauses is its own, short, segment; the
    README states the rules the code applies (its numbers are the constants)."""
    (word_file,) = INDIAN.glob("House__yes-safe-happy-20190713144246-*.flac")  # "yes", 0.75 s of it speech
    word = _read(word_file)
    sentence = _read(RAVDESS / "Actor_03/03-01-05-02-01-01-03.flac")
    pause = np.zeros(vad.SAMPLE_RATE, dtype=np.float32)
    recording = np.concatenate([sentence, pause, word, pause, sentence])
    assert recording.size / vad.SAMPLE_RATE > WHOLE_UP_TO_S  # so it is cut, not analysed whole
    at = (sentence.size + pause.size) / vad.SAMPLE_RATE
    (short,) = [s for s in vad.speech_segments(recording) if at <= s.start and s.end <= at + 3.0]
    assert HAS_SPEECH_S <= short.end - short.start < MIN_SEGMENT_S, short
    rules = _readme_segment_rules()
    assert "between 2 and 8 s" not in rules and "no other minimum" in rules
    for value in (MIN_GAP_S, HAS_SPEECH_S, MAX_SEGMENT_S, MIN_SEGMENT_S, MIN_SPEECH_S, vad.SEGMENT_PAD_S, PAD_S):
        assert f"{value:g} s" in rules, value
    assert f"{MAX_SEGMENT_S + 2 * vad.SEGMENT_PAD_S:g} s" in rules and f"{MAX_SEGMENT_S + 2 * PAD_S:g} s" in rules


def test_the_last_piece_of_a_split_run_can_be_under_two_seconds() -> None:
    """A run over 8 s is cut at its quietest frame 2-8 s in: only the pieces cut off are 2 s or more."""
    frames = int(8.6 / FRAME_S)
    energy = np.full(frames, -20.0, dtype=np.float32)
    energy[int(7.9 / FRAME_S)] = -60.0  # the quietest moment, 7.9 s in
    (first, last) = segments_from_flags(np.ones(frames, dtype=bool), energy, frames * FRAME_S, pad_s=0.0)
    assert first.end - first.start == pytest.approx(7.9, abs=0.02)
    assert last.end - last.start == pytest.approx(0.7, abs=0.02) and last.end - last.start < MIN_SEGMENT_S
