"""Figures for reports: matplotlib, imported lazily, drawn with the Agg backend.

matplotlib is optional (``pip install 'leanscale[plots]'``); importing this module does not import
it. Figures are made as :class:`matplotlib.figure.Figure` objects on an Agg canvas rather than
through ``pyplot``: nothing global changes (a notebook keeps its own backend), no window opens on a
machine without a display, and a figure is freed like any other object (no ``plt.close``).

Example:
    >>> fig, ax = new_figure()                                  # doctest: +SKIP
    >>> _ = ax.loglog([1e18, 1e19, 1e20], [3.2, 2.9, 2.7], marker="o")  # doctest: +SKIP
    >>> png = figure_to_png_bytes(fig)                          # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Iterator
from typing import Any

from leanscale.core.errors import MissingDependencyError

__all__ = ["require_matplotlib", "plot_style", "new_figure", "figure_to_png_bytes", "STYLE", "COLORS"]

INSTALL_HINT = "pip install 'leanscale[plots]'"

# One small, quiet style for every figure of the tour and the benchmarks: report figures are
# shown about 600 px wide, so fonts are small and there is no chart junk.
STYLE: dict[str, Any] = {
    "font.size": 8.5,
    "axes.titlesize": 9.5,
    "axes.labelsize": 8.5,
    "xtick.labelsize": 7.5,
    "ytick.labelsize": 7.5,
    "legend.fontsize": 7.5,
    "legend.frameon": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "lines.linewidth": 1.6,
    "lines.markersize": 4.5,
    "figure.dpi": 110,
    "savefig.dpi": 110,
}

# Colour-blind-safe (Okabe-Ito); the first is "ours", the second "the paper".
COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")


def require_matplotlib():
    """Import matplotlib or raise :class:`MissingDependencyError` saying how to install it."""
    try:
        import matplotlib
    except ImportError as exc:
        raise MissingDependencyError(
            f"Figures and HTML reports with figures need matplotlib, which is not installed "
            f"({exc}). Install it with: {INSTALL_HINT}"
        ) from None
    return matplotlib


@contextlib.contextmanager
def plot_style() -> Iterator[None]:
    """Apply :data:`STYLE` (and the colour cycle) inside a ``with`` block.

    Text sizes are fixed when an artist is created, so draw legends and annotations inside this
    block when they should follow the style; :func:`new_figure` already uses it for the axes.
    """
    matplotlib = require_matplotlib()
    from cycler import cycler

    with matplotlib.rc_context({**STYLE, "axes.prop_cycle": cycler(color=COLORS)}):
        yield


def new_figure(nrows: int = 1, ncols: int = 1, *, width: float = 5.0, height: float = 3.2, **subplot_kw):
    """A new figure in the leanscale style on an Agg canvas.

    Args:
        nrows, ncols: grid of axes (as in ``Figure.subplots``).
        width, height: size in inches (at 110 dpi, 5 x 3.2 in is 550 x 352 px).
        **subplot_kw: passed to ``Figure.subplots`` (``sharex``, ``sharey``, ``squeeze``, ...).

    Returns:
        ``(fig, axes)``: a :class:`matplotlib.figure.Figure` and one Axes (or an array of them).

    Raises:
        MissingDependencyError: matplotlib is not installed.
    """
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with plot_style():
        fig = Figure(figsize=(width, height), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(nrows, ncols, **subplot_kw)
    return fig, axes


def figure_to_png_bytes(fig, dpi: int = 110) -> bytes:
    """Render a matplotlib figure to PNG bytes (and close it when it belongs to ``pyplot``).

    Args:
        fig: a :class:`matplotlib.figure.Figure` (from :func:`new_figure` or ``pyplot``).
        dpi: resolution; 110 makes a 5-inch figure 550 px wide.

    Returns:
        The PNG file as bytes.
    """
    require_matplotlib()
    buf = io.BytesIO()
    # No "Software" entry: the file does not change with the matplotlib version.
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    if "matplotlib.pyplot" in sys.modules:
        import matplotlib.pyplot as plt

        if plt.fignum_exists(getattr(fig, "number", -1)):
            plt.close(fig)
    return buf.getvalue()
