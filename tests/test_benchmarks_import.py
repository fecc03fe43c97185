"""Every benchmark script still imports after a refactor (its module level: imports, constants).

The benchmarks themselves run for minutes to hours (``benchmarks/run_all.py``); this catches a
moved or renamed name they use, in one process, in seconds. ``benchmarks/refactor_check.py``
measures that their numbers did not move.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "benchmarks").rglob("*.py") if p.name != "__init__.py")


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_benchmark_script_imports_without_deprecated_names(path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    spec = importlib.util.spec_from_file_location(f"_bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # a benchmark uses no name kept only for one release
        spec.loader.exec_module(module)
    assert hasattr(module, "main") or path.name in {"common.py", "tables.py"} or callable(getattr(module, "run", None))
    sys.modules.pop(spec.name, None)
