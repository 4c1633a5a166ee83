"""The shape ARCHITECTURE.md promises: imports between our modules go one way
(no cycle, lazy imports inside functions included), and no module uses
another's private names (`from .x import _y` or `x._y`)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"": "llamazip", "runtime": "runtime", "builder": "builder", "zipalign": "zipalign",
            "templates": "templates"}  # import name under llamazip -> folder


def _modules() -> dict[str, Path]:
    found = {}
    for sub, folder in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            package = "llamazip" + (f".{sub}" if sub else "")
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            found[name] = path
    return found


MODULES = _modules()


def _package_of(name: str, path: Path) -> str:
    return name if path.stem == "__init__" else name.rpartition(".")[0]


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = _package_of(module, path).split(".")
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path):
    """(imported module, names taken from it, attribute names used on it) for every import."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    aliases: dict[str, str] = {}  # local name -> our module it refers to
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    found.append((alias.name, []))
                    aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path, node)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in MODULES:  # `from . import kernels`: the module itself
                    found.append((sub, []))
                    aliases[alias.asname or alias.name] = sub
                elif target in MODULES:
                    found.append((target, [alias.name]))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            found.append((aliases[node.value.id], [node.attr]))
    return found


def test_no_module_uses_another_modules_private_names():
    offences = []
    for module, path in MODULES.items():
        for target, names in _imports(module, path):
            for name in names:
                if name.startswith("_") and not name.startswith("__") and target != module:
                    offences.append(f"{module} uses {target}.{name}")
    assert not offences, "\n".join(offences)


def test_imports_between_our_modules_have_no_cycle():
    graph = {m: sorted({t for t, _ in _imports(m, p) if t != m and t in MODULES}) for m, p in MODULES.items()}
    # A package's __init__ importing nothing of its own is the norm here; a module
    # importing its parent package reaches only __init__, which is part of the graph.
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


def test_the_checks_see_our_modules():
    """Guard against a check that passes because it found nothing to check."""
    assert "llamazip.runtime.weight_matrix" in MODULES and "llamazip.main" in MODULES
    edges = {t for t, _ in _imports("llamazip.runtime.weight_matrix", MODULES["llamazip.runtime.weight_matrix"])}
    assert "llamazip.runtime.weight_types" in edges
