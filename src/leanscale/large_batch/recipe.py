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
* **AdamW** (``optimizer="adamw"``): the weight decay keeps AdamW's EMA timescale
  ``tau = B / (lr * weight_decay * D)`` (a fraction of the run; Wang & Aitchison 2024, arXiv
  2405.13698; Bergsma et al. 2025, "Power Lines", arXiv 2505.13738) and ``beta2`` keeps its
  half-life in examples (``beta2 ** (B / B0)``; Marek et al. 2025, arXiv 2507.07101).

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
import warnings
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from leanscale.core.errors import InvalidParameterError
from leanscale.core.validation import Interval, Options, check_param
from leanscale.large_batch.schedules import DEFAULT_LR_RULE, LR_RULES

__all__ = ["LargeBatchPlan", "LargeBatchRecipe", "adamw_timescale", "beta_half_life", "scale_beta"]

_OPTIMIZERS = ("sgd", "lars", "lamb", "adamw")
_ADAMW_DEFAULT_WEIGHT_DECAY = 0.01  # torch.optim.AdamW's defaults
_ADAMW_DEFAULT_BETAS = (0.9, 0.999)


def scale_beta(beta: float, base_batch_size: int, batch_size: int) -> float:
    """An EMA decay rate for ``batch_size`` that keeps the half-life, in examples, of one tuned at
    ``base_batch_size``: ``beta ** (batch_size / base_batch_size)``.

    Marek et al. 2025 (arXiv 2507.07101) propose this for Adam's ``beta2`` ("hold its half-life
    fixed in terms of tokens" rather than the decay rate): an EMA with decay ``beta`` per step
    halves the weight of a gradient after ``ln(0.5) / ln(beta)`` steps, i.e. after
    ``batch_size * ln(0.5) / ln(beta)`` examples (tokens, with a fixed sequence length).

    Args:
        beta: Decay rate tuned at ``base_batch_size``, in [0, 1).
        base_batch_size: The batch ``beta`` was tuned for (>= 1).
        batch_size: The new batch (>= 1).

    Returns:
        The decay rate at ``batch_size`` (in [0, 1)).

    Raises:
        InvalidParameterError: ``beta`` outside [0, 1), non-positive batches, or a result that
            rounds to 1.0 in float64 (a half-life too long for the new batch to express).
    """
    owner = "scale_beta"
    check_param("beta", beta, [Interval(float, 0, 1, closed="left")], owner=owner)
    check_param("base_batch_size", base_batch_size, [Interval(int, 1, None)], owner=owner)
    check_param("batch_size", batch_size, [Interval(int, 1, None)], owner=owner)
    out = float(beta) ** (batch_size / base_batch_size)
    if out >= 1.0:
        raise InvalidParameterError(
            f"The 'beta' parameter of scale_beta is too close to 1 for batch {batch_size}: {beta!r} ** "
            f"({batch_size}/{base_batch_size}) rounds to 1.0 (no averaging horizon left). Got beta={beta!r}."
        )
    return out


def beta_half_life(beta: float, batch_size: int) -> float:
    """Half-life in examples of an EMA with decay ``beta`` per step of ``batch_size`` examples:
    ``batch_size * ln(0.5) / ln(beta)`` (0 for ``beta == 0``)."""
    check_param("beta", beta, [Interval(float, 0, 1, closed="left")], owner="beta_half_life")
    check_param("batch_size", batch_size, [Interval(int, 1, None)], owner="beta_half_life")
    return 0.0 if beta == 0 else batch_size * math.log(0.5) / math.log(beta)


def adamw_timescale(batch_size: int, lr: float, weight_decay: float, n_examples: float) -> float:
    """AdamW's EMA timescale as a fraction of the run: ``tau = B / (lr * weight_decay * D)``.

    With decoupled weight decay the weights are an exponential moving average of the updates with
    rate ``lr * weight_decay`` per step, i.e. a timescale of ``1 / (lr * weight_decay)`` steps
    (Wang & Aitchison 2024, arXiv 2405.13698); divided by the ``D / B`` steps of the run it is
    Bergsma et al.'s ``tau_EMA`` (2025, arXiv 2505.13738).

    Args:
        batch_size: Examples (or tokens) per step, B.
        lr: Peak learning rate (> 0).
        weight_decay: AdamW's (decoupled) weight decay (> 0).
        n_examples: Examples (or tokens, the unit of ``batch_size``) processed by the run, D.

    Returns:
        tau: 1.0 means the EMA averages over the whole run.
    """
    owner = "adamw_timescale"
    positive = [Interval(float, 0, math.inf, closed="neither")]
    check_param("batch_size", batch_size, [Interval(int, 1, None)], owner=owner)
    check_param("lr", lr, positive, owner=owner)
    check_param("weight_decay", weight_decay, positive, owner=owner)
    check_param("n_examples", n_examples, positive, owner=owner)
    return batch_size / (lr * weight_decay * n_examples)


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
    # optimizer="adamw" only (None otherwise):
    weight_decay: float | None = None  # AdamW's decoupled weight decay of the large-batch run
    betas: tuple[float, float] | None = None  # AdamW's (beta1, beta2) of the large-batch run
    timescale: float | None = None  # tau = B / (lr * weight_decay * D): needs dataset_size and weight decay > 0

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
        optimizer: ``"sgd"``, ``"lars"``, ``"lamb"`` or ``"adamw"`` (``torch.optim.AdamW`` with
            the weight decay and betas below: :meth:`adamw`).
        clip_grad_norm: Clip the global gradient norm to this (None: no clipping).
        max_lr: Cap on the scaled LR (None: no cap); the linear rule breaks down beyond the
            critical batch (McCandlish et al. 2018), so a cap is a good idea there.
        base_weight_decay: AdamW only: the (decoupled) weight decay of the small-batch run, >= 0;
            None: 0.01 (``torch.optim.AdamW``'s default).
        base_betas: AdamW only: ``(beta1, beta2)`` of the small-batch run, each in [0, 1); None:
            (0.9, 0.999).
        dataset_size: AdamW only, optional: examples (or tokens: the unit of the batches) per
            epoch; gives :attr:`timescale` as a fraction of the run. None: no timescale reported
            (the rules below do not need it).
        keep_timescale: AdamW: scale the weight decay so that the EMA timescale
            ``tau = B / (lr * weight_decay * D)`` stays the same fraction of the run (Wang &
            Aitchison 2024; Bergsma et al. 2025):
            ``weight_decay = base_weight_decay * (base_lr / lr) / updates_ratio`` -- at the same
            data (``regime_adaptation=0``) that is ``* (B / B0) * (base_lr / lr)``; at the same
            number of updates (``regime_adaptation=1``) ``* (base_lr / lr)``. False: keep it.
        keep_beta2_half_life: AdamW: ``beta2 = base_beta2 ** (B / B0)``, the half-life in examples
            of the second-moment EMA stays fixed (Marek et al. 2025). False: keep beta2.
        keep_beta1_half_life: AdamW: the same for ``beta1`` (off by default: Marek et al.'s rule
            is stated for beta2; Malladi et al.'s SDE rule scales both ``1 - beta``).
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
    base_weight_decay: float | None = None
    base_betas: tuple[float, float] | None = None
    dataset_size: int | None = None
    keep_timescale: bool = True
    keep_beta2_half_life: bool = True
    keep_beta1_half_life: bool = False

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
        self._check_adamw_params(owner)
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
        if self.optimizer == "adamw":
            self._check_adamw_settings()

    def _check_adamw_params(self, owner: str) -> None:
        """Types and ranges of the AdamW fields (and that they are not given for another optimizer)."""
        for name in ("keep_timescale", "keep_beta2_half_life", "keep_beta1_half_life"):
            check_param(name, getattr(self, name), [bool], owner=owner)
        if self.optimizer != "adamw":
            for name in ("base_weight_decay", "base_betas", "dataset_size"):
                if getattr(self, name) is not None:
                    raise InvalidParameterError(
                        f"The {name!r} parameter of LargeBatchRecipe is only used with optimizer='adamw' (the "
                        f"AdamW rules). Got {name}={getattr(self, name)!r} with optimizer={self.optimizer!r}."
                    )
            return
        check_param("base_weight_decay", self.base_weight_decay,
                    [None, Interval(float, 0, math.inf, closed="left")], owner=owner)
        check_param("dataset_size", self.dataset_size, [None, Interval(int, 1, None)], owner=owner)
        betas = self.base_betas
        if betas is not None and (
                isinstance(betas, (str, bytes)) or not isinstance(betas, (tuple, list)) or len(betas) != 2
                or not all(Interval(float, 0, 1, closed="left").is_satisfied_by(b) for b in betas)):
            raise InvalidParameterError(
                f"The 'base_betas' parameter of LargeBatchRecipe must be a pair (beta1, beta2) of floats in "
                f"[0, 1). Got {betas!r} instead."
            )
        if self.dataset_size is not None and self.dataset_size < max(self.batch_size, self.base_batch_size):
            raise InvalidParameterError(
                f"The 'dataset_size' parameter of LargeBatchRecipe must be at least the batches (examples per "
                f"epoch >= {max(self.batch_size, self.base_batch_size)}). Got {self.dataset_size} instead."
            )

    def _check_adamw_settings(self) -> None:
        """The derived AdamW settings must be usable: ``lr * weight_decay < 1`` and betas below 1."""
        lr = self._lr()[0]
        wd0, (b10, b20) = self._adamw_base()
        if self.base_lr * wd0 >= 1:
            raise InvalidParameterError(
                f"The 'base_weight_decay' parameter of LargeBatchRecipe times base_lr must be below 1 (AdamW "
                f"multiplies the weights by 1 - lr * weight_decay each step). Got base_weight_decay={wd0!r} with "
                f"base_lr={self.base_lr!r}."
            )
        wd = self._weight_decay(lr)
        if lr * wd >= 1:
            raise InvalidParameterError(
                f"The 'base_weight_decay' parameter of LargeBatchRecipe gives a weight decay of {wd:.4g} at LR "
                f"{lr:.4g} for batch {self.batch_size}: lr * weight_decay = {lr * wd:.3g} >= 1, the weights would "
                f"flip sign every step (the EMA timescale would be shorter than one step). Got "
                f"base_weight_decay={wd0!r}: use a smaller one, fewer updates (regime_adaptation) or "
                f"keep_timescale=False."
            )
        for i, (flag, beta) in enumerate(((self.keep_beta1_half_life, b10), (self.keep_beta2_half_life, b20))):
            if flag and float(beta) ** (self.batch_size / self.base_batch_size) >= 1.0:
                raise InvalidParameterError(
                    f"The 'base_betas' parameter of LargeBatchRecipe has beta{i + 1}={beta!r}, too close to 1 for "
                    f"batch {self.batch_size}: beta ** ({self.batch_size}/{self.base_batch_size}) rounds to 1.0. "
                    f"Got base_betas={self.base_betas!r}."
                )
        note = self._beta_instability((b10, b20), self._adamw_plan(lr, self.base_epochs * self._multiplier())[1])
        if note:
            warnings.warn(f"LargeBatchRecipe: {note}", RuntimeWarning, stacklevel=3)

    @staticmethod
    def _beta_instability(base: tuple[float, float], betas: tuple[float, float]) -> str | None:
        """A note when the rules made ``beta1 > sqrt(beta2)`` (the base betas did not): outside the
        condition under which Adam's convergence is shown (e.g. Zhang et al. 2022)."""
        b1, b2 = betas
        if b1 > math.sqrt(b2) and not base[0] > math.sqrt(base[1]):
            return (f"beta1={b1:.4g} > sqrt(beta2)={math.sqrt(b2):.4g}: Adam may diverge (beta2 fell with the "
                    f"larger batch; our benchmark diverged at beta2 0.95 -> 0.44). Raise base_betas[1], set "
                    f"keep_beta1_half_life=True or keep_beta2_half_life=False")
        return None

    def _adamw_base(self) -> tuple[float, tuple[float, float]]:
        wd0 = _ADAMW_DEFAULT_WEIGHT_DECAY if self.base_weight_decay is None else float(self.base_weight_decay)
        b1, b2 = _ADAMW_DEFAULT_BETAS if self.base_betas is None else self.base_betas
        return wd0, (float(b1), float(b2))

    def _multiplier(self) -> float:
        """Epochs of the large-batch run / epochs of the small-batch run (regime adaptation)."""
        return 1.0 + self.regime_adaptation * (self.batch_size / self.base_batch_size - 1.0)

    def _lr(self) -> tuple[float, list[str]]:
        """The large-batch LR (scaled, capped) and the reasons."""
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
                           f"the covariance of the weight updates (Hoffer et al. 2017)"
                           + ("; for Adam also the square-root SDE rule (Malladi et al. 2022)"
                              if self.optimizer == "adamw" else ""))
        elif self.lr_rule == "linear":
            reasons.append(f"LR x {self.batch_size}/{self.base_batch_size} = x{k:.3g}: keeps the update per "
                           f"example (Goyal et al. 2017); pair it with warmup"
                           + ("; for Adam the SDE rule is sqrt, not linear (Malladi et al. 2022)"
                              if self.optimizer == "adamw" else ""))
        if self.max_lr is not None and lr > self.max_lr:
            reasons.append(f"LR capped at max_lr={self.max_lr:g} (scaled value {lr:.3g})")
            lr = self.max_lr
        return lr, reasons

    def _weight_decay(self, lr: float) -> float:
        """AdamW's weight decay at the large batch: the same timescale fraction (or unchanged)."""
        wd0 = self._adamw_base()[0]
        if not self.keep_timescale:
            return wd0
        updates_ratio = self._multiplier() / (self.batch_size / self.base_batch_size)
        # tau = 1 / (lr * wd * steps): steps x updates_ratio, so lr * wd / (lr0 * wd0) = 1 / updates_ratio
        return wd0 * (self.base_lr / lr) / updates_ratio

    def _adamw_plan(self, lr: float, epochs: float) -> tuple[float, tuple[float, float], float | None, list[str]]:
        """Weight decay, betas, timescale and the reasons of an AdamW run at ``lr`` for ``epochs``."""
        wd0, (b10, b20) = self._adamw_base()
        wd = self._weight_decay(lr)
        b1 = scale_beta(b10, self.base_batch_size, self.batch_size) if self.keep_beta1_half_life else b10
        b2 = scale_beta(b20, self.base_batch_size, self.batch_size) if self.keep_beta2_half_life else b20
        reasons = []
        if self.keep_timescale and wd0 > 0:
            reasons.append(
                f"weight decay {wd0:g} -> {wd:.4g} (x{wd / wd0:.3g}): keeps AdamW's EMA timescale "
                f"tau = B/(lr*wd*D) the same fraction of the run (Wang & Aitchison 2024; Bergsma et al. 2025: "
                f"the optimal wd grows linearly with B at fixed model and data)")
        elif wd0 > 0:
            reasons.append(f"weight decay kept at {wd0:g} (keep_timescale=False): the EMA timescale moves")
        for name, flag, b0, b in (("beta1", self.keep_beta1_half_life, b10, b1),
                                  ("beta2", self.keep_beta2_half_life, b20, b2)):
            if flag and b0 > 0:
                reasons.append(
                    f"{name} {b0:g} -> {b:.6g}: keeps its half-life at {beta_half_life(b0, self.base_batch_size):.4g} "
                    f"examples (Marek et al. 2025)")
        note = self._beta_instability((b10, b20), (b1, b2))
        if note:
            reasons.append("WARNING: " + note)
        tau = None
        if self.dataset_size is not None and wd > 0:
            tau = adamw_timescale(self.batch_size, lr, wd, epochs * self.dataset_size)
            tau_epochs = tau * epochs
            line = f"EMA timescale tau = {tau:.3g} of the run ({tau_epochs:.3g} epochs)"
            if tau > 1:
                line += ": longer than the run, weight decay barely acts (Wang & Aitchison: <= the run)"
            elif tau_epochs < 1:
                line += ": under one epoch, the EMA forgets data it saw (Wang & Aitchison: >= 1 epoch)"
            reasons.append(line)
        return wd, (b1, b2), tau, reasons

    @property
    def weight_decay(self) -> float | None:
        """AdamW's weight decay at the large batch (None unless ``optimizer="adamw"``)."""
        return self.plan().weight_decay

    @property
    def betas(self) -> tuple[float, float] | None:
        """AdamW's ``(beta1, beta2)`` at the large batch (None unless ``optimizer="adamw"``)."""
        return self.plan().betas

    @property
    def timescale(self) -> float | None:
        """AdamW's EMA timescale ``B / (lr * weight_decay * D)`` of the large-batch run, a fraction of
        the run (None unless ``optimizer="adamw"`` with ``dataset_size`` and a weight decay > 0)."""
        return self.plan().timescale

    @property
    def base_timescale(self) -> float | None:
        """The same for the small-batch run (equal to :attr:`timescale` with ``keep_timescale``)."""
        if self.optimizer != "adamw" or self.dataset_size is None:
            return None
        wd0 = self._adamw_base()[0]
        if wd0 == 0:
            return None
        return adamw_timescale(self.base_batch_size, self.base_lr, wd0, self.base_epochs * self.dataset_size)

    @property
    def resolved_ghost_batch_size(self) -> int | None:
        if self.ghost_batch_size == 0:
            return None
        g = self.base_batch_size if self.ghost_batch_size is None else self.ghost_batch_size
        return g if g < self.batch_size else None  # a ghost batch as large as the batch is plain BN

    def plan(self) -> LargeBatchPlan:
        """The large-batch settings, with the reasoning."""
        k = self.batch_size / self.base_batch_size
        lr, reasons = self._lr()
        multiplier = self._multiplier()
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
        if self.optimizer in ("lars", "lamb"):
            reasons.append(f"{self.optimizer.upper()}: layer-wise trust ratio for very large batches")
        wd = betas = tau = None
        if self.optimizer == "adamw":
            wd, betas, tau, adamw_reasons = self._adamw_plan(lr, epochs)
            reasons.extend(adamw_reasons)
        if self.clip_grad_norm is not None:
            reasons.append(f"gradient norm clipped at {self.clip_grad_norm:g}")
        updates_ratio = multiplier / k
        return LargeBatchPlan(
            batch_size=self.batch_size, lr=lr, epochs=epochs, milestones=milestones, ghost_batch_size=g,
            warmup_epochs=self.warmup_epochs, optimizer=self.optimizer, clip_grad_norm=self.clip_grad_norm,
            updates_ratio=updates_ratio, compute_ratio=multiplier, reasons=tuple(reasons),
            weight_decay=wd, betas=betas, timescale=tau,
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
            *([f"AdamW: weight decay {self._adamw_base()[0]:g} -> {p.weight_decay:.4g}, betas "
               f"({', '.join(f'{b:g}' for b in self._adamw_base()[1])}) -> ({', '.join(f'{b:.6g}' for b in p.betas)})"
               + (f", EMA timescale {self.base_timescale:.3g} -> {p.timescale:.3g} of the run"
                  if p.timescale is not None else "")]
              if p.optimizer == "adamw" else []),
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

    def adamw(self, params, **kwargs) -> torch.optim.AdamW:
        """``torch.optim.AdamW`` with the planned LR, weight decay and betas (``optimizer="adamw"``).

        Args:
            params: Parameters or param groups; a group's own ``weight_decay`` (e.g. 0 for biases and
                norm weights) overrides the planned one, as in torch.
            **kwargs: Other ``torch.optim.AdamW`` arguments (``eps``, ``fused``...).

        Returns:
            The optimizer; :meth:`scheduler` adds warmup and the LR drops.
        """
        if self.optimizer != "adamw":
            raise InvalidParameterError(
                f"The 'optimizer' parameter of LargeBatchRecipe must be 'adamw' for LargeBatchRecipe.adamw. "
                f"Got {self.optimizer!r} instead."
            )
        for name in ("lr", "betas", "weight_decay"):
            if name in kwargs:
                raise InvalidParameterError(
                    f"The {name!r} parameter of LargeBatchRecipe.adamw is set by the recipe; leave it out. "
                    f"Got {name}={kwargs[name]!r}."
                )
        p = self.plan()
        return torch.optim.AdamW(params, lr=p.lr, betas=p.betas, weight_decay=p.weight_decay, **kwargs)

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
        With ``optimizer="adamw"`` the config also carries the plan's weight decay and betas
        (``momentum`` is beta1).
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
        # AdamW: the plan's weight decay (timescale rule) and betas (beta2 rule); beta1 is TrainConfig's momentum
        adamw = ({"weight_decay": p.weight_decay, "momentum": p.betas[0], "beta2": p.betas[1]}
                 if p.optimizer == "adamw" else {})
        return replace(
            base, batch_size=p.batch_size, lr=p.lr, epochs=p.epochs, ghost_batch_size=p.ghost_batch_size,
            warmup_epochs=p.warmup_epochs, warmup_start_factor=min(1.0, warm_start), optimizer=p.optimizer,
            clip_grad_norm=p.clip_grad_norm,
            eval_every_epochs=base.eval_every_epochs * p.compute_ratio, **adamw,
        )
