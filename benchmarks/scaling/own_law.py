"""Benchmark 2 of the scaling issue: our own scaling law from an IsoFLOP sweep on a local corpus.

Trains the ``benchmark`` preset of ``leanscale sweep`` (>= 4 budgets spanning >= 30x, 5 sizes each,
small decoder-only transformers on Webster 1913 from Debian's dict-gcide, one epoch each, 2 worker
processes) into ``benchmarks/results/scaling/own_sweep/`` (resumable: run it again after an
interruption), fits all three approaches with 4,000 bootstrap resamples, and writes
``own_law.json`` and figures next to it. Goal: <= 90 minutes on 2 cores.

Usage: python benchmarks/scaling/own_law.py [--corpus gcide|stdlib] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.common import RESULTS, machine  # noqa: E402
from leanscale.core.io import atomic_write_bytes, atomic_write_json  # noqa: E402
from leanscale.report.figures import figure_to_png_bytes  # noqa: E402
from leanscale.scaling import CHINCHILLA_2022, EPOCH_2024  # noqa: E402
from leanscale.scaling.analysis import REFERENCE_EXPONENTS, analyze_runs  # noqa: E402
from leanscale.scaling.figures import frontier_figure  # noqa: E402
from leanscale.scaling.runs import read_curves, read_runs  # noqa: E402
from leanscale.scaling.sweep import preset_config, run_sweep  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default="gcide")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    args = ap.parse_args()
    config = preset_config("benchmark", [f"corpus={args.corpus}", *args.overrides])
    out = RESULTS / "scaling"
    sweep_dir = out / "own_sweep"
    t0 = time.perf_counter()
    result = run_sweep(config, sweep_dir, progress=True)
    seconds = time.perf_counter() - t0
    runs, curves = read_runs(result.runs_csv), read_curves(result.curves_csv)
    analysis = analyze_runs(runs, curves, n_resamples=4000, seed=0)
    paths = analysis.write(out / "own_fit")
    fig = frontier_figure({"ours": analysis.law, "Epoch 2024": EPOCH_2024, "Chinchilla 2022": CHINCHILLA_2022},
                          (runs.flops.min() / 10, 1e24))
    atomic_write_bytes(out / "own_fit" / "frontier.png", figure_to_png_bytes(fig))
    rows = analysis.exponent_rows()
    iso = next((r for r in rows if r["approach"].startswith("2")), rows[0])
    train_seconds = sum(r["seconds"] for r in result.runs)
    summary = {
        "a": iso["a"], "a_low": iso["a_low"], "a_high": iso["a_high"], "approach": iso["approach"],
        "exponents": rows, "parameters": analysis.parameter_rows(), "optimum": analysis.optimum_rows(),
        "reference_exponents_a": REFERENCE_EXPONENTS,
        "n_runs": int(runs.n_params.size), "budgets_flops": list(config.budgets_flops),
        "budget_span": max(config.budgets_flops) / min(config.budgets_flops),
        "sweep_wall_seconds_this_call": seconds, "sum_of_run_seconds": train_seconds,
        "runs_trained_this_call": result.n_trained, "runs_resumed": result.n_skipped,
        "notes": analysis.notes,
    }
    atomic_write_json(out / "own_law.json", {"benchmark": "own_law", "machine": machine(),
                                             "config": config, "summary": summary,
                                             "files": {k: str(v.relative_to(out)) for k, v in paths.items()}})
    print(summary)


if __name__ == "__main__":
    main()
