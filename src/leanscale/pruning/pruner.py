"""DataPruner: score every example, keep a fraction, write what was dropped and why.

Sorscher et al. (2022, arXiv 2206.14486, "Beyond neural scaling laws") prune with a per-example
difficulty score and keep the hard examples when data is abundant, the easy ones when it is
scarce; Paul et al. (2021, arXiv 2107.07075) score with EL2N or GraNd after a few epochs of
training, Toneva et al. (2019, arXiv 1812.05159) with forgetting events. :class:`DataPruner` is
the estimator around the score functions of this package and :func:`~leanscale.pruning.select.select`:
``fit`` computes ``scores_`` and the kept indices, ``transform`` returns those indices,
``write_manifest`` writes scores, kept indices and a JSON manifest (through
:func:`leanscale.core.persistence.write_with_manifest`: versioned, hashed, manifest last), and
:func:`read_pruning_manifest` reads one back, checked. The data is never modified.

Metrics (higher = harder, always):

========================  ======  ===================================================================
metric                    labels  how
========================  ======  ===================================================================
``el2n``                  yes     ``||softmax - onehot(y)||`` of a model trained ``score_epochs``,
                                  mean over ``n_seeds`` initialisations (Paul et al.)
``grand``                 yes     per-example gradient norm of the same early model (Paul et al.)
``forgetting``            yes     forgetting events over a whole ``score_epochs`` run (Toneva et al.)
``margin``, ``entropy``,  yes*    uncertainty of the trained model's (seed-averaged) probabilities;
``least_confidence``              *labels train the scoring model
``prototypes``            no      distance to the nearest k-means centroid of the embeddings
``supervised_prototypes`` yes     distance to the own class's mean embedding
``random``                no      uniform random scores (seeded): the baseline to beat
========================  ======  ===================================================================

Scoring is resumable: with ``out_dir`` set, each finished (metric, seed) result -- and computed
embeddings -- is saved under ``out_dir/state`` (a :class:`~leanscale.core.io.JobState` plus one
``.npy`` per result) and reused by a later ``fit`` with the same data and settings. Under
``torchrun`` the scoring models train with DDP and the scoring passes are sharded over the ranks
(:mod:`leanscale.pruning.distributed`); every rank ends with the same ``scores_``.

Example:
    >>> import numpy as np
    >>> pruner = DataPruner(metric="random", keep=0.5, strategy="hard", seed=0)
    >>> kept = pruner.fit_transform(np.zeros((10, 3)), np.arange(10) % 2)
    >>> len(kept), pruner.strategy_
    (5, 'hard')
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import math
import numbers
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from leanscale.core.distributed import rank_and_world
from leanscale.core.errors import InvalidParameterError, LeanscaleError
from leanscale.core.estimator import Estimator
from leanscale.core.io import (
    JobState,
    atomic_write_bytes,
    inside_folder,
    read_npy,
)
from leanscale.core.persistence import (
    npy_bytes,
    read_manifest,
    verify_recorded_file,
    write_with_manifest,
)
from leanscale.core.validation import (
    InstanceOf,
    Interval,
    Options,
    check_array,
    check_is_fitted,
    check_labels,
    check_param,
    unknown_name_error,
)
from leanscale.pruning import _train
from leanscale.pruning.distributed import map_sharded, shard_indices
from leanscale.pruning.features import FAST_EMBEDDINGS
from leanscale.train.distributed import broadcast_object

__all__ = [
    "DEFAULT_SCORE_EPOCHS",
    "LABEL_METRICS",
    "MANIFEST_FORMAT_VERSION",
    "METRICS",
    "DataPruner",
    "default_model_fn",
    "read_pruning_manifest",
]

METRICS = (
    "el2n", "grand", "forgetting", "margin", "entropy", "least_confidence", "prototypes",
    "supervised_prototypes", "random",
)
_UNCERTAINTY = ("margin", "entropy", "least_confidence")
_TRAINED = ("el2n", "grand", "forgetting", *_UNCERTAINTY)  # need a scoring model trained on (x, y)
LABEL_METRICS = (*_TRAINED, "supervised_prototypes")
_EMBEDDED = ("prototypes", "supervised_prototypes")

# Epochs of the scoring run when score_epochs is None. Paul et al. score EL2N/GraNd after ~10% of
# training (epoch 20 of 200 on CIFAR-10); a small Fashion-MNIST model trains in ~10-20 epochs, so
# 2 epochs is the same fraction. Forgetting needs the learning dynamics of a (short) whole run.
DEFAULT_SCORE_EPOCHS = {"el2n": 2.0, "grand": 2.0, "margin": 2.0, "entropy": 2.0, "least_confidence": 2.0,
                        "forgetting": 5.0}
DEFAULT_CNN_WIDTH = 16  # BNCNN first-stage channels: ~17k parameters, quick on 2 CPU cores
DEFAULT_MLP_HIDDEN = 128  # hidden units of the MLP for flat features
# Examples per forward pass when scoring: on CPUs 256 ran ~1.8x faster than 1024 for the BNCNN
# (activations of a smaller batch stay in cache; measured on 6,000 Fashion-MNIST images, 1 thread).
_EVAL_BATCH = 256

# Version of the manifest.json layout written by DataPruner.write_manifest ("format_version"; a
# manifest without one is version 1). A reader refuses a newer one instead of misreading it.
MANIFEST_FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
_OUTPUT_FILES = ("scores.npy", "kept.npy")

_FITTED = ("scores_", "kept_indices_", "n_examples_", "strategy_", "strategy_reason_", "class_balanced_", "warnings_")


def default_model_fn(x_shape: tuple[int, ...], n_classes: int) -> Callable[[], nn.Module]:
    """The scoring model for inputs of ``x_shape``: a BNCNN for images ``(n, C, H, W)``, an MLP
    (Linear-BN-ReLU-Linear, inputs flattened) otherwise."""
    from leanscale.models.cnn import BNCNN, MLPClassifier

    if len(x_shape) == 4:
        return functools.partial(BNCNN, n_classes=n_classes, in_channels=int(x_shape[1]), width=DEFAULT_CNN_WIDTH)
    return functools.partial(MLPClassifier, math.prod(x_shape[1:]), DEFAULT_MLP_HIDDEN, n_classes)


def _check_model_fn(model_fn: Any) -> None:
    """``model_fn`` must build a NEW module per call: an ``nn.Module`` instance is callable too
    (its forward), so it is refused explicitly instead of failing deep inside training."""
    if isinstance(model_fn, nn.Module):
        raise InvalidParameterError(
            f"The 'model_fn' parameter of DataPruner must be a callable returning a new nn.Module (each "
            f"scoring run trains a fresh model); got an nn.Module instance ({type(model_fn).__name__}) -- pass "
            f"the class or a lambda, e.g. model_fn={type(model_fn).__name__} or model_fn=lambda: "
            f"{type(model_fn).__name__}(...)."
        )


def _fn_name(fn: Any) -> str:
    if isinstance(fn, functools.partial):
        return f"partial({_fn_name(fn.func)}, {fn.args!r}, {sorted(fn.keywords.items())!r})"
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"


def _is_texts(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(t, str) for t in x)


def _numeric_or_none(x: Any) -> np.ndarray | None:
    """``x`` as a float array when it is a nested list of numbers (for the finiteness check)."""
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr


def _span(t: Any, idx: np.ndarray) -> Any:
    # Shards are contiguous: slice (a view) instead of fancy indexing (a copy).
    return t[int(idx[0]):int(idx[-1]) + 1]


def _bar(show: bool, total: int, desc: str, unit: str) -> Any:
    """A progress bar (:func:`leanscale.core.progress.progress`) on rank 0 when ``show``; silent otherwise."""
    from leanscale.core.progress import progress

    return progress(total=total, desc=desc, unit=unit, disable=None if show and rank_and_world()[0] == 0 else True)


def _in_chunks(fn: Callable[[np.ndarray], Any], chunk: int, bar: Any) -> Callable[[np.ndarray], np.ndarray]:
    """``fn`` applied to contiguous chunks of ``chunk`` indices, ``bar`` advanced by each chunk's size.

    ``chunk`` is a multiple of the batch size ``fn`` cuts its input into, so the batches -- and
    the results -- are the ones of one call on all the indices."""

    def chunked(idx: np.ndarray) -> np.ndarray:
        parts = []
        for start in range(0, len(idx), chunk):
            part = idx[start:start + chunk]
            out = fn(part)
            parts.append(out.detach().cpu().numpy() if hasattr(out, "detach") else np.asarray(out))
            bar.update(len(part))
        return np.concatenate(parts)

    return chunked


class _Cache:
    """Per-result ``.npy`` files next to a JobState; rank 0 reads and writes, every rank gets it."""

    def __init__(self, root: Path | None):
        # rank 0 alone writes, and cleans stray .tmp files of a killed run before its first write
        self.state = JobState(root, clean=rank_and_world()[0] == 0) if root is not None else None
        self.hits: list[str] = []

    def get(self, key: str, compute: Callable[[], np.ndarray], rows: int | None = None) -> np.ndarray:
        if self.state is None:
            return compute()
        rank, _ = rank_and_world()
        arr = self._load(key) if rank == 0 else None
        if arr is not None and rows is not None and (arr.ndim == 0 or arr.shape[0] != rows):
            self.state.discard(key, f"The state entry {key!r} holds {arr.shape[0] if arr.ndim else 0} rows, not the "
                                    f"{rows} examples it was computed for.")
            arr = None  # not this data's result (a damaged or edited state): recompute
        if broadcast_object(arr is not None):
            self.hits.append(key)
            return broadcast_object(arr)
        arr = np.asarray(compute())
        if rank == 0:
            path = self.state.root / "arrays" / f"{self.state.path(key).stem}.npy"
            atomic_write_bytes(path, npy_bytes(arr))  # the array first: a saved key implies its file
            self.state.save(key, {"file": str(path.relative_to(self.state.root)), "shape": list(arr.shape),
                                  "dtype": arr.dtype.str})
        return arr

    def _load(self, key: str) -> np.ndarray | None:
        """The saved array of ``key``, or None when absent or damaged (it is then recomputed).

        The state is untrusted: the array's file must lie inside the state folder, be a plain
        ``.npy`` (no pickle) whose size matches its header, with the recorded shape and dtype and
        finite values. A damaged entry is moved aside with a warning (JobState.discard)."""
        if not self.state.is_done(key):  # a damaged task file is moved aside by JobState
            return None
        try:
            meta = self.state.load(key)
        except LeanscaleError:
            return None
        if not isinstance(meta, dict) or not isinstance(meta.get("shape"), list) or not isinstance(
                meta.get("dtype"), str):
            self.state.discard(key, f"The state entry {key!r} must record the array's 'file', 'shape' and 'dtype'. "
                                    f"Got {meta!r:.120}.")
            return None
        try:
            path = inside_folder(self.state.root, meta.get("file"), what="state array file")
            arr = read_npy(path, what="state array file")
        except LeanscaleError as exc:
            self.state.discard(key, str(exc))
            return None
        if list(arr.shape) != meta["shape"] or arr.dtype.str != meta["dtype"] or arr.dtype.kind not in "fiu" \
                or not np.isfinite(arr).all():
            self.state.discard(key, f"The state array file {str(path)!r} must hold finite numbers of the recorded "
                                    f"shape {meta['shape']} and dtype {meta['dtype']}. Got {arr.dtype.str} {arr.shape}.")
            return None
        return arr


class DataPruner(Estimator):
    """Score examples with ``metric`` and keep ``keep`` of them, as a scikit-learn estimator.

    Args:
        metric: One of :data:`METRICS` (see the module docstring).
        keep: Fraction in ``(0, 1]`` (float) or number ``>= 1`` (int) of examples to keep.
        strategy: ``"hard"`` keeps the highest scores, ``"easy"`` the lowest, ``"random"``
            ignores them, ``"auto"`` applies Sorscher et al.'s rule
            (:func:`~leanscale.pruning.select.resolve_strategy`: hard when at least the fraction
            :data:`~leanscale.pruning.select.AUTO_MIN_FRACTION` of the scored examples is kept,
            easy otherwise).
        class_balance: With labels, every class keeps the same fraction.
        model_fn: Returns a fresh ``nn.Module`` (logits) for the training-based metrics; default
            :func:`default_model_fn` (BNCNN for 4-d images, an MLP otherwise) sized from the data.
        score_epochs: Epochs of each scoring run (fractional allowed); None: the metric's
            :data:`DEFAULT_SCORE_EPOCHS`. Forgetting needs at least 1 (every example seen).
        n_seeds: Scoring runs from different initialisations, averaged (Paul et al. used 10).
        embedding: For the prototype metrics: an array ``(n, d)``; a callable applied batch-wise
            (:func:`~leanscale.models.encoders.embed_with`); or None: a self-supervised encoder
            trained on 4-d images (:func:`~leanscale.pruning.embed.train_ssl_encoder`, embedded
            with :func:`~leanscale.models.encoders.embed_images`), MiniLM
            (:func:`~leanscale.models.encoders.embed_texts`) for a list of texts, the rows of ``x``
            themselves for 2-d features; or ``"pca"`` / ``"random-projection"``: a training-free
            embedding of the flattened ``x`` (:func:`~leanscale.pruning.features.fast_embedding`,
            32 dimensions, seeded with ``seed``), a small fraction of the SimCLR encoder's cost.
        n_clusters: k-means clusters of ``"prototypes"``; None: the number of classes of ``y``.
        out_dir: Folder of the resumable scoring state (``out_dir/state``) and the default of
            :meth:`write_manifest`; None: nothing is written.
        seed: Seed of everything random (seed ``s`` of ``n_seeds`` uses ``seed + s``).
        batch_size: Global batch size of the scoring runs.
        lr: Peak learning rate of the scoring runs (SGD, momentum 0.9, cosine decay).

    Learned attributes: ``scores_`` (n,) float64, ``kept_indices_`` (sorted int64),
    ``n_examples_``, ``strategy_`` (the resolved "hard"/"easy"/"random") and
    ``strategy_reason_``, ``metric_`` ("given" for precomputed scores), ``classes_`` and
    ``labels_`` (class index per example; None without y), ``score_epochs_``, ``n_clusters_``,
    ``scoring_seconds_``, ``reused_`` (state keys loaded instead of computed).
    """

    _parameter_constraints: ClassVar[dict] = {
        "metric": [Options(METRICS)],
        "keep": [Interval(int, 1, None), Interval(float, 0, 1, closed="right")],
        "strategy": [Options(("hard", "easy", "random", "auto"))],
        "class_balance": [bool],
        "model_fn": [None, callable],
        "score_epochs": [None, Interval(float, 0, None, closed="neither")],
        "n_seeds": [Interval(int, 1, None)],
        "embedding": [None, callable, InstanceOf(np.ndarray, torch.Tensor, description="an array (n, d)"),
                      Options(FAST_EMBEDDINGS)],
        "n_clusters": [None, Interval(int, 1, None)],
        "out_dir": [None, str, os.PathLike],
        "seed": [Interval(int, 0, None)],
        "batch_size": [Interval(int, 1, None)],
        "lr": [Interval(float, 0, None, closed="neither")],
    }

    def __init__(
        self,
        metric: str = "el2n",
        keep: float = 0.5,
        strategy: str = "auto",
        class_balance: bool = True,
        model_fn: Callable[[], nn.Module] | None = None,
        score_epochs: float | None = None,
        n_seeds: int = 1,
        embedding: Any = None,
        n_clusters: int | None = None,
        out_dir: str | os.PathLike | None = None,
        seed: int = 0,
        batch_size: int = 128,
        lr: float = 0.1,
    ):
        self.metric = metric
        self.keep = keep
        self.strategy = strategy
        self.class_balance = class_balance
        self.model_fn = model_fn
        self.score_epochs = score_epochs
        self.n_seeds = n_seeds
        self.embedding = embedding
        self.n_clusters = n_clusters
        self.out_dir = out_dir
        self.seed = seed
        self.batch_size = batch_size
        self.lr = lr
        _check_model_fn(model_fn)

    def _check_params(self) -> None:
        if not (isinstance(self.metric, str) and self.metric in METRICS):
            raise unknown_name_error("metric", self.metric, METRICS, owner="DataPruner")
        _check_model_fn(self.model_fn)
        self._validate_params()
        if self.out_dir is not None and os.path.exists(self.out_dir) and not os.path.isdir(self.out_dir):
            raise InvalidParameterError(
                f"The 'out_dir' parameter of DataPruner must be a folder (it is created when missing). Got "
                f"{os.fspath(self.out_dir)!r}, which is a file."
            )

    # --- fit / transform -----------------------------------------------------------------------
    def fit(self, x: Any = None, y: Any = None, *, scores: Any = None, progress_bar: bool = False) -> DataPruner:
        """Score every example (or take ``scores``) and choose the kept indices.

        Args:
            x: The examples ``(n, ...)`` (array or tensor; a list of texts for ``"prototypes"``).
                May be None when ``scores`` (or an ``embedding`` array) is given.
            y: Labels ``(n,)`` (any hashable values); required by :data:`LABEL_METRICS`, and used
                for class balance whenever given (the ``"auto"`` rule looks only at the kept
                fraction).
            scores: Precomputed scores ``(n,)`` (higher = harder): nothing is computed.
            progress_bar: show progress bars (rank 0 only) of the scoring: the steps of each
                scoring run and the examples scored (the self-supervised encoder's training always
                shows its own). The scores do not depend on it.

        Returns:
            self

        Raises:
            InvalidParameterError: a bad parameter, ``y`` missing for a label-based metric,
                lengths that do not match, ``keep`` larger than the data.
        """
        from leanscale.pruning.select import (
            AUTO_MIN_FRACTION,
            resolve_strategy,
            select,
        )

        self._check_params()
        check_param("progress_bar", progress_bar, [bool], owner="DataPruner.fit")
        for name in _FITTED:  # a failed refit leaves the estimator unfitted, not half old, half new
            self.__dict__.pop(name, None)
        owner = "DataPruner.fit"
        n = self._n_examples(x, y, scores)
        if y is not None:
            y_arr = check_labels("y", y, owner=owner)  # 1-d, no NaN
            try:
                self.classes_, labels = np.unique(y_arr, return_inverse=True)
            except TypeError:  # e.g. None next to strings
                raise InvalidParameterError(
                    f"The 'y' parameter of {owner} must hold labels of one sortable type (ints or strings). "
                    f"Got a mix: {sorted({type(v).__name__ for v in y_arr.tolist()})}."
                ) from None
            self.labels_ = labels.astype(np.int64).reshape(-1)
        else:
            self.classes_, self.labels_ = None, None
        if scores is None and x is not None and not _is_texts(x):
            _train.check_finite(x if isinstance(x, (np.ndarray, torch.Tensor)) else _numeric_or_none(x), "x", owner)
        if isinstance(self.keep, numbers.Integral) and self.keep > n:
            raise InvalidParameterError(
                f"The 'keep' parameter of DataPruner must be at most the number of examples ({n}) when it "
                f"is a count. Got {self.keep} instead."
            )

        t0 = time.perf_counter()
        self.reused_, self.score_epochs_, self.n_clusters_ = [], None, None
        if scores is not None:
            self.scores_ = check_array("scores", scores, ndim=1, owner=owner).astype(np.float64)
            self.metric_ = "given"
        else:
            if self.metric in LABEL_METRICS and y is None:
                why = "trains the scoring model on the labels" if self.metric in _TRAINED else "needs class labels"
                raise InvalidParameterError(
                    f"The 'y' parameter of {owner} is required for metric {self.metric!r} (it {why}). Got None; "
                    f"use metric 'prototypes' or 'random' without labels."
                )
            self.metric_ = self.metric
            self.scores_ = self._score(x, n, progress_bar)
        self.scoring_seconds_ = time.perf_counter() - t0
        self.n_examples_ = n

        kept = select(self.scores_, self.keep, self.strategy, labels=self.labels_,
                      class_balance=self.class_balance, seed=self.seed)
        # n_total: every scored example (the rule is on the kept fraction, not per class)
        self.strategy_, self.strategy_reason_ = resolve_strategy(self.strategy, len(kept), n, AUTO_MIN_FRACTION)
        self.kept_indices_ = np.asarray(kept, dtype=np.int64)
        # what was done, not what was asked: without labels there are no classes to balance
        self.class_balanced_ = bool(self.class_balance and self.labels_ is not None)
        self.warnings_ = []
        if self.class_balance and self.labels_ is None and len(kept) < n:
            self.warnings_.append(
                "class_balance=True had no effect: no labels (y) were given, so the examples were ranked over "
                "all classes together and a class can be over- or under-pruned. Pass y to balance the classes."
            )
        return self

    def transform(self, x: Any = None) -> np.ndarray:
        """The kept indices (sorted int64); ``x``, when given, must have the fitted length."""
        check_is_fitted(self, _FITTED)
        if x is not None and not hasattr(x, "__len__"):
            raise InvalidParameterError(
                f"The 'x' parameter of DataPruner.transform must be None or array-like with one row per example. "
                f"Got {type(x).__name__} instead."
            )
        if x is not None and len(x) != self.n_examples_:
            raise InvalidParameterError(
                f"The 'x' parameter of DataPruner.transform must have the {self.n_examples_} examples seen "
                f"in fit. Got {len(x)} instead."
            )
        return self.kept_indices_.copy()

    def fit_transform(self, x: Any = None, y: Any = None, *, scores: Any = None,
                      progress_bar: bool = False) -> np.ndarray:
        """``fit(x, y, scores=scores, progress_bar=progress_bar).transform()``."""
        return self.fit(x, y, scores=scores, progress_bar=progress_bar).transform()

    # --- scoring -------------------------------------------------------------------------------
    def _n_examples(self, x: Any, y: Any, scores: Any) -> int:
        owner = "DataPruner.fit"
        lengths = {}
        for name, value in (("x", x), ("y", y), ("scores", scores)):
            if value is not None:
                try:
                    lengths[name] = len(value)
                except TypeError:
                    raise InvalidParameterError(
                        f"The {name!r} parameter of {owner} must be array-like with one row per example. "
                        f"Got {type(value).__name__} instead."
                    ) from None
        if isinstance(self.embedding, (np.ndarray, torch.Tensor)) and self.metric in _EMBEDDED and scores is None:
            lengths["embedding"] = len(self.embedding)
        if x is None and "scores" not in lengths and not (
            "embedding" in lengths or (self.metric == "random" and "y" in lengths)
        ):
            raise InvalidParameterError(
                f"The 'x' parameter of {owner} is required to compute metric {self.metric!r}. Got None."
            )
        if len(set(lengths.values())) > 1:
            desc = ", ".join(f"{k}={v}" for k, v in lengths.items())
            raise InvalidParameterError(
                f"The parameters {', '.join(map(repr, lengths))} of {owner} must have the same length. Got {desc}."
            )
        n = next(iter(lengths.values()))
        if n < 1:
            raise InvalidParameterError(f"The 'x' parameter of {owner} must hold at least one example. Got 0.")
        return n

    def _digest(self, x: Any) -> str:
        """A short fingerprint of the data and labels, so state from other data is never reused."""
        h = hashlib.blake2b(digest_size=8)
        if _is_texts(x):
            for t in x:
                h.update(t.encode("utf-8") + b"\0")
        elif x is not None:
            arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
            h.update(str((arr.shape, arr.dtype.str)).encode())
            h.update(np.ascontiguousarray(arr).tobytes())
        if self.labels_ is not None:
            h.update(self.labels_.tobytes())
        return h.hexdigest()

    def _score(self, x: Any, n: int, show: bool = False) -> np.ndarray:
        metric = self.metric
        if metric == "random":
            return np.random.default_rng(self.seed).random(n)  # (n,) uniform in [0, 1)
        cache = _Cache(Path(self.out_dir) / "state" if self.out_dir is not None else None)
        digest = self._digest(x) if cache.state is not None else ""
        try:
            if metric in _EMBEDDED:
                return self._prototype_scores(x, n, cache, digest)
            return self._trained_scores(x, n, cache, digest, show)
        finally:
            self.reused_ = list(cache.hits)

    def _trained_scores(self, x: Any, n: int, cache: _Cache, digest: str, show: bool = False) -> np.ndarray:
        from leanscale.pruning.scores import (
            collect_probs,
            el2n_scores,
            uncertainty_scores,
        )

        metric, owner = self.metric, "DataPruner"
        epochs = float(self.score_epochs if self.score_epochs is not None else DEFAULT_SCORE_EPOCHS[metric])
        if metric == "forgetting" and epochs < 1:
            raise InvalidParameterError(
                f"The 'score_epochs' parameter of {owner} must be at least 1 for metric 'forgetting' (every "
                f"example must be seen). Got {self.score_epochs!r} instead."
            )
        self.score_epochs_, self.n_clusters_ = epochs, None
        xt = _train.as_float_tensor(x, owner="DataPruner.fit", keep_token_ids=self.model_fn is not None)
        yt = torch.as_tensor(self.labels_).to(xt.device)  # (n,) class indices
        model_fn = self.model_fn or default_model_fn(tuple(xt.shape), len(self.classes_))
        # what determines a scoring run's result: data, model, optimisation (not the metric: el2n and
        # the uncertainty metrics share the probabilities of one run)
        run_id = hashlib.blake2b(
            repr((digest, _fn_name(model_fn), epochs, self.batch_size, self.lr)).encode(), digest_size=6
        ).hexdigest()
        kind = {"el2n": "probs", "grand": "grand", "forgetting": "forgetting"}.get(metric, "probs")

        def run(seed: int) -> np.ndarray:
            tracker = None
            on_batch = None
            # train_scoring_model's number of steps, for the bar
            steps = max(1, round(epochs * max(1, n // self.batch_size)))
            bar = _bar(show, steps, f"{metric}: scoring run, seed {seed}", "step")
            if kind == "forgetting":
                from leanscale.pruning.forgetting import ForgettingTracker

                tracker = ForgettingTracker(n)

                def on_batch(idx, logits, yb):
                    tracker.update(idx.cpu().numpy(), (logits.argmax(1) == yb).cpu().numpy())
                    bar.update(1)
            elif show:
                def on_batch(idx, logits, yb):
                    bar.update(1)

            try:
                model = _train.train_scoring_model(
                    model_fn, xt, yt, epochs=epochs, batch_size=self.batch_size, lr=self.lr, seed=seed,
                    on_batch=on_batch,
                )
            finally:
                bar.close()
            if kind == "forgetting":
                return np.asarray(tracker.scores(never_learned="max"), dtype=np.float64)
            if kind == "grand":
                from leanscale.pruning.grand import grand_scores

                def score(idx):
                    return grand_scores(model, (_span(xt, idx), _span(yt, idx)))  # batches of 256
                what, chunk = "per-example gradients", 8 * 256
            else:
                def score(idx):
                    return collect_probs(model, _span(xt, idx), batch_size=_EVAL_BATCH)  # (b, k)
                what, chunk = "predictions", 32 * _EVAL_BATCH
            if not show:
                return map_sharded(score, n)
            bar = _bar(show, len(shard_indices(n)), f"{metric}: {what}, seed {seed}", "example")  # this rank's
            try:
                return map_sharded(_in_chunks(score, chunk, bar), n)
            finally:
                bar.close()

        per_seed = [
            cache.get(f"{kind}-seed{self.seed + s}-{run_id}", functools.partial(run, self.seed + s), rows=n)
            for s in range(self.n_seeds)
        ]
        if metric == "el2n":
            return np.asarray(el2n_scores(per_seed, self.labels_), dtype=np.float64)
        if metric in _UNCERTAINTY:
            return np.asarray(uncertainty_scores(np.mean(per_seed, axis=0), kind=metric), dtype=np.float64)
        return np.mean(per_seed, axis=0).astype(np.float64)  # grand, forgetting: mean over seeds

    def _embeddings(self, x: Any, n: int, cache: _Cache, digest: str) -> np.ndarray:
        from leanscale.models import encoders

        emb, owner = self.embedding, "DataPruner"
        if isinstance(emb, (np.ndarray, torch.Tensor)):
            arr = emb.detach().cpu().numpy() if isinstance(emb, torch.Tensor) else np.asarray(emb)
            if arr.ndim != 2 or arr.shape[0] != n:
                raise InvalidParameterError(
                    f"The 'embedding' parameter of {owner} must be an array of shape (n_examples={n}, d). "
                    f"Got shape {arr.shape} instead."
                )
            return check_array("embedding", arr, ndim=2, owner=owner)
        if x is None:
            raise InvalidParameterError(
                f"The 'x' parameter of DataPruner.fit is required to embed the examples (embedding={emb!r}). Got None."
            )
        if isinstance(emb, str):  # a training-free embedding of the flattened inputs
            from leanscale.pruning.features import fast_embedding

            if _is_texts(x):
                raise InvalidParameterError(
                    f"The 'embedding' parameter of {owner} must be None (MiniLM), a callable or an array for a "
                    f"list of texts: {emb!r} embeds numeric inputs. Got {emb!r} with {len(x)} texts."
                )
            xt = _train.as_float_tensor(x, owner="DataPruner.fit")
            key = f"embedding-{emb}-seed{self.seed}-{digest}"
            return cache.get(key, lambda: fast_embedding(xt, emb, seed=self.seed), rows=n)
        if callable(emb):
            key = f"embedding-{hashlib.blake2b(repr((digest, _fn_name(emb))).encode(), digest_size=6).hexdigest()}"
            if _is_texts(x):
                return cache.get(key, lambda: encoders.embed_with(emb, list(x)), rows=n)
            return cache.get(key, lambda: map_sharded(lambda idx: encoders.embed_with(emb, _span(x, idx)), n), rows=n)
        if _is_texts(x):
            key = f"embedding-minilm-{digest}"
            return cache.get(key, lambda: encoders.embed_texts(list(x)), rows=n)
        xt = _train.as_float_tensor(x, owner="DataPruner.fit")
        if xt.ndim == 4:
            key = f"embedding-simclr-seed{self.seed}-{digest}"

            def ssl() -> np.ndarray:
                from leanscale.pruning import embed

                encoder = embed.train_ssl_encoder(xt, seed=self.seed)
                return map_sharded(lambda idx: encoders.embed_images(encoder, _span(xt, idx)), n)

            return cache.get(key, ssl, rows=n)
        if xt.ndim == 2:
            return xt.detach().cpu().numpy()  # flat features are their own embedding
        raise InvalidParameterError(
            f"The 'embedding' parameter of {owner} must be given for x of shape {tuple(xt.shape)} (None works "
            f"for images (n, C, H, W), flat features (n, d) and lists of texts). Got None."
        )

    def _prototype_scores(self, x: Any, n: int, cache: _Cache, digest: str) -> np.ndarray:
        from leanscale.pruning.prototypes import prototype_scores

        self.score_epochs_ = None
        emb = self._embeddings(x, n, cache, digest)
        if self.metric == "supervised_prototypes":
            self.n_clusters_ = None
            scores = prototype_scores(emb, labels=self.labels_, metric="cosine", seed=self.seed)
        else:
            k = self.n_clusters
            if k is None:
                if self.classes_ is None:
                    raise InvalidParameterError(
                        "The 'n_clusters' parameter of DataPruner is required for metric 'prototypes' without "
                        "labels y (None means the number of classes). Got None."
                    )
                k = len(self.classes_)
            self.n_clusters_ = int(k)
            scores = prototype_scores(emb, self.n_clusters_, metric="cosine", seed=self.seed)
        return np.asarray(scores, dtype=np.float64)

    # --- output --------------------------------------------------------------------------------
    def write_manifest(self, out_dir: str | os.PathLike | None = None) -> Path:
        """Write ``scores.npy``, ``kept.npy`` and ``manifest.json`` to ``out_dir`` (atomically).

        The manifest says what was kept and dropped, by which metric and why: metric, strategy
        (requested, resolved, the reason), keep, counts (in total and per class), the dropped
        indices, a score summary, the settings, the scoring time, versions and the time of
        writing, the ``"format_version"`` of the layout (:data:`MANIFEST_FORMAT_VERSION`) and the
        SHA-256 of ``scores.npy`` and ``kept.npy`` (``"sha256"``). ``manifest.json`` is written
        last (the commit point), so its presence means the folder is complete, and arrays of an
        interrupted later write are told apart by their hashes (:func:`read_pruning_manifest`).
        Under ``torchrun`` only rank 0 writes. The data itself is never touched.

        Args:
            out_dir: Target folder (created); None: the ``out_dir`` parameter.

        Returns:
            The path of ``manifest.json``.
        """
        import leanscale

        check_is_fitted(self, _FITTED)
        target = out_dir if out_dir is not None else self.out_dir
        check_param("out_dir", target, [str, os.PathLike], owner="DataPruner.write_manifest")
        folder = Path(target)
        manifest_path = folder / "manifest.json"
        if rank_and_world()[0] != 0:
            return manifest_path
        n, kept = self.n_examples_, self.kept_indices_
        dropped = np.setdiff1d(np.arange(n, dtype=np.int64), kept)
        per_class = None
        if self.labels_ is not None:
            n_per = np.bincount(self.labels_, minlength=len(self.classes_))
            kept_per = np.bincount(self.labels_[kept], minlength=len(self.classes_))
            per_class = {str(c): {"n": int(a), "kept": int(k), "dropped": int(a - k)}
                         for c, a, k in zip(self.classes_.tolist(), n_per, kept_per)}
        s = self.scores_
        finite = s[np.isfinite(s)]
        embedding = self.embedding
        manifest = {
            "metric": self.metric_,
            "strategy": {"requested": self.strategy, "resolved": self.strategy_, "reason": self.strategy_reason_},
            "keep": self.keep,
            "class_balance": self.class_balanced_,  # True only when classes were actually balanced
            "class_balance_requested": self.class_balance,
            "warnings": list(self.warnings_),
            "n_examples": n,
            "n_kept": len(kept),
            "n_dropped": len(dropped),
            "per_class": per_class,
            "scores": {
                "min": float(s.min()), "median": float(np.median(s)), "max": float(s.max()),
                "mean": float(finite.mean()) if finite.size else None,
                "higher_means": "harder",
            },
            "settings": {
                "score_epochs": self.score_epochs_, "n_seeds": self.n_seeds, "n_clusters": self.n_clusters_,
                "seed": self.seed, "batch_size": self.batch_size, "lr": self.lr,
                "model_fn": None if self.model_fn is None else _fn_name(self.model_fn),
                "embedding": (None if embedding is None else "array" if isinstance(embedding, (np.ndarray, torch.Tensor))
                              else embedding if isinstance(embedding, str) else _fn_name(embedding)),
            },
            "scoring_seconds": self.scoring_seconds_,
            "files": {"scores": "scores.npy", "kept": "kept.npy"},
            "dropped_indices": dropped,
            "versions": {"leanscale": leanscale.__version__, "torch": torch.__version__, "numpy": np.__version__},
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        # The manifest is the commit point: it records the SHA-256 of the two arrays, so a kill between the
        # writes leaves arrays that a reader (read_pruning_manifest) can tell do not belong to the manifest.
        files = {"scores.npy": npy_bytes(self.scores_), "kept.npy": npy_bytes(kept)}  # (n,) float64, (n_kept,) int64
        write_with_manifest(folder, files, manifest, manifest_name=MANIFEST_FILE, version=MANIFEST_FORMAT_VERSION)
        return manifest_path


def read_pruning_manifest(path: str | os.PathLike, *, verify: bool | tuple[str, ...] = True) -> dict[str, Any]:
    """Read the ``manifest.json`` of :meth:`DataPruner.write_manifest` (and of ``leanscale prune
    score`` / ``select``), checking it before it is trusted.

    The manifest is untrusted input: its size is checked before it is read, it must be a JSON
    object, and a ``"format_version"`` above :data:`MANIFEST_FORMAT_VERSION` (a newer leanscale's
    layout) is refused; an absent one reads as 1 (manifests of leanscale <= 0.x).

    Args:
        path: The folder ``write_manifest`` wrote, or its ``manifest.json``.
        verify: True: ``scores.npy`` and ``kept.npy`` beside the manifest must be the files it was
            written with (their recorded SHA-256; a manifest that records none is not checked);
            a tuple of file names: only those; False: no file is checked.

    Returns:
        The manifest as a dict, as it is on disk (load the arrays with ``np.load``).

    Raises:
        DataNotFoundError: no manifest, or a file it records is missing.
        DataFormatError: the manifest is damaged, too large, of a newer format, or a checked file
            does not belong to it (a write was interrupted, or a file was changed since).
    """
    owner = "read_pruning_manifest"
    check_param("path", path, [str, os.PathLike], owner=owner)
    if not isinstance(verify, bool) and not (isinstance(verify, tuple) and all(n in _OUTPUT_FILES for n in verify)):
        raise InvalidParameterError(
            f"The 'verify' parameter of {owner} must be a bool or a tuple of names among {_OUTPUT_FILES}. "
            f"Got {verify!r} instead.")
    path = Path(path)
    manifest_path = path / MANIFEST_FILE if path.is_dir() else path
    manifest = read_manifest(manifest_path, current=MANIFEST_FORMAT_VERSION, what="manifest")
    names = _OUTPUT_FILES if verify is True else () if verify is False else verify
    for name in names:
        verify_recorded_file(manifest_path.parent, manifest, name, what=f"{name[:-4]} file",
                             manifest_path=manifest_path)
    return manifest
