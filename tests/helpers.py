"""Small helpers shared by the API and end-to-end tests."""

from __future__ import annotations

import io
import re
import subprocess
from pathlib import Path
from typing import Any


def multipart(files: list[tuple[str, bytes]], **fields: str) -> dict[str, Any]:
    """Form data for Flask's test client: many ``file`` parts plus plain fields."""
    data: dict[str, Any] = {"file": [(io.BytesIO(content), name) for name, content in files]}
    data.update(fields)
    return data


def read(path: Path) -> tuple[str, bytes]:
    return path.name, path.read_bytes()


def csrf_token(client: Any, path: str = "/") -> str:
    """The CSRF token a page carries in its ``<meta name="csrf-token">`` (the session keeps it)."""
    page = client.get(path).get_data(as_text=True)
    match = re.search(r'<meta name="csrf-token" content="([^"]+)"', page)
    assert match, f"no CSRF token on {path}"
    return match.group(1)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Terminate a child process, killing it if it does not exit within ``timeout`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
