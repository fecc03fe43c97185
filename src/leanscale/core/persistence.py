"""One persistence for fitted objects: numeric arrays + a JSON manifest, atomic, versioned, no pickle.

A fitted class registers under a *kind* (the manifest's ``"class"`` field) and provides two
methods::

    @register_fitted("TfidfClassifier")
    class TfidfClassifier(Fitted):
        def get_state(self) -> tuple[dict, dict[str, np.ndarray]]: ...   # (meta, arrays)
        @classmethod
        def from_state(cls, meta, arrays, **kwargs): ...                 # the inverse

``meta`` is a JSON-able dict that names the kind (``meta["class"]``); ``arrays`` maps names to
numeric numpy arrays (weights). :class:`Fitted` adds ``save(folder)`` / ``Class.load(folder)``;
:func:`load_fitted` loads a folder of any registered kind (the registry replaces per-module
dispatch code: a kind is known once the module that defines it is imported, e.g.
``import leanscale.cascade``).

On disk a save is a folder with

* ``arrays-<sha256[:16]>.safetensors`` (``.npz`` when safetensors is not installed): the arrays,
  named by their content, so a new save never overwrites the file an older manifest names;
* ``meta.json``: ``meta`` plus ``"format_version"`` (this module's :data:`FORMAT_VERSION`; a
  newer one is refused, an absent one reads as 1: the saves of leanscale <= 0.x), the arrays
  file's name and its sha256. Written last: its atomic rename is the commit point, so a save
  killed between the two writes leaves the previous save readable.

Files are untrusted input: nothing is unpickled, sizes are checked before anything is read or
allocated (a ``.npz``'s declared array sizes from its headers, refusing zip bombs), the arrays
file must lie inside the folder and match its recorded hash, and only numeric/bool arrays are
accepted. The lower-level pieces (:func:`save_arrays`/:func:`load_arrays` for one file,
:func:`write_arrays_addressed`/:func:`read_arrays_checked` for content-addressed arrays beside a
JSON of another layout, such as a saved cascade) are public too.

Outputs whose file names and formats users rely on (``scores.npy`` + ``kept.npy`` +
``manifest.json`` of the pruner) cannot be content-addressed; :func:`write_with_manifest` writes
such named files and then a JSON manifest recording their sha256 and a ``"format_version"`` (the
commit point: a reader can tell files that do not belong to the manifest beside them), and
:func:`read_manifest` / :func:`verify_recorded_file` read it back. :func:`check_format_version`
is the one version rule (absent reads as 1, a newer one is refused) for every versioned file,
including those that are not JSON (torch checkpoints record their version under their own key).

Example:
    >>> import tempfile
    >>> @register_fitted("doctest.Scale")
    ... class Scale(Fitted):
    ...     def __init__(self, w=None):
    ...         self.w = w
    ...     def get_state(self):
    ...         return {"class": "doctest.Scale"}, {"w": self.w}
    ...     @classmethod
    ...     def from_state(cls, meta, arrays):
    ...         return cls(arrays["w"])
    >>> folder = Scale(np.arange(3.0)).save(tempfile.mkdtemp())
    >>> load_fitted(folder).w.tolist()
    [0.0, 1.0, 2.0]
    >>> _ = _REGISTRY.pop("doctest.Scale")  # (the example's kind is not kept)
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
from collections.abc import Callable, Mapping
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
    sha256_file,
)

__all__ = [
    "FORMAT_VERSION",
    "Fitted",
    "arrays_bytes",
    "check_format_version",
    "fitted_class",
    "fitted_from_state",
    "from_state_of_file",
    "load_arrays",
    "load_fitted",
    "load_state",
    "npy_bytes",
    "read_arrays_checked",
    "read_json_file",
    "read_manifest",
    "register_fitted",
    "registered_kinds",
    "save_arrays",
    "save_state",
    "verify_recorded_file",
    "write_arrays_addressed",
    "write_with_manifest",
]

#: version of the folder layout written by :func:`save_state` (``meta.json``'s ``"format_version"``)
FORMAT_VERSION = 1
META_FILE = "meta.json"
ARRAYS_FILE = "arrays.safetensors"  # the fixed names of saves before content addressing
ARRAYS_FILE_NPZ = "arrays.npz"
_ARRAYS_KEY = "arrays_file"
_SHA_KEY = "arrays_sha256"
_VERSION_KEY = "format_version"
_RESERVED = (_VERSION_KEY, _ARRAYS_KEY, _SHA_KEY)

# Files are untrusted: sizes are checked before anything is read or allocated.
MAX_ARRAYS_BYTES = 1 << 30  # an arrays file (and the arrays it declares) is at most 1 GiB
MAX_META_BYTES = 256 << 20  # a meta.json is at most 256 MiB (a 50k-term vocabulary is ~1 MB)
_NPZ_MAX_RATIO = 64  # declared (uncompressed) bytes per stored byte of a .npz: more is a zip bomb


# ---------------------------------------------------------------------------------------------
# The registry of fitted kinds
# ---------------------------------------------------------------------------------------------

_REGISTRY: dict[str, type] = {}


def register_fitted(kind: str) -> Callable[[type], type]:
    """Class decorator: register ``cls`` as the loader of manifests whose ``"class"`` is ``kind``.

    The class must define ``get_state()`` and the classmethod ``from_state(meta, arrays,
    **kwargs)``; it gets the attribute ``_fitted_kind``. A kind belongs to one class: registering
    another class under a taken kind raises (re-registering the same class, e.g. after a module
    reload, replaces it).
    """
    if not isinstance(kind, str) or not kind:
        raise InvalidParameterError(f"The 'kind' parameter of register_fitted must be a non-empty str. Got {kind!r}.")

    def decorator(cls: type) -> type:
        for method in ("get_state", "from_state"):
            if not callable(getattr(cls, method, None)):
                raise InvalidParameterError(
                    f"The class {cls.__qualname__} registered as {kind!r} must define {method}(); it does not.")
        old = _REGISTRY.get(kind)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise InvalidParameterError(
                f"The kind {kind!r} is already registered by {old.__module__}.{old.__qualname__}; "
                f"{cls.__module__}.{cls.__qualname__} must use another.")
        cls._fitted_kind = kind
        _REGISTRY[kind] = cls
        return cls

    return decorator


def registered_kinds() -> list[str]:
    """The kinds registered so far, sorted (a kind registers when its module is imported)."""
    return sorted(_REGISTRY)


def fitted_class(kind: Any, *, owner: str = "fitted_class") -> type:
    """The class registered under ``kind``; an unknown kind is refused with the known ones listed."""
    cls = _REGISTRY.get(kind) if isinstance(kind, str) else None
    if cls is None:
        known = ", ".join(map(repr, registered_kinds())) or "none (import the package that defines it)"
        raise InvalidParameterError(
            f"The 'meta' parameter of {owner} must have 'class' set to one of {known}. Got {kind!r} instead.")
    return cls


def _check_kwargs(cls: type, kwargs: Mapping[str, Any], owner: str) -> None:
    """Refuse keyword arguments that ``cls.from_state`` does not take (instead of a TypeError
    that would be blamed on the file)."""
    params = inspect.signature(cls.from_state).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    valid = [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY
             or (p.kind is p.POSITIONAL_OR_KEYWORD and n not in ("meta", "arrays"))]
    for key in kwargs:
        if key not in valid:
            takes = f"it takes {', '.join(map(repr, valid))}" if valid else "it takes none"
            raise InvalidParameterError(
                f"The {key!r} parameter of {owner} does not apply to a saved "
                f"{getattr(cls, '_fitted_kind', cls.__name__)!r} ({takes}).")


def fitted_from_state(meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray], **kwargs: Any) -> Any:
    """Rebuild a fitted object from ``(meta, arrays)``: ``from_state`` of the class registered under
    ``meta["class"]``, with ``kwargs`` (e.g. ``encoder=fn``)."""
    kind = meta.get("class") if isinstance(meta, Mapping) else None
    cls = fitted_class(kind, owner="fitted_from_state")
    _check_kwargs(cls, kwargs, "fitted_from_state")
    return cls.from_state(meta, arrays, **kwargs)


def load_fitted(path: str | os.PathLike, **kwargs: Any) -> Any:
    """Load a folder written by ``obj.save(path)`` (:func:`save_state`) of any registered kind.

    Raises:
        DataNotFoundError: no saved object in the folder.
        DataFormatError: the files are damaged, too large, of a newer format, of an unknown kind,
            or describe an invalid object (the message names the folder).
        InvalidParameterError: a keyword argument does not apply to the saved kind.
    """
    meta, arrays = load_state(path)
    cls = from_state_of_file(path, lambda m, a: fitted_class(m.get("class"), owner="load_fitted"), meta, arrays)
    _check_kwargs(cls, kwargs, "load_fitted")
    return from_state_of_file(path, cls.from_state, meta, arrays, **kwargs)


def from_state_of_file(where: Any, build: Callable, meta: Any, arrays: Any, **kwargs: Any) -> Any:
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


class Fitted:
    """``save(folder)`` and ``Class.load(folder)`` for a class with ``get_state``/``from_state``
    (register it with :func:`register_fitted` so :func:`load_fitted` finds it)."""

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``meta.json`` and a content-addressed arrays file into the folder ``path``
        (atomic as a whole, see :func:`save_state`); returns the folder."""
        meta, arrays = self.get_state()
        return save_state(path, meta, arrays)

    @classmethod
    def load(cls, path: str | os.PathLike, **kwargs: Any):
        """Rebuild an object saved with :meth:`save` (errors in the files name the folder;
        ``kwargs`` go to ``from_state``)."""
        _check_kwargs(cls, kwargs, f"{cls.__name__}.load")
        meta, arrays = load_state(path)
        return from_state_of_file(path, cls.from_state, meta, arrays, **kwargs)


# ---------------------------------------------------------------------------------------------
# Arrays on disk: safetensors (numpy), npz fallback
# ---------------------------------------------------------------------------------------------


def _safetensors_numpy():
    try:
        import safetensors.numpy as stn
    except ImportError:
        return None
    return stn


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
                max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """Read the arrays written by :func:`save_arrays` (safetensors or ``.npz``; never unpickles).

    The file is untrusted: its size is checked before it is read (``max_bytes``, default
    :data:`MAX_ARRAYS_BYTES`), a ``.npz``'s declared array sizes before they are allocated, and
    only numeric/bool arrays are accepted.

    Raises:
        DataNotFoundError: no such file.
        DataFormatError: the file is too large, damaged, truncated, not safetensors/npz, or holds
            non-numeric arrays (the message names the file).
        MissingDependencyError: the file is safetensors and the package is not installed.
    """
    max_bytes = MAX_ARRAYS_BYTES if max_bytes is None else max_bytes
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
                        max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """Load the arrays file ``name`` of a saved model: it must lie inside ``folder`` (no absolute
    path, no ``..``, no symlink out) and, when ``sha256`` is given, have that content hash."""
    max_bytes = MAX_ARRAYS_BYTES if max_bytes is None else max_bytes
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


# ---------------------------------------------------------------------------------------------
# A folder: content-addressed arrays + meta.json (the commit point)
# ---------------------------------------------------------------------------------------------


def save_state(path: str | os.PathLike, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Path:
    """Write ``arrays`` to ``path/arrays-<sha256>.safetensors`` (``.npz`` without safetensors), then
    ``meta`` to ``path/meta.json`` with the format version and the arrays file's name and hash.
    Returns the folder.

    The save is atomic as a whole: the arrays file is content-addressed, so the previous
    ``meta.json`` keeps naming the previous arrays until the new ``meta.json`` replaces it (one
    atomic rename, the commit point); only then are the old arrays files removed.

    Raises:
        InvalidParameterError: ``meta`` is not a dict or uses a key this function writes
            (``format_version``, ``arrays_file``, ``arrays_sha256``); an array is not numeric.
    """
    if not isinstance(meta, Mapping):
        raise InvalidParameterError(f"The 'meta' parameter of save_state must be a dict. Got {type(meta).__name__}.")
    clash = [k for k in _RESERVED if k in meta]
    if clash:
        raise InvalidParameterError(
            f"The 'meta' parameter of save_state must not use the keys {', '.join(map(repr, _RESERVED))}, which "
            f"save_state writes itself. Got {', '.join(map(repr, clash))}.")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    old = _previous_arrays_file(folder)
    name, digest = write_arrays_addressed(folder, "arrays-", arrays)
    doc = {_VERSION_KEY: FORMAT_VERSION, **meta, _ARRAYS_KEY: name, _SHA_KEY: digest}
    atomic_write_json(folder / META_FILE, doc)  # the commit point
    for stale in {old, ARRAYS_FILE, ARRAYS_FILE_NPZ} - {None, name}:
        try:
            (folder / stale).unlink()
        except OSError:
            pass
    return folder


def _previous_arrays_file(folder: Path) -> str | None:
    try:
        doc = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        name = doc.get(_ARRAYS_KEY)
        inside_folder(folder, name)
        ok = isinstance(name, str) and name == Path(name).name and name.startswith("arrays-")
        return name if ok else None  # never anything but an arrays file this function wrote
    except Exception:  # no previous save, or a damaged one: nothing to clean up
        return None


def load_state(path: str | os.PathLike, *, max_meta_bytes: int | None = None,
               max_arrays_bytes: int | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read ``(meta, arrays)`` written by :func:`save_state`; ``meta`` comes back as it was given
    (the keys :func:`save_state` adds are removed).

    Files are untrusted: the arrays file must lie in the folder and match the recorded hash;
    sizes are checked before reading (``max_meta_bytes`` / ``max_arrays_bytes``, default
    :data:`MAX_META_BYTES` / :data:`MAX_ARRAYS_BYTES`).

    Raises:
        DataNotFoundError: no ``meta.json`` (or arrays file) in the folder.
        DataFormatError: a file is damaged or too large, the arrays do not match the meta, or the
            folder was written by a newer leanscale (``format_version`` above :data:`FORMAT_VERSION`).
    """
    folder = Path(path)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise DataNotFoundError(f"No saved model in {str(folder)!r}: {META_FILE} is missing.")
    what = f"model file {str(meta_path)!r}"
    meta = read_json_file(meta_path, "model file", MAX_META_BYTES if max_meta_bytes is None else max_meta_bytes)
    if not isinstance(meta, dict):
        raise DataFormatError(f"The {what} must hold a JSON object. Got {type(meta).__name__}.")
    check_format_version(meta, what=what, current=FORMAT_VERSION)  # saves before versioning are version 1
    meta.pop(_VERSION_KEY, None)
    where = f"arrays file of {str(folder)!r}"
    if _ARRAYS_KEY in meta:
        name, digest = meta.pop(_ARRAYS_KEY), meta.pop(_SHA_KEY, None)
        if digest is None:
            raise DataFormatError(f"The {what} names its arrays file {name!r} but records no {_SHA_KEY!r}.")
        return meta, read_arrays_checked(folder, name, digest, what=where, max_bytes=max_arrays_bytes)
    for name in (ARRAYS_FILE, ARRAYS_FILE_NPZ):  # saves before content addressing
        if (folder / name).is_file():
            return meta, read_arrays_checked(folder, name, None, what=where, max_bytes=max_arrays_bytes)
    raise DataNotFoundError(f"No saved model in {str(folder)!r}: {ARRAYS_FILE} is missing.")


# ---------------------------------------------------------------------------------------------
# Versions, and named files committed by a manifest
# ---------------------------------------------------------------------------------------------

_ABSENT = object()


def check_format_version(doc: Mapping[str, Any], *, what: str, current: int, key: str = _VERSION_KEY,
                         default: int | None = 1) -> int:
    """The format version ``doc[key]`` of a file that was read, checked against ``current``, the
    newest version this leanscale reads.

    An absent ``key`` reads as ``default`` (files written before they were versioned; None: the
    key is required). ``what`` names the file in messages ("model file '/x/meta.json'").

    Raises:
        DataFormatError: the version is not an int >= 1 (or is absent with ``default=None``), or it
            is above ``current``: the file was written by a newer leanscale (upgrade to read it).
    """
    version = doc.get(key, _ABSENT) if isinstance(doc, Mapping) else _ABSENT
    if version is _ABSENT:
        if default is None:
            raise DataFormatError(f"The {what} records no {key!r}; expected an int >= 1.")
        return default
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise DataFormatError(f"The {what} has {key} {version!r:.80}; expected an int >= 1.")
    if version > current:
        raise DataFormatError(
            f"The {what} has {key} {version}: it was written by a newer leanscale, and this one reads "
            f"up to version {current}. Upgrade leanscale to load it.")
    return version


def npy_bytes(arr: Any) -> bytes:
    """The bytes of ``arr`` as a ``.npy`` file (what ``np.save`` writes; object arrays, which
    would need pickle, are refused)."""
    arr = np.asanyarray(arr)
    if arr.dtype.hasobject:
        raise InvalidParameterError(
            f"The 'arr' parameter of npy_bytes must be a numeric, bool or string array. Got dtype {arr.dtype} "
            f"(object arrays need pickle, which leanscale never writes).")
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


_SHA256_KEY = "sha256"


def write_with_manifest(folder: str | os.PathLike, files: Mapping[str, bytes], manifest: Mapping[str, Any], *,
                        manifest_name: str = "manifest.json", version: int = 1) -> Path:
    """Write ``files`` (file name -> bytes) into ``folder``, each atomically, then ``manifest`` as
    JSON to ``folder/manifest_name`` with ``"format_version": version`` first and
    ``"sha256": {name: hex digest}`` of the files last. Returns the manifest's path.

    The manifest is written last: its atomic rename is the commit point. The files keep the names
    they are given (outputs users open by name), so unlike :func:`save_state` a kill between the
    writes can leave new files beside the previous manifest; their digests then differ from the
    recorded ones, which :func:`verify_recorded_file` detects.

    Raises:
        InvalidParameterError: a file name is not a plain name inside the folder, a file is not
            bytes, or ``manifest`` uses the keys this function writes (``format_version``,
            ``sha256``).
    """
    owner = "write_with_manifest"
    if not isinstance(manifest, Mapping):
        raise InvalidParameterError(f"The 'manifest' parameter of {owner} must be a dict. Got {type(manifest).__name__}.")
    clash = [k for k in (_VERSION_KEY, _SHA256_KEY) if k in manifest]
    if clash:
        raise InvalidParameterError(
            f"The 'manifest' parameter of {owner} must not use the keys 'format_version' and 'sha256', which "
            f"{owner} writes itself. Got {', '.join(map(repr, clash))}.")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InvalidParameterError(f"The 'version' parameter of {owner} must be an int >= 1. Got {version!r}.")
    if not isinstance(files, Mapping):
        raise InvalidParameterError(
            f"The 'files' parameter of {owner} must be a dict of file name -> bytes. Got {type(files).__name__}.")
    for name, data in files.items():
        if not isinstance(name, str) or not name or name != Path(name).name or name in (".", "..", manifest_name):
            raise InvalidParameterError(
                f"The 'files' parameter of {owner} must name plain files of the folder (no folders, not the "
                f"manifest). Got {name!r}.")
        if not isinstance(data, (bytes, bytearray)):
            raise InvalidParameterError(
                f"The 'files' parameter of {owner} must map names to bytes. Got {type(data).__name__} for {name!r}.")
    folder = Path(folder)
    digests = {}
    for name, data in files.items():
        atomic_write_bytes(folder / name, bytes(data))
        digests[name] = _sha256_bytes(bytes(data))
    doc = {_VERSION_KEY: version, **manifest, _SHA256_KEY: digests}
    return atomic_write_json(folder / manifest_name, doc)  # the commit point


def read_manifest(path: str | os.PathLike, *, current: int, what: str = "manifest",
                  max_bytes: int | None = None) -> dict[str, Any]:
    """Read a JSON manifest (e.g. one of :func:`write_with_manifest`) as a dict, after checking its
    size (``max_bytes``, default :data:`MAX_META_BYTES`) and its ``"format_version"`` (absent
    reads as 1; above ``current`` is refused). The manifest is returned as it is on disk.

    Raises:
        DataNotFoundError: no such file.
        DataFormatError: too large, not UTF-8 JSON, not a JSON object, or of a newer or malformed
            format version (the message names the file).
    """
    doc = read_json_file(path, what, MAX_META_BYTES if max_bytes is None else max_bytes)
    if not isinstance(doc, dict):
        raise DataFormatError(f"The {what} {str(path)!r} must hold a JSON object. Got {type(doc).__name__}.")
    check_format_version(doc, what=f"{what} {str(path)!r}", current=current)
    return doc


def verify_recorded_file(folder: str | os.PathLike, manifest: Mapping[str, Any], name: str, *,
                         what: str = "file", manifest_path: Any = None) -> Path | None:
    """Check that ``folder/name`` is the file ``manifest`` records (its ``"sha256"`` entry).

    Returns the file's path, or None when the manifest records no hash for ``name`` (a manifest
    written before hashes were recorded: nothing to check). The file must lie inside ``folder``.

    Raises:
        DataNotFoundError: the recorded file is missing.
        DataFormatError: the manifest's ``"sha256"`` is malformed, or the file's content differs
            from the recorded one (a write was interrupted between the file and its manifest, or a
            file was changed since).
    """
    where = str(manifest_path) if manifest_path is not None else str(Path(folder))
    record = manifest.get(_SHA256_KEY) if isinstance(manifest, Mapping) else None
    if record is None:
        return None
    if not isinstance(record, Mapping):
        raise DataFormatError(
            f"The manifest {where!r} must record 'sha256' as an object of file name -> hex digest. Got "
            f"{type(record).__name__}.")
    digest = record.get(name)
    if digest is None:
        return None
    if not isinstance(digest, str) or len(digest) != 64:
        raise DataFormatError(f"The manifest {where!r} records a malformed sha256 {digest!r:.80} for {name!r}.")
    path = inside_folder(folder, name, what=what)
    if not path.is_file():
        raise DataNotFoundError(f"The {what} {str(path)!r} recorded in the manifest {where!r} does not exist.")
    got = sha256_file(path)
    if got != digest.lower():
        raise DataFormatError(
            f"The {what} {str(path)!r} does not belong to the manifest {where!r} beside it (its SHA-256 "
            f"{got[:16]}... differs from the recorded {digest[:16]}...): a write was interrupted between the "
            f"two, or one of them was changed since.")
    return path
