"""The settings of an IsoFLOP sweep: :class:`SweepConfig`, the named presets and the saved copy.

:func:`preset_config` builds a config from a preset of :data:`leanscale.scaling._presets.PRESETS`
with ``key=value`` overrides (what ``leanscale sweep --preset ... --set ...`` does);
:func:`load_sweep_config` reads the copy :func:`leanscale.scaling.sweep.run_sweep` saves in its
folder.

Example:
    >>> config = preset_config("default", ["n_sizes=3"])
    >>> config.n_sizes, config.executor
    (3, 'serial')
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from leanscale.core.config import config_from_dict
from leanscale.core.errors import DataFormatError, InvalidParameterError
from leanscale.core.io import read_json
from leanscale.core.validation import Interval, Options, check_params
from leanscale.scaling._presets import EXECUTORS, PRESETS

__all__ = ["SweepConfig", "load_sweep_config", "preset_config"]


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
