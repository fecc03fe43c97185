"""``leanscale sparse``: SWAT sparse weight activation training (Raihan & Aamodt 2020).

Three actions: ``report`` converts a model and prints, per layer, the sparsity, the training
FLOPs (dense vs SWAT) and the bytes held for backward (measured on one training step);
``train`` trains the reference CNN (or MLP) on Fashion-MNIST with SWAT, single process or under
``torchrun``, and can save the hard-pruned model; ``export`` hard-prunes a SWAT checkpoint into a
compact file.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

EPILOG = """\
examples:
  leanscale sparse report                                   the BatchNorm CNN at 80% (SWAT-U)
  leanscale sparse report --model mypkg.models:Net --input-shape 3,32,32 --sparsity 0.9 --distribution erk
  leanscale sparse train --sparsity 0.8 --epochs 1 --save pruned.pt
  torchrun --nproc_per_node=2 -m leanscale.cli.main sparse train --set n_train=10000
  leanscale sparse export --checkpoint swat.pt --sparsity 0.8 --out pruned.pt
"""

DEFAULT_MODEL = "leanscale.models:BNCNN"


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(",") if t.strip())


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "sparse", help="SWAT sparse training: convert, report, train, export",
        description="Sparse weight activation training (SWAT, Raihan & Aamodt 2020): top-K weights in the "
        "forward pass, top-K activations kept compactly for the backward pass, measured FLOPs and memory.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="action", title="actions", metavar="<action>")

    def swat_args(q):
        q.add_argument("--sparsity", type=float, default=0.8, help="weight (and activation) sparsity (0.8)")
        q.add_argument("--distribution", default="uniform", help="uniform (SWAT-U) or erk (SWAT-ERK)")
        q.add_argument("--activation-sparsity", type=float, default=None, help="default: --sparsity")
        q.add_argument("--topk-period", type=int, default=1, help="recompute top-K every N steps (1)")
        q.add_argument("--structured", action="store_true", help="keep whole channels")
        q.add_argument("--warmup-steps", type=int, default=0, help="ramp the sparsity over N steps (0)")
        q.add_argument("--sparse-first-layer", action="store_true", help="convert the first layer too")

    q = sub.add_parser("report", help="per-layer sparsity, training FLOPs and backward memory of a converted model")
    q.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"'package.module:callable' returning an nn.Module ({DEFAULT_MODEL})")
    q.add_argument("--input-shape", type=_ints, default=(1, 28, 28), help="one example's shape (1,28,28)")
    q.add_argument("--batch", type=int, default=128, help="batch of the measured step (128)")
    swat_args(q)
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(action_func=run_report)

    q = sub.add_parser("train", help="train the reference model on Fashion-MNIST with SWAT")
    swat_args(q)
    q.add_argument("--model", default="bncnn", help="bncnn or mlp (bncnn)")
    q.add_argument("--epochs", type=float, default=1.0)
    q.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                   help="change a field of the TrainConfig (repeatable), e.g. n_train=10000")
    q.add_argument("--save", default=None, help="write the hard-pruned model here (save_pruned format)")
    q.add_argument("--out", default=None, help="write the result JSON here")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(action_func=run_train)

    q = sub.add_parser("export", help="hard-prune a SWAT checkpoint into a compact file")
    q.add_argument("--model", default=DEFAULT_MODEL, help=f"'package.module:callable' ({DEFAULT_MODEL})")
    q.add_argument("--checkpoint", required=True, help="state_dict of the SWAT-trained model (torch.save)")
    q.add_argument("--out", required=True, help="output file (load with leanscale.sparse.load_pruned)")
    swat_args(q)
    q.set_defaults(action_func=run_export)
    p.set_defaults(func=run, print_help=p.print_help)
    return p


def run(args) -> int:
    action = getattr(args, "action_func", None)
    if action is None:
        args.print_help()
        return 0
    return action(args)


def _build(spec: str):
    """Call ``package.module:callable`` with no arguments; clear errors for a bad spec."""
    from torch import nn

    from leanscale.core.errors import InvalidParameterError

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise InvalidParameterError(
            f"The '--model' parameter of leanscale sparse must look like 'package.module:callable'. Got {spec!r} instead."
        )
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise InvalidParameterError(
            f"The '--model' parameter of leanscale sparse must name an importable callable. Got {spec!r}: {exc}."
        ) from exc
    model = factory()
    if not isinstance(model, nn.Module):
        raise InvalidParameterError(
            f"The '--model' parameter of leanscale sparse must return a torch.nn.Module. Got {type(model).__name__} "
            f"from {spec!r}."
        )
    return model


def _apply(model, args):
    from leanscale.sparse import apply_swat

    return apply_swat(model, args.sparsity, distribution=args.distribution,
                      activation_sparsity=args.activation_sparsity, topk_period=args.topk_period,
                      structured=args.structured, warmup_steps=args.warmup_steps,
                      dense_first_layer=not args.sparse_first_layer)


def run_report(args) -> int:
    import torch

    from leanscale.core.errors import InvalidParameterError
    from leanscale.core.io import to_jsonable
    from leanscale.sparse.report import swat_report

    if args.batch < 2:
        raise InvalidParameterError(f"The '--batch' parameter of leanscale sparse report must be at least 2. Got {args.batch}.")
    torch.manual_seed(0)
    dense, swat = _build(args.model), _build(args.model)
    swat.load_state_dict(dense.state_dict())
    _apply(swat, args)
    x = torch.randn(args.batch, *args.input_shape)
    report = swat_report(dense, swat, x)
    if args.json:
        json.dump(to_jsonable(report), sys.stdout, indent=2)
        print()
    else:
        print(report["text"])
    return 0


def run_train(args) -> int:
    from leanscale.core.config import apply_overrides
    from leanscale.core.distributed import init_from_env, rank_and_world, shutdown
    from leanscale.core.io import atomic_write_json, to_jsonable
    from leanscale.large_batch.train import (
        TrainConfig,
        build_model,
        load_image_data,
        train_classifier,
    )
    from leanscale.sparse import export_pruned, save_pruned, swat_summary

    config = apply_overrides(TrainConfig(model=args.model, epochs=args.epochs, eval_every_epochs=args.epochs),
                             args.overrides)
    started = init_from_env()
    rank = rank_and_world()[0]
    try:
        data = load_image_data(config)
        import torch

        torch.manual_seed(config.seed)
        model = _apply(build_model(config, tuple(data[0].shape[1:]), int(data[1].max()) + 1), args)
        result = train_classifier(config, data=data, model=model, keep_model=True, progress_bar=not args.json)
    finally:
        if started:
            shutdown()
    if rank != 0:
        return 0  # under torchrun only rank 0 reports
    blob = result.to_dict()
    blob["swat_layers"] = swat_summary(result.model)
    blob["sparsity"], blob["distribution"] = args.sparsity, args.distribution
    if args.save:
        save_pruned(export_pruned(result.model), args.save)
    if args.out:
        atomic_write_json(args.out, blob)
    if args.json:
        json.dump(to_jsonable(blob), sys.stdout, indent=2)
        print()
    else:
        print(f"SWAT-{'U' if args.distribution == 'uniform' else 'ERK'} {args.sparsity:.0%}: test accuracy "
              f"{result.test_accuracy:.4f} after {result.steps} steps ({result.seconds:.0f} s, "
              f"{result.world_size} process(es))" + (f"; pruned model -> {args.save}" if args.save else ""))
    return 0


def run_export(args) -> int:
    import torch

    from leanscale.core.errors import InvalidParameterError
    from leanscale.sparse import export_pruned, save_pruned

    model = _apply(_build(args.model), args)
    try:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as exc:
        raise InvalidParameterError(
            f"The '--checkpoint' parameter of leanscale sparse export must be a readable torch.save'd state_dict. "
            f"Got {args.checkpoint!r}: {exc}."
        ) from exc
    if not isinstance(state, dict):
        raise InvalidParameterError(
            f"The '--checkpoint' parameter of leanscale sparse export must hold a state_dict. Got a "
            f"{type(state).__name__} in {args.checkpoint!r}."
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("swat_step")]  # a dense checkpoint has no step counters
    if missing or unexpected:
        raise InvalidParameterError(
            f"The '--checkpoint' parameter of leanscale sparse export does not fit --model {args.model!r}: "
            f"missing {missing[:5]}, unexpected {list(unexpected)[:5]}."
        )
    path = save_pruned(export_pruned(model), args.out)
    print(f"hard-pruned model -> {path}")
    return 0
