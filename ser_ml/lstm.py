"""The LSTM on frame sequences: architecture, padding, and batched inference."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

BATCH = 64


def build_model(n_features: int, n_classes: int, units: int = 64, dropout: float = 0.3) -> Any:
    """A masked bidirectional LSTM with mask-aware mean pooling."""
    import keras
    from keras import layers

    inputs = keras.Input(shape=(None, n_features), name="frames")
    x = layers.Masking(mask_value=0.0)(inputs)
    x = layers.Bidirectional(layers.LSTM(units, return_sequences=True))(x)
    x = layers.Dropout(dropout)(x)
    x = layers.GlobalAveragePooling1D()(x)  # honours the mask: padded steps do not count
    x = layers.Dense(64, activation="relu")(x)
    x = layers.Dropout(dropout)(x)
    outputs = layers.Dense(n_classes, activation="softmax", name="probabilities")(x)
    model = keras.Model(inputs, outputs, name="ser_lstm")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def normalise(seq: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Standardise with training statistics; nudge exact zeros so they are never taken for padding."""
    out = (seq - mean) / std
    out[out == 0.0] = 1e-6
    return out.astype(np.float32)


def windows(seq: np.ndarray, max_steps: int) -> list[np.ndarray]:
    """Split a long sequence into windows of at most ``max_steps`` (the last one may be shorter)."""
    if seq.shape[0] <= max_steps:
        return [seq]
    return [seq[i : i + max_steps] for i in range(0, seq.shape[0], max_steps) if seq.shape[0] - i >= 10]


def pad(seqs: Sequence[np.ndarray]) -> np.ndarray:
    """Zero-pad to the longest sequence (zero is the mask value)."""
    longest = max(s.shape[0] for s in seqs)
    out = np.zeros((len(seqs), longest, seqs[0].shape[1]), dtype=np.float32)
    for i, s in enumerate(seqs):
        out[i, : s.shape[0]] = s
    return out


def compiled(model: Any) -> Callable[[np.ndarray], np.ndarray]:
    """The model's forward pass as one graph for any batch size and length.

    ``model.predict`` (and ``predict_on_batch``) trace a new graph for each new input shape, and
    every chunk of recordings pads to a different length: tracing would cost more than inference.
    A ``tf.function`` with a shape-polymorphic signature is traced once.
    """
    import tensorflow as tf

    cached = getattr(model, "_ser_forward", None)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    spec = tf.TensorSpec(shape=(None, None, int(model.input_shape[-1])), dtype=tf.float32)
    graph = tf.function(lambda x: model(x, training=False), input_signature=[spec])

    def forward(batch: np.ndarray) -> np.ndarray:
        return np.asarray(graph(tf.constant(batch)))

    model._ser_forward = forward
    return forward


def predict(model: Any, seqs: Sequence[np.ndarray], mean: np.ndarray, std: np.ndarray,
            max_steps: int) -> np.ndarray:
    """Class probabilities per raw sequence, standardised with the training ``mean``/``std``.

    Runs in batches sorted by length to keep padding small, through one compiled graph; long
    sequences are cut into windows whose probabilities are averaged, weighted by length.
    """
    forward = compiled(model)
    pieces: list[tuple[int, np.ndarray]] = [
        (i, w) for i, s in enumerate(seqs) for w in windows(normalise(s, mean, std), max_steps)
    ]
    order = sorted(range(len(pieces)), key=lambda k: pieces[k][1].shape[0])
    n_classes = int(model.output_shape[-1])
    sums = np.zeros((len(seqs), n_classes), dtype=np.float64)
    weights = np.zeros(len(seqs), dtype=np.float64)
    for start in range(0, len(order), BATCH):
        chunk = [pieces[k] for k in order[start : start + BATCH]]
        probs = forward(pad([w for _, w in chunk]))
        for (i, w), p in zip(chunk, probs, strict=True):
            sums[i] += p * w.shape[0]
            weights[i] += w.shape[0]
    return (sums / weights[:, None]).astype(np.float32)
