"""Reports: terminal tables, self-contained HTML pages, figures and the tour's chapter types.

``format_number`` decides how every number is shown, in the terminal and in HTML alike.
matplotlib is imported only when a figure is made (``pip install 'leanscale[plots]'``).
:func:`ledger_figure` draws a cost ledger: each technique's cost next to its baseline's.
A technique's tour chapter takes a :class:`TourContext` and returns a :class:`ChapterResult`
(:mod:`leanscale.report.chapter`); :mod:`leanscale.tour` runs the chapters.
"""

from leanscale.report.chapter import ChapterOutcome, ChapterResult, TourContext, TourResult
from leanscale.report.costs import ledger_comparisons, ledger_figure
from leanscale.report.figures import figure_to_png_bytes, new_figure, plot_style
from leanscale.report.html import HTMLReport, RawHTML
from leanscale.report.table import format_number, format_table

__all__ = [
    "HTMLReport",
    "RawHTML",
    "format_number",
    "format_table",
    "new_figure",
    "figure_to_png_bytes",
    "plot_style",
    "TourContext",
    "ChapterResult",
    "ChapterOutcome",
    "TourResult",
    "ledger_figure",
    "ledger_comparisons",
]
