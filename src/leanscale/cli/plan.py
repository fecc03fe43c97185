"""``leanscale plan``: compute-optimal N and D for a budget, from a published or fitted law."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from leanscale.cli import add_command, print_json
from leanscale.core.errors import InvalidParameterError
from leanscale.report.table import format_table
from leanscale.scaling.flops import GPU_PEAK_FLOPS
from leanscale.scaling.laws import LAWS, ScalingWarning
from leanscale.scaling.planning import plan

EPILOG = """\
examples:
  leanscale plan --flops 5.76e23                      Chinchilla's budget, Epoch's refit law
  leanscale plan --flops 5.76e23 --law chinchilla     the published Approach-3 law
  leanscale plan --params 7e9 --law epoch             tokens for a compute-optimal 7B model
  leanscale plan --flops 1e22 --gpu h100 --mfu 0.4    with GPU-hours
  leanscale plan --flops 3e12 --law runs/fit/law.json --extrapolate --json
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = add_command(
        subparsers, "plan", help="compute-optimal model size and tokens for a budget",
        description="Plan N (parameters), D (tokens) and C = 6ND (FLOPs) from a scaling law L(N, D) = "
        "E + A/N^alpha + B/D^beta. Give one of --flops/--params/--tokens for the compute-optimal "
        "choice, or two of them for the third.",
        epilog=EPILOG,
    )
    p.add_argument("--flops", type=float, help="training budget C in FLOPs")
    p.add_argument("--params", type=float, dest="n_params", help="model parameters N")
    p.add_argument("--tokens", type=float, dest="n_tokens", help="training tokens D")
    p.add_argument("--law", default="epoch",
                   help="'chinchilla' (Hoffmann 2022), 'epoch' (Besiroglu 2024, default) or a law.json from `leanscale fit`")
    p.add_argument("--gpu", help=f"accelerator for GPU-hours: {', '.join(GPU_PEAK_FLOPS)}")
    p.add_argument("--mfu", type=float, default=None, help="model-FLOPs utilisation, with --gpu (default 0.4)")
    p.add_argument("--extrapolate", action="store_true",
                   help="allow models smaller than the smallest one behind the law")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    if args.mfu is not None and args.gpu is None:
        raise InvalidParameterError(
            f"The '--mfu' parameter of leanscale plan is used only with '--gpu' (it turns FLOPs into GPU-hours). "
            f"Got --mfu {args.mfu} without --gpu.")
    mfu = 0.4 if args.mfu is None else args.mfu
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ScalingWarning)  # printed below from result.warnings
        try:
            result = plan(args.law, flops=args.flops, n_params=args.n_params, n_tokens=args.n_tokens,
                          gpu=args.gpu, mfu=mfu, extrapolate=args.extrapolate)
        except InvalidParameterError as exc:
            if str(args.law).lower() in LAWS or not Path(args.law).is_file() or str(args.law) in str(exc):
                raise
            # the numbers came from a file: say which, its coefficients may be the problem
            raise InvalidParameterError(f"{exc} (The law came from the law file {args.law!r}.)") from None
    blob = result.to_dict()
    notes = blob.pop("warnings")
    if args.json:
        blob["warnings"] = notes
        return print_json(blob, notes)
    labels = {"law": "law", "flops": "FLOPs C", "n_params": "parameters N", "n_tokens": "tokens D",
              "tokens_per_param": "tokens per parameter", "predicted_loss": "predicted loss",
              "optimal": "compute-optimal", "compute_optimal_loss": "loss of the optimal split",
              "gpu": "GPU", "mfu": "MFU", "gpu_hours": "GPU-hours"}
    rows = [{"quantity": labels[k], "value": v} for k, v in blob.items() if v is not None]
    print(format_table(rows, ["quantity", "value"]))
    for warning in notes:
        print(f"WARNING: {warning}")
    return 0
