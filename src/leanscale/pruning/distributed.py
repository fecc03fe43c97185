"""Distributed scoring: each rank scores a contiguous shard, every rank gets all rows back.

Per-example scores (probabilities, gradient norms, embeddings) are independent across examples,
so ``n`` examples can be split into one contiguous block per rank, scored locally and gathered
in rank order. The gathered array is the one a single process computes, row for row (up to the
floating-point effect of a different batch composition inside ``fn``, which is zero for models
whose rows do not interact: eval-mode BatchNorm, no cross-example layers).

Without an initialised ``torch.distributed`` process group every function here is the identity
of the single-process case, so library code calls them unconditionally.

Example:
    >>> import numpy as np
    >>> shard_indices(10, rank=1, world=3)
    array([3, 4, 5])
    >>> map_sharded(lambda idx: idx[:, None] * 2.0, 4)[:, 0]
    array([0., 2., 4., 6.])
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from leanscale.core.distributed import rank_and_world
from leanscale.core.errors import InvalidParameterError
from leanscale.core.validation import Interval, check_param

__all__ = ["gather_rows", "map_sharded", "shard_indices"]


def resolve_rank(rank: int | None, world_size: int | None, owner: str) -> tuple[int, int]:
    """``(rank, world_size)`` of a sampler: each None is taken from the process group (0 and 1
    without one); the error names ``owner``'s ``rank`` parameter when it is not below
    ``world_size``."""
    dist_rank, dist_world = rank_and_world()
    world_size = dist_world if world_size is None else world_size
    rank = dist_rank if rank is None else rank
    if rank >= world_size:
        raise InvalidParameterError(
            f"The 'rank' parameter of {owner} must be an int in the range [0, {world_size - 1}] "
            f"(world_size={world_size}). Got {rank!r} instead."
        )
    return rank, world_size


def _bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    # Block r is [r n / W, (r + 1) n / W): sizes differ by at most one, blocks tile [0, n).
    return rank * n // world, (rank + 1) * n // world


def shard_indices(n: int, rank: int | None = None, world: int | None = None) -> np.ndarray:
    """The contiguous block of ``range(n)`` that ``rank`` of ``world`` ranks scores (int64).

    Args:
        n: Number of examples.
        rank: This rank (default: the process group's, 0 without one).
        world: Number of ranks (default: the process group's size, 1 without one).

    Returns:
        ``np.arange(start, stop)`` with ``start = rank * n // world``; the blocks of ranks
        ``0 .. world - 1`` tile ``range(n)`` in order and differ in size by at most one.
    """
    owner = "shard_indices"
    check_param("n", n, [Interval(int, 0, None)], owner=owner)
    group_rank, group_world = rank_and_world()
    world = group_world if world is None else world
    check_param("world", world, [Interval(int, 1, None)], owner=owner)
    rank = group_rank if rank is None else rank
    check_param("rank", rank, [Interval(int, 0, world - 1)], owner=owner)
    start, stop = _bounds(int(n), int(rank), int(world))
    return np.arange(start, stop, dtype=np.int64)


def gather_rows(local: np.ndarray | None, n: int) -> np.ndarray:
    """Concatenate every rank's block of rows in rank order (all ranks get the result).

    ``local`` holds this rank's rows, in the order of :func:`shard_indices` ``(n)``; every rank's
    rows must share the trailing shape and dtype. A rank whose block is empty may pass ``None``.
    Without a process group this returns ``local`` (as an array) after checking it has ``n`` rows.

    Raises:
        InvalidParameterError: ``local`` has not as many rows as this rank's block, or the ranks
            disagree on the trailing shape or dtype.
    """
    import torch
    import torch.distributed as dist

    check_param("n", n, [Interval(int, 0, None)], owner="gather_rows")
    rank, world = rank_and_world()
    expected = len(shard_indices(n, rank, world))
    if local is not None:
        local = np.ascontiguousarray(np.asarray(local))
        if local.ndim == 0 or local.shape[0] != expected:
            raise InvalidParameterError(
                f"The 'local' parameter of gather_rows must have {expected} rows (this rank's block of "
                f"{n} examples over {world} ranks). Got shape {local.shape} instead."
            )
    elif expected:
        raise InvalidParameterError(
            f"The 'local' parameter of gather_rows may be None only for an empty block; this rank's "
            f"block has {expected} rows."
        )
    if world == 1:
        return local if local is not None else np.empty((0,))

    # Metadata first (small objects): the trailing shape and dtype of every non-empty block.
    meta = None if local is None else (tuple(local.shape[1:]), local.dtype.str)
    metas: list = [None] * world
    dist.all_gather_object(metas, meta)
    known = {m for m in metas if m is not None}
    if len(known) > 1:
        raise InvalidParameterError(
            f"The 'local' parameter of gather_rows must have the same trailing shape and dtype on every "
            f"rank. Got {[m for m in metas]} (rank order) instead."
        )
    if not known:  # n == 0 everywhere
        return np.empty((0,))
    trailing, dtype_str = known.pop()
    dtype = np.dtype(dtype_str)
    row_bytes = int(np.prod(trailing, dtype=np.int64)) * dtype.itemsize
    sizes = [len(shard_indices(n, r, world)) for r in range(world)]
    width = max(sizes)
    # Rows travel as raw bytes (any numeric dtype), padded to the largest block: gloo's all_gather
    # needs equal shapes.
    buf = np.zeros((width, row_bytes), dtype=np.uint8)  # (max block, bytes per row)
    if local is not None and expected:
        buf[:expected] = local.reshape(expected, -1).view(np.uint8).reshape(expected, row_bytes)
    mine = torch.from_numpy(buf)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine)
    rows = np.concatenate([p.numpy()[:s] for p, s in zip(parts, sizes)])  # (n, bytes per row)
    return np.ascontiguousarray(rows).view(dtype).reshape((n, *trailing))


def map_sharded(fn: Callable[[np.ndarray], np.ndarray], n: int) -> np.ndarray:
    """``fn(indices)`` on this rank's block of ``range(n)``, gathered from every rank.

    Args:
        fn: Maps an int64 index array ``(b,)`` to ``b`` rows (an array or tensor ``(b, ...)``).
            It is not called on a rank whose block is empty.
        n: Number of examples.

    Returns:
        The ``(n, ...)`` array, the same on every rank and equal to ``fn(np.arange(n))`` in one
        process when ``fn``'s rows do not depend on each other.
    """
    check_param("fn", fn, [callable], owner="map_sharded")
    idx = shard_indices(n)
    local = None
    if len(idx):
        out = fn(idx)
        if hasattr(out, "detach"):  # a torch tensor
            out = out.detach().cpu().numpy()
        local = np.asarray(out)
        if local.ndim == 0 or local.shape[0] != len(idx):
            raise InvalidParameterError(
                f"The 'fn' parameter of map_sharded must return one row per index ({len(idx)}). Got "
                f"shape {local.shape} instead."
            )
    return gather_rows(local, n)
