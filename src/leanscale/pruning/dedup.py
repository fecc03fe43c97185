"""Deduplication: the data pruning that LLM data pipelines actually run.

Three stages, applied in this order to the items that survive the previous one:

* ``"exact"`` -- a hash (BLAKE2b, 128 bits) of the *normalised* text; the first occurrence is kept.
  The normalisation is configurable (:data:`NORMALIZATIONS`, default NFKC + casefold + whitespace
  collapse): ``"Hello  World"`` and ``"hello world"`` are then one text.
* ``"minhash"`` -- near duplicates by MinHash LSH (Broder 1997; banding as in Leskovec, Rajaraman &
  Ullman, *Mining of Massive Datasets*, ch. 3; the recipe of Lee et al. 2022, "Deduplicating
  training data makes language models better", arXiv 2107.06499) with ``datasketch``
  (``pip install 'leanscale[dedup]'``). The shingles are word or character n-grams of the
  normalised text. LSH only proposes candidate pairs: every candidate is **verified with its true
  Jaccard similarity** (on the 64-bit hashed shingle sets), so an LSH false positive is never
  removed. LSH false negatives (a pair above the threshold that shares no band) are missed; the
  LSH index is built for a lower threshold (``lsh_threshold``, default ``threshold - 0.1``) to
  keep them rare.
* ``"semantic"`` -- SemDeDup (Abbas, Tirumala, Simig, Ganguli & Morcos 2023, arXiv 2303.09540):
  spherical k-means on L2-normalised embeddings, then within each cluster an item is removed when
  its cosine similarity to an item kept before it is ``> 1 - eps``. Within a cluster the items are
  visited farthest from the centroid first (``semantic_keep="far"``, the paper's choice: of a
  group of duplicates the least prototypical one is kept), nearest first (``"near"``) or in data
  order (``"first"``). The embeddings are MiniLM's (:func:`leanscale.models.encoders.embed_texts`)
  unless given. One difference to the paper's code: it removes an item similar to *any* earlier
  item of its cluster (also one that was itself removed), we only compare with *kept* items, so
  every removed item has a kept item it duplicates (the manifest names it); we keep at least as
  many items as the paper's rule would.

Within a stage the first item (in data order; for ``"semantic"`` in the order above) of a group
of duplicates is kept, greedily: item ``i`` is removed when it duplicates an item that is kept,
and the manifest names the most similar such item. Everything is deterministic: the MinHash
permutations and the k-means seeding come from ``seed``.

Example:
    >>> texts = ["The cat sat on the mat.", "the cat  sat on the mat.", "A dog barked."]
    >>> r = deduplicate(texts, method="exact")
    >>> r.kept_indices.tolist(), r.records()[0]["duplicate_of"]
    ([0, 2], 0)
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from leanscale.core.errors import (
    DataFormatError,
    InvalidParameterError,
    MissingDependencyError,
)
from leanscale.core.validation import (
    Interval,
    check_param,
    check_texts,
    unknown_name_error,
)

__all__ = [
    "DEDUP_METHODS",
    "NORMALIZATIONS",
    "DedupResult",
    "TextRows",
    "deduplicate",
    "near_duplicate_pairs",
    "normalize_text",
    "read_text_rows",
    "shingle_hashes",
    "write_dedup",
]

DEDUP_METHODS: tuple[str, ...] = ("exact", "minhash", "semantic")  # the order in which they run
# name -> what it does; applied in this order whatever the order given
NORMALIZATIONS: dict[str, str] = {
    "nfkc": "Unicode NFKC (compatibility) normalisation: full-width letters, ligatures, non-breaking spaces",
    "nfc": "Unicode NFC normalisation (canonical composition only)",
    "casefold": "str.casefold (aggressive lower-casing, 'Straße' == 'strasse')",
    "lower": "str.lower",
    "punctuation": "drop every Unicode punctuation character (categories P*)",
    "digits": "replace every decimal digit by 0",
    "whitespace": "collapse every run of whitespace to one space and strip both ends",
}
DEFAULT_NORMALIZATION: tuple[str, ...] = ("nfkc", "casefold", "whitespace")
SHINGLE_KINDS = ("word", "char")
SEMANTIC_KEEP = ("far", "near", "first")
_INSTALL = "pip install 'leanscale[dedup]'"
_OWNER = "deduplicate"
_WS = re.compile(r"\s+")
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
# odd 64-bit multipliers of the n-gram positions (fixed: shingle hashes are the same in every run)
_POS = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93,
                 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, 0x94D049BB133111EB, 0xBF58476D1CE4E5B9],
                dtype=np.uint64)


# ------------------------------------------------------------------------------- normalisation


def _check_normalization(normalization, owner: str = _OWNER) -> tuple[str, ...]:
    if normalization is None:
        return ()
    steps = [s.strip() for s in normalization.split(",") if s.strip()] if isinstance(normalization, str) \
        else normalization
    if not isinstance(steps, (list, tuple)):
        raise InvalidParameterError(
            f"The 'normalization' parameter of {owner} must be None or a list of steps from "
            f"{', '.join(map(repr, NORMALIZATIONS))}. Got {normalization!r} instead.")
    for s in steps:
        if not (isinstance(s, str) and s in NORMALIZATIONS):
            raise unknown_name_error("normalization", s, NORMALIZATIONS, owner=owner)
    return tuple(n for n in NORMALIZATIONS if n in steps)  # the canonical order


def normalize_text(text: str, normalization: Sequence[str] | str | None = DEFAULT_NORMALIZATION) -> str:
    """``text`` after the normalisation steps named in ``normalization`` (see :data:`NORMALIZATIONS`).

    The steps run in a fixed order (Unicode form, case, punctuation, digits, whitespace) whatever
    the order given; ``None`` or ``()`` returns ``text`` unchanged.

    Example:
        >>> normalize_text("  Ｈｅｌｌｏ,\\u00a0WORLD!\\n")
        'hello, world!'
        >>> normalize_text("Hello, world 2024!", ("casefold", "punctuation", "digits", "whitespace"))
        'hello world 0000'
    """
    return _normalize(text, _check_normalization(normalization, "normalize_text"))


def _normalize(text: str, steps: tuple[str, ...]) -> str:
    for step in steps:
        if step in ("nfkc", "nfc"):
            text = unicodedata.normalize(step.upper(), text)
        elif step == "casefold":
            text = text.casefold()
        elif step == "lower":
            text = text.lower()
        elif step == "punctuation":
            text = "".join(c for c in text if not unicodedata.category(c).startswith("P"))
        elif step == "digits":
            text = "".join("0" if c.isdecimal() else c for c in text)
        elif step == "whitespace":
            text = _WS.sub(" ", text).strip()
    return text


# ------------------------------------------------------------------------------------ shingles


def _fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser (a bijection that mixes every bit), on uint64 arrays."""
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def _word_hash(word: str, cache: dict) -> int:
    h = cache.get(word)
    if h is None:
        h = cache[word] = int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")
    return h


def _ngram_hashes(units: np.ndarray, size: int) -> np.ndarray:
    """Sorted unique uint64 hashes of the ``size``-grams of ``units`` (uint64, already mixed). Fewer
    units than ``size`` give one shingle of all of them; none give an empty set."""
    n = len(units)
    if n == 0:
        return np.empty(0, dtype=np.uint64)
    k = min(size, n)
    with np.errstate(over="ignore"):
        acc = np.zeros(n - k + 1, dtype=np.uint64)
        for t in range(k):
            acc += units[t: n - k + 1 + t] * _POS[t % len(_POS)] + np.uint64(t)
        acc += np.uint64(k) * np.uint64(0x27D4EB2F165667C5)  # the n-gram length
        return np.unique(_fmix64(acc))


def shingle_hashes(text: str, *, shingle: str = "word", size: int = 5,
                   normalization: Sequence[str] | str | None = DEFAULT_NORMALIZATION,
                   _cache: dict | None = None) -> np.ndarray:
    """The set of ``size``-gram shingles of the normalised ``text``, as sorted unique uint64 hashes.

    Words are the whitespace-separated tokens of the normalised text; characters are its code
    points. A text with fewer words (characters) than ``size`` is one shingle. Two different
    shingles share a 64-bit hash with probability ~2^-64, so the Jaccard similarity of two hash
    sets is the Jaccard similarity of the shingle sets.

    Example:
        >>> len(shingle_hashes("a b c d", size=2)), len(shingle_hashes("a b a b", size=2))
        (3, 2)
    """
    steps = _check_normalization(normalization, "shingle_hashes")
    _check_shingle(shingle, size, "shingle_hashes")
    return _shingles(_normalize(text, steps), shingle, size, {} if _cache is None else _cache)


def _shingles(norm: str, shingle: str, size: int, cache: dict) -> np.ndarray:
    if shingle == "word":
        words = norm.split()
        units = np.fromiter((_word_hash(w, cache) for w in words), dtype=np.uint64, count=len(words))
    else:
        with np.errstate(over="ignore"):
            units = _fmix64(np.frombuffer(norm.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
                            + np.uint64(0x9E3779B97F4A7C15))
    return _ngram_hashes(units, size)


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two sorted unique arrays."""
    if len(a) == 0 and len(b) == 0:
        return 1.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


def _check_shingle(shingle, size, owner) -> None:
    if not (isinstance(shingle, str) and shingle in SHINGLE_KINDS):
        raise unknown_name_error("shingle", shingle, SHINGLE_KINDS, owner=owner)
    check_param("shingle_size", size, [Interval(int, 1, None)], owner=owner)


# ------------------------------------------------------------------------------------- MinHash


def _import_datasketch():
    try:
        import datasketch
    except ImportError as exc:
        raise MissingDependencyError(
            f"MinHash deduplication (method 'minhash') needs datasketch, which is not installed ({exc}). "
            f"Install it with: {_INSTALL}") from None
    return datasketch


def _identity(value):
    return int(value)


def _minhash_pairs(sets: list[np.ndarray], threshold: float, lsh_threshold: float, num_perm: int,
                   seed: int) -> list[tuple[int, int, float]]:
    """Verified pairs ``(j, i, jaccard)``, ``j < i``, of the shingle ``sets`` with Jaccard >= ``threshold``
    among the candidates of a MinHash LSH index. Empty sets take no part."""
    ds = _import_datasketch()
    proto = ds.MinHash(num_perm=num_perm, seed=seed, scheme="affine64", hashfunc=_identity)
    try:
        lsh = ds.MinHashLSH(threshold=lsh_threshold, num_perm=num_perm)
    except ValueError:  # few permutations or a threshold near 1: the tuned banding has < 2 bands
        lsh = ds.MinHashLSH(num_perm=num_perm, params=(2, num_perm // 2))  # candidates are verified anyway
    sketches: dict[int, Any] = {}
    with lsh.insertion_session() as session:
        for i, s in enumerate(sets):
            if len(s) == 0:
                continue
            m = ds.MinHash(num_perm=num_perm, seed=seed, hashfunc=_identity, permutations=proto.permutations,
                           scheme="affine64")
            m.update_batch(s)
            sketches[i] = m
            session.insert(i, m)
    pairs = []
    for i, m in sketches.items():
        for j in sorted(k for k in lsh.query(m) if k < i):
            sim = _jaccard(sets[i], sets[j])
            if sim >= threshold:
                pairs.append((j, i, sim))
    pairs.sort()
    return pairs


def _lsh_threshold(threshold: float, lsh_threshold: float | None, owner: str) -> float:
    if lsh_threshold is None:
        return max(0.05, threshold - 0.1)
    check_param("lsh_threshold", lsh_threshold, [Interval(float, 0, 1, closed="neither")], owner=owner)
    return float(lsh_threshold)


def near_duplicate_pairs(
    texts: Sequence[str],
    *,
    threshold: float = 0.8,
    shingle: str = "word",
    shingle_size: int = 5,
    num_perm: int = 128,
    lsh_threshold: float | None = None,
    normalization: Sequence[str] | str | None = DEFAULT_NORMALIZATION,
    seed: int = 0,
) -> list[tuple[int, int, float]]:
    """Every pair of ``texts`` that MinHash LSH proposes and whose true Jaccard similarity is >= ``threshold``.

    Args:
        texts: the texts.
        threshold: the Jaccard similarity of the shingle sets at which two texts are duplicates.
        shingle: ``"word"`` or ``"char"`` n-grams of the normalised text.
        shingle_size: n.
        num_perm: MinHash permutations (more: fewer LSH misses, more time).
        lsh_threshold: the threshold the LSH bands are tuned for (default ``threshold - 0.1``):
            lower finds more candidates (fewer misses) and verifies more of them.
        normalization: see :func:`normalize_text`.
        seed: the seed of the MinHash permutations.

    Returns:
        ``(j, i, jaccard)`` with ``j < i``, sorted. Texts with no shingle (empty after
        normalisation) take no part.
    """
    texts = _check_texts(texts, "near_duplicate_pairs")
    owner = "near_duplicate_pairs"
    steps = _check_normalization(normalization, owner)
    _check_minhash_params(threshold, shingle, shingle_size, num_perm, seed, owner)
    cache: dict = {}
    sets = [_shingles(_normalize(t, steps), shingle, shingle_size, cache) for t in texts]
    return _minhash_pairs(sets, float(threshold), _lsh_threshold(threshold, lsh_threshold, owner), num_perm, seed)


def _check_minhash_params(threshold, shingle, shingle_size, num_perm, seed, owner) -> None:
    check_param("threshold", threshold, [Interval(float, 0, 1, closed="right")], owner=owner)
    _check_shingle(shingle, shingle_size, owner)
    check_param("num_perm", num_perm, [Interval(int, 2, 2**16)], owner=owner)
    check_param("seed", seed, [Interval(int, 0, 2**32 - 1)], owner=owner)


def _greedy(n: int, pairs: list[tuple[int, int, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Keep items in order; item ``i`` is removed when a pair links it to a kept ``j < i``. Returns the
    duplicate-of index (-1: kept) and the similarity of every item."""
    by_item: dict[int, list[tuple[int, float]]] = {}
    for j, i, s in pairs:
        by_item.setdefault(i, []).append((j, s))
    dup = np.full(n, -1, dtype=np.int64)
    sim = np.full(n, np.nan)
    for i in sorted(by_item):
        best = None
        for j, s in by_item[i]:
            if dup[j] < 0 and (best is None or s > best[1] or (s == best[1] and j < best[0])):
                best = (j, s)
        if best is not None:
            dup[i], sim[i] = best
    return dup, sim


# ------------------------------------------------------------------------------------ SemDeDup


def _semdedup(emb: np.ndarray, eps: float, n_clusters: int, keep: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """SemDeDup on ``emb`` ``(m, d)``: duplicate-of (-1 kept) and cosine similarity of each row."""
    from leanscale.pruning.kmeans import KMeans

    m = emb.shape[0]
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    x = (emb / np.where(norms > 0, norms, 1.0)).astype(np.float64)  # (m, d) unit rows (zero rows stay 0)
    k = min(n_clusters, m)
    km = KMeans(n_clusters=k, metric="cosine", seed=seed, backend="torch").fit(x.astype(np.float32))
    labels = km.labels_
    centers = km.cluster_centers_.astype(np.float64)
    to_center = np.einsum("nd,nd->n", x, centers[labels])  # (m,) cosine to the own centroid
    dup = np.full(m, -1, dtype=np.int64)
    sim = np.full(m, np.nan)
    limit = 1.0 - eps
    for c in range(k):
        members = np.flatnonzero(labels == c)
        if len(members) < 2:
            continue
        if keep == "far":
            members = members[np.lexsort((members, to_center[members]))]
        elif keep == "near":
            members = members[np.lexsort((members, -to_center[members]))]
        xc = x[members]  # (mc, d) in visiting order
        full = xc @ xc.T if len(members) <= 4096 else None  # (mc, mc)
        kept_pos: list[int] = []
        for p in range(len(members)):
            if kept_pos:
                s = full[p, kept_pos] if full is not None else xc[kept_pos] @ xc[p]
                best = int(np.argmax(s))
                if s[best] > limit:
                    dup[members[p]] = members[kept_pos[best]]
                    sim[members[p]] = float(s[best])
                    continue
            kept_pos.append(p)
    return dup, sim


# -------------------------------------------------------------------------------------- result


@dataclass
class DedupResult:
    """What :func:`deduplicate` kept and removed, and why.

    Attributes:
        keep: bool ``(n,)``, True for a kept item.
        duplicate_of: int64 ``(n,)``: the item a removed item duplicates (kept by the stage that
            removed it), -1 for a kept item.
        method: ``(n,)`` list: the stage that removed the item (``"exact"``, ``"minhash"``,
            ``"semantic"``), None for a kept item.
        similarity: float64 ``(n,)``: 1.0 for an exact duplicate, the Jaccard similarity (minhash)
            or the cosine similarity (semantic) to ``duplicate_of``; NaN for a kept item.
        stages: one dict per stage run: method, items in, items removed, seconds, settings.
        settings: every parameter of the run.
    """

    keep: np.ndarray
    duplicate_of: np.ndarray
    method: list
    similarity: np.ndarray
    stages: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    @property
    def n_items(self) -> int:
        return int(len(self.keep))

    @property
    def kept_indices(self) -> np.ndarray:
        return np.flatnonzero(self.keep).astype(np.int64)

    @property
    def removed_indices(self) -> np.ndarray:
        return np.flatnonzero(~self.keep).astype(np.int64)

    def representative(self, i: int) -> int:
        """The finally kept item that removed item ``i`` stands for (following ``duplicate_of``
        through later stages); ``i`` itself when it is kept."""
        while self.duplicate_of[i] >= 0:
            i = int(self.duplicate_of[i])
        return int(i)

    def records(self) -> list[dict]:
        """The manifest: one dict per removed item, by index: ``index``, ``duplicate_of``,
        ``kept_representative`` (see :meth:`representative`), ``method``, ``similarity``."""
        return [{"index": int(i), "duplicate_of": int(self.duplicate_of[i]),
                 "kept_representative": self.representative(int(i)), "method": self.method[i],
                 "similarity": round(float(self.similarity[i]), 6)} for i in self.removed_indices]

    def summary(self) -> dict:
        """Counts and shares: items, kept, removed in all and by each stage, seconds, settings."""
        n = self.n_items
        removed = {s["method"]: s["n_removed"] for s in self.stages}
        return {"n_items": n, "n_kept": int(self.keep.sum()), "n_removed": n - int(self.keep.sum()),
                "removed_share": (n - int(self.keep.sum())) / n if n else 0.0,
                "removed_by_method": removed,
                "share_by_method": {k: v / n if n else 0.0 for k, v in removed.items()},
                "stages": self.stages, "settings": self.settings}


# ---------------------------------------------------------------------------------- deduplicate


def _check_texts(texts, owner: str) -> list[str]:
    """Any iterable of str but a single str (a list, a tuple, a numpy array of str, a pandas Series)."""
    return check_texts("texts", texts, owner=owner, min_len=0)


def _check_methods(method) -> tuple[str, ...]:
    names = [s.strip() for s in method.split(",") if s.strip()] if isinstance(method, str) else method
    if not isinstance(names, (list, tuple)) or not names:
        raise InvalidParameterError(
            f"The 'method' parameter of {_OWNER} must be one or more of {', '.join(map(repr, DEDUP_METHODS))}. "
            f"Got {method!r} instead.")
    for name in names:
        if not (isinstance(name, str) and name in DEDUP_METHODS):
            raise unknown_name_error("method", name, DEDUP_METHODS, owner=_OWNER)
    if len(set(names)) != len(names):
        raise InvalidParameterError(f"The 'method' parameter of {_OWNER} must name each method once. Got {method!r}.")
    return tuple(m for m in DEDUP_METHODS if m in names)


def _check_embeddings(embeddings, n: int | None) -> np.ndarray:
    arr = embeddings.detach().cpu().numpy() if hasattr(embeddings, "detach") else embeddings
    try:
        arr = np.asarray(arr, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidParameterError(
            f"The 'embeddings' parameter of {_OWNER} must be a 2-d array of numbers (n, d). Got "
            f"{type(embeddings).__name__}.") from None
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InvalidParameterError(
            f"The 'embeddings' parameter of {_OWNER} must be a non-empty 2-d array (n, d). Got shape {arr.shape}.")
    if n is not None and arr.shape[0] != n:
        raise InvalidParameterError(
            f"The 'embeddings' parameter of {_OWNER} must have one row per text. Got {arr.shape[0]} rows for "
            f"{n} texts.")
    if not np.isfinite(arr).all():
        raise InvalidParameterError(f"The 'embeddings' parameter of {_OWNER} must hold finite numbers (no NaN/inf).")
    return arr


def deduplicate(
    texts: Sequence[str] | None,
    *,
    method: str | Sequence[str] = ("exact", "minhash"),
    normalization: Sequence[str] | str | None = DEFAULT_NORMALIZATION,
    threshold: float = 0.8,
    shingle: str = "word",
    shingle_size: int = 5,
    num_perm: int = 128,
    lsh_threshold: float | None = None,
    eps: float = 0.05,
    n_clusters: int | None = None,
    semantic_keep: str = "far",
    embeddings: Any = None,
    embed_batch_size: int = 64,
    seed: int = 0,
) -> DedupResult:
    """Remove exact, near (MinHash) and semantic (SemDeDup) duplicates; say which item each duplicates.

    Args:
        texts: the items (a list of str). May be None for ``method="semantic"`` with ``embeddings``.
        method: the stages, a list or a comma-separated string of ``"exact"``, ``"minhash"``,
            ``"semantic"``; they run in that order, each on the survivors of the previous one.
        normalization: the steps applied before hashing and shingling (see :data:`NORMALIZATIONS`;
            None: the raw text). SemDeDup embeds the raw text.
        threshold: MinHash: Jaccard similarity of the shingle sets at or above which an item is a
            near duplicate (verified exactly on every LSH candidate).
        shingle: ``"word"`` or ``"char"`` n-grams.
        shingle_size: n (5 words, or e.g. 5 characters, are common choices).
        num_perm: MinHash permutations.
        lsh_threshold: the threshold the LSH bands are tuned for (default ``threshold - 0.1``).
        eps: SemDeDup: an item is removed when its cosine similarity to a kept item of its cluster
            is ``> 1 - eps``.
        n_clusters: SemDeDup's k-means clusters (default ``ceil(m / 1000)`` for ``m`` items): more
            clusters are faster but miss duplicates that fall into different clusters.
        semantic_keep: which item of a group SemDeDup keeps: ``"far"`` (farthest from the centroid,
            the paper's), ``"near"`` or ``"first"`` (data order).
        embeddings: ``(n, d)`` array of the items' embeddings; None embeds ``texts`` with MiniLM
            (:func:`leanscale.models.encoders.embed_texts`, needs ``leanscale[encoders]``).
        embed_batch_size: texts per MiniLM forward pass.
        seed: seed of the MinHash permutations and the k-means seeding.

    Returns:
        A :class:`DedupResult` (``keep``, ``kept_indices``, ``records()`` = the manifest, ``summary()``).

    Raises:
        InvalidParameterError: a bad parameter (the message names it).
        MissingDependencyError: ``"minhash"`` without datasketch (``pip install 'leanscale[dedup]'``),
            or ``"semantic"`` without ``embeddings`` and without ``leanscale[encoders]``.
    """
    methods = _check_methods(method)
    steps = _check_normalization(normalization)
    if texts is None:
        if methods != ("semantic",) or embeddings is None:
            raise InvalidParameterError(
                f"The 'texts' parameter of {_OWNER} must be a list of str; it may be None only for "
                f"method='semantic' with embeddings given. Got None with method={method!r}.")
        n = None
    else:
        texts = _check_texts(texts, _OWNER)
        n = len(texts)
    _check_minhash_params(threshold, shingle, shingle_size, num_perm, seed, _OWNER)
    lsh_thr = _lsh_threshold(threshold, lsh_threshold, _OWNER)
    check_param("eps", eps, [Interval(float, 0, 1, closed="left")], owner=_OWNER)
    check_param("n_clusters", n_clusters, [None, Interval(int, 1, None)], owner=_OWNER)
    check_param("embed_batch_size", embed_batch_size, [Interval(int, 1, None)], owner=_OWNER)
    if not (isinstance(semantic_keep, str) and semantic_keep in SEMANTIC_KEEP):
        raise unknown_name_error("semantic_keep", semantic_keep, SEMANTIC_KEEP, owner=_OWNER)
    emb = None
    if embeddings is not None:
        emb = _check_embeddings(embeddings, n)
        n = emb.shape[0] if n is None else n
    elif "semantic" in methods and n == 0:
        emb = np.zeros((0, 1))

    settings = {"method": list(methods), "normalization": list(steps), "threshold": float(threshold),
                "shingle": shingle, "shingle_size": shingle_size, "num_perm": num_perm, "lsh_threshold": lsh_thr,
                "eps": float(eps), "n_clusters": n_clusters, "semantic_keep": semantic_keep,
                "embeddings": "given" if embeddings is not None else ("MiniLM-L6" if "semantic" in methods else None),
                "seed": seed}
    dup = np.full(n, -1, dtype=np.int64)
    sim = np.full(n, np.nan)
    how: list = [None] * n
    alive = np.arange(n, dtype=np.int64)  # indices still kept
    stages = []
    normed = None
    for m in methods:
        t0 = time.perf_counter()
        n_in = len(alive)
        extra: dict = {}
        if m == "exact":
            normed = [_normalize(texts[i], steps) for i in alive]
            first: dict[bytes, int] = {}
            local_dup = np.full(n_in, -1, dtype=np.int64)
            for p, t in enumerate(normed):
                key = hashlib.blake2b(t.encode("utf-8"), digest_size=16).digest()
                q = first.setdefault(key, p)
                if q != p:
                    local_dup[p] = q
            local_sim = np.where(local_dup >= 0, 1.0, np.nan)
        elif m == "minhash":
            if normed is None or len(normed) != n_in:
                normed = [_normalize(texts[i], steps) for i in alive]
            cache: dict = {}
            sets = [_shingles(t, shingle, shingle_size, cache) for t in normed]
            pairs = _minhash_pairs(sets, float(threshold), lsh_thr, num_perm, seed)
            local_dup, local_sim = _greedy(n_in, pairs)
            extra = {"verified_pairs": len(pairs), "empty_items": int(sum(len(s) == 0 for s in sets))}
        else:
            if emb is None:
                from leanscale.models.encoders import embed_texts

                e = embed_texts([texts[i] for i in alive], batch_size=embed_batch_size) if n_in else np.zeros((0, 1))
            else:
                e = emb[alive]
            k = n_clusters if n_clusters is not None else max(1, math.ceil(n_in / 1000))
            if n_in:
                local_dup, local_sim = _semdedup(np.asarray(e, dtype=np.float64), float(eps), k, semantic_keep, seed)
            else:
                local_dup, local_sim = np.full(0, -1, dtype=np.int64), np.full(0, np.nan)
            extra = {"n_clusters": min(k, n_in)}
        hit = np.flatnonzero(local_dup >= 0)
        dup[alive[hit]] = alive[local_dup[hit]]
        sim[alive[hit]] = local_sim[hit]
        for i in alive[hit]:
            how[i] = m
        survivors = local_dup < 0
        alive = alive[survivors]
        if normed is not None:
            normed = [t for t, s in zip(normed, survivors) if s]
        stages.append({"method": m, "n_in": n_in, "n_removed": int(len(hit)),
                       "seconds": round(time.perf_counter() - t0, 4), **extra})
    keep = dup < 0
    return DedupResult(keep=keep, duplicate_of=dup, method=how, similarity=sim, stages=stages, settings=settings)


# ------------------------------------------------------------------------------- files (the CLI)


TEXT_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv", ".txt": "txt"}


@dataclass
class TextRows:
    """The rows of a text file, read for deduplication and written back (kept rows only) as they were.

    Attributes:
        path: the file.
        fmt: ``"jsonl"``, ``"csv"``, ``"tsv"`` or ``"txt"`` (one item per non-empty line).
        texts: the text of every row.
        rows: what is written back: the raw line (jsonl, txt) or the list of fields (csv, tsv).
        header: the header row of a csv / tsv file.
        text_column: the column (key) of the text; None for txt.
    """

    path: Path
    fmt: str
    texts: list[str]
    rows: list
    header: list[str] | None = None
    text_column: str | None = None


def read_text_rows(path: str | os.PathLike, text_column: str | None = None, *,
                   max_bytes: int = 4 * 2**30) -> TextRows:
    """Read the items of a ``.jsonl`` / ``.ndjson`` (one JSON object per line), ``.csv`` / ``.tsv`` (a
    header row) or ``.txt`` file (one item per non-empty line). Labels are not needed.

    Args:
        path: the file.
        text_column: the key (jsonl) or column (csv/tsv) of the text (default ``"text"``); not
            for ``.txt``.
        max_bytes: the largest file accepted.

    Raises:
        InvalidParameterError: no such file, an unknown suffix, ``text_column`` for a ``.txt`` file.
        DataFormatError: not UTF-8, bad JSON or CSV, a missing text column (the message lists those
            there), a text that is not a string (the message names the line).
    """
    from leanscale.core.io import check_file_size
    from leanscale.data.user import _missing_column, _read_delimited, _read_text

    p = Path(path).expanduser()
    if not p.is_file():
        raise InvalidParameterError(
            f"The 'path' parameter of read_text_rows must be an existing file. Got {str(path)!r}: no such file.")
    fmt = TEXT_FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise InvalidParameterError(
            f"The 'path' parameter of read_text_rows must be a {', '.join(TEXT_FORMATS)} file. Got {str(path)!r}, "
            f"whose suffix {p.suffix or '(none)'!r} is none of these.")
    if text_column is not None and (not isinstance(text_column, str) or not text_column):
        raise InvalidParameterError(
            f"The 'text_column' parameter of read_text_rows must be a column name. Got {text_column!r}.")
    check_file_size(p, max_bytes, what="data file")
    if fmt == "txt":
        if text_column is not None:
            raise InvalidParameterError(
                f"The 'text_column' parameter of read_text_rows is for .jsonl / .csv / .tsv files; a .txt file "
                f"holds one item per line. Got text_column={text_column!r} for {str(p)!r}.")
        lines = [line for line in _read_text(p).splitlines() if line.strip()]
        if not lines:
            raise DataFormatError(f"The data file {str(p)!r} holds no items: expected one text per line.")
        return TextRows(path=p, fmt=fmt, texts=lines, rows=lines)
    column = text_column or "text"
    if fmt == "jsonl":
        rows, texts = [], []
        for line, raw in enumerate(_read_text(p).splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except ValueError as exc:
                raise DataFormatError(f"{str(p)!r}, line {line}: not valid JSON ({exc}).") from None
            if not isinstance(obj, dict):
                raise DataFormatError(f"{str(p)!r}, line {line}: expected a JSON object such as "
                                      f"{{\"{column}\": \"...\"}}. Got {type(obj).__name__}.")
            if column not in obj:
                raise DataFormatError(
                    f"{str(p)!r}, line {line}: no key {column!r} (the text column: text_column= in Python, "
                    f"--text-column on the command line). This row's keys are: {', '.join(map(repr, obj)) or '(none)'}.")
            if not isinstance(obj[column], str):
                raise DataFormatError(f"{str(p)!r}, line {line}: the text column {column!r} must hold a string. "
                                      f"Got {type(obj[column]).__name__} {obj[column]!r:.60}.")
            rows.append(raw)
            texts.append(obj[column])
        if not rows:
            raise DataFormatError(f"The data file {str(p)!r} holds no items: expected one JSON object per line.")
        return TextRows(path=p, fmt=fmt, texts=texts, rows=rows, text_column=column)
    columns, _lines = _read_delimited(p, "\t" if fmt == "tsv" else ",")
    header = list(columns)
    if column not in columns:
        raise _missing_column(p, column, "text", header)
    rows = [list(r) for r in zip(*columns.values())]
    return TextRows(path=p, fmt=fmt, texts=list(columns[column]), rows=rows, header=header, text_column=column)


def write_dedup(out_dir: str | os.PathLike, result: DedupResult, rows: TextRows | None = None,
                extra: dict | None = None) -> dict[str, Path]:
    """Write the outcome of :func:`deduplicate` into ``out_dir``, each file atomically:

    * ``kept.<jsonl|csv|tsv|txt>`` -- the kept rows of ``rows``, as they were (when ``rows`` is given);
    * ``kept.npy`` -- the kept indices (int64);
    * ``manifest.jsonl`` -- one line per removed item: ``index``, ``duplicate_of``,
      ``kept_representative``, ``method``, ``similarity`` (see :meth:`DedupResult.records`);
    * ``summary.json`` -- :meth:`DedupResult.summary` plus ``extra``, written last.

    Returns:
        The paths written, by name (``"kept"``, ``"kept_indices"``, ``"manifest"``, ``"summary"``).
    """
    from leanscale.core.io import (
        atomic_write_bytes,
        atomic_write_json,
        atomic_write_text,
    )

    out = Path(out_dir)
    if rows is not None and len(rows.texts) != result.n_items:
        raise InvalidParameterError(
            f"The 'rows' parameter of write_dedup must hold the {result.n_items} items deduplicated. Got "
            f"{len(rows.texts)}.")
    paths: dict[str, Path] = {}
    kept = result.kept_indices
    if rows is not None:
        if rows.fmt in ("jsonl", "txt"):
            body = "".join(rows.rows[i] + "\n" for i in kept)
        else:
            buf = io.StringIO(newline="")
            writer = csv.writer(buf, delimiter="\t" if rows.fmt == "tsv" else ",", lineterminator="\n")
            writer.writerow(rows.header)
            writer.writerows(rows.rows[i] for i in kept)
            body = buf.getvalue()
        paths["kept"] = atomic_write_text(out / f"kept.{rows.fmt}", body)
    buf = io.BytesIO()
    np.save(buf, kept, allow_pickle=False)
    paths["kept_indices"] = atomic_write_bytes(out / "kept.npy", buf.getvalue())
    manifest = "".join(json.dumps(r) + "\n" for r in result.records())
    paths["manifest"] = atomic_write_text(out / "manifest.jsonl", manifest)
    summary = result.summary()
    if rows is not None:
        summary["data"] = {"path": str(rows.path), "format": rows.fmt, "text_column": rows.text_column}
    summary.update(extra or {})
    paths["summary"] = atomic_write_json(out / "summary.json", summary)
    return paths
