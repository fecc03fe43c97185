"""One training run of an IsoFLOP sweep: single epoch, AdamW, warmup + cosine, loss curve.

:func:`train_run` builds the run's GPT from its :class:`RunSpec` and trains it with the shared
engine's :func:`leanscale.train.lm.train_lm`; :mod:`leanscale.scaling.sweep` plans the grid and
calls it once per run (in this process, in worker processes or as Ray tasks). Under ``torchrun``
it trains with DistributedDataParallel (gloo): the global batch is split over the ranks, each
rank reads its own disjoint windows of the corpus, and the metrics are all-reduced so every rank
returns the same result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from leanscale.core.distributed import rank_and_world as dist_info
from leanscale.data.text import TokenStream
from leanscale.models.transformer import GPT, GPTConfig, flops_per_token
from leanscale.train import lr_factor, seeded
from leanscale.train.lm import train_lm

__all__ = ["RunSpec", "dist_info", "lr_at", "model_config", "train_run"]

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
    paper points out in Kaplan et al.'s runs). It is :func:`leanscale.train.lr_factor` read at the
    end of the step, the schedule :func:`~leanscale.train.lm.train_lm` uses.

    Example:
        >>> [round(lr_at(s, 10, 1.0, 0.2, 0.1), 3) for s in (0, 1, 9)]
        [0.5, 1.0, 0.1]
    """
    warmup = max(1, round(warmup_fraction * n_steps))
    return peak * lr_factor(step + 1, n_steps, warmup_steps=warmup, floor=min_lr_ratio)


def train_run(
    spec: RunSpec,
    data: np.ndarray | TokenStream,
    *,
    max_minutes: float | None = None,
    prepare_model: Callable[[GPT], torch.nn.Module] | None = None,
    aux_loss: Callable[[torch.nn.Module], torch.Tensor] | None = None,
    progress_bar: bool = False,
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
        progress_bar: a progress bar over the run's steps (rank 0 only).

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
    stream = data if isinstance(data, TokenStream) else TokenStream(data, spec.val_fraction)
    with seeded(spec.seed):  # seed the init without touching the caller's RNG
        model = GPT(model_config(spec))
        if prepare_model is not None:
            model = prepare_model(model)
    n_params = model.n_params()
    n_params_non_embedding = model.n_params(non_embedding=True)
    run = train_lm(
        model, stream, n_steps=spec.n_steps, batch_size=spec.batch_size, seq_len=spec.seq_len, lr=spec.lr,
        seed=spec.seed, warmup_fraction=spec.warmup_fraction, min_lr_ratio=spec.min_lr_ratio,
        weight_decay=spec.weight_decay, grad_clip=spec.grad_clip, n_curve_points=spec.n_curve_points,
        val_batches=spec.val_batches, max_minutes=max_minutes, extra_loss=aux_loss, label=spec.run_id,
        progress_bar=progress_bar,
        owner="train_run",
    )
    del model
    n_tokens = run.n_tokens
    cfg = model_config(spec)
    return {
        "run_id": spec.run_id,
        "budget_flops": spec.budget_flops,
        "n_params": n_params,
        "n_params_non_embedding": n_params_non_embedding,
        "n_tokens": n_tokens,
        "flops": 6.0 * n_params * n_tokens,
        "flops_appendix_f": flops_per_token(cfg, spec.seq_len) * n_tokens,
        "loss": run.loss,
        "train_loss": run.train_loss,
        "seconds": run.seconds,
        "n_layer": spec.n_layer,
        "n_embd": spec.n_embd,
        "n_head": spec.n_head,
        "seq_len": spec.seq_len,
        "vocab_size": spec.vocab_size,
        "seed": spec.seed,
        "n_steps": run.steps,
        "lr": spec.lr,
        "truncated": run.truncated,
        "world_size": run.world_size,
        "tokens_per_second": n_tokens / run.seconds,
        "flops_per_second": 6.0 * n_params * n_tokens / run.seconds,
        "curve": run.curve,
    }
