"""What both integrations do with an :class:`~leanscale.pruning.InfoBatch`: check it, give it the
trainer's shard, and turn per-example losses into the weighted training loss."""

from __future__ import annotations

from typing import Any

import torch

from leanscale.core.errors import InvalidParameterError


def check_info_batch(info_batch: Any, owner: str) -> None:
    """``info_batch`` must be a :class:`~leanscale.pruning.InfoBatch`; an error naming it otherwise."""
    from leanscale.pruning import InfoBatch

    if not isinstance(info_batch, InfoBatch):
        raise InvalidParameterError(
            f"The 'info_batch' parameter of {owner} must be a leanscale.pruning.InfoBatch. Got "
            f"{type(info_batch).__name__} instead."
        )


def align_shard(info_batch: Any, rank: int, world_size: int, owner: str) -> None:
    """Make ``info_batch`` draw this process's shard: ``rank`` of ``world_size``.

    An InfoBatch built before the trainer started its process group believes it is alone
    (rank 0 of 1): it is given the trainer's rank and world size (the shard is computed from them
    at each iteration; the epoch plans and the loss table do not depend on them). One built for
    another sharding explicitly is an error.
    """
    if (info_batch.rank, info_batch.world_size) == (rank, world_size):
        return
    if info_batch.world_size != 1:
        raise InvalidParameterError(
            f"The 'info_batch' parameter of {owner} was built for rank {info_batch.rank} of "
            f"{info_batch.world_size} processes, but the trainer runs this process as rank {rank} of {world_size}. "
            "Build it with rank=None, world_size=None (the process group's) or with the trainer's rank and size."
        )
    info_batch.set_shard(int(rank), int(world_size))


def weighted_loss(info_batch: Any, losses: torch.Tensor, indices: Any,
                  where: str = "The 'losses' parameter of infobatch_loss must be") -> torch.Tensor:
    """Record ``losses`` (unweighted) and return their InfoBatch-weighted mean, a scalar.

    ``losses`` are ``(b,)`` per-example losses (``reduction="none"``) of the dataset examples
    ``indices`` ``(b,)``. ``InfoBatch.update`` is a collective under torch.distributed: every rank
    must call this once per training step. ``where`` starts the error message on bad losses.
    """
    if not isinstance(losses, torch.Tensor) or losses.ndim != 1:
        raise InvalidParameterError(
            f"{where} a 1-d tensor of per-example losses (reduction='none'). Got "
            f"{('a tensor of shape ' + str(tuple(losses.shape))) if isinstance(losses, torch.Tensor) else type(losses).__name__}."
        )
    weights = info_batch.weights(indices).to(losses.device, losses.dtype)  # (b,)
    info_batch.update(indices, losses.detach())
    return (losses * weights).mean()
