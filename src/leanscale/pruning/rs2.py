"""RS2: repeated sampling of random subsets -- a fresh random subset of the data every epoch.

Okanovic, Waleffe, Mageirakos, Nikolakakis, Karbasi, Kalogerias, Gurel & Rekatsinas, "Repeated
Random Sampling for Minimizing the Time-to-Accuracy of Learning", ICLR 2024, arXiv 2305.18424.

**The rule.** Each epoch ("round" in the paper) trains on ``m = round(ratio * n)`` examples drawn
at random, a different subset every epoch, with no scoring at all: over a run of ``E`` epochs the
model sees ``E * m`` examples (the compute of a static subset of ``m`` examples trained for ``E``
epochs), but from (almost) the whole data set instead of one fixed part of it. The paper finds it
beats static pruning methods in time-to-accuracy, most of all at small ratios, because it pays
no scoring cost and keeps the diversity of the full data.

**Without replacement** (``replacement=False``, the default, the paper's preferred variant):
the examples are consumed from a seeded random permutation, ``m`` per epoch, so no example is
seen twice before every example has been seen once; then a new permutation starts. Written as one
stream of permutations ``P_0 P_1 P_2 ...``, epoch ``e`` takes the positions ``[e * m, (e + 1) * m)``.
When ``m`` divides ``n``, every ``n / m`` consecutive epochs (aligned at 0) cover every example
exactly once. Otherwise the epoch that straddles the end of ``P_c`` takes the last examples of
``P_c`` and the first of ``P_{c + 1}``; ``P_{c + 1}`` is drawn so that its first examples are not
those last ones, so **no epoch holds an example twice** and every subset has exactly ``m``
examples. **With replacement** (``replacement=True``): each epoch an independent uniform
subset of ``m`` distinct examples (examples may come back in the next epoch).

The subset of epoch ``e`` depends only on ``(seed, e)`` (and ``n``, ``ratio``, ``replacement``):
every rank computes the same one, and a resumed run needs nothing saved but the epoch.

**torch.distributed.** Like ``DistributedSampler`` (and :class:`~leanscale.pruning.infobatch.InfoBatch`):
rank ``r`` of ``world_size`` takes positions ``r, r + world, ...`` of the epoch's order, padded with
its first examples to a multiple of ``world_size`` (``drop_last=False``) or cut (``drop_last=True``).
The shards are disjoint when ``world_size`` divides ``m`` (or with ``drop_last``).

**In a loop.** The learning-rate schedule should span the run's actual steps (``E * m /
batch_size``), as in the paper (it decays over all rounds, not per round). No loss reweighting:
every example of an epoch has weight 1.

Example:
    >>> rs2 = RS2Sampler(10, ratio=0.5, seed=0)
    >>> a, b = rs2.epoch_indices(0), rs2.epoch_indices(1)
    >>> len(a), len(b), sorted(a.tolist() + b.tolist()) == list(range(10))  # 2 epochs: everything once
    (5, 5, True)
    >>> rs2.epochs_per_pass
    2.0
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import torch

from leanscale.core.errors import InvalidParameterError
from leanscale.core.validation import Interval, check_param
from leanscale.pruning.distributed import resolve_rank

__all__ = ["RS2Sampler"]

_OWNER = "RS2Sampler"


def shard(order: np.ndarray, rank: int, world: int, drop_last: bool) -> np.ndarray:
    """Positions ``rank, rank + world, ...`` of ``order``, padded with its first entries to a
    multiple of ``world`` (or cut with ``drop_last``), as ``DistributedSampler`` does."""
    if world == 1:
        return order
    n = order.size
    if drop_last:
        total = (n // world) * world
        order = order[:total]
    else:
        total = math.ceil(n / world) * world
        if total > n:
            order = np.concatenate([order, np.resize(order, total - n)])
    return order[rank:total:world]


class RS2Sampler(torch.utils.data.Sampler):
    """A new random subset of ``ratio`` of the examples every epoch (RS2, Okanovic et al. 2024).

    Checks its arguments on construction (it is a sampler, like
    :class:`~leanscale.pruning.infobatch.InfoBatch`).

    Args:
        n_examples: Size of the training set; indices are ``0 .. n_examples - 1``.
        ratio: Fraction in ``(0, 1]`` of the examples per epoch: ``m = round(ratio * n)`` (at
            least 1; halves round up).
        replacement: False: consume seeded permutations (no example twice before all were seen,
            the module docstring); True: an independent subset every epoch.
        seed: Seed of the subsets; epoch ``e``'s subset depends only on ``(seed, e)``.
        rank: This process's shard; None: the rank of the initialised process group, else 0.
        world_size: Number of shards; None: the process group's size, else 1.
        drop_last: With several shards, drop the tail of the epoch's order instead of padding it
            to a multiple of ``world_size``.

    Attributes:
        subset_size: ``m``, the examples of one epoch (over all ranks).
        epochs_per_pass: ``n / m``: epochs in which the without-replacement stream covers the data once.
        epoch: The current epoch (set by :meth:`set_epoch`), None before the first.

    Example:
        A ``DataLoader`` loop, as with ``DistributedSampler``::

            rs2 = RS2Sampler(len(ds), ratio=0.1)
            loader = DataLoader(ds, batch_size=128, sampler=rs2)
            for epoch in range(epochs):
                rs2.set_epoch(epoch)
                for xb, yb in loader:
                    ...
    """

    _parameter_constraints: ClassVar[dict[str, list]] = {
        "n_examples": [Interval(int, 1, None)],
        "ratio": [Interval(float, 0, 1, closed="right")],
        "replacement": [bool],
        "seed": [Interval(int, 0, None)],
        "rank": [Interval(int, 0, None), None],
        "world_size": [Interval(int, 1, None), None],
        "drop_last": [bool],
    }

    def __init__(self, n_examples: int, *, ratio: float = 0.1, replacement: bool = False, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None, drop_last: bool = False):
        params = {"n_examples": n_examples, "ratio": ratio, "replacement": replacement, "seed": seed,
                  "rank": rank, "world_size": world_size, "drop_last": drop_last}
        for name, value in params.items():
            check_param(name, value, self._parameter_constraints[name], owner=_OWNER)
        rank, world_size = resolve_rank(rank, world_size, _OWNER)
        self.n_examples = int(n_examples)
        self.ratio = float(ratio)
        self.replacement = replacement
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.drop_last = drop_last
        # round half up; 1e-9 absorbs float error such as 0.7 * 10 = 7.000000000000001 (as select)
        self.subset_size = max(1, min(self.n_examples, math.floor(self.ratio * self.n_examples + 0.5 + 1e-9)))
        self.epoch: int | None = None
        self._order: np.ndarray | None = None  # (m,) int64: the current epoch's global order
        self._cycles: dict[int, np.ndarray] = {}  # a few recent permutations of the stream

    @property
    def epochs_per_pass(self) -> float:
        """``n / m``: epochs per pass over the data (without replacement)."""
        return self.n_examples / self.subset_size

    # ------------------------------------------------------------------------- the stream
    def _cycle(self, c: int) -> np.ndarray:
        """Permutation ``P_c`` of the stream (``(n,)`` int64), built from ``P_0`` on and cached."""
        if c in self._cycles:
            return self._cycles[c]
        start = max([k for k in self._cycles if k < c], default=-1)
        prev = self._cycles.get(start)
        for k in range(start + 1, c + 1):
            prev = self._next_cycle(k, prev)
            self._cycles[k] = prev
            for old in [j for j in self._cycles if j < k - 1]:  # keep two: memory O(n)
                del self._cycles[old]
        return prev

    def _next_cycle(self, c: int, prev: np.ndarray | None) -> np.ndarray:
        n, m = self.n_examples, self.subset_size
        rng = np.random.default_rng([self.seed, c])
        boundary = c * n  # stream position where P_c starts
        epoch_start = (boundary // m) * m  # start of the epoch that holds that position
        t = boundary - epoch_start  # examples of that epoch taken from the end of P_{c-1}
        if c == 0 or t == 0:
            return rng.permutation(n).astype(np.int64)
        tail = prev[n - t:]  # (t,) already in this epoch: must not open P_c
        others = np.setdiff1d(np.arange(n, dtype=np.int64), tail, assume_unique=True)  # (n - t,)
        others = rng.permutation(others)
        head = others[:m - t]  # the rest of the straddling epoch (m - t <= n - t)
        rest = rng.permutation(np.concatenate([others[m - t:], tail]))
        return np.concatenate([head, rest]).astype(np.int64)

    def subset(self, epoch: int) -> np.ndarray:
        """The global order of ``epoch``'s subset (all ranks together), ``(m,)`` int64."""
        check_param("epoch", epoch, [Interval(int, 0, None)], owner=_OWNER)
        n, m, epoch = self.n_examples, self.subset_size, int(epoch)
        if self.replacement:
            rng = np.random.default_rng([self.seed, epoch, 1])  # 1: not the stream's generators
            return rng.choice(n, size=m, replace=False).astype(np.int64)
        start, stop = epoch * m, (epoch + 1) * m  # stream positions
        c0, c1 = start // n, (stop - 1) // n  # c1 <= c0 + 1 since m <= n
        first = self._cycle(c0)[start - c0 * n:min(stop, (c0 + 1) * n) - c0 * n]
        if c1 == c0:
            return first.copy()
        return np.concatenate([first, self._cycle(c1)[:stop - c1 * n]])

    # ------------------------------------------------------------------------- the sampler
    def set_shard(self, rank: int, world_size: int) -> RS2Sampler:
        """Draw shard ``rank`` of ``world_size`` from now on (the subsets do not depend on it). Returns ``self``."""
        check_param("world_size", world_size, [Interval(int, 1, None)], owner=_OWNER)
        check_param("rank", rank, [Interval(int, 0, world_size - 1)], owner=_OWNER)
        self.rank, self.world_size = int(rank), int(world_size)
        return self

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` (as ``DistributedSampler.set_epoch``): iteration yields its subset."""
        check_param("epoch", epoch, [Interval(int, 0, None)], owner=_OWNER)
        if epoch != self.epoch or self._order is None:
            self._order = self.subset(epoch)
            self.epoch = int(epoch)

    def sampler(self, epoch: int) -> RS2Sampler:
        """Set ``epoch`` and return this object, a ``Sampler`` over this rank's indices of it."""
        self.set_epoch(epoch)
        return self

    def epoch_indices(self, epoch: int | None = None) -> torch.Tensor:
        """This rank's indices of ``epoch`` (default: the current one), ``(m_local,)`` int64."""
        if epoch is not None:
            self.set_epoch(epoch)
        self._require_epoch()
        return torch.from_numpy(shard(self._order, self.rank, self.world_size, self.drop_last).copy())

    def _require_epoch(self) -> None:
        if self._order is None:
            raise InvalidParameterError(
                f"{_OWNER} has no current epoch: call set_epoch(epoch) or sampler(epoch) at the start of each "
                "epoch first."
            )

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices().tolist())

    def __len__(self) -> int:
        self._require_epoch()
        return int(shard(self._order, self.rank, self.world_size, self.drop_last).size)

    def get_params(self) -> dict[str, Any]:
        """The constructor's arguments (for a log or a manifest)."""
        return {"n_examples": self.n_examples, "ratio": self.ratio, "replacement": self.replacement,
                "seed": self.seed, "rank": self.rank, "world_size": self.world_size, "drop_last": self.drop_last}

    def __repr__(self) -> str:
        return (f"{_OWNER}(n_examples={self.n_examples}, ratio={self.ratio}, replacement={self.replacement}, "
                f"seed={self.seed}, rank={self.rank}, world_size={self.world_size}, drop_last={self.drop_last})")
