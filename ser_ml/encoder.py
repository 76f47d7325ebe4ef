"""The first layers of Whisper's encoder, in TensorFlow: the models' input features.

Whisper's encoder is two 1-D convolutions (GELU) over an 80-band log-mel spectrogram, sinusoidal
positions, then pre-norm transformer blocks (Radford et al., 2022; OpenAI's ``whisper/model.py``).
CTranslate2 only encodes whole 30 s windows, which costs about 20 times more than a 3.5 s clip
needs, so the blocks the models use are run here on the clip's own length. Running them in
TensorFlow, the runtime the LSTM already uses, lets a GPU worker accelerate the encoder too.

Clips of different lengths are batched: each is zero-padded, its padding is zeroed again after
the first convolution (as the convolution's own zero padding would be) and masked out of attention,
so a clip's output does not depend on what it was batched with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ser_ml.whisper_weights import read_artifact, sha256_of

SAMPLE_RATE = 16000
N_FFT = 400  # 25 ms
HOP = 160  # 10 ms: one mel frame; the encoder's stride-2 convolution makes its frames 20 ms
N_MELS = 80
MAX_FRAMES = 3000  # 30 s of mel frames: the positional table's length (1500 encoder frames)
FRAMES_PER_BATCH = 6000  # mel frames per encoder call: bounds the attention matrices' memory
LN_EPS = 1e-5


class ArtifactError(RuntimeError):
    """A model artifact is missing, altered or built for other code."""


@lru_cache(maxsize=1)
def _mel_filters() -> np.ndarray:
    import librosa

    # Whisper's own filters are exactly these (its mel_filters.npz was made with this call).
    return librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS).astype(np.float32).T


@lru_cache(maxsize=1)
def _window() -> np.ndarray:
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)  # periodic Hann


def log_mel(audio: np.ndarray) -> np.ndarray:
    """Whisper's input features for ``audio`` (16 kHz mono): (frames, 80), one frame per 10 ms.

    As ``whisper.audio.log_mel_spectrogram``: centred STFT with reflect padding, the last frame
    dropped, power, mel, log10 floored at 1e-10 and at 8 below the clip's maximum, then (x + 4) / 4.
    """
    x = np.asarray(audio, dtype=np.float32)
    if x.size < N_FFT:
        x = np.pad(x, (0, N_FFT - x.size))
    padded = np.pad(x, N_FFT // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP][: x.size // HOP]
    spec = np.fft.rfft(frames * _window(), axis=1)
    power = (spec.real**2 + spec.imag**2).astype(np.float32)
    logmel = np.log10(np.maximum(power @ _mel_filters(), 1e-10))
    logmel = np.maximum(logmel, logmel.max() - 8.0)
    return ((logmel + 4.0) / 4.0).astype(np.float32)


def file_sha256(path: Path) -> str:
    return sha256_of([path])


def short_device(name: str) -> str:
    """``GPU:0`` for TensorFlow's ``/job:localhost/replica:0/task:0/device:GPU:0`` (an empty name: ``?``)."""
    return name.rsplit("device:", 1)[-1] if name else "?"


class WhisperEncoder:
    """The encoder's front end and first blocks; ``encode`` returns every kept block's output."""

    def __init__(self, weights: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        import tensorflow as tf

        self.meta = meta
        self.layers = int(meta["layers_kept"])
        self.width = int(meta["width"])
        self.heads = int(np.asarray(weights["num_heads"]).item())

        def const(name: str, transpose: tuple[int, ...] | None = None) -> Any:
            arr = np.asarray(weights[name], dtype=np.float32)
            return tf.constant(arr.transpose(transpose) if transpose else arr)

        # CTranslate2 stores convolutions as (out, in, width) and dense layers as (out, in).
        self._conv = [(const(f"conv{i}/weight", (2, 1, 0)), const(f"conv{i}/bias")) for i in (1, 2)]
        self._pos = const("position_encodings/encodings")
        self._blocks = []
        for i in range(self.layers):
            p = f"layer_{i}/"
            self._blocks.append({
                "ln1": (const(p + "self_attention/layer_norm/gamma"), const(p + "self_attention/layer_norm/beta")),
                "qkv": (const(p + "self_attention/linear_0/weight", (1, 0)), const(p + "self_attention/linear_0/bias")),
                "out": (const(p + "self_attention/linear_1/weight", (1, 0)), const(p + "self_attention/linear_1/bias")),
                "ln2": (const(p + "ffn/layer_norm/gamma"), const(p + "ffn/layer_norm/beta")),
                "fc1": (const(p + "ffn/linear_0/weight", (1, 0)), const(p + "ffn/linear_0/bias")),
                "fc2": (const(p + "ffn/linear_1/weight", (1, 0)), const(p + "ffn/linear_1/bias")),
            })
        self._ln_post = (const("layer_norm/gamma"), const("layer_norm/beta")) if "layer_norm/gamma" in weights else None
        spec = [tf.TensorSpec((None, None, N_MELS), tf.float32), tf.TensorSpec((None,), tf.int32)]
        self._graph = tf.function(self._forward, input_signature=spec)

    @classmethod
    def load(cls, path: Path, sha256: str | None = None) -> WhisperEncoder:
        """Load an artifact built by ``ser build-encoder``; refuse one whose hash is not ``sha256``."""
        if not path.is_file():
            raise ArtifactError(f"encoder artifact {path} is missing: run `ser build-encoder`")
        if sha256 is not None and (got := file_sha256(path)) != sha256:
            raise ArtifactError(f"encoder artifact {path} has sha256 {got}, the manifest expects {sha256}: "
                                "rebuild it with `ser build-encoder` or retrain")
        weights, meta = read_artifact(path)
        return cls(weights, meta)

    # -- the network ------------------------------------------------------------------------------

    @staticmethod
    def _norm(x: Any, params: tuple[Any, Any]) -> Any:
        import tensorflow as tf

        mean, var = tf.nn.moments(x, axes=[-1], keepdims=True)
        return (x - mean) * tf.math.rsqrt(var + LN_EPS) * params[0] + params[1]

    def _attention(self, x: Any, block: dict[str, Any], bias: Any) -> Any:
        import tensorflow as tf

        b, t = tf.shape(x)[0], tf.shape(x)[1]
        head = self.width // self.heads
        qkv = tf.matmul(x, block["qkv"][0]) + block["qkv"][1]
        qkv = tf.transpose(tf.reshape(qkv, (b, t, 3, self.heads, head)), (2, 0, 3, 1, 4))  # 3,B,H,T,d
        scores = tf.matmul(qkv[0], qkv[1], transpose_b=True) * (1.0 / math.sqrt(head)) + bias
        mixed = tf.matmul(tf.nn.softmax(scores, axis=-1), qkv[2])  # B,H,T,d
        mixed = tf.reshape(tf.transpose(mixed, (0, 2, 1, 3)), (b, t, self.width))
        return tf.matmul(mixed, block["out"][0]) + block["out"][1]

    def _forward(self, mel: Any, lengths: Any) -> Any:
        """(B, T, 80) log-mel, T even, and each row's valid length → (B, T/2, layers, width)."""
        import tensorflow as tf

        t = tf.shape(mel)[1]
        valid = tf.cast(tf.sequence_mask(lengths, t), tf.float32)[:, :, None]
        (w1, b1), (w2, b2) = self._conv
        x = tf.nn.gelu(tf.nn.conv1d(mel, w1, stride=1, padding="SAME") + b1, approximate=False) * valid
        x = tf.nn.conv1d(tf.pad(x, [[0, 0], [1, 1], [0, 0]]), w2, stride=2, padding="VALID") + b2
        x = tf.nn.gelu(x, approximate=False)
        t2 = tf.shape(x)[1]
        x = x + self._pos[:t2]
        keys = tf.sequence_mask((lengths + 1) // 2, t2)
        bias = (1.0 - tf.cast(keys, tf.float32))[:, None, None, :] * -1e9
        outs = []
        for block in self._blocks:
            x = x + self._attention(self._norm(x, block["ln1"]), block, bias)
            h = tf.nn.gelu(tf.matmul(self._norm(x, block["ln2"]), block["fc1"][0]) + block["fc1"][1],
                           approximate=False)
            x = x + tf.matmul(h, block["fc2"][0]) + block["fc2"][1]
            outs.append(x)
        return tf.stack(outs, axis=2)

    def final_output(self, mel: np.ndarray) -> np.ndarray:
        """The full encoder's output (last block, then the final layer norm) for one (T, 80) input:
        only for an artifact holding every block; used to check the port against CTranslate2."""
        import tensorflow as tf

        if self._ln_post is None:
            raise ValueError("this artifact has no final layer norm")
        out = self._graph(tf.constant(mel[None]), tf.constant([mel.shape[0]], tf.int32))[:, :, -1]
        return np.asarray(self._norm(out, self._ln_post))[0]

    def output_device(self) -> str:
        """The device TensorFlow ran the encoder's graph on in this process (``GPU:0``, ``CPU:0``):
        where the output of a short call lives. Evidence for a GPU worker's log, not a setting."""
        import tensorflow as tf

        out = self._graph(tf.zeros((1, 100, N_MELS), tf.float32), tf.constant([100], tf.int32))
        return short_device(out.device)

    # -- clips in, frame features out -------------------------------------------------------------

    def encode(self, clips: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Each clip's encoder outputs, (frames of 20 ms, layers, width) float32.

        Clips over 30 s are encoded in 30 s windows, one after another. Batches are formed from
        clips sorted by length, so padding stays small.
        """
        import tensorflow as tf

        mels: list[np.ndarray] = []
        owner: list[int] = []
        for i, clip in enumerate(clips):
            mel = log_mel(clip)
            for start in range(0, max(mel.shape[0], 1), MAX_FRAMES):
                piece = mel[start : start + MAX_FRAMES]
                if piece.shape[0] % 2:
                    piece = piece[:-1] if piece.shape[0] > 1 else np.pad(piece, ((0, 1), (0, 0)))
                if piece.shape[0]:
                    mels.append(piece)
                    owner.append(i)
        outputs: list[np.ndarray | None] = [None] * len(mels)
        order = sorted(range(len(mels)), key=lambda k: mels[k].shape[0])
        start = 0
        while start < len(order):
            stop = start + 1
            # Sorted ascending: the batch's cost is its last (longest) clip times its size.
            while stop < len(order) and mels[order[stop]].shape[0] * (stop - start + 1) <= FRAMES_PER_BATCH:
                stop += 1
            batch = [order[k] for k in range(start, stop)]
            longest = mels[batch[-1]].shape[0]
            padded = np.zeros((len(batch), longest, N_MELS), dtype=np.float32)
            lengths = np.zeros(len(batch), dtype=np.int32)
            for row, k in enumerate(batch):
                padded[row, : mels[k].shape[0]] = mels[k]
                lengths[row] = mels[k].shape[0]
            out = np.asarray(self._graph(tf.constant(padded), tf.constant(lengths)))
            for row, k in enumerate(batch):
                outputs[k] = out[row, : lengths[row] // 2]
            start = stop
        per_clip: list[list[np.ndarray]] = [[] for _ in clips]
        for k, i in enumerate(owner):
            per_clip[i].append(outputs[k])  # type: ignore[arg-type]
        return [np.concatenate(p, axis=0) if p else np.zeros((0, self.layers, self.width), np.float32)
                for p in per_clip]
