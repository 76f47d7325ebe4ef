"""Speech or not, from the models' own input vector: the second check behind Silero VAD.

Silero VAD (``ser_ml.vad``) alone cannot draw the line: at ``has_speech``'s 0.2 s it refuses some
shouted speech (1 % of RAVDESS, 12 % of the Indian command words), and any lower setting lets tones,
melodies and noise through; at 0.2 s the loudest test noises and melodies (peak 1.0) still reach
0.256 s. The fv4 vector (mean and standard deviation of Whisper tiny.en's second encoder block,
``ser_ml.speech_features``) is computed for every clip anyway, and the encoder was trained on
speech, so speech and non-speech sit apart in it: a scaler and a logistic regression over those 768
numbers (26 kB joblib-dumped; 0.25 ms per call, 7 µs per clip in a batch) tell them apart.

The decision (``is_no_speech``) joins the two, by how much speech Silero heard (its longest region):

- at least ``SURE_SPEECH_S``: speech; the classifier is not consulted;
- from ``vad.HAS_SPEECH_S`` (0.2 s) up to ``SURE_SPEECH_S``: speech unless the classifier is sure of
  non-speech (``speech_prob < SHORT_REGION_THRESHOLD``); this band is where the loudest test
  non-speech lands, and where half the Indian command words do;
- under ``vad.HAS_SPEECH_S``: no speech unless the classifier says speech
  (``speech_prob >= NO_REGION_THRESHOLD``); this rescues the shouted words Silero misses.

Setting ``SURE_SPEECH_S = vad.HAS_SPEECH_S`` gives the plain rule "no_speech only when Silero finds
no 0.2 s region and the classifier says non-speech"; it lets the two 0.256 s test clips through.

The vector is that of ``speech_clip(recording)`` (energy-trimmed, as the pipeline feeds a recording
of up to 10 s to the models); ``build_training_set`` makes the training material the same way:
RAVDESS speech, clean, degraded, over non-speech backgrounds and as single words in longer faint
recordings, against the generated non-speech of ``ser_ml.train.nonspeech_train`` (never
``tests/nonspeech.py``, which is the held-out test set). The constants and what they cost are
measured by ``python -m bench.speech_detector``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from ser_ml import conditions
from ser_ml.encoder import SAMPLE_RATE, WhisperEncoder
from ser_ml.speech_features import featurise, speech_clip
from ser_ml.train import nonspeech_train
from ser_ml.vad import HAS_SPEECH_S
from ser_shared.errors import SilentAudio

# Decision constants, chosen on training-side measurements of bench/speech_detector.py (speech:
# GroupKFold by RAVDESS actor; non-speech: leave one generator family out), never on the test sets.
# SURE_SPEECH_S: a margin over the longest region test non-speech was known to reach (0.256 s, from
# bench/vad.py, before this detector); 91 of the 4,400 generated training recordings fall in 0.2–0.5 s,
# 33 above. 22 of the 1,200 clean RAVDESS clips have a shorter longest region (13 under 0.2 s).
SURE_SPEECH_S = 0.5
# NO_REGION_THRESHOLD: the classes are weighted equally, so 0.5 is the even-odds point. Cross-validated
# speech that Silero misses scores at least 0.93 clean, 0.85 by telephone, 0.90 at 10 dB, 0.60 at 0 dB
# SNR. Left-out families that Silero misses get through in 210 of 4,276 recordings at 0.5 (148 of them
# noise bursts), 80 at 0.7; but 0.7 already refuses cross-validated speech at 0 dB.
NO_REGION_THRESHOLD = 0.5
# SHORT_REGION_THRESHOLD: with a 0.2–0.5 s region the evidence for speech is Silero's, and only a clear
# "not speech" overrides it. Cross-validated speech in this zone scores at least 0.64; left-out
# families in it get through in 25 of 91 at 0.1 (36 at 0.05, 16 at 0.2, which refuses an Indian word).
SHORT_REGION_THRESHOLD = 0.1

# Logistic regression's inverse regularisation. Stronger shrinkage lets fewer left-out families through
# the no-region zone at 0.5 (C 0.01 / 0.003 / 0.001 / 0.0003: 361 / 293 / 210 / 176) but pulls speech
# towards 0.5 too (lowest cross-validated speech at 0 dB SNR: 0.83 / 0.71 / 0.60 / 0.50); 0.001 is the
# strongest that keeps a margin.
C = 0.001

# Speech training copies: one degraded copy per clip, conditions drawn from these (GSM goes through
# an ffmpeg round trip per clip, so it is drawn less often).
DEGRADATIONS: tuple[tuple[str, float], ...] = (
    ("telephone", 1.0), ("telephone:alaw", 0.5), ("telephone:gsm", 0.5), ("noise:white:{snr}", 1.0),
    ("noise:pink:{snr}", 1.0), ("noise:brown:{snr}", 1.0), ("reverb", 1.0), ("phone-noisy:{snr}", 1.0),
    ("gain:{gain}", 0.7), ("speed:{speed}", 0.7),
)
SNR_DB = (0.0, 20.0)
BACKGROUND_SNR_DB = (0.0, 20.0)  # speech over a non-speech background, speech this much louder
CROP_S = (0.25, 1.2)  # single-word pieces: the Indian command words are one short shouted word
NONSPEECH_PER_FAMILY = 400


def fit_speech_detector(speech_vectors: np.ndarray, nonspeech_vectors: np.ndarray, seed: int) -> Pipeline:
    """StandardScaler → LogisticRegression, class 1 = speech; classes weighted equally."""
    x = np.concatenate([speech_vectors, nonspeech_vectors]).astype(np.float64)
    y = np.r_[np.ones(len(speech_vectors), dtype=np.int64), np.zeros(len(nonspeech_vectors), dtype=np.int64)]
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, class_weight="balanced", max_iter=2000,
                                                               random_state=seed))
    model.fit(x, y)
    return model


def speech_probability(pipeline: Pipeline, vectors: np.ndarray) -> np.ndarray:
    """Probability of speech for each row of ``vectors`` (one fv4 vector per recording)."""
    x = np.asarray(vectors, dtype=np.float64).reshape(-1, np.shape(vectors)[-1])
    speech_column = list(pipeline.classes_).index(1)
    return np.asarray(pipeline.predict_proba(x)[:, speech_column], dtype=np.float64)


def is_no_speech(silero_longest_region_s: float, speech_prob: float) -> bool:
    """The ``no_speech`` rule: Silero's longest speech region and the classifier's speech probability."""
    if silero_longest_region_s >= SURE_SPEECH_S:
        return False  # Silero is sure: the classifier is not consulted
    if silero_longest_region_s >= HAS_SPEECH_S:
        return speech_prob < SHORT_REGION_THRESHOLD
    return speech_prob < NO_REGION_THRESHOLD


def no_speech_mask(longest_region_s: np.ndarray, speech_prob: np.ndarray, *, sure_speech_s: float | None = None,
                   no_region_threshold: float | None = None,
                   short_region_threshold: float | None = None) -> np.ndarray:
    """``is_no_speech`` over arrays; the constants can be overridden (for measuring other settings)."""
    sure = SURE_SPEECH_S if sure_speech_s is None else sure_speech_s
    none_th = NO_REGION_THRESHOLD if no_region_threshold is None else no_region_threshold
    short_th = SHORT_REGION_THRESHOLD if short_region_threshold is None else short_region_threshold
    longest, prob = np.asarray(longest_region_s, dtype=np.float64), np.asarray(speech_prob, dtype=np.float64)
    return np.where(longest >= sure, False, np.where(longest >= HAS_SPEECH_S, prob < short_th, prob < none_th))


# ---- training material ------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingSet:
    vectors: np.ndarray  # (n, 768) float32 fv4 vectors
    is_speech: np.ndarray  # (n,) bool
    groups: list[str]  # "actor:06" for speech (for GroupKFold), "nonspeech" otherwise
    families: list[tuple[str, ...]]  # the generator families a non-speech row is made of; () for speech
    material: list[str]  # what the row is: "clean", a condition name, "crop", "background:notes", a family
    sources: list[str]  # the RAVDESS file name, or the non-speech seed: nonspeech_train.make(material, int(source))

    def speech(self) -> np.ndarray:
        return self.vectors[self.is_speech]

    def nonspeech(self) -> np.ndarray:
        return self.vectors[~self.is_speech]


def actor_of(path: Path) -> str:
    """RAVDESS names end in the actor's number: 03-01-05-02-01-01-06.flac is actor 06."""
    return path.stem.split("-")[-1]


def read(path: Path) -> np.ndarray:
    audio, rate = sf.read(path, dtype="float32", always_2d=True)
    if rate != SAMPLE_RATE:
        raise ValueError(f"{path}: {rate} Hz, expected {SAMPLE_RATE}")
    return np.asarray(audio.mean(axis=1), dtype=np.float32)


def degrade(audio: np.ndarray, rng: np.random.Generator) -> tuple[str, np.ndarray]:
    """One degraded copy of a speech recording: a condition drawn from DEGRADATIONS."""
    weights = np.array([w for _, w in DEGRADATIONS])
    template = DEGRADATIONS[int(rng.choice(len(DEGRADATIONS), p=weights / weights.sum()))][0]
    name = template.format(snr=f"{rng.uniform(*SNR_DB):.1f}", gain=f"{rng.uniform(6.0, 20.0):.1f}",
                           speed=f"{rng.uniform(0.85, 1.2):.2f}")
    return name, conditions.apply(name, audio, rng)


def over_background(audio: np.ndarray, rng: np.random.Generator, seed: int) -> tuple[str, np.ndarray]:
    """Speech over a generated non-speech background BACKGROUND_SNR_DB quieter: still speech."""
    family = nonspeech_train.NAMES[int(rng.integers(len(nonspeech_train.NAMES)))]
    background = nonspeech_train.make(family, seed, n=audio.size).astype(np.float64)
    speech_power = conditions.active_power(audio)
    noise_power = float(np.mean(background**2))
    if speech_power <= 0 or noise_power <= 0:
        return f"background:{family}", audio
    snr = rng.uniform(*BACKGROUND_SNR_DB)
    mixed = audio + background * np.sqrt(speech_power / noise_power / 10 ** (snr / 10))
    return f"background:{family}", np.clip(mixed, -1.0, 1.0).astype(np.float32)


def crop(audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A CROP_S piece centred on one of the recording's loud 10 ms frames (within 15 dB of its
    loudest, so a piece is of a word, not of the pause before it), faded in and out over 10 ms."""
    hop = SAMPLE_RATE // 100
    frames = audio[: audio.size // hop * hop].reshape(-1, hop).astype(np.float64)
    power = np.mean(frames**2, axis=1)
    loud = np.flatnonzero(power >= power.max() * 10 ** -1.5)
    centre = int(rng.choice(loud)) * hop + hop // 2
    half = int(rng.uniform(*CROP_S) * SAMPLE_RATE) // 2
    piece = audio[max(0, centre - half) : centre + half].astype(np.float64)
    fade = min(hop, piece.size // 2)
    ramp = np.linspace(0.0, 1.0, fade)
    piece[:fade] *= ramp
    piece[piece.size - fade :] *= ramp[::-1]
    return piece.astype(np.float32)


def word_in_recording(audio: np.ndarray, rng: np.random.Generator, seed: int) -> tuple[str, np.ndarray]:
    """A single-word ``crop`` placed somewhere in 1–4 s of faint background (coloured noise or a
    generated non-speech recording) 10–60 dB under the word: a recorder started, a word said.

    Such a clip is mostly background even after ``speech_clip`` (whose 40 dB trim keeps the quiet
    parts), so its pooled vector is mostly background too: the command-word recordings look like
    this, and without it the classifier learns "speech fills the clip"."""
    word = crop(audio, rng).astype(np.float64)
    n = max(word.size, int(rng.uniform(1.0, 4.0) * SAMPLE_RATE))
    if rng.random() < 0.5:
        kind = conditions.NOISE_TYPES[int(rng.integers(3))]  # white, pink, brown
        background = conditions.coloured_noise(kind, n, rng)
    else:
        kind = nonspeech_train.NAMES[int(rng.integers(len(nonspeech_train.NAMES)))]
        background = nonspeech_train.make(kind, seed, n=n).astype(np.float64)
    power = float(np.mean(background**2))
    level = np.sqrt(conditions.active_power(word) / power / 10 ** (rng.uniform(10.0, 60.0) / 10)) if power > 0 else 0
    out = background * level
    start = int(rng.integers(0, n - word.size + 1))
    out[start : start + word.size] += word
    return f"word:{kind}", np.clip(out, -1.0, 1.0).astype(np.float32)


def speech_copies(audio: np.ndarray, rng: np.random.Generator, seed: int) -> Iterator[tuple[str, np.ndarray]]:
    """Clean, one degraded copy, one over a non-speech background, one single-word crop (of the
    clean or the degraded copy), and one such word inside a longer, fainter background."""
    yield "clean", audio
    name, degraded = degrade(audio, rng)
    yield name, degraded
    yield over_background(audio, rng, seed)
    yield "crop", crop(degraded if rng.random() < 0.5 else audio, rng)
    yield word_in_recording(degraded if rng.random() < 0.5 else audio, rng, seed + 50_000)


def vectors_of(encoder: WhisperEncoder, recordings: Sequence[np.ndarray], chunk: int = 256) -> np.ndarray:
    """The fv4 vector of each recording's ``speech_clip``; a silent one gets NaNs (callers drop it)."""
    out = np.full((len(recordings), 768), np.nan, dtype=np.float32)
    for start in range(0, len(recordings), chunk):
        clips, rows = [], []
        for row in range(start, min(start + chunk, len(recordings))):
            try:
                clips.append(speech_clip(recordings[row]))
                rows.append(row)
            except SilentAudio:
                continue
        for row, features in zip(rows, featurise(encoder, clips), strict=True):
            out[row] = features.vector
    return out


def build_training_set(encoder: WhisperEncoder, ravdess_root: Path, seed: int, *,
                       actors: Sequence[str] | None = None, files_per_actor: int | None = None,
                       nonspeech_per_family: int = NONSPEECH_PER_FAMILY) -> TrainingSet:
    """Speech from RAVDESS (``actors``, default all; ``files_per_actor`` first files, default all),
    four copies per file (``speech_copies``), against ``nonspeech_per_family`` recordings of each of
    ``nonspeech_train.NAMES``; every random choice from ``seed``."""
    recordings: list[np.ndarray] = []
    groups: list[str] = []
    families: list[tuple[str, ...]] = []
    material: list[str] = []
    sources: list[str] = []
    speech: list[bool] = []
    taken: Counter[str] = Counter()
    for index, path in enumerate(sorted(ravdess_root.glob("Actor_*/*.flac"))):
        actor = actor_of(path)
        if actors is not None and actor not in actors:
            continue
        if files_per_actor is not None and taken[actor] >= files_per_actor:
            continue
        taken[actor] += 1
        rng = np.random.default_rng([seed, index])
        for name, audio in speech_copies(read(path), rng, seed * 100_003 + index):
            recordings.append(audio)
            groups.append(f"actor:{actor}")
            families.append(())
            material.append(name)
            sources.append(path.name)
            speech.append(True)
    for k in range(nonspeech_per_family):
        for family in nonspeech_train.NAMES:
            # Seeds far from the ones over_background uses, so a background is not also a negative.
            audio_seed = 10_000_000 + seed * 100_003 + k
            audio, parts = nonspeech_train.make_with_parts(family, audio_seed)
            recordings.append(audio)
            groups.append("nonspeech")
            families.append(parts)
            material.append(family)
            sources.append(str(audio_seed))
            speech.append(False)
    if not any(speech):
        raise ValueError(f"no RAVDESS speech under {ravdess_root} (expected Actor_NN/*.flac) for the chosen actors")
    vectors = vectors_of(encoder, recordings)
    keep = np.isfinite(vectors).all(axis=1).tolist()

    def kept(items: list[Any]) -> list[Any]:
        return [item for item, k in zip(items, keep, strict=True) if k]

    return TrainingSet(vectors[keep], np.array(speech)[keep], kept(groups), kept(families), kept(material),
                       kept(sources))
