"""The leanscale tour: every technique's chapter, run in registry order, in one HTML report.

``make tour`` runs ``leanscale tour``, which calls :func:`run_tour`. For each registered technique
with a ``tour_chapter`` (``"module:function"``), the tour calls ``chapter(ctx)`` with a
:class:`TourContext`; the chapter adds its text, tables and figures to ``ctx.report`` and returns
a :class:`ChapterResult` whose ``summary_rows`` (``metric`` / ``value`` / ``paper``: our measured
number next to the paper's) end up in the terminal summary and in ``summary.json``. Planned
techniques appear as "planned (issue #N)". A chapter that raises is reported as failed, with its
message, and the tour goes on; :attr:`TourResult.failed` lists it and the CLI exits with 1.

Output, written atomically under ``out_dir``: ``index.html`` (self-contained, figures embedded),
``summary.json`` and, when chapters recorded costs in ``ctx.ledger``, ``ledger.json`` and, when
rows pair a technique with its baseline (metadata ``compare`` / ``side``, see
:mod:`leanscale.report.costs`), ``ledger.png`` (each technique's cost next to its baseline's); a chapter
may keep files in ``ctx.chapter_dir`` (``out_dir/<name>/``).

A chapter is a function ``chapter(ctx: TourContext) -> ChapterResult`` (an example is in
:mod:`leanscale.report.chapter`). The tour already writes the technique's ``<h2>`` heading, its
papers, the summary table and the time taken; use ``ctx.report.add_section(..., level=3)`` for
subsections.

This module only runs the tour. The chapter types (:class:`TourContext`, :class:`ChapterResult`,
:class:`ChapterOutcome`, :class:`TourResult`) live in :mod:`leanscale.report.chapter` and
:func:`status_label` in :mod:`leanscale.core.registry`; a chapter imports them from there (a
technique never imports this module, which loads the chapters). They stay importable from here.
"""

from __future__ import annotations

import functools
import os
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from leanscale import __version__
from leanscale.core.errors import InvalidParameterError
from leanscale.core.io import atomic_write_json
from leanscale.core.progress import progress as _progress
from leanscale.core.registry import (
    TechniqueInfo,
    list_techniques,
    load_object,
    status_label,
)
from leanscale.core.validation import Interval, check_param, unknown_name_error
from leanscale.report.chapter import (
    ChapterOutcome,
    ChapterResult,
    TourContext,
    TourResult,
)
from leanscale.report.html import HTMLReport
from leanscale.report.table import format_table

__all__ = ["TourContext", "ChapterResult", "ChapterOutcome", "TourResult", "run_tour", "status_label"]


def _new_ledger() -> Any:
    """A fresh ``CostLedger`` when :mod:`leanscale.core.ledger` exists, else None."""
    try:
        from leanscale.core import ledger
    except ModuleNotFoundError as exc:
        if exc.name == "leanscale.core.ledger":
            return None
        raise
    return ledger.CostLedger()


def _select(techniques: Sequence[TechniqueInfo], chapters: Sequence[str] | str | None) -> list[TechniqueInfo]:
    if chapters is None:
        return list(techniques)
    if isinstance(chapters, str):
        chapters = [chapters]
    valid = [t.name for t in techniques]
    for name in chapters:
        if name not in valid:
            raise unknown_name_error("chapters", name, valid, owner="run_tour")
    wanted = set(chapters)
    return [t for t in techniques if t.name in wanted]


def _round(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 2)


def _say(echo: bool, message: str) -> None:
    if echo:
        print(message, file=sys.stderr, flush=True)


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its children that have been waited for
    (the scaling chapter trains in worker processes)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _run_chapter(technique: TechniqueInfo, ctx: TourContext) -> ChapterOutcome:
    base = dict(name=technique.name, papers=tuple(technique.papers), issues=tuple(technique.issues))
    start = time.perf_counter()
    cpu_start = _cpu_seconds()
    try:
        chapter = load_object(technique.tour_chapter)  # type: ignore[arg-type]
        result = chapter(ctx)
        if not isinstance(result, ChapterResult):
            raise TypeError(
                f"tour chapter {technique.tour_chapter} must return a ChapterResult, "
                f"got {type(result).__name__}"
            )
    except Exception as exc:  # noqa: BLE001 - a failed chapter must not stop the tour
        seconds = time.perf_counter() - start
        error = f"{type(exc).__name__}: {exc}"
        return ChapterOutcome(title=technique.title, status="failed", label="failed", seconds=seconds,
                              cpu_seconds=_cpu_seconds() - cpu_start, error=error,
                              traceback=traceback.format_exc(), **base)
    seconds = time.perf_counter() - start
    result.seconds = seconds
    rows = [dict(r) for r in result.summary_rows]
    return ChapterOutcome(title=result.title, status="ok", label="ok", seconds=seconds,
                          cpu_seconds=_cpu_seconds() - cpu_start, summary_rows=rows, **base)


def _terminal_summary(result: TourResult) -> str:
    overview = [
        {"technique": c.name, "status": c.label, "seconds": _round(c.seconds), "note": c.error or c.title}
        for c in result.chapters
    ]
    parts = [format_table(overview, ["technique", "status", "seconds", "note"],
                          title=f"leanscale tour ({'quick' if result.quick else 'full'}, seed {result.seed})",
                          max_width=90)]
    metrics = [{"technique": c.name, **row} for c in result.chapters for row in c.summary_rows]
    if metrics:
        parts.append(format_table(metrics, title="Results: ours next to the paper", max_width=60))
    if result.ledger_json is not None:
        parts.append("Cost ledger (every chapter, one bill)\n" + result.ledger.summary_table()
                     + (f"\nEach technique next to its baseline: {result.ledger_png}" if result.ledger_png else ""))
    parts.append(f"Report: {result.index_html}  ({result.seconds:.1f} s in all)")
    if result.failed:
        parts.append(f"FAILED: {', '.join(c.name for c in result.failed)} (see the report for the traceback)")
    return "\n\n".join(parts)


def _build_report(result: TourResult, body: HTMLReport) -> HTMLReport:
    mode = "quick" if result.quick else "full"
    report = HTMLReport(
        "leanscale tour",
        subtitle=f"leanscale {__version__} · {mode} run · seed {result.seed} · {result.seconds:.1f} s",
    )
    report.add_paragraph(
        "Each chapter runs one technique on built-in data and puts our measured numbers next to "
        "the paper's. Planned techniques are listed with the issue that tracks them."
    )
    report.add_section("Overview")
    report.add_table(
        [{"technique": c.name, "title": c.title, "status": c.label, "seconds": _round(c.seconds),
          "note": c.error or ""} for c in result.chapters],
        columns=["technique", "title", "status", "seconds", "note"],
    )
    metrics = [{"technique": c.name, **row} for c in result.chapters for row in c.summary_rows]
    if metrics:
        report.add_table(metrics, caption="Results: ours next to the paper")
    report.extend(body)
    if result.ledger_json is not None:
        report.add_section("Cost ledger")
        report.add_paragraph(
            "What every chapter spent, on one bill: FLOPs, wall seconds, peak memory and examples "
            f"(entries in {result.ledger_json.name}). Peak memory is the largest increase of the "
            "process's resident memory over its value when the block started, sampled from "
            "/proc/self/statm (worker processes included for the scaling sweep; the CUDA allocator's "
            "peak on a GPU): memory the process had already mapped and reuses does not count again."
        )
        report.add_preformatted(result.ledger.summary_table())
        if result.ledger_png is not None:
            report.add_figure(result.ledger_png.read_bytes(), caption=(
                "Each technique's cost next to its baseline's (log scale; the multiple is the technique's "
                f"cost over the baseline's; {result.ledger_png.name}). Rows without a baseline (the scaling "
                "sweep, the gateway replay) are in the table only."))
        elif result.ledger_figure_note:
            report.add_note(result.ledger_figure_note, kind="planned")
    return report


def _ledger_figure(result: TourResult) -> None:
    """``out_dir/ledger.png`` beside ``ledger.json`` when the ledger pairs a technique with its
    baseline; without matplotlib, a note says why there is no figure."""
    from leanscale.core.errors import MissingDependencyError
    from leanscale.report.costs import ledger_comparisons, ledger_figure

    try:
        if not hasattr(result.ledger, "to_rows") or not ledger_comparisons(result.ledger):
            return
        ledger_figure(result.ledger, result.out_dir / "ledger.png")
        result.ledger_png = result.out_dir / "ledger.png"
    except (MissingDependencyError, InvalidParameterError) as exc:  # no matplotlib; a malformed row
        result.ledger_figure_note = f"No figure of the cost ledger: {exc}"


BUSY_LOAD_PER_CORE = 0.5  # a 1-minute load average above this many per core at the start: say so


def _load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def run_tour(
    out_dir: str | Path = "tour-report",
    quick: bool = False,
    chapters: Sequence[str] | str | None = None,
    seed: int = 0,
    *,
    techniques: Sequence[TechniqueInfo] | None = None,
    ledger: Any = None,
    echo: bool = True,
) -> TourResult:
    """Run the tour and write ``out_dir/index.html`` and ``out_dir/summary.json``.

    Args:
        out_dir: output folder (created).
        quick: run each chapter's short version.
        chapters: technique names to run (default: all, in registry order).
        seed: passed to every chapter as ``ctx.seed``.
        techniques: the techniques to tour (default: :func:`~leanscale.core.registry.list_techniques`);
            tests pass their own.
        ledger: the cost ledger chapters record into (default: a new
            :class:`~leanscale.core.ledger.CostLedger`). When it has entries after the tour it is
            saved as ``out_dir/ledger.json`` and summarised in the report, and its comparisons
            drawn in ``out_dir/ledger.png`` (:func:`~leanscale.report.costs.ledger_figure`).
        echo: print progress to stderr and the summary tables to stdout.

    Returns:
        A :class:`TourResult`; ``result.failed`` lists chapters that raised.

    Raises:
        InvalidParameterError: an unknown chapter name (the valid ones are listed), a bad seed,
            or ``out_dir`` is an existing file.
    """
    check_param("quick", quick, [bool], owner="run_tour")
    check_param("seed", seed, [Interval(int, 0, None)], owner="run_tour")
    techniques = list(list_techniques() if techniques is None else techniques)
    selected = _select(techniques, chapters)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InvalidParameterError(
            f"The 'out_dir' parameter of run_tour must be a folder. {str(out)!r} is an existing file."
        )
    out.mkdir(parents=True, exist_ok=True)

    body = HTMLReport("chapters")
    if ledger is None:
        ledger = _new_ledger()
    ctx = TourContext(out_dir=out, quick=quick, seed=seed, report=body, ledger=ledger,
                      progress=_progress if echo else functools.partial(_progress, disable=True),
                      echo=echo)
    outcomes: list[ChapterOutcome] = []
    load_start = _load_average()
    if load_start is not None and load_start >= BUSY_LOAD_PER_CORE * (os.cpu_count() or 1):
        _say(echo, f"note: the machine is busy (load average {load_start:.1f} on {os.cpu_count()} cores): the "
                   "chapters' seconds will be longer than the tour's own (torch's threads wait for each other "
                   "on shared cores), and summary.json records it")
    start = time.perf_counter()
    interrupted: KeyboardInterrupt | None = None
    for i, t in enumerate(selected, 1):
        body.add_section(t.title)
        if t.papers:
            body.add_paragraph("Papers: " + "; ".join(t.papers))
        base = dict(name=t.name, title=t.title, papers=tuple(t.papers), issues=tuple(t.issues))
        if interrupted is not None:
            outcomes.append(ChapterOutcome(status="interrupted", label="interrupted", **base))
            body.add_note("Not run: the tour was interrupted.", kind="failed")
            continue
        if t.status != "available":
            label = status_label(t)
            outcomes.append(ChapterOutcome(status="planned", label=label, **base))
            body.add_note(f"{label}: not implemented yet.", kind="planned")
            continue
        if not t.tour_chapter:
            outcomes.append(ChapterOutcome(status="skipped", label="no tour chapter", **base))
            body.add_note("This technique has no tour chapter yet.", kind="planned")
            continue
        _say(echo, f"[tour {i}/{len(selected)}] {t.name}: running{' (quick)' if quick else ''}...")
        try:
            outcome = _run_chapter(t, replace(ctx, technique=t))
        except KeyboardInterrupt as exc:  # keep what ran; write the report, then stop
            interrupted = exc
            outcomes.append(ChapterOutcome(status="interrupted", label="interrupted", **base))
            body.add_note("Interrupted while running.", kind="failed")
            continue
        outcomes.append(outcome)
        if outcome.status == "ok":
            _say(echo, f"[tour {i}/{len(selected)}] {t.name}: ok in {outcome.seconds:.1f} s "
                       f"({outcome.cpu_seconds:.1f} s CPU)")
            if outcome.summary_rows:
                body.add_table(outcome.summary_rows, caption="Summary: ours next to the paper")
            body.add_note(f"Chapter ran in {outcome.seconds:.1f} s.", kind="ok")
        else:
            _say(echo, f"[tour {i}/{len(selected)}] {t.name}: FAILED after {outcome.seconds:.1f} s: {outcome.error}")
            body.add_note(f"This chapter failed: {outcome.error}", kind="failed")
            body.add_details("Traceback", outcome.traceback or "")

    result = TourResult(
        out_dir=out, index_html=out / "index.html", summary_json=out / "summary.json",
        chapters=outcomes, seconds=time.perf_counter() - start, quick=quick, seed=seed, ledger=ledger,
        load_average=(load_start, _load_average()),
    )
    if ledger is not None and len(ledger):
        result.ledger_json = ledger.save(out / "ledger.json")
        _ledger_figure(result)
    _build_report(result, body).write(result.index_html)
    atomic_write_json(result.summary_json, result.to_dict())
    if interrupted is not None:
        raise interrupted
    if echo:
        print(_terminal_summary(result), flush=True)
    return result
