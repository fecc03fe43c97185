"""Reading the runs a sweep wrote (or a user's own runs) from CSV, with clear errors."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leanscale.core.errors import InvalidParameterError
from leanscale.core.validation import check_array

__all__ = ["Curves", "Runs", "read_curves", "read_runs"]

REQUIRED = ("n_params", "n_tokens", "loss")


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
    if not p.is_file():
        raise InvalidParameterError(f"The {what} file {str(p)!r} does not exist.")
    with open(p, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns = list(reader.fieldnames or [])
        rows = list(reader)
    missing = [c for c in required if c not in columns]
    if missing:
        raise InvalidParameterError(
            f"The {what} file {str(p)!r} must have the column(s) {', '.join(map(repr, missing))}. "
            f"Found the columns: {', '.join(map(repr, columns)) or '(none)'}."
        )
    if not rows:
        raise InvalidParameterError(f"The {what} file {str(p)!r} has a header but no rows.")
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
    flops = _column(rows, "flops", path) if "flops" in columns else 6.0 * n * d
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
