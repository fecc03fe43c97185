"""Deterministic stratified sampling shared by the loaders (private)."""

from __future__ import annotations

import numpy as np

__all__ = ["proportional_quotas", "stratified_indices"]


def proportional_quotas(counts: np.ndarray, n: int) -> np.ndarray:
    """Split ``n`` over classes in proportion to ``counts`` (largest-remainder method).

    The quotas sum to ``n`` exactly and never exceed a class's count; ties in the remainders go to
    the lower class index, so the result is deterministic.
    """
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    exact = counts * n / total
    quotas = np.floor(exact).astype(np.int64)
    left = n - int(quotas.sum())
    if left:
        # largest fractional part first; stable sort keeps lower class index first on ties
        order = np.argsort(-(exact - quotas), kind="stable")
        order = [c for c in order if quotas[c] < counts[c]]
        for c in order[:left]:
            quotas[c] += 1
    return quotas


def stratified_indices(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` indices into ``labels``, in proportion to the class sizes, sorted ascending.

    Within each class the picked items are the first of a permutation drawn from
    ``numpy.random.default_rng(seed)``, so the same ``(labels, n, seed)`` always gives the same
    indices.
    """
    labels = np.asarray(labels)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    quotas = proportional_quotas(counts, n)
    perm = np.random.default_rng(seed).permutation(len(labels))
    by_class = inverse[perm]
    picked = []
    for c in range(len(classes)):
        picked.append(perm[by_class == c][: quotas[c]])
    return np.sort(np.concatenate(picked)) if picked else np.empty(0, dtype=np.int64)
