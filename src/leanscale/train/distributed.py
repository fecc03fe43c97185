"""The DDP pieces of every training loop: wrap, reduce, broadcast, synchronise, release.

``rank_and_world`` and the process-group start/stop live in :mod:`leanscale.core.distributed`
(the CLI needs them without training); this module holds what a training loop needs on top.
Every function is the identity (or a no-op) without an initialised process group, so a loop
written with them runs unchanged in one process and under ``torchrun``.
"""

from __future__ import annotations

import gc
from typing import Any

import torch
from torch import nn

from leanscale.core.distributed import rank_and_world

__all__ = ["all_gather_rows", "all_reduce_floats", "broadcast_object", "rank_slice", "release", "sync_buffers", "wrap_ddp"]


def wrap_ddp(model: nn.Module) -> nn.Module:
    """``DistributedDataParallel(model)`` under a process group of more than one rank, else
    ``model``. DDP broadcasts rank 0's weights, so every rank starts from the same model."""
    _, world = rank_and_world()
    if world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model)


def release() -> None:
    """The first half of the torchrun exit rule, after the caller dropped its DDP wrapper and
    optimizer: collect them now, so gloo's buckets are freed before ``destroy_process_group``
    (on this project's CPUs rank 0 sometimes aborts at exit otherwise)."""
    if rank_and_world()[1] > 1:
        gc.collect()


def all_reduce_floats(values: list[float], op: str = "sum") -> list[float]:
    """``values`` reduced over the ranks (``"sum"`` or ``"max"``) in float64; unchanged in one process."""
    _, world = rank_and_world()
    if world == 1:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def broadcast_object(obj: Any) -> Any:
    """``obj`` of rank 0 on every rank (identity without a process group). Pickled by torch over
    the process group: use it for plain data between ranks of one job, never for files."""
    rank, world = rank_and_world()
    if world == 1:
        return obj
    import torch.distributed as dist

    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sync_buffers(model: nn.Module) -> None:
    """Average floating buffers (BatchNorm running mean/var) over the ranks; broadcast the others
    from rank 0. DDP keeps parameters equal but BatchNorm statistics are per rank."""
    _, world = rank_and_world()
    if world == 1:
        return
    import torch.distributed as dist

    for buf in model.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf.div_(world)
        else:
            dist.broadcast(buf, 0)


def rank_slice(batch: torch.Tensor, rank: int | None = None, world: int | None = None) -> torch.Tensor:
    """This rank's contiguous part of a global batch: ``batch[r * B // w : (r + 1) * B // w]``.

    The parts differ by at most one example when ``w`` does not divide ``B``; together they are
    the whole batch, in order.
    """
    if rank is None or world is None:
        rank, world = rank_and_world()
    b = len(batch)
    return batch[rank * b // world:(rank + 1) * b // world]


def all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows ``(b_r, ...)`` in rank order (``b_r`` may differ), on the CPU.

    Batches of different sizes per rank (InfoBatch's loss table, forgetting events). The blocks are padded to the largest one
    (``all_gather`` needs equal shapes) and trimmed after; the dtype and trailing shape must be the
    same on every rank.
    """
    import torch.distributed as dist

    world = dist.get_world_size()
    # NCCL only moves CUDA tensors; gloo (and the CPU side of a mixed backend) takes CPU tensors.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    rows = rows.to(device)
    size = torch.tensor([rows.shape[0]], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    padded = rows.new_zeros((max(counts), *rows.shape[1:]))  # (b_max, ...)
    padded[: rows.shape[0]] = rows
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:c] for g, c in zip(gathered, counts)]).cpu()  # (sum b_r, ...)
