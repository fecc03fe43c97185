"""Files are untrusted input: no loader in the library, the benchmarks or the examples may unpickle.

An AST scan (not a text grep, so comments and strings do not count): every ``torch.load`` passes
``weights_only=True``, every ``np.load`` passes ``allow_pickle=False``, and nothing imports
``pickle``, ``marshal``, ``shelve``, ``dill`` or ``cloudpickle``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for folder in ("src", "benchmarks", "examples") for p in (ROOT / folder).rglob("*.py"))
UNSAFE_MODULES = {"pickle", "marshal", "shelve", "dill", "cloudpickle", "joblib"}


def _keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)


def _problems(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [f"line {node.lineno}: import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            out.append(f"line {node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
            owner = node.func.value
            owner_name = owner.id if isinstance(owner, ast.Name) else None
            if owner_name == "torch" and not _keyword_is(node, "weights_only", True):
                out.append(f"line {node.lineno}: torch.load without weights_only=True")
            if owner_name in ("np", "numpy") and not _keyword_is(node, "allow_pickle", False):
                out.append(f"line {node.lineno}: np.load without allow_pickle=False")
    return out


def test_the_scan_sees_the_sources():
    assert len(SOURCES) > 100  # src, benchmarks and examples are all there


def test_the_scan_catches_unsafe_loads(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle\nimport torch, numpy as np\ntorch.load('a')\nnp.load('b')\n"
                   "torch.load('c', weights_only=False)\nnp.load('d', allow_pickle=False)\n")
    assert _problems(bad) == ["line 1: import pickle", "line 3: torch.load without weights_only=True",
                              "line 4: np.load without allow_pickle=False",
                              "line 5: torch.load without weights_only=True"]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_unsafe_load(path):
    assert _problems(path) == []
