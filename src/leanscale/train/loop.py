"""The training loop every technique runs on: steps, accumulation, clipping, schedule, DDP, resume.

:func:`fit` runs ``n_steps`` optimizer steps over ``batches``; what differs between loops is
passed in, not copied:

- ``loss_fn(net, batch) -> loss`` or ``(loss, extra)``: the forward and the loss (cross-entropy,
  NT-Xent, a language model's loss...). ``net`` is the DDP wrapper under ``torchrun``.
- a batch given as :class:`MicroBatches` is accumulated: one backward per part, DDP's gradient
  all-reduce only on the last one (``loss_fn`` weights each part's loss);
- ``schedule(step) -> factor`` of the peak ``lr`` (see :mod:`leanscale.train.schedules`);
- hooks where techniques plug in: ``extra_loss(model)`` (e.g. the MoE load-balancing loss),
  ``after_backward(model)`` (e.g. the gradient-noise-scale estimator, before clipping),
  ``on_step(StepOutput) -> stop?`` (evaluation, forgetting events, early stopping);
- ``checkpoint``: every ``every`` steps the model, optimizer, RNG states and the caller's own
  state are saved atomically; a run started again with the same checkpoint resumes from it and
  ends with the same weights as an uninterrupted run (``kill -9`` included).

Nothing requires this engine: every technique also works inside a user's own loop.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(3, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
    >>> mse = lambda net, b: torch.nn.functional.mse_loss(net(x[b]), y[b])
    >>> result = fit(model, opt, [torch.arange(8)] * 5, mse, n_steps=5)
    >>> result.steps, result.stopped
    (5, None)
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leanscale.core.errors import DataFormatError
from leanscale.core.io import atomic_torch_save, read_torch_file
from leanscale.core.validation import Interval, check_param
from leanscale.train.distributed import all_reduce_floats, release, wrap_ddp

__all__ = ["Checkpoint", "FitResult", "MicroBatches", "StepOutput", "fit", "seeded", "train_step"]

_FORMAT = 1  # checkpoint layout version


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Run the block with torch seeded by ``seed`` and restore the caller's RNG afterwards
    (CPU, and ``device``'s generator when it is a CUDA device): a model built inside is
    reproducible and the caller's random stream is untouched."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class MicroBatches(list):
    """A global batch given as parts: :func:`train_step` accumulates their gradients (one
    backward each, DDP synchronising only the last). ``loss_fn`` must weight each part so that
    the sum is the batch's loss (e.g. ``mean_loss(part) * len(part) / len(batch)``)."""


@dataclass
class StepOutput:
    """What ``on_step`` gets after every optimizer step."""

    step: int  # steps done, 1-based (== n_steps after the last)
    loss: torch.Tensor  # this rank's training loss of the step, detached (sum over micro-batches)
    lr: float  # the peak lr times the schedule's factor used by the step
    extra: Any  # what loss_fn returned beside the loss (a list, one per micro-batch, for MicroBatches)
    batch: Any  # the batch of the step
    last: bool  # no step follows (n_steps reached or the time limit hit)


@dataclass
class FitResult:
    """What :func:`fit` returns."""

    steps: int  # optimizer steps done in total (resumed ones included)
    seconds: float  # wall time of this call's steps, the slowest rank under DDP
    stopped: str | None  # None: all n_steps done; "on_step" or "time_limit"
    resumed_from: int = 0  # the step the run resumed from (0: a fresh start)


@dataclass
class Checkpoint:
    """Where and how often :func:`fit` saves, and the caller's state to save with it.

    ``state()`` returns the caller's bookkeeping (tensors, numbers, strings, lists, dicts: a
    checkpoint is read with ``weights_only=True``) and ``load_state(state)`` puts it back on
    resume. The file is removed when the run finishes, unless ``keep=True``.
    """

    path: str | Path
    every: int = 100
    state: Callable[[], Any] | None = None
    load_state: Callable[[Any], None] | None = None
    keep: bool = False


def _split(out: Any) -> tuple[torch.Tensor, Any]:
    if isinstance(out, tuple):
        return out[0], out[1]
    return out, None


def train_step(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Any,
    loss_fn: Callable[[nn.Module, Any], Any],
    *,
    model: nn.Module | None = None,
    lr: float | None = None,
    clip_grad_norm: float | None = None,
    extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
    after_backward: Callable[[nn.Module], None] | None = None,
    accumulate_context: Callable[[nn.Module], Any] | None = None,
) -> tuple[torch.Tensor, Any]:
    """One optimizer step: set ``lr``, zero the gradients, forward/backward (accumulated over
    :class:`MicroBatches`), ``after_backward``, clip, step. Returns the detached loss and the
    ``extra`` of ``loss_fn`` (a list for micro-batches).

    ``model`` is the module under ``net`` (``net`` itself without DDP): hooks and clipping see
    it. ``extra_loss(model)`` is added after the (last) forward. ``accumulate_context(model)``
    wraps the micro-batch loop (e.g. Ghost BatchNorm's running-statistics accumulation).
    """
    model = net if model is None else model
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    if isinstance(batch, MicroBatches) and len(batch) > 1:
        total, extras = None, []
        ctx = accumulate_context(model) if accumulate_context is not None else contextlib.nullcontext()
        with ctx:
            for j, part in enumerate(batch):
                last = j == len(batch) - 1
                sync = contextlib.nullcontext() if last or not hasattr(net, "no_sync") else net.no_sync()
                with sync:
                    loss, extra = _split(loss_fn(net, part))
                    if last and extra_loss is not None:
                        loss = loss + extra_loss(model)
                    loss.backward()
                total = loss.detach() if total is None else total + loss.detach()
                extras.append(extra)
        loss_value, extra_out = total, extras
    else:
        part = batch[0] if isinstance(batch, MicroBatches) else batch
        loss, extra_out = _split(loss_fn(net, part))
        full = loss if extra_loss is None else loss + extra_loss(model)
        full.backward()
        loss_value = loss.detach()
    if after_backward is not None:
        after_backward(model)
    if clip_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
    optimizer.step()
    return loss_value, extra_out


def _fingerprint(model: nn.Module) -> list[list]:
    return [[name, list(p.shape)] for name, p in model.state_dict().items()]


def _save(ck: Checkpoint, model, optimizer, step: int, n_steps: int, generators: Sequence[torch.Generator]) -> None:
    from leanscale.core.distributed import rank_and_world

    if rank_and_world()[0] != 0:
        return
    atomic_torch_save({
        "format": _FORMAT, "step": step, "n_steps": n_steps, "fingerprint": _fingerprint(model),
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(), "generators": [g.get_state() for g in generators],
        "state": ck.state() if ck.state is not None else None,
    }, ck.path)


def _resume(ck: Checkpoint, model, optimizer, n_steps: int, generators: Sequence[torch.Generator]) -> int:
    path = Path(ck.path)
    if not path.exists():
        return 0
    saved = read_torch_file(path, what="training checkpoint")
    where = f"The training checkpoint {str(path)!r}"
    if not isinstance(saved, dict) or saved.get("format") != _FORMAT:
        raise DataFormatError(f"{where} is not a leanscale training checkpoint of format {_FORMAT}. Remove it "
                              "to start afresh.")
    if saved.get("n_steps") != n_steps or saved.get("fingerprint") != _fingerprint(model):
        raise DataFormatError(
            f"{where} belongs to another run (n_steps {saved.get('n_steps')!r} vs {n_steps}, or other "
            "parameter names/shapes). Remove it or point the checkpoint elsewhere."
        )
    if len(saved.get("generators", [])) != len(generators):
        raise DataFormatError(f"{where} holds {len(saved.get('generators', []))} generator states; this run has "
                              f"{len(generators)}.")
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["torch_rng"])
    for g, state in zip(generators, saved["generators"]):
        g.set_state(state)
    if ck.load_state is not None:
        ck.load_state(saved["state"])
    return int(saved["step"])


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], Any],
    *,
    n_steps: int,
    lr: float | None = None,
    schedule: Callable[[int], float] | None = None,
    clip_grad_norm: float | None = None,
    extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
    after_backward: Callable[[nn.Module], None] | None = None,
    on_step: Callable[[StepOutput], bool | None] | None = None,
    time_limit_s: float | None = None,
    checkpoint: Checkpoint | None = None,
    generators: Sequence[torch.Generator] = (),
    accumulate_context: Callable[[nn.Module], Any] | None = None,
    ddp: bool = True,
) -> FitResult:
    """Train ``model`` for ``n_steps`` optimizer steps, one batch of ``batches`` each.

    Args:
        model: the module to train (put it in train mode and on its device first). Under
            ``torchrun`` it is wrapped in DDP for the loop (``ddp=False``: the caller did).
        optimizer: over ``model``'s parameters.
        batches: one item per step (an index tensor, an ``(x, y)`` pair, :class:`MicroBatches`...),
            handed to ``loss_fn`` as is; at least ``n_steps`` of them. The same on every rank
            or already this rank's part: that is the caller's choice.
        loss_fn: ``loss_fn(net, batch)`` returns the loss, or ``(loss, extra)``.
        n_steps: steps to take (also the schedule's length).
        lr: the peak learning rate; None leaves the optimizer's lr alone.
        schedule: ``schedule(step)`` -> factor of ``lr`` for the step about to run (0-based).
        clip_grad_norm: clip the global gradient norm (after ``after_backward``).
        extra_loss, after_backward, accumulate_context: see :func:`train_step`.
        on_step: called after every step with a :class:`StepOutput`; a true return stops.
        time_limit_s: stop after the step that takes the run past this many seconds (every
            rank stops at the same step: the decision is all-reduced).
        checkpoint: save every ``checkpoint.every`` steps; resume from the file when it exists.
        generators: ``torch.Generator`` objects the loop draws from (batch order,
            augmentations): saved and restored with the checkpoint. The global CPU generator
            always is.

    Returns:
        :class:`FitResult`. Under DDP the wrapper is released before returning (the torchrun
        exit rule); ``model`` is the trained module.
    """
    check_param("n_steps", n_steps, [Interval(int, 0, None)], owner="fit")
    check_param("time_limit_s", time_limit_s, [None, Interval(float, 0, None)], owner="fit")
    check_param("clip_grad_norm", clip_grad_norm, [None, Interval(float, 0, None, closed="neither")], owner="fit")
    check_param("checkpoint", checkpoint, [None, Checkpoint], owner="fit")
    if checkpoint is not None:
        check_param("checkpoint.every", checkpoint.every, [Interval(int, 1, None)], owner="fit")
    start = 0
    if checkpoint is not None:
        start = _resume(checkpoint, model, optimizer, n_steps, generators)
    net = wrap_ddp(model) if ddp else model
    it = iter(batches)
    for _ in range(start):  # the batches already trained on (index batches: cheap)
        next(it)
    stopped, steps = None, start
    t0 = time.perf_counter()
    try:
        for step in range(start, n_steps):
            batch = next(it)
            step_lr = None if lr is None else lr * (schedule(step) if schedule is not None else 1.0)
            loss, extra = train_step(
                net, optimizer, batch, loss_fn, model=model, lr=step_lr, clip_grad_norm=clip_grad_norm,
                extra_loss=extra_loss, after_backward=after_backward, accumulate_context=accumulate_context,
            )
            steps = step + 1
            timed_out = False
            if time_limit_s is not None and steps < n_steps:
                over = float(time.perf_counter() - t0 > time_limit_s)
                timed_out = all_reduce_floats([over])[0] > 0  # every rank stops together
            out = StepOutput(step=steps, loss=loss, lr=step_lr if step_lr is not None else
                             float(optimizer.param_groups[0]["lr"]), extra=extra, batch=batch,
                             last=steps == n_steps or timed_out)
            if on_step is not None and on_step(out) and steps < n_steps:
                stopped = "on_step"
                break
            if timed_out:
                stopped = "time_limit"
                break
            if checkpoint is not None and steps % checkpoint.every == 0 and steps < n_steps:
                _save(checkpoint, model, optimizer, steps, n_steps, generators)
    finally:
        seconds = time.perf_counter() - t0
        del net
        release()
    if checkpoint is not None and not checkpoint.keep:
        Path(checkpoint.path).unlink(missing_ok=True)
    seconds = all_reduce_floats([seconds], op="max")[0]
    return FitResult(steps=steps, seconds=seconds, stopped=stopped, resumed_from=start)
