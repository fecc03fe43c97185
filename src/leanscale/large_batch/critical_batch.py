"""The critical batch measured directly, by branching from a checkpoint, and batch-size warmup.

Merrill, Arora, Groeneveld & Hajishirzi 2025, "Critical Batch Size Revisited: A Simple Empirical
Approach to Large-Batch Language Model Training", arXiv 2505.23971. The critical batch size (CBS) is
the largest batch that does not cost loss at the same number of examples (tokens) when the LR is
moved by a scaling rule; the gradient noise scale (McCandlish et al. 2018) is only a proxy for it.
Measured directly: from a checkpoint at step t, train short *branches* at several batch sizes, each
on the same examples, and compare their losses. The CBS is near 0 at initialisation and grows as
training goes on, which is what *batch-size warmup* exploits: start small, raise the batch as the
CBS grows (Merrill et al. trained OLMo 1B to a slightly better loss with 43% fewer gradient steps,
as the abstract states).

- :func:`branch_critical_batch` -> :class:`CriticalBatchResult`: the branches of one checkpoint
  (any ``nn.Module``, loss and ``(x, y)`` tensors; the model and the optimizer's state are deep
  copied per branch and left untouched);
- :class:`BatchSizeSchedule`: a batch that steps up at given numbers of examples;
  :func:`batch_warmup` builds it from measurements (the batch doubles once the measured CBS
  reaches twice the current batch); :func:`measure_batch_warmup` does both on a
  ``TrainConfig`` run (branches at fractions of it, then the schedule: ``leanscale batch critical``);
  ``train_classifier(config, batch_schedule=...)`` trains with it
  (under ``torchrun`` too: every phase runs in the shared loop, per-rank batch = global / world).

Our choices, not the paper's (whose exact tolerance we could not read, see the method card):
the loss is the mean ``loss_fn`` on ``eval_data`` in eval mode; a batch is within the critical batch
when its best loss over ``lr_grid`` is at most ``(1 + tolerance)`` times the smallest batch's loss
(``relative=False``: ``+ tolerance``), and the CBS is the largest batch such that it and every
smaller tested batch are (a contiguous run from the smallest, so one lucky large batch does not
count).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from leanscale.core.errors import InvalidParameterError
from leanscale.core.validation import Interval, Options, check_param
from leanscale.large_batch.schedules import _check_rule, scale_lr
from leanscale.train.loop import MicroBatches, seeded, train_step
from leanscale.train.user_data import (
    check_finite_x,
    check_loss_has_grad,
    is_xy_pair,
    model_loss,
)

__all__ = ["BatchSizeSchedule", "CriticalBatchResult", "WarmupMeasurement", "batch_warmup", "branch_critical_batch",
           "measure_batch_warmup"]

_SIZE = Interval(int, 1, None)


@dataclass(frozen=True)
class CriticalBatchResult:
    """What :func:`branch_critical_batch` measured at one checkpoint.

    ``losses[i]`` is the best loss over the LR grid after the branch at ``batch_sizes[i]`` (inf when
    every LR diverged); ``runs`` has one dict per (batch, LR) branch.
    """

    critical_batch: int  # the largest tested batch within the tolerance (with all smaller ones)
    saturated: bool  # the largest tested batch passed: the CBS is at least critical_batch
    batch_sizes: tuple[int, ...]
    losses: tuple[float, ...]  # best over lr_grid, per batch
    lrs: tuple[tuple[float, ...], ...]  # the LR of each param group of the best branch, per batch
    reference_loss: float  # the smallest batch's loss
    threshold: float  # losses at or below it are within the tolerance
    start_loss: float  # the loss at the checkpoint, before any branch
    examples: int  # examples (the same ones) in every branch
    tolerance: float
    relative: bool
    lr_rule: str
    base_batch_size: int  # the batch the checkpoint's LR belongs to
    examples_seen: int | None = None  # where the checkpoint is in training (for batch_warmup)
    runs: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def _check_pair(data: Any, name: str, owner: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not is_xy_pair(data):
        raise InvalidParameterError(
            f"The {name!r} parameter of {owner} must be a pair (x, y) of tensors. Got {type(data).__name__} instead."
        )
    x, y = data
    if x.ndim == 0 or y.ndim == 0 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise InvalidParameterError(
            f"The {name!r} parameter of {owner} must be a non-empty pair (x, y) with the same first dimension. "
            f"Got shapes {tuple(x.shape)} and {tuple(y.shape)} instead."
        )
    check_finite_x(x, owner)
    return x, y


def _check_sizes(values: Any, name: str, owner: str, min_len: int) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) < min_len or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
        raise InvalidParameterError(
            f"The {name!r} parameter of {owner} must be a sequence of at least {min_len} positive integers. "
            f"Got {values!r} instead."
        )
    return tuple(values)


def _eval_loss(model: nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor, batch: int, owner: str,
               train_mode: bool = False) -> float:
    """The mean ``loss_fn`` over ``(x, y)`` in eval mode (or train mode: batch statistics); the
    modes and buffers (BatchNorm running statistics) are put back afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()] if train_mode else []
    model.train(train_mode)
    total = 0.0
    try:
        with torch.no_grad():
            for i in range(0, len(y), batch):
                loss = model_loss(model, loss_fn, x[i:i + batch], y[i:i + batch], owner)
                total += float(loss) * len(y[i:i + batch])
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for m, training in modes:
            m.training = training
    return total / len(y)


def _order(n: int, examples: int, seed: int) -> torch.Tensor:
    """``examples`` indices of ``range(n)``: consecutive seeded permutations, concatenated."""
    gen = torch.Generator().manual_seed(seed)
    parts, have = [], 0
    while have < examples:
        parts.append(torch.randperm(n, generator=gen))
        have += n
    return torch.cat(parts)[:examples]  # (examples,)


def branch_critical_batch(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    data: tuple[torch.Tensor, torch.Tensor],
    batch_sizes: Sequence[int],
    *,
    optimizer: torch.optim.Optimizer | Callable[[Any], torch.optim.Optimizer],
    examples: int,
    eval_data: tuple[torch.Tensor, torch.Tensor] | None = None,
    base_batch_size: int | None = None,
    lr_rule: str = "sqrt",
    lr_grid: Sequence[float] = (1.0,),
    tolerance: float = 0.01,
    relative: bool = True,
    seed: int = 0,
    micro_batch_size: int | None = None,
    eval_batch_size: int = 1024,
    eval_train_mode: bool = False,
    examples_seen: int | None = None,
) -> CriticalBatchResult:
    """Measure the critical batch at ``model``'s current weights by branching (Merrill et al. 2025).

    For every batch ``B`` in ``batch_sizes`` and every LR multiplier ``m`` in ``lr_grid``: copy the
    model and the optimizer (state included), set each param group's LR to its current LR times
    ``scale_lr(1, base_batch_size, B, lr_rule) * m``, train ``examples / B`` steps on the same
    ``examples`` examples (one seeded order for all branches, global RNG seeded with ``seed``), and
    evaluate the mean loss on ``eval_data``. The best loss over the grid is the batch's loss.

    Args:
        model: The network at the checkpoint (not changed: branches train deep copies).
        loss_fn: ``loss_fn(model(x), y)`` -> the scalar mean loss of a batch (e.g. ``F.cross_entropy``).
        data: ``(x, y)`` training tensors the branches draw from (more than one pass if needed).
        batch_sizes: At least two batch sizes; the smallest is the reference.
        optimizer: The checkpoint's optimizer over ``model``'s parameters (its state, e.g. momentum,
            is copied into every branch; its current LR is the base LR), or a factory
            ``optimizer(params) -> Optimizer`` for a fresh optimizer per branch.
        examples: Examples per branch: a multiple of every batch size (the same data for each).
        eval_data: ``(x, y)`` to measure the loss on (None: ``data``).
        base_batch_size: The batch the optimizer's LR was set for (None: the smallest batch).
        lr_rule: How the LR moves with the batch: ``"sqrt"``, ``"linear"`` or ``"none"``.
        lr_grid: Multipliers of the rule's LR to try per batch (the best one counts).
        tolerance: Allowed loss increase over the smallest batch's loss: relative (``1 + tolerance``
            times) or, with ``relative=False``, absolute.
        seed: Seed of the examples' order and of torch's global RNG in each branch (dropout).
        micro_batch_size: Accumulate each step's gradient over parts of this size (same step, less
            memory; exact unless the model has batch statistics, e.g. plain BatchNorm).
        eval_batch_size: Batch of the loss evaluation.
        eval_train_mode: Evaluate in train mode (batch statistics, no running-statistics update kept)
            instead of eval mode. With BatchNorm, branches of few large steps update the running
            statistics fewer times; train mode keeps that out of the comparison.
        examples_seen: Where the checkpoint is in training (examples), kept for :func:`batch_warmup`.

    Returns:
        :class:`CriticalBatchResult`.

    Raises:
        InvalidParameterError: bad sizes or values, ``examples`` not a multiple of every batch, an
            optimizer over other parameters, a model without trainable parameters, NaN/inf inputs,
            or a model/loss that fails on the data.

    Warns:
        RuntimeWarning: a branch whose loss became non-finite (its loss counts as inf), or a best LR
        at the edge of a grid of several LRs (the grid may be too narrow).
    """
    owner = "branch_critical_batch"
    check_param("model", model, [nn.Module], owner=owner)
    check_param("loss_fn", loss_fn, [callable], owner=owner)
    x, y = _check_pair(data, "data", owner)
    ex, ey = (x, y) if eval_data is None else _check_pair(eval_data, "eval_data", owner)
    sizes = _check_sizes(batch_sizes, "batch_sizes", owner, 2)
    if len(set(sizes)) != len(sizes):
        raise InvalidParameterError(
            f"The 'batch_sizes' parameter of {owner} must hold distinct batch sizes. Got {list(sizes)} instead."
        )
    sizes = tuple(sorted(sizes))
    check_param("examples", examples, [_SIZE], owner=owner)
    bad = [b for b in sizes if examples % b]
    if bad:
        raise InvalidParameterError(
            f"The 'examples' parameter of {owner} must be a multiple of every batch size (each branch trains on "
            f"the same examples); {examples} is not a multiple of {bad}. Got {examples} instead."
        )
    check_param("base_batch_size", base_batch_size, [None, _SIZE], owner=owner)
    base = sizes[0] if base_batch_size is None else base_batch_size
    _check_rule(lr_rule, owner)
    if isinstance(lr_grid, (str, bytes)) or not isinstance(lr_grid, Sequence) or not lr_grid or not all(
            isinstance(m, (int, float)) and not isinstance(m, bool) and math.isfinite(m) and m > 0 for m in lr_grid):
        raise InvalidParameterError(
            f"The 'lr_grid' parameter of {owner} must be a non-empty sequence of finite multipliers > 0. "
            f"Got {lr_grid!r} instead."
        )
    check_param("tolerance", tolerance, [Interval(float, 0, math.inf, closed="left")], owner=owner)
    check_param("relative", relative, [bool], owner=owner)
    check_param("seed", seed, [Interval(int, 0, None)], owner=owner)
    check_param("micro_batch_size", micro_batch_size, [None, _SIZE], owner=owner)
    check_param("eval_batch_size", eval_batch_size, [_SIZE], owner=owner)
    check_param("eval_train_mode", eval_train_mode, [bool], owner=owner)
    check_param("examples_seen", examples_seen, [None, Interval(int, 0, None)], owner=owner)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InvalidParameterError(
            f"The 'model' parameter of {owner} must have at least one parameter with requires_grad=True. "
            "Got a model with none."
        )
    if isinstance(optimizer, torch.optim.Optimizer):
        own = {id(p) for p in model.parameters()}
        if any(id(p) not in own for g in optimizer.param_groups for p in g["params"]):
            raise InvalidParameterError(
                f"The 'optimizer' parameter of {owner} must be over the parameters of 'model' (its state is the "
                "checkpoint's). Got an optimizer holding other tensors."
            )
    elif not callable(optimizer):
        raise InvalidParameterError(
            f"The 'optimizer' parameter of {owner} must be a torch.optim.Optimizer or a factory "
            f"optimizer(params) -> Optimizer. Got {type(optimizer).__name__} instead."
        )
    order = _order(len(y), examples, seed)  # (examples,) the same examples, in the same order, for every branch
    notes: list[str] = []
    start_loss = _eval_loss(model, loss_fn, ex, ey, eval_batch_size, owner, eval_train_mode)
    runs: list[dict[str, Any]] = []
    best: dict[int, dict[str, Any]] = {}
    for b in sizes:
        factor = scale_lr(1.0, base, b, lr_rule)
        for mult in lr_grid:
            try:
                if isinstance(optimizer, torch.optim.Optimizer):
                    net, opt = copy.deepcopy((model, optimizer))  # one memo: the copy's optimizer holds the copy's params
                else:
                    net = copy.deepcopy(model)
            except (TypeError, RuntimeError, copy.Error) as exc:
                raise InvalidParameterError(
                    f"The 'model' parameter of {owner} (with its optimizer) must be deep-copyable: every branch starts "
                    f"from a copy of the checkpoint. copy.deepcopy failed: {type(exc).__name__}: {exc}"
                ) from exc
            if not isinstance(optimizer, torch.optim.Optimizer):
                opt = optimizer(net.parameters())
                if not isinstance(opt, torch.optim.Optimizer):
                    raise InvalidParameterError(
                        f"The 'optimizer' parameter of {owner} must return a torch.optim.Optimizer when called "
                        f"with the parameters. Got {type(opt).__name__} instead."
                    )
            for group in opt.param_groups:
                group["lr"] = float(group["lr"]) * factor * float(mult)
            lrs = tuple(float(g["lr"]) for g in opt.param_groups)
            net.train()
            diverged_at = None
            with seeded(seed):
                for step, idx in enumerate(order.split(b)):
                    if micro_batch_size is not None and micro_batch_size < b:
                        batch = MicroBatches(idx.split(micro_batch_size))
                    else:
                        batch = idx

                    def step_loss(m: nn.Module, part: torch.Tensor, _b: int = b) -> torch.Tensor:
                        loss = model_loss(m, loss_fn, x[part], y[part], owner)
                        check_loss_has_grad(loss, owner)
                        return loss if len(part) == _b else loss * (len(part) / _b)

                    loss, _ = train_step(net, opt, batch, step_loss)
                    if not math.isfinite(float(loss)):
                        diverged_at = step + 1
                        break
            final = math.inf if diverged_at is not None else _eval_loss(net, loss_fn, ex, ey, eval_batch_size, owner,
                                                                        eval_train_mode)
            if not math.isfinite(final):
                final = math.inf
                notes.append(f"the branch at batch {b} with LR x{mult:g} diverged"
                             + (f" (non-finite training loss at step {diverged_at})" if diverged_at else "")
                             + "; its loss counts as inf.")
            run = {"batch_size": b, "lr_multiplier": float(mult), "lrs": list(lrs), "steps": examples // b,
                   "loss": final}
            runs.append(run)
            if b not in best or final < best[b]["loss"]:
                best[b] = run
            del net, opt
        if len(lr_grid) > 1 and math.isfinite(best[b]["loss"]):
            edge = best[b]["lr_multiplier"] in (float(min(lr_grid)), float(max(lr_grid)))
            if edge:
                notes.append(f"at batch {b} the best LR multiplier {best[b]['lr_multiplier']:g} is at the edge "
                             "of lr_grid: a wider grid may lower that batch's loss.")
    for note in notes:
        warnings.warn(f"{owner}: {note}", RuntimeWarning, stacklevel=2)
    losses = tuple(best[b]["loss"] for b in sizes)
    ref = losses[0]
    if not math.isfinite(ref):
        raise InvalidParameterError(
            f"The smallest batch ({sizes[0]}) diverged at every LR of 'lr_grid' in {owner}: there is no reference "
            "loss. Lower the LR (the optimizer's) or the multipliers."
        )
    threshold = ref + (abs(ref) * tolerance if relative else tolerance)
    cbs = sizes[0]
    for b, loss in zip(sizes, losses):
        if loss > threshold:
            break
        cbs = b
    return CriticalBatchResult(
        critical_batch=cbs, saturated=cbs == sizes[-1], batch_sizes=sizes, losses=losses,
        lrs=tuple(tuple(best[b]["lrs"]) for b in sizes), reference_loss=ref, threshold=threshold,
        start_loss=start_loss, examples=examples, tolerance=float(tolerance), relative=relative, lr_rule=lr_rule,
        base_batch_size=base, examples_seen=examples_seen, runs=runs, warnings=notes,
    )


@dataclass(frozen=True)
class BatchSizeSchedule:
    """A batch that steps up during training: ``batch_sizes[i]`` from ``boundaries[i-1]`` examples
    on (``batch_sizes[0]`` from the start), with the LR moved by ``lr_rule`` relative to the batch
    the base LR was tuned for.

    Example:
        >>> s = BatchSizeSchedule((128, 256, 512), boundaries=(10_000, 30_000))
        >>> s.batch_at(0), s.batch_at(10_000), s.batch_at(50_000)
        (128, 256, 512)
        >>> s.steps(60_000)  # 78 + 78 + 58 instead of 468 at batch 128
        214
    """

    batch_sizes: tuple[int, ...]
    boundaries: tuple[int, ...] = ()  # examples at which the next batch size starts
    lr_rule: str = "sqrt"

    def __post_init__(self) -> None:
        owner = "BatchSizeSchedule"
        sizes = _check_sizes(self.batch_sizes, "batch_sizes", owner, 1)
        if isinstance(self.boundaries, (str, bytes)) or not isinstance(self.boundaries, Sequence) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in self.boundaries):
            raise InvalidParameterError(
                f"The 'boundaries' parameter of {owner} must be a sequence of integers (examples). "
                f"Got {self.boundaries!r} instead."
            )
        bounds = tuple(self.boundaries)
        if len(bounds) != len(sizes) - 1:
            raise InvalidParameterError(
                f"The 'boundaries' parameter of {owner} must hold one boundary fewer than 'batch_sizes' "
                f"({len(sizes) - 1}: where each next batch size starts). Got {len(bounds)}: {list(bounds)}."
            )
        if any(v <= 0 for v in bounds) or list(bounds) != sorted(set(bounds)):
            raise InvalidParameterError(
                f"The 'boundaries' parameter of {owner} must be strictly increasing positive numbers of examples. "
                f"Got {list(bounds)} instead."
            )
        _check_rule(self.lr_rule, owner)
        object.__setattr__(self, "batch_sizes", sizes)
        object.__setattr__(self, "boundaries", bounds)

    @classmethod
    def from_fractions(cls, points: Sequence[tuple[float, int]], total_examples: int,
                       lr_rule: str = "sqrt") -> BatchSizeSchedule:
        """The schedule of ``(fraction of the run, batch)`` points for a run of ``total_examples``
        examples (``leanscale batch train --batch-schedule 0:128,0.3:256`` is ``[(0, 128), (0.3, 256)]``):
        a boundary at ``round(fraction * total_examples)`` examples.

        Args:
            points: ``(fraction, batch_size)`` pairs; the first fraction is 0 (the batch from the
                start), the fractions increase strictly and stay below 1.
            total_examples: Examples of the run (``int(epochs * n_train)`` for ``train_classifier``).
            lr_rule: How the LR follows the batch.

        Example:
            >>> BatchSizeSchedule.from_fractions([(0, 128), (0.25, 256)], 60_000).boundaries
            (15000,)
        """
        owner = "BatchSizeSchedule.from_fractions"
        check_param("total_examples", total_examples, [_SIZE], owner=owner)
        if isinstance(points, (str, bytes)) or not isinstance(points, Sequence) or not points or not all(
                isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[0], (int, float))
                and not isinstance(p[0], bool) for p in points):
            raise InvalidParameterError(
                f"The 'points' parameter of {owner} must be a non-empty sequence of (fraction, batch_size) pairs. "
                f"Got {points!r} instead."
            )
        fractions = [float(p[0]) for p in points]
        if fractions[0] != 0 or any(not (0 <= f < 1) for f in fractions) or fractions != sorted(set(fractions)):
            raise InvalidParameterError(
                f"The 'points' parameter of {owner} must have fractions of the run that start at 0 and increase "
                f"strictly below 1. Got fractions {fractions} instead."
            )
        bounds = [round(f * total_examples) for f in fractions[1:]]
        if any(b <= 0 for b in bounds) or bounds != sorted(set(bounds)):
            raise InvalidParameterError(
                f"The 'points' parameter of {owner} must have fractions at least one example apart in the run of "
                f"{total_examples} examples (each batch must start at its own example). Got fractions {fractions}, "
                f"boundaries {bounds}."
            )
        return cls(tuple(p[1] for p in points), tuple(bounds), lr_rule=lr_rule)

    def batch_at(self, examples_seen: int) -> int:
        """The batch size after ``examples_seen`` training examples."""
        check_param("examples_seen", examples_seen, [Interval(int, 0, None)], owner="BatchSizeSchedule.batch_at")
        i = sum(1 for v in self.boundaries if v <= examples_seen)
        return self.batch_sizes[i]

    def lr(self, base_lr: float, base_batch_size: int, batch_size: int) -> float:
        """The LR at ``batch_size`` for ``base_lr`` tuned at ``base_batch_size`` (by ``lr_rule``)."""
        return scale_lr(base_lr, base_batch_size, batch_size, self.lr_rule)

    def phases(self, total_examples: int) -> list[dict[str, int]]:
        """The run of ``total_examples`` examples as phases ``{start, end, batch_size, steps}``
        (examples ``[start, end)``). Each phase but the last ends at the whole step nearest to its
        boundary; the last takes the whole steps that fit (the remainder, under one batch, is dropped)."""
        check_param("total_examples", total_examples, [_SIZE], owner="BatchSizeSchedule.phases")
        out, start = [], 0
        for i, b in enumerate(self.batch_sizes):
            last = i == len(self.boundaries) or self.boundaries[i] >= total_examples
            end = total_examples if last else self.boundaries[i]
            steps = (end - start) // b if last else max(0, round((end - start) / b))
            if steps > 0:
                out.append({"start": start, "end": start + steps * b, "batch_size": b, "steps": steps})
                start += steps * b
            if last:
                break
        return out

    def steps(self, total_examples: int) -> int:
        """Optimizer steps of a run of ``total_examples`` examples."""
        return sum(p["steps"] for p in self.phases(total_examples))

    def ghost_batch_size(self, base_batch_size: int, world_size: int = 1) -> int | None:
        """The Ghost BatchNorm batch (per process) for ``TrainConfig.ghost_batch_size`` of a run with this
        schedule: the BatchNorm statistics of the small batch the run starts from, ``base_batch_size``,
        at most the smallest per-process batch of the schedule. None where that is the whole per-process
        batch of every phase (plain BatchNorm computes the same statistics).

        Example:
            >>> s = BatchSizeSchedule((128, 256, 512), boundaries=(10_000, 30_000))
            >>> s.ghost_batch_size(128), s.ghost_batch_size(128, world_size=2), s.ghost_batch_size(32)
            (128, 64, 32)
            >>> BatchSizeSchedule((128,)).ghost_batch_size(128) is None  # every batch is one ghost batch
            True
        """
        owner = "BatchSizeSchedule.ghost_batch_size"
        check_param("base_batch_size", base_batch_size, [_SIZE], owner=owner)
        check_param("world_size", world_size, [_SIZE], owner=owner)
        if any(b % world_size for b in self.batch_sizes):
            raise InvalidParameterError(
                f"The 'world_size' parameter of {owner} must divide every batch size of the schedule "
                f"{list(self.batch_sizes)}. Got {world_size}."
            )
        ghost = min(base_batch_size, min(self.batch_sizes) // world_size)
        return ghost if ghost < max(self.batch_sizes) // world_size else None

    def to_dict(self) -> dict[str, Any]:
        return {"batch_sizes": list(self.batch_sizes), "boundaries": list(self.boundaries), "lr_rule": self.lr_rule}


def batch_warmup(
    measurements: Sequence[CriticalBatchResult | tuple[int, float]],
    base_batch_size: int,
    *,
    max_batch_size: int | None = None,
    growth: int = 2,
    margin: float = 1.0,
    lr_rule: str = "sqrt",
) -> BatchSizeSchedule:
    """Batch-size warmup from measured critical batches: start at ``base_batch_size`` and, at each
    measurement, grow the batch by factors of ``growth`` while the next size is at most the measured
    CBS / ``margin`` (with ``growth=2``: double the batch once the CBS reaches twice the current
    batch); never shrink it, never above ``max_batch_size``.

    Args:
        measurements: :class:`CriticalBatchResult` objects with ``examples_seen`` set, or
            ``(examples_seen, critical_batch)`` pairs; any order.
        base_batch_size: The batch to start with.
        max_batch_size: The largest batch to reach (None: no cap).
        growth: The factor between successive batch sizes (an integer >= 2).
        margin: Safety factor: a batch is used once the CBS is at least ``margin`` times it.
        lr_rule: Stored in the schedule: how the LR follows the batch.

    Example:
        >>> batch_warmup([(1000, 100), (2000, 300), (3000, 1100)], 64, max_batch_size=512)
        BatchSizeSchedule(batch_sizes=(64, 256, 512), boundaries=(2000, 3000), lr_rule='sqrt')
    """
    owner = "batch_warmup"
    check_param("base_batch_size", base_batch_size, [_SIZE], owner=owner)
    check_param("max_batch_size", max_batch_size, [None, _SIZE], owner=owner)
    if max_batch_size is not None and max_batch_size < base_batch_size:
        raise InvalidParameterError(
            f"The 'max_batch_size' parameter of {owner} must be at least 'base_batch_size' ({base_batch_size}). "
            f"Got {max_batch_size} instead."
        )
    check_param("growth", growth, [Interval(int, 2, None)], owner=owner)
    check_param("margin", margin, [Interval(float, 0, math.inf, closed="neither")], owner=owner)
    _check_rule(lr_rule, owner)
    if isinstance(measurements, (str, bytes)) or not isinstance(measurements, Sequence):
        raise InvalidParameterError(
            f"The 'measurements' parameter of {owner} must be a sequence of CriticalBatchResult or "
            f"(examples_seen, critical_batch) pairs. Got {type(measurements).__name__} instead."
        )
    points = []
    for i, m in enumerate(measurements):
        if isinstance(m, CriticalBatchResult):
            if m.examples_seen is None:
                raise InvalidParameterError(
                    f"The 'measurements' parameter of {owner} needs examples_seen on every CriticalBatchResult "
                    f"(pass examples_seen= to branch_critical_batch). Item {i} has none."
                )
            points.append((m.examples_seen, float(m.critical_batch)))
        elif (isinstance(m, (tuple, list)) and len(m) == 2 and isinstance(m[0], int) and not isinstance(m[0], bool)
              and m[0] >= 0 and isinstance(m[1], (int, float)) and not isinstance(m[1], bool) and m[1] >= 0
              and not math.isnan(m[1])):
            points.append((int(m[0]), float(m[1])))
        else:
            raise InvalidParameterError(
                f"The 'measurements' parameter of {owner} must hold CriticalBatchResult objects or "
                f"(examples_seen >= 0, critical_batch >= 0) pairs. Item {i} is {m!r}."
            )
    sizes, bounds, current = [base_batch_size], [], base_batch_size
    for seen, cbs in sorted(points):
        target = current
        while target * growth * margin <= cbs and (max_batch_size is None or target * growth <= max_batch_size):
            target *= growth
        if target > current:
            if seen == 0:  # measured at the start: begin there
                sizes[-1] = target
            else:
                sizes.append(target)
                bounds.append(seen)
            current = target
    return BatchSizeSchedule(tuple(sizes), tuple(bounds), lr_rule=lr_rule)


@dataclass
class WarmupMeasurement:
    """What :func:`measure_batch_warmup` measured: the small-batch run, the branching result at
    each checkpoint and the warmup schedule built from them."""

    base_run: Any  # the small-batch run's TrainResult
    checkpoints: list[tuple[int, CriticalBatchResult]]  # (step of the small-batch run, its branches)
    schedule: BatchSizeSchedule
    total_examples: int  # examples of a run of config.epochs (the schedule's steps count over them)
    steps: int  # optimizer steps of a run with the schedule
    warnings: list[str] = field(default_factory=list)

    @property
    def steps_saved(self) -> float:
        """1 - steps with the schedule / steps of the small-batch run."""
        return 1 - self.steps / self.base_run.steps

    def to_dict(self) -> dict[str, Any]:
        return {"base_run": {"batch_size": self.base_run.config.batch_size, "lr": self.base_run.config.lr,
                             "steps": self.base_run.steps, "test_accuracy": self.base_run.test_accuracy,
                             "test_loss": self.base_run.test_loss,
                             "ghost_batch_size": self.base_run.config.ghost_batch_size},
                "checkpoints": [{"step": step, **res.to_dict()} for step, res in self.checkpoints],
                "schedule": self.schedule.to_dict(), "steps": self.steps, "steps_saved": self.steps_saved,
                "warnings": list(self.warnings)}


def measure_batch_warmup(
    config: Any,
    *,
    data: tuple | None = None,
    model: nn.Module | None = None,
    at: Sequence[float] = (0.05, 0.15, 0.4),
    batch_sizes: Sequence[int] | None = None,
    examples: int | None = None,
    lr_grid: Sequence[float] = (1.0,),
    tolerance: float = 0.01,
    margin: float = 2.0,
    max_batch_size: int | None = None,
    lr_rule: str = "sqrt",
    eval_mode: str = "auto",
    progress_bar: bool = False,
) -> WarmupMeasurement:
    """Train ``config``'s small-batch run, branch from it at fractions ``at`` of the run
    (:func:`branch_critical_batch` on deep copies of the model and optimizer at those steps; the run
    itself goes on untouched) and build the warmup with :func:`batch_warmup`. One process only.

    Args:
        config: The small-batch :class:`~leanscale.large_batch.train.TrainConfig` (its batch, LR, seed).
        data: ``(x_train, y_train, x_test, y_test)`` instead of ``config.dataset``; the branches
            train on the training split and are compared on the test split.
        model: Your model instead of ``config.model`` (as in ``train_classifier``).
        at: Checkpoints, increasing fractions of the run in (0, 1).
        batch_sizes: The branches' batches (default: 1, 2, 4 and 8 times ``config.batch_size``).
        examples: Examples per branch, a multiple of every batch (default: 32 small batches).
        lr_grid, tolerance: As in :func:`branch_critical_batch`.
        margin, max_batch_size: As in :func:`batch_warmup` (``max_batch_size`` default: the largest
            of ``batch_sizes``).
        lr_rule: How the LR follows the batch, in the branches and the schedule.
        eval_mode: ``"auto"`` (compare in train mode when the model has BatchNorm: its running
            statistics lag a branch's few steps), ``"train"`` or ``"eval"``.
        progress_bar: A progress bar over the small-batch run.

    Raises:
        InvalidParameterError: a bad parameter (named), or called under ``torchrun``.
    """
    from leanscale.core.distributed import rank_and_world
    from leanscale.large_batch.train import (
        TrainConfig,
        _check_config,
        load_image_data,
        train_classifier,
    )
    from leanscale.train.user_data import output_cross_entropy

    owner = "measure_batch_warmup"
    check_param("config", config, [TrainConfig], owner=owner)
    _check_config(config)
    if rank_and_world()[1] > 1:
        raise InvalidParameterError(
            f"{owner} runs in one process (the branches are short independent runs from copies of the checkpoint): "
            "call it without torchrun, then train the schedule under torchrun.")
    at = tuple(at) if isinstance(at, Sequence) and not isinstance(at, (str, bytes)) else None
    if (not at or any(isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1 for f in at)
            or list(at) != sorted(set(at))):
        raise InvalidParameterError(
            f"The 'at' parameter of {owner} must be checkpoints as increasing fractions of the run in (0, 1), "
            f"e.g. (0.05, 0.15, 0.4). Got {at!r}.")
    sizes = tuple(sorted(_check_sizes(batch_sizes if batch_sizes is not None
                                      else tuple(config.batch_size * k for k in (1, 2, 4, 8)),
                                      "batch_sizes", owner, 2)))
    if len(set(sizes)) != len(sizes):
        raise InvalidParameterError(f"The 'batch_sizes' parameter of {owner} must hold distinct batches. Got {sizes}.")
    ghost = config.ghost_batch_size
    if ghost is not None and sizes[0] < ghost:
        raise InvalidParameterError(
            f"The 'batch_sizes' parameter of {owner} must hold batches of at least the ghost batch ({ghost}). "
            f"Got {sizes}.")
    examples = 32 * config.batch_size if examples is None else examples
    check_param("examples", examples, [_SIZE], owner=owner)
    odd = [b for b in sizes if examples % b]
    if odd:
        raise InvalidParameterError(
            f"The 'examples' parameter of {owner} must be a multiple of every batch size (each branch trains on "
            f"the same examples); {examples} is not a multiple of {odd}. Got {examples}.")
    check_param("eval_mode", eval_mode, [Options({"auto", "train", "eval"})], owner=owner)
    top = sizes[-1] if max_batch_size is None else max_batch_size
    check_param("max_batch_size", top, [Interval(int, config.batch_size, None)], owner=owner)
    data = load_image_data(config) if data is None else data
    x_train, y_train, x_test, y_test = data
    n = len(y_train)
    if sizes[-1] > n:
        raise InvalidParameterError(
            f"The 'batch_sizes' parameter of {owner} must hold batches of at most the {n:,} training examples. "
            f"Got {sizes}.")
    total_steps = max(1, int(config.epochs * n // config.batch_size))  # as train_classifier counts them
    steps = sorted({min(total_steps, max(1, round(f * total_steps))) for f in at})
    snaps: dict[int, tuple] = {}

    def on_step(step, net, optimizer):  # the checkpoints: model and optimizer state, the run goes on
        if step in steps and step not in snaps:
            snaps[step] = copy.deepcopy((net, optimizer))

    base_run = train_classifier(config, data=data, model=model, on_step=on_step, progress_bar=progress_bar)
    cautions = list(base_run.warnings)
    results = []
    for step in steps:
        net, opt = snaps.pop(step)
        with_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
        with warnings.catch_warnings(record=True) as caught:  # kept with the result
            warnings.simplefilter("always", RuntimeWarning)
            res = branch_critical_batch(
                net, output_cross_entropy, (x_train, y_train), sizes, optimizer=opt, examples=examples,
                eval_data=(x_test, y_test), base_batch_size=config.batch_size, lr_rule=lr_rule,
                lr_grid=tuple(lr_grid), tolerance=tolerance, seed=config.seed + step,
                micro_batch_size=config.micro_batch_size,
                eval_train_mode=with_bn if eval_mode == "auto" else eval_mode == "train",
                examples_seen=step * config.batch_size)
        cautions += [f"step {step}: {w.message}" for w in caught if issubclass(w.category, RuntimeWarning)]
        results.append((step, res))
        del net, opt
    schedule = batch_warmup([r for _, r in results], config.batch_size, max_batch_size=top, margin=margin,
                            lr_rule=lr_rule)
    total_examples = max(1, int(config.epochs * n))
    return WarmupMeasurement(base_run=base_run, checkpoints=results, schedule=schedule,
                             total_examples=total_examples, steps=schedule.steps(total_examples), warnings=cautions)


# --- training with a schedule (called by leanscale.large_batch.train.train_classifier) -------------------

def _check_schedule(schedule: Any, config: Any, world: int, checkpoint: Any, owner: str) -> None:
    """Refuse what a batch schedule cannot be combined with, before any data are loaded."""
    check_param("batch_schedule", schedule, [None, BatchSizeSchedule], owner=owner)
    if schedule is None:
        return
    for name, value in (("target_accuracy", config.target_accuracy), ("max_examples", config.max_examples)):
        if value is not None:
            raise InvalidParameterError(
                f"The 'batch_schedule' parameter of {owner} cannot be combined with TrainConfig.{name} (a run with a "
                f"batch schedule trains all its examples). Got {name}={value!r}."
            )
    if checkpoint is not None:
        raise InvalidParameterError(
            f"The 'batch_schedule' parameter of {owner} cannot be combined with 'checkpoint' (resuming is per phase "
            "of a fixed batch). Got a checkpoint path."
        )
    if config.decay == "cosine":
        raise InvalidParameterError(
            f"The 'batch_schedule' parameter of {owner} supports decay='step' or 'none' (phases of constant LR). "
            "Got decay='cosine'."
        )
    for b in schedule.batch_sizes:
        local = b // world
        if b % world:
            raise InvalidParameterError(
                f"The 'batch_schedule' parameter of {owner} must hold batch sizes divisible by the number of "
                f"processes ({world}). Got {b}."
            )
        if config.ghost_batch_size is not None and config.ghost_batch_size > local:
            raise InvalidParameterError(
                f"The 'batch_schedule' parameter of {owner} must hold batch sizes whose per-process batch is at least "
                f"ghost_batch_size ({config.ghost_batch_size}). Got {b} ({local} per process)."
            )
        micro = config.micro_batch_size
        if micro is not None and micro < local and (local % micro or config.ghost_batch_size is None
                                                    or micro % config.ghost_batch_size):
            raise InvalidParameterError(
                f"The 'batch_schedule' parameter of {owner} must hold batch sizes whose per-process batch is a "
                f"multiple of micro_batch_size ({micro}, itself a multiple of ghost_batch_size). Got {b} "
                f"({local} per process)."
            )


def _fit_with_schedule(model: nn.Module, data: tuple, optimizer: torch.optim.Optimizer, schedule: BatchSizeSchedule,
                       config: Any, kwargs: dict[str, Any], world: int, owner: str):
    """The schedule's phases, each a :func:`fit_classifier` call on the same model and optimizer (the
    batch order seeded with ``config.seed + phase``; the LR milestones, fractions of all examples, fall
    on the nearest step of their phase); one merged :class:`ClassifierRun`."""
    from leanscale.core.ledger import CostLedger
    from leanscale.large_batch.ghost_bn import accumulate_running_stats
    from leanscale.train.classifier import ClassifierRun, fit_classifier

    n = len(data[1])
    total = max(1, int(config.epochs * n))
    too_big = [b for b in schedule.batch_sizes if b > n]
    if too_big:
        raise InvalidParameterError(
            f"The 'batch_schedule' parameter of {owner} must hold batch sizes of at most the number of training "
            f"examples ({n}). Got {too_big}."
        )
    cuts = [round(m * total) for m in (config.milestones if config.decay == "step" else ())]
    segments = []  # (batch, steps, LR factor of the milestones before the phase, milestones inside it as fractions)
    for phase in schedule.phases(total):
        b, start, end, n_steps = phase["batch_size"], phase["start"], phase["end"], phase["steps"]
        inner = sorted({round((c - start) / b) for c in cuts if start < c < end} - {0, n_steps})
        segments.append((b, n_steps, config.gamma ** sum(1 for c in cuts if c <= start),
                         tuple(k / n_steps for k in inner)))
    if not segments:
        raise InvalidParameterError(
            f"The 'batch_schedule' parameter of {owner} leaves no full step in {total} examples. Got {schedule!r}."
        )
    warm_steps = round(config.warmup_epochs * (n // segments[0][0]))
    if warm_steps > segments[0][1]:
        raise InvalidParameterError(
            f"The 'warmup_epochs' parameter of TrainConfig must end within the first phase of the batch schedule "
            f"({segments[0][1]} steps at batch {segments[0][0]}). Got {config.warmup_epochs:g} ({warm_steps} steps)."
        )
    on_step = kwargs.get("on_step")
    history: list[dict[str, Any]] = []
    ledger, cautions = CostLedger(), []
    steps = examples = 0
    seconds = 0.0
    run = None
    for i, (b, n_steps, factor, inner) in enumerate(segments):
        local = b // world
        micro = config.micro_batch_size if config.micro_batch_size is not None and config.micro_batch_size < local \
            else None
        offset = steps

        def hook(step: int, m: nn.Module, opt: torch.optim.Optimizer, _off: int = offset) -> None:
            on_step(step + _off, m, opt)

        seg = {**kwargs, "batch_size": b, "epochs": (n_steps * b + 0.5) / n, "seed": config.seed + i,
               "lr": schedule.lr(config.lr, config.batch_size, b) * factor, "decay": "step", "milestones": inner,
               "warmup_epochs": config.warmup_epochs if i == 0 else 0.0, "micro_batch_size": micro,
               "accumulate_context": accumulate_running_stats if micro is not None else None,
               "on_step": hook if on_step is not None else None, "checkpoint": None}
        run = fit_classifier(model, data, optimizer, **seg)
        for row in run.history:
            history.append({**row, "step": row["step"] + steps, "examples": row["examples"] + examples,
                            "epoch": (row["examples"] + examples) / n, "seconds": row["seconds"] + seconds,
                            "batch_size": b})
        steps += run.steps
        examples += run.examples
        seconds += run.seconds
        ledger = ledger.merge(run.ledger)
        cautions += run.warnings
    last = history[-1]
    return ClassifierRun(
        history=history, test_accuracy=last["test_accuracy"], test_loss=last["test_loss"],
        train_loss=last["train_loss"], steps=steps, examples=examples, seconds=seconds, steps_to_target=None,
        reached_target=None, flops_per_example=run.flops_per_example, world_size=world, ledger=ledger,
        warnings=cautions,
    )
