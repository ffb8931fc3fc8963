"""Package layout: no import cycles among fedrg's modules (function-level imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "fedrg"


def import_graph(root: Path = PKG) -> dict[str, set[str]]:
    """``module -> fedrg modules it imports`` from every import statement (any nesting)."""
    mods: dict[str, Path] = {}
    for p in root.rglob("*.py"):
        name = ".".join(p.relative_to(root.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = p
    graph: dict[str, set[str]] = {}
    for name, p in mods.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("fedrg"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    deps.add(sub if sub in mods else node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("fedrg"))
        # a module importing its own package's __init__ is not a cycle worth reporting
        graph[name] = {d for d in deps if d in mods and d != name and not name.startswith(d + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_fedrg_has_no_import_cycle():
    graph = import_graph()
    assert "fedrg.data.validate" in graph and "fedrg.data.manifest" in graph["fedrg.data.validate"]
    assert cycles(graph) == []


def test_the_mechanism_does_not_depend_on_its_audit() -> None:
    """fedrg.privacy (DP-SGD, accounting, ledger, releases) never imports fedrg.audit."""
    graph = import_graph()
    privacy = [m for m in graph if m.startswith("fedrg.privacy")]
    assert privacy and not [(m, d) for m in privacy for d in graph[m] if d.startswith("fedrg.audit")]
    assert {"fedrg.audit.verify", "fedrg.audit.empirical"} <= set(graph)
