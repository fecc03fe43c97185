"""The training engine every technique, benchmark and the tour run on.

- :mod:`~leanscale.train.loop`: :func:`fit` (steps, micro-batch accumulation, clipping, schedule,
  DDP, hooks, checkpoint and resume), :func:`train_step`, :func:`seeded` model builds;
- :mod:`~leanscale.train.schedules`: :func:`lr_factor`, the one warmup + step/cosine schedule;
- :mod:`~leanscale.train.optim`: :func:`param_groups` with and without weight decay;
- :mod:`~leanscale.train.distributed`: DDP wrap/release, reductions, broadcast, BatchNorm sync,
  a rank's slice of a global batch;
- :mod:`~leanscale.train.batches`: seeded batch orders (epoch permutations, full permutation batches);
- :mod:`~leanscale.train.classifier` and :mod:`~leanscale.train.lm`: the two loops built on it
  (an image/feature classifier with evaluation and steps-to-target; a language model with a
  validation curve).

Techniques keep their functional forms: nothing requires this engine, a user's own loop keeps
working with every technique.
"""

from leanscale.train.batches import epoch_batches, permutation_batches
from leanscale.train.distributed import (
    all_gather_rows,
    all_reduce_floats,
    broadcast_object,
    rank_slice,
    release,
    sync_buffers,
    wrap_ddp,
)
from leanscale.train.loop import (
    Checkpoint,
    FitResult,
    MicroBatches,
    StepOutput,
    fit,
    seeded,
    train_step,
)
from leanscale.train.optim import param_groups
from leanscale.train.schedules import cosine_factor, lr_factor

__all__ = [
    "Checkpoint", "FitResult", "MicroBatches", "StepOutput", "all_gather_rows", "all_reduce_floats", "broadcast_object",
    "cosine_factor", "epoch_batches", "fit", "lr_factor", "param_groups", "permutation_batches", "rank_slice", "release", "seeded", "sync_buffers",
    "train_step", "wrap_ddp",
]
