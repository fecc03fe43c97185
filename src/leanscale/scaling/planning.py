"""Plan a training run from a scaling law: N and D for a budget, or the budget for N or D."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from leanscale.core.errors import InvalidParameterError
from leanscale.core.validation import Interval, check_param
from leanscale.scaling.flops import gpu_hours
from leanscale.scaling.laws import ParametricScalingLaw, get_law

__all__ = ["Plan", "plan"]

# Smallest model behind each preset: both fits use Chinchilla's runs, 70M to 16B parameters
# (Hoffmann et al. 2022, section 3). Below it the law is an extrapolation.
_PRESET_MIN_PARAMS = {"chinchilla": 7e7, "epoch": 7e7}


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

    def to_dict(self) -> dict:
        return asdict(self)


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

    Raises:
        InvalidParameterError: none or all three given, non-positive values, an unknown law, or a
            plan whose model is smaller than the smallest model behind the law (pass
            ``extrapolate=True`` to allow it).
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
        check_param(key, val, [Interval("real", 0, None, closed="neither")], owner="plan")
    if gpu is not None:
        check_param("mfu", mfu, [Interval(float, 0, 1, closed="right")], owner="plan")

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
    n_opt, d_opt = law.compute_optimal(c)
    optimal = bool(abs(np.log(n / n_opt)) < 1e-6)
    hours = gpu_hours(c, gpu, mfu) if gpu is not None else None
    return Plan(
        law=getattr(law, "name_", None) or "fitted",
        flops=c, n_params=n, n_tokens=d, tokens_per_param=d / n,
        predicted_loss=float(law.predict(n, d)), optimal=optimal,
        compute_optimal_loss=float(law.predict(n_opt, d_opt)),
        gpu=gpu, mfu=mfu if gpu is not None else None, gpu_hours=hours,
    )
