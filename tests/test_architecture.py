"""The layout's rules, checked on the source (``ast``, nothing imported): no import cycles, imports point down.

Wings, lowest first: ``models``/``guides`` (Bayesian-LoRA itself), the core
(config, inject, model, metrics, io, result, restore, methods, interop, tasks),
``training``, ``baselines``, the public surface (``api``, ``pyro_blora``), and
``experiments`` on top. A module may import its own wing and the ones below.
Imports under ``if TYPE_CHECKING:`` are annotations only and are not counted.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterable, Mapping

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"pyro_blora": ROOT / "pyro_blora", "pyro_blora.models": ROOT / "models", "pyro_blora.guides": ROOT / "guides"}
WINGS = ["bayesian_lora", "core", "training", "baselines", "surface", "experiments"]


def module_files() -> dict[str, Path]:
    """Every library module by dotted name (``pyro_blora.models`` and ``.guides`` live in their own folders)."""
    out = {}
    for package, folder in SOURCES.items():
        for file in folder.rglob("*.py"):
            parts = list(file.relative_to(folder).with_suffix("").parts)
            if package == "pyro_blora" and parts[0] in ("models", "guides"):
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = file
    return out


def _type_checking_only(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and isinstance(test, (ast.Name, ast.Attribute)) and "TYPE_CHECKING" in ast.unparse(test)


def imports_of(name: str, source: str, known: Iterable[str], is_package: bool = False) -> set[str]:
    """The library modules ``name`` imports anywhere in its body (function-local imports included).

    ``is_package``: ``name`` is a package's ``__init__``, where ``from .x`` means ``name.x``.
    """
    known = set(known)
    tree = ast.parse(source)
    skip = {id(child) for node in ast.walk(tree) if _type_checking_only(node) for child in ast.walk(node)}
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name if is_package else name.rsplit(".", 1)[0]
                package = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{package}.{base}" if base else package
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    graph = {}
    for name, file in files.items():
        graph[name] = imports_of(name, file.read_text(), files, is_package=file.name == "__init__.py")
    return graph


def find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def wing(module: str) -> str:
    parts = module.split(".")
    if parts[:2] in (["pyro_blora", "models"], ["pyro_blora", "guides"]):
        return "bayesian_lora"
    if len(parts) == 1 or parts[1] == "api":
        return "surface"
    return parts[1] if parts[1] in ("training", "baselines", "experiments") else "core"


def upward_imports(graph: Mapping[str, Iterable[str]]) -> list[str]:
    """Every import from a lower wing into a higher one, as ``"a -> b"``; ``models``/``guides`` may import the config."""
    bad = set()
    for module, edges in graph.items():
        for target in edges:
            if WINGS.index(wing(target)) > WINGS.index(wing(module)):
                bad.add(f"{module} -> {target}")
            elif wing(module) == "bayesian_lora" and wing(target) != "bayesian_lora" and target != "pyro_blora.config":
                bad.add(f"{module} -> {target}")
    return sorted(bad)


def test_the_library_has_no_import_cycle() -> None:
    assert find_cycle(import_graph()) is None


def test_imports_only_point_down_the_wings() -> None:
    assert upward_imports(import_graph()) == []


def test_the_graph_sees_the_modules_and_their_local_imports() -> None:
    graph = import_graph()
    assert "pyro_blora.training.svi" in graph["pyro_blora.baselines.mc_dropout"]
    assert "pyro_blora.methods" in graph["pyro_blora.api"]
    assert "pyro_blora.models.layer" in graph["pyro_blora.models"]  # a package's relative imports


def test_a_synthetic_cycle_and_an_upward_import_are_found() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert upward_imports({"pyro_blora.training.svi": {"pyro_blora.baselines.ensemble"}}) == [
        "pyro_blora.training.svi -> pyro_blora.baselines.ensemble"
    ]
    assert upward_imports({"pyro_blora.models.layer": {"pyro_blora.io"}}) == ["pyro_blora.models.layer -> pyro_blora.io"]


def test_a_local_import_counts_and_a_type_checking_one_does_not() -> None:
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pyro_blora import c\ndef f():\n    from pyro_blora.b import x\n"
    assert imports_of("pyro_blora.a", source, {"pyro_blora.a", "pyro_blora.b", "pyro_blora.c"}) == {"pyro_blora.b"}


@pytest.mark.parametrize("limit", [400])
def test_no_module_is_over_the_line_limit(limit: int) -> None:
    long = {name: n for name, file in module_files().items() if (n := len(file.read_text().splitlines())) > limit}
    assert long == {}


def test_no_function_is_over_80_lines() -> None:
    long = []
    for name, file in module_files().items():
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1}")
    assert long == []
