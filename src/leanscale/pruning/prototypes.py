"""Prototype distances: a pruning score from embeddings alone (self-supervised) or with labels.

Sorscher, Geirhos, Shekhar, Ganguli & Morcos 2022, "Beyond neural scaling laws: beating power law
scaling via data pruning", arXiv 2206.14486, Section 5.

**Self-supervised prototypes** (no labels): k-means with ``n_clusters`` centroids over the
embeddings of the whole training set (the paper uses a self-supervised encoder, SwAV on ImageNet,
and cosine geometry); each example's score is its distance to the nearest centroid. Examples near
a prototype are typical ("easy"), far ones are atypical ("hard"). The paper finds this metric,
which needs neither labels nor a trained classifier, competitive with the best supervised
metrics on ImageNet.

**Supervised prototypes** (with labels): the prototype of a class is the mean embedding of its
examples (in cosine geometry the normalised mean of the normalised embeddings); each example's
score is its distance to its *own* class's prototype, whatever k-means would have found.

Distances: ``metric="cosine"`` gives ``1 - cos(x, prototype)`` in [0, 2]; ``"euclidean"`` the
Euclidean distance (not squared; the order is the same). Scores follow the package convention:
one float64 per example, higher = farther from the prototype = harder. They are computed in
float64 directly from ``x - prototype`` (not from the float32 expansion used inside k-means), so
points very close to their prototype are still ranked correctly.

Example:
    >>> import numpy as np
    >>> x = np.array([[0.0, 0.0], [0.1, 0.0], [3.0, 0.0], [10.0, 10.0], [10.1, 10.0]])
    >>> s = prototype_scores(x, labels=[0, 0, 0, 1, 1], metric="euclidean")
    >>> int(np.argmax(s))  # the outlier of class 0 is farthest from its class mean
    2
    >>> s.round(3).tolist()
    [1.033, 0.933, 1.967, 0.05, 0.05]
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from leanscale.core.errors import InvalidParameterError
from leanscale.core.validation import (
    Interval,
    check_array,
    check_consistent_length,
    check_labels,
    check_param,
    unknown_name_error,
)
from leanscale.pruning.kmeans import KMeans

__all__ = ["prototype_scores"]

METRICS = ("cosine", "euclidean")
_OWNER = "prototype_scores"
_CHUNK_ROWS = 8192  # rows per float64 distance block (memory O(chunk * d))


def _as_matrix(embeddings: Any) -> np.ndarray:
    """A finite 2-d array: float32 input stays float32 (no copy), anything else becomes float64."""
    if isinstance(embeddings, torch.Tensor):
        embeddings = embeddings.detach().cpu().numpy()
    dtype = np.float32 if getattr(embeddings, "dtype", None) == np.float32 else np.float64
    return check_array("embeddings", embeddings, ndim=2, dtype=dtype, min_len=1, owner=_OWNER)


def _normalize(x: np.ndarray) -> np.ndarray:
    """L2-normalised rows (float64); rows of zeros stay zero."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def _distances(x: np.ndarray, protos: np.ndarray, assign: np.ndarray, metric: str) -> np.ndarray:
    """Float64 distance ``(n,)`` of each row of ``x`` to its prototype ``protos[assign]``."""
    n = x.shape[0]
    out = np.empty(n, dtype=np.float64)
    protos = protos.astype(np.float64)
    if metric == "cosine":
        protos = _normalize(protos)
    for start in range(0, n, _CHUNK_ROWS):
        stop = min(start + _CHUNK_ROWS, n)
        xc = x[start:stop].astype(np.float64)  # (b, d)
        pc = protos[assign[start:stop]]  # (b, d)
        if metric == "cosine":
            out[start:stop] = 1.0 - np.einsum("ij,ij->i", _normalize(xc), pc)
        else:
            out[start:stop] = np.linalg.norm(xc - pc, axis=1)
    if metric == "cosine":
        np.clip(out, 0.0, 2.0, out=out)  # rounding can step just outside [0, 2]
    return out


def _class_prototypes(x: np.ndarray, inverse: np.ndarray, n_classes: int, metric: str) -> np.ndarray:
    """``(c, d)`` float64 class means (of the normalised rows for cosine), accumulated by chunk."""
    sums = torch.zeros((n_classes, x.shape[1]), dtype=torch.float64)
    idx = torch.from_numpy(inverse.astype(np.int64))
    for start in range(0, x.shape[0], _CHUNK_ROWS):
        xc = x[start:start + _CHUNK_ROWS].astype(np.float64)
        if metric == "cosine":
            xc = _normalize(xc)
        sums.index_add_(0, idx[start:start + _CHUNK_ROWS], torch.from_numpy(xc))
    counts = np.bincount(inverse, minlength=n_classes).astype(np.float64)
    return sums.numpy() / counts[:, None]  # the cosine prototype is normalised in _distances


def prototype_scores(
    embeddings: Any,
    n_clusters: int | None = None,
    metric: str = "cosine",
    labels: Any = None,
    *,
    seed: int = 0,
    max_iter: int = 100,
) -> np.ndarray:
    """Distance of each example to its prototype (Sorscher et al. 2022): higher = harder.

    Args:
        embeddings: ``(n, d)`` array or tensor of finite embeddings, one row per example.
        n_clusters: Number of k-means prototypes; required without ``labels``, ignored with them
            (the classes are the prototypes). At most ``n``.
        metric: ``"cosine"`` (spherical k-means and ``1 - cos``) or ``"euclidean"``.
        labels: ``(n,)`` class labels (any values) for supervised prototypes, or None for
            self-supervised ones (k-means over all embeddings).
        seed: Seed of the k-means seeding (:class:`~leanscale.pruning.kmeans.KMeans`).
        max_iter: At most this many Lloyd iterations.

    Returns:
        ``(n,)`` float64 distances to the nearest centroid (no labels) or to the own class
        prototype (labels).

    Raises:
        InvalidParameterError: ``embeddings`` not a finite 2-d array, an unknown ``metric``,
            ``labels`` of another length, ``n_clusters`` missing without labels or larger than
            ``n``.
    """
    if not (isinstance(metric, str) and metric in METRICS):
        raise unknown_name_error("metric", metric, METRICS, owner=_OWNER)
    check_param("n_clusters", n_clusters, [None, Interval(int, 1, None)], owner=_OWNER)
    check_param("seed", seed, [Interval(int, 0, None)], owner=_OWNER)
    check_param("max_iter", max_iter, [Interval(int, 1, None)], owner=_OWNER)
    x = _as_matrix(embeddings)  # (n, d)
    n = x.shape[0]

    if labels is not None:
        labels = check_labels("labels", labels, owner=_OWNER)
        check_consistent_length(_OWNER, embeddings=x, labels=labels)
        classes, inverse = np.unique(labels, return_inverse=True)
        inverse = inverse.reshape(-1)
        protos = _class_prototypes(x, inverse, len(classes), metric)
        return _distances(x, protos, inverse, metric)

    if n_clusters is None:
        raise InvalidParameterError(
            f"The 'n_clusters' parameter of {_OWNER} is required without labels (self-supervised "
            f"prototypes cluster the embeddings). Got None; pass an int, or labels for supervised prototypes."
        )
    if n_clusters > n:
        raise InvalidParameterError(
            f"The 'n_clusters' parameter of {_OWNER} must be at most the number of examples ({n}). "
            f"Got {n_clusters} instead."
        )
    km = KMeans(n_clusters, metric=metric, max_iter=max_iter, seed=seed).fit(x)
    return _distances(x, km.cluster_centers_, km.labels_, metric)
