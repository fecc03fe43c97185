"""Approach 2 of Hoffmann et al. 2022 (arXiv 2203.15556, section 3.2): IsoFLOP profiles.

For each compute budget C, runs of different sizes N trained on D = C / (6N) tokens trace a valley
in loss against log N. A parabola fitted to each valley gives the loss-minimising N_opt(C); power
laws N_opt = k_N C^a and D_opt = C / (6 N_opt) = k_D C^b follow from a straight line in log-log
space. The paper found a = 0.49 (0.462, 0.534) and b = 0.51 (0.483, 0.529).

Intervals: percentile bootstrap, resampling the runs within each budget with replacement and
refitting every parabola and both lines.
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
from leanscale.scaling.laws import ComputeOptimal

__all__ = ["IsoFLOPFit", "fit_isoflop", "group_budgets"]


@dataclass
class IsoFLOPFit:
    """Result of Approach 2. Arrays are per budget, sorted by budget."""

    budgets: np.ndarray  # (k,) FLOPs of each IsoFLOP profile
    n_opt: np.ndarray  # (k,) loss-minimising parameters of each profile (parabola vertex)
    d_opt: np.ndarray  # (k,) C / (6 N_opt)
    loss_opt: np.ndarray  # (k,) loss at the vertex
    parabolas: np.ndarray  # (k, 3) coefficients (c2, c1, c0) of loss = c2 u^2 + c1 u + c0, u = ln N
    a: float  # N_opt ~ C^a
    b: float  # D_opt ~ C^b
    log_kn: float  # ln k_N
    log_kd: float  # ln k_D
    intervals: dict = field(default_factory=dict)  # name -> (low, high)
    interior: np.ndarray | None = None  # (k,) bool: vertex inside the sampled range of N
    skipped: list = field(default_factory=list)  # (budget, reason) of profiles not used

    def compute_optimal(self, flops) -> ComputeOptimal:
        c = check_array("flops", flops, ndim=None, positive=True, owner="IsoFLOPFit.compute_optimal")
        n = np.exp(self.log_kn) * c**self.a
        d = np.exp(self.log_kd) * c**self.b
        return ComputeOptimal(float(n), float(d)) if n.ndim == 0 else ComputeOptimal(n, d)


def group_budgets(flops: np.ndarray, rel_tol: float = 0.02) -> np.ndarray:
    """Group runs whose FLOPs agree within ``rel_tol``; returns each run's group budget (geo-mean)."""
    order = np.argsort(flops)
    groups = np.empty_like(flops)
    start = 0
    for i in range(1, len(order) + 1):
        if i == len(order) or flops[order[i]] > flops[order[start]] * (1 + rel_tol):
            idx = order[start:i]
            groups[idx] = np.exp(np.mean(np.log(flops[idx])))
            start = i
    return groups


def _parabola(u: np.ndarray, loss: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """Least-squares (weighted) parabola coefficients, batched. u, loss, w: (R, m) -> (R, 3)."""
    x = np.stack([u * u, u, np.ones_like(u)], axis=-1)  # (R, m, 3)
    if w is not None:
        x = x * w[..., None]
        loss = loss * w
    xtx = np.einsum("rmi,rmj->rij", x, x)
    xty = np.einsum("rmi,rm->ri", x, loss)
    # A tiny ridge keeps degenerate resamples (all draws at one N) solvable; they are dropped below.
    return np.linalg.solve(xtx + 1e-12 * np.eye(3), xty[..., None])[..., 0]


def _line(logc: np.ndarray, logy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Slope and intercept of least-squares lines, batched over rows. (R, k) -> (R,), (R,)."""
    xm, ym = logc.mean(-1, keepdims=True), logy.mean(-1, keepdims=True)
    slope = ((logc - xm) * (logy - ym)).sum(-1) / ((logc - xm) ** 2).sum(-1)
    return slope, (ym - slope[..., None] * xm)[..., 0]


def fit_isoflop(
    n_params,
    n_tokens,
    loss,
    *,
    flops=None,
    budget_flops=None,
    n_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> IsoFLOPFit:
    """Fit IsoFLOP profiles (Approach 2) with bootstrap intervals on the exponents.

    Args:
        n_params, n_tokens, loss: one value per run.
        flops: training FLOPs per run (default 6 N D), used to group runs when ``budget_flops`` is
            not given (runs within 2% of each other form one profile).
        budget_flops: the IsoFLOP budget of each run (as a sweep records it).
        n_resamples: bootstrap resamples (0 for none).

    Raises:
        InvalidParameterError: bad values, fewer than 2 usable budgets, or a budget with fewer than
            3 distinct sizes.
    """
    owner = "fit_isoflop"
    n = check_array("n_params", n_params, positive=True, owner=owner)
    d = check_array("n_tokens", n_tokens, positive=True, owner=owner)
    l = check_array("loss", loss, positive=True, owner=owner)
    check_consistent_length(owner=owner, n_params=n, n_tokens=d, loss=l)
    check_param("n_resamples", n_resamples, [Interval(int, 0, None)], owner=owner)
    check_param("level", level, [Interval(float, 0, 1, closed="neither")], owner=owner)
    if budget_flops is not None:
        budget = check_array("budget_flops", budget_flops, positive=True, owner=owner)
        check_consistent_length(owner=owner, n_params=n, budget_flops=budget)
    else:
        c = 6.0 * n * d if flops is None else check_array("flops", flops, positive=True, owner=owner)
        check_consistent_length(owner=owner, n_params=n, flops=c)
        budget = group_budgets(c)

    groups, skipped = [], []
    for cb in np.unique(budget):
        idx = np.flatnonzero(budget == cb)
        if np.unique(n[idx]).size < 3:
            skipped.append((float(cb), f"{np.unique(n[idx]).size} distinct model sizes; a parabola needs 3"))
            continue
        coef = _parabola(np.log(n[idx])[None], l[idx][None])[0]
        if coef[0] <= 0:
            skipped.append((float(cb), "the profile is not convex in log N (no minimum)"))
            continue
        groups.append((float(cb), idx, coef))
    if len(groups) < 2:
        detail = "; ".join(f"C={c:.3g}: {why}" for c, why in skipped) or "no budgets found"
        raise InvalidParameterError(
            f"{owner} needs at least 2 IsoFLOP budgets, each with >= 3 model sizes and a convex profile. "
            f"Got {len(groups)} usable ({detail})."
        )
    budgets = np.array([g[0] for g in groups])
    coefs = np.stack([g[2] for g in groups])
    u_opt = -coefs[:, 1] / (2 * coefs[:, 0])
    n_opt = np.exp(u_opt)
    d_opt = budgets / (6.0 * n_opt)
    loss_opt = coefs[:, 2] - coefs[:, 1] ** 2 / (4 * coefs[:, 0])
    interior = np.array([np.log(n[g[1]]).min() <= u <= np.log(n[g[1]]).max() for g, u in zip(groups, u_opt)])
    logc = np.log(budgets)
    a, log_kn = _line(logc[None], np.log(n_opt)[None])
    b, log_kd = _line(logc[None], np.log(d_opt)[None])
    fit = IsoFLOPFit(budgets=budgets, n_opt=n_opt, d_opt=d_opt, loss_opt=loss_opt, parabolas=coefs,
                     a=float(a[0]), b=float(b[0]), log_kn=float(log_kn[0]), log_kd=float(log_kd[0]),
                     interior=interior, skipped=skipped)
    if n_resamples:
        fit.intervals = _bootstrap(groups, n, l, n_resamples, level, seed)
    return fit


def _bootstrap(groups, n, l, n_resamples, level, seed) -> dict:
    rng = np.random.default_rng(seed)
    k = len(groups)
    u_opt = np.empty((n_resamples, k))
    ok = np.ones(n_resamples, dtype=bool)
    for j, (_, idx, _) in enumerate(groups):
        draw = idx[rng.integers(0, idx.size, (n_resamples, idx.size))]  # (R, m)
        coef = _parabola(np.log(n[draw]), l[draw])
        distinct = np.array([np.unique(row).size >= 3 for row in n[draw]])
        ok &= distinct & (coef[:, 0] > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            u_opt[:, j] = -coef[:, 1] / (2 * coef[:, 0])
    budgets = np.array([g[0] for g in groups])
    logc = np.broadcast_to(np.log(budgets), (int(ok.sum()), k))
    a, _ = _line(logc, u_opt[ok])
    b, _ = _line(logc, np.log(budgets / 6.0)[None] - u_opt[ok])
    q = [(1 - level) / 2, (1 + level) / 2]
    out = {"a": tuple(np.quantile(a, q)), "b": tuple(np.quantile(b, q)),
           "n_resamples_used": int(ok.sum())}
    return out
