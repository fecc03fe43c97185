"""A compact, reproducible image-classification training loop for large-batch experiments.

It is what the benchmarks, the tour and ``leanscale batch train`` run, and a reference for wiring
the large-batch pieces into your own loop: Ghost BatchNorm surgery, LR scaling with warmup and
step decay, LARS/LAMB, gradient clipping, periodic evaluation, steps-to-target measurement, the
cost ledger, and DDP (under ``torchrun`` each rank trains on its contiguous slice of every
*global* batch, so one process and N processes see the same batches).

Batches are drawn without replacement from a seeded permutation per epoch and the last partial
batch is dropped (Ghost BatchNorm needs full ghost batches). ``epochs`` may be fractional; the
number of steps is ``floor(epochs * n_train / batch_size)`` (at least 1).

Example:
    >>> cfg = TrainConfig(n_train=512, n_test=256, width=4, batch_size=64, epochs=1.0)
    >>> result = train_classifier(cfg)  # doctest: +SKIP
    >>> result.test_accuracy  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

from leanscale.core.deprecation import moved_attributes
from leanscale.core.distributed import rank_and_world
from leanscale.core.errors import InvalidParameterError
from leanscale.core.flops import count_flops
from leanscale.core.validation import Interval, Options, check_param
from leanscale.train.classifier import (
    ClassifierRun,
    check_classification_data,
    check_model_output,
    fit_classifier,
)
from leanscale.train.distributed import release

__all__ = ["TrainConfig", "TrainResult", "build_model", "load_image_data", "train_classifier"]

_DATASETS = ("fashion-mnist",)
_MODELS = ("bncnn", "mlp")
_OPTIMIZERS = ("sgd", "lars", "lamb", "adamw")
_DECAYS = ("step", "cosine", "none")


@dataclass(frozen=True)
class TrainConfig:
    """One training run; ``leanscale batch train --set key=value`` changes a field.

    The defaults are the small-batch baseline of our benchmark: Hoffer et al.'s setting scaled
    down to a 2-core CPU (SGD, momentum 0.9, weight decay 5e-4, batch 128, LR 0.1 dropped 10x at
    50% and 75% of training).
    """

    # --- data ---
    dataset: str = "fashion-mnist"  # built-in data set (IDX files; see data_root)
    data_root: str | None = None  # folder with the IDX files (None: the Debian package's location)
    n_train: int | None = None  # stratified training subset (None: all 60,000)
    n_test: int | None = None  # stratified test subset for evaluation (None: all 10,000)
    # --- model ---
    model: str = "bncnn"  # "bncnn" (4 conv-BN-ReLU layers) or "mlp" (Linear-BN-ReLU-Linear)
    width: int = 8  # channels of the first stage (bncnn) or hidden units / 8 (mlp)
    # --- optimisation ---
    batch_size: int = 128  # global batch (split over ranks under DDP)
    lr: float = 0.1  # peak learning rate
    optimizer: str = "sgd"  # "sgd" (momentum), "lars" (needs ~10-100x SGD's lr: trust coefficient 1e-3), "lamb"
    # or "adamw" (torch.optim.AdamW, decoupled weight decay; LargeBatchRecipe(optimizer="adamw") plans it)
    momentum: float = 0.9  # SGD/LARS momentum (LAMB, AdamW: beta1)
    beta2: float = 0.999  # LAMB/AdamW: the second-moment decay rate
    nesterov: bool = False  # Nesterov momentum for SGD
    weight_decay: float = 5e-4  # L2 on conv/linear weights (AdamW: decoupled); none on BatchNorm and biases
    epochs: float = 1.0  # passes over the training set (fractional allowed)
    milestones: tuple[float, ...] = (0.5, 0.75)  # LR drops, as FRACTIONS of training (decay="step")
    gamma: float = 0.1  # LR factor at each milestone
    decay: str = "step"  # "step", "cosine" or "none" after warmup
    warmup_epochs: float = 0.0  # linear warmup from lr * warmup_start_factor (Goyal et al. 2017)
    warmup_start_factor: float = 0.0  # 0: Goyal's "start small" from 0; k_small/k_large: from the small-batch LR
    ghost_batch_size: int | None = None  # Ghost BatchNorm ghost batch per device (None: plain BN)
    clip_grad_norm: float | None = None  # clip the global gradient norm (None: no clipping)
    micro_batch_size: int | None = None  # accumulate gradients over micro-batches of this size (per
    # device): the same step with less memory, and on CPUs faster (small batches stay in cache). Exact
    # only with Ghost BatchNorm whose ghost batch divides it (plain BatchNorm would see other statistics).
    # --- bookkeeping ---
    seed: int = 0  # model initialisation and batch order
    eval_every_epochs: float = 0.25  # evaluate this often (fraction of an epoch)
    target_accuracy: float | None = None  # stop at the first evaluation reaching it (steps-to-target)
    eval_growth: float | None = None  # with a target: evaluate at steps growing by this factor instead
    max_examples: int | None = None  # with a target: give up after this many training examples
    target_smoothing: int = 1  # with a target: compare the mean of the last k evaluations (noise at constant LR)
    threads: int | None = None  # torch threads (None: leave as is)


@dataclass
class TrainResult(ClassifierRun):
    """What :func:`train_classifier` returns: the engine's :class:`~leanscale.train.classifier.ClassifierRun`
    (``history`` has one dict per evaluation) with the run's ``config`` and, with
    ``keep_model=True``, the trained ``model``."""

    config: TrainConfig = field(kw_only=True)
    model: nn.Module | None = None

    def to_dict(self) -> dict[str, Any]:
        from leanscale.core.config import config_to_dict

        return {
            "config": config_to_dict(self.config), "test_accuracy": self.test_accuracy,
            "test_loss": self.test_loss, "train_loss": self.train_loss, "steps": self.steps,
            "examples": self.examples, "seconds": self.seconds, "steps_to_target": self.steps_to_target,
            "reached_target": self.reached_target, "flops_per_example": self.flops_per_example,
            "world_size": self.world_size, "history": self.history, "ledger": self.ledger.to_rows(),
            "warnings": list(self.warnings),
        }


def _check_config(c: TrainConfig) -> None:
    owner = "TrainConfig"
    check_param("dataset", c.dataset, [Options(set(_DATASETS))], owner=owner)
    check_param("model", c.model, [Options(set(_MODELS))], owner=owner)
    check_param("optimizer", c.optimizer, [Options(set(_OPTIMIZERS))], owner=owner)
    check_param("decay", c.decay, [Options(set(_DECAYS))], owner=owner)
    for name in ("n_train", "n_test", "ghost_batch_size", "micro_batch_size", "max_examples", "threads"):
        check_param(name, getattr(c, name), [None, Interval(int, 1, None)], owner=owner)
    check_param("width", c.width, [Interval(int, 1, None)], owner=owner)
    check_param("batch_size", c.batch_size, [Interval(int, 1, None)], owner=owner)
    check_param("lr", c.lr, [Interval(float, 0, None, closed="neither")], owner=owner)
    check_param("momentum", c.momentum, [Interval(float, 0, 1, closed="left")], owner=owner)
    check_param("beta2", c.beta2, [Interval(float, 0, 1, closed="left")], owner=owner)
    check_param("weight_decay", c.weight_decay, [Interval(float, 0, math.inf, closed="left")], owner=owner)
    if c.optimizer == "adamw" and c.lr * c.weight_decay >= 1:
        raise InvalidParameterError(
            f"The 'weight_decay' parameter of TrainConfig must give lr * weight_decay < 1 with optimizer='adamw' "
            f"(AdamW multiplies the weights by 1 - lr * weight_decay every step). Got weight_decay="
            f"{c.weight_decay:g} with lr={c.lr:g}."
        )
    check_param("epochs", c.epochs, [Interval(float, 0, None, closed="neither")], owner=owner)
    check_param("gamma", c.gamma, [Interval(float, 0, 1, closed="right")], owner=owner)
    check_param("warmup_epochs", c.warmup_epochs, [Interval(float, 0, None)], owner=owner)
    if c.warmup_epochs > c.epochs:
        raise InvalidParameterError(
            f"The 'warmup_epochs' parameter of TrainConfig must be at most 'epochs' ({c.epochs:g}): the run "
            f"would end before the warmup does. Got {c.warmup_epochs:g} instead."
        )
    check_param("warmup_start_factor", c.warmup_start_factor, [Interval(float, 0, 1)], owner=owner)
    check_param("clip_grad_norm", c.clip_grad_norm, [None, Interval(float, 0, None, closed="neither")], owner=owner)
    check_param("seed", c.seed, [Interval(int, 0, None)], owner=owner)
    check_param("eval_every_epochs", c.eval_every_epochs, [Interval(float, 0, None, closed="neither")], owner=owner)
    check_param("target_accuracy", c.target_accuracy, [None, Interval(float, 0, 1, closed="right")], owner=owner)
    check_param("target_smoothing", c.target_smoothing, [Interval(int, 1, None)], owner=owner)
    check_param("eval_growth", c.eval_growth, [None, Interval(float, 1, None, closed="neither")], owner=owner)
    check_param("nesterov", c.nesterov, [bool], owner=owner)
    if c.nesterov and c.optimizer == "sgd" and c.momentum == 0:
        raise InvalidParameterError(
            "The 'nesterov' parameter of TrainConfig needs a momentum > 0 (Nesterov momentum without "
            "momentum is plain SGD). Got nesterov=True with momentum=0."
        )
    check_param("data_root", c.data_root, [None, str], owner=owner)
    ms = c.milestones
    if isinstance(ms, (str, bytes)) or not isinstance(ms, (tuple, list)) or not all(
            isinstance(m, (int, float)) and not isinstance(m, bool) for m in ms):
        raise InvalidParameterError(
            f"The 'milestones' parameter of TrainConfig must be a sequence of numbers (fractions of "
            f"training). Got {ms!r} instead."
        )
    ms = tuple(ms)
    if any(not (0 < m < 1) for m in ms) or list(ms) != sorted(set(ms)):
        raise InvalidParameterError(
            f"The 'milestones' parameter of TrainConfig must be increasing fractions of training in "
            f"(0, 1). Got {ms!r} instead."
        )


def _check_data(data: Any, config: TrainConfig, owner: str, own_model: bool = False) -> None:
    """``data`` is ``(x_train, y_train, x_test, y_test)``: tensors, finite inputs, integer labels;
    images for the built-in BNCNN (a model of one's own takes whatever shape it takes)."""
    check_classification_data(data, owner)
    if not own_model and config.model == "bncnn" and data[0].ndim != 4:
        raise InvalidParameterError(
            f"The 'data' parameter of {owner} must hold images (n, channels, height, width) for model='bncnn'. "
            f"Got x_train of shape {tuple(data[0].shape)}; use model='mlp' for flat features."
        )


def load_image_data(config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)`` of the configured data set, normalized."""
    from leanscale.data.fashion_mnist import fashion_mnist_tensors

    train = fashion_mnist_tensors("train", root=config.data_root, n=config.n_train, seed=config.seed)
    test = fashion_mnist_tensors("test", root=config.data_root, n=config.n_test, seed=0)
    return train.x, train.y, test.x, test.y


def build_model(config: TrainConfig, in_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """The configured reference model, initialised from ``config.seed``."""
    from leanscale.models.cnn import BNCNN, MLPClassifier

    torch.manual_seed(config.seed)
    if config.model == "bncnn":
        return BNCNN(n_classes=n_classes, in_channels=in_shape[0], width=config.width)
    return MLPClassifier(math.prod(in_shape), 8 * config.width, n_classes)


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum, LARS, LAMB or AdamW on ``model`` with ``config``'s settings (AdamW:
    ``betas=(momentum, beta2)``, decoupled weight decay)."""
    from leanscale.large_batch.lars import lars_param_groups

    # Weight decay (and LARS/LAMB trust ratios) on weights of rank >= 2 only; biases and norm
    # weights excluded, the usual practice for large-batch training (Goyal et al. 2017; You et al.).
    groups = lars_param_groups(model, config.weight_decay, optimizer="lamb" if config.optimizer == "lamb" else "lars")
    if config.optimizer in ("sgd", "adamw"):
        for group in groups:
            group.pop("lars_adaptation", None)
        if config.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=config.lr, betas=(config.momentum, config.beta2))
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)
    if config.optimizer == "lars":
        from leanscale.large_batch.lars import LARS

        return LARS(groups, lr=config.lr, momentum=config.momentum)
    from leanscale.large_batch.lamb import LAMB

    return LAMB(groups, lr=config.lr, betas=(config.momentum, config.beta2))


def train_classifier(
    config: TrainConfig,
    *,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    model: nn.Module | None = None,
    progress_bar: bool = False,
    on_step: Callable[[int, nn.Module, torch.optim.Optimizer], None] | None = None,
    keep_model: bool = False,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    batch_schedule: Any = None,
) -> TrainResult:
    """Train ``config``'s model on ``config``'s data and return the :class:`TrainResult`.

    Args:
        config: The run.
        data: ``(x_train, y_train, x_test, y_test)`` to use instead of loading ``config.dataset``.
        model: A model to train instead of building ``config.model`` (Ghost BatchNorm is still
            applied when ``config.ghost_batch_size`` is set).
        progress_bar: Show a progress bar (rank 0 only).
        on_step: Called after every optimizer step with ``(step, model, optimizer)``; e.g. to
            update a :class:`~leanscale.large_batch.noise_scale.GradientNoiseScale`.
        keep_model: Return the trained model in ``result.model``.
        checkpoint: Save the run to this file every ``checkpoint_every`` steps; started again with
            the same file (after a crash or ``kill -9``) it resumes there and ends as an
            uninterrupted run would. Removed when the run finishes.
        batch_schedule: A :class:`~leanscale.large_batch.critical_batch.BatchSizeSchedule` (batch-size
            warmup): the batch steps up at the schedule's numbers of examples, the LR follows by its
            ``lr_rule`` from ``config.lr`` at ``config.batch_size``; step decay at the same fractions
            of the examples. Not with ``target_accuracy``, ``max_examples``, ``checkpoint`` or cosine decay.

    Under ``torchrun`` (an initialised process group) the model is wrapped in DDP and every rank
    trains on its slice of each global batch; ``batch_size`` must be divisible by the world size.
    """
    owner = "train_classifier"
    check_param("config", config, [TrainConfig], owner=owner)
    _check_config(config)
    if model is not None and not isinstance(model, nn.Module):
        hint = (" (a class or factory? pass an instance: model=Net(), not model=Net)"
                if callable(model) else "")
        raise InvalidParameterError(
            f"The 'model' parameter of {owner} must be None or an instance of torch.nn.Module{hint}. "
            f"Got {type(model).__name__} instead."
        )
    check_param("on_step", on_step, [None, callable], owner=owner)
    check_param("progress_bar", progress_bar, [bool], owner=owner)
    check_param("keep_model", keep_model, [bool], owner=owner)
    check_param("checkpoint", checkpoint, [None, str, os.PathLike], owner=owner)
    check_param("checkpoint_every", checkpoint_every, [Interval(int, 1, None)], owner=owner)
    if data is not None:
        _check_data(data, config, owner, own_model=model is not None)
    _, world = rank_and_world()
    if batch_schedule is not None:
        from leanscale.large_batch.critical_batch import _check_schedule

        _check_schedule(batch_schedule, config, world, checkpoint, owner)
    if config.batch_size % world:
        raise InvalidParameterError(
            f"The 'batch_size' parameter of TrainConfig must be divisible by the number of processes "
            f"({world}). Got {config.batch_size} instead."
        )
    local_batch = config.batch_size // world
    if config.ghost_batch_size is not None and config.ghost_batch_size > local_batch:
        raise InvalidParameterError(
            f"The 'ghost_batch_size' parameter of TrainConfig must be at most the per-process batch "
            f"({local_batch} = {config.batch_size} / {world} processes). Got {config.ghost_batch_size} instead."
        )
    micro = config.micro_batch_size
    if micro is not None:
        if local_batch % micro:
            raise InvalidParameterError(
                f"The 'micro_batch_size' parameter of TrainConfig must divide the per-process batch "
                f"({local_batch}). Got {micro} instead."
            )
        if micro < local_batch and (config.ghost_batch_size is None or micro % config.ghost_batch_size):
            raise InvalidParameterError(
                f"The 'micro_batch_size' parameter of TrainConfig must be a multiple of 'ghost_batch_size' "
                f"(BatchNorm statistics would otherwise change with it). Got micro_batch_size={micro} "
                f"and ghost_batch_size={config.ghost_batch_size}."
            )
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    x_train, y_train, x_test, y_test = data if data is not None else load_image_data(config)
    n = len(y_train)
    if config.batch_size > n:
        raise InvalidParameterError(
            f"The 'batch_size' parameter of TrainConfig must be at most the number of training "
            f"examples ({n}). Got {config.batch_size} instead."
        )
    n_classes = int(max(y_train.max(), y_test.max())) + 1
    if model is None:
        model = build_model(config, tuple(x_train.shape[1:]), n_classes)
    else:
        torch.manual_seed(config.seed)
    check_model_output(model, x_train[:2], n_classes, owner)
    model.train()
    # Ghost BatchNorm does the same arithmetic as BatchNorm: count before the surgery, on 2
    # examples (BatchNorm needs more than one).
    flops_per_example = count_flops(model, x_train[:2]).total / 2
    if config.ghost_batch_size is not None:
        from leanscale.large_batch.ghost_bn import apply_ghost_batchnorm

        apply_ghost_batchnorm(model, config.ghost_batch_size)
    optimizer = build_optimizer(model, config)
    accumulate = None
    if micro is not None and micro < local_batch:
        from leanscale.large_batch.ghost_bn import (
            accumulate_running_stats as accumulate,
        )
    fit_kwargs = dict(
        batch_size=config.batch_size, epochs=config.epochs, lr=config.lr, seed=config.seed, decay=config.decay,
        milestones=config.milestones, gamma=config.gamma,
        warmup_epochs=config.warmup_epochs, warmup_start=config.warmup_start_factor,
        clip_grad_norm=config.clip_grad_norm, micro_batch_size=micro, accumulate_context=accumulate,
        eval_every_epochs=config.eval_every_epochs, target_accuracy=config.target_accuracy,
        eval_growth=config.eval_growth, max_examples=config.max_examples, target_smoothing=config.target_smoothing,
        flops_per_example=flops_per_example, on_step=on_step, progress_bar=progress_bar, technique="large_batch",
        checkpoint=checkpoint, checkpoint_every=checkpoint_every, owner=owner,
    )
    data4 = (x_train, y_train, x_test, y_test)
    if batch_schedule is None:
        run = fit_classifier(model, data4, optimizer, **fit_kwargs)
    else:
        from leanscale.large_batch.critical_batch import _fit_with_schedule

        run = _fit_with_schedule(model, data4, optimizer, batch_schedule, config, fit_kwargs, world, owner)
    del optimizer
    release()
    return TrainResult(**{f.name: getattr(run, f.name) for f in fields(run)}, config=config,
                       model=model if keep_model else None)


def with_overrides(config: TrainConfig, **changes: Any) -> TrainConfig:
    """``dataclasses.replace`` that validates the result."""
    new = replace(config, **changes)
    _check_config(new)
    return new


# moved to the shared engine in #14; the old import keeps working for one release
__getattr__ = moved_attributes(__name__, {"evaluate": "leanscale.train.classifier:evaluate"})
