"""Labelled texts for a cascade, from WordNet or the user's own file, and a three-way split.

* :func:`load_labelled_texts` -- ``"wordnet"`` (the 117,659 WordNet 3.0 glosses labelled by their
  lexicographer file, e.g. ``"noun.animal"``) or the path of a ``.csv``, ``.tsv``, ``.jsonl`` or
  ``.parquet`` file, or of a Hugging Face ``datasets`` folder, with a text and a label column (key).
  Files are read by :func:`leanscale.data.load_dataset` (the loader of every command, with its
  messages). Labels come back as strings, whatever the format, so the same data in a CSV, a JSONL
  or a parquet file gives the same cascade.
* :func:`split_three` -- deterministic train / calibration / test index arrays, stratified when
  labels are given: the cascade's models learn on *train*, its thresholds are chosen on
  *calibration* and the result is measured on *test*, three disjoint sets.

File formats (UTF-8; a byte-order mark is ignored):

* ``.csv`` / ``.tsv``: a header row naming the columns, then one example per row (quoted fields
  may span lines). Blank lines are skipped; a row with more or fewer fields than the header is an
  error naming its line.
* ``.jsonl`` (or ``.ndjson``): one JSON object per line, e.g. ``{"text": "refund please",
  "label": "billing"}``; blank lines are skipped. The label may be a string or an integer. Rows
  may carry other keys (metadata, not the same in every row); a row without the text or the label
  key is an error naming its line.
* ``.parquet`` (``.pq``) and ``datasets`` folders (``save_to_disk``) need ``pip install
  'leanscale[data]'``. A ``DatasetDict`` gives its ``train`` split followed by its ``test`` split
  (the cascade makes its own three-way split); a ``ClassLabel`` label gives its names.

Every error names the file, the line and what is wrong (a missing column also lists the columns
that are there).

Example:
    >>> import numpy as np
    >>> train, cal, test = split_three(10, seed=0)
    >>> len(train), len(cal), len(test)
    (6, 2, 2)
    >>> sorted(np.concatenate([train, cal, test]).tolist()) == list(range(10))
    True
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from leanscale.core.errors import InvalidParameterError
from leanscale.core.validation import Interval, check_param
from leanscale.data.user import DATA_FORMATS, _is_datasets_folder

__all__ = ["SUFFIXES", "load_labelled_texts", "split_three"]

# the table formats of leanscale.data.load_dataset (all but .npz, which holds no texts)
SUFFIXES: dict[str, str] = {s: f for s, f in DATA_FORMATS.items() if f != "npz"}
_OWNER = "load_labelled_texts"
_EXPECTED = (f"'wordnet', the path of a {', '.join(sorted(SUFFIXES))} file or a Hugging Face datasets folder "
             "(save_to_disk)")


# ------------------------------------------------------------------------------------- loading


def load_labelled_texts(
    source: str | os.PathLike,
    *,
    text_column: str = "text",
    label_column: str = "label",
    root: str | os.PathLike | None = None,
) -> tuple[list[str], np.ndarray]:
    """Texts and their labels from WordNet, a ``.csv`` / ``.tsv`` / ``.jsonl`` / ``.parquet`` file or
    a Hugging Face ``datasets`` folder.

    Args:
        source: ``"wordnet"`` or the path of a file (the suffix picks the format) or of a
            ``datasets`` folder (``save_to_disk``).
        text_column, label_column: the column (CSV/TSV header, parquet or ``datasets`` column) or
            key (JSONL) holding the text and the label. Ignored for WordNet.
        root: folder of the WordNet data files (``None``: ``$LEANSCALE_DATA_ROOT`` or
            ``/usr/share/wordnet``). Ignored for files.

    Returns:
        ``(texts, labels)``: a list of ``n`` strings and an ``(n,)`` object array of string labels
        (for WordNet the lexicographer names, e.g. ``"verb.motion"``; integer labels in a file
        become their decimal text, e.g. ``"2"``).

    Raises:
        InvalidParameterError: an unknown source, a missing file or an unsupported suffix, bad
            column names.
        DataFormatError: from :func:`leanscale.data.load_dataset`: the file is empty, is not valid
            UTF-8 / CSV / JSON, lacks the text or label column, or a value is empty or not a string
            (the message names the file and the line).
        MissingDependencyError: a parquet file or a ``datasets`` folder without ``leanscale[data]``.
        DataNotFoundError: WordNet is not installed (the message says how to install it).
    """
    for name, value in (("text_column", text_column), ("label_column", label_column)):
        if not isinstance(value, str) or not value:
            raise InvalidParameterError(
                f"The {name!r} parameter of {_OWNER} must be a non-empty string. Got {value!r} instead.")
    if text_column == label_column:
        raise InvalidParameterError(
            f"The 'text_column' and 'label_column' parameters of {_OWNER} must differ. Got {text_column!r} for both.")
    if isinstance(source, str) and source.lower() == "wordnet":
        return _load_wordnet(root)
    if not isinstance(source, (str, os.PathLike)):
        raise InvalidParameterError(
            f"The 'source' parameter of {_OWNER} must be {_EXPECTED}. Got {type(source).__name__} {source!r} instead.")
    path = Path(source).expanduser()
    if not (path.is_dir() and _is_datasets_folder(path)):
        if path.suffix.lower() not in SUFFIXES:
            raise InvalidParameterError(
                f"The 'source' parameter of {_OWNER} must be {_EXPECTED}. Got {str(source)!r}, whose suffix "
                f"{path.suffix or '(none)'!r} is not one of {', '.join(sorted(SUFFIXES))}"
                f"{' (and a folder that is not a datasets folder)' if path.is_dir() else ''}.")
        if not path.is_file():
            what = "a folder that is not a Hugging Face datasets folder" if path.is_dir() else "no such file"
            raise InvalidParameterError(f"The 'source' parameter of {_OWNER} must be {_EXPECTED}. Got "
                                        f"{str(source)!r}: {what}.")
    from leanscale.data.user import load_dataset

    data = load_dataset(path, text=text_column, y=label_column)  # file errors: load_dataset's messages
    texts = list(data.texts)
    codes = data.y
    if data.texts_test is not None and data.y_test is not None:  # a DatasetDict: train, then test
        texts += list(data.texts_test)
        codes = np.concatenate([codes, data.y_test])
    names = np.array([str(c) for c in data.classes], dtype=object)  # strings whatever the format
    return texts, names[codes]


def _load_wordnet(root) -> tuple[list[str], np.ndarray]:
    from leanscale.data.wordnet import load_wordnet_glosses

    g = load_wordnet_glosses(root)
    names = np.array(g.label_names, dtype=object)
    return list(g.texts), names[np.asarray(g.labels)]


# --------------------------------------------------------------------------------------- split


def _largest_remainder(exact: np.ndarray, total: int) -> np.ndarray:
    """Integers summing to ``total`` that round ``exact`` (which sums to ``total``); ties go to the
    lower index."""
    q = np.floor(exact).astype(np.int64)
    left = total - int(q.sum())
    if left > 0:
        order = np.argsort(-(exact - q), kind="stable")
        q[order[:left]] += 1
    return q


def split_three(
    n: int,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    labels: Sequence | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic split of ``0..n-1`` into train, calibration and test indices.

    Sizes are ``fractions`` of ``n`` (largest-remainder rounding; each part gets at least one
    item). With ``labels`` the split is stratified: each class is spread over the parts in
    proportion to ``fractions``, and every class with at least 3 examples has at least one in each
    part (when many tiny classes make that conflict with the sizes, the classes win and the sizes
    move by a few items). Within a class the items are drawn by ``numpy.random.default_rng(seed)``.

    Returns:
        ``(train, calibration, test)``: sorted, disjoint int64 arrays covering ``0..n-1``.
    """
    owner = "split_three"
    check_param("n", n, [Interval(int, 3, None)], owner)
    check_param("seed", seed, [Interval(int, 0, None)], owner)
    n = int(n)
    try:
        f = np.asarray([float(v) for v in fractions], dtype=np.float64)
    except (TypeError, ValueError):
        f = np.zeros(0)
    if f.shape != (3,) or not np.all(np.isfinite(f)) or np.any(f <= 0) or abs(float(f.sum()) - 1.0) > 1e-6:
        raise InvalidParameterError(
            f"The 'fractions' parameter of {owner} must be three positive numbers (train, calibration, test) "
            f"summing to 1. Got {fractions!r} instead.")
    if labels is None:
        codes = np.zeros(n, dtype=np.int64)
    else:
        arr = np.asarray(labels, dtype=object) if not isinstance(labels, np.ndarray) else labels
        if arr.ndim != 1 or len(arr) != n:
            raise InvalidParameterError(
                f"The 'labels' parameter of {owner} must be a 1-d sequence of length n={n}. Got shape {arr.shape}.")
        _, codes = np.unique(np.asarray([str(v) for v in arr]) if arr.dtype == object else arr, return_inverse=True)
        codes = codes.ravel()
    totals = _largest_remainder(f * n, n)
    if np.any(totals == 0):
        part = ("train", "calibration", "test")[int(np.flatnonzero(totals == 0)[0])]
        raise InvalidParameterError(
            f"The 'fractions' parameter of {owner} leaves the {part} part empty for n={n}. Got {fractions!r}; "
            "use more examples or a larger fraction.")

    counts = np.bincount(codes)
    k = len(counts)
    exact = counts[:, None] * f[None, :]
    lower = np.where(counts >= 3, 1, 0)[:, None] * np.ones((1, 3), dtype=np.int64)
    quota = np.maximum(np.floor(exact).astype(np.int64), lower)
    # rows whose lower bounds overshoot the class size give back from the most over-served part
    for c in range(k):
        while quota[c].sum() > counts[c]:
            over = np.where(quota[c] > lower[c], quota[c] - exact[c], -np.inf)
            quota[c, int(np.argmax(over))] -= 1
    # hand out the remaining items of each class to the parts still below their totals,
    # largest fractional remainder first (deterministic)
    row_left = counts - quota.sum(axis=1)
    col_left = totals - quota.sum(axis=0)
    rem = exact - quota
    for flat in np.argsort(-rem, axis=None, kind="stable"):
        c, j = divmod(int(flat), 3)
        while row_left[c] > 0 and col_left[j] > 0:
            quota[c, j] += 1
            row_left[c] -= 1
            col_left[j] -= 1
    for c in np.flatnonzero(row_left > 0):  # only when lower bounds pushed a part past its total
        order = np.argsort(-rem[c], kind="stable")
        for step in range(int(row_left[c])):
            quota[c, order[step % 3]] += 1
        row_left[c] = 0

    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    parts: list[list[np.ndarray]] = [[], [], []]
    by_class = codes[perm]
    for c in range(k):
        members = perm[by_class == c]
        edges = np.cumsum(quota[c])
        for j, chunk in enumerate(np.split(members, edges[:2])):
            parts[j].append(chunk)
    return tuple(np.sort(np.concatenate(p)).astype(np.int64) for p in parts)  # type: ignore[return-value]
