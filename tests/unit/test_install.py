"""What the README's own commands install: ``./scripts/serve`` gives every command the README shows."""

from __future__ import annotations

import re
import tomllib

from ser_shared.settings import REPO_ROOT


def _requirements(extras: str, optional: dict[str, list[str]]) -> list[str]:
    """The requirements of ``extras`` (comma-separated), following ``ser-service[...]`` references."""
    out: list[str] = []
    for extra in extras.split(","):
        for req in optional[extra]:
            nested = re.fullmatch(r"ser-service\[([\w,]+)\]", req)
            out += _requirements(nested.group(1), optional) if nested else [req]
    return out


def test_serve_installs_matplotlib_for_the_readme_evaluate_plot() -> None:
    """The README runs ``ser evaluate ... --plot confusion.png`` on what ``./scripts/serve`` installed."""
    serve = (REPO_ROOT / "scripts" / "serve").read_text()
    extras = re.search(r"source scripts/bootstrap\.sh ([\w,]+)", serve)
    assert extras, serve
    optional = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {re.split(r"[<>=\[ ]", req, maxsplit=1)[0].lower() for req in _requirements(extras.group(1), optional)}
    assert {"matplotlib", "tensorflow-cpu"} <= names
    assert "--plot confusion.png" in (REPO_ROOT / "README.md").read_text()
