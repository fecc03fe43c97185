"""Parametric scaling laws L(N, D) = E + A / N^alpha + B / D^beta: fitting, prediction, planning.

Approach 3 of Hoffmann et al. 2022 ("Training Compute-Optimal Large Language Models",
arXiv 2203.15556) and its replication by Besiroglu et al. 2024 ("Chinchilla Scaling: A replication
attempt", arXiv 2404.10102).

The fit minimises the summed Huber loss (delta = 1e-3) of log-loss residuals from the paper's grid
of 4,500 initialisations. Three methods:

- ``"fast"`` (default): evaluate the objective at every grid start, then run the batched damped
  Newton solver of :mod:`leanscale.scaling._huber` to a tight stationary point from the
  ``n_starts`` best starts. ``benchmarks/scaling/fit_exactness.py`` checks it against the
  reference on many data sets.
- ``"exhaustive"``: the batched solver from all grid starts.
- ``"reference"``: scipy's L-BFGS-B from every grid start, one at a time (slow; for checking).

Example:
    >>> from leanscale.scaling import EPOCH_2024, fit_parametric
    >>> import numpy as np
    >>> n = np.array([1e8, 1e8, 1e9, 1e9, 1e10, 1e10, 3e8, 3e9])
    >>> d = np.array([1e9, 1e10, 1e10, 1e11, 1e11, 1e12, 3e10, 3e9])
    >>> law = fit_parametric(n, d, EPOCH_2024.predict(n, d))
    >>> round(law.alpha_, 3), round(law.beta_, 3)
    (0.348, 0.366)
"""

from __future__ import annotations

import itertools
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from leanscale.core.errors import DataFormatError, InvalidParameterError
from leanscale.core.estimator import Estimator
from leanscale.core.io import atomic_write_json, check_file_size, read_json
from leanscale.core.validation import (
    Interval,
    Options,
    check_array,
    check_consistent_length,
    check_is_fitted,
    check_param,
    unknown_name_error,
)
from leanscale.scaling._huber import huber_objective, solve_batched

__all__ = [
    "CHINCHILLA_2022",
    "EPOCH_2024",
    "LAWS",
    "BootstrapResult",
    "ComputeOptimal",
    "ParametricScalingLaw",
    "ScalingWarning",
    "chinchilla_grid",
    "fit_parametric",
    "get_law",
]

_FITTED = ("E_", "A_", "B_", "alpha_", "beta_")

# A law file holds five numbers and at most the runs it was fitted on: far below this.
MAX_LAW_FILE_BYTES = 100 * 2**20
# Below this ratio of the singular values of the centred (log N, log D) design, N and D cannot be
# told apart (constant D/N, a single IsoFLOP budget, a single model size or token count).
_COLLINEAR_RATIO = 0.05


class ScalingWarning(UserWarning):
    """A scaling result that is legal but not to be trusted (unidentifiable law, negative exponent,
    a point estimate outside its own interval, a plan far outside the fitted range)."""


def _warn(messages: Sequence[str], stacklevel: int = 3) -> None:
    for msg in messages:
        warnings.warn(msg, ScalingWarning, stacklevel=stacklevel)


def chinchilla_grid() -> np.ndarray:
    """The paper's 4,500 initialisations as rows (e, a, b, alpha, beta).

    alpha, beta in {0, 0.5, ..., 2}; e in {-1, -0.5, ..., 1}; a, b in {0, 5, ..., 25}.
    """
    alpha = beta = np.arange(0.0, 2.01, 0.5)
    e = np.arange(-1.0, 1.01, 0.5)
    a = b = np.arange(0.0, 25.01, 5.0)
    return np.array(list(itertools.product(e, a, b, alpha, beta)), dtype=np.float64)


class ComputeOptimal(tuple):
    """``(n_params, n_tokens)`` of the compute-optimal allocation (a plain tuple with names)."""

    def __new__(cls, n_params, n_tokens):
        return super().__new__(cls, (n_params, n_tokens))

    n_params = property(lambda self: self[0])
    n_tokens = property(lambda self: self[1])


class ParametricScalingLaw(Estimator):
    """L(N, D) = E + A / N^alpha + B / D^beta, an estimator in scikit-learn's sense.

    Args:
        huber_delta: threshold of the Huber loss on log-loss residuals (paper: 1e-3).
        method: ``"fast"``, ``"exhaustive"`` or ``"reference"`` (see the module docstring).
        n_starts: grid starts kept by the ``"fast"`` method.

    Learned attributes: ``E_, A_, B_, alpha_, beta_``, ``objective_`` (summed Huber loss at the
    optimum), ``n_runs_``, and the data (``n_params_``, ``n_tokens_``, ``loss_``) kept for
    :meth:`bootstrap`.
    """

    _parameter_constraints: ClassVar[dict[str, list]] = {
        "huber_delta": [Interval(float, 0, None, closed="neither")],
        "method": [Options({"fast", "exhaustive", "reference"})],
        "n_starts": [Interval(int, 1, None)],
    }

    def __init__(self, huber_delta: float = 1e-3, method: str = "fast", n_starts: int = 64):
        self.huber_delta = huber_delta
        self.method = method
        self.n_starts = n_starts

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def from_params(cls, E: float, A: float, B: float, alpha: float, beta: float, name: str | None = None):
        """A law with given parameters (a preset, or one read from a file)."""
        for key, val in dict(E=E, A=A, B=B, alpha=alpha, beta=beta).items():
            check_param(key, val, [Interval("real", 0, math.inf, closed="neither")], owner="ParametricScalingLaw")
        law = cls()
        law.E_, law.A_, law.B_, law.alpha_, law.beta_ = map(float, (E, A, B, alpha, beta))
        law.name_ = name
        law.warnings_ = []
        return law

    def fit(self, n_params, n_tokens, loss) -> ParametricScalingLaw:
        """Fit on runs: ``n_params`` (N), ``n_tokens`` (D) and final ``loss`` (nats/token)."""
        self._validate_params()
        n, d, l = _check_runs(n_params, n_tokens, loss, owner="fit_parametric", min_runs=6)
        x, y, logl = np.log(n), np.log(d), np.log(l)
        grid = chinchilla_grid()
        if self.method == "reference":
            theta, f = _reference_fit(grid, x, y, logl, self.huber_delta)
        else:
            starts = grid
            if self.method == "fast" and self.n_starts < len(grid):
                f0 = huber_objective(grid, x, y, logl, delta=self.huber_delta)
                starts = grid[np.argsort(f0, kind="stable")[: self.n_starts]]
            res = solve_batched(starts, x, y, logl, delta=self.huber_delta)
            i = int(np.argmin(res.f))
            theta, f = res.theta[i], float(res.f[i])
            self.optima_ = _distinct_optima(res.theta, res.f)
            converged = bool(res.converged[i])
        if self.method == "reference":
            self.optima_ = theta[None].copy()
            converged = True
        if not (np.all(np.isfinite(theta)) and np.all(theta[:3] < _MAX_LOG_COEF)):
            # exp() of these would overflow a float: the runs are not described by the law at all
            raise InvalidParameterError(
                f"The 'loss' parameter of fit_parametric cannot be described by L = E + A/N^alpha + B/D^beta: the "
                f"fit ran off to coefficients that overflow a float (log E, log A, log B = "
                f"{', '.join(f'{v:.4g}' for v in theta[:3])}). Check the losses for outliers or wrong units (they "
                f"range from {l.min():.4g} to {l.max():.4g} nats per token)."
            )
        self._set_theta(theta)
        self.objective_ = f
        self.n_runs_ = int(n.size)
        self.n_params_, self.n_tokens_, self.loss_ = n, d, l
        self.name_ = None
        self.warnings_ = _fit_warnings(self, n, d, l, converged)
        _warn(self.warnings_)
        return self

    def _set_theta(self, theta: np.ndarray) -> None:
        e, a, b, alpha, beta = (float(v) for v in theta)
        self.E_, self.A_, self.B_ = math.exp(e), math.exp(a), math.exp(b)
        self.alpha_, self.beta_ = alpha, beta

    @property
    def theta_(self) -> np.ndarray:
        """Fitted parameters in the optimiser's coordinates (log E, log A, log B, alpha, beta)."""
        check_is_fitted(self, _FITTED)
        return np.array([math.log(self.E_), math.log(self.A_), math.log(self.B_), self.alpha_, self.beta_])

    # --- prediction and planning -------------------------------------------------------------
    def predict(self, n_params, n_tokens):
        """Predicted loss for N parameters trained on D tokens (arrays broadcast)."""
        check_is_fitted(self, _FITTED)
        n = check_array("n_params", n_params, ndim=None, positive=True, owner="predict")
        d = check_array("n_tokens", n_tokens, ndim=None, positive=True, owner="predict")
        out = self.E_ + self.A_ / n**self.alpha_ + self.B_ / d**self.beta_
        return float(out) if out.ndim == 0 else out

    @property
    def exponents_(self) -> tuple[float, float]:
        """``(a, b)`` with N_opt ~ C^a and D_opt ~ C^b: a = beta/(alpha+beta), b = alpha/(alpha+beta)."""
        check_is_fitted(self, _FITTED)
        s = self.alpha_ + self.beta_
        return self.beta_ / s, self.alpha_ / s

    def compute_optimal(self, flops):
        """Compute-optimal ``(n_params, n_tokens)`` for a budget of ``flops`` (C = 6 N D).

        Closed form (Hoffmann et al. 2022, eq. 4): N_opt = G (C/6)^a, D_opt = G^-1 (C/6)^b with
        G = (alpha A / (beta B))^(1 / (alpha + beta)), a = beta / (alpha + beta),
        b = alpha / (alpha + beta).
        """
        check_is_fitted(self, _FITTED)
        _check_frontier(self)
        c = check_array("flops", flops, ndim=None, positive=True, owner="compute_optimal")
        n_opt, d_opt = _frontier(c, self.A_, self.B_, self.alpha_, self.beta_)
        if n_opt.ndim == 0:
            return ComputeOptimal(float(n_opt), float(d_opt))
        return ComputeOptimal(n_opt, d_opt)

    def optimal_tokens(self, n_params):
        """Tokens D for which a model of ``n_params`` is compute-optimal (inverse of the frontier)."""
        return self._frontier_partner("n_params", n_params, "optimal_tokens")

    def optimal_params(self, n_tokens):
        """Parameters N for which ``n_tokens`` is the compute-optimal data size."""
        return self._frontier_partner("n_tokens", n_tokens, "optimal_params")

    def _frontier_partner(self, name: str, value, owner: str):
        """The other half of the compute-optimal pair: D for N = ``value`` (``name="n_params"``)
        or N for D = ``value`` (``name="n_tokens"``); C/6 = N D on the frontier."""
        check_is_fitted(self, _FITTED)
        _check_frontier(self)
        x = check_array(name, value, ndim=None, positive=True, owner=owner)
        g = _g(self.A_, self.B_, self.alpha_, self.beta_)
        a, b = self.exponents_
        with np.errstate(over="ignore", under="ignore"):
            # C/6 at which N_opt(C) = x (N_opt = G (C/6)^a), or D_opt(C) = x (D_opt = (C/6)^b / G)
            c6 = (x / g) ** (1.0 / a) if name == "n_params" else (x * g) ** (1.0 / b)
            other = c6 / x
        _check_representable(name, value, other, owner)
        return float(other) if other.ndim == 0 else other

    # --- uncertainty -------------------------------------------------------------------------
    def bootstrap(self, n_resamples: int = 4000, seed: int = 0, level: float = 0.95) -> BootstrapResult:
        """Refit on ``n_resamples`` resamples of the runs (with replacement); percentile intervals.

        All resamples are refitted at once by the batched solver, each starting from this fit's
        optimum and from up to two next-best distinct optima found from the grid (``optima_``), and
        keeping the best of those, so a resample whose optimum moved to another basin still finds it.
        """
        check_is_fitted(self, _FITTED)
        if getattr(self, "n_params_", None) is None:
            raise InvalidParameterError(
                f"bootstrap needs the runs the law was fitted on; the law {self.name_ or ''!s} is a preset "
                "or was loaded without data. Fit it on runs (fit_parametric or `leanscale fit`) first."
            )
        check_param("n_resamples", n_resamples, [Interval(int, 10, None)], owner="bootstrap")
        check_param("seed", seed, [Interval(int, 0, None)], owner="bootstrap")
        check_param("level", level, [Interval(float, 0, 1, closed="neither")], owner="bootstrap")
        x, y, logl = np.log(self.n_params_), np.log(self.n_tokens_), np.log(self.loss_)
        m = x.size
        rng = np.random.default_rng(seed)
        # counts[r, i]: how often run i is drawn in resample r, (R, m)
        counts = np.stack([np.bincount(rng.integers(0, m, m), minlength=m) for _ in range(n_resamples)])
        counts = counts.astype(np.float64)
        starts = getattr(self, "optima_", None)
        if starts is None:
            starts = self.theta_[None]
        k = len(starts)
        # Every resample from every retained optimum: rows ordered (start, resample), (k*R, 5).
        res = solve_batched(
            np.repeat(starts, n_resamples, axis=0), x, y, logl, np.tile(counts, (k, 1)),
            delta=self.huber_delta, ftol=1e-12, xtol=1e-9,
        )
        f = res.f.reshape(k, n_resamples)
        best = np.argmin(f, axis=0)  # (R,) which start won for each resample
        pick = best * n_resamples + np.arange(n_resamples)
        theta = res.theta[pick]
        with np.errstate(over="ignore"):  # a resample that diverged gets inf, left out of intervals
            samples = np.column_stack([np.exp(theta[:, :3]), theta[:, 3:]])  # (R, 5): E A B alpha beta
        result = BootstrapResult(law=self, samples=samples, level=level, converged=res.converged[pick])
        _warn(result.check())
        return result

    # --- persistence -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        check_is_fitted(self, _FITTED)
        out = {"kind": "parametric", "name": getattr(self, "name_", None), "E": self.E_, "A": self.A_,
               "B": self.B_, "alpha": self.alpha_, "beta": self.beta_,
               "huber_delta": self.huber_delta, "method": self.method}
        if getattr(self, "n_params_", None) is not None:
            out["runs"] = {"n_params": self.n_params_, "n_tokens": self.n_tokens_, "loss": self.loss_}
            out["objective"] = self.objective_
        out["warnings"] = list(getattr(self, "warnings_", []))
        return out

    def save(self, path: str | Path) -> Path:
        """Write the law (and its runs, if fitted on data) as JSON, atomically."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, blob: dict, source: str | os.PathLike | None = None) -> ParametricScalingLaw:
        """A law from :meth:`to_dict` output (e.g. a parsed ``law.json``); ``source`` names its file.

        Raises:
            DataFormatError: not an object, a missing key, or a value of the wrong type or range;
                the message names the file (when ``source`` is given) and the key.
        """
        where = f"The law file {str(source)!r}" if source is not None else "The law data"
        return _law_from_blob(cls, blob, where)

    def __repr__(self) -> str:
        if not all(hasattr(self, a) for a in _FITTED):
            return super().__repr__()  # the parameters that differ from their defaults
        name = f"{self.name_}: " if getattr(self, "name_", None) else ""
        return (f"{type(self).__name__}({name}E={self.E_:.4g}, A={self.A_:.4g}, B={self.B_:.4g}, "
                f"alpha={self.alpha_:.4g}, beta={self.beta_:.4g})")


def fit_parametric(
    n_params: Sequence[float],
    n_tokens: Sequence[float],
    loss: Sequence[float],
    *,
    huber_delta: float = 1e-3,
    method: str = "fast",
    n_starts: int = 64,
) -> ParametricScalingLaw:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta to runs (Chinchilla Approach 3); returns the fitted law."""
    return ParametricScalingLaw(huber_delta=huber_delta, method=method, n_starts=n_starts).fit(
        n_params, n_tokens, loss
    )


@dataclass
class BootstrapResult:
    """Bootstrap refits of a parametric law: ``samples`` (R, 5) columns E, A, B, alpha, beta."""

    law: ParametricScalingLaw
    samples: np.ndarray
    level: float
    converged: np.ndarray

    names = ("E", "A", "B", "alpha", "beta")

    @property
    def valid(self) -> np.ndarray:
        """(R,) resamples with alpha > 0 and beta > 0, i.e. with a compute-optimal frontier."""
        return (self.samples[:, 3] > 0) & (self.samples[:, 4] > 0)

    def _q(self, values: np.ndarray) -> tuple[float, float]:
        # NaN (undefined) is left out; +-inf (a limit, see _limits) is kept: dropping it would cut a
        # tail off the bootstrap distribution and bias the interval towards the other side.
        values = values[~np.isnan(values)]
        if values.size == 0:
            return float("nan"), float("nan")
        q = [(1 - self.level) / 2, (1 + self.level) / 2]
        if np.all(np.isfinite(values)):
            lo, hi = np.quantile(values, q)
        else:  # order statistics: no interpolation between a number and infinity
            lo, hi = np.quantile(values, q, method="inverted_cdf")
        return float(lo), float(hi)

    def interval(self, name: str) -> tuple[float, float]:
        """Percentile interval of a parameter (E, A, B, alpha, beta, a, b)."""
        return self._q(self._values(name))

    def _limits(self) -> tuple[np.ndarray, np.ndarray]:
        """Resamples without a frontier, by side: (alpha <= 0 < beta, beta <= 0 < alpha).

        With alpha <= 0 more parameters never help: the limit alpha -> 0+ of the closed form is
        N_opt -> 0, D_opt -> inf, a -> 1, b -> 0; with beta <= 0 more tokens never help: N_opt -> inf,
        D_opt -> 0, a -> 0, b -> 1. Such resamples enter the intervals of N_opt, D_opt, a and b at
        these limits; leaving them out (as before) biased the interval towards the other side, away
        from a point estimate near it. Resamples with both <= 0 are undefined and left out.
        """
        alpha, beta = self.samples[:, 3], self.samples[:, 4]
        return (alpha <= 0) & (beta > 0), (beta <= 0) & (alpha > 0)

    def _values(self, name: str) -> np.ndarray:
        if name in self.names:
            return self.samples[:, self.names.index(name)]
        if name not in ("a", "b"):
            raise unknown_name_error("name", name, [*self.names, "a", "b"], owner="BootstrapResult.interval")
        no_n, no_d = self._limits()
        valid = self.valid
        alpha, beta = self.samples[valid, 3], self.samples[valid, 4]
        out = np.full(len(self.samples), np.nan)
        out[valid] = beta / (alpha + beta) if name == "a" else alpha / (alpha + beta)
        out[no_n] = 1.0 if name == "a" else 0.0
        out[no_d] = 0.0 if name == "a" else 1.0
        return out

    def compute_optimal_interval(self, flops: float) -> dict[str, tuple[float, float]]:
        """Intervals of N_opt and D_opt at a budget; resamples without a frontier count at their limits."""
        c = float(check_array("flops", [flops], positive=True, owner="compute_optimal_interval")[0])
        valid = self.valid
        e, a_, b_, alpha, beta = self.samples[valid].T
        n_opt, d_opt = np.full(len(self.samples), np.nan), np.full(len(self.samples), np.nan)
        n_opt[valid], d_opt[valid] = _frontier(np.full(len(e), c), a_, b_, alpha, beta)
        no_n, no_d = self._limits()
        n_opt[no_n], d_opt[no_n] = 0.0, np.inf
        n_opt[no_d], d_opt[no_d] = np.inf, 0.0
        return {"n_params": self._q(n_opt), "n_tokens": self._q(d_opt)}

    @property
    def converged_fraction(self) -> float:
        """Share of resamples whose refit converged (the others stopped at the iteration limit)."""
        return float(np.mean(self.converged)) if self.converged.size else 1.0

    def check(self, flops: float | None = None) -> list[str]:
        """Warnings about these intervals: a point estimate outside its own interval, refits that did
        not converge or have no frontier. With ``flops``, N_opt and D_opt at that budget too."""
        out = []
        if self.converged_fraction < 0.8:
            out.append(f"{100 * (1 - self.converged_fraction):.1f}% of the bootstrap refits did not converge "
                       "(they drifted along a flat direction of the objective): the law is weakly determined "
                       "by these runs and its intervals are approximate.")
        rows = self.summary()
        if flops is not None and self.law.alpha_ > 0 and self.law.beta_ > 0:
            n_pt, d_pt = self.law.compute_optimal(flops)
            ci = self.compute_optimal_interval(flops)
            rows += [{"parameter": f"N_opt at {flops:.3g} FLOPs", "estimate": n_pt, "low": ci["n_params"][0],
                      "high": ci["n_params"][1]},
                     {"parameter": f"D_opt at {flops:.3g} FLOPs", "estimate": d_pt, "low": ci["n_tokens"][0],
                      "high": ci["n_tokens"][1]}]
        no_frontier = 1.0 - self.valid_fraction
        if no_frontier > (1 - self.level) / 2:
            out.append(f"{100 * no_frontier:.1f}% of the bootstrap refits had alpha or beta <= 0 (no compute-optimal "
                       "frontier): the intervals of N_opt and D_opt reach 0 or infinity and those of a and b "
                       "reach 0 or 1. These runs do not pin the compute-optimal split down.")
        for r in rows:
            est, lo, hi = r["estimate"], r["low"], r["high"]
            if math.isnan(lo) or math.isnan(hi):
                out.append(f"The bootstrap interval of {r['parameter']} is undefined (no usable refit).")
                continue
            if not lo <= est <= hi:
                out.append(
                    f"The point estimate of {r['parameter']} ({est:.4g}) lies outside its own {100 * self.level:g}% "
                    f"bootstrap interval [{lo:.4g}, {hi:.4g}]: the fit sits at the edge of what resamples of "
                    "these runs support (a skewed or multi-modal bootstrap distribution). Do not trust either "
                    "number; add runs.")
        return out

    def summary(self) -> list[dict]:
        point = {"E": self.law.E_, "A": self.law.A_, "B": self.law.B_, "alpha": self.law.alpha_,
                 "beta": self.law.beta_, "a": self.law.exponents_[0], "b": self.law.exponents_[1]}
        rows = []
        for name, est in point.items():
            lo, hi = self.interval(name)
            rows.append({"parameter": name, "estimate": est, "low": lo, "high": hi})
        return rows

    @property
    def valid_fraction(self) -> float:
        """Share of resamples with alpha, beta > 0 (a compute-optimal frontier)."""
        return float(self.valid.mean())


# --- helpers ---------------------------------------------------------------------------------
def _g(A, B, alpha, beta):
    # NaN where alpha or beta <= 0 (no compute-optimal frontier: one term never decreases).
    alpha, beta = np.asarray(alpha, np.float64), np.asarray(beta, np.float64)
    ok = (alpha > 0) & (beta > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        g = (alpha * A / (beta * B)) ** (1.0 / (alpha + beta))
    return np.where(ok, g, np.nan)


def _frontier(c, A, B, alpha, beta):
    # In log space: the closed form's factors overflow or underflow for extreme resamples (alpha or
    # beta near 0 or large), which gave N_opt = 0 or inf where the product itself is representable.
    alpha, beta = np.asarray(alpha, np.float64), np.asarray(beta, np.float64)
    A, B = np.asarray(A, np.float64), np.asarray(B, np.float64)
    ok = (alpha > 0) & (beta > 0)
    log_c6 = np.log(np.asarray(c, dtype=np.float64) / 6.0)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        s = alpha + beta
        log_g = (np.log(alpha) + np.log(A) - np.log(beta) - np.log(B)) / s
        log_n = log_g + log_c6 * (beta / s)
        log_d = log_c6 * (alpha / s) - log_g
        n, d = np.exp(log_n), np.exp(log_d)
    return np.where(ok, n, np.nan), np.where(ok, d, np.nan)


def _check_representable(name: str, given, result: np.ndarray, owner: str) -> None:
    if not np.all(np.isfinite(result) & (result > 0)):
        raise InvalidParameterError(
            f"The {name!r} parameter of {owner} gives a result that overflows or underflows double precision "
            f"(the law would need {'infinitely many' if np.any(result > 1) else 'zero'} of the other). Got "
            f"{given!r}: use a value within the range of real models.")


def _check_frontier(law) -> None:
    if not (law.alpha_ > 0 and law.beta_ > 0):
        raise InvalidParameterError(
            f"The law has alpha={law.alpha_:.4g}, beta={law.beta_:.4g}: a compute-optimal frontier needs "
            "both > 0 (otherwise more parameters or more tokens never help). The runs do not determine "
            "the law; add runs over a wider range of sizes and budgets."
        )


def _distinct_optima(theta: np.ndarray, f: np.ndarray, k: int = 3, rtol: float = 1e-3) -> np.ndarray:
    """Up to ``k`` best optima whose parameters differ by more than ``rtol``, best first."""
    kept: list[np.ndarray] = []
    for i in np.argsort(f, kind="stable"):
        if not np.isfinite(f[i]):
            break
        if all(np.max(np.abs(theta[i] - t) / (1.0 + np.abs(t))) > rtol for t in kept):
            kept.append(theta[i])
            if len(kept) == k:
                break
    return np.array(kept)


_MAX_LOG_COEF = math.log(np.finfo(np.float64).max)  # exp() of more overflows


def _overflowing_run(n: np.ndarray, d: np.ndarray) -> int | None:
    """The index of the first run whose compute C = 6 N D is not a finite float, or None."""
    with np.errstate(over="ignore"):
        finite = np.isfinite(6.0 * n * d)
    return None if finite.all() else int(np.flatnonzero(~finite)[0])


def _check_runs(n_params, n_tokens, loss, owner: str, min_runs: int):
    n = check_array("n_params", n_params, positive=True, owner=owner)
    d = check_array("n_tokens", n_tokens, positive=True, owner=owner)
    l = check_array("loss", loss, positive=True, owner=owner)
    check_consistent_length(owner=owner, n_params=n, n_tokens=d, loss=l)
    bad = _overflowing_run(n, d)
    if bad is not None:
        raise InvalidParameterError(
            f"The 'n_params' and 'n_tokens' parameters of {owner} must give a finite compute 6 N D for every run. "
            f"Got n_params={n[bad]:.3g}, n_tokens={d[bad]:.3g} at index {bad}, whose product overflows.")
    if n.size < min_runs:
        raise InvalidParameterError(
            f"{owner} needs at least {min_runs} runs to fit the 5 parameters (E, A, B, alpha, beta) "
            f"with a residual to spare. Got {n.size}."
        )
    distinct = len(set(zip(n.tolist(), d.tolist())))
    if distinct < min_runs:
        raise InvalidParameterError(
            f"{owner} needs at least {min_runs} runs at distinct (n_params, n_tokens) to fit the 5 parameters "
            f"(E, A, B, alpha, beta): repeated runs of one configuration only average its noise. Got {n.size} "
            f"runs at {distinct} distinct (n_params, n_tokens)."
        )
    return n, d, l


def _collinearity(x: np.ndarray, y: np.ndarray) -> float:
    """Smallest / largest singular value of the centred (log N, log D) design (0: collinear)."""
    m = np.column_stack([x - x.mean(), y - y.mean()])
    sv = np.linalg.svd(m, compute_uv=False)
    return float(sv[-1] / sv[0]) if sv[0] > 0 else 0.0


def _fit_warnings(law, n, d, l, converged: bool) -> list[str]:
    """What makes a fitted law untrustworthy although the fit itself succeeded."""
    out = []
    x, y = np.log(n), np.log(d)
    ratio = _collinearity(x, y)
    if ratio < _COLLINEAR_RATIO:
        tpp = d / n
        how = (f"every run has D/N = {np.median(tpp):.3g} tokens per parameter" if np.ptp(np.log(tpp)) < 1e-6
               else "a single model size" if np.ptp(x) < 1e-9
               else "a single token count" if np.ptp(y) < 1e-9
               else "log D is (nearly) a linear function of log N, e.g. a single IsoFLOP budget")
        out.append(
            f"The law is unidentifiable from these runs: {how} (collinearity {ratio:.2g} < {_COLLINEAR_RATIO}), so "
            "the model term A/N^alpha and the data term B/D^beta cannot be separated and the compute-optimal "
            "split (N_opt, D_opt, a, b) is arbitrary. Add runs that vary N and D independently (several "
            "budgets, several sizes per budget).")
    if not (law.alpha_ > 0 and law.beta_ > 0):
        out.append(f"The fitted exponents alpha={law.alpha_:.4g}, beta={law.beta_:.4g} are not both positive: "
                   "more parameters or more tokens would never lower the loss, so the law has no "
                   "compute-optimal frontier. The runs do not determine the law.")
    if not converged:
        out.append("The optimiser stopped at its iteration limit before converging: the fitted parameters "
                   "lie in a flat valley of the objective and are weakly determined by these runs.")
    rows = np.column_stack([n, d, l])
    n_dup = int(rows.shape[0] - np.unique(rows, axis=0).shape[0])
    if n_dup:
        out.append(f"{n_dup} run(s) repeat another run exactly (same n_params, n_tokens and loss): a copied "
                   "row counts twice in the fit. Remove duplicates unless they are real repeats.")
    return out


def _number(blob: dict, key: str, where: str, *, positive: bool = True, required: bool = True,
            default=None) -> float:
    if key not in blob:
        if required:
            raise DataFormatError(f"{where} must have the key {key!r}. Found the keys {sorted(map(str, blob))}.")
        return default
    v = blob[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise DataFormatError(f"{where} must hold a number under {key!r}. Got {v!r} ({type(v).__name__}).")
    v = float(v)
    if not math.isfinite(v) or (positive and v <= 0):
        kind = "a positive finite number" if positive else "a finite number"
        raise DataFormatError(f"{where} must hold {kind} under {key!r}. Got {v!r}.")
    return v


def _law_from_blob(cls, blob, where: str):
    if not isinstance(blob, dict):
        raise DataFormatError(f"{where} must be a JSON object with the keys E, A, B, alpha, beta. "
                              f"Got {type(blob).__name__}.")
    kind = blob.get("kind", "parametric")
    if kind != "parametric":
        raise DataFormatError(f"{where} must have kind 'parametric'. Got {kind!r}.")
    missing = [k for k in ("E", "A", "B", "alpha", "beta") if k not in blob]
    if missing:
        raise DataFormatError(
            f"{where} must have the keys E, A, B, alpha, beta. Missing {missing}; found {sorted(map(str, blob))}."
        )
    vals = {k: _number(blob, k, where) for k in ("E", "A", "B")}
    for k in ("alpha", "beta"):
        vals[k] = _number(blob, k, where, positive=False)
        if vals[k] <= 0:
            raise DataFormatError(
                f"{where} must hold a positive {k!r}: a law without a compute-optimal frontier cannot be "
                f"planned with. Got {vals[k]!r} (the fit that wrote it found alpha or beta <= 0: the runs "
                "did not determine the law).")
    name = blob.get("name")
    if name is not None and not isinstance(name, str):
        raise DataFormatError(f"{where} must hold a string or null under 'name'. Got {name!r}.")
    law = cls.from_params(**vals, name=name)
    law.huber_delta = _number(blob, "huber_delta", where, required=False, default=1e-3)
    method = blob.get("method", "fast")
    if method not in ("fast", "exhaustive", "reference"):
        raise DataFormatError(f"{where} must hold 'fast', 'exhaustive' or 'reference' under 'method'. "
                              f"Got {method!r}.")
    law.method = method
    notes = blob.get("warnings", [])
    if not isinstance(notes, list) or not all(isinstance(w, str) for w in notes):
        raise DataFormatError(f"{where} must hold a list of strings under 'warnings'. Got {notes!r:.200}.")
    law.warnings_ = list(notes)
    runs = blob.get("runs")
    if runs is not None:
        if not isinstance(runs, dict):
            raise DataFormatError(f"{where} must hold an object under 'runs'. Got {type(runs).__name__}.")
        cols = []
        for key in ("n_params", "n_tokens", "loss"):
            v = runs.get(key)
            if not isinstance(v, list) or not v or not all(
                isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t > 0 for t in v
            ):
                raise DataFormatError(
                    f"{where} must hold a non-empty list of positive finite numbers under 'runs.{key}'. "
                    f"Got {v!r:.200}.")
            cols.append(np.asarray(v, dtype=np.float64))
        if len({c.size for c in cols}) != 1:
            raise DataFormatError(f"{where} must hold lists of one length under 'runs' (n_params, n_tokens, "
                                  f"loss). Got lengths {[c.size for c in cols]}.")
        bad = _overflowing_run(cols[0], cols[1])
        if bad is not None:
            raise DataFormatError(f"{where} holds a run under 'runs' whose compute 6 N D overflows: n_params="
                                  f"{cols[0][bad]:.3g}, n_tokens={cols[1][bad]:.3g} (run {bad}): not a real run.")
        law.n_params_, law.n_tokens_, law.loss_ = cols
        law.n_runs_ = int(cols[0].size)
        obj = blob.get("objective")
        if obj is not None:
            obj = _number(blob, "objective", where, positive=False)
        law.objective_ = obj
    return law


def _reference_fit(grid, x, y, logl, delta):
    """The reference procedure: scipy L-BFGS-B from every grid start, keep the best."""
    from scipy.optimize import minimize

    def fun(theta):
        f, g = huber_objective(theta[None], x, y, logl, delta=delta, order=1)
        return float(f[0]), g[0]

    best_f, best_theta = np.inf, None
    for theta0 in grid:
        res = minimize(fun, theta0, jac=True, method="L-BFGS-B",
                       options={"maxiter": 1000, "ftol": 1e-15, "gtol": 1e-12})
        if np.isfinite(res.fun) and res.fun < best_f:
            best_f, best_theta = float(res.fun), res.x
    return best_theta, best_f


# Presets (fitted-law objects).
CHINCHILLA_2022 = ParametricScalingLaw.from_params(
    E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28, name="chinchilla"
)  # Hoffmann et al. 2022, eq. 10
EPOCH_2024 = ParametricScalingLaw.from_params(
    E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658, name="epoch"
)  # Besiroglu et al. 2024, table 1 (the issue quotes E 1.817)

LAWS = {"chinchilla": CHINCHILLA_2022, "epoch": EPOCH_2024}


def get_law(name_or_path: str | Path) -> ParametricScalingLaw:
    """A preset by name (``chinchilla``, ``epoch``) or a law saved as JSON by :meth:`save`."""
    if not isinstance(name_or_path, (str, Path)):
        raise InvalidParameterError(
            f"The 'law' parameter of get_law must be a preset name or a path. Got {type(name_or_path).__name__}.")
    key = str(name_or_path)
    if not key.strip():
        raise unknown_name_error("law", key, [*LAWS, "<path to a fitted law .json>"], owner="get_law")
    if key.lower() in LAWS:
        return LAWS[key.lower()]
    p = Path(key)
    if p.suffix == ".json" or p.exists():
        if not p.exists():
            raise InvalidParameterError(f"The 'law' parameter names a file that does not exist: {key!r}.")
        if p.is_dir():
            raise DataFormatError(f"The law file {key!r} is a folder. Expected a law.json written by `leanscale fit`.")
        if not p.is_file():
            raise DataFormatError(f"The law file {key!r} is not a regular file (a device or pipe?). Expected a "
                                  "law.json written by `leanscale fit`.")
        check_file_size(p, MAX_LAW_FILE_BYTES, what="law file")
        return ParametricScalingLaw.from_dict(read_json(p, what="law file"), source=p)
    raise unknown_name_error("law", key, [*LAWS, "<path to a fitted law .json>"], owner="get_law")
