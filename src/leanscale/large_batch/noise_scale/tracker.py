"""The online estimator: :class:`GradientNoiseScale`, an exponential moving average of the two
unbiased estimates, fed by hand (:meth:`~GradientNoiseScale.update`), by gradient accumulation
(mode 2, bookkeeping in ``_accumulation.py``) or by a DDP communication hook (mode 3,
``_ddp.py``). See the package docstring for the maths and the caveats."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from leanscale.core.errors import InvalidParameterError, NotFittedError
from leanscale.core.validation import Interval, check_param
from leanscale.large_batch.noise_scale._accumulation import MicroBatchNorms
from leanscale.large_batch.noise_scale._ddp import (
    _DDPMeasurement,
    _DDPState,
    attach_hook,
)
from leanscale.large_batch.noise_scale.advice import BatchAdvice, _advise_measured
from leanscale.large_batch.noise_scale.estimators import (
    _POSITIVE,
    _as_floats,
    _check_batches,
    _ratio,
    _unreliable_reason,
    two_batch_estimates,
)

__all__ = ["GradientNoiseScale"]

_OWNER = "GradientNoiseScale"


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
        print(gns.b_simple, gns.advise(base_lr=0.1, base_batch_size=128))
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
        # accumulation mode: each micro-batch's squared norm |d_i|^2 until step() (see _accumulation.py)
        self._acc = MicroBatchNorms()
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
        self._acc.record(model)

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
        params = self._acc.check_params(model)
        try:
            if self._acc.has_pending(params):
                self.accumulate(model)
            k = len(self._acc.squares)
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
            small, b_small, big, total = self._acc.measurement(params, sizes, grad_scale)
        finally:
            self._acc.reset()
        return self.update(small, b_small, big, total, step=step)

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
        self._ddp = attach_hook(ddp_model, self._ddp_pending, local_batch_size, hook, hook_state,
                                owner=f"{_OWNER}.attach_ddp", attached=self._ddp is not None)
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
