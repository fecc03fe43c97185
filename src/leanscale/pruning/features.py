"""Label-free embeddings that need no training: the cheap path to self-supervised prototypes.

Sorscher et al. (2022, arXiv 2206.14486) score examples by their distance to k-means prototypes
in a self-supervised embedding. Training that embedding (our SimCLR encoder,
:func:`~leanscale.pruning.embed.train_ssl_encoder`) cost 5.7 times a full training run of the
Fashion-MNIST MLP that is then trained on the kept data -- more than the pruning saves. The
prototype score only needs an embedding in which typical examples lie close to a centroid and
atypical ones far from it; for inputs that are already vectors (pixels, features) two classical
linear maps give one in a fraction of a second:

* ``"pca"``: the top ``dim`` principal directions of the centred inputs (the covariance of a
  seeded sample of ``fit_rows`` rows, eigendecomposed in float64), the inputs projected on them.
  It keeps the directions of largest variance, so distances in it are the input distances with
  the noisiest low-variance directions removed.
* ``"random-projection"``: the centred inputs times a seeded Gaussian matrix ``(d, dim) /
  sqrt(dim)`` (Johnson-Lindenstrauss: pairwise distances preserved up to a factor ``1 +- eps``
  for ``dim ~ log(n) / eps^2``). No fitting at all.

Both are linear, so the k-means of the prototypes runs in the input geometry (compressed); the
benchmark (``benchmarks/pruning/fraction_kept.py``, the card's section) measures how that ranks
against the SimCLR embedding, and what it costs.

Example:
    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(100, 20))
    >>> fast_embedding(x, "pca", dim=4).shape
    (100, 4)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from leanscale.core.validation import Interval, check_param, unknown_name_error

__all__ = ["FAST_EMBEDDINGS", "fast_embedding"]

FAST_EMBEDDINGS = ("pca", "random-projection")
_OWNER = "fast_embedding"
_CHUNK = 8192  # rows projected per matrix product


def fast_embedding(x: Any, method: str = "pca", *, dim: int = 32, fit_rows: int = 10_000,
                   seed: int = 0) -> np.ndarray:
    """A training-free embedding of ``x`` for :func:`~leanscale.pruning.prototypes.prototype_scores`.

    Args:
        x: ``(n, ...)`` numeric array or tensor (images ``(n, C, H, W)`` or features ``(n, d)``);
            each example is flattened to ``d`` values.
        method: ``"pca"`` or ``"random-projection"`` (:data:`FAST_EMBEDDINGS`; module docstring).
        dim: Output width; at most ``d`` is used (``min(dim, d)`` columns).
        fit_rows: Rows (a seeded sample) from which the mean and, for PCA, the covariance are
            estimated; all ``n`` when ``n <= fit_rows``.
        seed: Seed of that sample and of the random projection.

    Returns:
        ``(n, min(dim, d))`` float32 embeddings.

    Raises:
        InvalidParameterError: an unknown ``method``, ``dim`` / ``fit_rows`` / ``seed`` not a
            positive (``seed``: non-negative) int, ``x`` not numeric with at least 2 dimensions
            or not finite.
    """
    from leanscale.pruning._train import as_float_tensor

    if not (isinstance(method, str) and method in FAST_EMBEDDINGS):
        raise unknown_name_error("method", method, FAST_EMBEDDINGS, owner=_OWNER)
    check_param("dim", dim, [Interval(int, 1, None)], owner=_OWNER)
    check_param("fit_rows", fit_rows, [Interval(int, 2, None)], owner=_OWNER)
    check_param("seed", seed, [Interval(int, 0, None)], owner=_OWNER)
    xt = as_float_tensor(x, owner=_OWNER).reshape(len(x), -1).float()  # (n, d), finite
    n, d = xt.shape
    k = min(int(dim), d)
    rng = np.random.default_rng(seed)
    fit = torch.from_numpy(np.sort(rng.choice(n, size=fit_rows, replace=False))) if n > fit_rows else None
    sample = (xt if fit is None else xt[fit]).double()  # (r, d)
    mean = sample.mean(0)  # (d,)
    if method == "pca":
        centred = sample - mean
        cov = centred.T @ centred / max(1, centred.shape[0] - 1)  # (d, d) float64
        _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
        w = vecs[:, -k:].flip(1)  # (d, k) the top-k directions, largest first
        # a fixed sign per direction (its largest entry positive): the same input, the same output
        signs = torch.sign(w.gather(0, w.abs().argmax(0, keepdim=True)))
        w = w * torch.where(signs == 0, torch.ones_like(signs), signs)
    else:
        w = torch.from_numpy(rng.standard_normal((d, k)) / np.sqrt(k))  # (d, k)
    w, mean = w.float(), mean.float()
    out = np.empty((n, k), dtype=np.float32)
    for start in range(0, n, _CHUNK):
        out[start:start + _CHUNK] = ((xt[start:start + _CHUNK] - mean) @ w).numpy()  # (b, k)
    return out
