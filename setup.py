"""Build hook: ship the benchmark summaries inside the package.

The metadata lives in ``pyproject.toml``; this file only adds one step to ``build_py``.
``leanscale ls`` and the tour read each technique's headline numbers from its benchmark results.
A wheel holds no checkout, so the build copies the summaries (the ``*.json`` and ``*.csv`` at the
top of each ``benchmarks/results/<folder>/``, about 0.6 MB; per-run task files, score arrays and
figures stay in the repository) into ``leanscale/_results/<folder>/``, where
:func:`leanscale.core.registry.results_root` finds them. An editable install (``pip install -e .``)
skips the copy and reads the checkout's ``benchmarks/results/`` directly.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.errors import FileError

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "benchmarks" / "results"
SHIPPED = ("leanscale", "_results")  # inside the built package
SUFFIXES = (".json", ".csv")


def shipped_results(root: Path = RESULTS) -> list[Path]:
    """The summaries a wheel carries: ``root/<folder>/<name>.json|.csv``, sorted."""
    return sorted(p for p in root.glob("*/*") if p.suffix in SUFFIXES and p.is_file())


class BuildPyWithResults(build_py):
    """``build_py`` that also copies the benchmark summaries into ``leanscale/_results/``."""

    def _results_target(self) -> Path:
        return Path(self.build_lib).joinpath(*SHIPPED)

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # the checkout's benchmarks/results/ is found directly
        files = shipped_results()
        if not files:
            raise FileError(
                f"no benchmark summaries (*.json, *.csv) under {RESULTS}: a wheel built without them "
                "would show 'benchmarks not run yet' for every technique. Build from the repository "
                "or from its sdist (MANIFEST.in includes them)."
            )
        target = self._results_target()
        if target.exists():
            shutil.rmtree(target)  # results removed since an earlier build must not linger
        for src in files:
            dest = target / src.relative_to(RESULTS)
            self.mkpath(str(dest.parent))
            self.copy_file(str(src), str(dest), preserve_mode=False)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = list(super().get_outputs(include_bytecode))
        if not getattr(self, "editable_mode", False):
            target = self._results_target()
            outputs += [str(target / src.relative_to(RESULTS)) for src in shipped_results()]
        return outputs


setup(cmdclass={"build_py": BuildPyWithResults})
