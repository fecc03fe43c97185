"""``leanscale sweep``: train an IsoFLOP grid of small Transformers and write runs.csv for the fit."""

from __future__ import annotations

import argparse
import warnings

from leanscale.cli import add_command, print_json, torchrun_rank
from leanscale.core.config import config_to_dict
from leanscale.core.errors import InvalidParameterError
from leanscale.report.table import format_table
from leanscale.scaling._presets import EXECUTORS, PRESETS

__all__ = ["add_parser", "config_from_args", "run"]

EPILOG = """\
examples:
  leanscale sweep --out runs/quick --preset quick          6 tiny runs on 600 kB of gcide, ~7 s
  leanscale sweep --out runs/sweep                         3 budgets x 5 sizes on gcide, ~11 min
  leanscale sweep --out runs/bench --preset benchmark      4 budgets over 32x, 2 processes, ~20 min
  leanscale sweep --out runs/s --budgets 2e11,6e11,2e12 --sizes 7 --executor process --workers 2
  leanscale sweep --out runs/py --corpus stdlib --budgets 3e11,1e12 --set seq_len=256
  leanscale sweep --out runs/ray --executor ray --workers 4 --set ray_address=auto
  torchrun --nproc_per_node=2 -m leanscale.cli.main sweep --out runs/ddp --preset quick

  leanscale fit runs/sweep/runs.csv                        then fit the scaling laws

A sweep is resumable: run the same command again with the same --out and finished runs are kept.
--set takes any field of SweepConfig (key=value, repeatable), e.g. max_minutes=20, val_batches=16.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = add_command(
        subparsers, "sweep", help="train an IsoFLOP grid of small Transformers (runs.csv for `fit`)",
        description="Train, for each compute budget C, several decoder-only Transformers of "
        "sizes N spaced evenly in log N around the expected compute-optimal size, each for D = C / (6 N) "
        "tokens of a local text corpus (single epoch), and write runs.csv (final validation "
        "loss per run) and curves.csv (loss curves) for `leanscale fit`.",
        epilog=EPILOG,
    )
    p.add_argument("--out", required=True, help="results folder (resumes when it holds the same sweep)")
    p.add_argument("--preset", default="default", choices=tuple(PRESETS),
                   help="starting configuration (default: default)")
    p.add_argument("--corpus", help="'gcide', 'stdlib' or a path to a text file or folder")
    p.add_argument("--data-root", help="folder holding the corpus (default: system location)")
    p.add_argument("--executor", choices=EXECUTORS, help="where runs train (default: serial)")
    p.add_argument("--workers", type=int, dest="n_workers",
                   help="parallel runs for --executor process/ray")
    p.add_argument("--budgets", help="comma-separated FLOP budgets, e.g. 1e11,3e11,1e12")
    p.add_argument("--sizes", type=int, dest="n_sizes", help="model sizes per budget")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override any SweepConfig field (repeatable)")
    p.add_argument("--json", action="store_true", help="print the runs as JSON instead of a table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def config_from_args(args: argparse.Namespace):
    """The :class:`SweepConfig` of the command line: preset, then the options, then ``--set``."""
    from leanscale.scaling.sweep import preset_config

    overrides = []
    for key in ("corpus", "data_root", "executor", "n_workers", "n_sizes"):
        value = getattr(args, key, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.budgets is not None:
        budgets = args.budgets.strip()
        if not budgets:
            raise InvalidParameterError(
                "The '--budgets' option must be comma-separated FLOP counts, e.g. 1e11,3e11,1e12. "
                "Got an empty string."
            )
        overrides.append(f"budgets_flops={budgets}")
    return preset_config(args.preset, overrides + list(args.overrides))


def run(args: argparse.Namespace) -> int:
    from leanscale.scaling.sweep import run_sweep

    config = config_from_args(args)
    with torchrun_rank() as rank, warnings.catch_warnings():
        # A damaged task file (moved aside and trained again) is reported below, once.
        warnings.filterwarnings("ignore", message=".*computed again", category=RuntimeWarning)
        result = run_sweep(config, args.out, progress=not args.no_progress)
    if rank != 0:
        return 0  # under torchrun only rank 0 reports
    if args.json:
        blob = {"out_dir": str(result.out_dir), "runs_csv": str(result.runs_csv),
                "curves_csv": str(result.curves_csv), "n_trained": result.n_trained,
                "n_skipped": result.n_skipped, "config": config_to_dict(config), "runs": result.runs,
                "warnings": result.warnings}
        return print_json(blob, result.warnings)
    columns = ["run_id", "n_params", "n_tokens", "flops", "loss", "train_loss", "seconds"]
    print(format_table(result.runs, columns,
                       title=f"IsoFLOP sweep: {len(result.runs)} runs ({result.n_trained} trained now, "
                       f"{result.n_skipped} already done)"))
    for warning in result.warnings:
        print(f"WARNING: {warning}")
    print(f"\nwrote {result.runs_csv} and {result.curves_csv}")
    print(f"next: leanscale fit {result.runs_csv}")
    return 0
