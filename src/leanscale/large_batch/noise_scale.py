"""The gradient noise scale B_simple and the batch size and learning rate it suggests.

McCandlish, Kaplan, Amodei & the OpenAI Dota Team 2018, "An Empirical Model of Large-Batch
Training", arXiv 1812.06162.

**The quantity.** Let ``G`` be the true gradient of the loss and ``Sigma`` the covariance of the
per-example gradients. A batch of ``B`` i.i.d. examples gives a gradient ``G_B`` with (their eq. A.1)::

    E |G_B|^2 = |G|^2 + tr(Sigma) / B

The *simple noise scale* ``B_simple = tr(Sigma) / |G|^2`` is the batch size at which the noise
and the signal in ``G_B`` have equal size. It approximates the noise scale
``B_noise = tr(H Sigma) / (G^T H G)`` (``H`` the Hessian) -- exactly when ``H`` is a multiple of
the identity -- and ``B_noise`` predicts the *critical batch size*: training to a given loss takes
``S = S_min (1 + B_noise / B)`` optimizer steps and ``E = E_min (1 + B / B_noise)`` examples
(their eqs. 2.11-2.12), so below ``B_noise`` doubling the batch nearly halves the steps and above
it extra examples buy few steps.

**The estimators** (Appendix A). From squared norms measured at two batch sizes
``B_small < B_big``, the unbiased estimates are::

    |G|^2     ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

(:func:`two_batch_estimates`). Their *ratio* is biased (and very noisy), so, as the paper advises,
:class:`GradientNoiseScale` smooths the numerator and the denominator separately with an
exponential moving average, bias-corrected like Adam's moments so the first values are not pulled
towards 0, and only then divides.

**Three ways to measure.**

1. Offline, :func:`measure_noise_scale`: ``n_batches`` small batches of the data, one gradient
   each (no optimizer step); ``G_small`` is each of them, ``G_big`` their mean (the gradient of
   their union). The model is left exactly as it was (weights, ``.grad``, BatchNorm buffers, modes).
2. During ordinary training with gradient accumulation, :meth:`GradientNoiseScale.accumulate`
   after each micro-batch's ``backward()`` and :meth:`GradientNoiseScale.step` after the last:
   small = each micro-batch's gradient (the difference of ``.grad`` between two calls), big = the
   accumulated gradient. ``.grad`` is only read, so the optimizer sees exactly the same gradient.
3. Under DDP, :meth:`GradientNoiseScale.attach_ddp`: a communication hook records each bucket's
   local squared norm before the all-reduce and the averaged one after. small = the rank's local
   gradient (batch ``B_local``; ``|G_small|^2`` is the mean over ranks of the local squared norms,
   one extra all-reduce of a float64 scalar per step), big = the averaged gradient (batch
   ``world_size * B_local``), which is what every rank steps with anyway: no extra backward pass,
   and training is unchanged (the hook returns the averaged bucket as the default one does).

In all three modes the unbiasedness only needs ``E |G_b|^2 = |G|^2 + tr(Sigma)/b`` for each batch,
so it does not matter that the big batch contains the small ones.

**Caveats.**

* ``B_simple`` equals ``B_noise`` only when the Hessian is well conditioned (close to a multiple
  of the identity); otherwise it can be off by a large factor. The paper found it a useful
  predictor of the measured critical batch, but treat it as an order-of-magnitude guide.
* The noise scale grows during training (``|G|`` shrinks faster than the noise), often by an order
  of magnitude: a measurement early in training underestimates the useful batch later on. Measure
  at the stage you plan for, or track it online (modes 2 and 3) and grow the batch.
* The i.i.d. model assumes examples are independent within a batch. BatchNorm in train mode
  couples them; the estimate is then that of the BatchNorm'd training gradient at these batch
  sizes, usually close but not exact. Ghost BatchNorm with a ghost batch <= the small batch keeps
  the small batches independent.
* Per-example clipping or other per-batch non-linear processing of gradients is not modelled.

Example:
    >>> import torch
    >>> gns = GradientNoiseScale(beta=0.9)
    >>> _ = gns.update([2.2, 1.8], 8, 1.25, 64)  # |G_small|^2 at B=8 (two batches), |G_big|^2 at B=64
    >>> round(gns.grad_sq_norm, 4), round(gns.trace_sigma, 4), round(gns.b_simple, 2)
    (1.1429, 6.8571, 6.0)
    >>> advice = advise(400.0, base_lr=0.1, base_batch=128)
    >>> advice.batch_size, round(advice.lr, 3), advice.steps_factor, round(advice.examples_factor, 2)
    (512, 0.232, 1.78125, 2.28)
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from torch import nn

from leanscale.core.errors import InvalidParameterError, NotFittedError
from leanscale.core.validation import Interval, check_param
from leanscale.large_batch._data import (
    check_finite_x,
    check_loss_has_grad,
    check_xy_pair,
    is_xy_pair,
    iter_xy_batches,
    model_loss,
)

__all__ = [
    "BatchAdvice",
    "GradientNoiseScale",
    "NoiseEstimates",
    "NoiseScaleResult",
    "advise",
    "measure_noise_scale",
    "two_batch_estimates",
]

_POSITIVE = [Interval("real", 0, None, closed="neither")]
_OWNER = "GradientNoiseScale"


# --------------------------------------------------------------------------------- estimators
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


# ---------------------------------------------------------------------------------- the class
class GradientNoiseScale:
    """Online estimate of McCandlish et al.'s ``B_simple = tr(Sigma) / |G|^2``.

    Each :meth:`update` turns one two-batch measurement into unbiased estimates of ``|G|^2`` and
    ``tr(Sigma)`` (:func:`two_batch_estimates`), adds each to its own exponential moving average,
    and ``b_simple`` is the ratio of the two bias-corrected averages (see the module docstring for
    why the averages come before the ratio). Feed it directly with :meth:`update`, or let it
    measure: :meth:`accumulate`/:meth:`step` (gradient accumulation, one process) or
    :meth:`attach_ddp` (DDP); :func:`measure_noise_scale` does one offline measurement.

    Args:
        beta: EMA decay in ``[0, 1)``; after ``t`` updates each estimate is
            ``ema_t / (1 - beta^t)`` with ``ema_t = beta ema_{t-1} + (1 - beta) x_t`` (Adam's
            bias correction: the first update is taken as is, not shrunk towards 0). ``0.99``
            (default) averages over roughly the last 100 updates -- training steps in modes 2 and
            3, where one measurement is very noisy and ``B_simple`` drifts slowly. ``0`` keeps only
            the latest measurement.
        keep_history: Record a dict per update in :attr:`history` (for plots; a few hundred bytes
            per update).

    Unlike a scikit-learn estimator, the constructor validates its arguments: this estimator has
    no ``fit`` and is usually created at the start of a long run, where a late error would waste it.

    Attributes (read-only properties):
        b_simple: The smoothed ``tr(Sigma) / |G|^2``; ``inf`` when the smoothed ``|G|^2 <= 0``
            (the noise dominates what the two batch sizes can resolve: measure with larger
            batches), ``0`` when the smoothed ``tr(Sigma) <= 0``.
        grad_sq_norm: The smoothed, bias-corrected estimate of ``|G|^2``.
        trace_sigma: The smoothed, bias-corrected estimate of ``tr(Sigma)``.
        n_updates: Measurements used. ``n_skipped``: non-finite ones skipped with a warning.
        history: One dict per update: ``update`` (1-based), ``step`` (your label or None),
            ``batch_small``, ``batch_big``, ``small_sq_norm``, ``big_sq_norm``, the raw estimates
            ``grad_sq_norm_raw``/``trace_sigma_raw`` of that measurement and the smoothed
            ``grad_sq_norm``, ``trace_sigma``, ``b_simple`` after it.

    Raises:
        InvalidParameterError: ``beta`` outside ``[0, 1)``.

    Example (gradient accumulation; ``.grad`` is only read, training is unchanged)::

        gns = GradientNoiseScale()
        for x, y in loader:                        # x: (4 * 32, ...)
            optimizer.zero_grad()
            for xm, ym in zip(x.split(32), y.split(32)):
                (loss_fn(model(xm), ym) / 4).backward()   # .grad ends as the batch-128 mean gradient
                gns.accumulate(model)
            gns.step(model, 32)                    # small: 4 x B=32, big: B=128
            optimizer.step()
        print(gns.b_simple, gns.advise(base_lr=0.1, base_batch=128))
    """

    _parameter_constraints: ClassVar[dict] = {
        "beta": [Interval(float, 0, 1, closed="left")],
        "keep_history": [bool],
    }

    def __init__(self, beta: float = 0.99, *, keep_history: bool = True):
        check_param("beta", beta, self._parameter_constraints["beta"], owner=_OWNER)
        check_param("keep_history", keep_history, self._parameter_constraints["keep_history"], owner=_OWNER)
        self.beta = float(beta)
        self.keep_history = keep_history
        self._n_updates = 0
        self._n_skipped = 0
        self._ema_grad_sq_norm = 0.0  # uncorrected EMA of the |G|^2 estimates
        self._ema_trace_sigma = 0.0  # uncorrected EMA of the tr(Sigma) estimates
        self._history: list[dict] = []
        # accumulation mode: trainable parameters, .grad at the previous accumulate() (None: zeros),
        # each micro-batch's squared norm |d_i|^2 (0-d float64 tensors, read at step())
        self._acc_params: list[torch.Tensor] | None = None
        self._acc_prev: list[torch.Tensor | None] | None = None
        self._acc_sq: list[torch.Tensor] = []
        # DDP mode: the hook's state and measurements recorded by the hook, not yet applied
        self._ddp: _DDPState | None = None
        self._ddp_pending: list[_DDPMeasurement] = []

    def __repr__(self) -> str:
        return f"GradientNoiseScale(beta={self.beta}, n_updates={self._n_updates})"

    # ------------------------------------------------------------------------------ update
    def update(
        self,
        small_sq_norms: float | Sequence[float] | torch.Tensor,
        batch_small: float,
        big_sq_norm: float | torch.Tensor,
        batch_big: float,
        *,
        step: int | None = None,
    ) -> GradientNoiseScale:
        """Add one two-batch measurement.

        Args:
            small_sq_norms: ``|G_small|^2``: one squared norm, or several (a sequence or tensor)
                of independent batch-``batch_small`` gradients, whose mean is used.
            batch_small: ``B_small`` (> 0); the harmonic mean of the sizes if they differ.
            big_sq_norm: ``|G_big|^2`` of a batch-``batch_big`` gradient.
            batch_big: ``B_big`` (> ``batch_small``).
            step: Optional label (e.g. the training step) stored in the history entry.

        Returns:
            ``self``.

        Raises:
            InvalidParameterError: a non-positive batch size, ``batch_big <= batch_small``, a
                negative squared norm, or norms that are not numbers.

        Warns:
            RuntimeWarning: a NaN or infinite norm; the measurement is skipped and the estimates,
            ``n_updates`` and ``history`` are unchanged (only ``n_skipped`` counts it).
        """
        self._flush_ddp()
        return self._update(small_sq_norms, batch_small, big_sq_norm, batch_big, step=step, stacklevel=3)

    def _update(self, small_sq_norms, batch_small, big_sq_norm, batch_big, *, step, stacklevel):
        owner = f"{_OWNER}.update"
        b_small, b_big = _check_batches(batch_small, batch_big, owner)
        check_param("step", step, [None, Interval(int, None, None)], owner=owner)
        smalls = _as_floats("small_sq_norms", small_sq_norms, owner)
        bigs = _as_floats("big_sq_norm", big_sq_norm, owner)
        if len(bigs) != 1:
            raise InvalidParameterError(
                f"The 'big_sq_norm' parameter of {owner} must be one squared norm. Got {len(bigs)} values."
            )
        bad = [f"{name}={vals if len(vals) > 1 else vals[0]!r}"
               for name, vals in (("small_sq_norms", smalls), ("big_sq_norm", bigs))
               if not all(math.isfinite(v) for v in vals)]
        if bad:
            self._n_skipped += 1
            warnings.warn(
                f"{owner} skipped a measurement with non-finite squared gradient norms ({', '.join(bad)}"
                + (f", step {step}" if step is not None else "")
                + "); the estimates are unchanged. Non-finite gradients usually mean an overflow "
                "(e.g. an fp16 loss scale) or divergence.",
                RuntimeWarning,
                stacklevel=stacklevel,
            )
            return self
        for name, vals in (("small_sq_norms", smalls), ("big_sq_norm", bigs)):
            if min(vals) < 0:
                raise InvalidParameterError(
                    f"The {name!r} parameter of {owner} must hold non-negative squared norms. "
                    f"Got {min(vals)!r} instead."
                )
        small, big = sum(smalls) / len(smalls), bigs[0]
        raw = two_batch_estimates(small, b_small, big, b_big)
        self._n_updates += 1
        self._ema_grad_sq_norm = self.beta * self._ema_grad_sq_norm + (1 - self.beta) * raw.grad_sq_norm
        self._ema_trace_sigma = self.beta * self._ema_trace_sigma + (1 - self.beta) * raw.trace_sigma
        if self.keep_history:
            g2, tr = self._corrected()
            self._history.append({
                "update": self._n_updates, "step": step,
                "batch_small": b_small, "batch_big": b_big,
                "small_sq_norm": small, "big_sq_norm": big,
                "grad_sq_norm_raw": raw.grad_sq_norm, "trace_sigma_raw": raw.trace_sigma,
                "grad_sq_norm": g2, "trace_sigma": tr, "b_simple": _ratio(tr, g2),
            })
        return self

    def _corrected(self) -> tuple[float, float]:
        correction = 1.0 - self.beta ** self._n_updates  # Adam's bias correction
        return self._ema_grad_sq_norm / correction, self._ema_trace_sigma / correction

    def _check_fitted(self) -> None:
        self._flush_ddp()
        if self._n_updates == 0:
            raise NotFittedError(
                f"This {_OWNER} has no measurement yet: call update() first (or accumulate()+step(), "
                f"attach_ddp() and a backward pass, or use measure_noise_scale())."
            )

    # -------------------------------------------------------------------------- properties
    @property
    def b_simple(self) -> float:
        """Smoothed ``tr(Sigma) / |G|^2`` (``inf`` if ``|G|^2 <= 0``; ``NotFittedError`` before any update)."""
        self._check_fitted()
        g2, tr = self._corrected()
        return _ratio(tr, g2)

    @property
    def grad_sq_norm(self) -> float:
        """Smoothed, bias-corrected estimate of ``|G|^2``."""
        self._check_fitted()
        return self._corrected()[0]

    @property
    def trace_sigma(self) -> float:
        """Smoothed, bias-corrected estimate of ``tr(Sigma)``."""
        self._check_fitted()
        return self._corrected()[1]

    @property
    def n_updates(self) -> int:
        """Measurements used so far (skipped ones excluded)."""
        self._flush_ddp()
        return self._n_updates

    @property
    def n_skipped(self) -> int:
        """Measurements skipped because a norm was NaN or infinite."""
        self._flush_ddp()
        return self._n_skipped

    @property
    def history(self) -> list[dict]:
        """One dict per update (a copy; see the class docstring for the keys)."""
        self._flush_ddp()
        return [dict(h) for h in self._history]

    @property
    def reliable(self) -> bool:
        """False when the smoothed ``|G|^2`` or ``tr(Sigma)`` estimate is <= 0 (see :attr:`warning`)."""
        return self.warning is None

    @property
    def warning(self) -> str | None:
        """Why ``b_simple`` cannot be trusted (a non-positive smoothed estimate), or None."""
        self._check_fitted()
        g2, tr = self._corrected()
        reason = _unreliable_reason(g2, tr)
        return None if reason is None else f"B_simple is unreliable: {reason}."

    def advise(self, **kwargs) -> BatchAdvice:
        """:func:`advise` with this estimator's ``b_simple``; keyword arguments as there.

        Warns (``RuntimeWarning``) when the estimate is unreliable (:attr:`warning`); the advice then
        carries the warning too.
        """
        return _advise_measured(self.b_simple, self.warning, kwargs)

    # -------------------------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        """Everything needed to resume (plain Python values; ``torch.save`` or JSON-able)."""
        self._flush_ddp()
        return {
            "beta": self.beta, "keep_history": self.keep_history,
            "n_updates": self._n_updates, "n_skipped": self._n_skipped,
            "ema_grad_sq_norm": self._ema_grad_sq_norm, "ema_trace_sigma": self._ema_trace_sigma,
            "history": [dict(h) for h in self._history],
        }

    def load_state_dict(self, state: dict) -> GradientNoiseScale:
        """Restore :meth:`state_dict`'s output (also ``beta``); returns ``self``.

        Raises:
            InvalidParameterError: missing or unknown keys, or invalid values.
        """
        owner = f"{_OWNER}.load_state_dict"
        check_param("state", state, [dict], owner=owner)
        expected = set(self.state_dict())
        if set(state) != expected:
            missing, unknown = sorted(expected - set(state)), sorted(set(state) - expected)
            raise InvalidParameterError(
                f"The 'state' parameter of {owner} must have exactly the keys {sorted(expected)}. "
                f"Got missing {missing} and unknown {unknown} instead."
            )
        check_param("beta", state["beta"], self._parameter_constraints["beta"], owner=owner)
        check_param("keep_history", state["keep_history"], [bool], owner=owner)
        for key in ("n_updates", "n_skipped"):
            check_param(key, state[key], [Interval(int, 0, None)], owner=owner)
        for key in ("ema_grad_sq_norm", "ema_trace_sigma"):
            check_param(key, state[key], [Interval("real", None, None)], owner=owner)
        check_param("history", state["history"], [list], owner=owner)
        for i, h in enumerate(state["history"]):
            if not isinstance(h, dict):
                raise InvalidParameterError(
                    f"The 'history' parameter of {owner} must be a list of dicts (one per update). "
                    f"Got {type(h).__name__} at index {i}."
                )
        self.beta, self.keep_history = float(state["beta"]), state["keep_history"]
        self._n_updates, self._n_skipped = int(state["n_updates"]), int(state["n_skipped"])
        self._ema_grad_sq_norm = float(state["ema_grad_sq_norm"])
        self._ema_trace_sigma = float(state["ema_trace_sigma"])
        self._history = [dict(h) for h in state["history"]]
        return self

    # --------------------------------------------------------------- mode 2: accumulation
    def accumulate(self, model: nn.Module) -> None:
        """Record the gradient of the micro-batch whose ``backward()`` just ran.

        Call it after each micro-batch's ``backward()`` (also the last one; :meth:`step` records a
        last micro-batch you did not pass here). The micro-batch's gradient is the change of the
        parameters' ``.grad`` since the previous call (since zero at the start of the step:
        ``optimizer.zero_grad()`` before the first micro-batch, as usual). Only its squared norm
        is kept, as a 0-d float64 tensor on the gradient's device (no host sync here).

        Cost: one copy of the gradients in memory and one pass over them per micro-batch.
        """
        params = self._acc_check_params(model)
        if self._acc_prev is None:
            self._acc_prev = [None] * len(params)
        total = None
        for i, p in enumerate(params):
            g, prev = p.grad, self._acc_prev[i]
            if g is None:
                continue  # no gradient yet: this micro-batch left it at zero
            g = g.detach()
            d = g if prev is None else g - prev  # this micro-batch's (scaled) gradient, p's shape
            sq = torch.linalg.vector_norm(d, dtype=torch.float64).square()  # 0-d, on g's device
            total = sq if total is None else total + sq.to(total.device)
            if prev is None:
                self._acc_prev[i] = g.clone()
            else:
                prev.copy_(g)
        self._acc_sq.append(torch.zeros((), dtype=torch.float64) if total is None else total)

    def _acc_check_params(self, model: nn.Module) -> list[torch.Tensor]:
        check_param("model", model, [nn.Module], owner=f"{_OWNER}.accumulate")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise InvalidParameterError(
                f"The 'model' parameter of {_OWNER}.accumulate must have parameters with requires_grad=True. "
                f"Got a model with none."
            )
        if self._acc_params is None or self._acc_prev is None:
            self._acc_params = params
        elif len(params) != len(self._acc_params) or any(a is not b for a, b in zip(params, self._acc_params)):
            raise InvalidParameterError(
                f"The 'model' parameter of {_OWNER}.accumulate must be the same model within one step "
                f"(call step() before switching models). Got a model with different parameters."
            )
        return params

    def _acc_has_pending(self, params: list[torch.Tensor]) -> bool:
        """Whether ``.grad`` changed since the last :meth:`accumulate` (an unrecorded micro-batch)."""
        prev = self._acc_prev or [None] * len(params)
        for p, q in zip(params, prev):
            if p.grad is None:
                continue
            if q is None:
                if bool(p.grad.detach().ne(0).any()):
                    return True
            elif not torch.equal(p.grad.detach(), q):
                return True
        return False

    def step(
        self,
        model: nn.Module,
        micro_batch_size: int | Sequence[int],
        *,
        grad_scale: float = 1.0,
        step: int | None = None,
    ) -> GradientNoiseScale:
        """End the accumulation of one training step: one :meth:`update` (small: the micro-batches).

        Call it after the last micro-batch's ``backward()`` (after or instead of its
        :meth:`accumulate`), before ``optimizer.step()``/``zero_grad()``. It only reads ``.grad``.

        The gradient convention is the usual one: at the end, ``.grad`` is ``grad_scale`` times
        the gradient of the batch's *mean* loss, micro-batch ``i`` (``n_i`` examples) having added
        ``grad_scale * n_i / N`` times the gradient of its own mean loss (``N = sum n_i``) -- i.e.
        each micro-batch's mean loss was multiplied by ``n_i / N`` (``1 / k`` for ``k`` equal
        micro-batches) before ``backward()``. Then, with ``d_i`` the change of ``.grad`` due to
        micro-batch ``i`` and ``D`` the final ``.grad``::

            |G_small,i|^2 = |d_i|^2 / (grad_scale n_i / N)^2     B_small = 1 / mean_i(1 / n_i)
            |G_big|^2     = |D|^2 / grad_scale^2                 B_big   = N

        Args:
            model: The model whose ``.grad`` was accumulated (the same as in :meth:`accumulate`).
            micro_batch_size: Examples per micro-batch: one int if all are equal, else one per
                micro-batch in order (e.g. a short last one).
            grad_scale: Extra factor on the accumulated gradient (> 0): ``1.0`` for the mean
                convention above; ``k`` if the micro-batch mean losses were summed without the
                ``1/k``; an AMP ``GradScaler``'s scale if called before ``unscale_``.
            step: Optional label stored in the history.

        Returns:
            ``self``.

        Raises:
            InvalidParameterError: bad sizes, ``grad_scale <= 0``, or a ``micro_batch_size``
                sequence whose length differs from the number of micro-batches.

        Warns:
            RuntimeWarning: fewer than 2 micro-batches (nothing to compare; skipped) or non-finite
            gradients (skipped, see :meth:`update`).
        """
        owner = f"{_OWNER}.step"
        check_param("grad_scale", grad_scale, _POSITIVE, owner=owner)
        if isinstance(micro_batch_size, (list, tuple)):
            sizes = list(micro_batch_size)
            for s in sizes:
                check_param("micro_batch_size", s, [Interval(int, 1, None)], owner=owner)
        else:
            check_param("micro_batch_size", micro_batch_size, [Interval(int, 1, None)], owner=owner)
            sizes = None
        params = self._acc_check_params(model)
        try:
            if self._acc_has_pending(params):
                self.accumulate(model)
            squares = self._acc_sq
            k = len(squares)
            if sizes is None:
                sizes = [int(micro_batch_size)] * k
            elif len(sizes) != k:
                raise InvalidParameterError(
                    f"The 'micro_batch_size' parameter of {owner} must have one size per micro-batch "
                    f"({k} recorded). Got {len(sizes)} sizes instead."
                )
            if k < 2:
                self._n_skipped += 1
                warnings.warn(
                    f"{owner} skipped a step with {k} micro-batch(es): the noise scale compares the "
                    f"micro-batch gradients with their mean and needs at least 2. Call accumulate(model) "
                    f"after each micro-batch's backward(); without accumulation use attach_ddp() or "
                    f"measure_noise_scale().",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return self
            total = sum(sizes)
            device = squares[0].device
            d_sq = torch.stack([s.to(device) for s in squares]).cpu().tolist()  # (k,) one host sync
            small = [sq / (grad_scale * n / total) ** 2 for sq, n in zip(d_sq, sizes)]
            big_sq = sum(torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float64).square().to(device)
                         for p in params if p.grad is not None)  # |D|^2, 0-d on device
            big = float(big_sq) / grad_scale**2
            b_small = len(sizes) / sum(1.0 / n for n in sizes)  # harmonic mean, < total for k >= 2
        finally:
            self._acc_reset()
        return self.update(small, b_small, big, total, step=step)

    def _acc_reset(self) -> None:
        # the next step starts from zero gradients (after zero_grad); its snapshot is allocated anew
        self._acc_sq, self._acc_prev, self._acc_params = [], None, None

    # ------------------------------------------------------------------------ mode 3: DDP
    def attach_ddp(
        self,
        ddp_model: nn.Module,
        local_batch_size: int | None = None,
        *,
        hook: Callable | None = None,
        hook_state: Any = None,
    ) -> GradientNoiseScale:
        """Measure during DDP training through a communication hook.

        Registers a hook on ``ddp_model`` (``register_comm_hook``; DDP allows one per model and
        no removal) that, for every gradient bucket, records the rank's local squared norm before
        the all-reduce and the squared norm of the averaged bucket after it. On the last bucket it
        launches one all-reduce of the summed local squared norm (a float64 scalar) and returns a
        future that completes when both are done, so by the end of ``backward()`` everything is
        measured. The bucket returned is the averaged one, exactly as DDP's default hook
        (``allreduce_hook``: divide by the world size, then all-reduce); training is unchanged.

        Each backward pass then is one measurement: ``|G_small|^2`` = mean over ranks of the local
        squared norms at ``B_small = local_batch_size``, ``|G_big|^2`` = squared norm of the
        averaged gradient at ``B_big = world_size * local_batch_size``. With ``local_batch_size``
        given here, it is applied automatically (lazily: the next time any property or method of
        this estimator is used, so no host sync happens inside the hook; until then each step keeps
        a few 0-d tensors); without it, call :meth:`step_ddp` after each backward.

        Requirements: every rank uses the same local batch size, and the loss is the mean over the
        local batch (so the averaged gradient is the global batch's mean gradient). With gradient
        accumulation under ``no_sync()``, the hook runs only on the last micro-batch and the local
        batch is all the rank's micro-batches. Call the estimator's methods on every rank or on
        one: the collectives all happen inside the hook.

        Args:
            ddp_model: A ``torch.nn.parallel.DistributedDataParallel`` model, before its first
                backward pass.
            local_batch_size: Examples per rank per step (None: pass it to :meth:`step_ddp`).
            hook: Optional inner communication hook to run instead of the default averaging
                all-reduce (e.g. ``fp16_compress_hook``); it must return a future of the
                *averaged* bucket. ``hook_state`` is its state (default: the process group).

        Returns:
            ``self``.

        Raises:
            InvalidParameterError: not a DDP model, a world size below 2, a bad
                ``local_batch_size``, or an estimator already attached.
        """
        import torch.distributed as dist
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import (
            allreduce_hook,
        )
        from torch.nn.parallel import DistributedDataParallel

        owner = f"{_OWNER}.attach_ddp"
        check_param("ddp_model", ddp_model, [DistributedDataParallel], owner=owner)
        check_param("local_batch_size", local_batch_size, [None, Interval(int, 1, None)], owner=owner)
        check_param("hook", hook, [None, callable], owner=owner)
        if self._ddp is not None:
            raise InvalidParameterError(
                f"The 'ddp_model' parameter of {owner} must be attached only once per estimator "
                f"(create one GradientNoiseScale per DDP model). Got a second call."
            )
        group = ddp_model.process_group
        world = dist.get_world_size(group)
        if world < 2:
            raise InvalidParameterError(
                f"The 'ddp_model' parameter of {owner} must run on at least 2 processes (the local and "
                f"the averaged gradient are the two batch sizes). Got a world size of {world}."
            )
        state = _DDPState(
            pending=self._ddp_pending, group=group, world_size=world, local_batch_size=local_batch_size,
            inner=hook if hook is not None else allreduce_hook,
            inner_state=hook_state if hook is not None else group,
        )
        ddp_model.register_comm_hook(state, _noise_scale_comm_hook)
        self._ddp = state
        return self

    def step_ddp(self, local_batch_size: int | None = None, *, step: int | None = None) -> GradientNoiseScale:
        """Apply the measurements the DDP hook recorded since the last call (usually one).

        Args:
            local_batch_size: Examples per rank in those backward passes. Required when
                :meth:`attach_ddp` was called without one; measurements recorded with
                attach_ddp's size keep that size.
            step: Optional label stored in the history.

        Returns:
            ``self``.

        Raises:
            InvalidParameterError: not attached, or no batch size known.
        """
        owner = f"{_OWNER}.step_ddp"
        check_param("local_batch_size", local_batch_size, [None, Interval(int, 1, None)], owner=owner)
        if self._ddp is None:
            raise InvalidParameterError(
                f"{owner} needs attach_ddp(ddp_model) first: no DDP model is attached to this estimator."
            )
        pending = list(self._ddp_pending)
        if local_batch_size is None and any(m.local_batch_size is None for m in pending):
            raise InvalidParameterError(
                f"The 'local_batch_size' parameter of {owner} must be given (examples per rank) when "
                f"attach_ddp() was called without it. Got None."
            )
        self._flush_ddp(default_local_batch_size=local_batch_size, step=step)
        return self

    def _flush_ddp(self, default_local_batch_size: int | None = None, step: int | None = None) -> None:
        """Turn the hook's recorded tensors into updates (the only host syncs of DDP mode)."""
        pending = self._ddp_pending
        while pending:
            m = pending[0]
            batch = m.local_batch_size if m.local_batch_size is not None else default_local_batch_size
            if batch is None:
                return  # waits for step_ddp(local_batch_size)
            pending.pop(0)
            small = m.local_sq_sum.item() / m.world_size  # mean over ranks of |G_local|^2
            big = sum(t.item() for t in m.global_sq)  # |G_averaged|^2, same on every rank
            self._update(small, batch, big, m.world_size * batch, step=step, stacklevel=4)


# ------------------------------------------------------------------------------ DDP internals
@dataclass
class _DDPMeasurement:
    local_sq_sum: torch.Tensor  # 0-d float64: sum over buckets of |local bucket|^2, all-reduced (sum over ranks)
    global_sq: list  # per bucket, 0-d float64 |averaged bucket|^2 (filled by the futures' callbacks)
    world_size: int
    local_batch_size: int | None


@dataclass
class _DDPState:
    pending: list  # the estimator's list of _DDPMeasurement
    group: Any
    world_size: int
    local_batch_size: int | None
    inner: Callable
    inner_state: Any
    local_sq: list = field(default_factory=list)  # this iteration: per bucket, 0-d float64
    global_sq: list = field(default_factory=list)


def _noise_scale_comm_hook(state: _DDPState, bucket):  # -> Future[Tensor]; no annotation: DDP
    # checks it by value and would reject the string this module's postponed annotations make of it
    """DDP communication hook: record local and averaged squared norms, average as usual.

    DDP calls the hooks of one backward pass in bucket order (index 0 first, ``is_last()`` last)
    on every rank, so the extra scalar all-reduce issued on the last bucket is matched across ranks.
    """
    import torch.distributed as dist

    if bucket.index() == 0:  # a new backward pass
        state.local_sq, state.global_sq = [], []
    buf = bucket.buffer()  # (n_bucket,) flat local gradients of this bucket, before averaging
    state.local_sq.append(torch.linalg.vector_norm(buf.detach(), dtype=torch.float64).square())
    global_sq = state.global_sq
    slot = len(global_sq)
    global_sq.append(None)

    def record(fut):
        averaged = fut.value()  # (n_bucket,) averaged gradients
        global_sq[slot] = torch.linalg.vector_norm(averaged.detach(), dtype=torch.float64).square()
        return averaged

    fut = state.inner(state.inner_state, bucket).then(record)
    if not bucket.is_last():
        return fut
    device = state.local_sq[0].device
    local_sum = torch.stack([t.to(device) for t in state.local_sq]).sum()  # 0-d float64
    scalar = dist.all_reduce(local_sum, group=state.group, async_op=True).get_future()
    measurement = _DDPMeasurement(local_sum, global_sq, state.world_size, state.local_batch_size)

    def finish(_):
        state.pending.append(measurement)
        return fut.value()

    return torch.futures.collect_all([fut, scalar]).then(finish)


# ------------------------------------------------------------------------ mode 1: offline
@dataclass(frozen=True)
class NoiseScaleResult:
    """What :func:`measure_noise_scale` measured (one two-batch measurement, no smoothing)."""

    b_simple: float  # tr(Sigma) / |G|^2 (inf if the |G|^2 estimate is <= 0)
    grad_sq_norm: float  # unbiased estimate of |G|^2
    trace_sigma: float  # unbiased estimate of tr(Sigma)
    small_sq_norms: tuple[float, ...]  # |G_small,i|^2 of each small batch
    big_sq_norm: float  # |G_big|^2 of their union
    batch_small: float  # B_small (the harmonic mean of the small-batch sizes)
    batch_big: int  # B_big = examples used
    n_batches: int
    reliable: bool = True  # False: see warning; b_simple is then not a measurement to act on
    warning: str | None = None  # why the estimate is unreliable (None when it is not)
    relative_error: float | None = None  # first-order relative standard error of b_simple
    n_examples: int | None = None  # size of the data set measured on ((x, y) data; None for an iterable)

    @property
    def estimator(self) -> GradientNoiseScale:
        """A :class:`GradientNoiseScale` holding this measurement (e.g. to keep updating it)."""
        return GradientNoiseScale().update(list(self.small_sq_norms), self.batch_small,
                                           self.big_sq_norm, self.batch_big)

    def advise(self, **kwargs) -> BatchAdvice:
        """:func:`advise` with this ``b_simple`` (and ``n_examples`` of the data set, unless given).

        Warns (``RuntimeWarning``) when the measurement is unreliable (:attr:`warning`); the advice
        then carries the warning too. Raises :class:`InvalidParameterError` when nothing was
        measured (NaN).
        """
        if math.isnan(self.b_simple):
            raise InvalidParameterError(
                f"The noise-scale measurement holds no estimate to advise from: {self.warning or 'it is NaN'}."
            )
        if self.n_examples is not None:
            kwargs.setdefault("n_examples", self.n_examples)
        return _advise_measured(self.b_simple, self.warning, kwargs)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _batches(data, batch_size: int, n_batches: int, seed: int | None, owner: str) -> list[tuple[Any, Any, int]]:
    if is_xy_pair(data):
        x, y = data
        n = check_xy_pair(x, y, owner)
        check_finite_x(x, owner)
        if n < batch_size * n_batches:
            raise InvalidParameterError(
                f"The 'data' parameter of {owner} must hold at least batch_size * n_batches = "
                f"{batch_size * n_batches} examples. Got {n}."
            )
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        idx = torch.randperm(n, generator=gen)[: batch_size * n_batches]  # without replacement
        return [(x[i.to(x.device)], y[i.to(y.device)], batch_size) for i in idx.split(batch_size)]
    batches = []
    for x, y, size in iter_xy_batches(data, owner):
        if len(batches) == n_batches:
            break
        if size > 0:
            batches.append((x, y, size))
    if len(batches) < 2:
        raise InvalidParameterError(
            f"The 'data' parameter of {owner} must yield at least 2 non-empty batches (small and big "
            f"batch sizes must differ). Got {len(batches)}."
        )
    return batches


def measure_noise_scale(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    data,
    *,
    batch_size: int = 128,
    n_batches: int = 16,
    seed: int | None = 0,
    train_mode: bool = True,
) -> NoiseScaleResult:
    """Measure ``B_simple`` of ``model`` at its current weights, without training it.

    Computes the gradient of ``n_batches`` disjoint small batches (one forward+backward each, via
    ``torch.autograd.grad``: ``.grad`` is not touched); small = each of them
    (``B_small = batch_size``), big = their size-weighted mean, which is the gradient of their
    union (``B_big = n_batches * batch_size``); then the estimators of :func:`two_batch_estimates`.
    One measurement has sampling noise: the relative error of ``B_simple`` falls roughly like
    ``1 / sqrt(n_batches)``; use 30+ batches for a number to act on.

    Args:
        model: The network (its parameters with ``requires_grad=True`` are differentiated).
        loss_fn: ``loss_fn(model(x), y)`` -> the scalar *mean* loss of the batch (e.g.
            ``F.cross_entropy``).
        data: ``(x, y)`` tensors, from which ``n_batches * batch_size`` examples are drawn at
            random without replacement; or an iterable of ``(x, y)`` batches (e.g. a shuffled
            ``DataLoader``), of which the first ``n_batches`` are used as they are (their sizes
            may differ; ``B_small`` is then their harmonic mean).
        batch_size: ``B_small`` for tensor data (ignored for an iterable).
        n_batches: Small batches (>= 2).
        seed: Seed of the random choice of examples for tensor data (None: torch's global RNG).
        train_mode: Measure in train mode (default: the gradient training actually uses --
            BatchNorm with batch statistics, dropout on) or in eval mode. Either way every module's
            mode and every buffer (BatchNorm running statistics, ``num_batches_tracked``) is put
            back afterwards, also on an exception. Dropout draws from torch's global RNG.

    Returns:
        A :class:`NoiseScaleResult`; ``result.advise(base_lr=..., base_batch=...)`` turns it into a
        batch size and learning rate.

    Raises:
        InvalidParameterError: bad sizes, too little data, a model without trainable parameters,
            NaN or inf in ``x``, a model or ``loss_fn`` that fails on the data (the error names
            it, with the batch's shapes), or a ``loss_fn`` that does not return a scalar with a
            gradient.

    Warns:
        RuntimeWarning: a non-finite gradient (the result is then all NaN), or an unreliable
        estimate: ``|G|^2`` or ``tr(Sigma)`` <= 0, all-zero gradients, or a relative standard
        error above 100%. ``result.reliable`` is then False and ``result.warning`` says why.
    """
    owner = "measure_noise_scale"
    check_param("model", model, [nn.Module], owner=owner)
    check_param("loss_fn", loss_fn, [callable], owner=owner)
    check_param("batch_size", batch_size, [Interval(int, 1, None)], owner=owner)
    check_param("n_batches", n_batches, [Interval(int, 2, None)], owner=owner)
    check_param("seed", seed, [None, Interval(int, 0, None)], owner=owner)
    check_param("train_mode", train_mode, [bool], owner=owner)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InvalidParameterError(
            f"The 'model' parameter of {owner} must have at least one parameter with requires_grad=True. "
            f"Got a model with none."
        )
    batches = _batches(data, batch_size, n_batches, seed, owner)
    n_examples = check_xy_pair(*data, owner) if is_xy_pair(data) else None
    device = params[0].device
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    small_sq: list[float] = []
    # running sum of n_i * g_i in at least float32 (one copy of the parameters), shapes as params
    acc = [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for p in params]
    try:
        model.train(train_mode)
        for i, (x, y, n) in enumerate(batches):
            check_finite_x(x, owner, where=f" of batch {i}" if n_examples is None else "")
            x = x.to(device) if isinstance(x, torch.Tensor) else x
            y = y.to(device) if isinstance(y, torch.Tensor) else y
            with torch.enable_grad():
                loss = model_loss(model, loss_fn, x, y, owner)
                check_loss_has_grad(loss, owner)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            sq = torch.zeros((), dtype=torch.float64, device=device)  # |G_small,i|^2
            for a, g in zip(acc, grads):
                if g is not None:
                    sq += torch.linalg.vector_norm(g, dtype=torch.float64).square().to(device)
                    a.add_(g, alpha=n)
            small_sq.append(float(sq))
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for m, training in modes:
            m.training = training
    total = sum(n for _, _, n in batches)
    big_sq = sum(float(torch.linalg.vector_norm(a / total, dtype=torch.float64).square()) for a in acc)
    b_small = len(batches) / sum(1.0 / n for _, _, n in batches)  # harmonic mean; = batch_size if equal
    if all(n == batches[0][2] for _, _, n in batches):
        b_small = float(batches[0][2])
    if not all(math.isfinite(v) for v in (*small_sq, big_sq)):
        bad = [i for i, v in enumerate(small_sq) if not math.isfinite(v)]
        warnings.warn(
            f"{owner} got non-finite gradients (small batches {bad}, big batch |G|^2 = {big_sq!r}); the "
            f"measurement is skipped and the result is NaN. Check the loss at these weights.",
            RuntimeWarning,
            stacklevel=2,
        )
        nan = math.nan
        return NoiseScaleResult(nan, nan, nan, tuple(small_sq), big_sq, b_small, total, len(batches),
                                reliable=False, warning="B_simple is unreliable: the gradients were not finite, "
                                "so nothing was measured.", n_examples=n_examples)
    est = two_batch_estimates(sum(small_sq) / len(small_sq), b_small, big_sq, total)
    rel = _relative_error(small_sq, b_small, total, est.grad_sq_norm, est.trace_sigma)
    reason = _unreliable_reason(est.grad_sq_norm, est.trace_sigma, rel)
    warning = None if reason is None else f"B_simple is unreliable: {reason}."
    if warning is not None:
        warnings.warn(f"{owner}: {warning}", RuntimeWarning, stacklevel=2)
    return NoiseScaleResult(
        b_simple=_ratio(est.trace_sigma, est.grad_sq_norm), grad_sq_norm=est.grad_sq_norm,
        trace_sigma=est.trace_sigma, small_sq_norms=tuple(small_sq), big_sq_norm=big_sq, batch_small=b_small,
        batch_big=total, n_batches=len(batches), reliable=warning is None, warning=warning,
        relative_error=rel, n_examples=n_examples,
    )


# ---------------------------------------------------------------------------------- advice
@dataclass(frozen=True)
class BatchAdvice:
    """A batch size and learning rate from McCandlish et al.'s model (see :func:`advise`)."""

    batch_size: int  # recommended global batch
    lr: float | None  # eps(B) from base_lr at base_batch (None without base_lr)
    b_simple: float  # the noise scale used as B_noise
    steps_factor: float  # S / S_min = 1 + B_noise / B: steps relative to the fewest possible
    examples_factor: float  # E / E_min = 1 + B / B_noise: examples relative to the fewest possible
    lr_max: float | None  # eps_max = base_lr (1 + B_noise / base_batch): the optimal LR as B -> inf
    base_lr: float | None
    base_batch: int | None
    steps_vs_base: float | None  # S(B) / S(base_batch) = (1 + B_noise/B) / (1 + B_noise/base_batch)
    examples_vs_base: float | None  # E(B) / E(base_batch)
    reasoning: str  # the paragraph __str__ prints
    warnings: tuple[str, ...] = ()  # why this advice is not to be trusted as is (also in reasoning)
    n_examples: int | None = None  # training-set size the batch was checked against

    def __str__(self) -> str:
        return self.reasoning

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _fmt(v: float) -> str:
    if math.isinf(v):
        return "inf"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"


def advise(
    b_simple: float,
    *,
    base_lr: float | None = None,
    base_batch: int | None = None,
    max_batch: int | None = None,
    n_devices: int = 1,
    power_of_two: bool = True,
    n_examples: int | None = None,
) -> BatchAdvice:
    """Recommend a batch size and learning rate from a measured noise scale.

    McCandlish et al.'s model, taking ``B_noise ~ B_simple``: training to a given loss takes
    ``S = S_min (1 + B_noise / B)`` steps and ``E = E_min (1 + B / B_noise)`` examples (eqs.
    2.11-2.12). ``B = B_noise`` is the knee of that trade-off, where both cost 2x their minimum;
    that is the recommendation. The optimal SGD learning rate is ``eps(B) = eps_max / (1 +
    B_noise / B)`` (eq. 2.7); with a learning rate ``base_lr`` tuned at ``base_batch``::

        eps(B) = base_lr (1 + B_noise / base_batch) / (1 + B_noise / B)

    which is the linear scaling rule for ``B << B_noise`` and saturates at ``eps_max`` above it.

    Steps: ``B_simple`` -> rounded to the nearest power of two (``power_of_two``) -> at most
    ``max_batch`` -> rounded down to a multiple of ``n_devices`` (at least ``n_devices``).

    Caveats (also in the reasoning): ``B_simple ~ B_noise`` needs a well-conditioned Hessian; the
    noise scale grows during training, so advice from an early measurement is conservative later;
    the LR rule is derived for SGD -- for Adam the paper found the optimal LR grows more slowly
    (like ``B^alpha``, ``alpha`` between 0.5 and 1).

    Args:
        b_simple: The measured noise scale (>= 0; ``inf`` needs ``max_batch``).
        base_lr: Learning rate tuned at ``base_batch`` (> 0), to scale to the new batch.
        base_batch: Batch size ``base_lr`` belongs to (required with ``base_lr``).
        max_batch: Largest batch you can use (memory, data, devices).
        n_devices: Data-parallel devices; the batch is a multiple of it.
        power_of_two: Round ``B_simple`` to the nearest power of two (else to the nearest int).
        n_examples: Size of the training set. The batch is then at most ``n_examples`` (rounded
            down to a multiple of ``n_devices``), and a batch above ``n_examples / 10`` (fewer than 10
            steps per epoch) gets a warning in ``warnings`` and the reasoning: the model behind the
            advice assumes many steps drawn from a large data set.

    Returns:
        A :class:`BatchAdvice`; ``print()`` it for the reasoning.

    Raises:
        InvalidParameterError: a NaN or negative ``b_simple``, an infinite one without
            ``max_batch``, ``base_lr`` without ``base_batch`` (or vice versa), non-positive values,
            or ``max_batch < n_devices``.
    """
    owner = "advise"
    check_param("b_simple", b_simple, [Interval("real", 0, None, closed="left")], owner=owner)
    check_param("base_lr", base_lr, [None, Interval("real", 0, None, closed="neither")], owner=owner)
    check_param("base_batch", base_batch, [None, Interval(int, 1, None)], owner=owner)
    check_param("max_batch", max_batch, [None, Interval(int, 1, None)], owner=owner)
    check_param("n_devices", n_devices, [Interval(int, 1, None)], owner=owner)
    check_param("power_of_two", power_of_two, [bool], owner=owner)
    check_param("n_examples", n_examples, [None, Interval(int, 1, None)], owner=owner)
    if n_examples is not None and n_examples < n_devices:
        raise InvalidParameterError(
            f"The 'n_examples' parameter of {owner} must be at least n_devices ({n_devices}). Got {n_examples}."
        )
    if (base_lr is None) != (base_batch is None):
        name = "base_batch" if base_batch is None else "base_lr"
        raise InvalidParameterError(
            f"The {name!r} parameter of {owner} must be given together with "
            f"{'base_lr' if name == 'base_batch' else 'base_batch'} (the LR is scaled from the batch it was "
            f"tuned at). Got None."
        )
    if max_batch is not None and max_batch < n_devices:
        raise InvalidParameterError(
            f"The 'max_batch' parameter of {owner} must be at least n_devices ({n_devices}). Got {max_batch}."
        )
    b_noise = float(b_simple)
    if math.isinf(b_noise) and max_batch is None:
        raise InvalidParameterError(
            f"The 'max_batch' parameter of {owner} must be given when b_simple is inf (the gradient was "
            f"not resolved above the noise: every batch you can afford is below the critical batch). "
            f"Got None. Or measure again with larger batches."
        )

    notes = []
    if math.isinf(b_noise):
        target = float(max_batch)
        notes.append(f"B_simple is inf (noise dominates at the measured batch sizes), so the largest allowed "
                     f"batch, {max_batch}, is used")
    elif power_of_two:
        target = 2.0 ** round(math.log2(b_noise)) if b_noise >= 1 else 1.0
        notes.append(f"B_simple {_fmt(b_noise)} rounded to the power of two {int(target)}")
    else:
        target = float(max(1, round(b_noise)))
        notes.append(f"B_simple {_fmt(b_noise)} rounded to {int(target)}")
    batch = int(target)
    if max_batch is not None and batch > max_batch:
        batch = max_batch
        notes.append(f"capped at max_batch {max_batch}")
    if n_examples is not None and batch > n_examples:
        batch = n_examples
        notes.append(f"capped at the {n_examples:,} examples of the data set")
    if n_devices > 1 and batch % n_devices:
        batch = max(n_devices, batch // n_devices * n_devices)
        notes.append(f"rounded down to a multiple of {n_devices} devices, {batch}")
    cautions = []
    if n_examples is not None and batch * _MIN_STEPS_PER_EPOCH > n_examples:
        cautions.append(
            f"batch {batch:,} is {batch / n_examples:.0%} of the {n_examples:,} training examples "
            f"({n_examples // batch} step(s) per epoch): the noise-scale model assumes many steps drawn from a "
            f"large data set, so this advice does not transfer; use a batch of at most "
            f"{max(1, n_examples // _MIN_STEPS_PER_EPOCH):,} and more epochs, or more data"
        )
    if b_noise == 0:
        cautions.append("B_simple = 0 means no gradient noise was resolved, not that there is none: the "
                        "recommended batch is only the smallest possible one")

    def steps(b: float) -> float:  # S / S_min
        return 1.0 + b_noise / b

    def examples(b: float) -> float:  # E / E_min
        return math.inf if b_noise == 0 else 1.0 + b / b_noise

    lr = lr_max = steps_vs_base = examples_vs_base = None
    if base_lr is not None:
        if math.isinf(b_noise):  # eps(B)/eps(B0) -> B / B0: the linear rule
            lr, lr_max = base_lr * batch / base_batch, math.inf
            examples_vs_base = 1.0
            steps_vs_base = base_batch / batch
        else:
            lr_max = base_lr * steps(base_batch)
            lr = lr_max / steps(batch)
            steps_vs_base = steps(batch) / steps(base_batch)
            examples_vs_base = examples(batch) / examples(base_batch) if b_noise > 0 else batch / base_batch

    text = [(
        f"Recommended batch size {batch}: {'; '.join(notes)}. McCandlish et al. (2018) take the noise scale "
        f"B_noise ~ B_simple = tr(Sigma)/|G|^2 = {_fmt(b_noise)} as the critical batch: reaching a given loss "
        f"takes S = S_min (1 + B_noise/B) steps and E = E_min (1 + B/B_noise) examples, and B = B_noise is the "
        f"knee where both cost 2x their minimum. At batch {batch}: {_fmt(steps(batch))}x the fewest steps and "
        f"{_fmt(examples(batch))}x the fewest examples."
    )]
    if base_lr is not None:
        if math.isinf(b_noise):
            text.append(
                f"Learning rate {lr:.4g}: with B_noise = inf the optimal LR eps(B) = eps_max/(1 + B_noise/B) "
                f"scales linearly from base_lr {base_lr:g} at batch {base_batch}."
            )
        else:
            linear = base_lr * batch / base_batch
            text.append(
                f"Learning rate {lr:.4g}: the optimal SGD rate is eps(B) = eps_max/(1 + B_noise/B); from base_lr "
                f"{base_lr:g} at batch {base_batch}, eps_max = {lr_max:.4g} and eps({batch}) = {lr:.4g} (the linear "
                f"rule would give {linear:.4g}; the two agree only for B << B_noise). Compared with batch "
                f"{base_batch}: {_fmt(steps_vs_base)}x the steps and {_fmt(examples_vs_base)}x the examples."
            )
    if cautions:
        text.append(" ".join(f"Warning: {c}." for c in cautions))
    text.append(
        "Caveats: B_simple equals B_noise only for a well-conditioned Hessian, so treat it as an "
        "order-of-magnitude guide; the noise scale grows as training proceeds, so a measurement "
        "early in training under-estimates the useful batch later (re-measure, or grow the batch); the LR rule "
        "is for SGD -- for Adam the optimal LR grows more slowly with the batch."
    )
    return BatchAdvice(
        batch_size=batch, lr=lr, b_simple=b_noise, steps_factor=steps(batch), examples_factor=examples(batch),
        lr_max=lr_max, base_lr=None if base_lr is None else float(base_lr), base_batch=base_batch,
        steps_vs_base=steps_vs_base, examples_vs_base=examples_vs_base, reasoning=" ".join(text),
        warnings=tuple(cautions), n_examples=n_examples,
    )


# advise() warns when the batch leaves fewer steps per epoch than this
_MIN_STEPS_PER_EPOCH = 10


def _advise_measured(b_simple: float, warning: str | None, kwargs: dict) -> BatchAdvice:
    """:func:`advise` for a measurement; an unreliable one warns and its advice carries the warning."""
    advice = advise(b_simple, **kwargs)
    cautions = [*(c.rstrip(".") for c in [warning] if c is not None), *advice.warnings]
    if cautions:  # one warning with every reason
        warnings.warn("advise: " + "; ".join(cautions) + ".", RuntimeWarning, stacklevel=3)
    if warning is None:
        return advice
    return replace(advice, warnings=(warning.rstrip("."), *advice.warnings),
                   reasoning=f"Warning: {warning} {advice.reasoning}")
