"""The registry of techniques: plain data that drives ``leanscale ls``, the README table, the tour
and the conformance test (timm's ``OptimInfo`` / torchtune's recipe registry).

Registration is explicit: the tuple below is the whole list. A technique marked ``available``
must have an importable module, a method card (``README.md`` in its folder), a tour chapter,
a CLI subcommand and committed benchmark results; ``tests/core/test_registry.py`` checks each.

Benchmark results are found here too (:func:`results_root`, :func:`results_dir`,
:attr:`TechniqueInfo.results`, :func:`read_result`), so no module needs to know where the repository keeps them:
an installed wheel carries the summaries in ``leanscale/_results/`` (copied there at build time by
``setup.py``); a checkout (editable install) reads ``benchmarks/results/`` directly.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leanscale.core.errors import InvalidParameterError
from leanscale.core.io import read_json
from leanscale.core.validation import unknown_name_error

__all__ = [
    "TechniqueInfo",
    "list_techniques",
    "get_technique",
    "load_object",
    "markdown_table",
    "read_result",
    "results_dir",
    "results_root",
    "status_label",
]

_PACKAGE = Path(__file__).resolve().parent.parent  # src/leanscale in a checkout, .../site-packages/leanscale
# A wheel ships the benchmark summaries inside the package (setup.py copies them at build time).
_SHIPPED_RESULTS = _PACKAGE / "_results"
# A checkout keeps them beside src/: <checkout>/src/leanscale -> <checkout>/benchmarks/results.
_CHECKOUT = _PACKAGE.parent.parent
_CHECKOUT_RESULTS = _CHECKOUT / "benchmarks" / "results"


@dataclass(frozen=True)
class TechniqueInfo:
    """One technique of leanscale."""

    name: str  # short id, also the folder under src/leanscale/
    title: str  # human title
    module: str  # import path of the package
    papers: tuple[str, ...]  # "Author et al. YEAR, arXiv ID"
    status: str  # "available" or "planned"
    cli: tuple[str, ...] = ()  # subcommands of `leanscale`
    tour_chapter: str | None = None  # "module:function" of its tour chapter
    headline: str | None = None  # "module:function" -> one line from benchmarks/results
    benchmarks: str | None = None  # folder under benchmarks/results/
    issues: tuple[int, ...] = field(default=())

    @property
    def folder(self) -> Path:
        return _PACKAGE / self.name

    @property
    def results(self) -> Path | None:
        """The folder of its benchmark results (see :func:`results_dir`); None without ``benchmarks``."""
        return results_dir(self.benchmarks) if self.benchmarks else None


def _available(name: str, title: str, papers: tuple[str, ...], cli: tuple[str, ...],
               issues: tuple[int, ...]) -> TechniqueInfo:
    """An available technique laid out as every one is: package ``leanscale.<name>``, tour chapter
    and headline in its ``tour.py``, benchmark results in the folder ``<name>``."""
    return TechniqueInfo(name=name, title=title, module=f"leanscale.{name}", papers=papers, status="available",
                         cli=cli, tour_chapter=f"leanscale.{name}.tour:chapter",
                         headline=f"leanscale.{name}.tour:headline", benchmarks=name, issues=issues)


_TECHNIQUES: tuple[TechniqueInfo, ...] = (
    _available("large_batch", "Large batches without the generalization gap",
               ("Hoffer et al. 2017, arXiv 1705.08741", "McCandlish et al. 2018, arXiv 1812.06162",
                "Keskar et al. 2017, arXiv 1609.04836"), cli=("batch",), issues=(3,)),
    _available("pruning", "Data pruning and active learning",
               ("Sorscher et al. 2022, arXiv 2206.14486", "Paul et al. 2021, arXiv 2107.07075",
                "Toneva et al. 2019, arXiv 1812.05159", "Qin et al. 2024, arXiv 2303.04947"),
               cli=("prune", "active"), issues=(4,)),
    _available("scaling", "Compute-optimal scaling (Chinchilla)",
               ("Hoffmann et al. 2022, arXiv 2203.15556", "Besiroglu et al. 2024, arXiv 2404.10102"),
               cli=("plan", "fit", "sweep"), issues=(2,)),
    _available("sparse", "Sparse activation: SWAT and mixture of experts",
               ("Raihan & Aamodt 2020, arXiv 2001.01969", "Fedus et al. 2021, arXiv 2101.03961"),
               cli=("sparse",), issues=(5, 6)),
    _available("cascade", "Filters and simpler models first: cascades and routers",
               ("Wang et al. 2022, Wisdom of Committees", "Chen et al. 2023, FrugalGPT", "Ong et al. 2024, RouteLLM"),
               cli=("cascade", "serve"), issues=(7,)),
)


def list_techniques(status: str | None = None) -> list[TechniqueInfo]:
    """All registered techniques, optionally only those with ``status``."""
    return [t for t in _TECHNIQUES if status is None or t.status == status]


def get_technique(name: str) -> TechniqueInfo:
    for t in _TECHNIQUES:
        if t.name == name:
            return t
    raise unknown_name_error("name", name, [t.name for t in _TECHNIQUES], owner="get_technique")


def status_label(technique: TechniqueInfo) -> str:
    """``available``, or ``planned (issue #3)`` / ``planned (issue #5, #6)``."""
    if technique.status == "planned" and technique.issues:
        return f"planned (issue {', '.join(f'#{i}' for i in technique.issues)})"
    return technique.status


def results_root() -> Path:
    """The folder holding every technique's benchmark results, one subfolder each.

    The copy shipped inside the installed package (``leanscale/_results/``) when there is one, else
    the checkout's ``benchmarks/results/`` (an editable install, or ``src/`` on the path). When
    neither exists (a wheel built without results) the shipped location is returned: it does not
    exist, and every headline then says the benchmarks were not run.
    """
    if _SHIPPED_RESULTS.is_dir():
        return _SHIPPED_RESULTS
    if _PACKAGE.parent.name == "src" and (_CHECKOUT / "pyproject.toml").is_file() and _CHECKOUT_RESULTS.is_dir():
        return _CHECKOUT_RESULTS
    return _SHIPPED_RESULTS


def results_dir(name: str) -> Path:
    """``results_root() / name``: the results of one benchmark folder (``"pruning"``, ``"moe"``, ...).

    Raises:
        InvalidParameterError: ``name`` is not one plain folder name.
    """
    if not isinstance(name, str) or not name or name in (".", "..") or Path(name).name != name or "\\" in name:
        raise InvalidParameterError(
            f"The 'name' parameter of results_dir must be one folder name such as 'pruning'. Got {name!r} instead."
        )
    return results_root() / name


def read_result(folder: str, filename: str, results_root: str | Path | None = None) -> Any:
    """The parsed JSON benchmark result ``folder/filename``; None when it was not written.

    Read from ``results_root / folder`` when ``results_root`` is given (a headline for the README
    from a results folder of one's own), else from :func:`results_dir` ``(folder)``.

    Raises:
        InvalidParameterError: ``folder`` is not one plain folder name.
        DataFormatError: the file is there but is not JSON (truncated or damaged).
    """
    own = results_dir(folder)  # checks the name
    path = (Path(results_root) / folder if results_root else own) / filename
    return read_json(path) if path.is_file() else None


def load_object(spec: str) -> Callable[..., Any]:
    """Import ``"package.module:attr"``."""
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def markdown_table(results_root: str | Path | None = None) -> str:
    """The README's technique table, with each available technique's headline from its results."""
    lines = ["| technique | status | papers | headline (benchmarks/results) |", "|---|---|---|---|"]
    for t in _TECHNIQUES:
        headline = "—"
        if t.headline and t.status == "available":
            headline = load_object(t.headline)(results_root)
        lines.append(f"| `{t.name}`: {t.title} | {t.status} | {'; '.join(t.papers)} | {headline} |")
    return "\n".join(lines)
