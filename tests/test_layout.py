"""Package layout: fedrg's packages import downwards only (function-level imports included),
in the order docs/api.md and ../shared/DESIGN.md give, and no module import cycle."""

from __future__ import annotations

import ast
import re
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


#: fedrg's layers, lowest first; a package imports only from lower layers (or itself).
#: Packages in one layer are siblings and do not import each other. ``ground`` is every
#: top-level module (config, errors, files, policy, signing, payload, runtime, ...) but
#: ``cli``, which is the command layer's entry point.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("ground",), ("data",), ("model",), ("train",), ("privacy", "secagg"), ("hospital",),
    ("federated",), ("flower",), ("deploy",), ("audit",), ("commands",),
)


def package_of(module: str) -> str:
    """``fedrg.hospital.site`` -> ``hospital``; a top-level module -> ``ground``."""
    parts = module.split(".")
    if len(parts) == 1:
        return "ground"
    if len(parts) == 2 and not (PKG / parts[1]).is_dir():  # a top-level module
        return "commands" if parts[1] == "cli" else "ground"
    return parts[1]


def layer_of(package: str) -> int:
    for i, layer in enumerate(LAYERS):
        if package in layer:
            return i
    raise AssertionError(f"package {package!r} is in no layer of LAYERS: add it to the order")


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """``(importer, imported)`` pairs whose packages break the layer order."""
    bad = []
    for module, deps in graph.items():
        src = package_of(module)
        for dep in deps:
            dst = package_of(dep)
            if dst != src and layer_of(dst) >= layer_of(src):
                bad.append((module, dep))
    return sorted(bad)


def test_the_layer_checker_finds_an_upward_or_sideways_import():
    graph = {"fedrg.train.loop": {"fedrg.privacy.accounting"},  # upward
             "fedrg.secagg.client": {"fedrg.privacy.ledger"},  # sideways (siblings)
             "fedrg.hospital.site": {"fedrg.privacy.ledger", "fedrg.config"},  # fine
             "fedrg.config": {"fedrg.errors"}}  # ground to ground: fine
    assert upward_imports(graph) == [("fedrg.secagg.client", "fedrg.privacy.ledger"),
                                     ("fedrg.train.loop", "fedrg.privacy.accounting")]


def test_packages_import_downwards_only():
    graph = import_graph()
    packages = {package_of(m) for m in graph}
    assert {"hospital", "federated", "privacy", "secagg", "ground"} <= packages
    for package in packages:
        layer_of(package)  # every package has its place
    assert upward_imports(graph) == []


# ------------------------------------------------------------------ one rule, one place
#: Each privacy rule's formula, and the one file allowed to hold it (the audit, DP-SGD, the
#: ledger and the hospital's plan call these; a second copy fails here even if it agrees).
RULES: dict[str, tuple[str, str]] = {
    # name: (a regex every copy of the formula matches, the file that defines it)
    "sample rate": (r"\bbatch(_size)? /", "fedrg/train/schedule.py"),
    "steps per round": (r"local_epochs \*", "fedrg/train/schedule.py"),
    "Shamir threshold": (r"fraction \* holders", "fedrg/policy.py"),
    "minimum secure-sum peers": (r"min_secagg_peers [+-]", "fedrg/policy.py"),
    "default delta": (r"1(\.0)? / \(10(\.0)? \*", "fedrg/policy.py"),
    "lifetime budget": (r"budget \+ EPS_TOL", "fedrg/privacy/mechanism.py"),
    "hospital sampling draw": (r"random\.Random\(f?'", "fedrg/federated/server.py"),
}


def _without_strings(node: ast.AST) -> ast.AST:
    class Blank(ast.NodeTransformer):
        def visit_Constant(self, c: ast.Constant) -> ast.Constant:
            return ast.Constant("") if isinstance(c.value, str) else c

    import copy

    return Blank().visit(copy.deepcopy(node))


def rule_copies(root: Path = PKG) -> dict[str, list[str]]:
    """``rule -> [file:line, ...]`` of every expression (not string) holding the rule's formula."""
    found: dict[str, list[str]] = {name: [] for name in RULES}
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, (ast.BinOp, ast.Compare, ast.Call)):
                continue
            src = ast.unparse(_without_strings(node))  # a description naming it is no copy
            for name, (needle, _) in RULES.items():
                if re.search(needle, src):
                    where = f"{path.relative_to(root.parent)}:{node.lineno}"
                    if where not in found[name]:
                        found[name].append(where)
    return found


def test_each_privacy_rule_is_defined_once():
    for name, places in rule_copies().items():
        files = {p.split(":")[0] for p in places}
        assert files == {RULES[name][1]}, (name, places)


def test_the_rule_checker_finds_a_second_copy(tmp_path):
    pkg = tmp_path / "fedrg"
    (pkg / "audit").mkdir(parents=True)
    (pkg / "audit" / "x.py").write_text("def q(batch_size, n):\n    return batch_size / n\n")
    assert rule_copies(pkg)["sample rate"] == ["fedrg/audit/x.py:2"]
