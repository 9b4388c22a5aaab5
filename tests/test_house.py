"""The house as DESIGN.md draws it: imports flow one way, with no circle (lazy imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

from .conftest import ROOT

PACKAGES = ("study", "trainables", "analysis")


def imports_of(path: Path) -> set[str]:
    """Every project module ``path`` imports, at module level or inside functions (lazy imports count)."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in PACKAGES}
    return found


def module_graph() -> dict[str, set[str]]:
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts): p for pkg in PACKAGES
               for p in (ROOT / pkg).glob("*.py")}
    modules = {m.removesuffix(".__init__"): p for m, p in modules.items()}
    return {m: {i for i in imports_of(p) if i in modules and i != m} for m, p in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (a list of modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_no_module_imports_one_that_imports_it_back():
    graph = module_graph()
    assert len(graph) > 30 and "study.tracking" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle_through_three_modules():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_flow_one_way_between_the_packages():
    """study -> trainables, analysis; analysis -> trainables; trainables -> nothing of ours above it."""
    allowed = {"study": set(PACKAGES), "analysis": {"analysis", "trainables"}, "trainables": {"trainables"}}
    for module, targets in module_graph().items():
        for target in targets:
            assert target.split(".")[0] in allowed[module.split(".")[0]], f"{module} imports {target}"
