"""Approach 1 of Hoffmann et al. 2022 (arXiv 2203.15556, section 3.1): the envelope of training curves.

Each run's curve gives loss against FLOPs spent so far (C = 6 N D_seen). At every FLOP value the
lowest loss over all runs picks a model size N*(C) and tokens D*(C) = C / (6 N*); straight lines in
log-log space give N_opt ~ C^a and D_opt ~ C^b. The paper (1,500 log-spaced FLOP values) found
a = 0.50 (0.488, 0.502) and b = 0.50 (0.501, 0.512).

Intervals: percentile bootstrap over runs (whole curves resampled with replacement).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from leanscale.core.errors import InvalidParameterError
from leanscale.core.validation import (
    Interval,
    check_array,
    check_consistent_length,
    check_param,
)
from leanscale.scaling.isoflop import _line
from leanscale.scaling.laws import ComputeOptimal

__all__ = ["EnvelopeFit", "fit_envelope"]


@dataclass
class EnvelopeFit:
    """The lower envelope of training curves (Hoffmann et al. 2022, approach 1): the best run at each
    FLOP value and power laws N* ~ C^a, D* ~ C^b fitted to it (:func:`fit_envelope`)."""

    flops: np.ndarray  # (g,) FLOP grid where the envelope is defined
    n_star: np.ndarray  # (g,) parameters of the best run at each FLOP value
    d_star: np.ndarray  # (g,) C / (6 N*)
    loss_star: np.ndarray  # (g,) envelope loss
    a: float
    b: float
    log_kn: float
    log_kd: float
    intervals: dict = field(default_factory=dict)

    def compute_optimal(self, flops) -> ComputeOptimal:
        c = check_array("flops", flops, ndim=None, positive=True, owner="EnvelopeFit.compute_optimal")
        n = np.exp(self.log_kn) * c**self.a
        d = np.exp(self.log_kd) * c**self.b
        return ComputeOptimal(float(n), float(d)) if n.ndim == 0 else ComputeOptimal(n, d)


def fit_envelope(
    run_id,
    n_params,
    n_tokens,
    loss,
    *,
    n_points: int = 1500,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> EnvelopeFit:
    """Fit the envelope of training curves (Approach 1). One row per curve point.

    Args:
        run_id: which run each row belongs to.
        n_params: the run's parameters (constant within a run).
        n_tokens: tokens seen at that point; loss: the loss at that point.
        n_points: log-spaced FLOP values where the envelope is read (paper: 1,500).
    """
    owner = "fit_envelope"
    ids = np.asarray(run_id).astype(str)
    n = check_array("n_params", n_params, positive=True, owner=owner)
    d = check_array("n_tokens", n_tokens, positive=True, owner=owner)
    l = check_array("loss", loss, positive=True, owner=owner)
    check_consistent_length(owner=owner, run_id=ids, n_params=n, n_tokens=d, loss=l)
    check_param("n_points", n_points, [Interval(int, 10, None)], owner=owner)
    check_param("n_resamples", n_resamples, [Interval(int, 0, None)], owner=owner)
    runs = np.unique(ids)
    curves = []
    for r in runs:
        idx = np.flatnonzero(ids == r)
        if np.unique(n[idx]).size != 1:
            raise InvalidParameterError(
                f"The 'n_params' parameter of {owner} must be constant within a run. Run {r!r} has "
                f"{np.unique(n[idx]).size} different values."
            )
        o = idx[np.argsort(d[idx])]
        if o.size >= 2:
            curves.append((float(n[o[0]]), np.log(6.0 * n[o] * d[o]), l[o]))
    if len({c[0] for c in curves}) < 2:
        raise InvalidParameterError(
            f"{owner} needs curves (>= 2 points each) from at least 2 model sizes. Got "
            f"{len({c[0] for c in curves})} size(s) over {len(runs)} run(s)."
        )
    # Grid where at least two curves are defined.
    lo = np.sort([c[1][0] for c in curves])[1]
    hi = np.sort([c[1][-1] for c in curves])[-2]
    if not hi > lo:
        raise InvalidParameterError(f"The curves given to {owner} do not overlap in FLOPs; no envelope.")
    grid = np.linspace(lo, hi, n_points)  # ln C
    # loss of each curve on the grid, +inf where the curve does not reach: (g, k)
    lmat = np.full((n_points, len(curves)), np.inf)
    for j, (_, logc, ls) in enumerate(curves):
        inside = (grid >= logc[0]) & (grid <= logc[-1])
        lmat[inside, j] = np.interp(grid[inside], logc, ls)
    sizes = np.array([c[0] for c in curves])
    best = np.argmin(lmat, axis=1)
    # Where the best run is the smallest or largest size available, the true optimum may lie
    # beyond the sizes trained: such points are dropped from the fit (not from the envelope).
    interior = (sizes[best] > sizes.min()) & (sizes[best] < sizes.max())
    if np.unique(sizes[best][interior]).size < 2:
        raise InvalidParameterError(
            f"{owner}: the envelope's best run is an interior size at fewer than 2 sizes, so the optimum "
            f"is not bracketed by the sizes trained ({np.unique(sizes).size} sizes from {sizes.min():.3g} "
            f"to {sizes.max():.3g}). Train smaller and larger models."
        )
    best, grid, lmat = best[interior], grid[interior], lmat[interior]
    n_points = int(interior.sum())
    n_star = sizes[best]
    flops = np.exp(grid)
    d_star = flops / (6.0 * n_star)
    a, log_kn = _line(grid[None], np.log(n_star)[None])
    b, log_kd = _line(grid[None], np.log(d_star)[None])
    fit = EnvelopeFit(flops=flops, n_star=n_star, d_star=d_star, loss_star=lmat[np.arange(n_points), best],
                      a=float(a[0]), b=float(b[0]), log_kn=float(log_kn[0]), log_kd=float(log_kd[0]))
    if n_resamples:
        rng = np.random.default_rng(seed)
        k = len(curves)
        a_s, b_s = [], []
        for _ in range(n_resamples):
            drawn = np.zeros(k, dtype=bool)  # runs in this resample
            drawn[rng.integers(0, k, k)] = True
            if np.unique(sizes[drawn]).size < 2:
                continue
            sub = np.where(drawn[None], lmat, np.inf)
            covered = np.isfinite(sub).any(axis=1)
            if covered.sum() < 2:
                continue
            ns = sizes[np.argmin(sub[covered], axis=1)]
            sz = sizes[drawn]
            inner = (ns > sz.min()) & (ns < sz.max())
            if np.unique(ns[inner]).size < 2:
                continue
            gc = grid[covered][inner]
            aa, _ = _line(gc[None], np.log(ns[inner])[None])
            bb, _ = _line(gc[None], (gc - np.log(6.0 * ns[inner]))[None])
            a_s.append(aa[0])
            b_s.append(bb[0])
        q = [(1 - level) / 2, (1 + level) / 2]
        if a_s:
            fit.intervals = {"a": tuple(np.quantile(a_s, q)), "b": tuple(np.quantile(b_s, q)),
                             "n_resamples_used": len(a_s)}
    return fit
