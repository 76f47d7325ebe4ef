"""The house rules, read from the source: which package may import which, and no import cycles.

Rooms (``web``, ``worker``, ``ser_ml``) import the hall (``ser_shared``), never each other except
the worker calling the numeric code; the hall imports no room; ``ser_cli`` is the composition root
above them all; the user's client (``client/ser_client``) is a distribution of its own and imports
no server code. Every ``import`` counts, including those inside functions and under
``TYPE_CHECKING``: a lazy import is still a dependency, only a deferred one.

Static (``ast``), so it needs no services and loads none of the heavy libraries it forbids.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
# Import name -> folder. bench is checked too: nothing may import it, and its own cycles count.
PACKAGES = {"ser_shared": "ser_shared", "web": "web", "worker": "worker", "ser_ml": "ser_ml",
            "ser_cli": "ser_cli", "bench": "bench", "ser_client": "client/ser_client"}
SERVER = ("ser_shared", "web", "worker", "ser_ml", "ser_cli")
HEAVY_ML = ("tensorflow", "keras")

# What each package must not import (first component of the module name).
FORBIDDEN: dict[str, set[str]] = {
    "ser_shared": {"web", "worker", "ser_ml", "ser_cli", "bench", "tests"},
    "web": {"worker", "ser_ml", "ser_cli", "bench", "tests", *HEAVY_ML},
    "worker": {"web", "ser_cli", "bench", "tests"},
    "ser_ml": {"web", "worker", "ser_cli", "bench", "tests", "celery", "sqlalchemy", "flask"},
    "ser_cli": {"bench", "tests"},
    "ser_client": {*SERVER, "bench", "tests", "flask", "celery", "sqlalchemy", "psycopg", *HEAVY_ML},
}


def _modules() -> dict[str, Path]:
    """Every module of the checked packages, by dotted name (a package by its ``__init__``)."""
    found: dict[str, Path] = {}
    for name, folder in PACKAGES.items():
        base = ROOT / folder
        for path in sorted(base.rglob("*.py")):
            parts = [name, *path.relative_to(base).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imported_names(module: str, path: Path) -> Iterator[str]:
    """The absolute names ``module`` imports: ``from pkg import mod`` yields ``pkg.mod`` where that
    is a checked module, ``pkg`` otherwise (``from flask import Flask`` yields ``flask``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                yield f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base


def _owner(name: str) -> str | None:
    """The checked module that defines ``name`` (its longest known prefix), or None if outside."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _build() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> every name it imports, module -> the checked modules it imports).

    ``from web import api`` is an edge to ``web.api`` only, not also to ``web``: the package's
    ``__init__`` runs first either way, and counting it would call every package a cycle.
    """
    names = {module: set(_imported_names(module, path)) for module, path in MODULES.items()}
    edges = {module: {o for o in map(_owner, imported) if o is not None} - {module}
             for module, imported in names.items()}
    return names, edges


NAMES, EDGES = _build()


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), sorted; each component
    holds at least one cycle, and every cycle lies within one component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return components


def _cycle_path(component: list[str], edges: dict[str, set[str]]) -> list[str]:
    """One concrete cycle through a component (start -> ... -> start), to say what to cut."""
    members = set(component)
    start = component[0]
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start]  # path ends at start
                if w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    return component  # not reached for a strongly connected component


CYCLES = _cycles(EDGES)


def _package(module: str) -> str:
    return module.split(".")[0]


def _describe(components: list[list[str]]) -> str:
    return "import cycles:\n" + "\n".join(
        f"{' -> '.join(_cycle_path(c, EDGES))}  (all {len(c)} modules of the cycle: {', '.join(c)})"
        for c in components)


def test_the_graph_sees_every_kind_of_import() -> None:
    """Guards the checks below against reading nothing: top-level, grouped ``from`` and
    function-level imports are all edges."""
    assert len(MODULES) > 50
    assert "ser_ml.pipeline" in EDGES["worker.tasks"]  # from ser_ml import pipeline
    assert "ser_ml.train.training" in EDGES["ser_cli.cli"]  # inside a function
    assert "ser_shared.enqueue" in EDGES["web.uploads"]
    assert any(n.startswith("tensorflow") for n in NAMES["ser_ml.lstm"])  # a lazy third-party import
    # The cycle finder finds a cycle when there is one.
    toy = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(toy) == [["a", "b", "c"]]
    assert _cycle_path(["a", "b", "c"], toy) == ["a", "b", "c", "a"]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_what_it_may(package: str) -> None:
    wrong = sorted(f"{module} imports {name}" for module, names in NAMES.items() if _package(module) == package
                   for name in names if name.split(".")[0] in FORBIDDEN[package])
    assert not wrong, "\n".join(wrong)


def test_the_hall_imports_no_room() -> None:
    """The count the re-housing closed with: imports from ser_shared up into a room (0)."""
    up = sorted((m, t) for m, targets in EDGES.items() if _package(m) == "ser_shared"
                for t in targets if _package(t) != "ser_shared")
    assert up == []


def test_nothing_imports_the_benchmarks_or_the_cli() -> None:
    """bench and ser_cli sit above everything: no server module may depend on them."""
    wrong = sorted((m, t) for m, targets in EDGES.items() for t in targets
                   if _package(t) in {"bench", "ser_cli"} and _package(m) not in {"bench", "ser_cli"})
    assert wrong == []


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_import_cycle(package: str) -> None:
    found = [c for c in CYCLES if any(_package(m) == package for m in c)]
    assert not found, _describe(found)


def test_only_the_entry_points_import_the_app_factory() -> None:
    """``web.app`` imports every blueprint; a web module that imports it back (as they once did for
    ``Services``, which now lives in ``web.context``) closes a cycle. Only the package's front door
    (``from web import create_app``) and the WSGI entry point may."""
    assert "web.app" in EDGES["web"]  # the check reads real edges
    importers = sorted(m for m, targets in EDGES.items() if _package(m) == "web" and "web.app" in targets)
    assert importers == ["web"]
