"""The cost ledger as a figure: each technique's cost next to its baseline's.

The rows of a :class:`~leanscale.core.ledger.CostLedger` say what every block of work cost (FLOPs,
seconds, peak memory). Two metadata keys pair them up for a comparison:

* ``compare``: the comparison's label (a str, or a list of labels when one row belongs to several),
  e.g. ``"pruning: EL2N, keep 50%"``;
* ``side``: ``"baseline"`` (what the technique is measured against: the dense model, the full
  data set, the small batch, the big model alone) or ``"technique"``.

Rows of one comparison and side are summed (FLOPs and seconds add up, peak memory is the largest
peak, as in :meth:`~leanscale.core.ledger.CostLedger.total`): the data pruner's bill is its
scoring plus the training on the kept examples. :func:`ledger_comparisons` does the pairing,
:func:`ledger_figure` draws one panel per quantity with one pair of bars per comparison
(baseline grey, technique blue, the ratio written beside it). matplotlib is imported only here
(``pip install 'leanscale[plots]'``).

Example:
    >>> rows = [{"name": "dense", "flops": 4e12, "seconds": 60.0, "compare": "SWAT", "side": "baseline"},
    ...         {"name": "swat", "flops": 1e12, "seconds": 90.0, "compare": "SWAT", "side": "technique"}]
    >>> c = ledger_comparisons(rows)[0]
    >>> c["label"], c["technique"]["flops"] / c["baseline"]["flops"]
    ('SWAT', 0.25)
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from leanscale.core.errors import InvalidParameterError

__all__ = ["ledger_comparisons", "ledger_figure", "LEDGER_QUANTITIES"]

# (row key, panel title, unit scale, unit): the quantities drawn, one panel each
LEDGER_QUANTITIES = (
    ("flops", "FLOPs", 1.0, ""),
    ("seconds", "wall seconds", 1.0, "s"),
    ("peak_memory_bytes", "peak memory increase", 2.0 ** 20, "MiB"),
)
_SIDES = ("baseline", "technique")


def _flat_rows(rows: Any) -> list[dict[str, Any]]:
    if hasattr(rows, "to_rows"):  # a CostLedger
        rows = rows.to_rows()
    if isinstance(rows, (str, bytes, Mapping)) or not isinstance(rows, Iterable):
        raise InvalidParameterError(
            "The 'rows' parameter of ledger_comparisons must be a CostLedger or a list of ledger rows "
            f"(dicts). Got {type(rows).__name__}."
        )
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise InvalidParameterError(
                f"The 'rows' parameter of ledger_comparisons must hold dicts. Row {i} is {type(row).__name__}."
            )
        flat = {k: v for k, v in row.items() if k != "meta"}
        flat.update(row.get("meta") or {})  # a saved entry keeps its metadata under "meta"
        out.append(flat)
    return out


def _add(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else a + b


def ledger_comparisons(rows: Any) -> list[dict[str, Any]]:
    """Pair the ledger's rows into comparisons, in order of first appearance.

    Args:
        rows: a :class:`~leanscale.core.ledger.CostLedger`, or its rows (``to_rows()``, or the
            ``entries`` of a saved ledger file): dicts with ``name``, ``flops``, ``seconds``,
            ``peak_memory_bytes`` and the metadata ``compare`` / ``side``. Rows without
            ``compare`` are left out.

    Returns:
        One dict per comparison with both sides: ``{"label", "baseline", "technique"}``, each side
        ``{"names": [...], "flops", "seconds", "peak_memory_bytes"}`` (None where no row of that
        side knows the quantity). A comparison with only one side is left out.

    Raises:
        InvalidParameterError: ``rows`` is not a ledger or a list of dicts, or a row has a
            ``compare`` that is not a str (or list of str) or a ``side`` other than "baseline" or
            "technique".
    """
    groups: dict[str, dict[str, dict[str, Any]]] = {}
    for row in _flat_rows(rows):
        labels = row.get("compare")
        if labels is None:
            continue
        labels = [labels] if isinstance(labels, str) else labels
        if not isinstance(labels, (list, tuple)) or not labels or not all(isinstance(x, str) and x for x in labels):
            raise InvalidParameterError(
                f"The 'compare' metadata of ledger row {row.get('name')!r} must be a non-empty str or a list of "
                f"them. Got {row.get('compare')!r}."
            )
        side = row.get("side")
        if side not in _SIDES:
            raise InvalidParameterError(
                f"The 'side' metadata of ledger row {row.get('name')!r} must be 'baseline' or 'technique'. "
                f"Got {side!r}."
            )
        for label in labels:
            sides = groups.setdefault(label, {})
            acc = sides.setdefault(side, {"names": [], "flops": None, "seconds": None, "peak_memory_bytes": None})
            acc["names"].append(row.get("name"))
            acc["flops"] = _add(acc["flops"], row.get("flops"))
            acc["seconds"] = _add(acc["seconds"], row.get("seconds"))
            mem = row.get("peak_memory_bytes")
            if mem is not None:
                acc["peak_memory_bytes"] = max(acc["peak_memory_bytes"] or 0, mem)
    return [{"label": label, **sides} for label, sides in groups.items() if all(s in sides for s in _SIDES)]


def _ratio_text(base: float | None, tech: float | None) -> str:
    if base is None or tech is None or not base:
        return ""
    return f" {tech / base:.2g}x"


def ledger_figure(rows: Any, path: str | os.PathLike | None = None, *, title: str | None = None):
    """Each technique's cost next to its baseline's: one panel per quantity (FLOPs, wall seconds,
    peak memory increase), one pair of horizontal bars per comparison on a log axis, the
    technique's cost as a multiple of the baseline's beside its bar.

    Args:
        rows: what :func:`ledger_comparisons` takes (a ledger or its rows).
        path: when given, the figure is also written there as a PNG (atomically).
        title: the figure's title (default: none).

    Returns:
        The :class:`matplotlib.figure.Figure`. In each panel, comparison ``i``'s bars are
        ``ax.patches[2 * i]`` (baseline) and ``ax.patches[2 * i + 1]`` (technique); a quantity
        a side does not know is a bar of width 0, marked "n/a".

    Raises:
        InvalidParameterError: no comparison has both sides (see :func:`ledger_comparisons`).
        MissingDependencyError: matplotlib is not installed (``pip install 'leanscale[plots]'``).
    """
    from leanscale.report.figures import (
        COLORS,
        figure_to_png_bytes,
        new_figure,
        plot_style,
    )

    comps = ledger_comparisons(rows)
    if not comps:
        raise InvalidParameterError(
            "The 'rows' parameter of ledger_figure must hold at least one comparison: rows with the metadata "
            "'compare' (a label) and 'side' ('baseline' and 'technique'). Got none with both sides."
        )
    n = len(comps)
    fig, axes = new_figure(1, len(LEDGER_QUANTITIES), width=9.0, height=1.0 + 0.42 * n, sharey=True, squeeze=False)
    axes = axes[0]
    height = 0.38
    ys = [n - 1 - i for i in range(n)]  # first comparison on top
    with plot_style():
        for ax, (key, panel, scale, unit) in zip(axes, LEDGER_QUANTITIES):
            positive = []
            for y, c in zip(ys, comps):
                b, t = c["baseline"][key], c["technique"][key]
                bw = 0.0 if b is None else b / scale
                tw = 0.0 if t is None else t / scale
                positive += [v for v in (bw, tw) if v > 0]
                ax.barh(y + height / 2, bw, height, color="#999999", label="baseline" if y == ys[0] else None)
                ax.barh(y - height / 2, tw, height, color=COLORS[0], label="technique" if y == ys[0] else None)
                if tw > 0:
                    ax.text(tw, y - height / 2, _ratio_text(b, t), va="center", fontsize=7)
            if positive:
                ax.set_xscale("log")
                lo, hi = min(positive), max(positive)
                ax.set_xlim(10 ** math.floor(math.log10(lo) - 0.3), 10 ** (math.log10(hi) + 0.6))
            left = ax.get_xlim()[0]
            for y, c in zip(ys, comps):  # a quantity the ledger does not know: said, not drawn as 0
                for side, dy in (("baseline", height / 2), ("technique", -height / 2)):
                    if c[side][key] is None:
                        ax.text(left, y + dy, " n/a", va="center", fontsize=7, color="0.4")
            ax.set_title(panel)
            ax.set_xlabel(unit or "count")
            ax.grid(axis="y", visible=False)
        axes[0].set_yticks(ys, [c["label"] for c in comps])
        if title:
            fig.suptitle(title)
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=2)
    if path is not None:
        from leanscale.core.io import atomic_write_bytes

        atomic_write_bytes(Path(path), figure_to_png_bytes(fig))
    return fig
