"""Fashion-MNIST and the IDX file format it is stored in.

Fashion-MNIST (Xiao, Rasul and Vollgraf, 2017, arXiv:1708.07747) is 70,000 28x28 grey-scale images
of clothes in 10 balanced classes: 60,000 for training (6,000 per class) and 10,000 for testing.
The Debian package ``dataset-fashion-mnist`` installs the four original gzipped IDX files in
``/usr/share/datasets/fashion-mnist``.

IDX (LeCun et al., the MNIST file format): a 4-byte magic ``0x00 0x00 <dtype code> <ndim>``, then
``ndim`` big-endian uint32 dimension sizes, then the values in C order, big-endian.
"""

from __future__ import annotations

import functools
import gzip
import os
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from leanscale.core.validation import Interval, check_param, unknown_name_error
from leanscale.data._sampling import stratified_indices
from leanscale.data.paths import DATASETS, DataFormatError, find_file, resolve_path

if TYPE_CHECKING:
    import torch

__all__ = [
    "IDX_DTYPES",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "FashionMNIST",
    "FashionMNISTTensors",
    "read_idx",
    "write_idx",
    "load_fashion_mnist",
    "fashion_mnist_tensors",
]

# IDX dtype code -> numpy dtype (all multi-byte types are big-endian in the file).
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),  # unsigned byte
    0x09: np.dtype("i1"),  # signed byte
    0x0B: np.dtype(">i2"),  # short (2 bytes)
    0x0C: np.dtype(">i4"),  # int (4 bytes)
    0x0D: np.dtype(">f4"),  # float (4 bytes)
    0x0E: np.dtype(">f8"),  # double (8 bytes)
}

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# Mean and standard deviation of all 60,000 x 784 training pixels scaled to [0, 1]
# (population std), computed from the installed data: 0.2860405969887955 and 0.35302424451492254.
# tests/data/test_fashion_mnist.py recomputes them. The same constants normalize the test split.
FASHION_MNIST_MEAN = 0.2860406
FASHION_MNIST_STD = 0.3530242

_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class FashionMNIST(NamedTuple):
    """One split of Fashion-MNIST.

    Attributes:
        images: uint8 tensor of shape (n, 28, 28), pixel values 0..255.
        labels: int64 tensor of shape (n,), class ids 0..9.
        classes: the 10 class names, indexed by label.
    """

    images: torch.Tensor  # (n, 28, 28) uint8
    labels: torch.Tensor  # (n,) int64
    classes: tuple[str, ...]


class FashionMNISTTensors(NamedTuple):
    """Model-ready Fashion-MNIST: ``x`` float32 (n, 1, 28, 28) normalized, ``y`` int64 (n,)."""

    x: torch.Tensor  # (n, 1, 28, 28) float32
    y: torch.Tensor  # (n,) int64


# An IDX file larger than this once decompressed is refused before it is allocated (Fashion-MNIST's
# largest file is 47 MB): a small crafted .gz must not expand into all the memory there is.
MAX_IDX_BYTES = 1 << 30


def _gunzip(raw: bytes, path: Path, max_bytes: int | None = None) -> bytes:
    """Decompress a gzip stream (several members allowed), refusing output beyond ``max_bytes``
    (default :data:`MAX_IDX_BYTES`)."""
    max_bytes = MAX_IDX_BYTES if max_bytes is None else max_bytes
    out, data = [], raw
    total = 0
    try:
        while data:
            d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            while True:
                chunk = d.decompress(data, max_bytes + 1 - total)
                total += len(chunk)
                out.append(chunk)
                if total > max_bytes:
                    raise DataFormatError(
                        f"{path}: decompresses to more than {max_bytes:,} bytes; refused (not an IDX file of a "
                        f"data set this library reads, or a crafted file)."
                    )
                if d.eof or not d.unconsumed_tail:
                    break
                data = d.unconsumed_tail
            if not d.eof:
                raise EOFError("compressed file ended before the end-of-stream marker was reached")
            data = d.unused_data.lstrip(b"\x00")  # concatenated members (gzip allows them)
    except (EOFError, zlib.error) as exc:
        raise DataFormatError(
            f"{path}: corrupt or truncated gzip stream ({exc}). Re-download or reinstall the file."
        ) from None
    return b"".join(out)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzipped or raw, detected from its first bytes) into a numpy array.

    Args:
        path: the file.

    Returns:
        An array of the file's shape, in native byte order, with the dtype of its type code
        (uint8, int8, int16, int32, float32 or float64).

    Raises:
        DataFormatError: bad magic number, unknown type code, or a payload whose size does not
            match the header (truncated or padded file), a folder, or a gzip stream that is corrupt
            or decompresses beyond :data:`MAX_IDX_BYTES`; the message names the file.
        DataNotFoundError: the file does not exist (a ``FileNotFoundError``).

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "a.idx")
        >>> _ = write_idx(p, np.arange(6, dtype=np.int16).reshape(2, 3))
        >>> read_idx(p)
        array([[0, 1, 2],
               [3, 4, 5]], dtype=int16)
    """
    from leanscale.core.io import _read_bytes

    path = Path(path)
    raw = _read_bytes(path, "IDX file")
    if raw[:2] == b"\x1f\x8b":
        raw = _gunzip(raw, path)
    if len(raw) < 4:
        raise DataFormatError(f"{path}: not an IDX file: {len(raw)} bytes, shorter than the 4-byte magic.")
    zero, code, ndim = raw[:2], raw[2], raw[3]
    if zero != b"\x00\x00":
        raise DataFormatError(
            f"{path}: not an IDX file: bad magic number 0x{raw[:4].hex()} (the first two bytes "
            "must be zero)."
        )
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise DataFormatError(f"{path}: unknown IDX type code 0x{code:02X}; valid codes are {known}.")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataFormatError(
            f"{path}: truncated IDX header: {ndim} dimensions need {header} bytes, got {len(raw)}."
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    got = len(raw) - header
    if got != expected:
        what = "truncated" if got < expected else "has trailing bytes"
        raise DataFormatError(
            f"{path}: IDX payload {what}: shape {shape} of {dtype.name} needs {expected} bytes, "
            f"got {got}."
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | os.PathLike, array: np.ndarray, *, compress: bool | None = None) -> Path:
    """Write ``array`` as an IDX file (gzipped when ``compress`` or the name ends in ``.gz``).

    Used by the tests and to export subsets; the dtype must be one of :data:`IDX_DTYPES`.
    """
    path = Path(path)
    array = np.asarray(array)
    codes = {dt.newbyteorder("="): code for code, dt in IDX_DTYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        valid = ", ".join(sorted({dt.newbyteorder("=").name for dt in IDX_DTYPES.values()}))
        raise DataFormatError(f"IDX cannot store dtype {array.dtype.name}; valid dtypes are {valid}.")
    code = codes[native]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(array, dtype=IDX_DTYPES[code]).tobytes()
    if compress or (compress is None and path.suffix == ".gz"):
        payload = gzip.compress(payload, mtime=0)
    path.write_bytes(payload)
    return path


@functools.lru_cache(maxsize=8)
def _read_idx_cached(path: str, mtime_ns: int, size: int) -> np.ndarray:
    # mtime and size are part of the key so a replaced file is read again.
    arr = read_idx(path)
    arr.setflags(write=False)
    return arr


def _split_arrays(split: str, root) -> tuple[np.ndarray, np.ndarray]:
    if split not in _SPLIT_FILES:
        raise unknown_name_error("split", split, _SPLIT_FILES, owner="load_fashion_mnist")
    info = DATASETS["fashion-mnist"]
    folder = resolve_path("fashion-mnist", root, files=_SPLIT_FILES[split])
    arrays = []
    for stem in _SPLIT_FILES[split]:
        path = find_file(folder, stem, info.suffixes)
        st = path.stat()
        arrays.append(_read_idx_cached(str(path), st.st_mtime_ns, st.st_size))
    images, labels = arrays
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataFormatError(
            f"{folder}: Fashion-MNIST {split} images must be uint8 of shape (n, 28, 28); got "
            f"{images.dtype.name} {images.shape}."
        )
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataFormatError(
            f"{folder}: Fashion-MNIST {split} has {images.shape[0]} images but labels of shape "
            f"{labels.shape}."
        )
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise DataFormatError(
            f"{folder}: Fashion-MNIST {split} labels must be in 0..9; found {int(labels.max())}."
        )
    return images, labels


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> FashionMNIST:
    """Load one split of Fashion-MNIST as tensors.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).
        root: a folder with the IDX files (with or without ``.gz``); None searches
            ``$LEANSCALE_DATA_ROOT`` and the system location (see :mod:`leanscale.data.paths`).

    Returns:
        :class:`FashionMNIST` with ``images`` uint8 (n, 28, 28), ``labels`` int64 (n,) and the
        10 class names.

    Raises:
        DataNotFoundError: the files are not there; the message says how to install them.
        DataFormatError: a file is corrupt.
        InvalidParameterError: unknown ``split``.
    """
    import torch

    images, labels = _split_arrays(split, root)
    return FashionMNIST(
        images=torch.from_numpy(images.copy()),  # (n, 28, 28) uint8; copy: the cache is read-only
        labels=torch.from_numpy(labels.astype(np.int64)),  # (n,)
        classes=FASHION_MNIST_CLASSES,
    )


def fashion_mnist_tensors(
    split: str = "train",
    root: str | os.PathLike | None = None,
    n: int | None = None,
    seed: int = 0,
) -> FashionMNISTTensors:
    """Fashion-MNIST ready for a model: normalized float images and int64 labels.

    Pixels are scaled to [0, 1] and normalized with the training-set constants
    :data:`FASHION_MNIST_MEAN` and :data:`FASHION_MNIST_STD` (for both splits).

    Args:
        split: ``"train"`` or ``"test"``.
        root: folder with the IDX files, or None for the default locations.
        n: keep only ``n`` examples, drawn per class in proportion to the class sizes (so exactly
            ``n / 10`` per class on the balanced splits when ``n`` is a multiple of 10), in their
            original order. None keeps all.
        seed: seed of the subset; the same ``(split, n, seed)`` always gives the same examples.

    Returns:
        :class:`FashionMNISTTensors` ``(x, y)``: ``x`` float32 (n, 1, 28, 28), ``y`` int64 (n,).
    """
    import torch

    images, labels = _split_arrays(split, root)
    check_param("seed", seed, [Interval(int, 0, None)], owner="fashion_mnist_tensors")
    if n is not None:
        check_param("n", n, [Interval(int, 1, len(labels))], owner="fashion_mnist_tensors")
        idx = stratified_indices(labels, int(n), seed)
        images, labels = images[idx], labels[idx]
    x = images.astype(np.float32)[:, None, :, :]  # (n, 1, 28, 28)
    x = (x / np.float32(255.0) - np.float32(FASHION_MNIST_MEAN)) / np.float32(FASHION_MNIST_STD)
    return FashionMNISTTensors(
        x=torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
        y=torch.from_numpy(labels.astype(np.int64)),
    )
