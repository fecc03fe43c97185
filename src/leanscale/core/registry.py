"""The registry of techniques: plain data that drives ``leanscale ls``, the README table, the tour
and the conformance test (timm's ``OptimInfo`` / torchtune's recipe registry).

Registration is explicit: the tuple below is the whole list. A technique marked ``available``
must have an importable module, a method card (``README.md`` in its folder), a tour chapter,
a CLI subcommand and committed benchmark results; ``tests/core/test_registry.py`` checks each.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leanscale.core.validation import unknown_name_error

__all__ = ["TechniqueInfo", "list_techniques", "get_technique", "load_object", "markdown_table"]


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
        return Path(__file__).resolve().parent.parent / self.name


_TECHNIQUES: tuple[TechniqueInfo, ...] = (
    TechniqueInfo(
        name="large_batch",
        title="Large batches without the generalization gap",
        module="leanscale.large_batch",
        papers=("Hoffer et al. 2017, arXiv 1705.08741", "McCandlish et al. 2018, arXiv 1812.06162",
                "Keskar et al. 2017, arXiv 1609.04836"),
        status="available",
        cli=("batch",),
        tour_chapter="leanscale.large_batch.tour:chapter",
        headline="leanscale.large_batch.tour:headline",
        benchmarks="large_batch",
        issues=(3,),
    ),
    TechniqueInfo(
        name="pruning",
        title="Data pruning and active learning",
        module="leanscale.pruning",
        papers=("Sorscher et al. 2022, arXiv 2206.14486", "Paul et al. 2021, arXiv 2107.07075",
                "Toneva et al. 2019, arXiv 1812.05159", "Qin et al. 2024, arXiv 2303.04947"),
        status="available",
        cli=("prune", "active"),
        tour_chapter="leanscale.pruning.tour:chapter",
        headline="leanscale.pruning.tour:headline",
        benchmarks="pruning",
        issues=(4,),
    ),
    TechniqueInfo(
        name="scaling",
        title="Compute-optimal scaling (Chinchilla)",
        module="leanscale.scaling",
        papers=("Hoffmann et al. 2022, arXiv 2203.15556", "Besiroglu et al. 2024, arXiv 2404.10102"),
        status="available",
        cli=("plan", "fit", "sweep"),
        tour_chapter="leanscale.scaling.tour:chapter",
        headline="leanscale.scaling.tour:headline",
        benchmarks="scaling",
        issues=(2,),
    ),
    TechniqueInfo(
        name="sparse",
        title="Sparse activation: SWAT and mixture of experts",
        module="leanscale.sparse",
        papers=("Raihan & Aamodt 2020, arXiv 2001.01969", "Fedus et al. 2021, arXiv 2101.03961"),
        status="available",
        cli=("sparse",),
        tour_chapter="leanscale.sparse.tour:chapter",
        headline="leanscale.sparse.tour:headline",
        benchmarks="sparse",
        issues=(5, 6),
    ),
    TechniqueInfo(
        name="cascade",
        title="Filters and simpler models first: cascades and routers",
        module="leanscale.cascade",
        papers=("Wang et al. 2022, Wisdom of Committees", "Chen et al. 2023, FrugalGPT",
                "Ong et al. 2024, RouteLLM"),
        status="available",
        cli=("cascade", "serve"),
        tour_chapter="leanscale.cascade.tour:chapter",
        headline="leanscale.cascade.tour:headline",
        benchmarks="cascade",
        issues=(7,),
    ),
)


def list_techniques(status: str | None = None) -> list[TechniqueInfo]:
    """All registered techniques, optionally only those with ``status``."""
    return [t for t in _TECHNIQUES if status is None or t.status == status]


def get_technique(name: str) -> TechniqueInfo:
    for t in _TECHNIQUES:
        if t.name == name:
            return t
    raise unknown_name_error("name", name, [t.name for t in _TECHNIQUES], owner="get_technique")


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
