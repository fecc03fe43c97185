"""The estimator maths of the gradient noise scale (McCandlish et al. 2018, Appendix A).

From squared gradient norms measured at two batch sizes ``B_small < B_big``,
:func:`two_batch_estimates` gives unbiased estimates of ``|G|^2`` and ``tr(Sigma)``; the private
helpers here turn them into ``B_simple`` with the package's conventions (:func:`_ratio`), say when
an estimate cannot be trusted (:func:`_unreliable_reason`, :func:`_relative_error`) and read
squared norms given as numbers, tensors or sequences. No state: the smoothing lives in
:class:`~leanscale.large_batch.noise_scale.GradientNoiseScale`.

Example:
    >>> est = two_batch_estimates(2.0, 8, 1.25, 64)  # |G_small|^2 at B=8, |G_big|^2 at B=64
    >>> round(est.grad_sq_norm, 4), round(est.trace_sigma, 4), round(_ratio(est.trace_sigma, est.grad_sq_norm), 2)
    (1.1429, 6.8571, 6.0)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from leanscale.core.errors import InvalidParameterError
from leanscale.core.validation import Interval, check_param

__all__ = ["NoiseEstimates", "two_batch_estimates"]

_POSITIVE = [Interval("real", 0, None, closed="neither")]


class NoiseEstimates(NamedTuple):
    """The two unbiased estimates of one measurement."""

    grad_sq_norm: float  # |G|^2, squared norm of the true gradient
    trace_sigma: float  # tr(Sigma), summed variance of the per-example gradients


def _check_batches(batch_small, batch_big, owner: str) -> tuple[float, float]:
    check_param("batch_small", batch_small, _POSITIVE, owner=owner)
    check_param("batch_big", batch_big, _POSITIVE, owner=owner)
    if not math.isfinite(float(batch_big)):
        raise InvalidParameterError(
            f"The 'batch_big' parameter of {owner} must be a finite number. Got {batch_big!r} instead."
        )
    if not batch_big > batch_small:
        raise InvalidParameterError(
            f"The 'batch_big' parameter of {owner} must be greater than batch_small ({batch_small!r}): "
            f"the estimators compare two different batch sizes. Got {batch_big!r} instead."
        )
    return float(batch_small), float(batch_big)


def two_batch_estimates(
    small_sq_norm: float, batch_small: float, big_sq_norm: float, batch_big: float
) -> NoiseEstimates:
    """McCandlish et al.'s unbiased estimates of ``|G|^2`` and ``tr(Sigma)`` (Appendix A).

    Args:
        small_sq_norm: ``|G_small|^2``, squared norm of a batch-``batch_small`` gradient (or the
            mean of several such squared norms).
        batch_small: ``B_small`` (> 0). With small batches of different sizes ``b_i``, pass their
            harmonic mean ``1 / mean(1 / b_i)``: then ``E mean_i |G_i|^2 = |G|^2 + tr(Sigma)/B_small``.
        big_sq_norm: ``|G_big|^2``, squared norm of a batch-``batch_big`` gradient.
        batch_big: ``B_big`` (> ``batch_small``).

    Returns:
        ``NoiseEstimates(grad_sq_norm, trace_sigma)``; either may be negative for a single
        measurement (they are unbiased, not clipped). Non-finite norms propagate.

    Raises:
        InvalidParameterError: a non-positive batch size or ``batch_big <= batch_small``.
    """
    owner = "two_batch_estimates"
    b_small, b_big = _check_batches(batch_small, batch_big, owner)
    small = _one_float("small_sq_norm", small_sq_norm, owner)
    big = _one_float("big_sq_norm", big_sq_norm, owner)
    grad_sq_norm = (b_big * big - b_small * small) / (b_big - b_small)
    trace_sigma = (small - big) / (1.0 / b_small - 1.0 / b_big)
    return NoiseEstimates(grad_sq_norm, trace_sigma)


def _one_float(name: str, value: Any, owner: str) -> float:
    """A squared norm given as a number or a one-element tensor/array (NaN and inf pass through)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.item())
    if isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind in "iuf":
        return float(value.item())
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
        return float(value)
    raise InvalidParameterError(
        f"The {name!r} parameter of {owner} must be a number (a squared gradient norm). "
        f"Got {type(value).__name__} {value!r} instead."
    )


def _unreliable_reason(grad_sq_norm: float, trace_sigma: float, relative_error: float | None = None) -> str | None:
    """Why a (smoothed or single) estimate of B_simple cannot be trusted, or None when it can."""
    if not (math.isfinite(grad_sq_norm) and math.isfinite(trace_sigma)):
        return "the gradients were not finite, so nothing was measured"
    if grad_sq_norm == 0 and trace_sigma == 0:
        return ("every gradient was zero (the loss does not depend on the trainable parameters, or "
                "the model sits at an exact minimum), so there is no noise scale to measure")
    if grad_sq_norm <= 0:
        return (f"the |G|^2 estimate is {grad_sq_norm:.3g} <= 0: the true gradient is not resolved above the "
                f"noise at these batch sizes (B_simple would read inf, which only means 'larger than these "
                f"batches can resolve'); measure with more or larger batches")
    if trace_sigma <= 0:
        return (f"the tr(Sigma) estimate is {trace_sigma:.3g} <= 0: the gradient noise is not resolved at these "
                f"batch sizes (B_simple would read 0, which is not a measurement); measure with more batches")
    if relative_error is not None and relative_error > _MAX_RELATIVE_ERROR:
        return (f"the estimate's relative standard error is about {relative_error:.0%} (more than "
                f"{_MAX_RELATIVE_ERROR:.0%}): the small-batch squared norms vary too much for this few batches; "
                f"measure with more batches")
    return None


# Above this relative standard error (first-order, from the spread of the small-batch squared norms)
# a single measurement of B_simple is reported as unreliable.
_MAX_RELATIVE_ERROR = 1.0


def _relative_error(small_sq: Sequence[float], b_small: float, b_big: float,
                    grad_sq_norm: float, trace_sigma: float) -> float | None:
    """First-order relative standard error of ``tr(Sigma) / |G|^2`` from the spread of the small-batch
    squared norms (the big-batch norm is treated as exact; both estimates move with the same mean,
    in opposite directions, so their relative errors add)."""
    k = len(small_sq)
    if k < 2 or not (grad_sq_norm > 0 and trace_sigma > 0):
        return None
    se = float(np.std(np.asarray(small_sq, dtype=np.float64), ddof=1)) / math.sqrt(k)
    se_g2 = b_small * se / (b_big - b_small)
    se_tr = se / (1.0 / b_small - 1.0 / b_big)
    return se_g2 / grad_sq_norm + se_tr / trace_sigma


def _ratio(trace_sigma: float, grad_sq_norm: float) -> float:
    """``tr(Sigma) / |G|^2`` with the documented conventions: inf when ``|G|^2 <= 0``, and a
    negative ``tr(Sigma)`` (noise below what the two batches resolve) counts as 0."""
    if not grad_sq_norm > 0:
        return math.inf
    return max(trace_sigma, 0.0) / grad_sq_norm


def _as_floats(name: str, value: Any, owner: str) -> list[float]:
    """Squared norms given as a number, a tensor (any shape) or a sequence of numbers/tensors."""

    def one(v) -> list[float]:
        if isinstance(v, torch.Tensor):
            return v.detach().to(torch.float64).cpu().reshape(-1).tolist()
        if isinstance(v, np.ndarray):
            return np.asarray(v, dtype=np.float64).ravel().tolist()
        if isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)):
            return [float(v)]
        raise InvalidParameterError(
            f"The {name!r} parameter of {owner} must be a number, a tensor or a sequence of numbers "
            f"(squared gradient norms). Got {type(v).__name__} instead."
        )

    if isinstance(value, (list, tuple)):
        values = [x for v in value for x in one(v)]
    else:
        values = one(value)
    if not values:
        raise InvalidParameterError(
            f"The {name!r} parameter of {owner} must hold at least one squared norm. Got an empty {type(value).__name__}."
        )
    return values
