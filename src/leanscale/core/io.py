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

    Example:
        >>> import tempfile
        >>> state = JobState(tempfile.mkdtemp())
        >>> state.is_done("n=1e6")
        False
        >>> _ = state.save("n=1e6", {"loss": 3.1})
        >>> state.is_done("n=1e6"), state.load("n=1e6")["loss"]
        (True, 3.1)
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.tasks = self.root / "tasks"
        self.tasks.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _safe(key: str) -> str:
        return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in key)

    def path(self, key: str) -> Path:
        return self.tasks / f"{self._safe(key)}.json"

    def is_done(self, key: str) -> bool:
        return self.path(key).exists()

    def save(self, key: str, result: Any) -> Path:
        return atomic_write_json(self.path(key), {"key": key, "result": result})

    def load(self, key: str) -> Any:
        return read_json(self.path(key))["result"]

    def keys(self) -> list[str]:
        return sorted(read_json(p)["key"] for p in self.tasks.glob("*.json"))

    def __iter__(self) -> Iterator[str]:
        """The keys of the finished tasks, sorted."""
        return iter(self.keys())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.is_done(key)

    def results(self) -> dict[str, Any]:
        out = {}
        for p in sorted(self.tasks.glob("*.json")):
            blob = read_json(p)
            out[blob["key"]] = blob["result"]
        return out

    def write_config(self, config: Any) -> Path:
        """Save the resolved configuration next to the results, for reproduction."""
        return atomic_write_json(self.root / "config.json", config)
