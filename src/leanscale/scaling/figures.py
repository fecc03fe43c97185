"""Figures of the scaling-law fits: IsoFLOP profiles and loss contours with the efficient frontier."""

from __future__ import annotations

import numpy as np

from leanscale.report.figures import COLORS, new_figure
from leanscale.scaling.isoflop import IsoFLOPFit
from leanscale.scaling.laws import ParametricScalingLaw

__all__ = ["contour_figure", "frontier_figure", "isoflop_figure"]


def isoflop_figure(fit: IsoFLOPFit, n_params, loss, budget_of_run):
    """Loss against parameters for each budget, the fitted parabolas and their minima (Fig. 3 left)."""
    fig, (ax, ax2) = new_figure(1, 2, width=9.0, height=3.4)
    n = np.asarray(n_params, float)
    l = np.asarray(loss, float)
    b = np.asarray(budget_of_run, float)
    for i, (c, coef) in enumerate(zip(fit.budgets, fit.parabolas)):
        color = COLORS[i % len(COLORS)]
        sel = np.isclose(b, c, rtol=1e-6)
        ax.scatter(n[sel], l[sel], color=color, s=14, label=f"{c:.2g} FLOPs")
        u = np.linspace(np.log(n[sel]).min() - 0.3, np.log(n[sel]).max() + 0.3, 100)
        ax.plot(np.exp(u), np.polyval(coef, u), color=color, lw=1)
        ax.plot(fit.n_opt[i], fit.loss_opt[i], marker="v", color=color, ms=7)
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("final loss")
    ax.set_title("IsoFLOP profiles")
    ax.legend(fontsize=7)
    cc = np.geomspace(fit.budgets.min() / 3, fit.budgets.max() * 3, 50)
    ax2.loglog(fit.budgets, fit.n_opt, "o", color=COLORS[0], label=f"N_opt ~ C^{fit.a:.2f}")
    ax2.loglog(cc, np.exp(fit.log_kn) * cc**fit.a, color=COLORS[0], lw=1)
    ax2.loglog(fit.budgets, fit.d_opt, "s", color=COLORS[1], label=f"D_opt ~ C^{fit.b:.2f}")
    ax2.loglog(cc, np.exp(fit.log_kd) * cc**fit.b, color=COLORS[1], lw=1)
    ax2.set_xlabel("FLOPs C")
    ax2.set_title("compute-optimal N and D")
    ax2.legend(fontsize=7)
    return fig


def contour_figure(law: ParametricScalingLaw, flops_range, params_range, n_params=None, flops=None):
    """Contours of predicted loss over FLOPs and parameters, with the efficient frontier (Fig. 4)."""
    fig, ax = new_figure(width=5.5, height=4.0)
    c = np.geomspace(*flops_range, 200)
    n = np.geomspace(*params_range, 200)
    cc, nn = np.meshgrid(c, n)
    loss = law.predict(nn, cc / (6.0 * nn))
    levels = np.quantile(loss, np.linspace(0.02, 0.9, 14))
    cs = ax.contour(cc, nn, loss, levels=np.unique(levels), cmap="viridis", linewidths=0.8)
    ax.clabel(cs, fontsize=6, fmt="%.2f")
    n_opt, _ = law.compute_optimal(c)
    ax.loglog(c, n_opt, color=COLORS[1], lw=2, label="efficient frontier")
    if n_params is not None and flops is not None:
        ax.scatter(flops, n_params, s=8, color="black", alpha=0.6, label="runs")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("FLOPs C = 6ND")
    ax.set_ylabel("parameters N")
    ax.set_title("predicted loss L(N, C/6N)")
    ax.legend(fontsize=7, loc="upper left")
    return fig


def frontier_figure(laws: dict, flops_range):
    """Compute-optimal parameters against FLOPs for several laws (ours next to the papers')."""
    fig, ax = new_figure(width=5.0, height=3.4)
    c = np.geomspace(*flops_range, 100)
    for i, (name, law) in enumerate(laws.items()):
        n_opt, _ = law.compute_optimal(c)
        ax.loglog(c, n_opt, color=COLORS[i % len(COLORS)], label=f"{name} (a={law.exponents_[0]:.2f})")
    ax.set_xlabel("FLOPs C")
    ax.set_ylabel("compute-optimal N")
    ax.legend(fontsize=7)
    return fig
