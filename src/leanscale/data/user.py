"""The user's own data: one loader for every command and every format, with the same messages.

:func:`load_dataset` reads

* ``.npz`` -- arrays ``x`` and ``y`` (or the keys named by ``x=`` / ``y=``), optional ``x_test`` /
  ``y_test``; read without pickle (object arrays are refused; string labels are fine);
* ``.csv`` / ``.tsv`` / ``.jsonl`` (``.ndjson``) -- a header row (or one JSON object per line) with a
  label column and either a text column (``text=``) or numeric feature columns (``x=[...]``; default:
  every other column). A JSON value may be a list of numbers (a vector feature). JSONL rows may have
  different keys (metadata in some rows): the columns are the union of the keys, and only a row that
  lacks a column that is used (the label, the text, a feature, ``input_ids``) is an error;
* ``.parquet`` -- the same columns, through ``pyarrow`` (``pip install 'leanscale[data]'``);
* a folder saved by Hugging Face ``datasets`` (``save_to_disk``; a ``DatasetDict`` gives its
  ``train`` split and, when present, ``test``) -- needs ``datasets`` (``leanscale[data]``);
* token ids for a language model of your own (a Hugging Face ``...ForSequenceClassification``):
  an ``.npz`` array or a table column named ``input_ids`` (lists of ints, padded to one length)
  stays int64 ``(n, T)`` with ``kind="tokens"``; a tokenised ``datasets`` folder's
  ``attention_mask`` / ``token_type_ids`` columns are then not read as features;
* an image folder with one sub-folder per class (``root/cat/1.png``, ``root/dog/2.jpg``): images
  become float32 arrays ``(n, C, H, W)`` in [0, 1] (C = 1 when every image is grayscale, else 3).
  Images of different sizes are refused unless ``image_size=`` asks for a resize.

Labels may be integers or strings: they become integer codes ``y`` (0 .. k-1) and ``classes`` keeps
the original values (``classes[y[i]]`` is row ``i``'s label). Non-negative integer labels keep their
values as codes (label 7 is code 7).

Files are untrusted input: sizes are checked before reading (``max_bytes``), ``.npz`` files are
read with ``allow_pickle=False``, and every error is a :class:`~leanscale.core.errors.DataFormatError`
(or :class:`~leanscale.core.errors.InvalidParameterError` for a bad argument) whose message names
the file and what was expected: a missing column lists the columns there, a ragged row, a JSONL row
without a key that is used (with the keys it has), a non-numeric feature or an empty label names its line.

Example:
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (folder / "t.csv").write_text("a,b,label\\n1,2,cat\\n3,4,dog\\n5,6,cat\\n")
    >>> d = load_dataset(folder / "t.csv")
    >>> d.x.shape, d.y.tolist(), d.classes, d.feature_names
    ((3, 2), [0, 1, 0], ('cat', 'dog'), ('a', 'b'))
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import zipfile
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

__all__ = ["DATA_FORMATS", "UserData", "load_dataset"]

# suffix -> format; folders are image folders or Hugging Face `datasets` folders
DATA_FORMATS: dict[str, str] = {".npz": "npz", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl",
                                ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
TOKEN_COLUMN = "input_ids"  # token ids: kept as int64, kind "tokens"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm", ".ppm")
DEFAULT_MAX_BYTES = 4 * 2**30  # a file (or all the images of a folder, decoded) larger than this is refused
MAX_IMAGE_PIXELS = 2**26  # one image above this is refused before it is decoded (decompression bombs)
_INSTALL_DATA = "pip install 'leanscale[data]'"


class _Absent:
    """A JSONL row's value for a key that row does not have (rows may have different keys)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<absent>"


_ABSENT = _Absent()


class _Columns(dict):
    """JSONL columns (name -> values) that also keep every row's own keys, in the row's order (for messages)."""

    row_keys: list[list[str]]
_OWNER = "load_dataset"


@dataclass(frozen=True)
class UserData:
    """A labelled (or unlabelled) data set read by :func:`load_dataset`.

    Attributes:
        source: what was read, for messages and manifests (``"tickets.csv (csv; text column 'body',
            label column 'queue')"``).
        path: the file or folder.
        kind: ``"features"`` (x is ``(n, d)``), ``"image"`` (x is ``(n, C, H, W)``), ``"tokens"``
            (x is int64 token ids ``(n, T)``) or ``"text"`` (``texts`` holds the strings, x is None).
        x: float32 array (int64 for tokens), or None for text.
        texts: list of strings for text data, else None.
        y: int64 codes ``(n,)`` (0 .. k-1), or None for data without labels.
        classes: the original label values, ``classes[y[i]]`` being row ``i``'s label.
        feature_names: the feature columns (tables), ``("x",)`` for arrays, the text column for text.
        x_test, y_test: a test split stored with the data (``.npz`` ``x_test``/``y_test``, the ``test``
            split of a ``DatasetDict``), else None.
    """

    source: str
    path: str
    kind: str
    x: np.ndarray | None
    texts: list[str] | None
    y: np.ndarray | None
    classes: tuple = ()
    feature_names: tuple[str, ...] = ()
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    texts_test: list[str] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.texts) if self.texts is not None else int(self.x.shape[0])

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def labels(self) -> np.ndarray | None:
        """The original label of every row (an object array), or None without labels."""
        if self.y is None:
            return None
        return np.array(list(self.classes), dtype=object)[self.y]

    def split(self, test_fraction: float = 0.2, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Train and test row indices: a stratified split (every class with 2+ rows is in both)."""
        if not (isinstance(test_fraction, (int, float)) and 0 < test_fraction < 1):
            raise InvalidParameterError(
                f"The 'test_fraction' parameter of UserData.split must be in (0, 1). Got {test_fraction!r} instead.")
        n = len(self)
        rng = np.random.default_rng(seed)
        if self.y is None:
            perm = rng.permutation(n)
            k = min(n - 1, max(1, round(test_fraction * n)))
            return np.sort(perm[k:]), np.sort(perm[:k])
        train, test = [], []
        for c in np.unique(self.y):
            rows = rng.permutation(np.flatnonzero(self.y == c))
            k = 0 if len(rows) < 2 else min(len(rows) - 1, max(1, round(test_fraction * len(rows))))
            test.append(rows[:k])
            train.append(rows[k:])
        return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


# ------------------------------------------------------------------------------------ the loader


def load_dataset(
    path: str | os.PathLike,
    *,
    x: str | Sequence[str] | None = None,
    y: str | None = None,
    text: str | None = None,
    label: str | None = None,
    image_size: int | tuple[int, int] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> UserData:
    """Read the user's data set from ``path`` (the suffix, or a folder's content, picks the format).

    Args:
        path: a ``.npz``, ``.csv``, ``.tsv``, ``.jsonl``, ``.parquet`` file, an image folder (one
            sub-folder per class) or a Hugging Face ``datasets`` folder.
        x: ``.npz``: the key of the inputs (``"x"``). Tables: the feature column(s) (default: every
            column but the label and text ones).
        y: the label column (tables; default ``"label"``) or key (``.npz``; default ``"y"``,
            optional there). ``label`` is the same parameter under another name (give one).
        text: the text column of text data (tables only); the data are then ``kind="text"``.
        image_size: resize every image to this (``32`` or ``(H, W)``); without it, images of
            different sizes are an error.
        max_bytes: the largest file (or decoded image folder) accepted.

    Raises:
        InvalidParameterError: a bad argument, a path that does not exist, an unknown format.
        DataFormatError: the file is not what was expected (the message names the file, the line
            and what is wrong; a missing column lists the ones that are there).
        MissingDependencyError: ``.parquet`` or a ``datasets`` folder without ``leanscale[data]``.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidParameterError(
            f"The 'path' parameter of {_OWNER} must be a file or folder path. Got {type(path).__name__} instead.")
    if y is not None and label is not None and y != label:
        raise InvalidParameterError(
            f"The 'y' and 'label' parameters of {_OWNER} are the same parameter: give one. Got y={y!r} and "
            f"label={label!r}.")
    y = y if y is not None else label
    for name, value in (("y", y), ("text", text)):
        if value is not None and (not isinstance(value, str) or not value):
            raise InvalidParameterError(
                f"The {name!r} parameter of {_OWNER} must be a column name (a non-empty string). Got {value!r} instead.")
    if x is not None:
        cols = [x] if isinstance(x, str) else x
        if not isinstance(cols, (list, tuple)) or not cols or not all(isinstance(c, str) and c for c in cols):
            raise InvalidParameterError(
                f"The 'x' parameter of {_OWNER} must be a column name or a list of them. Got {x!r} instead.")
    if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 1:
        raise InvalidParameterError(f"The 'max_bytes' parameter of {_OWNER} must be a positive int. Got {max_bytes!r}.")
    size = _check_image_size(image_size)
    p = Path(path).expanduser()
    if p.is_dir():
        if _is_datasets_folder(p):
            return _load_hf(p, x, y, text, max_bytes)
        return _load_image_folder(p, size, max_bytes)
    if not p.exists():
        raise InvalidParameterError(
            f"The 'path' parameter of {_OWNER} must be an existing file or folder. Got {str(path)!r}: no such "
            f"file or folder.")
    fmt = DATA_FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise InvalidParameterError(
            f"The 'path' parameter of {_OWNER} must be a {', '.join(sorted(DATA_FORMATS))} file, an image folder "
            f"(one sub-folder per class) or a Hugging Face datasets folder. Got {str(path)!r}, whose suffix "
            f"{p.suffix or '(none)'!r} is none of these.")
    _check_size(p, max_bytes)
    if fmt == "npz":
        if text is not None:
            raise InvalidParameterError(
                f"The 'text' parameter of {_OWNER} is for tables (csv, jsonl, parquet). Got text={text!r} for the "
                f".npz file {str(p)!r}.")
        return _load_npz(p, x, y, max_bytes)
    if fmt == "parquet":
        columns, lines = _read_parquet(p), None
    else:
        columns, lines = _read_jsonl(p) if fmt == "jsonl" else _read_delimited(p, "\t" if fmt == "tsv" else ",")
    return _from_columns(p, fmt, columns, lines, x, y, text)


# ------------------------------------------------------------------------------------- checks


def _is_datasets_folder(p: Path) -> bool:
    """Whether the folder ``p`` was written by Hugging Face ``datasets`` (``save_to_disk``)."""
    return (p / "dataset_dict.json").is_file() or (p / "state.json").is_file()


def _check_image_size(image_size) -> tuple[int, int] | None:
    if image_size is None:
        return None
    pair = (image_size, image_size) if isinstance(image_size, int) else image_size
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 8192 for v in pair)):
        raise InvalidParameterError(
            f"The 'image_size' parameter of {_OWNER} must be None, an int or (height, width) in 1..8192. "
            f"Got {image_size!r} instead.")
    return int(pair[0]), int(pair[1])


def _check_size(p: Path, max_bytes: int) -> int:
    size = p.stat().st_size
    if size > max_bytes:
        raise DataFormatError(f"The data file {str(p)!r} must be at most {max_bytes:,} bytes. Got {size:,} bytes.")
    if size == 0:
        raise DataFormatError(f"The data file {str(p)!r} is empty: expected {_expected(p)}.")
    return size


def _expected(p: Path) -> str:
    fmt = DATA_FORMATS.get(p.suffix.lower())
    return {"npz": "a .npz archive with arrays x and y",
            "jsonl": "one JSON object per line with the feature (or text) and label keys",
            "parquet": "a parquet table with the feature (or text) and label columns"}.get(
        fmt, "a header row naming the columns, then one example per row")


def _columns_list(names) -> str:
    names = list(names)
    return (", ".join(repr(c) for c in names[:30]) + (f", ... ({len(names)} in all)" if len(names) > 30 else "")) \
        or "(none)"


def _missing_column(p: Path, column: str, param: str, present, what: str = "column") -> DataFormatError:
    flag = {"label": "--label-column", "text": "--text-column", "x": "--feature-columns"}[param]
    return DataFormatError(
        f"The data file {str(p)!r} has no {what} {column!r} (the {param} {what}: {param}= in Python, {flag} on the "
        f"command line). Its {what}s are: {_columns_list(present)}.")


def _row(p: Path, line) -> str:
    return f"{str(p)!r}, line {line}" if isinstance(line, int) else f"{str(p)!r}, row {line[1]}"


def _require(columns: dict[str, list], column: str, role: str, where) -> list:
    """The values of a column that is used; a JSONL row without that key is an error naming its line, the
    missing key and the keys the row has (only JSONL rows can lack a key: see :func:`_read_jsonl`)."""
    values = columns[column]
    for i, v in enumerate(values):
        if v is _ABSENT:
            rows = getattr(columns, "row_keys", None)
            has = rows[i] if rows is not None else [k for k, vs in columns.items() if vs[i] is not _ABSENT]
            raise DataFormatError(f"{where(i)}: no key {column!r} ({role}). This row's keys are: {_columns_list(has)}.")
    return values


# --------------------------------------------------------------------------------------- labels


def _encode_labels(values: Sequence[Any], where) -> tuple[np.ndarray, tuple]:
    """Integer codes and the classes. ``where(i)`` names row ``i`` in a message."""
    ints, strs = [], False
    for i, v in enumerate(values):
        if isinstance(v, (bool, np.bool_)):
            raise DataFormatError(f"{where(i)}: the label must be an integer or a string. Got {v!r}.")
        if isinstance(v, (int, np.integer)):
            ints.append(int(v))
        elif isinstance(v, (float, np.floating)):
            if not math.isfinite(v) or v != int(v):
                raise DataFormatError(
                    f"{where(i)}: the label must be an integer or a string (a class). Got {v!r}: a number with a "
                    f"fraction (a regression target?) or not finite.")
            ints.append(int(v))
        elif isinstance(v, str):
            if not v.strip():
                raise DataFormatError(f"{where(i)}: the label is empty.")
            strs = True
        else:
            raise DataFormatError(
                f"{where(i)}: the label must be an integer or a string. Got {type(v).__name__} {v!r:.80}.")
    if not strs and ints and min(ints) >= 0:
        codes = np.asarray(ints, dtype=np.int64)
        if int(codes.max()) >= 2**24:
            raise DataFormatError(f"{where(int(codes.argmax()))}: the label {int(codes.max())} is too large for a "
                                  f"class index (at most {2**24 - 1:,}); use strings for such labels.")
        return codes, tuple(range(int(codes.max()) + 1))
    if strs:  # strings (numbers among them are read as their text)
        keys = [v.strip() if isinstance(v, str) else str(int(v)) for v in values]
    else:
        keys = [int(v) for v in values]
    classes = tuple(sorted(set(keys)))
    index = {c: i for i, c in enumerate(classes)}
    return np.fromiter((index[k] for k in keys), dtype=np.int64, count=len(keys)), classes


def _csv_label(value: str) -> Any:
    """A CSV label: an integer when it reads as one, else the string."""
    s = value.strip()
    try:
        n = int(s)
    except ValueError:
        return s
    return n if str(n) == s else s  # "007" and "+7" stay as written


# ---------------------------------------------------------------------------------------- npz


def _load_npz(p: Path, x_key, y_key, max_bytes) -> UserData:
    from leanscale.core.io import read_npz

    with open(p, "rb") as fh:
        head = fh.read(4)
    if head not in (b"PK\x03\x04", b"PK\x05\x06"):
        raise DataFormatError(
            f"The data file {str(p)!r} must be a .npz archive (numpy.savez) with arrays x and y. Got a file that is "
            f"not a zip archive (it starts with {head!r}): a text/CSV file or another format.")
    try:  # the arrays' size once decompressed, before they are read (a zip bomb is refused)
        with zipfile.ZipFile(p) as z:
            total = sum(info.file_size for info in z.infolist())
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataFormatError(f"The data file {str(p)!r} is not a readable .npz archive ({exc}).") from None
    if total > max_bytes:
        raise DataFormatError(
            f"The data file {str(p)!r} must hold at most {max_bytes:,} bytes of arrays. Got {total:,} bytes once "
            f"decompressed.")
    arrays = read_npz(p, what="data file")
    if not arrays:
        raise DataFormatError(f"The data file {str(p)!r} is empty: expected arrays x and y.")
    if x_key is not None and not isinstance(x_key, str):
        raise InvalidParameterError(
            f"The 'x' parameter of {_OWNER} must be one array name for a .npz file. Got {x_key!r} for {str(p)!r}.")
    xk = x_key or next((k for k in ("x", "X", "features", "embeddings", TOKEN_COLUMN) if k in arrays), None)
    if xk is None or xk not in arrays:
        raise DataFormatError(
            f"The data file {str(p)!r} has no array {xk or 'x'!r} (the inputs: x= in Python, --feature-columns on "
            f"the command line). Its arrays are: {_columns_list(sorted(arrays))}.")
    yk = y_key or next((k for k in ("y", "Y", "labels", "label") if k in arrays), None)
    if y_key is not None and y_key not in arrays:
        raise _missing_column(p, y_key, "label", sorted(arrays), what="array")
    read_x = _token_array if xk == TOKEN_COLUMN else _numeric_array
    xa = read_x(p, xk, arrays[xk])
    ya = None
    if yk is not None:
        ya, classes = _npz_labels(p, yk, arrays[yk], xa.shape[0])
    else:
        classes = ()
    xt = yt = None
    if "x_test" in arrays:
        xt = read_x(p, "x_test", arrays["x_test"])
        if xt.shape[1:] != xa.shape[1:]:
            raise DataFormatError(
                f"The 'x_test' array of {str(p)!r} must have the shape of x's rows {xa.shape[1:]}. Got {xt.shape[1:]}.")
        if "y_test" in arrays and ya is not None:  # one coding for both splits
            raw = np.asarray(arrays["y_test"])
            if raw.ndim != 1 or raw.shape[0] != xt.shape[0]:
                raise DataFormatError(
                    f"The labels 'y_test' of {str(p)!r} must be a 1-d array with one label per row of x_test "
                    f"({xt.shape[0]}). Got shape {raw.shape}.")
            values = _label_values(p, yk, arrays[yk]) + _label_values(p, "y_test", raw)
            codes, classes = _encode_labels(values, lambda i: f"The labels {yk!r}/'y_test' of {str(p)!r}, row {i}")
            ya, yt = codes[: xa.shape[0]], codes[xa.shape[0]:]
    kind = "tokens" if xk == TOKEN_COLUMN else "image" if xa.ndim == 4 else "features"
    if xa.ndim == 3 and kind != "tokens":  # (n, H, W) grayscale images
        xa, kind = xa[:, None], "image"
        xt = None if xt is None else xt[:, None]
    if xa.ndim not in (2, 4) or (kind == "tokens" and xa.ndim != 2):
        raise DataFormatError(
            f"The array {xk!r} of {str(p)!r} must be 2-d features (n, d) or images (n, H, W) / (n, C, H, W). Got "
            f"shape {xa.shape}.")
    return UserData(source=f"{p.name} (npz; x={xk!r}" + (f", y={yk!r})" if yk else ", no labels)"), path=str(p),
                    kind=kind, x=xa, texts=None, y=ya, classes=classes, feature_names=(xk,), x_test=xt, y_test=yt)


def _token_array(p: Path, key: str, value) -> np.ndarray:
    """Token ids: a 2-d array of non-negative integers ``(n, T)``, kept as int64."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "iu" or arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataFormatError(
            f"The array {key!r} of {str(p)!r} must hold token ids: a non-empty 2-d integer array (n, sequence "
            f"length), padded to one length. Got dtype {arr.dtype} and shape {arr.shape}.")
    if arr.min() < 0 or (arr.dtype.kind == "u" and arr.dtype.itemsize == 8 and arr.max() > np.iinfo(np.int64).max):
        row = int(np.argwhere(arr < 0)[0][0]) if arr.min() < 0 else 0
        raise DataFormatError(
            f"The array {key!r} of {str(p)!r} must hold token ids >= 0. Got {int(arr.min())} in row {row}.")
    return arr.astype(np.int64)


def _numeric_array(p: Path, key: str, value) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise DataFormatError(
            f"The array {key!r} of {str(p)!r} must be numeric (the features). Got dtype {arr.dtype}.")
    if arr.ndim < 2 and key != "y":
        arr = arr.reshape(-1, 1)
    if arr.shape[0] == 0:
        raise DataFormatError(f"The array {key!r} of {str(p)!r} is empty: expected one row per example.")
    out = arr.astype(np.float32)
    bad = ~np.isfinite(out)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise DataFormatError(
            f"The array {key!r} of {str(p)!r} must hold finite numbers. Got {float(out[bad][0])!r} in row {row} (a value "
            f"beyond float32's range counts as infinite).")
    return out


def _npz_labels(p: Path, key: str, value, n: int) -> tuple[np.ndarray, tuple]:
    arr = np.asarray(value)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise DataFormatError(
            f"The labels {key!r} of {str(p)!r} must be a 1-d array with one label per row of x ({n}). Got shape "
            f"{arr.shape}.")
    return _encode_labels(_label_values(p, key, arr), lambda i: f"The labels {key!r} of {str(p)!r}, row {i}")


def _label_values(p: Path, key: str, value) -> list:
    arr = np.asarray(value)
    if arr.dtype.kind not in "biufUS":
        raise DataFormatError(f"The labels {key!r} of {str(p)!r} must be integers or strings. Got dtype {arr.dtype}.")
    if arr.dtype.kind == "S":
        arr = np.char.decode(arr, "utf-8", errors="replace")
    return arr.astype(str).tolist() if arr.dtype.kind == "U" else arr.tolist()


# -------------------------------------------------------------------------------------- tables


def _read_text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        line = p.read_bytes()[: exc.start].count(b"\n") + 1
        raise DataFormatError(f"{str(p)!r}, line {line}: not valid UTF-8 ({exc.reason}).") from None


def _read_delimited(p: Path, delimiter: str) -> tuple[dict[str, list], list[int]]:
    """Columns (lists of strings) and the line of every row."""
    text = _read_text(p)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header: list[str] | None = None
    rows: list[list[str]] = []
    lines: list[int] = []
    try:
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # a blank line
            if header is None:
                header = [h.strip() for h in row]
                dup = sorted({h for h in header if header.count(h) > 1})
                if dup or not all(header):
                    raise DataFormatError(
                        f"{_row(p, reader.line_num)}: the header row must name every column once. Got "
                        f"{_columns_list(header)}" + (f" ({_columns_list(dup)} repeated)." if dup else " (an empty name)."))
                continue
            if len(row) != len(header):
                raise DataFormatError(
                    f"{_row(p, reader.line_num)}: {len(row)} field(s) where the header has {len(header)} "
                    f"({_columns_list(header)}): a ragged row; quote fields that contain the delimiter.")
            rows.append(row)
            lines.append(reader.line_num)
    except csv.Error as exc:
        kind = "TSV" if delimiter == "\t" else "CSV"
        raise DataFormatError(f"{_row(p, reader.line_num)}: not valid {kind}: {exc}.") from None
    if header is None or not rows:
        raise DataFormatError(f"The data file {str(p)!r} holds no examples: expected {_expected(p)}.")
    return {h: [r[j] for r in rows] for j, h in enumerate(header)}, lines


def _read_jsonl(p: Path) -> tuple[dict[str, list], list[int]]:
    text = _read_text(p)
    objs, lines = [], []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError as exc:
            raise DataFormatError(f"{_row(p, line)}: not valid JSON ({exc}).") from None
        if not isinstance(obj, dict):
            raise DataFormatError(
                f"{_row(p, line)}: expected a JSON object such as {{\"text\": \"...\", \"label\": \"...\"}}. Got "
                f"{type(obj).__name__}.")
        objs.append(obj)
        lines.append(line)
    if not objs:
        raise DataFormatError(f"The data file {str(p)!r} holds no examples: expected {_expected(p)}.")
    # Rows may have different keys (metadata in some rows): the columns are the union of the keys, in the
    # order they first appear, and a row without a key holds _ABSENT there. Only the columns that are used
    # (label, text, features, token ids) must be in every row: _from_columns checks them (_require).
    keys = list(dict.fromkeys(k for obj in objs for k in obj))
    columns = _Columns((k, [o.get(k, _ABSENT) for o in objs]) for k in keys)
    columns.row_keys = [list(o) for o in objs]
    return columns, lines


def _read_parquet(p: Path) -> dict[str, list]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise MissingDependencyError(
            f"Reading the parquet file {str(p)!r} needs pyarrow, which is not installed ({exc}). Install it with: "
            f"{_INSTALL_DATA}") from None
    try:
        table = pq.read_table(p)
    except Exception as exc:  # noqa: BLE001 -- pyarrow.ArrowInvalid and friends: a damaged file
        raise DataFormatError(f"The data file {str(p)!r} is not a readable parquet file ({type(exc).__name__}: "
                              f"{exc}).") from None
    if table.num_rows == 0:
        raise DataFormatError(f"The data file {str(p)!r} holds no examples: expected {_expected(p)}.")
    return table.to_pydict()


def _from_columns(p: Path, fmt: str, columns: dict[str, list], lines, x, y, text,
                  class_names: Sequence[str] | None = None, test: dict[str, list] | None = None) -> UserData:
    def where(i: int) -> str:
        return _row(p, lines[i] if lines is not None else (None, i + 1))

    label_col = y or "label"
    present = list(columns)
    if label_col not in columns:
        if y is None and text is None and x is None and "labels" in columns:
            label_col = "labels"
        else:
            raise _missing_column(p, label_col, "label", present)
    raw_labels = _require(columns, label_col, "the label column", where)
    if fmt == "csv" or fmt == "tsv":
        raw_labels = [_csv_label(v) for v in raw_labels]
    if class_names is not None:  # a Hugging Face ClassLabel: the codes and their names
        raw_labels = [class_names[int(v)] if isinstance(v, (int, np.integer)) and 0 <= int(v) < len(class_names)
                      else v for v in raw_labels]
    codes, classes = _encode_labels(raw_labels, where)
    describe = f"label column {label_col!r}"
    if text is not None:
        if text not in columns:
            raise _missing_column(p, text, "text", present)
        if text == label_col:
            raise InvalidParameterError(
                f"The 'text' and label columns of {_OWNER} must differ. Got {text!r} for both ({str(p)!r}).")
        texts = _texts(_require(columns, text, "the text column", where), where, text)
        return UserData(source=f"{p.name} ({fmt}; text column {text!r}, {describe})", path=str(p), kind="text",
                        x=None, texts=texts, y=codes, classes=classes, feature_names=(text,))
    if x is None and TOKEN_COLUMN in columns and TOKEN_COLUMN != label_col:
        x = TOKEN_COLUMN  # a tokenised data set: attention_mask, token_type_ids are not features
    if x == TOKEN_COLUMN or (isinstance(x, (list, tuple)) and list(x) == [TOKEN_COLUMN]):
        tokens = _token_column(p, _require(columns, TOKEN_COLUMN, "the token ids column", where)
                               if TOKEN_COLUMN in columns else None, where, present)
        return UserData(source=f"{p.name} ({fmt}; token ids {TOKEN_COLUMN!r}, {describe})", path=str(p),
                        kind="tokens", x=tokens, texts=None, y=codes, classes=classes, feature_names=(TOKEN_COLUMN,))
    names = [x] if isinstance(x, str) else list(x) if x is not None else [c for c in present if c != label_col]
    for c in names:
        if c not in columns:
            raise _missing_column(p, c, "x", present)
    if label_col in names:
        raise InvalidParameterError(
            f"The 'x' parameter of {_OWNER} must not include the label column {label_col!r} ({str(p)!r}).")
    if not names:
        raise DataFormatError(
            f"The data file {str(p)!r} has no feature columns besides the label {label_col!r}: expected numeric "
            f"feature columns, or a text column (text= in Python, --text-column on the command line).")
    role = ("a feature column" if x is not None else
            "a feature column: every column but the label is one unless x= / --feature-columns chooses them")
    blocks = [_feature_column(p, c, _require(columns, c, role, where), where, fmt) for c in names]
    xa = np.concatenate(blocks, axis=1) if len(blocks) > 1 else blocks[0]
    return UserData(source=f"{p.name} ({fmt}; {len(names)} feature column(s), {describe})", path=str(p),
                    kind="features", x=xa, texts=None, y=codes, classes=classes, feature_names=tuple(names))


def _token_column(p: Path, values: list | None, where, present) -> np.ndarray:
    """The ``input_ids`` column as int64 ``(n, T)``: lists of non-negative ints of one length."""
    if values is None:
        raise _missing_column(p, TOKEN_COLUMN, "x", present)
    width = None
    for i, v in enumerate(values):
        if isinstance(v, str) or not isinstance(v, (list, tuple, np.ndarray)):
            raise DataFormatError(f"{where(i)}: the token column {TOKEN_COLUMN!r} must hold lists of token ids. Got "
                                  f"{type(v).__name__} {v!r:.60}.")
        if width is None:
            width = len(v)
        elif len(v) != width:
            raise DataFormatError(
                f"{where(i)}: the token column {TOKEN_COLUMN!r} holds {len(v)} token ids where the first row holds "
                f"{width}: pad every row to one length (the tokenizer's padding='max_length').")
        for t in v:
            if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)) or t < 0:
                raise DataFormatError(f"{where(i)}: the token column {TOKEN_COLUMN!r} must hold integer token ids "
                                      f">= 0. Got {t!r:.40}.")
    if not width:
        raise DataFormatError(f"{where(0)}: the token column {TOKEN_COLUMN!r} holds an empty list.")
    return np.asarray(values, dtype=np.int64).reshape(len(values), width)


def _texts(values: list, where, column: str) -> list[str]:
    out = []
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise DataFormatError(f"{where(i)}: the text column {column!r} must hold strings. Got "
                                  f"{type(v).__name__} {v!r:.80}.")
        if not v.strip():
            raise DataFormatError(f"{where(i)}: the text column {column!r} is empty.")
        out.append(v)
    return out


def _feature_column(p: Path, column: str, values: list, where, fmt: str) -> np.ndarray:
    """One feature column as float32 ``(n, width)``: numbers (or numeric strings in CSV), or lists of numbers."""
    hint = (" Feature columns must be numeric: pass the text column as text= (--text-column), or choose the "
            "feature columns with x= (--feature-columns).")
    rows = []
    width = None
    for i, v in enumerate(values):
        if isinstance(v, str):
            try:
                v = float(v) if fmt in ("csv", "tsv") else v
            except ValueError:
                pass
        if isinstance(v, (list, tuple, np.ndarray)):
            vec = list(v)
        else:
            vec = [v]
        if width is None:
            width = len(vec)
        elif len(vec) != width:
            raise DataFormatError(
                f"{where(i)}: the feature column {column!r} holds {len(vec)} value(s) where the first row holds "
                f"{width}: a ragged row.")
        for item in vec:
            if isinstance(item, (bool, np.bool_)) or not isinstance(item, (int, float, np.integer, np.floating)):
                shown = "an empty field" if isinstance(item, str) and not item.strip() else f"{item!r:.60}"
                raise DataFormatError(
                    f"{where(i)}: the feature column {column!r} must hold numbers. Got {shown}.{hint}")
            if not math.isfinite(float(item)):
                raise DataFormatError(f"{where(i)}: the feature column {column!r} must hold finite numbers. "
                                      f"Got {item!r}.")
        rows.append(vec)
    if not width:
        raise DataFormatError(f"{where(0)}: the feature column {column!r} holds an empty list.")
    out = np.asarray(rows, dtype=np.float64)
    if np.any(np.abs(out) > np.finfo(np.float32).max):
        i = int(np.argwhere(np.abs(out) > np.finfo(np.float32).max)[0][0])
        raise DataFormatError(f"{where(i)}: the feature column {column!r} holds a value beyond float32's range.")
    return out.astype(np.float32).reshape(len(rows), width)


# ---------------------------------------------------------------------------- Hugging Face datasets


def _load_hf(p: Path, x, y, text, max_bytes) -> UserData:
    try:
        import datasets
    except ImportError as exc:
        raise MissingDependencyError(
            f"Reading the Hugging Face datasets folder {str(p)!r} needs the datasets package, which is not "
            f"installed ({exc}). Install it with: {_INSTALL_DATA}") from None
    size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    if size > max_bytes:
        raise DataFormatError(f"The data folder {str(p)!r} must hold at most {max_bytes:,} bytes. Got {size:,} bytes.")
    try:
        loaded = datasets.load_from_disk(str(p))
    except Exception as exc:  # noqa: BLE001 -- FileNotFoundError, arrow errors: a damaged folder
        raise DataFormatError(
            f"The data folder {str(p)!r} is not a readable Hugging Face datasets folder (written by "
            f"save_to_disk): {type(exc).__name__}: {exc}.") from None
    test = None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if not splits:
            raise DataFormatError(f"The data folder {str(p)!r} holds a DatasetDict without splits.")
        train = loaded["train"] if "train" in loaded else loaded[splits[0]]
        test = loaded["test"] if "test" in loaded and "train" in loaded else None
    else:
        train = loaded
    if train.num_rows == 0:
        raise DataFormatError(f"The data folder {str(p)!r} holds no examples.")
    label_col = y or ("label" if "label" in train.column_names else "labels")
    names = None
    feature = train.features.get(label_col)
    if feature is not None and isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
    data = _from_columns(p, "datasets", train.to_dict(), None, x, y, text, class_names=names)
    if test is None or test.num_rows == 0:
        return data
    t = _from_columns(p, "datasets", test.to_dict(), None, x, y, text, class_names=names)
    if t.kind != data.kind or (t.x is not None and t.x.shape[1:] != data.x.shape[1:]):
        raise DataFormatError(f"The 'test' split of {str(p)!r} does not have the columns of its 'train' split.")
    classes = tuple(sorted(set(data.classes) | set(t.classes), key=lambda c: (isinstance(c, str), c)))
    index = {c: i for i, c in enumerate(classes)}
    remap = lambda d: np.array([index[d.classes[c]] for c in d.y], dtype=np.int64)
    return UserData(**{**data.__dict__, "source": data.source.replace("(datasets;", "(datasets, train/test;"),
                       "y": remap(data), "classes": classes, "x_test": t.x, "y_test": remap(t),
                       "texts_test": t.texts})


# -------------------------------------------------------------------------------------- images


def _load_image_folder(p: Path, size: tuple[int, int] | None, max_bytes: int) -> UserData:
    from PIL import Image, UnidentifiedImageError

    subdirs = sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = {d.name: sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
             for d in subdirs}
    files = {k: v for k, v in files.items() if v}
    if not files:
        raise DataFormatError(
            f"The data folder {str(p)!r} must hold one sub-folder of images ({', '.join(IMAGE_SUFFIXES)}) per class, "
            f"or be a Hugging Face datasets folder (save_to_disk). Got sub-folders {_columns_list(d.name for d in subdirs)}"
            f" without images.")
    images, labels, modes, first = [], [], set(), None
    total = 0
    for code, (cls, paths) in enumerate(files.items()):
        for f in paths:
            try:
                with Image.open(f) as im:
                    w, h = im.size
                    if w * h > MAX_IMAGE_PIXELS:
                        raise DataFormatError(
                            f"The image {str(f)!r} has {w}x{h} pixels: more than the {MAX_IMAGE_PIXELS:,} accepted.")
                    if size is None:
                        if first is None:
                            first = (f, (h, w))
                        elif (h, w) != first[1]:
                            raise DataFormatError(
                                f"The images of {str(p)!r} must all have one size (or pass image_size= / "
                                f"--image-size to resize them). Got {first[1][0]}x{first[1][1]} (height x width) for "
                                f"{str(first[0])!r} and {h}x{w} for {str(f)!r}.")
                    gray = im.mode in ("1", "L", "LA", "I", "I;16", "F")
                    img = im.convert("L" if gray else "RGB")
                    if size is not None and (h, w) != size:
                        img = img.resize((size[1], size[0]), Image.BILINEAR)
            except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
                raise DataFormatError(f"The image {str(f)!r} cannot be read: {exc}.") from None
            arr = np.asarray(img, dtype=np.uint8)
            total += arr.size * 4 * (3 if gray else 1)
            if total > max_bytes:
                raise DataFormatError(
                    f"The images of {str(p)!r} take more than {max_bytes:,} bytes as float32: too many or too large.")
            modes.add("L" if gray else "RGB")
            images.append(arr)
            labels.append(code)
    if "RGB" in modes:  # one channel count for all: grayscale images become RGB
        images = [np.repeat(a[:, :, None], 3, axis=2) if a.ndim == 2 else a for a in images]
        x = np.stack(images).transpose(0, 3, 1, 2)
    else:
        x = np.stack(images)[:, None]
    x = (x.astype(np.float32) / 255.0)
    return UserData(source=f"{p.name}/ (image folder; {len(files)} classes, {x.shape[1]}x{x.shape[2]}x{x.shape[3]})",
                    path=str(p), kind="image", x=x, texts=None, y=np.asarray(labels, dtype=np.int64),
                    classes=tuple(files), feature_names=("pixels",))
