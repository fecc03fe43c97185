"""One object that turns a small-batch training configuration into a large-batch one.

:class:`LargeBatchRecipe` combines what the papers found, each piece switchable:

* **LR scaling** (``lr_rule``): square root of the batch ratio (Hoffer et al. 2017, arXiv
  1705.08741; keeps the gradient-noise covariance of SGD) or linear (Goyal et al. 2017, arXiv
  1706.02677; keeps the expected update per example), optionally with **gradual warmup**.
* **Ghost BatchNorm** (``ghost_batch_size``, default: the small batch): BatchNorm statistics of
  the small batch.
* **Regime adaptation** (``regime_adaptation``): Hoffer's "train longer" — as many updates as
  the small-batch regime (1.0), the same epochs (0.0) or in between; LR drops move with it.
* **LARS / LAMB** (``optimizer``) for very large batches, and **gradient clipping**.

It answers "what should my large-batch run look like" (:meth:`plan`, :meth:`describe`), rewrites a
:class:`~leanscale.large_batch.train.TrainConfig` (:meth:`train_config`) and, for your own loop,
converts the model (:meth:`apply`) and builds the LR schedule (:meth:`scheduler`).

Example:
    >>> recipe = LargeBatchRecipe(batch_size=2048, base_batch_size=128, base_lr=0.1, base_epochs=10,
    ...                           base_milestones=(5, 8))
    >>> plan = recipe.plan()
    >>> plan.lr, plan.epochs, plan.milestones, plan.ghost_batch_size
    (0.4, 160.0, (80.0, 128.0), 128)
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from leanscale.core.errors import InvalidParameterError
from leanscale.core.validation import Interval, Options, check_param
from leanscale.large_batch.schedules import DEFAULT_LR_RULE, LR_RULES

__all__ = ["LargeBatchPlan", "LargeBatchRecipe"]

_OPTIMIZERS = ("sgd", "lars", "lamb")


@dataclass(frozen=True)
class LargeBatchPlan:
    """The resolved large-batch settings and why (one line per decision in ``reasons``)."""

    batch_size: int
    lr: float
    epochs: float
    milestones: tuple[float, ...]  # in epochs of the large-batch run
    ghost_batch_size: int | None
    warmup_epochs: float
    optimizer: str
    clip_grad_norm: float | None
    updates_ratio: float  # updates of the large-batch run / updates of the small-batch run
    compute_ratio: float  # examples processed, large / small
    reasons: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class LargeBatchRecipe:
    """Settings of a large-batch run derived from a small-batch one.

    Args:
        batch_size: The large (global) batch.
        base_batch_size: The small batch the base settings were tuned for.
        base_lr: Learning rate of the small-batch run.
        base_epochs: Epochs of the small-batch run.
        base_milestones: LR-drop epochs of the small-batch run.
        lr_rule: ``"sqrt"`` (Hoffer; the default, as everywhere in leanscale:
            :data:`~leanscale.large_batch.schedules.DEFAULT_LR_RULE`), ``"linear"`` (Goyal; pair it
            with ``warmup_epochs``) or ``"none"``.
        ghost_batch_size: Ghost batch per device; ``None`` uses ``base_batch_size``; ``0``
            disables Ghost BatchNorm.
        regime_adaptation: 1.0 trains for as many updates as the small batch (Hoffer: epochs and
            milestones times ``batch_size / base_batch_size``), 0.0 for as many epochs; values in
            between interpolate the epoch multiplier linearly (a compute budget knob).
        warmup_epochs: Linear warmup from the small-batch LR (Goyal et al.); 0 for none.
        optimizer: ``"sgd"``, ``"lars"`` or ``"lamb"``.
        clip_grad_norm: Clip the global gradient norm to this (None: no clipping).
        max_lr: Cap on the scaled LR (None: no cap); the linear rule breaks down beyond the
            critical batch (McCandlish et al. 2018), so a cap is a good idea there.
    """

    batch_size: int
    base_batch_size: int = 128
    base_lr: float = 0.1
    base_epochs: float = 1.0
    base_milestones: tuple[float, ...] = ()
    lr_rule: str = DEFAULT_LR_RULE
    ghost_batch_size: int | None = None
    regime_adaptation: float = 1.0
    warmup_epochs: float = 0.0
    optimizer: str = "sgd"
    clip_grad_norm: float | None = None
    max_lr: float | None = None

    def __post_init__(self) -> None:
        owner = "LargeBatchRecipe"
        positive = [Interval(float, 0, math.inf, closed="neither")]  # finite: inf epochs/LR is no plan
        check_param("batch_size", self.batch_size, [Interval(int, 1, None)], owner=owner)
        check_param("base_batch_size", self.base_batch_size, [Interval(int, 1, None)], owner=owner)
        check_param("base_lr", self.base_lr, positive, owner=owner)
        check_param("base_epochs", self.base_epochs, positive, owner=owner)
        check_param("lr_rule", self.lr_rule, [Options(set(LR_RULES))], owner=owner)
        check_param("ghost_batch_size", self.ghost_batch_size, [None, Interval(int, 0, None)], owner=owner)
        check_param("regime_adaptation", self.regime_adaptation, [Interval(float, 0, 1)], owner=owner)
        check_param("warmup_epochs", self.warmup_epochs, [Interval(float, 0, math.inf, closed="left")], owner=owner)
        check_param("optimizer", self.optimizer, [Options(set(_OPTIMIZERS))], owner=owner)
        check_param("clip_grad_norm", self.clip_grad_norm, [None, *positive], owner=owner)
        check_param("max_lr", self.max_lr, [None, *positive], owner=owner)
        ms = self.base_milestones
        if isinstance(ms, (str, bytes)) or not isinstance(ms, (tuple, list)) or not all(
                isinstance(m, numbers.Real) and not isinstance(m, bool) for m in ms):
            raise InvalidParameterError(
                f"The 'base_milestones' parameter of LargeBatchRecipe must be a sequence of numbers (LR-drop "
                f"epochs). Got {ms!r} instead."
            )
        ms = tuple(ms)
        if list(ms) != sorted(set(ms)) or any(not (0 < m < self.base_epochs) for m in ms):
            raise InvalidParameterError(
                f"The 'base_milestones' parameter of LargeBatchRecipe must be increasing epochs in "
                f"(0, base_epochs={self.base_epochs:g}). Got {ms!r} instead."
            )
        g = self.ghost_batch_size
        if g and g > self.batch_size:
            raise InvalidParameterError(
                f"The 'ghost_batch_size' parameter of LargeBatchRecipe must be at most the batch "
                f"({self.batch_size}). Got {g} instead."
            )
        epochs = self.base_epochs * (1.0 + self.regime_adaptation * (self.batch_size / self.base_batch_size - 1.0))
        if self.warmup_epochs > epochs:
            raise InvalidParameterError(
                f"The 'warmup_epochs' parameter of LargeBatchRecipe must be at most the epochs of the "
                f"large-batch run ({epochs:g}). Got {self.warmup_epochs:g} instead: the run would end "
                f"before the warmup does."
            )

    @property
    def resolved_ghost_batch_size(self) -> int | None:
        if self.ghost_batch_size == 0:
            return None
        g = self.base_batch_size if self.ghost_batch_size is None else self.ghost_batch_size
        return g if g < self.batch_size else None  # a ghost batch as large as the batch is plain BN

    def plan(self) -> LargeBatchPlan:
        """The large-batch settings, with the reasoning."""
        from leanscale.large_batch.schedules import scale_lr

        k = self.batch_size / self.base_batch_size
        reasons = []
        lr = scale_lr(self.base_lr, self.base_batch_size, self.batch_size, lr_rule=self.lr_rule)
        if not math.isfinite(lr):
            raise InvalidParameterError(
                f"The 'base_lr' parameter of LargeBatchRecipe gives a scaled LR of {lr!r} at batch "
                f"{self.batch_size} with lr_rule={self.lr_rule!r}. Got base_lr={self.base_lr!r}: use a "
                f"smaller base_lr or batch_size (or max_lr)."
            )
        if self.lr_rule == "sqrt":
            reasons.append(f"LR x sqrt({self.batch_size}/{self.base_batch_size}) = x{math.sqrt(k):.3g}: keeps "
                           f"the covariance of the weight updates (Hoffer et al. 2017)")
        elif self.lr_rule == "linear":
            reasons.append(f"LR x {self.batch_size}/{self.base_batch_size} = x{k:.3g}: keeps the update per "
                           f"example (Goyal et al. 2017); pair it with warmup")
        if self.max_lr is not None and lr > self.max_lr:
            reasons.append(f"LR capped at max_lr={self.max_lr:g} (scaled value {lr:.3g})")
            lr = self.max_lr
        multiplier = 1.0 + self.regime_adaptation * (k - 1.0)
        epochs = self.base_epochs * multiplier
        milestones = tuple(m * multiplier for m in self.base_milestones)
        if self.regime_adaptation > 0 and k != 1:
            reasons.append(f"epochs and LR drops x{multiplier:.3g}: {self.regime_adaptation:.0%} of Hoffer's "
                           f"regime adaptation (same number of updates at 100%)")
        g = self.resolved_ghost_batch_size
        if g is not None:
            reasons.append(f"Ghost BatchNorm with {g} examples per ghost batch: the BatchNorm noise of the "
                           f"small batch")
        if self.warmup_epochs:
            reasons.append(f"{self.warmup_epochs:g} warmup epochs from the small-batch LR (Goyal et al. 2017)")
        if self.optimizer != "sgd":
            reasons.append(f"{self.optimizer.upper()}: layer-wise trust ratio for very large batches")
        if self.clip_grad_norm is not None:
            reasons.append(f"gradient norm clipped at {self.clip_grad_norm:g}")
        updates_ratio = multiplier / k
        return LargeBatchPlan(
            batch_size=self.batch_size, lr=lr, epochs=epochs, milestones=milestones, ghost_batch_size=g,
            warmup_epochs=self.warmup_epochs, optimizer=self.optimizer, clip_grad_norm=self.clip_grad_norm,
            updates_ratio=updates_ratio, compute_ratio=multiplier, reasons=tuple(reasons),
        )

    def describe(self) -> str:
        """A readable paragraph: the small-batch run, the large-batch run, and why."""
        p = self.plan()
        lines = [
            f"small batch: batch {self.base_batch_size}, LR {self.base_lr:g}, {self.base_epochs:g} epochs"
            + (f", LR drops at {', '.join(f'{m:g}' for m in self.base_milestones)}" if self.base_milestones else ""),
            f"large batch: batch {p.batch_size}, LR {p.lr:.4g}, {p.epochs:g} epochs"
            + (f", LR drops at {', '.join(f'{m:g}' for m in p.milestones)}" if p.milestones else "")
            + (f", ghost batch {p.ghost_batch_size}" if p.ghost_batch_size else "")
            + (f", {p.warmup_epochs:g} warmup epochs" if p.warmup_epochs else "")
            + (f", {p.optimizer.upper()}" if p.optimizer != "sgd" else ""),
            f"updates: x{p.updates_ratio:.3g} of the small-batch run; examples processed: x{p.compute_ratio:.3g}",
            "why:",
            *(f"  - {r}" for r in p.reasons),
        ]
        return "\n".join(lines)

    def apply(self, model: nn.Module, optimizers=None) -> nn.Module:
        """Convert ``model``'s BatchNorm layers to Ghost BatchNorm (when the recipe uses it)."""
        g = self.resolved_ghost_batch_size
        if g is None:
            return model
        from leanscale.large_batch.ghost_bn import apply_ghost_batchnorm

        return apply_ghost_batchnorm(model, g, optimizers)

    def scheduler(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int, gamma: float = 0.1):
        """A per-step LR schedule for ``optimizer``: warmup, then drops at the adapted milestones.

        Sets the optimizer's LR to the planned peak first. Call ``scheduler.step()`` after every
        optimizer step.
        """
        from leanscale.large_batch.schedules import warmup_schedule

        check_param("optimizer", optimizer, [torch.optim.Optimizer], owner="LargeBatchRecipe.scheduler")
        check_param("steps_per_epoch", steps_per_epoch, [Interval(int, 1, None)], owner="LargeBatchRecipe.scheduler")
        p = self.plan()
        for group in optimizer.param_groups:
            group["lr"] = p.lr
            group["initial_lr"] = p.lr
        return warmup_schedule(
            optimizer, round(p.warmup_epochs * steps_per_epoch),
            milestones=tuple(round(m * steps_per_epoch) for m in p.milestones), gamma=gamma,
            start_factor=self.base_lr / p.lr if p.warmup_epochs else None,
        )

    def train_config(self, base):
        """The large-batch :class:`~leanscale.large_batch.train.TrainConfig` of a small-batch one.

        ``base``'s batch, LR and epochs must be this recipe's base settings (its milestones are
        fractions of training and stay as they are: regime adaptation moves them with the epochs).
        """
        from leanscale.large_batch.train import TrainConfig

        check_param("base", base, [TrainConfig], owner="LargeBatchRecipe.train_config")
        for name, mine, theirs in (("base_batch_size", self.base_batch_size, base.batch_size),
                                   ("base_lr", self.base_lr, base.lr), ("base_epochs", self.base_epochs, base.epochs)):
            if not math.isclose(mine, theirs, rel_tol=1e-9):
                raise InvalidParameterError(
                    f"The 'base' parameter of LargeBatchRecipe.train_config must be the small-batch run "
                    f"the recipe was made for: the recipe's {name} is {mine!r}, the config has {theirs!r}."
                )
        p = self.plan()
        warm_start = self.base_lr / p.lr if p.warmup_epochs else base.warmup_start_factor
        return replace(
            base, batch_size=p.batch_size, lr=p.lr, epochs=p.epochs, ghost_batch_size=p.ghost_batch_size,
            warmup_epochs=p.warmup_epochs, warmup_start_factor=min(1.0, warm_start), optimizer=p.optimizer,
            clip_grad_norm=p.clip_grad_norm,
            eval_every_epochs=base.eval_every_epochs * p.compute_ratio,
        )
