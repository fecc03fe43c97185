"""Figures: lazy matplotlib, Agg canvas, PNG bytes (leanscale.report.figures)."""

import subprocess
import sys

import pytest

from leanscale.core.errors import MissingDependencyError
from leanscale.report import figures


def test_importing_reports_does_not_import_matplotlib():
    code = "import sys, leanscale.report, leanscale.tour; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(MissingDependencyError, match=r"pip install 'leanscale\[plots\]'"):
        figures.new_figure()
    with pytest.raises(ImportError):  # MissingDependencyError is also an ImportError
        figures.figure_to_png_bytes(object())


def test_new_figure_and_png_bytes():
    pytest.importorskip("matplotlib")
    fig, axes = figures.new_figure(1, 2, width=4, height=2)
    assert axes.shape == (2,)
    axes[0].plot([1, 2], [2, 1], label="ours")
    axes[0].legend()
    png = figures.figure_to_png_bytes(fig, dpi=50)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    # 4 x 2 inches at 50 dpi: the PNG header holds width and height
    width = int.from_bytes(png[16:20], "big")
    height = int.from_bytes(png[20:24], "big")
    assert (width, height) == (200, 100)


def test_style_is_applied_to_new_axes():
    pytest.importorskip("matplotlib")
    _, ax = figures.new_figure()
    assert not ax.spines["top"].get_visible()
    assert ax.xaxis.label.get_fontsize() == pytest.approx(figures.STYLE["axes.labelsize"])


def test_pyplot_figures_are_closed_after_rendering():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure()
    figures.figure_to_png_bytes(fig, dpi=30)
    assert not plt.fignum_exists(fig.number)
