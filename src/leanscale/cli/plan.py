"""``leanscale plan``: compute-optimal N and D for a budget, from a published or fitted law; with
``--unique-tokens`` under a unique-data limit (Muennighoff et al. 2023), with ``--inference-tokens``
for the fewest training + inference FLOPs (Sardana et al. 2024)."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from leanscale.cli import add_command, print_json
from leanscale.core.errors import InvalidParameterError
from leanscale.report.table import format_table
from leanscale.scaling.data_constrained import plan_data_constrained
from leanscale.scaling.flops import GPU_PEAK_FLOPS
from leanscale.scaling.inference_aware import plan_inference_aware
from leanscale.scaling.laws import LAWS, ScalingWarning
from leanscale.scaling.planning import plan

EPILOG = """\
examples:
  leanscale plan --flops 5.76e23                      Chinchilla's budget, Epoch's refit law
  leanscale plan --flops 5.76e23 --law chinchilla     the published Approach-3 law
  leanscale plan --params 7e9 --law epoch             tokens for a compute-optimal 7B model
  leanscale plan --flops 1e22 --gpu h100 --mfu 0.4    with GPU-hours
  leanscale plan --flops 3e12 --law runs/fit/law.json --extrapolate --json
  leanscale plan --flops 1e24 --unique-tokens 2e11     only 200B unique tokens: epochs, effective data
  leanscale plan --flops 9.26e21 --unique-tokens 25e9 --law muennighoff   Muennighoff et al.'s Figure 1
  leanscale plan --params 13e9 --inference-tokens 2e12 --law chinchilla   a 13B model's quality, 2T tokens served
  leanscale plan --target-loss 2.0 --inference-tokens 1e13             the same for a loss
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
                   help="'chinchilla' (Hoffmann 2022), 'epoch' (Besiroglu 2024, default) or a law.json from `leanscale fit`; "
                   "with --unique-tokens or --inference-tokens also 'muennighoff' (Muennighoff 2023, C4)")
    p.add_argument("--unique-tokens", type=float, dest="unique_tokens",
                   help="only this many unique tokens exist (with --flops): the N, D and epochs of least loss "
                   "when data is repeated (Muennighoff et al. 2023)")
    p.add_argument("--inference-tokens", type=float, dest="inference_tokens",
                   help="tokens expected to be served: the N and D reaching the quality of the Chinchilla-optimal "
                   "run (of --flops or --params, or --target-loss) with the fewest training + inference FLOPs "
                   "(Sardana et al. 2024)")
    p.add_argument("--target-loss", type=float, dest="target_loss",
                   help="with --inference-tokens: the loss to reach, instead of --flops or --params")
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
    if args.unique_tokens is not None or args.inference_tokens is not None or args.target_loss is not None:
        return _run_extension(args, mfu)
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


_LABELS = {
    "law": "law", "flops": "FLOPs C", "unique_tokens": "unique tokens U", "n_params": "parameters N",
    "n_tokens": "tokens D", "tokens_per_param": "tokens per parameter", "epochs": "epochs (D / U)",
    "effective_tokens": "effective tokens D'", "effective_params": "effective parameters N'",
    "predicted_loss": "predicted loss", "unlimited_n_params": "parameters N, unlimited data",
    "unlimited_n_tokens": "tokens D, unlimited data", "unlimited_loss": "loss, unlimited data",
    "loss_penalty": "loss penalty vs unlimited data", "r_d_star": "R_D* (repeated data)",
    "r_n_star": "R_N* (excess parameters)",
    "inference_tokens": "inference tokens", "target_loss": "target loss", "reference": "quality of",
    "training_flops": "training FLOPs 6ND", "inference_flops": "inference FLOPs 2N D_inf",
    "total_flops": "total FLOPs", "chinchilla_n_params": "Chinchilla-optimal N",
    "chinchilla_n_tokens": "Chinchilla-optimal D", "chinchilla_tokens_per_param": "Chinchilla-optimal D/N",
    "chinchilla_training_flops": "Chinchilla-optimal training FLOPs",
    "chinchilla_inference_flops": "Chinchilla-optimal inference FLOPs",
    "chinchilla_total_flops": "Chinchilla-optimal total FLOPs", "flops_saved": "FLOPs saved",
    "saving_fraction": "saving (fraction of Chinchilla total)", "gpu": "GPU", "mfu": "MFU",
    "gpu_hours": "GPU-hours (training)",
}


def _run_extension(args, mfu: float) -> int:
    """--unique-tokens (data-constrained) or --inference-tokens (inference-aware) planning."""
    if args.unique_tokens is not None and args.inference_tokens is not None:
        raise InvalidParameterError(
            "The '--unique-tokens' and '--inference-tokens' parameters of leanscale plan cannot be combined: "
            f"plan one at a time. Got --unique-tokens {args.unique_tokens} and --inference-tokens "
            f"{args.inference_tokens}.")
    common = dict(gpu=args.gpu, mfu=mfu, extrapolate=args.extrapolate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ScalingWarning)  # printed below from result.warnings
        if args.unique_tokens is not None:
            if args.target_loss is not None:
                raise InvalidParameterError(
                    f"The '--target-loss' parameter of leanscale plan is used only with '--inference-tokens'. "
                    f"Got --target-loss {args.target_loss} with --unique-tokens.")
            if args.flops is None or args.n_params is not None or args.n_tokens is not None:
                raise InvalidParameterError(
                    "The '--unique-tokens' parameter of leanscale plan needs '--flops' (the budget to split between "
                    "N and D) and neither '--params' nor '--tokens'. Got "
                    f"--flops {args.flops}, --params {args.n_params}, --tokens {args.n_tokens}.")
            result = plan_data_constrained(args.law, flops=args.flops, unique_tokens=args.unique_tokens, **common)
        else:
            if args.inference_tokens is None:
                raise InvalidParameterError(
                    f"The '--target-loss' parameter of leanscale plan is used only with '--inference-tokens'. "
                    f"Got --target-loss {args.target_loss} without it.")
            if args.n_tokens is not None:
                raise InvalidParameterError(
                    "The '--inference-tokens' parameter of leanscale plan takes the quality to reach from one of "
                    f"'--flops', '--params', '--target-loss', not '--tokens'. Got --tokens {args.n_tokens}.")
            given = [k for k in ("flops", "n_params", "target_loss") if getattr(args, k) is not None]
            if len(given) != 1:
                flags = {"flops": "--flops", "n_params": "--params", "target_loss": "--target-loss"}
                raise InvalidParameterError(
                    "The '--inference-tokens' parameter of leanscale plan needs exactly one of '--flops', '--params', "
                    "'--target-loss' (the quality to reach: the Chinchilla-optimal run of a budget or a size, or a "
                    f"loss). Got {', '.join(flags[k] for k in given) or 'none'}.")
            result = plan_inference_aware(args.law, inference_tokens=args.inference_tokens, flops=args.flops,
                                          n_params=args.n_params, target_loss=args.target_loss, **common)
    blob = result.to_dict()
    notes = blob.pop("warnings")
    if args.json:
        blob["warnings"] = notes
        return print_json(blob, notes)
    rows = [{"quantity": _LABELS.get(k, k), "value": v} for k, v in blob.items() if v is not None]
    print(format_table(rows, ["quantity", "value"]))
    for warning in notes:
        print(f"WARNING: {warning}")
    return 0
