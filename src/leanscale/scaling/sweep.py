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

Example:
    >>> config = SweepConfig(vocab_size=512, seq_len=64, budgets_flops=(1e11, 1e12), n_sizes=3)
    >>> grid = plan_isoflop_grid(config)
    >>> len(grid), [s.n_params < t.n_params for s, t in zip(grid[:2], grid[1:3])]
    (6, [True, True])
    >>> all(abs(s.flops / s.budget_flops - 1) < 1e-6 for s in grid)
    True
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from leanscale.core.config import config_from_dict, config_to_dict
from leanscale.core.errors import (
    DataFormatError,
    InvalidParameterError,
    LeanscaleError,
    MissingDependencyError,
)
from leanscale.core.io import (
    JobState,
    atomic_write_csv,
    atomic_write_json,
    read_json,
    to_jsonable,
)
from leanscale.core.validation import Interval, Options, check_params
from leanscale.scaling._presets import EXECUTORS, PRESETS
from leanscale.scaling._train import RunSpec, dist_info, lr_at, model_config, train_run

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

# Columns of out_dir/runs.csv and out_dir/curves.csv, in this order (read by `leanscale fit`).
RUNS_COLUMNS = (
    "run_id", "budget_flops", "n_params", "n_params_non_embedding", "n_tokens", "flops",
    "flops_appendix_f", "loss", "train_loss", "seconds", "n_layer", "n_embd", "n_head",
    "seq_len", "vocab_size", "seed",
)
CURVES_COLUMNS = ("run_id", "n_params", "n_tokens", "flops", "loss", "train_loss")



@dataclass(frozen=True)
class SweepConfig:
    """Everything an IsoFLOP sweep needs; ``leanscale sweep --set key=value`` changes a field.

    Only the fields marked *grid* change what is trained; the others (executor, workers, data
    location, time limit, threads) can change between a sweep and its resumption.

    Why the bracket is centred on 80 tokens per parameter and spans 5x, not Chinchilla's ~20
    and a decade: these models are tiny (6k-205k parameters in the benchmark, 25-87% of them
    the tied embedding), and on gcide their IsoFLOP minima sit at 40-100 tokens per parameter
    (benchmark preset: 22k parameters at 1.25e11 FLOPs, 22k-33k at 4e11, 45k at 1.25e12, 90k
    at 4e12; `leanscale fit` puts the optimum at 4e12 at 91k parameters, 80 tokens each). One epoch of gcide (16.8M training tokens at vocab 512) caps the tokens of the
    smallest model of the largest budget, D = C / (6 N), and the smallest shape (width 8) caps
    the smallest budget; a full decade around 80 tokens per parameter would leave budgets over
    only ~6x, a span of 5x (16-400 tokens per parameter) allows 32x.

    Why batches of only 8 sequences: tiny models are far below their critical batch size
    (McCandlish et al. 2018, arXiv 1812.06162) and their loss is limited by the number of steps.
    Measured: a 282k-parameter model at 1e12 FLOPs reached 4.34 nats with 144 steps of 32
    sequences and 3.85 with 576 steps of 8; a width-40 model at 4e11 FLOPs 3.80 with 724 steps of
    16 and 3.69 with 1,449 steps of 8. Larger batches for the runs with many tokens made the
    IsoFLOP curves jagged (each run's loss followed its step count), and on this CPU a batch of 8
    costs at most 15% of the throughput of a batch of 32.
    """

    # --- data (grid) ---
    corpus: str = "gcide"  # "gcide" (Webster 1913), "stdlib" (CPython sources) or a text file/folder
    data_root: str | None = None  # folder holding the corpus (None: system location); not grid
    max_bytes: int | None = None  # read only the first max_bytes bytes of the corpus (None: all)
    vocab_size: int = 512  # byte-level BPE vocabulary; gcide has 17.7M tokens at 512, fewer at 2048
    val_fraction: float = 0.05  # held-out tail of the corpus for the validation loss
    # --- grid ---
    seq_len: int = 128  # tokens per training window (T), also the model's block_size
    budgets_flops: tuple[float, ...] = (3e11, 1e12, 3e12)  # compute budgets C = 6 N D
    n_sizes: int = 5  # model sizes per budget, evenly spaced in log N
    tokens_per_param: float = 80.0  # centre of each bracket, D/N (Chinchilla: ~20; see below)
    size_span: float = 5.0  # largest / smallest N of one budget (0.7 decade around the centre)
    head_dim: int = 8  # width of every attention head; n_head = n_embd // head_dim
    aspect_ratio: float = 48.0  # n_embd / n_layer of the shape family (Kaplan: flat in 20-200)
    # --- optimisation (grid) ---
    batch_size: int = 8  # sequences per optimizer step, over all DDP ranks (8 x 128 = 1k tokens)
    lr: float = 5e-3  # peak AdamW LR of a model of width lr_base_width
    lr_base_width: int = 32  # width at which the peak LR is exactly `lr`
    lr_width_exponent: float = 1.5  # peak LR = lr * (lr_base_width / n_embd) ** lr_width_exponent
    warmup_fraction: float = 0.05  # linear warmup over this fraction of a run's steps
    min_lr_ratio: float = 0.1  # cosine decay to this fraction of the peak LR (Chinchilla: 10%)
    weight_decay: float = 0.1  # AdamW weight decay on matrices and embeddings
    grad_clip: float = 1.0  # max global gradient norm
    min_steps: int = 10  # every run needs at least this many optimizer steps
    seed: int = 0  # model initialisation and order of the training windows
    # --- evaluation (grid) ---
    n_curve_points: int = 10  # evaluations along each run; the last one is the final loss
    val_batches: int = 8  # validation batches (of batch_size x seq_len tokens) per evaluation
    # --- execution (not grid) ---
    executor: Literal["serial", "process", "ray"] = "serial"  # where runs train
    n_workers: int = 1  # parallel runs for "process" / "ray"; each gets cores // n_workers threads
    ray_address: str | None = None  # Ray cluster to join (None: start a local one)
    max_minutes: float | None = None  # stop any run after this many minutes (None: no limit)
    n_threads: int | None = None  # torch threads per run (None: serial keeps torch's setting,
    #                               process/ray use cores // n_workers)

    _parameter_constraints = {
        "corpus": [str],
        "data_root": [None, str],
        "max_bytes": [None, Interval(int, 1, None)],
        "vocab_size": [Interval(int, 257, None)],
        "val_fraction": [Interval(float, 0, 1, closed="neither")],
        "seq_len": [Interval(int, 2, None)],
        "n_sizes": [Interval(int, 1, None)],
        "tokens_per_param": [Interval(float, 0, None, closed="neither")],
        "size_span": [Interval(float, 1, None)],
        "head_dim": [Interval(int, 1, None)],
        "aspect_ratio": [Interval(float, 0, None, closed="neither")],
        "batch_size": [Interval(int, 1, None)],
        "lr": [Interval(float, 0, None, closed="neither")],
        "lr_base_width": [Interval(int, 1, None)],
        "lr_width_exponent": [Interval(float, 0, None)],
        "warmup_fraction": [Interval(float, 0, 1, closed="left")],
        "min_lr_ratio": [Interval(float, 0, 1)],
        "weight_decay": [Interval(float, 0, None)],
        "grad_clip": [Interval(float, 0, None, closed="neither")],
        "min_steps": [Interval(int, 1, None)],
        "seed": [Interval(int, 0, None)],
        "n_curve_points": [Interval(int, 1, None)],
        "val_batches": [Interval(int, 1, None)],
        "executor": [Options(EXECUTORS)],
        "n_workers": [Interval(int, 1, None)],
        "ray_address": [None, str],
        "max_minutes": [None, Interval(float, 0, None, closed="neither")],
        "n_threads": [None, Interval(int, 1, None)],
    }

    def __post_init__(self) -> None:
        check_params({f: getattr(self, f) for f in self._parameter_constraints},
                     self._parameter_constraints, owner="SweepConfig")
        budgets = self.budgets_flops
        if not isinstance(budgets, (tuple, list)) or not budgets or not all(
            isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) and c > 0
            for c in budgets
        ):
            raise InvalidParameterError(
                "The 'budgets_flops' parameter of SweepConfig must be a non-empty tuple of positive "
                f"finite FLOP counts (e.g. (1e12, 3e12, 1e13)). Got {budgets!r} instead."
            )
        if len(set(budgets)) != len(budgets):
            raise InvalidParameterError(
                f"The 'budgets_flops' parameter of SweepConfig must not repeat a budget. Got {budgets!r}."
            )
        object.__setattr__(self, "budgets_flops", tuple(sorted(float(c) for c in budgets)))


def preset_config(name: str = "default", overrides: Sequence[str] = ()) -> SweepConfig:
    """The :class:`SweepConfig` of a preset, with ``key=value`` overrides applied.

    Raises:
        InvalidParameterError: unknown preset (the message lists them) or a bad override.
    """
    from leanscale.core.config import apply_overrides
    from leanscale.core.validation import unknown_name_error

    if name not in PRESETS:
        raise unknown_name_error("preset", name, PRESETS, owner="preset_config")
    return apply_overrides(SweepConfig(**PRESETS[name]), list(overrides))


# ----------------------------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """One member of the shape family, with its parameter counts."""

    n_layer: int
    n_embd: int
    n_head: int
    n_params: int  # all parameters, tied embedding counted once
    n_params_non_embedding: int  # without token and position embeddings


def _shape(n_layer: int, n_embd: int, n_head: int, vocab_size: int, seq_len: int) -> ModelShape:
    """Parameter counts of the sweep's :class:`GPT` (no biases, tied embeddings, MLP ratio 4).

    Per block: two LayerNorm gains (2 d), fused Q/K/V (3 d^2), attention output (d^2) and the
    MLP (2 * 4 d^2); plus the final LayerNorm (d) and the embeddings (vocab * d tokens, shared
    with the output head, and seq_len * d positions). Closed form because building even a
    meta-device model per candidate shape costs ~0.2 s; ``tests/scaling/test_sweep.py`` checks
    it against :meth:`GPT.n_params` so the two cannot drift apart.
    """
    d = n_embd
    non_embedding = n_layer * (12 * d * d + 2 * d) + d
    return ModelShape(n_layer, d, n_head, non_embedding + (vocab_size + seq_len) * d, non_embedding)


def model_family(config: SweepConfig, max_params: float) -> list[ModelShape]:
    """The shapes a sweep chooses from, by increasing ``n_params``, up to the first above ``max_params``.

    Widths are the multiples of ``head_dim`` (every head has ``head_dim`` channels, ``n_head =
    n_embd // head_dim``, as in the Chinchilla tables); the depth of a width is ``n_embd /
    aspect_ratio`` rounded half up (at least 1): depth and width grow together at a fixed ratio
    (Kaplan et al. 2020, whose loss is flat for ratios 20-200). One depth per width keeps the
    family monotone in N. Measured here, deep-narrow shapes of these tiny models lose: at 2e12
    FLOPs a 2-layer width-48 model (ratio 24) reached 3.61 nats where the 1-layer width-48 and
    2-layer width-64 models around it reached 3.28 and 3.53, hence the default ratio of 48.
    """
    shapes: list[ModelShape] = []
    k = 0
    while not shapes or shapes[-1].n_params <= max_params:
        k += 1
        d = k * config.head_dim
        n_layer = max(1, math.floor(d / config.aspect_ratio + 0.5))
        shapes.append(_shape(n_layer, d, k, config.vocab_size, config.seq_len))
    return shapes


def _peak_lr(config: SweepConfig, n_embd: int) -> float:
    """The LR rule: ``lr * (lr_base_width / n_embd) ** lr_width_exponent``.

    Wider models need smaller steps (muP: 1/width for the hidden matrices under Adam; GPT-3's
    table roughly halves the LR from width 768 to 2048), and these tiny ones more steeply:
    measured at 4e11 FLOPs with batches of 8, the best of three LRs a factor 2 apart was
    >= 1.1e-2 at width 24 and 3.2e-3 at width 40; at 1e12 FLOPs with batches of 32 it was
    >= 1.2e-2 at width 32, 5e-3 at 48 and 2e-3 at 80. Hence the exponent 1.5 between muP's 1
    and the measured ~2, with 5e-3 at width 32.
    """
    return config.lr * (config.lr_base_width / n_embd) ** config.lr_width_exponent


def _budget_label(c: float) -> str:
    return f"{c:.3g}".replace("+", "")  # 1e+12 -> 1e12


def plan_isoflop_grid(config: SweepConfig, n_train_tokens: int | None = None) -> list[RunSpec]:
    """The runs of an IsoFLOP sweep: ``n_sizes`` model sizes for every budget, smallest first.

    For a budget C the centre of the bracket is the model that would see ``tokens_per_param``
    tokens per parameter, N* = sqrt(C / (6 * tokens_per_param)) (80 by default, measured for
    these tiny models; Chinchilla's is ~20, see :class:`SweepConfig`). The ``n_sizes`` target
    sizes are spaced evenly in log N over ``size_span`` (5x by default) around N*, so the loss
    minimum of each IsoFLOP curve falls inside the bracket even when the optimum is a few times
    off the centre. Each target is snapped to the nearest shape of :func:`model_family`
    (distinct, increasing), the run gets D = C / (6 N) tokens, rounded to an integer, and a
    peak LR from the width rule (:func:`_peak_lr`).

    N is the total number of parameters with the token embedding tied to the output head and
    counted once, plus the position embedding, exactly as :meth:`GPT.n_params` counts it. Each
    spec also records the non-embedding count and the Chinchilla Appendix-F FLOPs of its D.

    Args:
        config: the sweep settings (see :class:`SweepConfig`).
        n_train_tokens: training tokens of the corpus; when given, budgets whose smallest model
            would need more tokens than that are rejected (single-epoch training repeats none).

    Returns:
        A list of :class:`RunSpec`, grouped by budget (ascending), sizes ascending within one.

    Raises:
        InvalidParameterError: a budget is too small for the smallest model of the family or
            for ``min_steps`` optimizer steps of its largest model, or needs more tokens than
            the corpus has. The message names ``budgets_flops``, what is needed and what was
            received.
    """
    from leanscale.models.transformer import flops_per_token

    if not isinstance(config, SweepConfig):
        raise InvalidParameterError(
            f"The 'config' parameter of plan_isoflop_grid must be a SweepConfig. Got "
            f"{type(config).__name__} instead."
        )
    budgets = config.budgets_flops
    half_span = math.sqrt(config.size_span) if config.n_sizes > 1 else 1.0  # one size: N* itself
    centre = {c: math.sqrt(c / (6.0 * config.tokens_per_param)) for c in budgets}  # N*
    family = model_family(config, max_params=max(centre.values()) * half_span * 1.5)
    smallest = family[0]
    owner = "plan_isoflop_grid"

    # A budget too small: the smallest target size below the smallest model.
    min_budget = 6.0 * config.tokens_per_param * (smallest.n_params * half_span) ** 2
    for c in budgets:
        if centre[c] / half_span < smallest.n_params * (1 - 1e-9):
            raise InvalidParameterError(
                f"The 'budgets_flops' parameter of {owner} must hold budgets of at least "
                f"{min_budget:.3g} FLOPs for this grid. Got {c:.3g}: the smallest of "
                f"{config.n_sizes} sizes spanning {config.size_span:g}x around N* = sqrt(C / (6 * "
                f"{config.tokens_per_param:g} tokens/param)) = {centre[c]:,.0f} would have "
                f"{centre[c] / half_span:,.0f} parameters, below the smallest model of the family "
                f"(n_layer={smallest.n_layer}, n_embd={smallest.n_embd}: {smallest.n_params:,} "
                "parameters). Raise the budget, or lower vocab_size, seq_len, head_dim or size_span."
            )

    grid: list[RunSpec] = []
    for c in budgets:
        if config.n_sizes == 1:
            targets = [centre[c]]
        else:
            targets = [centre[c] * config.size_span ** (i / (config.n_sizes - 1) - 0.5)
                       for i in range(config.n_sizes)]
        chosen: list[ModelShape] = []
        lo = 0
        for i, target in enumerate(targets):
            room = len(targets) - 1 - i  # shapes still needed after this one
            candidates = family[lo : len(family) - room]
            if not candidates:
                raise InvalidParameterError(
                    f"The shape family is too coarse for {config.n_sizes} distinct sizes spanning "
                    f"{config.size_span:g}x at budget {c:.3g} (budgets_flops); raise size_span or "
                    "lower n_sizes or head_dim."
                )
            best = min(range(len(candidates)),
                       key=lambda j: abs(math.log(candidates[j].n_params / target)))
            chosen.append(candidates[best])
            lo += best + 1
        for shape in chosen:
            n_tokens = int(round(c / (6.0 * shape.n_params)))
            spec = RunSpec(
                run_id=f"C{_budget_label(c)}-L{shape.n_layer}-d{shape.n_embd}",
                budget_flops=c,
                n_layer=shape.n_layer,
                n_head=shape.n_head,
                n_embd=shape.n_embd,
                seq_len=config.seq_len,
                vocab_size=config.vocab_size,
                n_params=shape.n_params,
                n_params_non_embedding=shape.n_params_non_embedding,
                n_tokens=n_tokens,
                flops=6.0 * shape.n_params * n_tokens,
                flops_appendix_f=0.0,
                lr=_peak_lr(config, shape.n_embd),
                batch_size=config.batch_size,
                warmup_fraction=config.warmup_fraction,
                min_lr_ratio=config.min_lr_ratio,
                weight_decay=config.weight_decay,
                grad_clip=config.grad_clip,
                n_curve_points=config.n_curve_points,
                val_batches=config.val_batches,
                val_fraction=config.val_fraction,
                corpus=str(config.corpus),
                max_bytes=config.max_bytes,
                seed=config.seed,
            )
            spec = replace(spec, flops_appendix_f=flops_per_token(model_config(spec)) * n_tokens)
            grid.append(spec)

    # Too small for min_steps: the largest model of a budget gets the fewest tokens.
    for spec in grid:
        if spec.n_steps < config.min_steps:
            tokens_per_step = spec.batch_size * spec.seq_len
            need = config.min_steps * tokens_per_step * 6.0 * spec.n_params
            raise InvalidParameterError(
                f"The 'budgets_flops' parameter of {owner} must give every run at least "
                f"min_steps={config.min_steps} optimizer steps of batch_size * seq_len = "
                f"{tokens_per_step:,} tokens. Got {spec.budget_flops:.3g}: its model "
                f"{spec.run_id} ({spec.n_params:,} parameters) gets {spec.n_tokens:,} tokens, "
                f"{spec.n_steps} steps; it needs at least {need:.3g} FLOPs. Raise the budget or "
                "lower batch_size."
            )
    # Too large for the corpus: the smallest model of a budget gets the most tokens.
    if n_train_tokens is not None:
        available = max(n_train_tokens - 1, 0) // config.seq_len * config.seq_len
        for spec in grid:
            if spec.n_tokens > available:
                fit = spec.budget_flops * (available / spec.n_tokens) ** 2  # D of a bracket ~ sqrt(C)
                raise InvalidParameterError(
                    f"The 'budgets_flops' parameter of {owner} must not need more tokens than the "
                    f"corpus has. Got {spec.budget_flops:.3g}: its smallest model {spec.run_id} "
                    f"({spec.n_params:,} parameters) needs {spec.n_tokens:,} training tokens, but "
                    f"corpus {config.corpus!r} (vocab_size={config.vocab_size}, max_bytes="
                    f"{config.max_bytes}) has {available:,} (single-epoch training repeats no "
                    f"token). Use budgets up to about {fit:.3g} FLOPs, or a larger corpus."
                )
    return grid


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------


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


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# Worker-process state of the "process" executor: set once per worker by _init_worker.
_WORKER_TOKENS: np.ndarray | None = None


def _die_with_parent(parent_pid: int) -> None:
    """Make this worker process exit as soon as ``parent_pid`` (the sweep) dies, even by ``kill -9``.

    A worker whose parent was killed would otherwise train on for minutes, and keep the
    multiprocessing resource tracker alive with it. On Linux the kernel delivers SIGKILL to the
    worker when its parent dies (``prctl(PR_SET_PDEATHSIG)``); everywhere, a daemon thread checks
    once every 0.2 s that the parent is still ours (``os.getppid()`` changes when it dies).
    """
    import signal
    import sys
    import threading
    import time

    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # no libc symbol: the watchdog below still works
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(0.2)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="leanscale-parent-watchdog", daemon=True).start()


def _init_worker(tokens: np.ndarray, n_threads: int, parent_pid: int | None = None) -> None:
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    import torch

    global _WORKER_TOKENS
    _WORKER_TOKENS = tokens
    torch.set_num_threads(n_threads)


def _worker_train(spec: RunSpec, max_minutes: float | None) -> dict:
    return train_run(spec, _WORKER_TOKENS, max_minutes=max_minutes)


def _ray_train(spec: RunSpec, tokens: np.ndarray, n_threads: int, max_minutes: float | None) -> dict:
    import torch

    torch.set_num_threads(n_threads)
    return train_run(spec, tokens, max_minutes=max_minutes)


def _worker_threads(config: SweepConfig) -> int:
    """Torch threads of one run in a worker: ``n_threads``, else the cores shared out."""
    return config.n_threads or max(1, _cores() // config.n_workers)


def _run_serial(todo, tokens, config, record):
    import torch

    from leanscale.data.text import TokenStream

    stream = TokenStream(tokens, config.val_fraction)  # one split shared by every run
    before = torch.get_num_threads()
    if config.n_threads:
        torch.set_num_threads(config.n_threads)
    try:
        for spec in todo:
            record(spec, train_run(spec, stream, max_minutes=config.max_minutes))
    finally:
        torch.set_num_threads(before)


def _run_process(todo, tokens, config, record, worker: Callable = _worker_train):
    # ``worker(spec, max_minutes)`` trains one run in a worker process (a module-level function:
    # the tests pass a quick fake one).
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    n_threads = _worker_threads(config)
    with ProcessPoolExecutor(
        max_workers=config.n_workers, mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker, initargs=(tokens, n_threads, os.getpid()),
    ) as pool:
        pending = {pool.submit(worker, spec, config.max_minutes): spec for spec in todo}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    record(pending.pop(future), future.result())
        except BaseException:
            for future in pending:
                future.cancel()
            raise


def _import_ray():
    try:
        import ray
    except ImportError:
        raise MissingDependencyError(
            "The 'ray' executor needs Ray: pip install 'leanscale[ray]'"
        ) from None
    return ray


def _run_ray(todo, tokens, config, record):
    ray = _import_ray()
    started = False
    if not ray.is_initialized():
        if config.ray_address:
            ray.init(address=config.ray_address, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(num_cpus=config.n_workers, include_dashboard=False, log_to_driver=False)
        started = True
    try:
        n_threads = config.n_threads or (1 if config.ray_address else _worker_threads(config))
        remote = ray.remote(num_cpus=1)(_ray_train)
        tokens_ref = ray.put(tokens)
        pending = {remote.remote(spec, tokens_ref, n_threads, config.max_minutes): spec
                   for spec in todo}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    record(pending.pop(ref), ray.get(ref))
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
    finally:
        if started:
            ray.shutdown()


_EXECUTORS: dict[str, Callable] = {"serial": _run_serial, "process": _run_process, "ray": _run_ray}


def _broadcast(obj: Any, world_size: int) -> Any:
    """Rank 0's ``obj`` on every rank (identity without DDP)."""
    if world_size == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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
    error, results, notes = _broadcast((error, results, notes), world_size)
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
        _EXECUTORS[config.executor](todo, tokens, config, record)
    finally:
        bar.close()
    runs, curves = _tables(grid, results)
    if rank == 0:
        _write_tables(out_dir, runs, curves)  # also when nothing was left to train
    return SweepResult(out_dir=out_dir, runs=runs, curves=curves, runs_csv=out_dir / "runs.csv",
                       curves_csv=out_dir / "curves.csv", config=config, n_trained=len(todo),
                       n_skipped=n_skipped, results=results, warnings=notes)


def load_sweep_config(out_dir: str | os.PathLike) -> SweepConfig:
    """The :class:`SweepConfig` saved in ``out_dir/config.json`` by :func:`run_sweep`.

    Raises:
        DataNotFoundError: no config.json there.
        DataFormatError: it is damaged, or holds an unknown key or a value of the wrong type or
            range (the message names the file and the key).
    """
    path = Path(out_dir) / "config.json"
    blob = read_json(path, what="sweep config file")
    try:
        return config_from_dict(SweepConfig, blob)
    except InvalidParameterError as exc:
        raise DataFormatError(f"The sweep config file {str(path)!r} is not a valid SweepConfig: {exc}") from None
