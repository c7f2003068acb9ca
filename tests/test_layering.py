"""The package's layering (docs/architecture.md): imports go downward only, no import cycles.

Parses every module's imports with ``ast`` (lazy imports inside functions included), so it also catches
the cycles that only lazy imports hide (``run`` <-> ``analysis`` was one).
"""

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# each tier may import only from tiers below it (and from its own unit); the package root is exempt
TIERS = [
    {"core"},
    {"methods", "models", "integrations", "data"},
    {"config"},
    {"train"},
    {"build", "errors"},
    {"analysis", "inference"},
    {"run", "evaluation", "export"},
    {"experiments", "demo"},
    {"commands"},
    {"cli"},
    {"__main__"},
]
# config validates a few choices with lazy, stdlib-only helpers of lower-level units
EXCEPTIONS = {
    ("rifle.config", "rifle.train.loggers"),
    ("rifle.config", "rifle.train.optim"),
    ("rifle.config", "rifle.data.builtin"),
}


def _modules() -> dict[str, Path]:
    out = {}
    for p in (SRC / "rifle").rglob("*.py"):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(mods: dict[str, Path]) -> dict[str, set[tuple[str, bool]]]:
    """``{module: {(imported rifle module, at module level?)}}``."""

    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[tuple[str, bool]]] = defaultdict(set)
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                k = known(t) if t.startswith("rifle") else None
                if k and k != mod:
                    graph[mod].add((k, id(node) in top))
    return graph


def _unit(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
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

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def test_every_unit_has_a_tier():
    units = {_unit(m) for m in _modules()} - {""}
    tiered = set().union(*TIERS)
    assert units <= tiered, (
        f"new top-level unit(s) {sorted(units - tiered)}: place them in TIERS and docs/architecture.md"
    )


def test_imports_go_downward_only():
    mods = _modules()
    tier = {u: i for i, units in enumerate(TIERS) for u in units}
    bad = []
    for mod, targets in _imports(mods).items():
        u = _unit(mod)
        for target, _ in targets:
            v = _unit(target)
            if not u or not v or u == v or (mod, target) in EXCEPTIONS:
                continue  # the package root (__version__, lazy rifle.load), inside one unit, declared
            if tier[v] >= tier[u]:
                bad.append(f"{mod} -> {target}")
    assert not bad, "upward or sideways imports (docs/architecture.md):\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    mods = _modules()
    graph = _imports(mods)
    # a package __init__ that exposes a submodule lazily (rifle.load, the integrations' callbacks,
    # the method registry loading its modules) is no cycle: leave out the edges *from* __init__s
    edges = {m: {t for t, _ in ts} for m, ts in graph.items() if mods[m].name != "__init__.py"}
    assert _cycles(edges) == []
    top_level = {m: {t for t, at_top in ts if at_top} for m, ts in graph.items()}
    assert _cycles(top_level) == []


def test_the_checker_sees_lazy_imports_and_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = _imports(_modules())
    # run.py adds the depth monitor lazily, inside run_train: seen, and not at module level
    assert ("rifle.analysis.monitor", False) in graph["rifle.run"]
    assert ("rifle.build", True) in graph["rifle.run"]
