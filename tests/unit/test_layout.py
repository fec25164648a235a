"""The package's layout, checked statically: no import cycle, no oversized module, no import of
the Serve entry point, one adapter per ingest source.

The import graph is read from the source with :mod:`ast` (nothing is imported), at module
granularity: every ``import recsys.x`` / ``from recsys.x import y`` anywhere in a module, at
module level or inside a function, is an edge; ``from recsys.x import y`` points at
``recsys.x.y`` when that is a module, else at ``recsys.x``.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import get_args

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "recsys"
MAX_LINES = 450


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    """``from ..x import y`` inside ``module`` -> the absolute name of ``..x``."""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([target] if target else []))


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``module`` imports, anywhere in its source."""
    out: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = node.module if node.level == 0 else _resolve_relative(
                module, path.name == "__init__.py", node.level, node.module)
            if source is None:
                continue
            names = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source
                     for alias in node.names]
        else:
            continue
        for name in names:
            # ``import recsys.a.b`` also imports recsys.a: the nearest known module is the edge.
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(cycles)


def test_the_graph_sees_function_level_and_from_imports() -> None:
    graph = import_graph()
    # module level, ``from recsys.data.ingest import amazon`` resolved to the module
    assert "recsys.data.ingest.amazon" in graph["recsys.data.ingest.runner"]
    # adapters depend on the shared types, never on the runner that dispatches to them
    assert "recsys.data.ingest.base" in graph["recsys.data.ingest.generic"]
    assert "recsys.data.ingest.runner" not in graph["recsys.data.ingest.generic"]


def test_find_cycles_names_the_modules() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert find_cycles(graph) == [["a", "b", "c"]]


def test_recsys_has_no_import_cycle() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles in recsys/ (each line: modules that import each other):\n" \
        + "\n".join(" <-> ".join(c) for c in cycles)


def test_no_module_over_the_size_limit() -> None:
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines())
             for name, path in _modules().items()}
    big = {name: n for name, n in sorted(sizes.items()) if n > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines (split them by concept): {big}"


def test_recsys_does_not_import_the_serve_entry_point() -> None:
    """``serve/`` is Serve's import path around the library, never a dependency of it."""
    offenders = {}
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 \
                else []
            bad = [m for m in mods if m == "serve" or m.startswith("serve.")]
            if bad:
                offenders.setdefault(name, []).extend(bad)
    assert not offenders, f"recsys modules importing the top-level serve package: {offenders}"


def test_one_adapter_per_ingest_source() -> None:
    from recsys.data.ingest import runner
    from recsys.data.ingest.base import SourceKind

    assert list(runner.ADAPTERS) == list(get_args(SourceKind)) == runner.adapter_names()
    assert runner.SOURCES == tuple(runner.ADAPTERS)


@pytest.mark.parametrize("module", [m for m in _modules() if m.startswith("recsys.data.")])
def test_no_private_names_imported_across_modules(module: str) -> None:
    """Shared helpers are public: a data module never imports another module's ``_name``."""
    tree = ast.parse(_modules()[module].read_text(encoding="utf-8"))
    private = [f"{node.module}.{a.name}" for node in ast.walk(tree)
               if isinstance(node, ast.ImportFrom) for a in node.names if a.name.startswith("_")]
    assert not private, f"{module} imports private names: {private}"


def test_the_library_does_not_import_the_command_line() -> None:
    """``recsys.cli``, ``recsys.job`` and the training jobs' ``recsys.training.job`` sit on top
    (argument parsing, exit codes); a library module that needs a formatter or a helper from
    them has it in the wrong place."""
    graph = import_graph()
    top = {"recsys.cli", "recsys.job", "recsys.training.job"}
    offenders = {m: sorted(deps & top) for m, deps in graph.items()
                 if m not in top and deps & top}
    assert not offenders, f"library modules importing the command-line layer: {offenders}"
