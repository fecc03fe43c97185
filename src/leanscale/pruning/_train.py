"""Training of the scoring models of the pruning metrics (EL2N, GraNd, forgetting, uncertainty).

Paul et al. (2021, arXiv 2107.07075) score examples with a network trained for only a few epochs;
Toneva et al. (2019, arXiv 1812.05159) count forgetting events over a whole training run. Both
need one plain, reproducible loop: SGD with momentum and a cosine learning rate, one seeded
permutation of the data per epoch, in-memory tensors indexed directly (no DataLoader).

Each epoch's permutation is cut into ``n // batch_size`` nearly equal global batches (the last
few examples are spread over the batches, never dropped), so every example is seen exactly once
per epoch -- a forgetting tracker needs that -- and no batch is smaller than ``batch_size``. With a
``sampler`` (:class:`~leanscale.pruning.rs2.RS2Sampler`: RS2, a fresh random subset per epoch) the
epoch is that subset instead, cut the same way.

Under ``torchrun`` (an initialised process group) the model is wrapped in DDP and rank ``r``
trains on the ``r``-th contiguous slice of every global batch. The local loss is the *sum* over
the slice times ``world / global batch``, so DDP's gradient average equals the mean-loss
gradient of the whole global batch even when the slices differ in size: N processes take the
steps one process takes on the same batches (up to the order of float additions; BatchNorm
statistics are per rank, as always with DDP). After training, BatchNorm running statistics are
averaged over the ranks so every rank holds the same model for scoring.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from leanscale.core.distributed import rank_and_world
from leanscale.core.errors import InvalidParameterError
from leanscale.core.validation import Interval, check_param
from leanscale.train import (
    StepOutput,
    fit,
    lr_factor,
    param_groups,
    rank_slice,
    release,
    seeded,
    sync_buffers,
)
from leanscale.train.batches import epoch_batches
from leanscale.train.user_data import as_logits

__all__ = ["as_float_tensor", "as_label_tensor", "check_finite", "train_scoring_model"]

_OWNER = "train_scoring_model"


def as_float_tensor(x: Any, name: str = "x", owner: str = _OWNER, *, keep_token_ids: bool = False) -> torch.Tensor:
    """``x`` as a float tensor: arrays become float32; a floating tensor keeps its dtype. With
    ``keep_token_ids``, an int64/int32 tensor (token ids for a user's language model) stays int64."""
    if keep_token_ids and isinstance(x, torch.Tensor) and x.dtype in (torch.int64, torch.int32) and x.ndim == 2:
        return x.detach().long()
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        try:
            t = torch.as_tensor(np.asarray(x, dtype=np.float32))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InvalidParameterError(
                f"The {name!r} parameter of {owner} must be a numeric array or tensor. Got "
                f"{type(x).__name__} that could not be converted ({exc})."
            ) from None
    if t.ndim < 2:
        raise InvalidParameterError(
            f"The {name!r} parameter of {owner} must have shape (n, ...) with at least 2 dimensions. "
            f"Got shape {tuple(t.shape)} instead."
        )
    if not t.is_floating_point():
        t = t.float()
    check_finite(t, name, owner)
    return t


def check_finite(x: Any, name: str, owner: str) -> None:
    """Raise :class:`InvalidParameterError` naming ``name`` and the first example with a NaN or
    an infinity, for a floating tensor or array (other inputs pass: texts, integer ids).

    Called before any training: a NaN input otherwise surfaces only as NaN scores afterwards.
    """
    if isinstance(x, torch.Tensor):
        if not (x.is_floating_point() or x.is_complex()) or x.numel() == 0:
            return
        bad = ~torch.isfinite(x.detach())
        if not bool(bad.any()):
            return
        flat = int(torch.nonzero(bad.reshape(-1))[0])
        value = x.detach().reshape(-1)[flat].item()
    elif isinstance(x, np.ndarray):
        if x.dtype.kind not in "fc" or x.size == 0:
            return
        bad = ~np.isfinite(x)
        if not bad.any():
            return
        flat = int(np.flatnonzero(bad.reshape(-1))[0])
        value = x.reshape(-1)[flat].item()
    elif isinstance(x, (list, tuple)) and x and not isinstance(x[0], str):
        try:  # nested lists of numbers; texts and ragged lists are not numeric data: they pass
            arr = np.asarray(x, dtype=np.float64)
        except (TypeError, ValueError):
            return
        return check_finite(arr, name, owner)
    else:
        return
    per_row = max(1, math.prod(x.shape[1:])) if x.ndim > 1 else 1
    raise InvalidParameterError(
        f"The {name!r} parameter of {owner} must contain only finite values. Got {value!r} in example "
        f"{flat // per_row} (flat index {flat})."
    )


def as_label_tensor(y: Any, n: int, name: str = "y", owner: str = _OWNER) -> torch.Tensor:
    """``y`` as an int64 tensor of ``n`` class indices in ``[0, k)``."""
    arr = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if arr.ndim != 1 or len(arr) != n:
        raise InvalidParameterError(
            f"The {name!r} parameter of {owner} must be a 1-d array of {n} class indices. Got shape "
            f"{arr.shape} instead."
        )
    if not np.issubdtype(arr.dtype, np.integer) or (n and arr.min() < 0):
        raise InvalidParameterError(
            f"The {name!r} parameter of {owner} must hold non-negative integer class indices. Got dtype "
            f"{arr.dtype}" + (f" with minimum {arr.min()!r}" if n and arr.dtype.kind in "iuf" else "") + "."
        )
    return torch.as_tensor(arr.astype(np.int64))


def train_scoring_model(
    model_fn: Callable[[], nn.Module],
    x: Any,
    y: Any,
    *,
    epochs: float,
    batch_size: int = 128,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    seed: int = 0,
    on_batch: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
    sampler: Any = None,
) -> nn.Module:
    """Train ``model_fn()`` on ``(x, y)`` with SGD + momentum and a cosine learning rate.

    Args:
        model_fn: Returns a fresh ``nn.Module`` mapping ``x[i:j]`` to logits ``(b, k)``; called
            after seeding torch with ``seed`` (so the initialisation is reproducible).
        x: Inputs ``(n, ...)`` (array or tensor); training runs on ``x``'s device.
        y: Class indices ``(n,)`` in ``[0, k)``.
        epochs: Passes over the data (fractional allowed): ``round(epochs * n_batches)`` steps,
            at least one.
        batch_size: Global batch size, split over the ranks under ``torchrun`` (a data set
            smaller than one batch is trained as one batch of all ``n`` examples).
        lr: Peak learning rate; it follows ``lr * (1 + cos(pi * step / steps)) / 2``.
        momentum: SGD momentum.
        weight_decay: L2 penalty on weights of rank >= 2 (not on biases or norm scales).
        seed: Initialisation and batch order. The global torch RNG is left as it was.
        on_batch: Called after every step with ``(indices, logits, y)`` of this rank's slice:
            the GLOBAL example indices ``(b,)`` int64, the training forward's logits ``(b, k)``
            (detached) and the labels ``(b,)`` -- e.g. to feed a
            :class:`~leanscale.pruning.forgetting.ForgettingTracker`.
        sampler: None: every epoch is a seeded permutation of all ``n`` examples. Else an object
            whose ``subset(epoch)`` returns the global order of the examples of that epoch, e.g.
            :class:`~leanscale.pruning.rs2.RS2Sampler` (RS2: a fresh random subset per epoch); its
            ``n_examples`` must be ``n``. The epoch's order is cut into ``max(1, m // batch_size)``
            nearly equal global batches (``m`` examples per epoch), so ``epochs`` then means passes of
            ``m`` examples and the learning rate decays over all of them; under ``torchrun`` every
            rank computes the same subset and trains on its slice of each global batch.

    Returns:
        The trained module (never the DDP wrapper), in train mode; identical on every rank.
    """
    check_param("model_fn", model_fn, [callable], owner=_OWNER)
    check_param("epochs", epochs, [Interval(float, 0, None, closed="neither")], owner=_OWNER)
    check_param("batch_size", batch_size, [Interval(int, 1, None)], owner=_OWNER)
    check_param("lr", lr, [Interval(float, 0, None, closed="neither")], owner=_OWNER)
    check_param("momentum", momentum, [Interval(float, 0, 1, closed="left")], owner=_OWNER)
    check_param("weight_decay", weight_decay, [Interval(float, 0, None)], owner=_OWNER)
    check_param("seed", seed, [Interval(int, 0, None)], owner=_OWNER)
    check_param("on_batch", on_batch, [None, callable], owner=_OWNER)
    xt = as_float_tensor(x, keep_token_ids=True)
    n = int(xt.shape[0])
    yt = as_label_tensor(y, n).to(xt.device)
    per_epoch = n  # examples of one epoch
    if sampler is not None:
        if not callable(getattr(sampler, "subset", None)) or getattr(sampler, "n_examples", None) != n:
            raise InvalidParameterError(
                f"The 'sampler' parameter of {_OWNER} must have a subset(epoch) method and n_examples equal to "
                f"the {n} examples of x (e.g. RS2Sampler({n}, ratio=...)). Got {sampler!r:.120}."
            )
        per_epoch = len(sampler.subset(0))
    rank, world = rank_and_world()
    if min(batch_size, per_epoch) < world:
        raise InvalidParameterError(
            f"The 'batch_size' parameter of {_OWNER} must give every one of the {world} processes at "
            f"least one example (batch_size and the number of examples >= {world}). Got batch_size="
            f"{batch_size} with {n} examples."
        )
    y_max = int(yt.max()) if n else 0
    n_batches = max(1, per_epoch // batch_size)
    total_steps = max(1, round(epochs * n_batches))
    device = xt.device

    def one_epoch(epoch: int) -> list[torch.Tensor]:
        if sampler is None:
            return epoch_batches(n, batch_size, epoch, seed)
        order = torch.as_tensor(np.asarray(sampler.subset(epoch)), dtype=torch.int64)  # (m,) global
        return list(torch.tensor_split(order, max(1, len(order) // batch_size)))

    batches = (batch for epoch in itertools.count() for batch in one_epoch(epoch))
    checked = False

    def loss_fn(net: nn.Module, batch: torch.Tensor):
        nonlocal checked
        idx = rank_slice(batch, rank, world).to(device)  # (b,) this rank's slice of the global batch
        if checked:
            logits = as_logits(net(xt[idx]))  # (b, k)
        else:  # a model that does not fit x fails here: say which parameter
            try:
                logits = as_logits(net(xt[idx]))  # (b, k)
            except (RuntimeError, TypeError, ValueError, IndexError) as exc:
                raise InvalidParameterError(
                    f"The 'model_fn' parameter of {_OWNER} must build a model that accepts x: a batch "
                    f"of shape {tuple(xt[idx].shape)} failed in its forward ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0][:200]})."
                ) from exc
            # checked once, against ALL labels: every rank decides alike (no rank waits alone)
            if logits.ndim != 2 or logits.shape[0] != len(idx) or y_max >= logits.shape[1]:
                raise InvalidParameterError(
                    f"The 'model_fn' parameter of {_OWNER} must build a model returning logits (b, k) "
                    f"with k > every label. Got output of shape {tuple(logits.shape)} for {len(idx)} "
                    f"examples with labels up to {y_max}."
                )
            checked = True
        # sum * world / B: DDP divides by world -> the mean over the global batch of B
        loss = F.cross_entropy(logits, yt[idx], reduction="sum") * (world / len(batch))
        return loss, (idx, logits)

    def after_step(out: StepOutput) -> None:
        idx, logits = out.extra
        on_batch(idx, logits.detach(), yt[idx])

    with seeded(seed, device):
        model = model_fn()
        if not isinstance(model, nn.Module):
            raise InvalidParameterError(
                f"The 'model_fn' parameter of {_OWNER} must return an nn.Module. Got "
                f"{type(model).__name__} instead."
            )
        model.to(device).train()
        optimizer = torch.optim.SGD(param_groups(model, weight_decay), lr=lr, momentum=momentum)
        fit(model, optimizer, batches, loss_fn, n_steps=total_steps, lr=lr,
            schedule=lambda step: lr_factor(step, total_steps),
            on_step=after_step if on_batch is not None else None)
        del optimizer
        release()
        sync_buffers(model)
    return model
