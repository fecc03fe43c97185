"""Figures of the pruning benchmark: accuracy vs fraction kept, and Sorscher's log-log view.

Both read the JSON that ``benchmarks/pruning/fraction_kept.py`` writes (its ``summary`` rows:
metric, strategy, fraction, test_accuracy_mean/sd) so the tour, the report and the benchmark draw
the same picture.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["fraction_kept_figure", "LABELS"]

LABELS = {
    "random": "random",
    "el2n": "EL2N",
    "grand": "GraNd",
    "forgetting": "forgetting",
    "ssl_prototypes": "self-sup. prototypes",
    "sup_prototypes": "sup. prototypes",
    "rs2": "RS2 (new subset per epoch)",
    "pca_prototypes": "PCA prototypes",
    "rp_prototypes": "random-proj. prototypes",
}


def _curves(blob: Mapping[str, Any]) -> dict[tuple[str, str], list[tuple[float, float, float]]]:
    curves: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for r in blob["summary"]:
        sd = r.get("test_accuracy_sd") or 0.0
        curves.setdefault((r["metric"], r["strategy"]), []).append(
            (float(r["fraction"]), float(r["test_accuracy_mean"]), float(sd)))
    full = (1.0, float(blob["full_data_accuracy_mean"]), float(blob.get("full_data_accuracy_sd") or 0.0))
    for points in curves.values():
        points.append(full)
        points.sort()
    return curves


def fraction_kept_figure(blob: Mapping[str, Any], *, strategies: tuple[str, ...] = ("hard", "easy", "random")):
    """Left: test accuracy vs fraction kept (solid: keep hard, dashed: keep easy). Right: test
    error vs number of training examples on log-log axes (Sorscher et al. 2022, Fig. 1): a power
    law is a straight line; a good metric bends below it."""
    from leanscale.report.figures import COLORS, new_figure

    fig, (ax, ax2) = new_figure(1, 2, width=10.0, height=3.6)
    curves = _curves(blob)
    n = float(blob["n_train"])
    metrics = list(dict.fromkeys(m for m, _ in curves))
    for (metric, strategy), pts in sorted(curves.items()):
        if strategy not in strategies:
            continue
        color = COLORS[metrics.index(metric) % len(COLORS)]
        style = {"hard": "-", "easy": "--", "random": ":"}[strategy] if strategy in ("hard", "easy", "random") else "-"
        label = f"{LABELS.get(metric, metric)}" + ("" if metric == "random" else f" ({strategy})")
        f = [p[0] for p in pts]
        acc = [100 * p[1] for p in pts]
        sd = [100 * p[2] for p in pts]
        ax.errorbar(f, acc, yerr=sd, ls=style, color=color, marker="o", capsize=2, label=label)
        ax2.plot([x * n for x in f], [100 - a for a in acc], ls=style, color=color, marker="o")
    ax.set_xlabel("fraction of the training set kept")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{blob['data']}: accuracy vs data kept")
    ax.invert_xaxis()
    ax.legend(fontsize=7, ncol=2)
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("training examples")
    ax2.set_ylabel("test error (%)")
    ax2.set_title("test error vs examples (log-log)")
    return fig
