"""Imports go downwards only, and no module imports itself through others.

The layers are those of docs/layout.md, encoded once in ``LAYERS``. Every import
statement in the package counts, wherever it stands: at module level, inside a
function (deferred, but a dependency all the same: it runs when the function does)
and under ``if TYPE_CHECKING:`` (a dependency of the types; hiding a circle there
leaves the circle). What is not counted is the import of parent packages that
Python performs implicitly (``import smskd.store.rundir`` runs ``smskd/__init__``
first): the package root, which imports the public API from every layer, is the top
and exempt, and every other package ``__init__`` is counted as a module of its own.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "smskd"

# Highest first: a module may import from its own layer and those after it.
LAYERS: list[set[str]] = [
    {"cli"},
    {"study"},
    {"experiment"},
    {"train"},
    {"store"},
    {"config"},
    {"methods", "models", "data"},
    {"errors", "extras", "version"},
]
TOP = {PACKAGE, f"{PACKAGE}.__main__"}  # the public face and `python -m smskd`


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def resolve(node: ast.Import | ast.ImportFrom, importer: str) -> list[str]:
    """The package's modules that one import statement names."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in MODULES]
    base = node.module or ""
    if node.level:  # relative: from the importer's package upwards
        package = importer.split(".")
        is_package = MODULES[importer].name == "__init__.py"
        anchor = package[: len(package) - node.level + is_package]
        base = ".".join([*anchor, *([base] if base else [])])
    if base not in MODULES:
        return []
    # `from smskd.store import rundir` imports the module rundir, not the package's names.
    named = [f"{base}.{alias.name}" for alias in node.names]
    submodules = [name for name in named if name in MODULES]
    return submodules if len(submodules) == len(named) else [base, *submodules]


def import_graph() -> dict[str, dict[str, int]]:
    """Importer → {imported module: line of its first import}."""
    graph: dict[str, dict[str, int]] = {}
    for name, path in MODULES.items():
        edges = graph.setdefault(name, {})
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for target in resolve(node, name):
                    if target != name:
                        edges.setdefault(target, node.lineno)
    return graph


def layer(module: str) -> int:
    if module in TOP:
        return -1
    part = module.split(".")[1]
    for rank, members in enumerate(LAYERS):
        if part in members:
            return rank
    raise AssertionError(f"{module}: in no layer of LAYERS; add it where docs/layout.md puts it")


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        layer(module)


def test_imports_go_downwards_only() -> None:
    upward = [
        f"{MODULES[importer].relative_to(ROOT)}:{line}: {importer} imports {target}"
        for importer, edges in import_graph().items()
        for target, line in edges.items()
        if importer not in TOP and layer(target) < layer(importer)
    ]
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_no_import_cycles() -> None:
    graph = import_graph()
    found = cycles(graph)
    described = [
        " ⇄ ".join(component)
        + ": "
        + ", ".join(
            f"{a} → {b} (line {graph[a][b]})" for a in component for b in component if b in graph[a]
        )
        for component in found
    ]
    assert not found, "import cycles:\n" + "\n".join(described)


def test_the_layers_are_those_of_the_docs() -> None:
    page = (ROOT / "docs" / "layout.md").read_text()
    line = re.search(r"^cli → .*$", page, re.M)
    assert line is not None, "docs/layout.md states no layer line"
    stated = [{name.strip() for name in part.split(",")} for part in line.group().split("→")]
    assert stated == LAYERS


@pytest.mark.parametrize(
    ("code", "importer", "expected"),
    [
        ("import smskd.store.rundir", "smskd.cli.commands", ["smskd.store.rundir"]),
        ("from smskd.store import rundir", "smskd.cli.commands", ["smskd.store.rundir"]),
        ("from smskd.methods import AT", "smskd.config", ["smskd.methods"]),
        ("from smskd import __version__", "smskd.store.rundir", ["smskd"]),
        ("from . import checkpoint", "smskd.store.rundir", ["smskd.store.checkpoint"]),
        ("from ..errors import UserError", "smskd.store.rundir", ["smskd.errors"]),
        ("from .memory import ArrayDataset", "smskd.data", ["smskd.data.memory"]),
        ("import torch.nn", "smskd.store.rundir", []),
    ],
)
def test_imports_are_resolved_to_modules(code: str, importer: str, expected: list[str]) -> None:
    node = ast.parse(code).body[0]
    assert isinstance(node, ast.Import | ast.ImportFrom)
    assert resolve(node, importer) == expected
