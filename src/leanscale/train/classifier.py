"""A classifier trained on in-memory tensors: seeded batches, schedule, evaluation, steps-to-target.

:func:`fit_classifier` is the loop of the large-batch recipe (:func:`leanscale.large_batch.train_classifier`
adds Ghost BatchNorm, LARS/LAMB and its config on top), of the SWAT comparison and of the tour. It
trains on ``(x_train, y_train)`` with batches drawn without replacement from a seeded permutation
per epoch (the last partial batch dropped, see :func:`~leanscale.train.batches.permutation_batches`),
follows :func:`~leanscale.train.schedules.lr_factor` (warmup, then step/cosine/none), evaluates on
``(x_test, y_test)`` every ``eval_every_epochs`` (or at geometrically growing steps when looking
for a target accuracy), and records the run in a :class:`~leanscale.core.ledger.CostLedger`.

Under ``torchrun`` every rank trains on its contiguous slice of each *global* batch, so one
process and N processes see the same batches (``batch_size`` must be divisible by the world size).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from leanscale.core.distributed import rank_and_world
from leanscale.core.errors import InvalidParameterError
from leanscale.core.flops import count_flops
from leanscale.core.ledger import CostLedger
from leanscale.core.progress import progress
from leanscale.train.batches import permutation_batches
from leanscale.train.distributed import all_reduce_floats
from leanscale.train.loop import Checkpoint, MicroBatches, StepOutput, fit
from leanscale.train.schedules import lr_factor
from leanscale.train.user_data import as_logits, describe, user_code

__all__ = ["ClassifierRun", "check_classification_data", "check_model_output", "evaluate", "fit_classifier"]


@dataclass
class ClassifierRun:
    """What :func:`fit_classifier` returns. ``history`` has one dict per evaluation."""

    history: list[dict[str, Any]]
    test_accuracy: float
    test_loss: float
    train_loss: float
    steps: int
    examples: int
    seconds: float  # training time, evaluations excluded
    steps_to_target: float | None = None  # interpolated (log steps) at target_accuracy
    reached_target: bool | None = None
    flops_per_example: float | None = None  # forward + backward, from the cost ledger's rules
    world_size: int = 1
    ledger: CostLedger = field(default_factory=CostLedger)
    warnings: list[str] = field(default_factory=list)  # why the result is not to be trusted as is


def check_classification_data(data: Any, owner: str) -> None:
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
        if not (x.is_floating_point() or (x.dtype in (torch.int64, torch.int32) and x.ndim == 2)):
            raise InvalidParameterError(
                f"The 'data' parameter of {owner} must hold floating-point inputs x_{split} (or int64/int32 "
                f"token ids of shape (n, sequence length)). Got dtype {x.dtype} and shape {tuple(x.shape)}."
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


def check_model_output(model: nn.Module, x: torch.Tensor, n_classes: int, owner: str) -> None:
    """One forward pass in eval mode (nothing changes): an error naming 'model' unless it maps ``x``
    to ``(n, >= n_classes)`` logits."""
    was_training = model.training
    model.eval()
    try:
        with user_code("model", owner, f"the training inputs (x: {describe(x)})",
                       "Check that the data match the model's input."), torch.no_grad():
            logits = as_logits(model(x))
    finally:
        model.train(was_training)
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != x.shape[0] \
            or logits.shape[1] < n_classes:
        raise InvalidParameterError(
            f"The 'model' parameter of {owner} must map a batch of n examples to (n, n_classes) logits with "
            f"n_classes >= {n_classes} (the largest label + 1). Got "
            + (f"an output of shape {tuple(logits.shape)}." if isinstance(logits, torch.Tensor)
               else f"{type(logits).__name__}.")
        )


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` of ``model`` in eval mode on ``(x, y)``; mode restored."""
    was_training = model.training
    model.eval()
    correct, loss = 0, 0.0
    try:
        for i in range(0, len(y), batch_size):
            logits = as_logits(model(x[i:i + batch_size]))
            loss += F.cross_entropy(logits, y[i:i + batch_size], reduction="sum").item()
            correct += (logits.argmax(1) == y[i:i + batch_size]).sum().item()
    finally:
        model.train(was_training)
    return correct / len(y), loss / len(y)


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


def _eval_steps(total_steps: int, steps_per_epoch: int, eval_every_epochs: float,
                target_accuracy: float | None, eval_growth: float | None) -> set[int]:
    if target_accuracy is not None and eval_growth is not None:
        steps, s = set(), 1.0
        while s < total_steps:
            steps.add(math.ceil(s))
            s *= eval_growth
        return steps | {total_steps}
    every = max(1, round(eval_every_epochs * steps_per_epoch))
    return set(range(every, total_steps + 1, every)) | {total_steps}


def fit_classifier(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    batch_size: int,
    epochs: float,
    lr: float,
    seed: int = 0,
    decay: str = "step",
    milestones: tuple[float, ...] = (0.5, 0.75),
    gamma: float = 0.1,
    warmup_epochs: float = 0.0,
    warmup_start: float = 0.0,
    clip_grad_norm: float | None = None,
    micro_batch_size: int | None = None,
    accumulate_context: Callable[[nn.Module], Any] | None = None,
    eval_every_epochs: float = 0.25,
    target_accuracy: float | None = None,
    eval_growth: float | None = None,
    max_examples: int | None = None,
    target_smoothing: int = 1,
    flops_per_example: float | None = None,
    on_step: Callable[[int, nn.Module, torch.optim.Optimizer], None] | None = None,
    progress_bar: bool = False,
    technique: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    owner: str = "fit_classifier",
) -> ClassifierRun:
    """Train ``model`` (in train mode, seeded and prepared by the caller) with ``optimizer``.

    Args:
        model: maps a batch of ``x`` to ``(b, n_classes)`` logits.
        data: ``(x_train, y_train, x_test, y_test)`` tensors (see :func:`check_classification_data`).
        optimizer: over ``model``'s parameters; its lr is set every step to ``lr * factor``.
        batch_size: global batch (divisible by the number of processes, at most ``len(y_train)``).
        epochs: passes over the training set; ``max(1, floor(epochs * n / batch_size))`` steps.
        lr: peak learning rate.
        seed: batch order.
        decay, milestones, gamma, warmup_epochs, warmup_start: the schedule
            (:func:`~leanscale.train.schedules.lr_factor`); ``milestones`` are FRACTIONS of training.
        clip_grad_norm: clip the global gradient norm.
        micro_batch_size: accumulate gradients over micro-batches of this size (per process):
            the same step with less memory. ``accumulate_context(model)`` wraps the micro-batches
            (Ghost BatchNorm's running-statistics accumulation).
        eval_every_epochs: evaluate this often (fraction of an epoch), and after the last step.
        target_accuracy: stop at the first evaluation whose mean over the last
            ``target_smoothing`` evaluations reaches it; ``steps_to_target`` interpolates the
            steps in log space. ``eval_growth``: evaluate at steps growing by this factor instead;
            ``max_examples``: give up after this many examples.
        flops_per_example: forward + backward FLOPs of one example; None counts them on the model.
        on_step: called after every optimizer step with ``(step, model, optimizer)``.
        progress_bar: show a progress bar (rank 0 only).
        technique: the cost ledger's technique column.
        checkpoint: a file to save the run to every ``checkpoint_every`` steps (model, optimizer,
            history, RNG): started again with the same file after a crash or ``kill -9``, the run
            resumes there and ends with the weights and history of an uninterrupted run. The file
            is removed when the run finishes. None: no checkpoint.
        owner: the function named in warnings (the public caller).
    """
    x_train, y_train, x_test, y_test = data
    rank, world = rank_and_world()
    n = len(y_train)
    local_batch = batch_size // world
    if flops_per_example is None:
        flops_per_example = count_flops(model, x_train[:2]).total / 2
    steps_per_epoch = n // batch_size
    total_steps = max(1, int(epochs * n // batch_size))
    warmup_steps = round(warmup_epochs * steps_per_epoch)
    step_milestones = [round(m * total_steps) for m in milestones]
    eval_steps = _eval_steps(total_steps, steps_per_epoch, eval_every_epochs, target_accuracy, eval_growth)

    def schedule(step: int) -> float:
        return lr_factor(step, total_steps, warmup_steps=warmup_steps, warmup_start=warmup_start, decay=decay,
                         milestones=step_milestones, gamma=gamma)

    def batches():
        for idx in permutation_batches(n, batch_size, torch.Generator().manual_seed(seed)):
            local = idx[rank * local_batch:(rank + 1) * local_batch]  # (local_batch,)
            yield local if micro_batch_size is None or micro_batch_size == local_batch \
                else MicroBatches(local.split(micro_batch_size))

    def loss_fn(net: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        # micro-batches: mean loss of the whole batch = sum over parts of (part mean) * part / local
        weight = 1.0 if len(idx) == local_batch else len(idx) / local_batch
        loss = F.cross_entropy(as_logits(net(x_train[idx])), y_train[idx])
        return loss if weight == 1.0 else loss * weight

    history: list[dict[str, Any]] = []
    state = {"loss_sum": 0.0, "loss_n": 0, "examples": 0, "t_train": 0.0, "t0": time.perf_counter(),
             "reached": None}
    bar = progress(total=total_steps, desc=f"train B={batch_size}", disable=None if progress_bar and rank == 0 else True)

    def after_step(out: StepOutput) -> bool:
        state["examples"] += batch_size
        state["loss_sum"] += out.loss.item()
        state["loss_n"] += 1
        bar.update(1)
        if on_step is not None:
            on_step(out.step, model, optimizer)
        if out.step not in eval_steps:
            return False
        state["t_train"] += time.perf_counter() - state["t0"]
        acc, test_loss = evaluate(model, x_test, y_test)
        if world > 1:  # the train loss of the global batches: mean of the ranks' local means
            state["loss_sum"] = all_reduce_floats([state["loss_sum"]])[0] / world
        history.append({
            "step": out.step, "epoch": state["examples"] / n, "examples": state["examples"], "lr": out.lr,
            "train_loss": state["loss_sum"] / state["loss_n"], "test_loss": test_loss, "test_accuracy": acc,
            "seconds": state["t_train"],
        })
        state["loss_sum"], state["loss_n"] = 0.0, 0
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(acc=f"{acc:.3f}")
        k = target_smoothing
        smoothed = sum(h["test_accuracy"] for h in history[-k:]) / len(history[-k:])
        history[-1]["smoothed_accuracy"] = smoothed
        state["t0"] = time.perf_counter()
        if target_accuracy is not None and smoothed >= target_accuracy:
            state["reached"] = True
            return True
        return max_examples is not None and state["examples"] >= max_examples

    def save_state() -> dict:
        return {"history": history, "state": {k: v for k, v in state.items() if k != "t0"}}

    def load_state(saved: dict) -> None:
        history[:] = saved["history"]
        state.update(saved["state"])

    ck = None if checkpoint is None else Checkpoint(checkpoint, every=checkpoint_every, state=save_state,
                                                    load_state=load_state)
    try:
        result = fit(model, optimizer, batches(), loss_fn, n_steps=total_steps, lr=lr, schedule=schedule,
                     clip_grad_norm=clip_grad_norm, on_step=after_step, accumulate_context=accumulate_context,
                     checkpoint=ck)
    finally:
        if hasattr(bar, "close"):
            bar.close()
    if result.stopped is None:
        state["t_train"] += time.perf_counter() - state["t0"]
    reached = state["reached"]
    if target_accuracy is not None and reached is None:
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
        warnings.warn(f"{owner}: {c}", RuntimeWarning, stacklevel=3)
    ledger = CostLedger()
    examples = state["examples"]
    ledger.record(
        "train", flops=flops_per_example * examples, seconds=state["t_train"], n_examples=examples,
        technique=technique, batch_size=batch_size, steps=result.steps, world_size=world,
    )
    return ClassifierRun(
        history=history, test_accuracy=last["test_accuracy"], test_loss=last["test_loss"],
        train_loss=last["train_loss"], steps=result.steps, examples=examples, seconds=state["t_train"],
        steps_to_target=(_interpolate_target(history, target_accuracy, "smoothed_accuracy")
                         if target_accuracy is not None else None),
        reached_target=reached, flops_per_example=flops_per_example, world_size=world, ledger=ledger,
        warnings=cautions,
    )


