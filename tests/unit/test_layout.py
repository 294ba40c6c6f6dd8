"""The house rules of STYLE.md and issue 9, read from the source: which package may import
which, no import cycles, and only the native engine names its own modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

PACKAGE = Path(__file__).resolve().parents[2] / "dormant"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every dormant module this file imports, at module level or inside a function (not those
    under `if TYPE_CHECKING:`, which never run)."""
    found: set[str] = set()
    tree = ast.parse(path.read_text())
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                   for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return {name for name in found if name == "dormant" or name.startswith("dormant.")}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in files and m != name} for name, path in files.items()}


def _in(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_the_gateway_side_imports_no_worker_and_no_engine_but_the_registry(graph):
    gateway_side = ("dormant.gateway", "dormant.lifecycle", "dormant.worker_api", "dormant.config", "dormant.cli")
    for module, imported in graph.items():
        if _in(module, *gateway_side):
            bad = {m for m in imported if _in(m, "dormant.worker") or (_in(m, "dormant.engines") and m != "dormant.engines.base")}
            assert not bad, f"{module} imports {sorted(bad)}"


def test_engines_import_no_worker_lifecycle_or_gateway(graph):
    for module, imported in graph.items():
        if _in(module, "dormant.engines"):
            bad = {m for m in imported if _in(m, "dormant.worker", "dormant.worker_api", "dormant.lifecycle",
                                             "dormant.gateway", "dormant.cli")}
            assert not bad, f"{module} imports {sorted(bad)}"


def test_the_worker_reaches_engines_only_through_the_protocol(graph):
    for module, imported in graph.items():
        if _in(module, "dormant.worker", "dormant.lifecycle", "dormant.gateway", "dormant.store"):
            bad = {m for m in imported if _in(m, "dormant.engines") and m != "dormant.engines.base"}
            assert not bad, f"{module} imports {sorted(bad)}"


def test_nothing_but_the_native_engine_names_its_modules():
    for path in PACKAGE.rglob("*.py"):
        if _in(_module_name(path), "dormant.engines.native") or path == PACKAGE / "engines" / "base.py":
            continue  # base.py's registry names the package, once
        assert "engines.native" not in path.read_text(), f"{path} names a native module"


def test_no_import_cycles(graph):
    """Tarjan's strongly connected components over every import, function-level ones too."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
    assert not cycles, f"import cycles: {cycles}"
