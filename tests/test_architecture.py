"""Dependencies point inward (an AST scan of every import in src/leanscale, lazy ones included).

- ``core`` imports nothing of leanscale outside ``core``;
- a technique (``large_batch``, ``pruning``, ``scaling``, ``sparse``, ``cascade``) imports no other
  technique.

The imports that break the second rule today are listed in ``KNOWN`` (issue #14 removes them): the
test fails on any new one, and on a listed one that is gone, so the list only shrinks.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "leanscale"
TECHNIQUES = ("large_batch", "pruning", "scaling", "sparse", "cascade")

# (importing file relative to src/leanscale, imported module): to be removed by #14
KNOWN = {
    ("cascade/text_models.py", "leanscale.pruning.embed"),
    ("cascade/stacking.py", "leanscale.pruning.embed"),
    ("cascade/router.py", "leanscale.pruning.embed"),
    ("cascade/tour.py", "leanscale.pruning.datasets"),
}


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
