"""A language model trained for one pass over a token stream: AdamW, warmup + cosine, a loss curve.

:func:`train_lm` is the loop of the IsoFLOP sweep (:mod:`leanscale.scaling`) and of the MoE
comparison (:mod:`leanscale.sparse`): the optimisation of Chinchilla's runs scaled down (AdamW
with beta2 = 0.95, weight decay on matrices and embeddings, clipping at 1, a linear warmup and a
cosine to 10% of the peak over exactly the run), evaluated on the same validation batches at
``n_curve_points`` points along the way.

Under ``torchrun`` the model is wrapped in DDP; each of the ``world`` ranks trains on
``batch_size // world`` sequences per step, from its own disjoint windows, and every metric is
all-reduced, so every rank returns the same result.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from leanscale.core.distributed import rank_and_world
from leanscale.core.errors import InvalidParameterError
from leanscale.core.progress import progress
from leanscale.data.text import TokenStream
from leanscale.train.distributed import all_reduce_floats
from leanscale.train.loop import StepOutput, fit
from leanscale.train.optim import param_groups
from leanscale.train.schedules import lr_factor

__all__ = ["ADAM_BETAS", "ADAM_EPS", "LMRun", "curve_steps", "train_lm", "validation_loss"]

# AdamW moments as in GPT-3 / Chinchilla training (beta2 = 0.95 is steadier than 0.999 for LMs).
ADAM_BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8


@dataclass
class LMRun:
    """What :func:`train_lm` returns (identical on every rank)."""

    steps: int  # optimizer steps done
    n_tokens: int  # tokens trained on: steps * batch_size * seq_len
    seconds: float  # training wall time (evaluations included), the slowest rank
    truncated: bool  # stopped by max_minutes before n_steps
    world_size: int
    curve: list[dict] = field(default_factory=list)  # {"n_tokens", "loss", "train_loss"} per point

    @property
    def loss(self) -> float:
        """Final validation loss (nats per token)."""
        return self.curve[-1]["loss"]

    @property
    def train_loss(self) -> float:
        """Mean training loss over the last curve interval."""
        return self.curve[-1]["train_loss"]


def curve_steps(n_steps: int, n_points: int) -> list[int]:
    """Steps (1-based counts of finished steps) after which the curve is evaluated; ends at n_steps.

    Example:
        >>> curve_steps(10, 4)
        [2, 5, 8, 10]
    """
    return sorted({max(1, round(k * n_steps / n_points)) for k in range(1, n_points + 1)})


@torch.no_grad()
def validation_loss(model: nn.Module, stream: TokenStream, batch_size: int, seq_len: int, n_batches: int) -> float:
    """Mean next-token loss (nats) over the first ``n_batches`` validation batches.

    The same batches for every run and every point of the curve (common random numbers: the
    differences between runs are less noisy than each loss). Under DDP rank ``r`` evaluates
    batches ``r, r + world, ...`` and the sums are all-reduced. ``model(x, y)`` returns
    ``(logits, mean loss)``.
    """
    rank, world = rank_and_world()
    model.eval()
    total, count = 0.0, 0.0
    for i, (x, y) in enumerate(stream.val_batches(batch_size, seq_len, n_batches)):
        if i % world != rank:
            continue
        _, loss = model(x, y)
        total += float(loss) * x.numel()
        count += x.numel()
    model.train()
    total, count = all_reduce_floats([total, count])
    return total / count


def train_lm(
    model: nn.Module,
    stream: TokenStream,
    *,
    n_steps: int,
    batch_size: int,
    seq_len: int,
    lr: float,
    seed: int = 0,
    warmup_fraction: float = 0.05,
    min_lr_ratio: float = 0.1,
    weight_decay: float = 0.1,
    grad_clip: float = 1.0,
    n_curve_points: int = 4,
    val_batches: int = 8,
    max_minutes: float | None = None,
    extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
    label: str = "run",
    owner: str = "train_lm",
    progress_bar: bool = False,
) -> LMRun:
    """Train ``model`` for ``n_steps`` steps of ``batch_size`` windows of ``seq_len`` tokens.

    Args:
        model: ``model(x, y)`` returns ``(logits, mean cross-entropy)`` (our
            :class:`~leanscale.models.transformer.GPT`); built and seeded by the caller.
        stream: the corpus with its validation tail.
        n_steps: optimizer steps; the schedule spans exactly them.
        batch_size: sequences per step over all ranks (divisible by the number of ranks).
        seq_len: tokens per window.
        lr: peak AdamW learning rate.
        seed: order of the training windows.
        warmup_fraction: linear warmup over ``max(1, round(warmup_fraction * n_steps))`` steps.
        min_lr_ratio: the cosine's end, a fraction of ``lr``, reached at the last step.
        weight_decay: decoupled weight decay on parameters of rank >= 2.
        grad_clip: maximal global gradient norm.
        n_curve_points: validation evaluations along the run (the last is the final loss).
        val_batches: validation batches per evaluation.
        max_minutes: stop after this many minutes (every rank at the same step), evaluate, and
            return with ``truncated=True``. None: no limit.
        extra_loss: added to the training loss after each forward (e.g. MoE's balancing loss);
            the reported losses stay the language model's cross-entropy.
        label: names the run in the message printed when ``max_minutes`` stops it.
        owner: the function named in error messages (a caller's public name).
        progress_bar: show a progress bar over the steps, named ``label`` (rank 0 only).
    """
    rank, world = rank_and_world()
    if batch_size % world != 0:
        raise InvalidParameterError(
            f"The 'batch_size' parameter of {owner} must be divisible by the number of ranks "
            f"({world}) so the global batch splits evenly. Got {batch_size}."
        )
    batches = stream.train_batches(batch_size // world, seq_len, n_steps * batch_size * seq_len, seed=seed,
                                   rank=rank, world_size=world)
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS)
    warmup = max(1, round(warmup_fraction * n_steps))
    eval_after = set(curve_steps(n_steps, n_curve_points))
    tokens_per_step = batch_size * seq_len  # global
    curve: list[dict] = []
    window = {"loss": 0.0, "steps": 0}

    def loss_fn(net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch  # (B_local, T) each
        return net(x, y)[1]

    bar = progress(total=n_steps, desc=label, unit="step", disable=None if progress_bar and rank == 0 else True)

    def on_step(out: StepOutput) -> None:
        bar.update(1)
        window["loss"] += out.loss.item()
        window["steps"] += 1
        if out.step in eval_after or out.last:
            mean_loss, = all_reduce_floats([window["loss"] / window["steps"]])
            curve.append({
                "n_tokens": out.step * tokens_per_step,
                "loss": validation_loss(model, stream, batch_size, seq_len, val_batches),
                "train_loss": mean_loss / world,
            })
            window.update(loss=0.0, steps=0)

    model.train()
    try:
        result = fit(
            model, optimizer, batches, loss_fn, n_steps=n_steps, lr=lr,
            # the LR at the END of the step: peak after warmup, exactly min_lr_ratio * lr at the last step
            schedule=lambda step: lr_factor(step + 1, n_steps, warmup_steps=warmup, floor=min_lr_ratio),
            clip_grad_norm=grad_clip, extra_loss=extra_loss, on_step=on_step,
            time_limit_s=None if max_minutes is None else 60.0 * max_minutes,
        )
    finally:
        bar.close()
    del optimizer
    truncated = result.stopped == "time_limit"
    if truncated:
        print(f"leanscale sweep: run {label} stopped by max_minutes={max_minutes} after "
              f"{result.steps}/{n_steps} steps; its n_tokens and flops are what it trained.",
              file=sys.stderr, flush=True)
    return LMRun(steps=result.steps, n_tokens=result.steps * tokens_per_step, seconds=result.seconds,
                 truncated=truncated, world_size=world, curve=curve)
