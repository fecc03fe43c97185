"""InfoBatch: skip part of the well-learned examples each epoch and re-weight the rest.

Qin, Wang, Zheng, Gu, Peng, Xu, Zhou, Shang, Sun, Xie & You, "InfoBatch: Lossless Training Speed
Up by Unbiased Dynamic Data Pruning", ICLR 2024, arXiv 2303.04947.

**The rule.** The last recorded training loss ``H(z)`` of every example is kept in a table. At the
start of epoch ``e``:

1. the threshold is the mean of the recorded losses; examples with ``H(z) < mean`` (strictly) are
   *well learned*. Examples never scored yet (the whole first epoch) are never pruned and do not
   enter the mean.
2. each well-learned example is skipped with probability ``r = prune_ratio``: exactly
   ``floor(r * n_wl)`` or ``floor(r * n_wl) + 1`` of the ``n_wl`` well-learned examples, the
   ``+1`` with probability ``frac(r * n_wl)`` (stochastic rounding), then a uniformly random subset
   of that size. So every well-learned example is skipped with probability exactly ``r``.
3. the well-learned examples that are kept get loss weight ``1 / (1 - r)``, all others ``1``. The
   expected weighted gradient of the epoch equals the full-data gradient (the paper's Theorem).
4. annealing: only the first ``floor(delta * epochs)`` epochs are pruned; the remaining
   ``(1 - delta)`` of the epochs use the full data with weight 1 (the paper's ``delta = 0.875``).

Pruned examples are not seen, so their recorded loss stays that of the last epoch they were seen
in; the threshold uses the whole table, as the paper's code does.

Differences from the authors' code (``NUS-HPC-AI-Lab/InfoBatch``): their code keeps
``int((1 - r) * n_wl)`` well-learned examples and weights them ``1 / (1 - r)``, which is slightly
biased unless ``(1 - r) * n_wl`` is an integer; the stochastic rounding above removes that bias.
Their code starts every loss at 3 (so the first epoch keeps all examples by a tie); here unscored
examples are simply kept. Their first epoch after pruning stops uses ``e + 1 > delta * epochs``:
the same count of pruned epochs as here.

**Using it in any loop.** Iterate the indices of an epoch (``sampler(epoch)`` is a
``torch.utils.data.Sampler`` for a ``DataLoader`` whose dataset also returns the index, or
:meth:`InfoBatch.epoch_indices` for tensor slicing), compute the per-example losses with
``reduction="none"``, multiply them by :meth:`InfoBatch.weights`, take the mean, and record the
unweighted losses with :meth:`InfoBatch.update`. Learning-rate schedules should be driven by the
fraction of the epoch done, not by a step count fixed in advance: pruned epochs have fewer steps.

**torch.distributed.** Every rank builds the same seeded plan of the epoch (the kept examples in
a random order) and takes its shard like ``DistributedSampler``: positions ``rank, rank + world,
...``. With ``drop_last=False`` (default) the order is padded with its first examples to a
multiple of the world size, so every rank runs the same number of steps (a padded example is
seen twice in that epoch); with ``drop_last=True`` the tail is dropped instead (those examples
are not seen and keep their old loss). :meth:`InfoBatch.update` is a collective: it all-gathers
the indices and losses of every rank (batches may differ in size), so every rank holds the same
loss table -- the one a single process would hold after seeing the whole global batches. Every
rank must call it the same number of times.

Example:
    >>> import torch
    >>> ib = InfoBatch(6, epochs=4, prune_ratio=0.5, seed=0)
    >>> len(ib.epoch_indices(0))  # never scored: every example
    6
    >>> ib.update(torch.arange(6), torch.tensor([0.1, 0.1, 0.1, 0.1, 2.0, 2.0]))
    >>> kept = ib.epoch_indices(1)  # 4 well learned: 2 of them are skipped
    >>> len(kept), sorted(set(kept.tolist()) & {4, 5})
    (4, [4, 5])
    >>> ib.weights(torch.tensor([4, 5])).tolist()  # above the mean: weight 1
    [1.0, 1.0]
    >>> sorted(set(ib.weights(kept).tolist()))  # kept well-learned ones: 1 / (1 - 0.5)
    [1.0, 2.0]
    >>> ib.fraction_skipped_  # 2 of 12 example-epochs so far
    0.16666666666666666
    >>> len(ib.epoch_indices(3))  # the last 1 - delta of the epochs: full data
    6
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import torch

from leanscale.core.deprecation import renamed_argument
from leanscale.core.errors import InvalidParameterError
from leanscale.core.validation import (
    Interval,
    check_array,
    check_consistent_length,
    check_param,
)
from leanscale.pruning.distributed import resolve_rank
from leanscale.train.distributed import all_gather_rows

__all__ = ["InfoBatch"]

_OWNER = "InfoBatch"
# Keys of state_dict() that must match the receiving object: a plan is only valid for these.
_CONFIG_KEYS = ("n_examples", "epochs", "prune_ratio", "delta", "seed")


def _as_index_array(name: str, value: Any, n: int) -> np.ndarray:
    """``value`` as a 1-d int64 numpy array of indices in ``[0, n)``; an error naming ``name``."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise InvalidParameterError(
                f"The {name!r} parameter of {_OWNER} must hold integer example indices. "
                f"Got a tensor of dtype {value.dtype} instead."
            )
        arr = value.detach().cpu().numpy()
    else:
        arr = np.asarray(value)
        if arr.size == 0:
            arr = arr.astype(np.int64)
        if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
            raise InvalidParameterError(
                f"The {name!r} parameter of {_OWNER} must hold integer example indices. "
                f"Got an array of dtype {arr.dtype} instead."
            )
    if arr.ndim != 1:
        raise InvalidParameterError(
            f"The {name!r} parameter of {_OWNER} must be a 1-d array of indices. Got shape {arr.shape}."
        )
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (arr.min() < 0 or arr.max() >= n):
        bad = int(arr[(arr < 0) | (arr >= n)][0])
        raise InvalidParameterError(
            f"The {name!r} parameter of {_OWNER} must hold indices in [0, {n - 1}] (n_examples={n}). "
            f"Got {bad}."
        )
    return arr


class InfoBatch(torch.utils.data.Sampler):
    """Dynamic, unbiased data pruning by loss (InfoBatch), usable in any training loop.

    Unlike the estimators of this package, the object checks its arguments on construction: it
    is a sampler, and a sampler that fails at the first epoch instead of at once helps nobody.

    Args:
        n_examples: Size of the training set; indices are ``0 .. n_examples - 1``.
        epochs: Number of epochs of the training run (the annealing is a fraction of them).
        prune_ratio: ``r`` in ``[0, 1)``: probability that a well-learned example is skipped.
        delta: In ``(0, 1]``: the first ``floor(delta * epochs)`` epochs are pruned, the rest
            use the full data. ``delta=1`` prunes every epoch (no annealing).
        seed: Seed of the epoch plans; the plan of epoch ``e`` depends only on ``(seed, e)`` and
            the loss table, so it is the same on every rank and after a resume.
        rank: This process's shard; None: the rank of the initialised process group, else 0.
        world_size: Number of shards; None: the process group's size, else 1.
        drop_last: With several shards, drop the tail of the epoch's order instead of padding it
            to a multiple of ``world_size`` (see the module docstring).
        num_epochs: Deprecated name of ``epochs`` (a ``FutureWarning``; removed in the next release).

    Attributes:
        losses_: ``(n_examples,)`` float64, the last recorded loss of each example; NaN if never
            recorded.
        epoch: The current epoch (set by :meth:`set_epoch`), None before the first.
        history_: One dict per planned epoch, in epoch order: ``epoch``, ``pruning`` (False in
            annealing epochs), ``threshold`` (mean recorded loss, None when nothing was pruned
            for lack of scores), ``n_scored``, ``n_well_learned``, ``n_pruned``, ``n_kept``.

    Example:
        A ``DataLoader`` loop (the dataset returns the index as well)::

            ds = TensorDataset(x, y, torch.arange(len(y)))
            ib = InfoBatch(len(y), epochs=epochs)
            for epoch in range(epochs):
                for xb, yb, idx in DataLoader(ds, batch_size=128, sampler=ib.sampler(epoch)):
                    losses = F.cross_entropy(model(xb), yb, reduction="none")  # (b,)
                    loss = (losses * ib.weights(idx)).mean()
                    ib.update(idx, losses.detach())
                    opt.zero_grad(); loss.backward(); opt.step()
    """

    _parameter_constraints: ClassVar[dict[str, list]] = {
        "n_examples": [Interval(int, 1, None)],
        "epochs": [Interval(int, 1, None)],
        "prune_ratio": [Interval(float, 0, 1, closed="left")],
        "delta": [Interval(float, 0, 1, closed="right")],
        "seed": [Interval(int, 0, None)],
        "world_size": [Interval(int, 1, None), None],
        "rank": [Interval(int, 0, None), None],
        "drop_last": [bool],
    }

    def __init__(
        self,
        n_examples: int,
        *,
        epochs: int | None = None,
        prune_ratio: float = 0.5,
        delta: float = 0.875,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
        num_epochs: int | None = None,
    ):
        epochs = renamed_argument(_OWNER, "num_epochs", "epochs", num_epochs, epochs, None)
        params = {"n_examples": n_examples, "epochs": epochs, "prune_ratio": prune_ratio,
                  "delta": delta, "seed": seed, "rank": rank, "world_size": world_size, "drop_last": drop_last}
        for name, value in params.items():
            check_param(name, value, self._parameter_constraints[name], owner=_OWNER)
        rank, world_size = resolve_rank(rank, world_size, _OWNER)
        self.n_examples = int(n_examples)
        self.epochs = int(epochs)
        self.prune_ratio = float(prune_ratio)
        self.delta = float(delta)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.drop_last = drop_last
        self.losses_ = np.full(self.n_examples, np.nan)  # (n,) float64, NaN = never recorded
        self.epoch: int | None = None
        self.history_: list[dict[str, Any]] = []
        self._order: np.ndarray | None = None  # (n_kept,) int64, the global order of this epoch
        self._weights: np.ndarray | None = None  # (n,) float64 loss weights of this epoch

    @property
    def num_epochs(self) -> int:
        """Deprecated name of :attr:`epochs` (a ``FutureWarning``; removed in the next release)."""
        warnings.warn(f"{_OWNER}.num_epochs was renamed to {_OWNER}.epochs and will be removed in the next "
                      f"release.", FutureWarning, stacklevel=2)
        return self.epochs

    # ------------------------------------------------------------------------------ the plan
    @property
    def pruned_epochs(self) -> int:
        """How many epochs (the first ones) are pruned: ``floor(delta * epochs)``."""
        # The tolerance keeps e.g. 0.875 * 8 = 7 from becoming 6.999... in binary.
        return math.floor(self.delta * self.epochs + 1e-9)

    @property
    def keep_weight(self) -> float:
        """``1 / (1 - prune_ratio)``: the loss weight of a kept well-learned example."""
        return 1.0 / (1.0 - self.prune_ratio)

    def _plan(self, epoch: int) -> None:
        """Fix this epoch's order and weights from the loss table as it is now."""
        n, r = self.n_examples, self.prune_ratio
        rng = np.random.default_rng([self.seed, epoch])
        weights = np.ones(n)
        scored = ~np.isnan(self.losses_)
        n_scored = int(scored.sum())
        pruning = epoch < self.pruned_epochs
        record = {"epoch": epoch, "pruning": pruning, "threshold": None, "n_scored": n_scored,
                  "n_well_learned": 0, "n_pruned": 0}
        if pruning and n_scored and r > 0:
            threshold = float(self.losses_[scored].mean())
            well = np.flatnonzero(scored & (self.losses_ < threshold))  # (n_wl,) ascending
            expected = r * well.size  # E[number pruned]; stochastic rounding keeps it exact
            n_pruned = math.floor(expected) + int(rng.random() < expected - math.floor(expected))
            pruned = rng.choice(well, size=n_pruned, replace=False) if n_pruned else np.empty(0, np.int64)
            keep = np.ones(n, dtype=bool)
            keep[pruned] = False
            weights[well] = self.keep_weight
            weights[pruned] = 1.0  # not seen this epoch; 1 keeps weights() harmless if asked
            kept = np.flatnonzero(keep)
            record.update(threshold=threshold, n_well_learned=int(well.size), n_pruned=n_pruned)
        else:
            kept = np.arange(n)
        record["n_kept"] = int(kept.size)
        self._order = rng.permutation(kept).astype(np.int64)
        self._weights = weights
        self.history_ = [h for h in self.history_ if h["epoch"] != epoch] + [record]
        self.history_.sort(key=lambda h: h["epoch"])

    def set_shard(self, rank: int, world_size: int) -> InfoBatch:
        """Draw shard ``rank`` of ``world_size`` from now on (the plans and the loss table do not
        depend on the sharding), e.g. for an InfoBatch built before its trainer started the process
        group. Returns ``self``."""
        check_param("world_size", world_size, [Interval(int, 1, None)], owner=_OWNER)
        check_param("rank", rank, [Interval(int, 0, world_size - 1)], owner=_OWNER)
        self.rank, self.world_size = int(rank), int(world_size)
        return self

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch``: its plan is fixed now, from the losses recorded so far.

        Setting the current epoch again keeps its plan (a re-iterated epoch yields the same
        indices); setting another epoch plans it afresh.
        """
        check_param("epoch", epoch, [Interval(int, 0, self.epochs - 1)], owner=_OWNER)
        epoch = int(epoch)
        if epoch != self.epoch or self._order is None:
            self._plan(epoch)
            self.epoch = epoch

    def sampler(self, epoch: int) -> InfoBatch:
        """Set ``epoch`` and return this object, a ``Sampler`` over this rank's indices of it.

        ``DataLoader(ds, sampler=ib.sampler(epoch))`` each epoch, or one ``DataLoader(ds,
        sampler=ib)`` and ``ib.set_epoch(epoch)`` before each epoch (as with ``DistributedSampler``).
        """
        self.set_epoch(epoch)
        return self

    def _require_epoch(self) -> None:
        if self._order is None:
            raise InvalidParameterError(
                f"{_OWNER} has no current epoch: call set_epoch(epoch) or sampler(epoch) at the start "
                "of each epoch first."
            )

    def _shard(self) -> np.ndarray:
        """This rank's positions ``rank, rank + world, ...`` of the (padded or cut) epoch order."""
        order, world = self._order, self.world_size
        if world == 1:
            return order
        n_kept = order.size
        if self.drop_last:
            total = (n_kept // world) * world
            order = order[:total]
        else:
            total = math.ceil(n_kept / world) * world
            if total > n_kept:  # repeat the order's first examples (as DistributedSampler does)
                order = np.concatenate([order, np.resize(order, total - n_kept)])
        return order[self.rank:total:world]

    def epoch_indices(self, epoch: int | None = None) -> torch.Tensor:
        """This rank's indices of ``epoch`` (default: the current one), ``(n_local,)`` int64."""
        if epoch is not None:
            self.set_epoch(epoch)
        self._require_epoch()
        return torch.from_numpy(self._shard().copy())

    def __iter__(self) -> Iterator[int]:
        self._require_epoch()
        return iter(self._shard().tolist())

    def __len__(self) -> int:
        self._require_epoch()
        return int(self._shard().size)

    # ------------------------------------------------------------------------ weights, losses
    def weights(self, indices) -> torch.Tensor:
        """Loss weights of ``indices`` in the current epoch, ``(b,)`` float32.

        ``1 / (1 - prune_ratio)`` for a kept well-learned example, 1 otherwise. On the device of
        ``indices`` when it is a tensor, else on the CPU.
        """
        self._require_epoch()
        idx = _as_index_array("indices", indices, self.n_examples)
        device = indices.device if isinstance(indices, torch.Tensor) else None
        return torch.as_tensor(self._weights[idx], dtype=torch.float32, device=device)

    def update(self, indices, losses) -> None:
        """Record the per-example losses of a batch (unweighted, ``reduction="none"``).

        Under an initialised torch.distributed process group with several processes this is a
        collective: every rank's indices and losses are all-gathered (in rank order) and recorded
        on every rank. An index repeated within one call keeps its last loss.

        Args:
            indices: ``(b,)`` integer indices in ``[0, n_examples)`` (tensor or array).
            losses: ``(b,)`` finite losses of these examples (detached).

        Raises:
            InvalidParameterError: shapes differ, an index is out of range or a loss is not finite.
        """
        idx = _as_index_array("indices", indices, self.n_examples)
        if isinstance(losses, torch.Tensor):
            losses = losses.detach().to("cpu", torch.float64).numpy()
        values = check_array("losses", losses, ndim=1, owner=_OWNER)
        check_consistent_length(owner=_OWNER, indices=idx, losses=values)
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            # Indices travel as float64 next to the losses: exact below 2**53 examples.
            rows = torch.from_numpy(np.stack([idx.astype(np.float64), values], axis=1))  # (b, 2)
            rows = all_gather_rows(rows).numpy()
            idx, values = rows[:, 0].astype(np.int64), rows[:, 1]
        self.losses_[idx] = values

    @property
    def fraction_skipped_(self) -> float:
        """Examples skipped over all planned epochs / (n_examples * planned epochs); 0 before any."""
        if not self.history_:
            return 0.0
        return sum(h["n_pruned"] for h in self.history_) / (self.n_examples * len(self.history_))

    # ----------------------------------------------------------------------------- resuming
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue: the loss table, the current epoch and its plan.

        Plain tensors, numbers and lists only, so ``torch.load(..., weights_only=True)`` reads it.
        """
        return {
            "n_examples": self.n_examples, "epochs": self.epochs, "prune_ratio": self.prune_ratio,
            "delta": self.delta, "seed": self.seed,
            "losses": torch.from_numpy(self.losses_.copy()),
            "epoch": -1 if self.epoch is None else self.epoch,
            "order": None if self._order is None else torch.from_numpy(self._order.copy()),
            "weights": None if self._weights is None else torch.from_numpy(self._weights.copy()),
            "history": [dict(h) for h in self.history_],
        }

    def load_state_dict(self, state: dict[str, Any]) -> InfoBatch:
        """Restore :meth:`state_dict`. Its configuration must match this object's (not the sharding:
        a run may resume on another number of processes). A state saved before the rename of
        ``num_epochs`` to ``epochs`` (its key ``"num_epochs"``) loads too."""
        if isinstance(state, dict) and "num_epochs" in state:  # saved by the release before #14
            old = state["num_epochs"]
            if "epochs" in state and state["epochs"] != old:
                raise InvalidParameterError(
                    f"The 'state' parameter of {_OWNER}.load_state_dict holds both 'epochs' ({state['epochs']!r:.40}) "
                    f"and its old name 'num_epochs' ({old!r:.40}) with different values."
                )
            state = {**{k: v for k, v in state.items() if k != "num_epochs"}, "epochs": old}
        if not isinstance(state, dict) or not {*_CONFIG_KEYS, "losses", "epoch", "order", "weights",
                                                "history"} <= set(state):
            raise InvalidParameterError(
                f"The 'state' parameter of {_OWNER}.load_state_dict must be a dict from state_dict(). "
                f"Got {type(state).__name__} instead."
            )
        where = f"The 'state' parameter of {_OWNER}.load_state_dict"
        for key in _CONFIG_KEYS:
            value = state[key]
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or value != getattr(self, key):
                raise InvalidParameterError(
                    f"{where} was saved with {key}={value!r:.80}, but this object has {key}={getattr(self, key)!r}."
                )
        n = self.n_examples

        def vector(key: str, dtype: torch.dtype) -> np.ndarray:
            value = state[key]
            if not isinstance(value, (torch.Tensor, np.ndarray, list, tuple)):
                raise InvalidParameterError(f"{where} must hold {key!r} as a tensor. Got {type(value).__name__}.")
            try:
                arr = torch.as_tensor(value).detach().cpu()
            except (TypeError, ValueError, RuntimeError):
                raise InvalidParameterError(f"{where} must hold {key!r} as a numeric tensor. Got {value!r:.80}.") from None
            if arr.dtype == torch.bool or arr.is_complex() or (dtype == torch.int64 and arr.is_floating_point()):
                raise InvalidParameterError(f"{where} must hold {key!r} of dtype {dtype}. Got {arr.dtype}.")
            return arr.to(dtype).numpy().copy()

        losses = vector("losses", torch.float64)
        if losses.shape != (n,):
            raise InvalidParameterError(f"{where} must hold {n} losses. Got shape {losses.shape}.")
        if np.isinf(losses).any():  # NaN means "never recorded"
            raise InvalidParameterError(f"{where} must hold finite losses (NaN: not recorded yet).")
        epoch = state["epoch"]
        if not isinstance(epoch, numbers.Integral) or isinstance(epoch, bool) or not -1 <= epoch < self.epochs:
            raise InvalidParameterError(f"{where} holds an invalid epoch {epoch!r:.80}.")
        order = weights = None
        if (state["order"] is None) != (state["weights"] is None) or (epoch < 0) != (state["order"] is None):
            raise InvalidParameterError(
                f"{where} must hold an epoch's 'order' and 'weights' together, and only once an epoch is set. Got "
                f"epoch={epoch}, order {'None' if state['order'] is None else 'set'}, weights "
                f"{'None' if state['weights'] is None else 'set'}."
            )
        if state["order"] is not None:
            order = vector("order", torch.int64)
            if order.ndim != 1 or order.size > n or (order.size and (order.min() < 0 or order.max() >= n)) \
                    or np.unique(order).size != order.size:
                raise InvalidParameterError(
                    f"{where} must hold 'order' as at most {n} distinct indices in [0, {n - 1}]. Got shape "
                    f"{order.shape}."
                )
            weights = vector("weights", torch.float64)
            if weights.shape != (n,) or not np.isfinite(weights).all() or (weights <= 0).any():
                raise InvalidParameterError(f"{where} must hold {n} finite positive 'weights'. Got shape {weights.shape}.")
        history = state["history"]
        if not isinstance(history, (list, tuple)) or not all(isinstance(h, dict) for h in history):
            raise InvalidParameterError(f"{where} must hold 'history' as a list of dicts. Got {history!r:.80}.")
        if not all(isinstance(h.get("n_pruned"), numbers.Integral) and isinstance(h.get("epoch"), numbers.Integral)
                   for h in history):
            raise InvalidParameterError(f"{where} must hold an int 'epoch' and 'n_pruned' in every 'history' entry.")
        self.losses_ = losses
        self.epoch = None if epoch < 0 else int(epoch)
        self._order = order
        self._weights = weights
        self.history_ = [dict(h) for h in history]
        return self  # as every other load_state_dict/fit of leanscale

    def __repr__(self) -> str:
        return (f"{_OWNER}(n_examples={self.n_examples}, epochs={self.epochs}, "
                f"prune_ratio={self.prune_ratio}, delta={self.delta}, seed={self.seed}, "
                f"rank={self.rank}, world_size={self.world_size}, drop_last={self.drop_last})")
