"""Data-constrained scaling: plan N and D when only ``unique_tokens`` unique tokens exist.

Muennighoff et al. 2023, "Scaling Data-Constrained Language Models" (arXiv 2305.16264), section 3.1
and appendix A. Repeated tokens and excess parameters are worth less than fresh ones; their value
decays exponentially, which replaces N and D in L(N, D) = E + A/N^alpha + B/D^beta by

- the effective data   D' = U_D + U_D R_D* (1 - exp(-R_D / R_D*)),   R_D = D / U_D - 1 (repeats),
- the effective model  N' = U_N + U_N R_N* (1 - exp(-R_N / R_N*)),   R_N = N / U_N - 1,

with U_D = min(U, D) the unique tokens seen and U_N = min(N_opt(U_D), N), N_opt(U_D) the size for
which U_D tokens are compute-optimal (appendix A). With R_D = R_N = 0 (one pass, no excess
parameters) the law is the single-epoch law. The fitted constants (appendix A, table of fits;
the authors' repository ``huggingface/datablations``, "Parametric Fit") are R_D* = 15.387756 and
R_N* = 5.309743: D' plateaus at U (1 + R_D*) = 16.4 U, so beyond ~16 epochs repetition adds
(almost) nothing, while up to ~4 epochs it is nearly as good as new data.

The decay constants were fitted together with the paper's own C4 law (:data:`MUENNIGHOFF_2023`:
E = 1.87, A = 521, B = 1488, alpha = beta = 0.353). Applied to another law (e.g. Epoch's refit of
Chinchilla, the planner's default) they are a transfer, not a fit.

Example:
    >>> from leanscale.scaling.data_constrained import MUENNIGHOFF_2023, data_constrained_loss
    >>> round(data_constrained_loss(MUENNIGHOFF_2023, 6.34e9, 242e9, 25e9), 6)  # Figure 1 (right)
    2.225644
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from leanscale.core.errors import InvalidParameterError
from leanscale.core.validation import Interval, check_array, check_param
from leanscale.scaling.flops import gpu_hours
from leanscale.scaling.laws import ParametricScalingLaw, _warn, get_law
from leanscale.scaling.planning import _extrapolation_warnings, _smallest_model

__all__ = [
    "MUENNIGHOFF_2023",
    "R_D_STAR",
    "R_N_STAR",
    "DataConstrainedPlan",
    "data_constrained_loss",
    "effective_data",
    "effective_params",
    "plan_data_constrained",
]

# Muennighoff et al. 2023, appendix A: the decay constants of repeated data and excess parameters.
R_D_STAR = 15.387756
R_N_STAR = 5.309743
# The paper's single-epoch law on C4 (appendix A, eq. for L(U_D, R_N, R_D): 521, 1488, 0.35, 1.87),
# exactly as the authors' repository gives it: log A, log B, log E = 6.255414, 7.3049974, 0.6254804.
MUENNIGHOFF_2023 = ParametricScalingLaw.from_params(
    E=math.exp(0.6254804), A=math.exp(6.255414), B=math.exp(7.3049974), alpha=0.3526596, beta=0.3526596,
    name="muennighoff",
)
# The runs behind R_D* and R_N*: 182 models of 7M-9B parameters, 1 to 500 epochs (appendix A).
FIT_MAX_EPOCHS = 500.0
_PRESETS = {"muennighoff": MUENNIGHOFF_2023}


def _law(law) -> ParametricScalingLaw:
    if isinstance(law, ParametricScalingLaw):
        return law
    if isinstance(law, str) and law.lower() in _PRESETS:
        return _PRESETS[law.lower()]
    return get_law(law)


def _check_star(name: str, value: float, owner: str) -> float:
    # math.inf is allowed: no decay, the single-epoch law (the paper's "set them to infinity").
    check_param(name, value, [Interval("real", 0, None, closed="neither")], owner=owner)
    return float(value)


def _decayed(unique, repeats, r_star):
    """U + U R* (1 - exp(-R / R*)) with R* = inf meaning no decay (U (1 + R))."""
    if math.isinf(r_star):
        return unique * (1.0 + repeats)
    return unique + unique * r_star * -np.expm1(-repeats / r_star)


def effective_data(unique_tokens, n_tokens, r_star: float = R_D_STAR):
    """Effective data D' of training on ``n_tokens`` tokens drawn from ``unique_tokens`` unique ones.

    D' = U_D + U_D R_D* (1 - exp(-R_D / R_D*)) with U_D = min(U, D) and R_D = D / U_D - 1
    (Muennighoff et al. 2023, section 3.1). D' = D for one pass or less; D' -> U (1 + R_D*) as the
    epochs grow. Arrays broadcast.

    Raises:
        InvalidParameterError: a value that is not positive and finite, or ``r_star`` <= 0.
    """
    u = check_array("unique_tokens", unique_tokens, ndim=None, positive=True, owner="effective_data")
    d = check_array("n_tokens", n_tokens, ndim=None, positive=True, owner="effective_data")
    r_star = _check_star("r_star", r_star, "effective_data")
    u_d = np.minimum(u, d)
    out = _decayed(u_d, d / u_d - 1.0, r_star)
    return float(out) if out.ndim == 0 else out


def effective_params(n_params, unique_tokens, law="muennighoff", r_star: float = R_N_STAR):
    """Effective parameters N' of a model of ``n_params`` trained on ``unique_tokens`` unique tokens.

    N' = U_N + U_N R_N* (1 - exp(-R_N / R_N*)) with U_N = min(N_opt(U_D), N), the size for which
    the unique tokens are compute-optimal under ``law``, and R_N = N / U_N - 1 (Muennighoff et al.
    2023, appendix A). Pass the unique tokens actually seen, min(U, D). Arrays broadcast.
    """
    law = _law(law)
    n = check_array("n_params", n_params, ndim=None, positive=True, owner="effective_params")
    u = check_array("unique_tokens", unique_tokens, ndim=None, positive=True, owner="effective_params")
    r_star = _check_star("r_star", r_star, "effective_params")
    u_n = np.minimum(law.optimal_params(u), n)
    out = _decayed(u_n, n / u_n - 1.0, r_star)
    return float(out) if out.ndim == 0 else out


def data_constrained_loss(law, n_params, n_tokens, unique_tokens, *, r_d_star: float = R_D_STAR,
                          r_n_star: float = R_N_STAR):
    """L = E + A / N'^alpha + B / D'^beta: the loss of ``n_params`` trained on ``n_tokens`` tokens
    of which ``unique_tokens`` are unique (repeated for D / U epochs). Arrays broadcast.

    ``law`` is a :class:`~leanscale.scaling.ParametricScalingLaw`, a preset name (``"muennighoff"``,
    ``"chinchilla"``, ``"epoch"``) or a law file. ``r_d_star = r_n_star = math.inf`` gives the
    single-epoch law itself.
    """
    law = _law(law)
    n = check_array("n_params", n_params, ndim=None, positive=True, owner="data_constrained_loss")
    d = check_array("n_tokens", n_tokens, ndim=None, positive=True, owner="data_constrained_loss")
    u = check_array("unique_tokens", unique_tokens, ndim=None, positive=True, owner="data_constrained_loss")
    r_d_star = _check_star("r_d_star", r_d_star, "data_constrained_loss")
    r_n_star = _check_star("r_n_star", r_n_star, "data_constrained_loss")
    out = _loss(law, n, d, u, r_d_star, r_n_star)
    return float(out) if out.ndim == 0 else out


def _loss(law, n, d, u, r_d_star, r_n_star):
    u_d = np.minimum(u, d)
    d_eff = _decayed(u_d, d / u_d - 1.0, r_d_star)
    u_n = np.minimum(law.optimal_params(u_d), n)
    n_eff = _decayed(u_n, n / u_n - 1.0, r_n_star)
    return law.E_ + law.A_ / n_eff**law.alpha_ + law.B_ / d_eff**law.beta_


@dataclass
class DataConstrainedPlan:
    """The N and D that minimise the data-constrained loss for a budget and a unique-token supply."""

    law: str
    flops: float
    unique_tokens: float
    n_params: float
    n_tokens: float
    tokens_per_param: float
    epochs: float  # n_tokens / unique_tokens (below 1: part of the data is never seen)
    effective_tokens: float  # D'
    effective_params: float  # N'
    predicted_loss: float  # data-constrained loss of this plan
    unlimited_n_params: float  # compute-optimal plan of the same budget with unlimited unique data
    unlimited_n_tokens: float
    unlimited_loss: float
    loss_penalty: float  # predicted_loss - unlimited_loss (nats per token), >= 0
    r_d_star: float
    r_n_star: float
    gpu: str | None = None
    mfu: float | None = None
    gpu_hours: float | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _golden_min(f, lo: float, hi: float, iters: int = 120) -> float:
    """Minimiser of a unimodal ``f`` on [lo, hi] (golden-section search)."""
    g = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if b - a < 1e-13 * max(1.0, abs(a)):
            break
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return (a + b) / 2.0


def plan_data_constrained(
    law: ParametricScalingLaw | str = "epoch",
    *,
    flops: float,
    unique_tokens: float,
    r_d_star: float = R_D_STAR,
    r_n_star: float = R_N_STAR,
    gpu: str | None = None,
    mfu: float = 0.4,
    extrapolate: bool = False,
) -> DataConstrainedPlan:
    """N, D and the epochs that minimise the data-constrained loss for ``flops`` (C = 6 N D) when
    only ``unique_tokens`` unique tokens exist (Muennighoff et al. 2023).

    The loss along C = 6 N D is scanned on a grid of 801 sizes over 8 decades around the
    unconstrained optimum, then refined by golden-section search around the best grid point.
    With ``unique_tokens`` at least the unconstrained optimum's D the plan is that optimum (one
    pass over part of the data, no penalty).

    Warnings (a :class:`~leanscale.scaling.ScalingWarning` each, and in ``warnings``): more than
    1 + R_D* (~16.4) epochs, where repeating adds almost nothing; more than the 500 epochs of the
    runs behind R_D*; more than 1 + R_N* times the parameters that are compute-optimal for the
    unique data; and :func:`~leanscale.scaling.plan`'s extrapolation warnings for the law.

    Raises:
        InvalidParameterError: ``flops`` or ``unique_tokens`` not positive and finite (or a string,
            a bool), ``r_d_star``/``r_n_star`` <= 0, an unknown law or GPU, or a plan whose model is
            below the smallest one behind the law (pass ``extrapolate=True``).
    """
    owner = "plan_data_constrained"
    law = _law(law)
    check_param("flops", flops, [Interval("real", 0, math.inf, closed="neither")], owner=owner)
    check_param("unique_tokens", unique_tokens, [Interval("real", 0, math.inf, closed="neither")], owner=owner)
    r_d_star = _check_star("r_d_star", r_d_star, owner)
    r_n_star = _check_star("r_n_star", r_n_star, owner)
    check_param("mfu", mfu, [Interval(float, 0, 1, closed="right")], owner=owner)
    c, u = float(flops), float(unique_tokens)

    n_opt, d_opt = law.compute_optimal(c)
    loss_opt = float(law.predict(n_opt, d_opt))
    if not all(math.isfinite(v) and v > 0 for v in (n_opt, d_opt)):
        raise InvalidParameterError(
            f"The 'flops' parameter of {owner} gives an unconstrained plan N={n_opt:.3g}, D={d_opt:.3g} that "
            f"overflows or underflows double precision. Got {c!r}; use a budget within the law's range.")
    try:  # U_N of the unique tokens themselves: a U that no model size matches is refused here
        law.optimal_params(min(u, d_opt))
    except InvalidParameterError:
        raise InvalidParameterError(
            f"The 'unique_tokens' parameter of {owner} is so far from the law's range that the model size for "
            f"which it is compute-optimal overflows or underflows double precision. Got {u!r}.") from None
    if u >= d_opt:
        n, d = n_opt, d_opt
    else:
        def f(log_n):
            nn = np.exp(log_n)
            return _loss(law, nn, c / (6.0 * nn), u, r_d_star, r_n_star)

        # (801,) log N from 1e-4x to 1e4x the unconstrained optimum
        grid = math.log(n_opt) + np.linspace(-4.0, 4.0, 801) * math.log(10.0)
        with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
            vals = f(grid)
        vals = np.where(np.isfinite(vals), vals, np.inf)
        i = int(np.argmin(vals))
        if i in (0, grid.size - 1) or not np.isfinite(vals[i]):
            raise InvalidParameterError(
                f"The 'unique_tokens' parameter of {owner} is too small for a budget of {c:.3g} FLOPs: the "
                f"data-constrained loss keeps falling to the edge of the sizes searched ({math.exp(grid[0]):.3g}-"
                f"{math.exp(grid[-1]):.3g} parameters), i.e. the plan would repeat the data "
                f"{c / (6.0 * math.exp(grid[i])) / u:.3g} times. Got {u!r}; use more unique tokens or a smaller "
                "budget.")
        lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
        log_n = _golden_min(lambda x: float(f(np.float64(x))), float(lo), float(hi))
        n = float(math.exp(log_n))
        d = c / (6.0 * n)

    n_min = _smallest_model(law)
    if not extrapolate and n_min is not None and n < n_min:
        raise InvalidParameterError(
            f"The 'flops' parameter of {owner} gives a model of {n:.3g} parameters, below the smallest model "
            f"({n_min:.3g}) behind the law {getattr(law, 'name_', None) or 'fitted on runs'}: the law would be "
            f"extrapolated. Got {c:.3g}. Pass extrapolate=True (--extrapolate) to plan anyway.")

    hours = gpu_hours(c, gpu, mfu) if gpu is not None else None  # an unknown GPU fails before warnings
    u_d = min(u, d)
    d_eff = float(_decayed(np.float64(u_d), d / u_d - 1.0, r_d_star))
    u_n = min(float(law.optimal_params(u_d)), n)
    n_eff = float(_decayed(np.float64(u_n), n / u_n - 1.0, r_n_star))
    loss = float(_loss(law, np.float64(n), np.float64(d), np.float64(u), r_d_star, r_n_star))
    epochs = d / u

    notes = [f"The law itself was flagged when it was fitted: {w}" for w in getattr(law, "warnings_", [])]
    notes += _extrapolation_warnings(law, c, n)
    if epochs > 1.0 + r_d_star:
        plateau = u * (1.0 + r_d_star)
        notes.append(
            f"The plan repeats the data {epochs:.3g} epochs, beyond 1 + R_D* = {1.0 + r_d_star:.3g} where "
            f"Muennighoff et al. find the returns of repetition vanish: its effective data ({d_eff:.3g} tokens) is "
            f"{100.0 * d_eff / plateau:.3g}% of the plateau U (1 + R_D*) = {plateau:.3g} that no amount of "
            "repetition exceeds. More unique data (or a smaller budget) helps far more than more epochs.")
    if epochs > FIT_MAX_EPOCHS:
        notes.append(
            f"The plan repeats the data {epochs:.3g} epochs, beyond the {FIT_MAX_EPOCHS:g} epochs of the runs "
            "behind R_D* and R_N* (Muennighoff et al., appendix A): the decay is extrapolated.")
    if n / u_n - 1.0 > r_n_star:
        notes.append(
            f"The model has {n / u_n:.3g}x the parameters that are compute-optimal for the unique data seen "
            f"({u_n:.3g}), beyond 1 + R_N* = {1.0 + r_n_star:.3g}: excess parameters add little.")
    _warn(notes)
    return DataConstrainedPlan(
        law=getattr(law, "name_", None) or "fitted", flops=c, unique_tokens=u, n_params=n, n_tokens=d,
        tokens_per_param=d / n, epochs=epochs, effective_tokens=d_eff, effective_params=n_eff,
        predicted_loss=loss, unlimited_n_params=float(n_opt), unlimited_n_tokens=float(d_opt),
        unlimited_loss=loss_opt, loss_penalty=max(loss - loss_opt, 0.0), r_d_star=r_d_star, r_n_star=r_n_star,
        gpu=gpu, mfu=mfu if gpu is not None else None, gpu_hours=hours, warnings=notes,
    )
