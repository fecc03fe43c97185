"""Forgetting events: how often an example goes from correctly to wrongly classified in training.

Toneva, Sordoni, Combes, Trischler, Bengio & Gordon 2019, "An Empirical Study of Example
Forgetting during Deep Neural Network Learning", ICLR, arXiv 1812.05159.

Each time an example is in a training minibatch, record whether the model's prediction in that
forward pass was correct (``acc = 1``) or not. A *forgetting event* is a transition from
``acc = 1`` at the example's previous presentation to ``acc = 0`` at this one. Examples that are
learned once and never forgotten ("unforgettable") can be removed with little loss of accuracy
(the paper drops ~30% of CIFAR-10); examples with many events, and those never learned at all,
are the hard ones. Following the paper, never-learned examples rank above every forgetting count
(they are treated as forgotten infinitely often).

:class:`ForgettingTracker` only needs ``(indices, correct)`` per minibatch, so any training loop
can feed it. Under ``torch.distributed`` every rank passes its own slice of the global batch;
``update`` all-gathers them first, so every rank holds the state one process would hold after
seeing the whole global batch.

Example:
    >>> tracker = ForgettingTracker(3)
    >>> for correct in ([True, False, True], [False, False, True], [True, False, True], [False, False, True]):
    ...     _ = tracker.update([0, 1, 2], correct)
    >>> tracker.counts_.tolist(), tracker.scores().tolist()  # example 1 never learned: max(2) + 1
    ([2, 0, 0], [2.0, 3.0, 0.0])
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from leanscale.core.distributed import rank_and_world
from leanscale.core.errors import InvalidParameterError
from leanscale.core.validation import (
    Interval,
    Options,
    check_array,
    check_consistent_length,
    check_param,
)
from leanscale.train.distributed import all_gather_rows

__all__ = ["ForgettingTracker"]

_OWNER = "ForgettingTracker"
_STATE_KEYS = ("n_examples", "counts", "ever_correct", "n_updates", "last_correct")


def _to_numpy(value: Any) -> Any:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value


def _all_gather_pairs(indices: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's ``(indices, correct)``, concatenated in rank order (slices may differ in size)."""
    # one int64 row per example: column 0 the index, column 1 the correctness (0/1)
    local = np.stack([indices.astype(np.int64, copy=False), correct.astype(np.int64)], axis=1)  # (b, 2)
    rows = all_gather_rows(torch.from_numpy(local)).numpy()  # (global batch, 2)
    return rows[:, 0], rows[:, 1].astype(bool)


class ForgettingTracker:
    """Count forgetting events per example (Toneva et al. 2019) from any training loop.

    Call :meth:`update` after each training step with the examples of the minibatch and whether
    the model classified each correctly *in that training forward pass* (the paper's choice: no
    extra evaluation pass). Then :meth:`scores` ranks the examples: more forgetting = harder.

    Args:
        n_examples: Size of the training set; indices are in ``[0, n_examples)``.

    Attributes:
        counts_: ``(n,)`` int64 forgetting events (correct at the previous update, wrong now).
        ever_correct_: ``(n,)`` bool, classified correctly at least once (learned).
        n_updates_: ``(n,)`` int64 times each example was passed to :meth:`update`.
        last_correct_: ``(n,)`` bool, correctness at the latest update (False before any).

    Example (a training loop; under torchrun each rank passes its own slice)::

        tracker = ForgettingTracker(len(train_set))
        for idx, x, y in loader:                       # idx: (b,) positions in train_set
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            ...
            tracker.update(idx, logits.argmax(1) == y)
        scores = tracker.scores()                      # (n,) float64, higher = harder
    """

    _parameter_constraints: ClassVar[dict] = {
        "n_examples": [Interval(int, 1, None)],
        "never_learned": [Options({"max", "inf"})],
        "allow_unseen": [bool],
    }

    def __init__(self, n_examples: int):
        check_param("n_examples", n_examples, self._parameter_constraints["n_examples"], owner=_OWNER)
        self.n_examples = int(n_examples)
        self.counts_ = np.zeros(self.n_examples, dtype=np.int64)
        self.ever_correct_ = np.zeros(self.n_examples, dtype=bool)
        self.n_updates_ = np.zeros(self.n_examples, dtype=np.int64)
        self.last_correct_ = np.zeros(self.n_examples, dtype=bool)

    def _check_batch(self, indices: Any, correct: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(b,)`` int64 indices and ``(b,)`` bool correctness, shapes and types only."""
        owner = f"{_OWNER}.update"
        idx = check_array("indices", _to_numpy(indices), ndim=1, dtype=None, finite=False, owner=owner)
        if idx.size and (idx.dtype == np.bool_ or not np.issubdtype(idx.dtype, np.integer)):
            raise InvalidParameterError(
                f"The 'indices' parameter of {owner} must be integer example indices. Got dtype {idx.dtype}."
            )
        cor = check_array("correct", _to_numpy(correct), ndim=1, dtype=None, finite=False, owner=owner)
        integer_01 = np.issubdtype(cor.dtype, np.integer) and np.isin(cor, (0, 1)).all()
        if cor.size and cor.dtype != np.bool_ and not integer_01:
            raise InvalidParameterError(
                f"The 'correct' parameter of {owner} must be booleans (prediction == label). Got dtype "
                f"{cor.dtype} with values {np.unique(cor)[:5].tolist()}."
            )
        check_consistent_length(owner, indices=idx, correct=cor)
        return idx.astype(np.int64), cor.astype(bool)

    def update(self, indices: Any, correct: Any) -> ForgettingTracker:
        """Record one minibatch: ``correct[j]`` is whether example ``indices[j]`` was classified
        correctly in this step's training forward pass.

        Under an initialised ``torch.distributed`` process group, every rank must call ``update``
        at the same step (a collective) with its own slice (possibly empty); the slices are
        gathered in rank order first. An index repeated within one update counts as consecutive
        presentations in that order.

        Args:
            indices: ``(b,)`` integer example indices in ``[0, n_examples)`` (array or tensor).
            correct: ``(b,)`` booleans (0/1 integers accepted).

        Returns:
            ``self``.

        Raises:
            InvalidParameterError: not 1-d, wrong types, different lengths, or an index out of
                range (on every rank alike under torch.distributed, as it is checked after the
                gather).
        """
        idx, cor = self._check_batch(indices, correct)
        _, world = rank_and_world()
        if world > 1:
            idx, cor = _all_gather_pairs(idx, cor)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_examples):
            bad = int(np.flatnonzero((idx < 0) | (idx >= self.n_examples))[0])
            raise InvalidParameterError(
                f"The 'indices' parameter of {_OWNER}.update must be in [0, {self.n_examples}) "
                f"(n_examples={self.n_examples}). Got {int(idx[bad])} at position {bad}"
                + (" of the batch gathered from all ranks." if world > 1 else ".")
            )
        if len(np.unique(idx)) == len(idx):
            self._apply(idx, cor)
        else:  # repeated indices: one presentation at a time, in order
            for i, c in zip(idx, cor):
                self._apply(np.array([i]), np.array([c]))
        return self

    def _apply(self, idx: np.ndarray, cor: np.ndarray) -> None:
        # idx: (b,) distinct indices, cor: (b,) bool
        forgot = self.last_correct_[idx] & ~cor  # correct last time, wrong now
        self.counts_[idx] += forgot
        self.ever_correct_[idx] |= cor
        self.last_correct_[idx] = cor
        self.n_updates_[idx] += 1

    def scores(self, never_learned: str = "max", *, allow_unseen: bool = False) -> np.ndarray:
        """Forgetting scores: the event counts, never-learned examples ranked above all.

        Args:
            never_learned: Score of examples seen but never classified correctly:
                ``"max"``: ``max(counts_) + 1`` (finite, sorts above every learned example);
                ``"inf"``: ``np.inf`` (the paper's convention).
            allow_unseen: Score examples never passed to :meth:`update` as 0 instead of raising.

        Returns:
            ``(n,)`` float64, higher = forgotten more often = harder.

        Raises:
            InvalidParameterError: some examples were never seen and ``allow_unseen`` is False;
                bad ``never_learned``.
        """
        owner = f"{_OWNER}.scores"
        check_param("never_learned", never_learned, self._parameter_constraints["never_learned"], owner=owner)
        check_param("allow_unseen", allow_unseen, self._parameter_constraints["allow_unseen"], owner=owner)
        seen = self.n_updates_ > 0  # (n,)
        if not allow_unseen and not seen.all():
            unseen = np.flatnonzero(~seen)
            raise InvalidParameterError(
                f"The 'allow_unseen' parameter of {owner} must be True to score examples that were never "
                f"passed to update: {len(unseen)} of {self.n_examples} were not (first: "
                f"{unseen[:5].tolist()}). Got allow_unseen=False."
            )
        out = self.counts_.astype(np.float64)  # (n,); unseen examples have count 0
        never = seen & ~self.ever_correct_
        out[never] = np.inf if never_learned == "inf" else float(self.counts_.max()) + 1.0
        return out

    def state_dict(self) -> dict:
        """Everything needed to resume, as plain Python values (``torch.save`` or JSON-able)."""
        return {
            "n_examples": self.n_examples,
            "counts": self.counts_.tolist(),
            "ever_correct": self.ever_correct_.tolist(),
            "n_updates": self.n_updates_.tolist(),
            "last_correct": self.last_correct_.tolist(),
        }

    def load_state_dict(self, state: dict) -> ForgettingTracker:
        """Restore :meth:`state_dict`'s output (lists, arrays or tensors); returns ``self``.

        Raises:
            InvalidParameterError: missing or unknown keys, another ``n_examples``, arrays of the
                wrong length or type, negative counts, or inconsistent state.
        """
        owner = f"{_OWNER}.load_state_dict"
        check_param("state", state, [dict], owner=owner)
        if set(state) != set(_STATE_KEYS):
            missing, unknown = sorted(set(_STATE_KEYS) - set(state)), sorted(set(state) - set(_STATE_KEYS))
            raise InvalidParameterError(
                f"The 'state' parameter of {owner} must have exactly the keys {sorted(_STATE_KEYS)}. "
                f"Got missing {missing} and unknown {unknown} instead."
            )
        n_saved = state["n_examples"]
        if type(n_saved) is not int or n_saved != self.n_examples:
            raise InvalidParameterError(
                f"The 'state' parameter of {owner} must come from a tracker of n_examples={self.n_examples}. "
                f"Got n_examples={state['n_examples']!r}."
            )
        arrays = {}
        for key in _STATE_KEYS[1:]:
            try:
                arr = check_array(f"state[{key!r}]", _to_numpy(state[key]), ndim=1, dtype=None, finite=False,
                                  owner=owner)
            except (TypeError, ValueError) as exc:  # ragged lists and other non-arrays
                if isinstance(exc, InvalidParameterError):
                    raise
                raise InvalidParameterError(
                    f"The 'state[{key!r}]' parameter of {owner} must be a flat list of {self.n_examples} values. "
                    f"Got {state[key]!r:.80}."
                ) from None
            is_bool = key in ("ever_correct", "last_correct")
            ok_type = arr.dtype == np.bool_ if is_bool else np.issubdtype(arr.dtype, np.integer)
            if len(arr) != self.n_examples or not ok_type or (not is_bool and arr.size and arr.min() < 0):
                raise InvalidParameterError(
                    f"The 'state[{key!r}]' parameter of {owner} must be {self.n_examples} "
                    f"{'booleans' if is_bool else 'non-negative integers'}. Got {len(arr)} values of dtype "
                    f"{arr.dtype}."
                )
            arrays[key] = arr.astype(bool if is_bool else np.int64)
        seen = arrays["n_updates"] > 0
        if (arrays["ever_correct"] & ~seen).any() or (arrays["last_correct"] & ~arrays["ever_correct"]).any():
            raise InvalidParameterError(
                f"The 'state' parameter of {owner} must be consistent: an example correct at some update "
                "must have been seen and marked ever_correct. Got a state that violates this."
            )
        self.counts_, self.ever_correct_ = arrays["counts"], arrays["ever_correct"]
        self.n_updates_, self.last_correct_ = arrays["n_updates"], arrays["last_correct"]
        return self
