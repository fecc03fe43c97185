"""Dependencies point inward (an AST scan of every import in src/leanscale, lazy ones included).

- ``core`` imports nothing of leanscale outside ``core``;
- a technique (``large_batch``, ``pruning``, ``scaling``, ``sparse``, ``cascade``) imports no other
  technique.

Issue #14 removed the last imports between techniques (``KNOWN`` is empty and only ever shrinks).
Beyond the two rules: every package has a layer and imports only lower layers
(core < models, report < data < train < techniques < tour < cli), and no two modules import each
other at import time (no cycles).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "leanscale"
TECHNIQUES = ("large_batch", "pruning", "scaling", "sparse", "cascade")

# (importing file relative to src/leanscale, imported module): to be removed by #14
KNOWN: set[tuple[str, str]] = set()


def _imports(path: Path) -> set[str]:
    """Every leanscale module ``path`` imports (absolute and relative, top level or inside functions)."""
    package = ".".join(("leanscale", *path.relative_to(SRC).with_suffix("").parts[:-1]))
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "leanscale"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] == "leanscale":
                out.add(module)
                # `from leanscale import large_batch` imports a subpackage by name
                out |= {f"{module}.{a.name}" for a in node.names if module == "leanscale"}
    return out


def _violations() -> set[tuple[str, str]]:
    found = set()
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        top = rel.split("/")[0]
        for module in _imports(path):
            parts = module.split(".")
            target = parts[1] if len(parts) > 1 else ""
            if top == "core" and target and target != "core" and module != "leanscale":
                found.add((rel, module))
            if top in TECHNIQUES and target in TECHNIQUES and target != top:
                found.add((rel, module))
    return found


def test_the_scan_sees_imports():
    # an import inside a function is seen
    assert "leanscale.large_batch.ghost_bn" in _imports(SRC / "large_batch" / "train.py")
    assert "leanscale.core.errors" in _imports(SRC / "core" / "io.py")


def test_core_imports_nothing_above_it():
    assert sorted(v for v in _violations() if v[0].startswith("core/")) == []


def test_no_new_import_between_techniques_and_the_known_list_only_shrinks():
    found = {v for v in _violations() if not v[0].startswith("core/")}
    assert sorted(found - KNOWN) == [], "a technique imports another technique (move the shared piece inward)"
    assert sorted(KNOWN - found) == [], "fixed: remove these from KNOWN"


# The layers, lowest first: a package imports only packages of a lower layer (and itself).
LAYERS = {"core": 0, "models": 1, "report": 1, "data": 2, "train": 3,
          **{t: 4 for t in TECHNIQUES}, "tour": 5, "integrations": 5, "cli": 6}


def _package_edges() -> set[tuple[str, str, str]]:
    edges = set()
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        top = rel.split("/")[0].removesuffix(".py")
        for module in _imports(path):
            parts = module.split(".")
            if len(parts) > 1 and parts[1] != top and parts[1] in LAYERS:
                edges.add((top, parts[1], rel))
    return edges


def test_every_package_has_a_layer():
    packages = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    packages |= {p.stem for p in SRC.glob("*.py") if p.stem != "__init__"}
    assert packages <= set(LAYERS), f"give {sorted(packages - set(LAYERS))} a layer"


def test_packages_import_only_lower_layers():
    wrong = sorted(f"{rel} imports leanscale.{to} ({frm} is layer {LAYERS[frm]}, {to} is {LAYERS[to]})"
                   for frm, to, rel in _package_edges() if frm in LAYERS and LAYERS[to] >= LAYERS[frm])
    assert wrong == []


def _top_level_imports(path: Path) -> set[str]:
    """Modules imported when ``path`` is imported (module body only, not inside functions)."""
    package = ".".join(("leanscale", *path.relative_to(SRC).with_suffix("").parts[:-1]))
    out = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("leanscale.")}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + [node.module]) if node.level else (node.module or "")
            if module.startswith("leanscale."):
                out.add(module)
    return out


def test_no_import_cycles_between_modules():
    def name(p: Path) -> str:
        parts = p.relative_to(SRC).with_suffix("").parts
        return ".".join(("leanscale", *(parts[:-1] if parts[-1] == "__init__" else parts)))

    graph = {name(p): _top_level_imports(p) for p in SRC.rglob("*.py")}
    # a module importing its own package's __init__ (re-exports) is how packages work: not a cycle
    graph = {m: {d for d in deps if d in graph and not m.startswith(d + ".")} for m, deps in graph.items()}
    assert len(graph) > 100 and graph["leanscale.train.loop"]  # the scan sees the modules and their imports
    assert _cycles(graph) == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle a depth-first search meets (each as the path that closes it)."""
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return cycles


def test_the_cycle_search_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
