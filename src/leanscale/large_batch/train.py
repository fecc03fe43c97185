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

import gc
import math
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from leanscale.core.errors import InvalidParameterError
from leanscale.core.ledger import CostLedger, count_flops
from leanscale.core.progress import progress
from leanscale.core.validation import Interval, Options, check_param

__all__ = ["TrainConfig", "TrainResult", "build_model", "evaluate", "load_image_data", "train_classifier"]

_DATASETS = ("fashion-mnist",)
_MODELS = ("bncnn", "mlp")
_OPTIMIZERS = ("sgd", "lars", "lamb")
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
    optimizer: str = "sgd"  # "sgd" (momentum), "lars" (needs ~10-100x SGD's lr: trust coefficient 1e-3) or "lamb"
    momentum: float = 0.9  # SGD/LARS momentum (LAMB: beta1)
    nesterov: bool = False  # Nesterov momentum for SGD
    weight_decay: float = 5e-4  # L2 on conv/linear weights; none on BatchNorm and biases
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
class TrainResult:
    """What :func:`train_classifier` returns. ``history`` has one dict per evaluation."""

    config: TrainConfig
    history: list[dict[str, Any]]
    test_accuracy: float
    test_loss: float
    train_loss: float
    steps: int
    examples: int
    seconds: float
    steps_to_target: float | None = None  # interpolated (log steps) at target_accuracy
    reached_target: bool | None = None
    flops_per_example: float | None = None  # forward + backward, from the cost ledger's rules
    world_size: int = 1
    ledger: CostLedger = field(default_factory=CostLedger)
    model: nn.Module | None = None
    warnings: list[str] = field(default_factory=list)  # why the result is not to be trusted as is

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
    check_param("weight_decay", c.weight_decay, [Interval(float, 0, None)], owner=owner)
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


def _check_data(data: Any, config: TrainConfig, owner: str) -> None:
    """``data`` is ``(x_train, y_train, x_test, y_test)``: tensors, finite inputs, integer labels."""
    if not isinstance(data, (tuple, list)) or len(data) != 4 or not all(isinstance(t, torch.Tensor) for t in data):
        got = (f"a {type(data).__name__} of {len(data)} item(s)" if isinstance(data, (tuple, list))
               else type(data).__name__)
        if isinstance(data, (tuple, list)) and len(data) == 4:
            got = "items of types " + ", ".join(type(t).__name__ for t in data)
        raise InvalidParameterError(
            f"The 'data' parameter of {owner} must be a tuple (x_train, y_train, x_test, y_test) of torch "
            f"tensors. Got {got} instead."
        )
    for split, x, y in (("train", data[0], data[1]), ("test", data[2], data[3])):
        if not x.is_floating_point():
            raise InvalidParameterError(
                f"The 'data' parameter of {owner} must hold floating-point inputs x_{split}. Got dtype {x.dtype}."
            )
        if y.ndim != 1 or y.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise InvalidParameterError(
                f"The 'data' parameter of {owner} must hold y_{split} as a 1-d tensor of integer class "
                f"indices. Got shape {tuple(y.shape)} and dtype {y.dtype}."
            )
        if x.ndim < 2 or x.shape[0] != y.shape[0]:
            raise InvalidParameterError(
                f"The 'data' parameter of {owner} must hold one label per example of x_{split}. Got x_{split} "
                f"of shape {tuple(x.shape)} and y_{split} of shape {tuple(y.shape)}."
            )
        if x.shape[0] == 0:
            raise InvalidParameterError(f"The 'data' parameter of {owner} must hold at least one {split} example. Got 0.")
        bad = ~torch.isfinite(x).reshape(x.shape[0], -1).all(1)
        if bool(bad.any()):
            raise InvalidParameterError(
                f"The 'data' parameter of {owner} must hold only finite inputs. Got NaN or inf in x_{split} "
                f"(example {int(bad.nonzero()[0, 0])} and {int(bad.sum()) - 1} more): remove or impute them "
                f"before training."
            )
        if int(y.min()) < 0:
            raise InvalidParameterError(
                f"The 'data' parameter of {owner} must hold class indices >= 0 in y_{split}. Got {int(y.min())}."
            )
    if data[0].shape[1:] != data[2].shape[1:]:
        raise InvalidParameterError(
            f"The 'data' parameter of {owner} must have train and test examples of the same shape. Got "
            f"{tuple(data[0].shape[1:])} and {tuple(data[2].shape[1:])}."
        )
    if config.model == "bncnn" and data[0].ndim != 4:
        raise InvalidParameterError(
            f"The 'data' parameter of {owner} must hold images (n, channels, height, width) for model='bncnn'. "
            f"Got x_train of shape {tuple(data[0].shape)}; use model='mlp' for flat features."
        )


def _check_model_output(model: nn.Module, x: torch.Tensor, num_classes: int, owner: str) -> None:
    """One forward pass in eval mode (nothing changes): an error naming 'model' unless it maps ``x``
    to ``(n, >= num_classes)`` logits."""
    from leanscale.large_batch._data import describe, user_code

    was_training = model.training
    model.eval()
    try:
        with user_code("model", owner, f"the training inputs (x: {describe(x)})",
                       "Check that the data match the model's input."), torch.no_grad():
            logits = model(x)
    finally:
        model.train(was_training)
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != x.shape[0] \
            or logits.shape[1] < num_classes:
        raise InvalidParameterError(
            f"The 'model' parameter of {owner} must map a batch of n examples to (n, n_classes) logits with "
            f"n_classes >= {num_classes} (the largest label + 1). Got "
            + (f"an output of shape {tuple(logits.shape)}." if isinstance(logits, torch.Tensor)
               else f"{type(logits).__name__}.")
        )


def load_image_data(config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)`` of the configured data set, normalized."""
    from leanscale.data.fashion_mnist import fashion_mnist_tensors

    train = fashion_mnist_tensors("train", root=config.data_root, n=config.n_train, seed=config.seed)
    test = fashion_mnist_tensors("test", root=config.data_root, n=config.n_test, seed=0)
    return train.x, train.y, test.x, test.y


def build_model(config: TrainConfig, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The configured reference model, initialised from ``config.seed``."""
    from leanscale.models.cnn import BNCNN, MLPClassifier

    torch.manual_seed(config.seed)
    if config.model == "bncnn":
        return BNCNN(num_classes=num_classes, in_channels=in_shape[0], width=config.width)
    return MLPClassifier(math.prod(in_shape), 8 * config.width, num_classes)


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum, LARS or LAMB on ``model`` with ``config``'s settings."""
    from leanscale.large_batch.lars import lars_param_groups

    # Weight decay (and LARS/LAMB trust ratios) on weights of rank >= 2 only; biases and norm
    # weights excluded, the usual practice for large-batch training (Goyal et al. 2017; You et al.).
    groups = lars_param_groups(model, config.weight_decay, optimizer="lamb" if config.optimizer == "lamb" else "lars")
    if config.optimizer == "sgd":
        for group in groups:
            group.pop("lars_adaptation", None)
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)
    if config.optimizer == "lars":
        from leanscale.large_batch.lars import LARS

        return LARS(groups, lr=config.lr, momentum=config.momentum)
    from leanscale.large_batch.lamb import LAMB

    return LAMB(groups, lr=config.lr, betas=(config.momentum, 0.999))


def lr_factor(step: int, total_steps: int, warmup_steps: int, config: TrainConfig) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based): linear warmup, then decay."""
    from leanscale.large_batch.schedules import warmup_factor

    if warmup_steps > 0 and step < warmup_steps:
        return warmup_factor(step, warmup_steps, config.warmup_start_factor)
    if config.decay == "step":
        return config.gamma ** sum(step >= round(m * total_steps) for m in config.milestones)
    if config.decay == "cosine":
        span = max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / span)))
    return 1.0


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` of ``model`` in eval mode on ``(x, y)``; mode restored."""
    was_training = model.training
    model.eval()
    correct, loss = 0, 0.0
    try:
        for i in range(0, len(y), batch_size):
            logits = model(x[i:i + batch_size])
            loss += F.cross_entropy(logits, y[i:i + batch_size], reduction="sum").item()
            correct += (logits.argmax(1) == y[i:i + batch_size]).sum().item()
    finally:
        model.train(was_training)
    return correct / len(y), loss / len(y)


def _dist() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _interpolate_target(history: list[dict[str, Any]], target: float, key: str = "test_accuracy") -> float | None:
    """Steps at which ``key`` (test accuracy) first reaches ``target``, linear in log(steps)
    between the last evaluation below and the first at or above it."""
    prev = None
    for row in history:
        if row[key] >= target:
            if prev is None or prev["step"] <= 0:
                return float(row["step"])
            a0, a1 = prev[key], row[key]
            t = (target - a0) / (a1 - a0) if a1 > a0 else 1.0
            return float(math.exp(math.log(prev["step"]) + t * (math.log(row["step"]) - math.log(prev["step"]))))
        prev = row
    return None


def train_classifier(
    config: TrainConfig,
    *,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    model: nn.Module | None = None,
    progress_bar: bool = False,
    on_step: Callable[[int, nn.Module, torch.optim.Optimizer], None] | None = None,
    keep_model: bool = False,
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
    if data is not None:
        _check_data(data, config, owner)
    rank, world = _dist()
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
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    if model is None:
        model = build_model(config, tuple(x_train.shape[1:]), num_classes)
    else:
        torch.manual_seed(config.seed)
    _check_model_output(model, x_train[:2], num_classes, owner)
    model.train()
    # Ghost BatchNorm does the same arithmetic as BatchNorm: count before the surgery, on 2
    # examples (BatchNorm needs more than one).
    flops_per_example = count_flops(model, x_train[:2]).total / 2
    if config.ghost_batch_size is not None:
        from leanscale.large_batch.ghost_bn import apply_ghost_batchnorm

        apply_ghost_batchnorm(model, config.ghost_batch_size)
    optimizer = build_optimizer(model, config)
    net: nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model)

    steps_per_epoch = n // config.batch_size
    total_steps = max(1, int(config.epochs * n // config.batch_size))
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    if config.target_accuracy is not None and config.eval_growth is not None:
        eval_steps, s = set(), 1.0
        while s < total_steps:
            eval_steps.add(math.ceil(s))
            s *= config.eval_growth
        eval_steps.add(total_steps)
    else:
        every = max(1, round(config.eval_every_epochs * steps_per_epoch))
        eval_steps = set(range(every, total_steps + 1, every)) | {total_steps}

    gen = torch.Generator().manual_seed(config.seed)
    ledger = CostLedger()
    history: list[dict[str, Any]] = []
    train_loss_sum, train_loss_n, examples = 0.0, 0, 0
    t_train, reached, steps_done = 0.0, None, 0
    perm, pos = torch.randperm(n, generator=gen), 0
    bar = progress(range(total_steps), desc=f"train B={config.batch_size}", disable=None if progress_bar and rank == 0 else True)
    t0 = time.perf_counter()
    for step in bar:
        if pos + config.batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + config.batch_size][rank * local_batch:(rank + 1) * local_batch]  # (local_batch,)
        pos += config.batch_size
        factor = lr_factor(step, total_steps, warmup_steps, config)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * factor
        optimizer.zero_grad(set_to_none=True)
        if micro is None or micro == local_batch:
            loss = F.cross_entropy(net(x_train[idx]), y_train[idx])
            loss.backward()
        else:
            # mean loss of the whole batch = sum over micro-batches of (micro mean) * micro / local;
            # DDP all-reduces only on the last backward.
            from leanscale.large_batch.ghost_bn import accumulate_running_stats

            parts = idx.split(micro)
            loss = 0.0
            with accumulate_running_stats(model):
                for j, part in enumerate(parts):
                    sync = nullcontext() if j == len(parts) - 1 or world == 1 else net.no_sync()
                    with sync:
                        part_loss = F.cross_entropy(net(x_train[part]), y_train[part]) * (len(part) / local_batch)
                        part_loss.backward()
                    loss = loss + part_loss.detach()
        if config.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm)
        optimizer.step()
        steps_done = step + 1
        examples += config.batch_size
        train_loss_sum += loss.item()
        train_loss_n += 1
        if on_step is not None:
            on_step(steps_done, model, optimizer)
        if steps_done in eval_steps:
            t_train += time.perf_counter() - t0
            acc, test_loss = evaluate(model, x_test, y_test)
            if world > 1:  # the train loss of the global batches: mean of the ranks' local means
                import torch.distributed as dist

                t = torch.tensor([train_loss_sum], dtype=torch.float64)
                dist.all_reduce(t)
                train_loss_sum = t.item() / world
            history.append({
                "step": steps_done, "epoch": examples / n, "examples": examples, "lr": config.lr * factor,
                "train_loss": train_loss_sum / train_loss_n, "test_loss": test_loss, "test_accuracy": acc,
                "seconds": t_train,
            })
            train_loss_sum, train_loss_n = 0.0, 0
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(acc=f"{acc:.3f}")
            k = config.target_smoothing
            smoothed = sum(h["test_accuracy"] for h in history[-k:]) / len(history[-k:])
            history[-1]["smoothed_accuracy"] = smoothed
            t0 = time.perf_counter()
            if config.target_accuracy is not None and smoothed >= config.target_accuracy:
                reached = True
                break
            if config.max_examples is not None and examples >= config.max_examples:
                break
    else:
        t_train += time.perf_counter() - t0
    if hasattr(bar, "close"):
        bar.close()
    if config.target_accuracy is not None and reached is None:
        reached = False
    last = history[-1]
    cautions = []
    diverged = [h for h in history if not (math.isfinite(h["train_loss"]) and math.isfinite(h["test_loss"]))]
    if diverged:
        cautions.append(
            f"training diverged: the loss was not finite from step {diverged[0]['step']} on (train loss "
            f"{diverged[0]['train_loss']!r}, test loss {diverged[0]['test_loss']!r}); the accuracy is not a "
            f"result of training. Lower the LR (or use warmup, clipping or LARS/LAMB)."
        )
    for c in cautions:
        warnings.warn(f"{owner}: {c}", RuntimeWarning, stacklevel=2)
    ledger.record(
        "train", flops=flops_per_example * examples, seconds=t_train, n_examples=examples,
        technique="large_batch", batch_size=config.batch_size, steps=steps_done, world_size=world,
    )
    result = TrainResult(
        config=config, history=history, test_accuracy=last["test_accuracy"], test_loss=last["test_loss"],
        train_loss=last["train_loss"], steps=steps_done, examples=examples, seconds=t_train,
        steps_to_target=(_interpolate_target(history, config.target_accuracy, "smoothed_accuracy")
                         if config.target_accuracy is not None else None),
        reached_target=reached, flops_per_example=flops_per_example, world_size=world, ledger=ledger,
        model=model if keep_model else None, warnings=cautions,
    )
    if world > 1:
        del net, optimizer
        gc.collect()
    return result


def with_overrides(config: TrainConfig, **changes: Any) -> TrainConfig:
    """``dataclasses.replace`` that validates the result."""
    new = replace(config, **changes)
    _check_config(new)
    return new
