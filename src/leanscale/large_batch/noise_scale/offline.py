"""Mode 1 of the noise scale, offline: :func:`measure_noise_scale` measures ``B_simple`` of a model
at its current weights from ``n_batches`` small batches, without training it or changing it."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from leanscale.core.distributed import rank_and_world
from leanscale.core.errors import InvalidParameterError
from leanscale.core.progress import progress
from leanscale.core.validation import Interval, check_param
from leanscale.large_batch.noise_scale.advice import BatchAdvice, _advise_measured
from leanscale.large_batch.noise_scale.estimators import (
    _ratio,
    _relative_error,
    _unreliable_reason,
    two_batch_estimates,
)
from leanscale.large_batch.noise_scale.tracker import GradientNoiseScale
from leanscale.train.user_data import (
    check_finite_x,
    check_loss_has_grad,
    check_xy_pair,
    is_xy_pair,
    iter_xy_batches,
    model_loss,
)

__all__ = ["NoiseScaleResult", "measure_noise_scale"]


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
    progress_bar: bool = False,
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
        progress_bar: show a progress bar of the batches (rank 0 only).

    Returns:
        A :class:`NoiseScaleResult`; ``result.advise(base_lr=..., base_batch_size=...)`` turns it into a
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
    check_param("progress_bar", progress_bar, [bool], owner=owner)
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
    bar = progress(total=len(batches), desc="noise scale", unit="batch",
                   disable=None if progress_bar and rank_and_world()[0] == 0 else True)
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
            bar.update(1)
    finally:
        bar.close()
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
