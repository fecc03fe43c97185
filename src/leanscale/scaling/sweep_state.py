"""The files of a sweep folder: the grid check, the finished-run task files and the result tables.

:func:`leanscale.scaling.sweep.run_sweep` writes ``grid.json`` (a folder holds one grid; another
is refused, :func:`_check_same_grid`), one task file per finished run (checked when resumed: a
damaged or foreign one is moved aside and its run trained again, :func:`_load_finished`) and
``runs.csv`` / ``curves.csv`` with the columns :data:`RUNS_COLUMNS` / :data:`CURVES_COLUMNS`
(:func:`_tables`, :func:`_write_tables`), which ``leanscale fit`` reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from leanscale.core.errors import DataFormatError, InvalidParameterError
from leanscale.core.io import (
    JobState,
    atomic_write_csv,
    atomic_write_json,
    read_json,
    to_jsonable,
)
from leanscale.scaling._train import RunSpec

__all__ = ["CURVES_COLUMNS", "RUNS_COLUMNS"]

# Columns of out_dir/runs.csv and out_dir/curves.csv, in this order (read by `leanscale fit`).
RUNS_COLUMNS = (
    "run_id", "budget_flops", "n_params", "n_params_non_embedding", "n_tokens", "flops",
    "flops_appendix_f", "loss", "train_loss", "seconds", "n_layer", "n_embd", "n_head",
    "seq_len", "vocab_size", "seed",
)
CURVES_COLUMNS = ("run_id", "n_params", "n_tokens", "flops", "loss", "train_loss")


def _grid_blob(grid: Sequence[RunSpec]) -> list[dict]:
    return to_jsonable([s.to_dict() for s in grid])


def _check_same_grid(out_dir: Path, grid: Sequence[RunSpec]) -> None:
    """Write ``out_dir/grid.json``, or check that the one there equals ``grid``."""
    path = out_dir / "grid.json"
    new = _grid_blob(grid)
    if path.exists():
        old = read_json(path, what="sweep grid file")
        if not isinstance(old, list) or not all(isinstance(r, dict) for r in old):
            raise DataFormatError(
                f"The sweep grid file {str(path)!r} must be a JSON list of run objects. Got "
                f"{type(old).__name__}{'' if not isinstance(old, list) else ' with other items'}: it is damaged. "
                "Delete it to resume (finished runs are kept, each checked against the new grid), or use "
                "another out_dir.")
        if old != new:
            old_ids = [repr(r.get("run_id")) if not isinstance(r.get("run_id"), str) else r["run_id"] for r in old]
            new_ids = [r["run_id"] for r in new]
            detail = ""
            if old_ids != new_ids:
                gone = sorted(set(old_ids) - set(new_ids))
                added = sorted(set(new_ids) - set(old_ids))
                detail = f" Runs only there: {gone[:4] or 'none'}; only in the new grid: {added[:4] or 'none'}."
            else:
                for a, b in zip(old, new):
                    diff = [k for k in b if a.get(k) != b[k]]
                    if diff:
                        k = diff[0]
                        detail = f" First difference: run {b['run_id']!r} {k} {a.get(k)!r} -> {b[k]!r}."
                        break
            raise InvalidParameterError(
                f"The 'out_dir' {str(out_dir)!r} already holds a sweep with a different grid "
                f"(another config: budgets, sizes, data or optimisation settings).{detail} "
                "A sweep resumes only with the same grid: use another out_dir, or delete this "
                "one to start over."
            )
    else:
        atomic_write_json(path, new)


def _number_ok(v: Any) -> bool:
    # to_jsonable writes non-finite floats as "nan" / "inf" strings (a diverged run's loss).
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) or v in ("nan", "inf", "-inf")


def _task_problem(spec: RunSpec, result: Any) -> str | None:
    """Why a saved task result cannot be a finished run of ``spec`` (None: it can)."""
    if not isinstance(result, dict):
        return f"Its result must be an object. Got {type(result).__name__}."
    missing = [k for k in (*RUNS_COLUMNS, "curve") if k not in result]
    if missing:
        return f"Its result lacks the keys {missing}."
    if result["run_id"] != spec.run_id:
        return f"Its result is for run {result['run_id']!r}, not {spec.run_id!r}."
    if result["n_params"] != spec.n_params:
        return f"Its n_params {result['n_params']!r} is not the grid's {spec.n_params}."
    bad = [k for k in RUNS_COLUMNS if k != "run_id" and not _number_ok(result[k])]
    if bad:
        return f"Its result holds non-numbers under {bad}."
    curve = result["curve"]
    if not isinstance(curve, list) or not curve or not all(
        isinstance(p, dict) and all(_number_ok(p.get(k)) for k in ("loss", "train_loss"))
        and isinstance(p.get("n_tokens"), (int, float)) and not isinstance(p.get("n_tokens"), bool)
        for p in curve
    ):
        return "Its 'curve' must be a non-empty list of points with numeric n_tokens, loss, train_loss."
    return None


def _load_finished(state: JobState, grid: Sequence[RunSpec]) -> dict[str, dict]:
    """The finished runs of ``grid`` in ``state``; a damaged or foreign task file is moved aside."""
    results = {}
    for spec in grid:
        if not state.is_done(spec.run_id):
            continue
        result = state.load(spec.run_id)
        problem = _task_problem(spec, result)
        if problem is not None:
            state.discard(spec.run_id, f"The task file {str(state.path(spec.run_id))!r} is not a finished run "
                                       f"of this sweep: {problem}")
            continue
        results[spec.run_id] = result
    return results


def _tables(grid: Sequence[RunSpec], results: dict[str, dict]) -> tuple[list[dict], list[dict]]:
    """Rows of runs.csv and curves.csv for the finished runs, in grid order."""
    runs, curves = [], []
    for spec in grid:
        r = results.get(spec.run_id)
        if r is None:
            continue
        runs.append({k: r[k] for k in RUNS_COLUMNS})
        curves += [
            {"run_id": r["run_id"], "n_params": r["n_params"], "n_tokens": point["n_tokens"],
             "flops": 6.0 * r["n_params"] * point["n_tokens"], "loss": point["loss"],
             "train_loss": point["train_loss"]}
            for point in r["curve"]
        ]
    return runs, curves


def _write_tables(out_dir: Path, runs: list[dict], curves: list[dict]) -> None:
    atomic_write_csv(out_dir / "runs.csv", runs, RUNS_COLUMNS)
    atomic_write_csv(out_dir / "curves.csv", curves, CURVES_COLUMNS)
