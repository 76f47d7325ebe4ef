"""Building the two distributions as pip does (isolated, current setuptools): quiet, and licensed."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ser_shared.settings import REPO_ROOT

pytestmark = pytest.mark.slow


# What each distribution's build reads (setuptools builds in the source folder: a copy keeps its
# build/ and egg-info out of the checkout).
SOURCES = {".": ("pyproject.toml", "README.md", "LICENSE", "web", "worker", "ser_shared", "ser_ml", "ser_cli",
                 "migrations"),
           "client": ("pyproject.toml", "README.md", "LICENSE", "ser_client")}


def _copy(project: str, dest: Path) -> Path:
    dest.mkdir()
    for name in SOURCES[project]:
        src = REPO_ROOT / project / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    return dest


@pytest.mark.parametrize("project", [".", "client"])
def test_builds_without_deprecation_banners_and_carry_their_licence(project: str, tmp_path: Path) -> None:
    """`project.license` as a table made setuptools print a framed deprecation banner three times
    per install; an SPDX expression and the licence file are what it asks for."""
    source = _copy(project, tmp_path / "src")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(tmp_path),
                           str(source)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "deprecated" not in output.lower(), output[-3000:]
    (wheel,) = tmp_path.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        read = {n: archive.read(n).decode() for n in archive.namelist() if ".dist-info/" in n}
    (metadata,) = [text for name, text in read.items() if name.endswith("/METADATA")]
    (licence,) = [text for name, text in read.items() if name.endswith("/licenses/LICENSE")]
    assert "License-Expression: Apache-2.0" in metadata.splitlines() and "Apache License" in licence
