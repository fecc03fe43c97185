"""Reading the runs a sweep wrote (or a user's own runs) from CSV, with clear errors."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leanscale.core.errors import (
    DataFormatError,
    DataNotFoundError,
    InvalidParameterError,
)
from leanscale.core.io import check_file_size
from leanscale.core.validation import check_array

__all__ = ["Curves", "Runs", "read_curves", "read_runs"]

REQUIRED = ("n_params", "n_tokens", "loss")
# A runs or curves CSV of a million rows is ~100 MB; anything far larger is not one.
MAX_CSV_BYTES = 512 * 2**20


@dataclass
class Runs:
    """Final results of training runs: one row per run."""

    n_params: np.ndarray  # (m,)
    n_tokens: np.ndarray  # (m,)
    loss: np.ndarray  # (m,) final (validation) loss, nats per token
    flops: np.ndarray  # (m,) training FLOPs: the `flops` column, else 6 N D
    budget_flops: np.ndarray | None  # (m,) IsoFLOP group of each run, when the file has one
    run_id: list[str]


@dataclass
class Curves:
    """Training curves: many rows per run (tokens seen so far, loss at that point)."""

    run_id: np.ndarray  # (k,) str
    n_params: np.ndarray  # (k,)
    n_tokens: np.ndarray  # (k,)
    loss: np.ndarray  # (k,)


def _read(path: str | Path, required: tuple[str, ...], what: str) -> tuple[list[dict], list[str]]:
    p = Path(path)
    if p.is_dir():
        raise DataFormatError(f"The {what} file {str(p)!r} is a folder. Expected a CSV file.")
    if not p.exists():
        raise DataNotFoundError(f"The {what} file {str(p)!r} does not exist.")
    if not p.is_file():
        raise DataFormatError(f"The {what} file {str(p)!r} is not a regular file (a device or pipe?). Expected a CSV file.")
    check_file_size(p, MAX_CSV_BYTES, what=f"{what} file")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataFormatError(
            f"The {what} file {str(p)!r} must be a UTF-8 CSV file. Got bytes that are not UTF-8 at offset "
            f"{exc.start}: it is damaged or another format (a binary file?)."
        ) from None
    if "\x00" in text:
        raise DataFormatError(f"The {what} file {str(p)!r} must be a text CSV file. Got NUL bytes: it is damaged "
                              "or a binary file.")
    hint = ""
    if text.lstrip()[:1] in ("{", "["):
        hint = " The file looks like JSON, not CSV (a law.json or fit.json?): give the runs.csv a sweep wrote."
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        columns = list(reader.fieldnames or [])
        rows = list(reader)
    except csv.Error as exc:
        raise DataFormatError(f"The {what} file {str(p)!r} is not a readable CSV file ({exc}).{hint}") from None
    dup = sorted({c for c in columns if columns.count(c) > 1})
    if dup:
        raise DataFormatError(f"The {what} file {str(p)!r} must name each column once. Got {dup} more than once.")
    missing = [c for c in required if c not in columns]
    if missing:
        raise InvalidParameterError(
            f"The {what} file {str(p)!r} must have the column(s) {', '.join(map(repr, missing))}. "
            f"Found the columns: {', '.join(map(repr, columns)) or '(none)'}.{hint}"
        )
    if not rows:
        raise InvalidParameterError(f"The {what} file {str(p)!r} has a header but no rows.")
    for i, row in enumerate(rows):
        if None in row:
            raise DataFormatError(f"The {what} file {str(p)!r} has more values than columns in data row {i + 1}.")
    return rows, columns


def _column(rows: list[dict], name: str, path, positive: bool = True) -> np.ndarray:
    values = []
    for i, row in enumerate(rows):
        raw = row.get(name)
        try:
            values.append(float(raw))
        except (TypeError, ValueError):
            raise InvalidParameterError(
                f"Column {name!r} of {str(path)!r} must hold numbers. Got {raw!r} in data row {i + 1}."
            ) from None
    return check_array(f"{name} (column of {path})", values, positive=positive)


def read_runs(path: str | Path) -> Runs:
    """Read runs from CSV with at least the columns n_params, n_tokens, loss.

    Optional columns: ``flops`` (default 6 N D), ``budget_flops`` (groups runs into IsoFLOP
    profiles for Approach 2), ``run_id``.
    """
    rows, columns = _read(path, REQUIRED, "runs")
    n, d, l = (_column(rows, c, path) for c in REQUIRED)
    with np.errstate(over="ignore"):
        flops = _column(rows, "flops", path) if "flops" in columns else 6.0 * n * d
    if not np.all(np.isfinite(flops)):
        i = int(np.flatnonzero(~np.isfinite(flops))[0])
        raise InvalidParameterError(
            f"The runs file {str(path)!r} must describe runs whose FLOPs 6 N D are finite. Got n_params="
            f"{n[i]:.3g} and n_tokens={d[i]:.3g} in data row {i + 1}, whose product overflows: not a real run.")
    budget = _column(rows, "budget_flops", path) if "budget_flops" in columns else None
    ids = [r.get("run_id") or str(i) for i, r in enumerate(rows)]
    return Runs(n_params=n, n_tokens=d, loss=l, flops=flops, budget_flops=budget, run_id=ids)


def read_curves(path: str | Path) -> Curves:
    """Read training curves from CSV with columns run_id, n_params, n_tokens, loss."""
    rows, _ = _read(path, ("run_id", "n_params", "n_tokens", "loss"), "curves")
    return Curves(
        run_id=np.array([r["run_id"] for r in rows]),
        n_params=_column(rows, "n_params", path),
        n_tokens=_column(rows, "n_tokens", path),
        loss=_column(rows, "loss", path),
    )
