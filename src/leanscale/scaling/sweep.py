"""IsoFLOP sweeps: train a grid of small decoder-only Transformers at fixed compute budgets.

This is the data-collection half of Approach 2 of Hoffmann et al. 2022, "Training
Compute-Optimal Large Language Models" (Chinchilla), arXiv 2203.15556: for each compute budget
C, train several model sizes N, each for D = C / (6 N) tokens, and record the final loss. The
fit (:mod:`leanscale.scaling.isoflop`, :mod:`leanscale.scaling.laws`, ``leanscale fit``) reads
the ``runs.csv`` written here.

* :func:`plan_isoflop_grid` picks the shapes and token counts (no training);
* :func:`leanscale.scaling._train.train_run` trains one run (single epoch, AdamW, warmup +
  cosine to 10%), also under ``torchrun`` with DDP;
* :func:`run_sweep` trains the whole grid, serially, in worker processes or on Ray, and is
  resumable: every finished run is one file under ``out_dir/tasks`` and is never trained again.

This module is the front: the pieces live in :mod:`~leanscale.scaling.sweep_config`
(:class:`SweepConfig`, presets, the saved config), :mod:`~leanscale.scaling.grid` (the shape family
and the grid), :mod:`~leanscale.scaling.executors` (serial, process and Ray executors) and
:mod:`~leanscale.scaling.sweep_state` (``grid.json``, task files, ``runs.csv``/``curves.csv``);
their public names are importable from here.

Example:
    >>> config = SweepConfig(vocab_size=512, seq_len=64, budgets_flops=(1e11, 1e12), n_sizes=3)
    >>> grid = plan_isoflop_grid(config)
    >>> len(grid), [s.n_params < t.n_params for s, t in zip(grid[:2], grid[1:3])]
    (6, [True, True])
    >>> all(abs(s.flops / s.budget_flops - 1) < 1e-6 for s in grid)
    True
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from leanscale.core.config import config_to_dict
from leanscale.core.errors import InvalidParameterError, LeanscaleError
from leanscale.core.io import JobState
from leanscale.scaling._presets import PRESETS
from leanscale.scaling._train import RunSpec, dist_info, lr_at, train_run
from leanscale.scaling._train import (
    train_run as _train_run,  # the real one, whatever a test puts in its place
)
from leanscale.scaling.executors import _EXECUTORS, _import_ray, _run_serial
from leanscale.scaling.grid import ModelShape, model_family, plan_isoflop_grid
from leanscale.scaling.sweep_config import SweepConfig, load_sweep_config, preset_config
from leanscale.scaling.sweep_state import (
    CURVES_COLUMNS,
    RUNS_COLUMNS,
    _check_same_grid,
    _load_finished,
    _tables,
    _write_tables,
)
from leanscale.train.distributed import broadcast_object

__all__ = [
    "CURVES_COLUMNS",
    "PRESETS",
    "RUNS_COLUMNS",
    "ModelShape",
    "RunSpec",
    "SweepConfig",
    "SweepResult",
    "load_sweep_config",
    "load_tokens",
    "lr_at",
    "model_family",
    "plan_isoflop_grid",
    "preset_config",
    "run_sweep",
    "train_run",
]


@dataclass
class SweepResult:
    """What :func:`run_sweep` produced: the rows of ``runs.csv`` and ``curves.csv`` and where."""

    out_dir: Path
    runs: list[dict]  # one row per finished run (RUNS_COLUMNS), in grid order
    curves: list[dict]  # rows of curves.csv (CURVES_COLUMNS)
    runs_csv: Path
    curves_csv: Path
    config: SweepConfig
    n_trained: int  # runs trained by this call
    n_skipped: int  # runs found finished in out_dir and not trained again
    results: dict[str, dict] = field(default_factory=dict, repr=False)  # run_id -> train_run dict
    warnings: list[str] = field(default_factory=list)  # damaged task files found (and rerun), etc.


def load_tokens(config: SweepConfig) -> np.ndarray:
    """The corpus' token ids (:func:`leanscale.data.text.encode_corpus`, cached on disk)."""
    from leanscale.data.text import encode_corpus

    return encode_corpus(config.corpus, config.vocab_size, config.max_bytes, config.data_root)


def run_sweep(
    config: SweepConfig,
    out_dir: str | os.PathLike,
    progress: bool = True,
    *,
    tokens: np.ndarray | None = None,
) -> SweepResult:
    """Train every run of :func:`plan_isoflop_grid` and write the results to ``out_dir``.

    Files in ``out_dir``:

    * ``config.json``: the resolved :class:`SweepConfig` (rewritten by every call);
    * ``grid.json``: the planned runs; a later call with another grid is refused;
    * ``tasks/<run_id>.json``: one file per finished run (the full :func:`train_run` dict with
      its loss curve), written atomically (:class:`leanscale.core.io.JobState`);
    * ``runs.csv`` (columns :data:`RUNS_COLUMNS`) and ``curves.csv`` (:data:`CURVES_COLUMNS`),
      rewritten atomically after every finished run; ``leanscale fit out_dir/runs.csv`` reads it.

    Resuming: a run whose task file exists is never trained again, so a killed sweep started
    again with the same ``out_dir`` continues where it stopped and ends with the same results.
    A task file that is damaged (not JSON, missing keys, another run's result) is moved aside to
    ``tasks/<run_id>.json.damaged`` with a ``RuntimeWarning`` and that run is trained again; stray
    temporary files of writes killed mid-way are removed.

    Under ``torchrun`` (``torch.distributed`` initialised) every rank must call this with the
    same arguments; runs are trained one after the other with DDP and only rank 0 writes.

    Args:
        config: the sweep (grid, optimisation, executor).
        out_dir: results folder (created if missing).
        progress: show a progress bar over the runs.
        tokens: the corpus' token ids; default :func:`load_tokens` ``(config)``.

    Returns:
        A :class:`SweepResult`.

    Raises:
        InvalidParameterError: a bad budget (see :func:`plan_isoflop_grid`), or ``out_dir``
            holds a sweep with a different grid.
        MissingDependencyError: ``executor="ray"`` without Ray installed.
    """
    from leanscale.core.progress import progress as progress_bar

    if not isinstance(config, SweepConfig):
        raise InvalidParameterError(
            f"The 'config' parameter of run_sweep must be a SweepConfig. Got {type(config).__name__} instead."
        )
    rank, world_size = dist_info()
    if world_size > 1 and config.executor != "serial":
        raise InvalidParameterError(
            f"The 'executor' parameter of run_sweep must be 'serial' under torchrun (each run is "
            f"trained by all {world_size} ranks with DDP). Got {config.executor!r} instead."
        )
    if config.executor == "ray":
        _import_ray()  # fail before any work when Ray is missing
    out_dir = Path(out_dir)
    plan_isoflop_grid(config)  # a bad budget fails now, before the corpus is read
    if tokens is None:
        tokens = load_tokens(config)
    tokens = np.asarray(tokens)
    from leanscale.data.text import TokenStream

    n_train_tokens = TokenStream(tokens, config.val_fraction).n_train_tokens
    grid = plan_isoflop_grid(config, n_train_tokens=n_train_tokens)

    # Rank 0 checks the folder and decides what is left; the other ranks follow its decision.
    error, results, state, notes = None, {}, None, []
    if rank == 0:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            _check_same_grid(out_dir, grid)
            state = JobState(out_dir, clean=True)  # the job's owner, before any write: removes stray .tmp files
            state.write_config(config_to_dict(config))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                results = _load_finished(state, grid)  # damaged task files are moved aside and rerun
            for w in caught:  # kept for the result (and `leanscale sweep --json`), and passed on
                notes.append(str(w.message))
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        except LeanscaleError as exc:
            error = exc
    error, results, notes = broadcast_object((error, results, notes))
    if error is not None:
        raise error
    todo = [s for s in grid if s.run_id not in results]
    n_skipped = len(results)

    quiet = (not progress) or rank != 0
    bar = progress_bar(total=len(grid), desc="sweep", unit="run", disable=True if quiet else None)
    bar.update(n_skipped)

    def record(spec: RunSpec, result: dict) -> None:
        results[spec.run_id] = result
        if rank == 0:
            state.save(spec.run_id, result)
            _write_tables(out_dir, *_tables(grid, results))
        bar.set_postfix(run=spec.run_id, loss=float(result["loss"]))
        bar.update(1)

    try:
        if config.executor == "serial":  # in this process: with this module's train_run (replaceable)
            train = train_run
            if not quiet and train is _train_run:  # the real one (not a test's stand-in): a bar per run too
                train = functools.partial(train_run, progress_bar=True)
            _run_serial(todo, tokens, config, record, train=train)
        else:
            _EXECUTORS[config.executor](todo, tokens, config, record)
    finally:
        bar.close()
    runs, curves = _tables(grid, results)
    if rank == 0:
        _write_tables(out_dir, runs, curves)  # also when nothing was left to train
    return SweepResult(out_dir=out_dir, runs=runs, curves=curves, runs_csv=out_dir / "runs.csv",
                       curves_csv=out_dir / "curves.csv", config=config, n_trained=len(todo),
                       n_skipped=n_skipped, results=results, warnings=notes)
