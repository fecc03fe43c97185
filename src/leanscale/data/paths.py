"""Where the open data sets live, and where leanscale caches what it derives from them.

The data sets are the Debian packages installed by ``make data``; each is described once in
:data:`DATASETS` (plain data, so the CLI listing, the error messages and the tests read the same
table). :func:`resolve_path` looks for a data set in this order:

1. ``root``, when the caller gives one (``root=`` in Python, ``--data-root`` on the command line):
   that folder and the data set's usual sub-folders, and nothing else, so a wrong ``root`` is an
   error instead of a silent fallback;
2. ``$LEANSCALE_DATA_ROOT/<name>`` and ``$LEANSCALE_DATA_ROOT`` when that variable is set;
3. the system location of the Debian package (``/usr/share/...``).

A data set that is in none of them raises :class:`~leanscale.core.errors.DataNotFoundError`, whose
message names the data set, every path tried and how to install it.

Derived files (trained tokenizers, encoded corpora) go to :func:`cache_dir`:
``$LEANSCALE_CACHE``, or ``~/.cache/leanscale`` by default.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from leanscale.core.errors import DataFormatError, DataNotFoundError
from leanscale.core.validation import unknown_name_error

__all__ = [
    "DataSetInfo",
    "DATASETS",
    "DataFormatError",
    "DATA_ROOT_ENV",
    "CACHE_ENV",
    "list_datasets",
    "resolve_path",
    "cache_dir",
]  # re-exported by leanscale.data; find_file is importable from here

DATA_ROOT_ENV = "LEANSCALE_DATA_ROOT"  # overrides the default locations of all data sets
CACHE_ENV = "LEANSCALE_CACHE"  # where tokenizers and encoded corpora are cached


@dataclass(frozen=True)
class DataSetInfo:
    """One open data set: where its Debian package puts it and which files it must have.

    Attributes:
        name: the name used by ``resolve_path`` and the CLI (``"fashion-mnist"``).
        title: a readable name for messages.
        package: the Debian package that installs it.
        default_dirs: system folders where the package puts the files.
        files: file names that must all be present (without compression suffix).
        suffixes: accepted suffixes of each file, tried in order (``""`` is the bare name).
        subdirs: sub-folders of a user ``root`` that are also searched (common layouts of
            copies downloaded by hand, e.g. torchvision's ``FashionMNIST/raw``).
    """

    name: str
    title: str
    package: str
    default_dirs: tuple[Path, ...]
    files: tuple[str, ...]
    suffixes: tuple[str, ...] = ("",)
    subdirs: tuple[str, ...] = ()


DATASETS: dict[str, DataSetInfo] = {
    info.name: info
    for info in (
        DataSetInfo(
            name="fashion-mnist",
            title="Fashion-MNIST",
            package="dataset-fashion-mnist",
            default_dirs=(Path("/usr/share/datasets/fashion-mnist"),),
            files=(
                "train-images-idx3-ubyte",
                "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte",
            ),
            suffixes=(".gz", ""),
            subdirs=("fashion-mnist", "FashionMNIST/raw", "fashion_mnist"),
        ),
        DataSetInfo(
            name="wordnet",
            title="WordNet 3.0",
            package="wordnet-base",
            default_dirs=(Path("/usr/share/wordnet"),),
            files=("data.noun", "data.verb", "data.adj", "data.adv"),
            subdirs=("dict", "WordNet-3.0/dict", "wordnet"),
        ),
        DataSetInfo(
            name="gcide",
            title="GCIDE (Webster's Revised Unabridged Dictionary, 1913)",
            package="dict-gcide",
            default_dirs=(Path("/usr/share/dictd"),),
            files=("gcide.dict",),
            suffixes=(".dz", ".gz", ""),
            subdirs=("dictd", "gcide"),
        ),
    )
}


def list_datasets() -> list[str]:
    """Names of the data sets :func:`resolve_path` knows."""
    return sorted(DATASETS)


def _info(name: str) -> DataSetInfo:
    if name not in DATASETS:
        raise unknown_name_error("name", name, DATASETS, owner="resolve_path")
    return DATASETS[name]


def find_file(directory: str | os.PathLike, stem: str, suffixes: Sequence[str] = ("",)) -> Path | None:
    """The first of ``directory/stem+suffix`` that is a file, or None."""
    directory = Path(directory)
    for suffix in suffixes:
        candidate = directory / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _candidates(info: DataSetInfo, root: str | os.PathLike | None) -> list[Path]:
    if root is not None:
        base = Path(root).expanduser()
        return [base] + [base / sub for sub in info.subdirs]
    out: list[Path] = []
    env = os.environ.get(DATA_ROOT_ENV)
    if env:
        env_root = Path(env).expanduser()
        out += [env_root / info.name, env_root]
    out += list(info.default_dirs)
    return out


def resolve_path(
    name: str, root: str | os.PathLike | None = None, *, files: Sequence[str] | None = None
) -> Path:
    """The folder that holds data set ``name``.

    Args:
        name: a data set of :data:`DATASETS` (``"fashion-mnist"``, ``"wordnet"``, ``"gcide"``).
        root: a folder given by the user; when None, ``$LEANSCALE_DATA_ROOT`` and then the
            system location are searched (see the module docstring for the order).
        files: the files that must be there (default: all of the data set's files); each may
            carry any of the data set's suffixes (``.gz`` ...).

    Returns:
        The first candidate folder that holds every required file.

    Raises:
        DataNotFoundError: no candidate holds the files; the message lists the paths tried and
            how to install the data set.
        InvalidParameterError: ``name`` is not a known data set.
    """
    info = _info(name)
    required = tuple(files) if files is not None else info.files
    tried = _candidates(info, root)
    for folder in tried:
        if all(find_file(folder, stem, info.suffixes) is not None for stem in required):
            return folder
    raise DataNotFoundError(_not_found_message(info, tried, required, root))


def _not_found_message(
    info: DataSetInfo, tried: Sequence[Path], required: Sequence[str], root
) -> str:
    alt = [s for s in info.suffixes if s]
    shown = ", ".join(f"{stem}[{'|'.join(alt)}]" if alt else stem for stem in required)
    where = f"in root={str(root)!r}" if root is not None else "in the default locations"
    return (
        f"{info.title} data set ({info.name!r}) not found {where}. Looked for {shown} in: "
        + ", ".join(str(p) for p in tried)
        + f". Install it with `sudo apt-get install {info.package}` (or `make data`), "
        f"or pass root=/--data-root pointing at a folder that holds these files, "
        f"or set {DATA_ROOT_ENV} to a folder with a {info.name!r} sub-folder."
    )


def cache_dir() -> Path:
    """Folder for derived files: ``$LEANSCALE_CACHE``, or ``~/.cache/leanscale``.

    The folder is not created here; writers create what they need.
    """
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "leanscale"
