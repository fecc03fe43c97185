"""Inference-aware planning: the N and D that reach a loss with the fewest training + inference FLOPs.

Sardana et al. 2024, "Beyond Chinchilla-Optimal: Accounting for Inference in Language Model
Scaling Laws" (arXiv 2401.00448), section 2 (compute-optimal): for a quality (loss) ``l`` and an
expected inference demand of ``D_inf`` tokens, minimise

    6 N D_tr + 2 N D_inf    subject to    L(N, D_tr) = E + A/N^alpha + B/D_tr^beta = l.

On the constraint D_tr(N) = (B / (l - E - A/N^alpha))^(1/beta), defined for N above the size
N_min = (A / (l - E))^(1/alpha) that would need infinite data. The paper solves the first-order
condition numerically (Newton's method); here the same condition,

    6 D_tr (1 - alpha A N^-alpha / (beta (l - E - A N^-alpha))) + 2 D_inf = 0,

is solved by bisection in log N between N_min and the Chinchilla-optimal size of the same loss,
where the left side is negative and non-negative respectively. With D_inf = 0 the condition is
Chinchilla's own (the model term is beta / (alpha + beta) of the reducible loss), so the plan is
the Chinchilla-optimal one; the more inference, the smaller and longer-trained the model.

Example:
    >>> from leanscale.scaling.inference_aware import plan_inference_aware
    >>> p = plan_inference_aware("chinchilla", inference_tokens=2e12, n_params=13e9)
    >>> p.n_params < 13e9 < p.chinchilla_n_params * 1.0001 and p.total_flops < p.chinchilla_total_flops
    True
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from leanscale.core.errors import InvalidParameterError
from leanscale.core.validation import Interval, check_array, check_param
from leanscale.scaling.data_constrained import _law
from leanscale.scaling.flops import gpu_hours
from leanscale.scaling.laws import ParametricScalingLaw, _check_frontier, _warn
from leanscale.scaling.planning import _extrapolation_warnings, _smallest_model

__all__ = ["InferencePlan", "chinchilla_optimal_for_loss", "plan_inference_aware", "tokens_for_loss"]

# Sardana et al. trained up to 10,000 tokens per parameter and found that laws fitted at typical
# ratios overestimate the gain from more tokens at extreme ratios (section 4); beyond this many
# tokens per parameter the plan is flagged.
EXTREME_TOKENS_PER_PARAM = 1000.0


def _reducible(law: ParametricScalingLaw, target_loss: float, owner: str) -> float:
    r = float(target_loss) - law.E_
    if not r > 0:
        raise InvalidParameterError(
            f"The 'target_loss' parameter of {owner} must exceed the law's irreducible loss E = {law.E_:.4g} "
            f"(no finite model reaches it). Got {target_loss!r}.")
    return r


def chinchilla_optimal_for_loss(law, target_loss: float) -> tuple[float, float]:
    """``(N, D)`` of the compute-optimal (Chinchilla) run that reaches ``target_loss``, closed form.

    On the frontier the model term is beta/(alpha+beta) and the data term alpha/(alpha+beta) of the
    reducible loss l - E: N = (A (alpha+beta) / (beta (l-E)))^(1/alpha), D = (B (alpha+beta) /
    (alpha (l-E)))^(1/beta).
    """
    law = _law(law)
    _check_frontier(law)
    check_param("target_loss", target_loss, [Interval("real", 0, math.inf, closed="neither")],
                owner="chinchilla_optimal_for_loss")
    r = _reducible(law, target_loss, "chinchilla_optimal_for_loss")
    s = law.alpha_ + law.beta_
    with np.errstate(over="ignore"):
        n = math.exp((math.log(law.A_ * s) - math.log(law.beta_ * r)) / law.alpha_)
        d = math.exp((math.log(law.B_ * s) - math.log(law.alpha_ * r)) / law.beta_)
    return n, d


def tokens_for_loss(law, n_params, target_loss: float):
    """Training tokens with which a model of ``n_params`` reaches ``target_loss`` (inf where it
    cannot: N at or below (A / (l - E))^(1/alpha)). Arrays broadcast."""
    law = _law(law)
    n = check_array("n_params", n_params, ndim=None, positive=True, owner="tokens_for_loss")
    check_param("target_loss", target_loss, [Interval("real", 0, math.inf, closed="neither")], owner="tokens_for_loss")
    r = _reducible(law, target_loss, "tokens_for_loss")
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        u = r - law.A_ / n**law.alpha_
        d = np.where(u > 0, np.exp((math.log(law.B_) - np.log(np.where(u > 0, u, 1.0))) / law.beta_), np.inf)
    return float(d) if d.ndim == 0 else d


@dataclass
class InferencePlan:
    """The run that reaches ``target_loss`` with the fewest training + inference FLOPs, next to the
    Chinchilla-optimal run of the same loss. FLOPs: training 6 N D, inference 2 N D_inf."""

    law: str
    inference_tokens: float
    target_loss: float
    reference: str  # what fixed the loss: "flops", "n_params" (a Chinchilla-optimal model) or "target_loss"
    n_params: float
    n_tokens: float
    tokens_per_param: float
    training_flops: float
    inference_flops: float
    total_flops: float
    chinchilla_n_params: float
    chinchilla_n_tokens: float
    chinchilla_tokens_per_param: float
    chinchilla_training_flops: float
    chinchilla_inference_flops: float
    chinchilla_total_flops: float
    flops_saved: float  # chinchilla_total_flops - total_flops, >= 0
    saving_fraction: float  # flops_saved / chinchilla_total_flops
    gpu: str | None = None
    mfu: float | None = None
    gpu_hours: float | None = None  # of the training run
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _optimal_size(law: ParametricScalingLaw, r: float, d_inf: float, n_chin: float) -> float:
    """log-space bisection of the first-order condition between N_min and the Chinchilla size."""
    a_, b_, al, be = law.A_, law.B_, law.alpha_, law.beta_
    log_nmin = (math.log(a_) - math.log(r)) / al

    def k(x):  # the condition divided by 6 D_tr > 0: same sign, no overflow
        m = a_ * math.exp(-al * x)  # model term A N^-alpha
        u = r - m  # data term B D^-beta
        if not u > 0:
            return -math.inf
        log_d = (math.log(b_) - math.log(u)) / be
        return 1.0 - al * m / (be * u) + d_inf / 3.0 * math.exp(-log_d)

    hi = math.log(n_chin)
    if k(hi) <= 0.0:  # only D_inf = 0 up to rounding: Chinchilla's own optimum
        return n_chin
    # a point just above N_min where the data term is tiny and the condition is negative
    step = max(hi - log_nmin, 1e-12)
    lo = hi
    for _ in range(200):
        step /= 2.0
        lo = log_nmin + step
        if k(lo) < 0.0:
            break
    else:  # pragma: no cover - the condition tends to -inf at N_min
        return math.exp(lo)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if k(mid) < 0.0:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi))


def plan_inference_aware(
    law: ParametricScalingLaw | str = "epoch",
    *,
    inference_tokens: float,
    flops: float | None = None,
    n_params: float | None = None,
    target_loss: float | None = None,
    gpu: str | None = None,
    mfu: float = 0.4,
    extrapolate: bool = False,
) -> InferencePlan:
    """The model size N and training tokens D that reach a loss with the fewest total FLOPs
    6 N D + 2 N D_inf for ``inference_tokens`` (D_inf) tokens of expected inference demand
    (Sardana et al. 2024).

    Give exactly one of:

    - ``flops``: the loss of the Chinchilla-optimal run of that training budget;
    - ``n_params``: the loss of a Chinchilla-optimal model of that size;
    - ``target_loss``: that loss (above the law's E).

    Warnings (a :class:`~leanscale.scaling.ScalingWarning` each, and in ``warnings``): more than
    1,000 tokens per parameter, where Sardana et al. found laws fitted at usual ratios too
    optimistic about more data, and :func:`~leanscale.scaling.plan`'s extrapolation warnings.

    Raises:
        InvalidParameterError: none or several of ``flops``/``n_params``/``target_loss``; a
            negative or non-finite ``inference_tokens``; a non-positive or non-finite reference;
            a target loss at or below E; an unknown law or GPU; a model below the smallest one behind
            the law (pass ``extrapolate=True``).
    """
    owner = "plan_inference_aware"
    law = _law(law)
    _check_frontier(law)
    check_param("inference_tokens", inference_tokens, [Interval("real", 0, math.inf, closed="left")], owner=owner)
    given = {k: v for k, v in dict(flops=flops, n_params=n_params, target_loss=target_loss).items() if v is not None}
    if len(given) != 1:
        raise InvalidParameterError(
            f"{owner} needs exactly one of 'flops', 'n_params', 'target_loss' (the quality to reach: that of the "
            f"Chinchilla-optimal run of a budget, of a model size, or a loss). Got {sorted(given) or 'none'}.")
    (what, value), = given.items()
    check_param(what, value, [Interval("real", 0, math.inf, closed="neither")], owner=owner)
    check_param("mfu", mfu, [Interval(float, 0, 1, closed="right")], owner=owner)
    d_inf = float(inference_tokens)

    if what == "flops":
        n0, d0 = law.compute_optimal(float(flops))
        loss = float(law.predict(n0, d0))
    elif what == "n_params":
        n0 = float(n_params)
        d0 = float(law.optimal_tokens(n0))
        loss = float(law.predict(n0, d0))
    else:
        loss = float(target_loss)
        _reducible(law, loss, owner)  # the error names this function
        n0, d0 = chinchilla_optimal_for_loss(law, loss)
    if not all(math.isfinite(v) and v > 0 for v in (n0, d0, 6.0 * n0 * d0)):
        raise InvalidParameterError(
            f"The {what!r} parameter of {owner} gives a Chinchilla-optimal run N={n0:.3g}, D={d0:.3g} whose FLOPs "
            f"overflow or underflow double precision. Got {value!r}.")
    if not math.isfinite(2.0 * n0 * d_inf):
        raise InvalidParameterError(
            f"The 'inference_tokens' parameter of {owner} gives inference FLOPs 2 N D_inf that overflow double "
            f"precision (N={n0:.3g}). Got {inference_tokens!r}.")
    r = _reducible(law, loss, owner)
    n = _optimal_size(law, r, d_inf, n0) if d_inf > 0 else n0
    d = float(tokens_for_loss(law, n, loss)) if n != n0 else d0
    if not (math.isfinite(d) and math.isfinite(6.0 * n * d)):
        raise InvalidParameterError(
            f"The 'inference_tokens' parameter of {owner} asks for a model trained on {d:.3g} tokens, a number "
            f"of FLOPs that overflows double precision. Got {inference_tokens!r}.")

    n_min = _smallest_model(law)
    if not extrapolate and n_min is not None and n < n_min:
        raise InvalidParameterError(
            f"The {what!r} parameter of {owner} gives a model of {n:.3g} parameters (for {d_inf:.3g} inference "
            f"tokens), below the smallest model ({n_min:.3g}) behind the law "
            f"{getattr(law, 'name_', None) or 'fitted on runs'}: the law would be extrapolated. Got {value!r}. "
            "Pass extrapolate=True (--extrapolate) to plan anyway.")

    train, infer = 6.0 * n * d, 2.0 * n * d_inf
    hours = gpu_hours(train, gpu, mfu) if gpu is not None else None  # an unknown GPU fails before warnings
    train0, infer0 = 6.0 * n0 * d0, 2.0 * n0 * d_inf
    total, total0 = train + infer, train0 + infer0
    notes = [f"The law itself was flagged when it was fitted: {w}" for w in getattr(law, "warnings_", [])]
    notes += _extrapolation_warnings(law, train, n)
    if d / n > EXTREME_TOKENS_PER_PARAM:
        notes.append(
            f"The plan trains {d / n:.3g} tokens per parameter, beyond {EXTREME_TOKENS_PER_PARAM:g}: Sardana et al. "
            "(section 4) found that laws fitted at usual ratios (~20) overestimate the gain from more tokens at "
            "such ratios, so the model may fall short of the target loss. Check the law at high ratios.")
    _warn(notes)
    saved = max(total0 - total, 0.0)
    return InferencePlan(
        law=getattr(law, "name_", None) or "fitted", inference_tokens=d_inf, target_loss=loss, reference=what,
        n_params=n, n_tokens=d, tokens_per_param=d / n, training_flops=train, inference_flops=infer,
        total_flops=total, chinchilla_n_params=n0, chinchilla_n_tokens=d0, chinchilla_tokens_per_param=d0 / n0,
        chinchilla_training_flops=train0, chinchilla_inference_flops=infer0, chinchilla_total_flops=total0,
        flops_saved=saved, saving_fraction=saved / total0, gpu=gpu, mfu=mfu if gpu is not None else None,
        gpu_hours=hours, warnings=notes,
    )
