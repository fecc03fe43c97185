"""``leanscale fit``: fit scaling laws to your runs, with confidence intervals and figures."""

from __future__ import annotations

import argparse
from pathlib import Path

from leanscale.cli import add_command, print_json
from leanscale.report.table import format_table
from leanscale.scaling.analysis import REFERENCE_EXPONENTS, analyze_runs
from leanscale.scaling.runs import read_curves, read_runs

EPILOG = """\
examples:
  leanscale fit runs/runs.csv                       all approaches, 4000 bootstrap refits, figures
  leanscale fit runs/runs.csv --curves runs/curves.csv --out runs/fit
  leanscale fit my_runs.csv --resamples 0 --json    point estimates only, as JSON
  leanscale plan --flops 1e13 --law runs/fit/law.json --extrapolate

runs.csv needs the columns n_params, n_tokens, loss; optional flops (default 6ND),
budget_flops (IsoFLOP group) and run_id. curves.csv: run_id, n_params, n_tokens, loss.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = add_command(
        subparsers, "fit", help="fit L(N, D) and compute-optimal exponents to your runs",
        description="Fit Chinchilla's three approaches to training runs: the parametric law "
        "L(N,D) = E + A/N^alpha + B/D^beta (Approach 3, bootstrap intervals), IsoFLOP profiles "
        "(Approach 2) and the envelope of training curves (Approach 1).",
        epilog=EPILOG,
    )
    p.add_argument("runs", help="CSV of runs (e.g. the runs.csv a `leanscale sweep` wrote)")
    p.add_argument("--curves", help="CSV of training curves (default: curves.csv next to the runs, if any)")
    p.add_argument("--out", help="folder for fit.json, law.json and figures (default: <runs folder>/fit)")
    p.add_argument("--resamples", type=int, default=4000, help="bootstrap resamples (default 4000; 0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", default="fast", choices=("fast", "exhaustive", "reference"),
                   help="Approach-3 optimiser (default fast)")
    p.add_argument("--flops", type=float, help="budget at which to report N_opt and D_opt (default: the largest run)")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    runs_path = Path(args.runs)
    runs = read_runs(runs_path)
    curves_path = Path(args.curves) if args.curves else runs_path.with_name("curves.csv")
    curves = read_curves(curves_path) if (args.curves or curves_path.is_file()) else None
    analysis = analyze_runs(runs, curves, n_resamples=args.resamples, seed=args.seed,
                            method=args.method, budget_flops=args.flops, progress_bar=not args.json)
    out = Path(args.out) if args.out else runs_path.parent / "fit"
    paths = analysis.write(out, figures=not args.no_figures)
    if args.json:
        blob = analysis.to_dict()  # its "warnings" list says why a result may not be trusted
        blob["files"] = {k: str(v) for k, v in paths.items()}
        return print_json(blob, analysis.warnings)
    print(format_table(analysis.parameter_rows(), title=f"L(N, D) = E + A/N^alpha + B/D^beta  ({runs.n_params.size} runs)"))
    print()
    print(format_table(analysis.exponent_rows(), title="compute-optimal exponents: N_opt ~ C^a, D_opt ~ C^b"))
    print("published a: " + ", ".join(f"{k} {v:.2f}" for k, v in REFERENCE_EXPONENTS.items()))
    print()
    print(format_table(analysis.optimum_rows(), title="compute-optimal allocation"))
    for note in analysis.notes:
        print(f"note: {note}")
    for warning in analysis.warnings:
        print(f"WARNING: {warning}")
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    print(f"next: leanscale plan --flops <budget> --law {paths['law']}")
    return 0
