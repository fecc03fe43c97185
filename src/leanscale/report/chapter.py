"""The tour's chapter types: what a chapter gets (:class:`TourContext`) and returns
(:class:`ChapterResult`), and what the tour reports (:class:`ChapterOutcome`, :class:`TourResult`).

They live here, below the techniques, so a technique's ``tour.py`` imports ``leanscale.report``
and never the tour runner (:mod:`leanscale.tour`) that loads the chapters. A chapter looks like::

    from leanscale.report.chapter import ChapterResult, TourContext

    def chapter(ctx: TourContext) -> ChapterResult:
        ctx.report.add_paragraph("What this chapter shows and why.")
        for n in ctx.progress(sizes, desc="scaling: fits"):
            ...
        ctx.report.add_figure(fig, caption="Loss against compute")
        return ChapterResult(
            title="Compute-optimal scaling",
            summary_rows=[{"metric": "tokens per parameter", "value": 19.6, "paper": 20.0}],
        )
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leanscale import __version__
from leanscale.core.progress import progress as _progress
from leanscale.core.registry import TechniqueInfo
from leanscale.report.html import HTMLReport

__all__ = ["TourContext", "ChapterResult", "ChapterOutcome", "TourResult"]


@dataclass
class TourContext:
    """What a chapter gets: where to write, how long to run, the shared report and ledger."""

    out_dir: Path  # the tour's output folder
    quick: bool  # True: a short version (CI, `--quick`): fewer sizes, fewer steps
    seed: int  # seed every random generator of the chapter from this
    report: HTMLReport  # add the chapter's text, tables and figures here
    ledger: Any = None  # leanscale.core.ledger.CostLedger shared by all chapters (None if absent)
    progress: Callable[..., Any] = _progress  # progress(iterable, total=, desc=) -> bar
    technique: TechniqueInfo | None = None  # the technique whose chapter is running
    echo: bool = True  # False: chapters stay quiet (ctx.log prints nothing)

    @property
    def chapter_dir(self) -> Path:
        """``out_dir/<technique name>/``, created on first use, for the chapter's own files."""
        name = self.technique.name if self.technique is not None else "chapter"
        path = self.out_dir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def log(self, message: str) -> None:
        """One line on stderr, prefixed with the technique's name."""
        if self.echo:
            name = self.technique.name if self.technique is not None else "tour"
            print(f"  [{name}] {message}", file=sys.stderr, flush=True)


@dataclass
class ChapterResult:
    """What a chapter returns. Its HTML is already in ``ctx.report``."""

    title: str  # the chapter's title, for the summary
    summary_rows: list[dict[str, Any]] = field(default_factory=list)  # metric / value / paper
    seconds: float | None = None  # filled in by the tour: wall time of the chapter


@dataclass
class ChapterOutcome:
    """One technique in the tour summary."""

    name: str  # technique name
    title: str  # chapter title (the technique's title when the chapter did not run)
    status: str  # "ok", "failed", "planned", "skipped" (no chapter) or "interrupted"
    label: str  # shown to people: "ok", "failed", "planned (issue #3)", ...
    seconds: float | None = None
    summary_rows: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None  # "ValueError: ..." when the chapter failed
    cpu_seconds: float | None = None  # user + system CPU of this process and its finished children
    traceback: str | None = None
    papers: tuple[str, ...] = ()
    issues: tuple[int, ...] = ()


@dataclass
class TourResult:
    """What :func:`run_tour` returns."""

    out_dir: Path
    index_html: Path
    summary_json: Path
    chapters: list[ChapterOutcome]
    seconds: float  # wall time of the whole tour
    quick: bool
    seed: int
    ledger: Any = None  # the CostLedger every chapter recorded into (None without core.ledger)
    ledger_json: Path | None = None  # out_dir/ledger.json, written when the ledger has entries
    ledger_png: Path | None = None  # out_dir/ledger.png: each technique's cost next to its baseline's
    ledger_figure_note: str | None = None  # why there is no ledger.png (e.g. matplotlib missing)
    # 1-minute load averages at the start and the end (None where the OS has none): above ~1 on a
    # 2-core machine other work shared the cores, and the seconds are not the tour's own
    load_average: tuple[float | None, float | None] = (None, None)

    @property
    def failed(self) -> list[ChapterOutcome]:
        return [c for c in self.chapters if c.status in ("failed", "interrupted")]

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict[str, Any]:
        return {
            "leanscale_version": __version__,
            "quick": self.quick,
            "seed": self.seed,
            "seconds": self.seconds,
            "load_average": {"start": self.load_average[0], "end": self.load_average[1]},
            "failed": [c.name for c in self.failed],
            "ledger": self.ledger_json.name if self.ledger_json is not None else None,
            "ledger_figure": self.ledger_png.name if self.ledger_png is not None else None,
            "chapters": [
                {
                    "name": c.name,
                    "title": c.title,
                    "status": c.status,
                    "label": c.label,
                    "seconds": c.seconds,
                    "cpu_seconds": c.cpu_seconds,
                    "summary_rows": c.summary_rows,
                    "error": c.error,
                    "traceback": c.traceback,
                    "papers": list(c.papers),
                    "issues": list(c.issues),
                }
                for c in self.chapters
            ],
        }
