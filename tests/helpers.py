"""Small helpers shared by the API and end-to-end tests."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any


def multipart(files: list[tuple[str, bytes]], **fields: str) -> dict[str, Any]:
    """Form data for Flask's test client: many ``file`` parts plus plain fields."""
    data: dict[str, Any] = {"file": [(io.BytesIO(content), name) for name, content in files]}
    data.update(fields)
    return data


def read(path: Path) -> tuple[str, bytes]:
    return path.name, path.read_bytes()
