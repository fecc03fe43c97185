"""Plan a training run from a scaling law: N and D for a budget, or the budget for N or D."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from leanscale.core.errors import InvalidParameterError
from leanscale.core.validation import Interval, check_param
from leanscale.scaling.flops import gpu_hours
from leanscale.scaling.laws import ParametricScalingLaw, _warn, get_law

__all__ = ["Plan", "plan"]

# Smallest model behind each preset: both fits use Chinchilla's runs, 70M to 16B parameters
# (Hoffmann et al. 2022, section 3). Below it the law is an extrapolation. Muennighoff et al.'s
# C4 law (leanscale.scaling.data_constrained): runs of 7M to 9B parameters (their appendix A).
_PRESET_MIN_PARAMS = {"chinchilla": 7e7, "epoch": 7e7, "muennighoff": 7e6}
_PRESET_MAX_PARAMS = {"chinchilla": 1.6e10, "epoch": 1.6e10, "muennighoff": 9e9}
# A plan beyond this factor past the largest run (FLOPs, or parameters for a preset) is warned about.
EXTRAPOLATION_FACTOR = 10.0


@dataclass
class Plan:
    """A planned run. ``optimal`` is True when N and D sit on the law's compute-optimal frontier."""

    law: str
    flops: float
    n_params: float
    n_tokens: float
    tokens_per_param: float
    predicted_loss: float
    optimal: bool
    compute_optimal_loss: float  # predicted loss of the compute-optimal split of the same budget
    gpu: str | None = None
    mfu: float | None = None
    gpu_hours: float | None = None
    warnings: list[str] = field(default_factory=list)  # why the plan may not be trusted (empty: none)

    def to_dict(self) -> dict:
        return asdict(self)


def _fitted_range(law: ParametricScalingLaw) -> tuple[str, float, float] | None:
    """(quantity, lowest, highest) behind the law: FLOPs 6ND of its runs, or a preset's model sizes."""
    if getattr(law, "n_params_", None) is not None:
        c = 6.0 * np.asarray(law.n_params_) * np.asarray(law.n_tokens_)
        return "FLOPs", float(c.min()), float(c.max())
    name = getattr(law, "name_", None) or ""
    if name in _PRESET_MAX_PARAMS:
        return "parameters", _PRESET_MIN_PARAMS[name], _PRESET_MAX_PARAMS[name]
    return None


def _extrapolation_warnings(law: ParametricScalingLaw, c: float, n: float) -> list[str]:
    rng = _fitted_range(law)
    if rng is None:
        return []
    quantity, lo, hi = rng
    value = c if quantity == "FLOPs" else n
    label = getattr(law, "name_", None) or "fitted"
    if value > hi * EXTRAPOLATION_FACTOR:
        return [(f"The plan ({value:.3g} {quantity}) is {value / hi:.3g}x beyond the largest run behind the "
                 f"{label} law (its runs span {lo:.3g}-{hi:.3g} {quantity}): the law is extrapolated far outside "
                 "the range it was fitted on and its N, D and loss are a guess, not a measurement.")]
    if value < lo / EXTRAPOLATION_FACTOR:
        return [(f"The plan ({value:.3g} {quantity}) is {lo / value:.3g}x below the smallest run behind the "
                 f"{label} law (its runs span {lo:.3g}-{hi:.3g} {quantity}): the law is extrapolated far outside "
                 "the range it was fitted on.")]
    return []


def _smallest_model(law: ParametricScalingLaw) -> float | None:
    if getattr(law, "n_params_", None) is not None:
        return float(np.min(law.n_params_))
    return _PRESET_MIN_PARAMS.get(getattr(law, "name_", None) or "")


def plan(
    law: ParametricScalingLaw | str = "epoch",
    *,
    flops: float | None = None,
    n_params: float | None = None,
    n_tokens: float | None = None,
    gpu: str | None = None,
    mfu: float = 0.4,
    extrapolate: bool = False,
) -> Plan:
    """Plan N, D and C (= 6 N D) from a law.

    Give exactly one or two of ``flops``, ``n_params``, ``n_tokens``:

    - ``flops`` alone: the compute-optimal N and D;
    - ``n_params`` alone: the tokens for which that size is compute-optimal (and the budget);
    - ``n_tokens`` alone: the size for which those tokens are compute-optimal;
    - two of them: the third from C = 6 N D (``optimal`` then tells whether it is on the frontier).

    Warnings (a :class:`~leanscale.scaling.ScalingWarning` each, and listed in ``Plan.warnings``):
    a plan more than 10x beyond the range of the runs behind the law (FLOPs of a fitted law's runs;
    model sizes of a preset), and the law's own warnings (e.g. an unidentifiable fit).

    Raises:
        InvalidParameterError: none or all three given, non-positive or non-finite values, an
            unknown law, or a plan whose model is smaller than the smallest model behind the law
            (pass ``extrapolate=True`` to allow it).
        DataFormatError: a law file that is damaged or lacks a key (the message names both).
    """
    if not isinstance(law, ParametricScalingLaw):
        law = get_law(law)
    given = {k: v for k, v in dict(flops=flops, n_params=n_params, n_tokens=n_tokens).items() if v is not None}
    if not 1 <= len(given) <= 2:
        raise InvalidParameterError(
            "plan needs one or two of 'flops', 'n_params', 'n_tokens' (the third follows from C = 6 N D). "
            f"Got {sorted(given) or 'none'}."
        )
    for key, val in given.items():
        check_param(key, val, [Interval("real", 0, math.inf, closed="neither")], owner="plan")
    check_param("mfu", mfu, [Interval(float, 0, 1, closed="right")], owner="plan")  # also without gpu: no silent typo

    if set(given) == {"flops"}:
        n, d = law.compute_optimal(flops)
    elif set(given) == {"n_params"}:
        n, d = float(n_params), law.optimal_tokens(n_params)
    elif set(given) == {"n_tokens"}:
        n, d = law.optimal_params(n_tokens), float(n_tokens)
    elif set(given) == {"flops", "n_params"}:
        n, d = float(n_params), float(flops) / (6.0 * float(n_params))
    elif set(given) == {"flops", "n_tokens"}:
        n, d = float(flops) / (6.0 * float(n_tokens)), float(n_tokens)
    else:
        n, d = float(n_params), float(n_tokens)
    c = 6.0 * n * d
    n_min = _smallest_model(law)
    if not extrapolate and n_min is not None and n < n_min:
        c_min = 6.0 * n_min * law.optimal_tokens(n_min)
        what = "flops" if "flops" in given else ("n_tokens" if "n_tokens" in given else "n_params")
        raise InvalidParameterError(
            f"The {what!r} parameter of plan gives a model of {n:.3g} parameters, below the smallest model "
            f"({n_min:.3g}) behind the law {getattr(law, 'name_', None) or 'fitted on runs'}: the law would be "
            f"extrapolated. Expected a budget of at least {c_min:.3g} FLOPs (a compute-optimal {n_min:.3g}-"
            f"parameter model). Got {given[what]:.3g}. Pass extrapolate=True (--extrapolate) to plan anyway."
        )
    if not (math.isfinite(c) and c > 0 and math.isfinite(n) and n > 0 and math.isfinite(d) and d > 0):
        what = next(iter(given))
        raise InvalidParameterError(
            f"The {what!r} parameter of plan gives N={n:.3g}, D={d:.3g}, C={c:.3g}: a number that overflows or "
            f"underflows double precision. Got {given[what]!r}; use a value within the law's range.")
    n_opt, d_opt = law.compute_optimal(c)
    optimal = bool(abs(np.log(n / n_opt)) < 1e-6)
    hours = gpu_hours(c, gpu, mfu) if gpu is not None else None
    notes = [f"The law itself was flagged when it was fitted: {w}" for w in getattr(law, "warnings_", [])]
    notes += _extrapolation_warnings(law, c, n)
    _warn(notes)
    return Plan(
        law=getattr(law, "name_", None) or "fitted",
        flops=c, n_params=n, n_tokens=d, tokens_per_param=d / n,
        predicted_loss=float(law.predict(n, d)), optimal=optimal,
        compute_optimal_loss=float(law.predict(n_opt, d_opt)),
        gpu=gpu, mfu=mfu if gpu is not None else None, gpu_hours=hours, warnings=notes,
    )
