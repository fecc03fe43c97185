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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leanscale.core.errors import InvalidParameterError
from leanscale.core.io import atomic_write_json, read_json
from leanscale.core.validation import (
    Interval,
    Options,
    check_array,
    check_consistent_length,
    check_is_fitted,
    check_param,
    check_params,
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
    "chinchilla_grid",
    "fit_parametric",
    "get_law",
]

_FITTED = ("E_", "A_", "B_", "alpha_", "beta_")


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


class ParametricScalingLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta, an estimator in scikit-learn's sense.

    Args:
        huber_delta: threshold of the Huber loss on log-loss residuals (paper: 1e-3).
        method: ``"fast"``, ``"exhaustive"`` or ``"reference"`` (see the module docstring).
        n_starts: grid starts kept by the ``"fast"`` method.

    Learned attributes: ``E_, A_, B_, alpha_, beta_``, ``objective_`` (summed Huber loss at the
    optimum), ``n_runs_``, and the data (``n_params_``, ``n_tokens_``, ``loss_``) kept for
    :meth:`bootstrap`.
    """

    _parameter_constraints = {
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
            check_param(key, val, [Interval("real", 0, None, closed="neither")], owner="ParametricScalingLaw")
        law = cls()
        law.E_, law.A_, law.B_, law.alpha_, law.beta_ = map(float, (E, A, B, alpha, beta))
        law.name_ = name
        return law

    def fit(self, n_params, n_tokens, loss) -> ParametricScalingLaw:
        """Fit on runs: ``n_params`` (N), ``n_tokens`` (D) and final ``loss`` (nats/token)."""
        check_params(vars(self), self._parameter_constraints, owner=type(self).__name__)
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
        if self.method == "reference":
            self.optima_ = theta[None].copy()
        self._set_theta(theta)
        self.objective_ = f
        self.n_runs_ = int(n.size)
        self.n_params_, self.n_tokens_, self.loss_ = n, d, l
        self.name_ = None
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
        check_is_fitted(self, _FITTED)
        _check_frontier(self)
        n = check_array("n_params", n_params, ndim=None, positive=True, owner="optimal_tokens")
        g = _g(self.A_, self.B_, self.alpha_, self.beta_)
        a, b = self.exponents_
        c6 = (n / g) ** (1.0 / a)  # C/6 at which N_opt(C) = n
        d = c6 / n
        return float(d) if d.ndim == 0 else d

    def optimal_params(self, n_tokens):
        """Parameters N for which ``n_tokens`` is the compute-optimal data size."""
        check_is_fitted(self, _FITTED)
        _check_frontier(self)
        d = check_array("n_tokens", n_tokens, ndim=None, positive=True, owner="optimal_params")
        g = _g(self.A_, self.B_, self.alpha_, self.beta_)
        a, b = self.exponents_
        c6 = (d * g) ** (1.0 / b)
        n = c6 / d
        return float(n) if n.ndim == 0 else n

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
        return BootstrapResult(law=self, samples=samples, level=level, converged=res.converged[pick])

    # --- persistence -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        check_is_fitted(self, _FITTED)
        out = {"kind": "parametric", "name": getattr(self, "name_", None), "E": self.E_, "A": self.A_,
               "B": self.B_, "alpha": self.alpha_, "beta": self.beta_,
               "huber_delta": self.huber_delta, "method": self.method}
        if getattr(self, "n_params_", None) is not None:
            out["runs"] = {"n_params": self.n_params_, "n_tokens": self.n_tokens_, "loss": self.loss_}
            out["objective"] = self.objective_
        return out

    def save(self, path: str | Path) -> Path:
        """Write the law (and its runs, if fitted on data) as JSON, atomically."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, blob: dict) -> ParametricScalingLaw:
        missing = [k for k in ("E", "A", "B", "alpha", "beta") if k not in blob]
        if missing:
            raise InvalidParameterError(
                f"A scaling-law file must have the keys E, A, B, alpha, beta. Missing {missing}; "
                f"found {sorted(blob)}."
            )
        law = cls.from_params(blob["E"], blob["A"], blob["B"], blob["alpha"], blob["beta"], blob.get("name"))
        law.huber_delta = float(blob.get("huber_delta", 1e-3))
        runs = blob.get("runs")
        if runs:
            law.n_params_, law.n_tokens_, law.loss_ = _check_runs(
                runs["n_params"], runs["n_tokens"], runs["loss"], owner="from_dict", min_runs=1
            )
            law.objective_ = blob.get("objective")
            law.n_runs_ = int(law.n_params_.size)
        return law

    def __repr__(self) -> str:
        if not all(hasattr(self, a) for a in _FITTED):
            return f"{type(self).__name__}(huber_delta={self.huber_delta}, method={self.method!r})"
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
        values = values[np.isfinite(values)]
        if values.size == 0:
            return float("nan"), float("nan")
        lo, hi = np.quantile(values, [(1 - self.level) / 2, (1 + self.level) / 2])
        return float(lo), float(hi)

    def interval(self, name: str) -> tuple[float, float]:
        """Percentile interval of a parameter (E, A, B, alpha, beta, a, b)."""
        return self._q(self._values(name))

    def _values(self, name: str) -> np.ndarray:
        if name in self.names:
            return self.samples[:, self.names.index(name)]
        # a and b only where the resample has a frontier (alpha, beta > 0).
        alpha, beta = self.samples[self.valid, 3], self.samples[self.valid, 4]
        if name == "a":
            return beta / (alpha + beta)
        if name == "b":
            return alpha / (alpha + beta)
        raise unknown_name_error("name", name, [*self.names, "a", "b"], owner="BootstrapResult.interval")

    def compute_optimal_interval(self, flops: float) -> dict[str, tuple[float, float]]:
        """Intervals of N_opt and D_opt at a budget, from the resampled laws that have a frontier."""
        c = float(check_array("flops", [flops], positive=True, owner="compute_optimal_interval")[0])
        e, a_, b_, alpha, beta = self.samples[self.valid].T
        n_opt, d_opt = _frontier(np.full(len(e), c), a_, b_, alpha, beta)
        return {"n_params": self._q(n_opt), "n_tokens": self._q(d_opt)}

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
        """Share of resamples with alpha, beta > 0 (used for a, b and the N_opt, D_opt intervals)."""
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
    alpha, beta = np.asarray(alpha, np.float64), np.asarray(beta, np.float64)
    g = _g(A, B, alpha, beta)
    c6 = np.asarray(c, dtype=np.float64) / 6.0
    with np.errstate(invalid="ignore", divide="ignore"):
        s = alpha + beta
        return g * c6 ** (beta / s), c6 ** (alpha / s) / g


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


def _check_runs(n_params, n_tokens, loss, owner: str, min_runs: int):
    n = check_array("n_params", n_params, positive=True, owner=owner)
    d = check_array("n_tokens", n_tokens, positive=True, owner=owner)
    l = check_array("loss", loss, positive=True, owner=owner)
    check_consistent_length(owner=owner, n_params=n, n_tokens=d, loss=l)
    if n.size < min_runs:
        raise InvalidParameterError(
            f"{owner} needs at least {min_runs} runs to fit the 5 parameters (E, A, B, alpha, beta) "
            f"with a residual to spare. Got {n.size}."
        )
    return n, d, l


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
    key = str(name_or_path)
    if key.lower() in LAWS:
        return LAWS[key.lower()]
    p = Path(key)
    if p.suffix == ".json" or p.exists():
        if not p.exists():
            raise InvalidParameterError(f"The 'law' parameter names a file that does not exist: {key!r}.")
        return ParametricScalingLaw.from_dict(read_json(p))
    raise unknown_name_error("law", key, [*LAWS, "<path to a fitted law .json>"], owner="get_law")
