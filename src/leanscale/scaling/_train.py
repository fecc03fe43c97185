"""One training run of an IsoFLOP sweep: single epoch, AdamW, warmup + cosine, loss curve.

:func:`train_run` is the whole training loop; :mod:`leanscale.scaling.sweep` plans the grid and
calls it once per run (in this process, in worker processes or as Ray tasks). Under ``torchrun``
it trains with DistributedDataParallel (gloo): the global batch is split over the ranks, each
rank reads its own disjoint windows of the corpus, and the metrics are all-reduced so every rank
returns the same result.
"""

from __future__ import annotations

import gc
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from leanscale.core.errors import InvalidParameterError
from leanscale.data.text import TokenStream
from leanscale.models.transformer import GPT, GPTConfig, flops_per_token

__all__ = ["RunSpec", "dist_info", "lr_at", "model_config", "train_run"]

# AdamW moments as in GPT-3 / Chinchilla training (beta2 = 0.95 is steadier than 0.999 for LMs).
ADAM_BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines one run's result (so two equal specs train identically).

    Sizes are counts; ``n_params`` counts every parameter once (the tied token embedding /
    output head included, the position embedding included), ``n_params_non_embedding`` leaves
    out both embeddings (Kaplan et al. 2020). ``n_tokens`` is the planned D = C / (6 N) rounded
    to an integer; training takes ``n_steps = n_tokens // (batch_size * seq_len)`` full steps.
    """

    run_id: str  # "C<budget>-L<n_layer>-d<n_embd>", unique in a sweep
    budget_flops: float  # the IsoFLOP budget C this run belongs to
    n_layer: int
    n_head: int
    n_embd: int
    seq_len: int  # tokens per training window (T), also the model's block_size
    vocab_size: int
    n_params: int  # N: all parameters, tied embeddings counted once
    n_params_non_embedding: int  # N without token and position embeddings
    n_tokens: int  # planned training tokens D = round(C / (6 N))
    flops: float  # 6 * n_params * n_tokens (the budget, up to rounding of D)
    flops_appendix_f: float  # Chinchilla Appendix F count for n_tokens
    lr: float  # peak AdamW learning rate of this run (after the width rule)
    batch_size: int  # sequences per optimizer step, over all ranks
    warmup_fraction: float  # fraction of the steps with a linear warmup
    min_lr_ratio: float  # final LR / peak LR at the end of the cosine
    weight_decay: float  # AdamW decoupled weight decay on matrices and embeddings
    grad_clip: float  # max global gradient L2 norm
    n_curve_points: int  # evaluations along the run (the last one is the final loss)
    val_batches: int  # validation batches per evaluation
    val_fraction: float  # held-out tail of the corpus
    corpus: str  # corpus name or path, for the record
    max_bytes: int | None  # corpus byte limit, for the record
    seed: int  # model init and window order

    @property
    def n_steps(self) -> int:
        """Optimizer steps: full global batches of ``batch_size * seq_len`` tokens."""
        return self.n_tokens // (self.batch_size * self.seq_len)

    def to_dict(self) -> dict:
        return asdict(self)


def model_config(spec: RunSpec) -> GPTConfig:
    """The :class:`GPTConfig` of a run: no dropout (single epoch), no biases, tied embeddings."""
    return GPTConfig(
        vocab_size=spec.vocab_size, block_size=spec.seq_len, n_layer=spec.n_layer,
        n_head=spec.n_head, n_embd=spec.n_embd, dropout=0.0, bias=False, tie_weights=True,
    )


def lr_at(step: int, n_steps: int, peak: float, warmup_fraction: float, min_lr_ratio: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based) of ``n_steps``.

    Linear warmup over ``max(1, round(warmup_fraction * n_steps))`` steps to ``peak``, then a
    cosine from ``peak`` down to ``min_lr_ratio * peak`` at the last step (Chinchilla decays to
    10% over exactly the training length; a cosine that is longer than the run is the mistake the
    paper points out in Kaplan et al.'s runs).

    Example:
        >>> [round(lr_at(s, 10, 1.0, 0.2, 0.1), 3) for s in (0, 1, 9)]
        [0.5, 1.0, 0.1]
    """
    warmup = max(1, round(warmup_fraction * n_steps))
    if step < warmup:
        return peak * (step + 1) / warmup
    decay_steps = max(1, n_steps - 1 - (warmup - 1))  # from the last warmup step to the end
    progress = min(1.0, (step - (warmup - 1)) / decay_steps)
    floor = min_lr_ratio * peak
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` under an initialised ``torch.distributed``, else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _all_reduce_sum(values: list[float], world_size: int) -> list[float]:
    if world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t.tolist()


def _all_reduce_max(value: float, world_size: int) -> float:
    if world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t[0])


def _optimizer(model: torch.nn.Module, spec: RunSpec, peak: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings (dim >= 2), none on LayerNorm gains."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": spec.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=peak, betas=ADAM_BETAS, eps=ADAM_EPS)


@torch.no_grad()
def _validation_loss(model, stream: TokenStream, spec: RunSpec, rank: int, world_size: int) -> float:
    """Mean next-token loss (nats) over the first ``val_batches`` validation batches.

    The same batches for every run and every point of the curve (common random numbers: the
    differences between runs are less noisy than each loss). Under DDP rank ``r`` evaluates
    batches ``r, r + world_size, ...`` and the sums are all-reduced.
    """
    model.eval()
    total, count = 0.0, 0.0
    for i, (x, y) in enumerate(stream.val_batches(spec.batch_size, spec.seq_len, spec.val_batches)):
        if i % world_size != rank:
            continue
        _, loss = model(x, y)
        total += float(loss) * x.numel()
        count += x.numel()
    model.train()
    total, count = _all_reduce_sum([total, count], world_size)
    return total / count


def _curve_steps(n_steps: int, n_points: int) -> list[int]:
    """Steps (1-based counts of finished steps) after which the curve is evaluated; ends at n_steps."""
    return sorted({max(1, round(k * n_steps / n_points)) for k in range(1, n_points + 1)})


def train_run(
    spec: RunSpec,
    data: np.ndarray | TokenStream,
    *,
    max_minutes: float | None = None,
    prepare_model: Callable[[GPT], torch.nn.Module] | None = None,
    aux_loss: Callable[[torch.nn.Module], torch.Tensor] | None = None,
) -> dict:
    """Train one model of a sweep for one epoch over ``spec.n_tokens`` tokens and evaluate it.

    Deterministic given ``spec.seed``: the model initialisation (``torch.manual_seed``) and the
    order of the training windows (:meth:`TokenStream.train_batches`) both come from it, so a
    run trained again (or in another process) gives the same numbers.

    Under an initialised ``torch.distributed`` (``torchrun``), the model is wrapped in
    DistributedDataParallel; each of the ``world_size`` ranks trains on ``batch_size //
    world_size`` sequences per step, drawn from its own disjoint windows, and the losses are
    all-reduced, so every rank returns the same dict. Writing files is the caller's job (rank 0).

    Args:
        spec: the run (shape, tokens, optimisation settings).
        data: the corpus' token ids, or a :class:`TokenStream` over them. An array is split
            with ``spec.val_fraction``.
        max_minutes: stop training after this many minutes of wall time (then evaluate and
            return, with ``truncated=True`` and the tokens actually trained). None: no limit.
        prepare_model: Called on the freshly initialised :class:`GPT` (before DDP and the
            optimizer) and returns the model to train, e.g. ``lambda m: apply_moe(m, 8)``.
            ``n_params`` then counts the prepared model's parameters.
        aux_loss: Called on the model after each forward; its value is added to the training
            loss (e.g. MoE load-balancing and z-losses). The reported losses stay the language
            model's cross-entropy.

    Returns:
        A dict with the run's columns of ``runs.csv`` (``run_id``, ``budget_flops``,
        ``n_params``, ``n_params_non_embedding``, ``n_tokens`` trained, ``flops`` = 6 N D,
        ``flops_appendix_f``, ``loss`` = final validation loss in nats per token,
        ``train_loss`` = mean training loss over the last curve interval, ``seconds``,
        ``n_layer``, ``n_embd``, ``n_head``, ``seq_len``, ``vocab_size``, ``seed``), plus
        ``n_steps``, ``lr``, ``truncated``, ``world_size``, ``tokens_per_second``,
        ``flops_per_second`` and ``curve``: a list of ``{"n_tokens", "loss", "train_loss"}``.

    Raises:
        InvalidParameterError: ``batch_size`` is not divisible by the number of ranks, or the
            corpus is too small for ``n_tokens`` (from :meth:`TokenStream.train_batches`).
    """
    rank, world_size = dist_info()
    if spec.batch_size % world_size != 0:
        raise InvalidParameterError(
            f"The 'batch_size' parameter of train_run must be divisible by the number of ranks "
            f"({world_size}) so the global batch splits evenly. Got {spec.batch_size}."
        )
    stream = data if isinstance(data, TokenStream) else TokenStream(data, spec.val_fraction)
    local_batch = spec.batch_size // world_size
    n_steps = spec.n_steps
    batches = stream.train_batches(local_batch, spec.seq_len, spec.n_tokens, seed=spec.seed,
                                   rank=rank, world_size=world_size)

    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(spec.seed)
        model = GPT(model_config(spec))
        if prepare_model is not None:
            model = prepare_model(model)
    n_params = model.n_params()
    train_model = model
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model)  # broadcasts rank 0's weights
    optimizer = _optimizer(model, spec, spec.lr)
    eval_after = set(_curve_steps(n_steps, spec.n_curve_points))
    tokens_per_step = spec.batch_size * spec.seq_len  # global

    curve: list[dict] = []
    window_loss, window_steps = 0.0, 0
    limit_s = None if max_minutes is None else 60.0 * max_minutes
    truncated = False
    steps_done = 0
    start = time.perf_counter()
    model.train()
    for step, (x, y) in enumerate(batches):  # x, y: (B_local, T)
        lr = lr_at(step, n_steps, spec.lr, spec.warmup_fraction, spec.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        _, loss = train_model(x, y)
        total = loss if aux_loss is None else loss + aux_loss(model)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window_loss += loss.item()
        window_steps += 1
        steps_done = step + 1
        if limit_s is not None and steps_done < n_steps:
            over = float(time.perf_counter() - start > limit_s)
            truncated = _all_reduce_sum([over], world_size)[0] > 0  # every rank stops together
        if steps_done in eval_after or truncated:
            mean_loss, = _all_reduce_sum([window_loss / window_steps], world_size)
            curve.append({
                "n_tokens": steps_done * tokens_per_step,
                "loss": _validation_loss(model, stream, spec, rank, world_size),
                "train_loss": mean_loss / world_size,
            })
            window_loss, window_steps = 0.0, 0
        if truncated:
            break
    seconds = _all_reduce_max(time.perf_counter() - start, world_size)  # the slowest rank
    if truncated:
        print(f"leanscale sweep: run {spec.run_id} stopped by max_minutes={max_minutes} after "
              f"{steps_done}/{n_steps} steps; its n_tokens and flops are what it trained.",
              file=sys.stderr, flush=True)

    n_tokens = steps_done * tokens_per_step
    n_params_non_embedding = model.n_params(non_embedding=True)
    if world_size > 1:
        # Free the DDP wrapper (and its gloo buckets) now, so that the caller can barrier and
        # destroy the process group cleanly (HELPERS.md: the torchrun exit rule).
        del train_model, optimizer, model
        gc.collect()
    cfg = model_config(spec)
    return {
        "run_id": spec.run_id,
        "budget_flops": spec.budget_flops,
        "n_params": n_params,
        "n_params_non_embedding": n_params_non_embedding,
        "n_tokens": n_tokens,
        "flops": 6.0 * n_params * n_tokens,
        "flops_appendix_f": flops_per_token(cfg, spec.seq_len) * n_tokens,
        "loss": curve[-1]["loss"],
        "train_loss": curve[-1]["train_loss"],
        "seconds": seconds,
        "n_layer": spec.n_layer,
        "n_embd": spec.n_embd,
        "n_head": spec.n_head,
        "seq_len": spec.seq_len,
        "vocab_size": spec.vocab_size,
        "seed": spec.seed,
        "n_steps": steps_done,
        "lr": spec.lr,
        "truncated": truncated,
        "world_size": world_size,
        "tokens_per_second": n_tokens / seconds,
        "flops_per_second": 6.0 * n_params * n_tokens / seconds,
        "curve": curve,
    }
