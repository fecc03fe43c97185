"""Seeded batch orders: the same global batches on every rank, every run.

Two disciplines, both used by the loops here:

- :func:`epoch_batches`: each epoch's permutation cut into ``n // batch_size`` nearly equal
  batches, so every example is seen exactly once per epoch (a forgetting tracker needs that);
- :func:`permutation_batches`: full batches of exactly ``batch_size`` from consecutive seeded
  permutations, the last partial batch of each dropped (Ghost BatchNorm needs full ghost batches).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["epoch_batches", "permutation_batches"]


def epoch_batches(n: int, batch_size: int, epoch: int, seed: int) -> list[torch.Tensor]:
    """The global batches of one epoch: a seeded permutation cut into ``max(1, n // batch_size)``
    nearly equal parts (int64 index tensors). The same ``(n, batch_size, epoch, seed)`` always
    gives the same batches, on every rank.

    Example:
        >>> [len(b) for b in epoch_batches(10, 4, epoch=0, seed=0)]
        [5, 5]
    """
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)  # 100_003: a prime, seeds never collide for epoch < 1e5
    perm = torch.randperm(n, generator=gen)  # (n,)
    return list(torch.tensor_split(perm, max(1, n // batch_size)))


def permutation_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless batches of ``batch_size`` indices of ``range(n)``: a permutation drawn from
    ``generator`` is consumed in order and a new one drawn when fewer than ``batch_size`` remain
    (those are dropped). Requires ``batch_size <= n``.

    Example:
        >>> it = permutation_batches(5, 2, torch.Generator().manual_seed(0))
        >>> first_epoch = torch.cat([next(it), next(it)])  # 4 of the 5 examples, none twice
        >>> len(set(first_epoch.tolist())), len(next(it))
        (4, 2)
    """
    perm, pos = torch.randperm(n, generator=generator), 0
    while True:
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=generator), 0
        yield perm[pos:pos + batch_size]
        pos += batch_size
