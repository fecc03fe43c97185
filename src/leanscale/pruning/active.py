"""Pool-based active learning: label the examples the current model is least sure about.

**The loop** (Settles 2009, "Active Learning Literature Survey", Univ. of Wisconsin TR 1648).
A pool of unlabelled examples ``X_pool`` and an *oracle* that labels any of them on request.
Start with ``initial_size`` examples drawn uniformly at random (seeded; with no labels there is
nothing to stratify on), then repeat: fit the model on the labelled set, score the unlabelled
examples, ask the oracle for the ``batch_size`` best, add them. :meth:`ActiveLearner.run` does
this until ``budget`` labels have been spent (at most the pool size) and records the accuracy on
a held-out set after each fit in ``history_``.

**Strategies** (the scores come from :func:`leanscale.pruning.scores.uncertainty_scores`,
higher = more uncertain):

- ``"margin"``: smallest gap between the two most probable classes (Scheffer, Decomain &
  Wrobel 2001, "Active hidden Markov models for information extraction").
- ``"entropy"``: largest predictive entropy; ``"least_confidence"``: smallest top probability
  (Lewis & Gale 1994, "A sequential algorithm for training text classifiers", arXiv cmp-lg/9407020).
- ``"random"``: uniform sampling, the baseline every strategy must beat.
- ``"diversity"``: uncertainty *and* diversity, as in Zhdanov 2019, "Diverse mini-batch Active
  Learning" (arXiv 1901.05954) and Citovsky et al. 2021, "Batch Active Learning at Scale"
  (Cluster-Margin, arXiv 2107.14263): take the ``diversity_pool * batch_size`` unlabelled
  examples with the smallest margins, cluster them with k-means (``k = batch_size``, in the space
  of ``X_pool`` flattened to rows), and query, from each cluster, the member nearest its centroid.
  A batch of pure top-margin picks is often redundant (many near-copies near one stretch of the
  boundary); the clustering spreads the batch along the boundary.

Ties in the scores go to the lower pool index (stable sort), k-means is seeded, and the random
draws use ``numpy.random.default_rng([seed, n_labels])``: the whole loop is a deterministic
function of its inputs, which is what makes :meth:`ActiveLearner.state_dict` enough to resume it.

**Classes not seen yet.** The model is fitted on the labels seen so far, so its probability
columns cover only those classes (``SoftmaxRegression.classes_``), and a class that was never
labelled is never predicted. Accuracy maps each prediction through the model's classes, so it is
computed correctly (an unseen class counts as an error). The columns of a model's
``predict_proba`` are taken to be its ``classes_`` when it has them; otherwise the sorted labels
seen so far when the counts agree; otherwise (a network with a fixed output size ``k`` and integer
labels) the classes ``0..k-1``. While fewer than 2 classes have been labelled no uncertainty exists:
the query falls back to random sampling and the "model" predicts the one class seen.

Example:
    >>> import numpy as np
    >>> from leanscale.models.linear import SoftmaxRegression
    >>> rng = np.random.default_rng(0)
    >>> X = rng.uniform(-1, 1, size=(500, 2))
    >>> y = (X[:, 0] > 0.3).astype(int)
    >>> learner = ActiveLearner(SoftmaxRegression(C=100.0), batch_size=5, initial_size=10)
    >>> learner = learner.run(X, y, budget=30, X_eval=X, y_eval=y)
    >>> [h["n_labels"] for h in learner.history_]
    [10, 15, 20, 25, 30]
    >>> learner.history_[-1]["accuracy"] > 0.97
    True
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch

from leanscale.core.errors import InvalidParameterError, NotFittedError
from leanscale.core.estimator import Estimator
from leanscale.core.validation import (
    Interval,
    check_consistent_length,
    check_labels,
    check_param,
    unknown_name_error,
)
from leanscale.pruning._train import check_finite
from leanscale.pruning.kmeans import KMeans
from leanscale.pruning.scores import uncertainty_scores

__all__ = ["STRATEGIES", "ActiveLearner"]

STRATEGIES = ("random", "margin", "entropy", "least_confidence", "diversity")
_OWNER = "ActiveLearner"
_STATE_KEYS = ("labeled_indices", "labels", "history", "n_pool")


class ActiveLearner(Estimator):
    """Pool-based, batch-mode active learning with uncertainty and diversity strategies.

    Args:
        model: an estimator *instance* with ``fit(X, y)`` and ``predict_proba(X)`` (for example
            :class:`leanscale.models.linear.SoftmaxRegression`; it is refitted in place), or a
            function ``train_fn(X_labeled, y_labeled) -> predict_proba`` that trains a model (a
            torch network, say) and returns a callable mapping examples to probabilities (n, k).
            ``X_labeled`` is ``X_pool`` indexed by the labelled positions (a numpy array, a torch
            tensor, or a list for other sequences such as texts); ``y_labeled`` a numpy array.
        strategy: one of :data:`STRATEGIES` (see the module docstring).
        batch_size: examples queried per round (>= 1).
        initial_size: examples drawn at random before the first fit (>= 1).
        seed: seed of the random draws and of k-means (>= 0).
        diversity_pool: for ``"diversity"``, how many times ``batch_size`` top-margin candidates
            are clustered (>= 1).

    Attributes (after the first :meth:`teach` or :meth:`run`):
        labeled_indices_: int64 array of the labelled pool positions, in the order labelled.
        labels_: their labels, aligned with ``labeled_indices_``.
        history_: one dict per fit in :meth:`run`: ``round``, ``n_labels``, ``n_classes_seen``,
            ``accuracy`` (on ``(X_eval, y_eval)``; None without them).
        classes_: the classes the current model predicts (see "Classes not seen yet").
    """

    _parameter_constraints: ClassVar[dict] = {
        "batch_size": [Interval(int, 1, None)],
        "initial_size": [Interval(int, 1, None)],
        "seed": [Interval(int, 0, None)],
        "diversity_pool": [Interval(int, 1, None)],
    }

    def __init__(
        self,
        model: Any,
        *,
        strategy: str = "margin",
        batch_size: int = 100,
        initial_size: int = 100,
        seed: int = 0,
        diversity_pool: int = 10,
    ):
        self.model = model
        self.strategy = strategy
        self.batch_size = batch_size
        self.initial_size = initial_size
        self.seed = seed
        self.diversity_pool = diversity_pool

    # ------------------------------------------------------------------------------ validation
    def _validate(self) -> None:
        self._validate_params()
        if not isinstance(self.strategy, str) or self.strategy not in STRATEGIES:
            raise unknown_name_error("strategy", self.strategy, STRATEGIES, owner=_OWNER)
        model = self.model
        if isinstance(model, type):
            raise InvalidParameterError(
                f"The 'model' parameter of {_OWNER} must be an instance, not the class {model.__name__}: "
                f"pass {model.__name__}(...)."
            )
        if not (self._is_estimator() or callable(model)):
            raise InvalidParameterError(
                f"The 'model' parameter of {_OWNER} must be an estimator with fit(X, y) and "
                f"predict_proba(X), or a function train_fn(X_labeled, y_labeled) returning a "
                f"predict_proba callable. Got {type(model).__name__} instead."
            )

    def _is_estimator(self) -> bool:
        return hasattr(self.model, "fit") and hasattr(self.model, "predict_proba")

    # ----------------------------------------------------------------------------------- state
    def _ensure_state(self) -> None:
        if not hasattr(self, "labeled_indices_"):
            self.labeled_indices_ = np.empty(0, dtype=np.int64)
            self.labels_ = np.empty(0)
            self.history_ = []
            self.n_pool_ = None
            self._version = 0
            self._checked_pool = None
            self._fitted = None  # (version, predict_proba callable or None, classes)

    def _check_pool(self, X_pool, where: str) -> int:
        try:
            n = len(X_pool)
        except TypeError:
            raise InvalidParameterError(
                f"The 'X_pool' parameter of {_OWNER}.{where} must be an array, tensor or sequence of "
                f"examples. Got {type(X_pool).__name__} instead."
            ) from None
        if n == 0:
            raise InvalidParameterError(f"The 'X_pool' parameter of {_OWNER}.{where} must not be empty.")
        if self._checked_pool is not X_pool:  # once per pool object: run() queries it every round
            check_finite(X_pool, "X_pool", f"{_OWNER}.{where}")
            self._checked_pool = X_pool
        if self.n_pool_ is not None and n != self.n_pool_:
            raise InvalidParameterError(
                f"The 'X_pool' parameter of {_OWNER}.{where} must be the pool the labels refer to, with "
                f"{self.n_pool_} examples. Got {n}."
            )
        if self.labeled_indices_.size and int(self.labeled_indices_.max()) >= n:
            raise InvalidParameterError(
                f"The 'X_pool' parameter of {_OWNER}.{where} has {n} examples, but labelled index "
                f"{int(self.labeled_indices_.max())} was taught."
            )
        self.n_pool_ = n
        return n

    def state_dict(self) -> dict:
        """The labelled indices, their labels and the history: JSON-serialisable, for resuming."""
        self._ensure_state()
        return {
            "labeled_indices": self.labeled_indices_.tolist(),
            "labels": self.labels_.tolist(),
            "history": copy.deepcopy(self.history_),
            "n_pool": self.n_pool_,
            "params": {k: v for k, v in self.get_params().items() if k != "model"},
        }

    def load_state_dict(self, state: dict) -> ActiveLearner:
        """Restore what :meth:`state_dict` saved; :meth:`run` then continues where it stopped."""
        if not isinstance(state, dict) or any(k not in state for k in _STATE_KEYS):
            got = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
            raise InvalidParameterError(
                f"The 'state' parameter of {_OWNER}.load_state_dict must be a dict with keys "
                f"{', '.join(map(repr, _STATE_KEYS))} (from state_dict()). Got {got!r}."
            )
        where = f"The 'state' parameter of {_OWNER}.load_state_dict"
        raw_idx = state["labeled_indices"]
        try:
            idx_arr = np.asarray(raw_idx.detach().cpu().numpy() if isinstance(raw_idx, torch.Tensor) else raw_idx)
        except (TypeError, ValueError):
            idx_arr = np.asarray([None])
        if idx_arr.ndim != 1 or (idx_arr.size and idx_arr.dtype.kind not in "iu"):
            raise InvalidParameterError(f"{where} must hold 'labeled_indices' as a list of ints. Got {raw_idx!r:.80}.")
        indices = idx_arr.astype(np.int64).reshape(-1)
        try:
            labels = np.asarray(state["labels"])
        except (TypeError, ValueError):
            labels = np.asarray([[None]])
        if labels.ndim != 1 or labels.dtype.kind not in "iuUfb" or (labels.dtype.kind == "f" and not
                                                                    np.isfinite(labels).all()):
            raise InvalidParameterError(
                f"{where} must hold 'labels' as a flat list of ints or strings. Got {state['labels']!r:.80}."
            )
        n_pool = state["n_pool"]
        if n_pool is not None and (not isinstance(n_pool, int) or isinstance(n_pool, bool) or n_pool < 1):
            raise InvalidParameterError(f"{where} must hold 'n_pool' as a positive int or None. Got {n_pool!r:.80}.")
        if indices.size and (indices.min() < 0 or (n_pool is not None and indices.max() >= n_pool)
                             or np.unique(indices).size != indices.size):
            raise InvalidParameterError(
                f"{where} must hold distinct 'labeled_indices' in [0, n_pool={n_pool}). Got min {int(indices.min())}, "
                f"max {int(indices.max())}, {indices.size - np.unique(indices).size} repeated."
            )
        history = state["history"]
        if not isinstance(history, list) or not all(
                isinstance(h, dict) and isinstance(h.get("n_labels"), int) and isinstance(h.get("round"), int)
                and (h.get("accuracy") is None or isinstance(h.get("accuracy"), (int, float)))
                for h in history):
            raise InvalidParameterError(
                f"{where} must hold 'history' as a list of dicts with 'round', 'n_labels' and 'accuracy'. "
                f"Got {history!r:.80}."
            )
        self._ensure_state()
        self.labeled_indices_ = indices
        self.labels_ = labels
        self.history_ = copy.deepcopy(list(history))
        self.n_pool_ = None if n_pool is None else int(n_pool)
        self._version += 1
        self._fitted = None
        return self

    # ----------------------------------------------------------------------------------- teach
    def teach(self, indices, y) -> ActiveLearner:
        """Add the labels ``y`` of the pool examples at ``indices`` to the labelled set.

        Raises:
            InvalidParameterError: indices that are not integers, negative, beyond the pool,
                repeated or already labelled; ``y`` of another length.
        """
        self._ensure_state()
        owner = f"{_OWNER}.teach"
        idx = _as_index_array(indices, "indices", owner)
        y = _as_label_array(y, "y", owner)
        check_consistent_length(owner=owner, indices=idx, y=y)
        if idx.size == 0:
            return self
        if idx.min() < 0 or (self.n_pool_ is not None and idx.max() >= self.n_pool_):
            bad = int(idx[(idx < 0) | (idx >= (self.n_pool_ or np.iinfo(np.int64).max))][0])
            raise InvalidParameterError(
                f"The 'indices' parameter of {owner} must be positions in the pool "
                f"[0, {self.n_pool_ if self.n_pool_ is not None else 'n'}). Got {bad}."
            )
        uniq, counts = np.unique(idx, return_counts=True)
        if (counts > 1).any():
            raise InvalidParameterError(
                f"The 'indices' parameter of {owner} must not repeat an index. Got {int(uniq[counts > 1][0])} "
                f"{int(counts.max())} times."
            )
        again = np.intersect1d(idx, self.labeled_indices_)
        if again.size:
            raise InvalidParameterError(
                f"The 'indices' parameter of {owner} must not contain labelled examples. Got {again.size} "
                f"already labelled, e.g. {int(again[0])}."
            )
        self.labeled_indices_ = np.concatenate([self.labeled_indices_, idx])
        self.labels_ = y.copy() if self.labels_.size == 0 else np.concatenate([self.labels_, y])
        self._version += 1
        return self

    # ------------------------------------------------------------------------------------- fit
    def _fit(self, X_pool) -> tuple[Callable | None, np.ndarray]:
        """Fit the model on the labelled set (once per labelled set); return (proba_fn, classes).

        ``proba_fn`` is None while fewer than 2 classes are labelled; ``classes`` are the seen ones
        until the column mapping is known (it is resolved on the first probabilities).
        """
        if self._fitted is not None and self._fitted[0] == self._version:
            return self._fitted[1], self._fitted[2]
        seen = np.unique(self.labels_)
        if seen.size < 2:
            proba_fn, classes = None, seen
        else:
            x_lab = _take(X_pool, self.labeled_indices_)
            if self._is_estimator():
                self.model.fit(x_lab, self.labels_)
                proba_fn = self.model.predict_proba
                classes = getattr(self.model, "classes_", None)
            else:
                proba_fn = self.model(x_lab, self.labels_)
                if not callable(proba_fn):
                    raise InvalidParameterError(
                        f"The 'model' parameter of {_OWNER} is a train_fn, so it must return a predict_proba "
                        f"callable. It returned {type(proba_fn).__name__}."
                    )
                classes = getattr(proba_fn, "classes_", None)
            classes = seen if classes is None else np.asarray(classes)
        self._fitted = (self._version, proba_fn, classes)
        self.classes_ = classes
        return proba_fn, classes

    def _proba(self, proba_fn: Callable, X, n_rows: int) -> np.ndarray:
        probs = proba_fn(X)
        if isinstance(probs, torch.Tensor):
            probs = probs.detach().cpu().to(torch.float64).numpy()
        probs = np.asarray(probs, dtype=np.float64)
        if probs.ndim != 2 or probs.shape[0] != n_rows:
            raise InvalidParameterError(
                f"The 'model' parameter of {_OWNER} must give probabilities of shape ({n_rows}, k). "
                f"Its predict_proba returned shape {probs.shape}."
            )
        classes = self._fitted[2]
        if classes.size != probs.shape[1]:
            classes = self._resolve_columns(probs.shape[1])
            self._fitted = (self._fitted[0], self._fitted[1], classes)
            self.classes_ = classes
        return probs

    def _resolve_columns(self, n_cols: int) -> np.ndarray:
        seen = np.unique(self.labels_)
        if (np.issubdtype(seen.dtype, np.integer) and seen.min() >= 0 and seen.max() < n_cols):
            return np.arange(n_cols, dtype=seen.dtype)
        raise InvalidParameterError(
            f"The 'model' parameter of {_OWNER} returned probabilities with {n_cols} columns, but "
            f"{seen.size} classes are labelled ({seen.tolist()!r}): the columns must follow classes_, "
            f"the sorted labels seen, or the integer classes 0..k-1."
        )

    def predict(self, X) -> np.ndarray:
        """Predictions of the model fitted on the current labelled set, mapped through ``classes_``."""
        if not hasattr(self, "_fitted") or self._fitted is None or self._fitted[0] != self._version:
            raise NotFittedError(
                f"This {_OWNER} instance has no model fitted on its current labels: call run or query first."
            )
        proba_fn, classes = self._fitted[1], self._fitted[2]
        n = len(X)
        if proba_fn is None:  # one class labelled: predict it everywhere
            return np.repeat(classes[:1], n)
        probs = self._proba(proba_fn, X, n)
        return self._fitted[2][np.argmax(probs, axis=1)]

    # ----------------------------------------------------------------------------------- query
    def query(self, X_pool, n: int | None = None) -> np.ndarray:
        """Indices (int64) of ``n`` unlabelled pool examples to label next, most useful first.

        Before any label: ``initial_size`` (or ``n``) examples at random. Otherwise the model is
        fitted on the labelled set (if it changed) and ``n`` (default ``batch_size``) examples are
        chosen by the strategy. Fewer are returned when fewer are unlabelled. Nothing is marked as
        labelled until :meth:`teach`.
        """
        self._validate()
        self._ensure_state()
        n_pool = self._check_pool(X_pool, "query")
        n_labeled = self.labeled_indices_.size
        if n is not None:
            check_param("n", n, [Interval(int, 1, None)], owner=f"{_OWNER}.query")
        mask = np.ones(n_pool, dtype=bool)
        mask[self.labeled_indices_] = False
        unlabeled = np.flatnonzero(mask)  # (m,) ascending
        if n_labeled == 0:
            n = self.initial_size if n is None else n
        n = min(self.batch_size if n is None else n, unlabeled.size)
        if n == 0:
            return np.empty(0, dtype=np.int64)
        rng = np.random.default_rng([self.seed, n_labeled])
        if n_labeled == 0 or self.strategy == "random":
            return rng.choice(unlabeled, size=n, replace=False).astype(np.int64)
        proba_fn, _ = self._fit(X_pool)
        if proba_fn is None:  # fewer than 2 classes labelled: nothing to be uncertain about
            return rng.choice(unlabeled, size=n, replace=False).astype(np.int64)
        probs = self._proba(proba_fn, _take(X_pool, unlabeled), unlabeled.size)  # (m, k)
        kind = "margin" if self.strategy == "diversity" else self.strategy
        scores = uncertainty_scores(probs, kind=kind)  # (m,), higher = more uncertain
        order = np.argsort(-scores, kind="stable")  # most uncertain first; ties -> lower index
        if self.strategy != "diversity":
            return unlabeled[order[:n]].astype(np.int64)
        return self._diverse(X_pool, unlabeled, order, n)

    def _diverse(self, X_pool, unlabeled: np.ndarray, order: np.ndarray, n: int) -> np.ndarray:
        """Cluster the top ``diversity_pool * n`` candidates into n; the member nearest each centroid."""
        ranked = order[: min(order.size, self.diversity_pool * n)]  # positions in `unlabeled`
        if ranked.size <= n:
            return unlabeled[ranked].astype(np.int64)
        feats = _as_rows(_take(X_pool, unlabeled[ranked]))  # (c, d)
        # torch backend always: the same picks whether or not faiss is installed (resume, tests)
        km = KMeans(n_clusters=n, seed=self.seed, backend="torch").fit(feats)
        dist = np.asarray(km.transform(feats), dtype=np.float64)  # (c, n)
        assign = np.asarray(km.labels_)
        chosen = []  # ranks (positions in `ranked`) of the picks
        for j in range(n):
            members = np.flatnonzero(assign == j)
            if members.size:
                chosen.append(int(members[np.argmin(dist[members, j])]))
        if len(chosen) < n:  # empty clusters: fill with the most uncertain candidates not taken
            taken = set(chosen)
            chosen += [r for r in range(ranked.size) if r not in taken][: n - len(chosen)]
        chosen = np.sort(np.asarray(chosen, dtype=np.int64))  # most uncertain first
        return unlabeled[ranked[chosen]].astype(np.int64)

    # ------------------------------------------------------------------------------------- run
    def run(
        self,
        X_pool,
        oracle,
        *,
        budget: int,
        X_eval=None,
        y_eval=None,
        on_round: Callable[[ActiveLearner], None] | None = None,
        progress_bar: bool = False,
    ) -> ActiveLearner:
        """Label up to ``budget`` pool examples (including those already labelled); return ``self``.

        Args:
            X_pool: the pool (n, ...).
            oracle: the labels of the whole pool (array of length n), or ``oracle(indices) ->
                labels`` (called once per round with the queried indices).
            budget: total labels (>= 1); capped at the pool size.
            X_eval, y_eval: held-out examples whose accuracy is recorded after each fit.
            on_round: called with the learner after each fit is recorded, e.g. to save
                :meth:`state_dict`; a run resumed from that state continues identically.
            progress_bar: show a progress bar of the labels (rank 0 only), advanced after each
                round's fit, with the accuracy when ``X_eval`` is given.

        Raises:
            InvalidParameterError: a bad parameter, an oracle of the wrong length (or one that
                returns the wrong number of labels), ``X_eval`` without ``y_eval`` or of another
                length.
        """
        self._validate()
        self._ensure_state()
        owner = f"{_OWNER}.run"
        n_pool = self._check_pool(X_pool, "run")
        check_param("budget", budget, [Interval(int, 1, None)], owner=owner)
        if callable(oracle):
            ask = oracle
        else:
            labels_all = _as_label_array(oracle, "oracle", owner)
            if labels_all.shape[0] != n_pool:
                raise InvalidParameterError(
                    f"The 'oracle' parameter of {owner} must hold one label per pool example ({n_pool}). "
                    f"Got {labels_all.shape[0]}."
                )

            def ask(idx):
                return labels_all[idx]

        if (X_eval is None) != (y_eval is None):
            raise InvalidParameterError(
                f"The 'X_eval' and 'y_eval' parameters of {owner} must be given together. Got "
                f"{'X_eval' if y_eval is None else 'y_eval'} only."
            )
        if y_eval is not None:
            y_eval = _as_label_array(y_eval, "y_eval", owner)
            try:
                check_consistent_length(owner=owner, X_eval=X_eval, y_eval=y_eval)
            except TypeError:
                raise InvalidParameterError(
                    f"The 'X_eval' parameter of {owner} must be an array, tensor or sequence of examples. Got "
                    f"{type(X_eval).__name__} instead."
                ) from None
            check_finite(X_eval, "X_eval", owner)
        if on_round is not None and not callable(on_round):
            raise InvalidParameterError(
                f"The 'on_round' parameter of {owner} must be a callable or None. Got {type(on_round).__name__}."
            )
        check_param("progress_bar", progress_bar, [bool], owner=owner)
        target = min(budget, n_pool)
        from leanscale.core.distributed import rank_and_world
        from leanscale.core.progress import progress

        bar = progress(total=target, desc=f"active learning ({self.strategy})", unit="label",
                       disable=None if progress_bar and rank_and_world()[0] == 0 else True)
        if self.labeled_indices_.size:  # resumed
            bar.update(min(self.labeled_indices_.size, target))

        def label(idx: np.ndarray) -> None:
            y = _as_label_array(ask(idx), "oracle", owner)
            if y.shape[0] != idx.size:
                raise InvalidParameterError(
                    f"The 'oracle' parameter of {owner} must return one label per queried index. It "
                    f"returned {y.shape[0]} labels for {idx.size} indices."
                )
            self.teach(idx, y)

        with bar:
            while True:
                n_labeled = self.labeled_indices_.size
                if n_labeled == 0:
                    label(self.query(X_pool, min(self.initial_size, target)))
                    continue
                done = n_labeled >= target
                if not self.history_ or self.history_[-1]["n_labels"] != n_labeled:
                    self._record(X_pool, X_eval, y_eval, fit=done or self.strategy != "random" or X_eval is not None)
                    if self.history_[-1]["accuracy"] is not None:
                        bar.set_postfix(acc=f"{self.history_[-1]['accuracy']:.3f}")
                    bar.update(min(n_labeled, target) - bar.n)
                    if on_round is not None:
                        on_round(self)
                if done:
                    return self
                label(self.query(X_pool, min(self.batch_size, target - n_labeled)))

    def _record(self, X_pool, X_eval, y_eval, *, fit: bool) -> None:
        accuracy = None
        if fit:
            self._fit(X_pool)
            if X_eval is not None:
                accuracy = float(np.mean(self.predict(X_eval) == y_eval))
        self.history_.append({
            "round": len(self.history_),
            "n_labels": int(self.labeled_indices_.size),
            "n_classes_seen": int(np.unique(self.labels_).size),
            "accuracy": accuracy,
        })


# --------------------------------------------------------------------------------- helpers
def _take(X, idx: np.ndarray):
    """Rows ``idx`` of an array, a tensor or any sequence (then a list)."""
    if isinstance(X, torch.Tensor):
        return X[torch.as_tensor(idx, dtype=torch.long, device=X.device)]
    if isinstance(X, np.ndarray):
        return X[idx]
    return [X[int(i)] for i in idx]


def _as_rows(X) -> np.ndarray:
    """Examples as float rows (n, d) for k-means (images are flattened)."""
    if isinstance(X, torch.Tensor):
        X = X.detach().cpu().numpy()
    try:
        arr = np.asarray(X, dtype=np.float32)
    except (TypeError, ValueError):
        raise InvalidParameterError(
            f"The 'X_pool' parameter of {_OWNER} must be numeric for strategy='diversity' (k-means "
            f"runs on its rows). Got {type(X).__name__} of non-numeric examples."
        ) from None
    return arr.reshape(arr.shape[0], -1)


def _as_index_array(value, name: str, owner: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise InvalidParameterError(
            f"The {name!r} parameter of {owner} must be a 1-d array of integer pool positions. Got dtype "
            f"{arr.dtype} and shape {arr.shape}."
        )
    return arr.astype(np.int64)


def _as_label_array(value, name: str, owner: str) -> np.ndarray:
    arr = check_labels(name, value, owner=owner)
    if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise InvalidParameterError(
            f"The {name!r} parameter of {owner} must hold a label for every example. Got {arr[bad]!r} at index {bad}."
        )
    if arr.dtype.kind == "O":
        raise InvalidParameterError(
            f"The {name!r} parameter of {owner} must hold int or str labels. Got objects of types "
            f"{sorted({type(v).__name__ for v in arr.tolist()})}."
        )
    return arr
