"""Atomic result writing and resumable job state.

Nothing is lost: every result file is written to a temporary file in the same folder, flushed,
fsynced and renamed over the target (``os.replace`` is atomic on POSIX), so a reader sees the old
file or the new one, never half of one. A long job keeps one small file per finished task in a
:class:`JobState` folder; a restarted job asks ``state.is_done(key)`` and skips what is there.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

from leanscale.core.errors import DataFormatError, DataNotFoundError

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_write_csv",
    "atomic_torch_save",
    "read_json",
    "read_npz",
    "read_npy",
    "read_torch_file",
    "read_csv",
    "inside_folder",
    "sha256_file",
    "check_file_size",
    "to_jsonable",
    "JobState",
]


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp creates 0600; give the result the mode a plain open() would (0666 & ~umask).
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def to_jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays, dataclasses, paths and non-finite floats for JSON."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else str(v)  # "nan", "inf": JSON has no literal for them
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> Path:
    return atomic_write_text(path, json.dumps(to_jsonable(obj), indent=indent, sort_keys=False) + "\n")


def _read_bytes(path: str | os.PathLike, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise DataNotFoundError(f"The {what} {str(path)!r} does not exist.") from None
    except IsADirectoryError:
        raise DataFormatError(f"The {what} {str(path)!r} is a folder, not a file.") from None


def read_json(path: str | os.PathLike, *, what: str = "file") -> Any:
    """Parse a JSON file; a missing, truncated or non-UTF-8 file raises an error naming it.

    ``what`` names the file's role in the message ("cascade file", "law file", ...).
    Raises:
        DataNotFoundError: the file does not exist.
        DataFormatError: it is not UTF-8 JSON (truncated, damaged or another format).
    """
    raw = _read_bytes(path, what)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataFormatError(
            f"The {what} {str(path)!r} must be UTF-8 JSON. Got bytes that are not UTF-8 at offset {exc.start}: "
            f"it is damaged or not a JSON file."
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataFormatError(
            f"The {what} {str(path)!r} must be valid JSON. Got an error at line {exc.lineno} column {exc.colno} "
            f"({exc.msg}): the file is truncated, damaged or not JSON."
        ) from None
    except RecursionError:
        raise DataFormatError(f"The {what} {str(path)!r} is nested too deeply to be a leanscale file.") from None
    except ValueError as exc:  # e.g. an integer literal over Python's 4,300-digit conversion limit
        raise DataFormatError(f"The {what} {str(path)!r} must be valid JSON. Got a value it cannot hold ({exc}).") from None


def read_npz(path: str | os.PathLike, *, what: str = "file", max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """Read every array of a ``.npz`` file without unpickling; errors name the file.

    Object arrays (which need pickle) are refused. ``max_bytes`` bounds the file size, checked
    before it is read.
    """
    if max_bytes is not None:
        check_file_size(path, max_bytes, what=what)
    raw = _read_bytes(path, what)
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise DataFormatError(
                    f"The {what} {str(path)!r} must be a .npz archive of named arrays. Got a single .npy array."
                )
            return {k: z[k] for k in z.files}
    except DataFormatError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc):
            raise DataFormatError(
                f"The {what} {str(path)!r} must hold plain numeric or string arrays. Got an array that needs "
                f"pickle (object dtype), which leanscale never loads; or the file is not a .npz archive at all "
                f"(e.g. a text file)."
            ) from None
        raise DataFormatError(f"The {what} {str(path)!r} is not a readable .npz archive ({exc}).") from None
    except (OSError, EOFError, KeyError) as exc:
        raise DataFormatError(
            f"The {what} {str(path)!r} is not a readable .npz archive: it is truncated, damaged or another "
            f"format ({type(exc).__name__}: {exc})."
        ) from None
    except Exception as exc:  # zipfile.BadZipFile and friends
        raise DataFormatError(
            f"The {what} {str(path)!r} is not a readable .npz archive ({type(exc).__name__}: {exc})."
        ) from None


def check_file_size(path: str | os.PathLike, max_bytes: int, *, what: str = "file") -> int:
    """The size of ``path`` in bytes; raise :class:`DataFormatError` above ``max_bytes``."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise DataNotFoundError(f"The {what} {str(path)!r} does not exist.") from None
    if size > max_bytes:
        raise DataFormatError(
            f"The {what} {str(path)!r} must be at most {max_bytes:,} bytes. Got {size:,} bytes."
        )
    return size


def inside_folder(root: str | os.PathLike, name: Any, *, what: str = "file") -> Path:
    """``root / name``, refusing anything that would leave ``root``.

    ``name`` comes from an untrusted file: it must be a relative path string that stays inside
    ``root`` after resolving ``..`` and symbolic links. Absolute paths are refused.
    """
    if not isinstance(name, str) or not name or "\x00" in name:
        raise DataFormatError(f"The {what} name must be a non-empty relative path string. Got {name!r}.")
    if os.path.isabs(name):
        raise DataFormatError(
            f"The {what} {name!r} must be a path relative to {str(root)!r}. Got an absolute path."
        )
    base = Path(root).resolve()
    target = (base / name).resolve()
    if target != base and base not in target.parents:
        raise DataFormatError(
            f"The {what} {name!r} must lie inside the folder {str(base)!r}. Got a path that leaves it."
        )
    return target


def read_npy(path: str | os.PathLike, *, what: str = "array file", ndim: int | None = None) -> np.ndarray:
    """Read one ``.npy`` array without unpickling.

    The header's shape and dtype are checked against the file's size before the data is read, so a
    damaged or crafted header claiming a huge shape is refused instead of allocated.

    Raises:
        DataNotFoundError: the file does not exist.
        DataFormatError: not a ``.npy`` file, truncated, an object (pickled) array, or not ``ndim``-d.
    """
    path = Path(path)
    if not path.exists():
        raise DataNotFoundError(f"The {what} {str(path)!r} does not exist.")
    if path.is_dir():
        raise DataFormatError(f"The {what} {str(path)!r} is a folder, not a .npy file.")
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                raise ValueError(f"unsupported .npy version {version}")
            offset = fh.tell()
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as exc:
        raise DataFormatError(
            f"The {what} {str(path)!r} is not a readable .npy file: it is truncated, damaged or another format "
            f"(e.g. a text file) ({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__})."
        ) from None
    if dtype.hasobject:
        raise DataFormatError(
            f"The {what} {str(path)!r} must hold a numeric array. Got an object array, which needs pickle: "
            f"leanscale never loads those."
        )
    if ndim is not None and len(shape) != ndim:
        raise DataFormatError(f"The {what} {str(path)!r} must hold a {ndim}-d array. Got shape {shape}.")
    need = math.prod(shape) * dtype.itemsize
    if size - offset != need:
        raise DataFormatError(
            f"The {what} {str(path)!r} claims shape {shape} of {dtype} ({need:,} bytes) but holds "
            f"{size - offset:,} bytes of data: it is truncated or damaged."
        )
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataFormatError(f"The {what} {str(path)!r} is not a readable .npy file ({exc}).") from None


def read_torch_file(path: str | os.PathLike, *, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; every failure names the file.

    Only tensors, numbers, strings, lists, tuples and dicts are read: a file that would need any
    other Python object (a crafted pickle that runs code on load) is refused without running it.

    Raises:
        DataNotFoundError: the file does not exist.
        DataFormatError: it is a folder, truncated, damaged, not a torch file, or holds objects
            other than tensors and plain data.
    """
    path = Path(path)
    if not path.exists():
        raise DataNotFoundError(f"The {what} {str(path)!r} does not exist.")
    if path.is_dir():
        raise DataFormatError(f"The {what} {str(path)!r} is a folder, not a file.")
    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on legacy formats are not the user's concern
            return torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise DataFormatError(f"The {what} {str(path)!r} claims more memory than is available: it is damaged.") from None
    except Exception as exc:
        if type(exc).__name__ != "UnpicklingError":  # zip / stream / rebuild errors of a damaged file
            msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise DataFormatError(
                f"The {what} {str(path)!r} is not a readable torch checkpoint: it is truncated, damaged or another "
                f"format ({type(exc).__name__}: {msg})."
            ) from None
        # the weights-only unpickler refused a global: a crafted or foreign file
        first = str(exc).strip().splitlines()
        detail = next((line for line in first if "Unsupported" in line or "GLOBAL" in line), first[0] if first else "")
        raise DataFormatError(
            f"The {what} {str(path)!r} must hold only tensors and plain data (numbers, strings, lists, dicts). "
            f"Got a file that needs other Python objects, which leanscale never loads (they could run code): "
            f"it is not a leanscale file, or it was crafted ({detail[:200]})."
        ) from None


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (content check of multi-file saves)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_csv(
    path: str | os.PathLike, rows: Iterable[Mapping[str, Any]], columns: Sequence[str] | None = None
) -> Path:
    """Write dict rows as CSV atomically; ``columns`` fixes the order (default: first row's keys)."""
    rows = list(rows)
    if columns is None:
        columns = list(rows[0].keys()) if rows else []
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: to_jsonable(v) for k, v in row.items()})
    return atomic_write_text(path, buf.getvalue())


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temp file, then rename: a checkpoint is whole or absent."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


class JobState:
    """A folder of finished tasks of a long job, one JSON file per task, written atomically.

    The files are untrusted on reading: a task file that is not valid JSON, or lacks its ``key``
    and ``result`` (a damaged disk, a hand edit, a copy cut short), counts as not done: it is
    moved aside to ``<name>.json.damaged`` with a ``RuntimeWarning`` and the task is
    computed again. Stray temporary files of atomic writes killed mid-way (``.<name>.*.tmp``) are
    removed when the job's owner opens the state with ``clean=True`` -- once, at the start of the
    job, before any worker writes: a worker or another DDP rank opening the same folder while
    writes are in flight must leave ``clean=False`` (the default), or it would delete a temporary
    file another process is about to rename. A state folder belongs to one job at a time.

    Example:
        >>> import tempfile
        >>> state = JobState(tempfile.mkdtemp())
        >>> state.is_done("n=1e6")
        False
        >>> _ = state.save("n=1e6", {"loss": 3.1})
        >>> state.is_done("n=1e6"), state.load("n=1e6")["loss"]
        (True, 3.1)
    """

    def __init__(self, root: str | os.PathLike, *, clean: bool = False):
        self.root = Path(root)
        self.tasks = self.root / "tasks"
        self.tasks.mkdir(parents=True, exist_ok=True)
        self.removed_tmp = self._remove_stray_tmp() if clean else []

    def _remove_stray_tmp(self) -> list[Path]:
        """Delete ``.<name>.*.tmp`` left by atomic writes that were killed (root and its subfolders)."""
        removed = []
        folders = [self.root] + sorted(p for p in self.root.iterdir() if p.is_dir() and not p.is_symlink())
        for folder in folders:
            for p in folder.glob(".*.tmp"):
                if p.is_file() and not p.is_symlink():
                    try:
                        p.unlink()
                        removed.append(p)
                    except FileNotFoundError:  # removed meanwhile
                        pass
        return removed

    @staticmethod
    def _safe(key: str) -> str:
        return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in key)

    def path(self, key: str) -> Path:
        return self.tasks / f"{self._safe(key)}.json"

    def _read(self, path: Path, key: str | None = None) -> dict | None:
        """The task file's ``{"key", "result"}``, or None (after moving it aside) when it is damaged."""
        try:
            blob = read_json(path, what="task file")
        except DataNotFoundError:
            return None
        except DataFormatError as exc:
            self.discard(path, str(exc))
            return None
        if not isinstance(blob, dict) or not isinstance(blob.get("key"), str) or "result" not in blob:
            found = sorted(blob) if isinstance(blob, dict) else type(blob).__name__
            self.discard(path, f"The task file {str(path)!r} must be a JSON object with the keys 'key' (a "
                               f"string) and 'result'. Got {found}.")
            return None
        if key is not None and blob["key"] != key:
            self.discard(path, f"The task file {str(path)!r} must hold the task {key!r}. Got the task "
                               f"{blob['key']!r}.")
            return None
        return blob

    def discard(self, key_or_path: str | os.PathLike, reason: str) -> Path | None:
        """Move a damaged task file aside (``<name>.json.damaged``) with a warning; it will be recomputed.

        ``key_or_path`` is a task key or the task file's path. Returns where it went (None: no file).
        """
        path = key_or_path if isinstance(key_or_path, Path) else self.path(str(key_or_path))
        if not path.exists():
            return None
        aside = path.with_name(path.name + ".damaged")
        try:
            os.replace(path, aside)
        except OSError:
            aside = None
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        import warnings

        where = f"moved to {str(aside)!r}" if aside is not None else "deleted"
        warnings.warn(f"{reason} The damaged task file was {where}; the task will be computed again.",
                      RuntimeWarning, stacklevel=3)
        return aside

    def is_done(self, key: str) -> bool:
        """True when the task's file exists and is readable; a damaged one is moved aside (False)."""
        return self._read(self.path(key), key) is not None

    def save(self, key: str, result: Any) -> Path:
        return atomic_write_json(self.path(key), {"key": key, "result": result})

    def load(self, key: str) -> Any:
        """The task's result. Raises DataNotFoundError if it is not done (or was damaged)."""
        blob = self._read(self.path(key), key)
        if blob is None:
            raise DataNotFoundError(f"The task {key!r} has no result in {str(self.tasks)!r}: it is not done "
                                    "(or its file was damaged and moved aside).")
        return blob["result"]

    def _blobs(self) -> list[dict]:
        out = []
        for p in sorted(self.tasks.glob("*.json")):
            blob = self._read(p)
            if blob is not None:
                out.append(blob)
        return out

    def keys(self) -> list[str]:
        return sorted(blob["key"] for blob in self._blobs())

    def __iter__(self) -> Iterator[str]:
        """The keys of the finished tasks, sorted."""
        return iter(self.keys())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.is_done(key)

    def results(self) -> dict[str, Any]:
        return {blob["key"]: blob["result"] for blob in self._blobs()}

    def write_config(self, config: Any) -> Path:
        """Save the resolved configuration next to the results, for reproduction."""
        return atomic_write_json(self.root / "config.json", config)
