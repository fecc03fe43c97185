"""Labelled texts for a cascade, from WordNet or the user's own file, and a three-way split.

* :func:`load_labelled_texts` -- ``"wordnet"`` (the 117,659 WordNet 3.0 glosses labelled by their
  lexicographer file, e.g. ``"noun.animal"``) or a path to a ``.csv``, ``.tsv`` or ``.jsonl``
  file with a text and a label column (key). Labels come back as strings, whatever the format, so
  the same data in a CSV and in a JSONL file gives the same cascade.
* :func:`split_three` -- deterministic train / calibration / test index arrays, stratified when
  labels are given: the cascade's models learn on *train*, its thresholds are chosen on
  *calibration* and the result is measured on *test*, three disjoint sets.

File formats (UTF-8; a byte-order mark is ignored):

* ``.csv`` / ``.tsv``: a header row naming the columns, then one example per row (quoted fields
  may span lines). Blank lines are skipped; a row with more or fewer fields than the header is an
  error naming its line.
* ``.jsonl`` (or ``.ndjson``): one JSON object per line, e.g. ``{"text": "refund please",
  "label": "billing"}``; blank lines are skipped. The label may be a string or an integer.

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

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from leanscale.core.errors import DataFormatError, InvalidParameterError
from leanscale.core.validation import Interval, check_param

__all__ = ["SUFFIXES", "load_labelled_texts", "split_three"]

SUFFIXES: dict[str, str] = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_OWNER = "load_labelled_texts"


# ------------------------------------------------------------------------------------- loading


def load_labelled_texts(
    source: str | os.PathLike,
    *,
    text_column: str = "text",
    label_column: str = "label",
    root: str | os.PathLike | None = None,
) -> tuple[list[str], np.ndarray]:
    """Texts and their labels from WordNet or a ``.csv`` / ``.tsv`` / ``.jsonl`` file.

    Args:
        source: ``"wordnet"`` or the path of a file (the suffix picks the format).
        text_column, label_column: the column (CSV/TSV header) or key (JSONL) holding the text
            and the label. Ignored for WordNet.
        root: folder of the WordNet data files (``None``: ``$LEANSCALE_DATA_ROOT`` or
            ``/usr/share/wordnet``). Ignored for files.

    Returns:
        ``(texts, labels)``: a list of ``n`` strings and an ``(n,)`` object array of string labels
        (for WordNet the lexicographer names, e.g. ``"verb.motion"``).

    Raises:
        InvalidParameterError: an unknown source, a missing file or an unsupported suffix, bad
            column names.
        DataFormatError: the file is empty, is not valid UTF-8 / CSV / JSON, a row lacks the text or
            label column, or a value is empty or not a string (the message names file and line).
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
            f"The 'source' parameter of {_OWNER} must be 'wordnet' or the path of a .csv, .tsv or .jsonl file. "
            f"Got {type(source).__name__} {source!r} instead.")
    path = Path(source)
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise InvalidParameterError(
            f"The 'source' parameter of {_OWNER} must be 'wordnet' or the path of a .csv, .tsv or .jsonl file. "
            f"Got {str(source)!r}, whose suffix {path.suffix or '(none)'!r} is not one of "
            f"{', '.join(sorted(SUFFIXES))}.")
    if not path.is_file():
        what = "a folder" if path.is_dir() else "no such file"
        raise InvalidParameterError(
            f"The 'source' parameter of {_OWNER} must be 'wordnet' or the path of a .csv, .tsv or .jsonl file. "
            f"Got {str(source)!r}: {what}.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise DataFormatError(f"{path}, line {line}: not valid UTF-8 ({exc.reason}).") from None
    except OSError as exc:
        raise InvalidParameterError(f"The 'source' parameter of {_OWNER} names {path}, which cannot be read: {exc}.") from None
    if fmt == "jsonl":
        texts, labels = _parse_jsonl(text, path, text_column, label_column)
    else:
        texts, labels = _parse_delimited(text, path, "\t" if fmt == "tsv" else ",", text_column, label_column)
    if not texts:
        raise DataFormatError(f"{path} holds no examples: expected {'a header row and ' if fmt != 'jsonl' else ''}"
                              f"at least one row with {text_column!r} and {label_column!r}.")
    return texts, np.array(labels, dtype=object)


def _load_wordnet(root) -> tuple[list[str], np.ndarray]:
    from leanscale.data.wordnet import load_wordnet_glosses

    g = load_wordnet_glosses(root)
    names = np.array(g.label_names, dtype=object)
    return list(g.texts), names[np.asarray(g.labels)]


def _label_value(value: Any, path: Path, line: int, column: str) -> str:
    """A label as a string: strings (non-blank) and integers; anything else is an error."""
    if isinstance(value, str):
        if not value.strip():
            raise DataFormatError(f"{path}, line {line}: the label column {column!r} is empty.")
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise DataFormatError(
        f"{path}, line {line}: the label {column!r} must be a string or an integer. Got {type(value).__name__} {value!r}.")


def _missing(path: Path, line: int, column: str, param: str, present: Sequence[str], what: str) -> DataFormatError:
    shown = ", ".join(repr(c) for c in list(present)[:20]) + (", ..." if len(present) > 20 else "")
    return DataFormatError(
        f"{path}, line {line}: no {what} {column!r} (the {param!r}); the {what}s there are: {shown or '(none)'}.")


def _parse_delimited(text: str, path: Path, delimiter: str, text_column: str, label_column: str):
    reader = csv.reader(text.splitlines(keepends=True), delimiter=delimiter, strict=True)
    texts: list[str] = []
    labels: list[str] = []
    header: list[str] | None = None
    try:
        for row in reader:
            line = reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # a blank line
            if header is None:
                header = [h.strip() for h in row]
                for column, param in ((text_column, "text_column"), (label_column, "label_column")):
                    if column not in header:
                        raise _missing(path, line, column, param, header, "column")
                ti, li = header.index(text_column), header.index(label_column)
                continue
            if len(row) != len(header):
                raise DataFormatError(
                    f"{path}, line {line}: {len(row)} field(s) where the header has {len(header)} "
                    f"({', '.join(map(repr, header))}); quote fields that contain the delimiter.")
            if not row[ti].strip():
                raise DataFormatError(f"{path}, line {line}: the text column {text_column!r} is empty.")
            texts.append(row[ti])
            labels.append(_label_value(row[li].strip(), path, line, label_column))
    except csv.Error as exc:
        raise DataFormatError(f"{path}, line {reader.line_num}: not valid {'TSV' if delimiter == chr(9) else 'CSV'}: {exc}.") from None
    return texts, labels


def _parse_jsonl(text: str, path: Path, text_column: str, label_column: str):
    texts: list[str] = []
    labels: list[str] = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError as exc:
            raise DataFormatError(f"{path}, line {line}: not valid JSON ({exc}).") from None
        if not isinstance(obj, dict):
            raise DataFormatError(
                f"{path}, line {line}: expected a JSON object such as "
                f'{{"{text_column}": "...", "{label_column}": "..."}}. Got {type(obj).__name__}.')
        for column, param in ((text_column, "text_column"), (label_column, "label_column")):
            if column not in obj:
                raise _missing(path, line, column, param, list(obj), "key")
        t = obj[text_column]
        if not isinstance(t, str):
            raise DataFormatError(
                f"{path}, line {line}: the text {text_column!r} must be a string. Got {type(t).__name__} {t!r}.")
        if not t.strip():
            raise DataFormatError(f"{path}, line {line}: the text {text_column!r} is empty.")
        texts.append(t)
        lab = obj[label_column]
        labels.append(_label_value(lab.strip() if isinstance(lab, str) else lab, path, line, label_column))
    return texts, labels


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
