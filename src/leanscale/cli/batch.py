"""``leanscale batch``: large batches without the generalization gap.

Three actions: ``plan`` turns a small-batch configuration into a large-batch one (LR scaling,
Ghost BatchNorm, regime adaptation, warmup); ``noise`` measures the gradient noise scale of a
model on a data set and advises a batch size and LR; ``train`` trains the reference CNN on
Fashion-MNIST -- or the user's ``--model`` on the user's ``--data`` -- with a recipe (single process
or under ``torchrun``).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from leanscale.cli import (
    add_actions,
    add_command,
    print_json,
    run_action,
    torchrun_rank,
)
from leanscale.cli._spec import add_data_arguments
from leanscale.core.errors import InvalidParameterError

EPILOG = """\
examples:
  leanscale batch plan --batch 2048 --base-batch 128 --base-lr 0.1 --epochs 10 --milestones 5,8
  leanscale batch plan --batch 8192 --rule linear --warmup-epochs 5 --optimizer lars --json
  leanscale batch noise --n-batches 40                     B_simple of the CNN on Fashion-MNIST
  leanscale batch train --batch 1024 --set epochs=2 --set n_train=10000
  leanscale batch train --batch 256 --model mymodel.py:build --data digits.npz --epochs 5
  leanscale batch noise --model mypkg.nets:resnet --data images/ --n-batches 40
  torchrun --nproc_per_node=2 -m leanscale.cli.main batch train --batch 512 --out run.json
"""


BUILTIN_DATA = ("fashion-mnist",)


def _user_args(q) -> None:
    """--model and --data (the user's own model and data) of noise and train."""
    q.add_argument("--model", default=None, metavar="MODULE:FACTORY",
                   help="your model: 'package.module:factory' or 'path/to/file.py:factory', a callable with no "
                   "arguments returning an nn.Module (default: the reference CNN, or the MLP for flat features)")
    add_data_arguments(q, builtins=BUILTIN_DATA, default="fashion-mnist")
    q.add_argument("--test-fraction", type=float, default=0.2,
                   help="share of your data held out for evaluation when it has no test split (0.2)")


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(t) for t in text.split(",") if t.strip()) if text else ()


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = add_command(
        subparsers, "batch", help="large-batch recipe, noise scale and training",
        description="Large batches without the generalization gap: plan a large-batch run from a "
        "small-batch one (Hoffer et al. 2017, Goyal et al. 2017), measure the gradient noise scale "
        "(McCandlish et al. 2018), train with the recipe.",
        epilog=EPILOG,
    )
    sub = add_actions(p)

    def recipe_args(q):
        q.add_argument("--batch", type=int, required=True, help="the large (global) batch")
        q.add_argument("--base-batch", type=int, default=128, help="small batch the base settings are for (128)")
        q.add_argument("--base-lr", type=float, default=0.1, help="small-batch learning rate (0.1)")
        q.add_argument("--epochs", type=float, default=1.0, help="small-batch epochs (1)")
        q.add_argument("--milestones", type=_floats, default=(), help="small-batch LR-drop epochs, e.g. 5,8")
        # large_batch.schedules.DEFAULT_LR_RULE, written out: the parser must not import torch
        q.add_argument("--rule", default="sqrt",
                       help="LR scaling: sqrt (Hoffer, default), linear (Goyal; add --warmup-epochs), none")
        q.add_argument("--ghost-batch", type=int, default=None, help="ghost batch (default: the base batch; 0: off)")
        q.add_argument("--regime", type=float, default=1.0,
                       help="regime adaptation: 1 = as many updates as the small batch, 0 = as many epochs")
        q.add_argument("--warmup-epochs", type=float, default=0.0, help="gradual warmup epochs (0)")
        q.add_argument("--optimizer", default="sgd", help="sgd, lars or lamb (plan: also adamw)")
        q.add_argument("--clip", type=float, default=None, help="clip the gradient norm to this")
        q.add_argument("--max-lr", type=float, default=None, help="cap on the scaled LR")

    q = sub.add_parser("plan", help="large-batch settings from small-batch ones, with the reasoning")
    recipe_args(q)
    q.add_argument("--weight-decay", type=float, default=None,
                   help="AdamW: small-batch weight decay (0.01); moved to keep the EMA timescale")
    q.add_argument("--betas", type=_floats, default=None, help="AdamW: small-batch beta1,beta2 (0.9,0.999)")
    q.add_argument("--dataset-size", type=int, default=None,
                   help="AdamW: examples per epoch, to report the EMA timescale tau = B/(lr*wd*D)")
    q.add_argument("--no-timescale-rule", action="store_true", help="AdamW: keep the weight decay")
    q.add_argument("--no-beta2-rule", action="store_true", help="AdamW: keep beta2")
    q.add_argument("--beta1-rule", action="store_true", help="AdamW: scale beta1 like beta2")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(action_func=run_plan)

    q = sub.add_parser("noise", help="gradient noise scale B_simple and batch-size advice")
    q.add_argument("--width", type=int, default=8, help="CNN width (8)")
    q.add_argument("--batch-size", type=int, default=128, help="small batch of the estimator (128)")
    q.add_argument("--n-batches", type=int, default=40, help="small batches to average (40)")
    q.add_argument("--warm-steps", type=int, default=50,
                   help="SGD steps at batch 128 before measuring (B_simple at initialisation is not typical)")
    q.add_argument("--base-lr", type=float, default=0.1, help="LR at --base-batch for the LR advice")
    q.add_argument("--base-batch", type=int, default=128)
    q.add_argument("--data-root", default=None, help="folder with Fashion-MNIST IDX files")
    _user_args(q)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(action_func=run_noise)

    q = sub.add_parser("train", help="train the reference CNN on Fashion-MNIST (or your model on your data) "
                       "with a large-batch recipe")
    recipe_args(q)
    _user_args(q)
    q.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                   help="change a field of the small-batch TrainConfig (repeatable), e.g. n_train=10000")
    q.add_argument("--out", default=None, help="write the result JSON here")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(action_func=run_train)
    return p


run = run_action  # the action chosen, or the help and exit status 2


def _recipe(args):
    from leanscale.large_batch.recipe import LargeBatchRecipe

    return LargeBatchRecipe(
        batch_size=args.batch, base_batch_size=args.base_batch, base_lr=args.base_lr, base_epochs=args.epochs,
        base_milestones=args.milestones, lr_rule=args.rule, ghost_batch_size=args.ghost_batch,
        regime_adaptation=args.regime, warmup_epochs=args.warmup_epochs, optimizer=args.optimizer,
        clip_grad_norm=args.clip, max_lr=args.max_lr,
        # AdamW's settings (``batch plan`` only; absent from ``batch train``, which has no AdamW)
        base_weight_decay=getattr(args, "weight_decay", None), base_betas=getattr(args, "betas", None),
        dataset_size=getattr(args, "dataset_size", None),
        keep_timescale=not getattr(args, "no_timescale_rule", False),
        keep_beta2_half_life=not getattr(args, "no_beta2_rule", False),
        keep_beta1_half_life=getattr(args, "beta1_rule", False),
    )


def run_plan(args) -> int:
    recipe = _recipe(args)
    if args.json:
        print_json(recipe.plan().to_dict())
    else:
        print(recipe.describe())
    return 0


# --set keys of TrainConfig that the recipe sets from its own flags (a --set would be overwritten)
_RECIPE_KEYS = {
    "batch_size": "--base-batch (the small batch) and --batch (the large one)", "lr": "--base-lr",
    "epochs": "--epochs", "ghost_batch_size": "--ghost-batch", "warmup_epochs": "--warmup-epochs",
    "optimizer": "--optimizer", "clip_grad_norm": "--clip",
}


def _check_out_path(out: str | None, flag: str = "--out") -> None:
    """Refuse an output path that cannot be written *before* any training starts. A missing folder is
    fine: it is created."""
    if out is None:
        return
    path = Path(out)
    where = f"The {flag!r} parameter of leanscale batch train"
    if path.is_dir() or str(out).endswith(("/", os.sep)):
        raise InvalidParameterError(f"{where} must be a file to write. Got {out!r}, which is a folder.")
    folder = path.parent if str(path.parent) else Path(".")
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise InvalidParameterError(
            f"{where} must be a file in a folder. Got {out!r}, but {str(folder)!r} is a file, not a folder.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InvalidParameterError(f"{where} must be in a folder you can write. Got {out!r}.")


def _user_data(args, owner: str, n_train: int | None = None, n_test: int | None = None, seed: int = 0):
    """``(x_train, y_train, x_test, y_test)`` tensors of ``--data`` (a file or folder) and its description;
    None for the built-in Fashion-MNIST."""
    import torch

    from leanscale.cli._spec import is_builtin_data, load_user_data, stratified_subset
    from leanscale.core.validation import Interval, check_param

    if is_builtin_data(args.data, BUILTIN_DATA):
        return None
    check_param("--test-fraction", args.test_fraction, [Interval(float, 0, 1, closed="neither")], owner=owner)
    data = load_user_data(args, owner, BUILTIN_DATA)
    if data.kind == "text":
        raise InvalidParameterError(
            f"The '--data' parameter of {owner} must hold features or images to train on. Got the text column of "
            f"{data.source}: embed the texts first (leanscale.models.embed_texts) and save them as an .npz.")
    if data.y is None:
        raise InvalidParameterError(
            f"The '--data' parameter of {owner} must have labels to train a classifier. Got {data.source} without "
            f"them (name the label column or array with --label-column).")
    if data.x_test is not None and data.y_test is not None:
        x_tr, y_tr, x_te, y_te = data.x, data.y, data.x_test, data.y_test
    else:
        train, test = data.split(args.test_fraction, seed=0)
        x_tr, y_tr, x_te, y_te = data.x[train], data.y[train], data.x[test], data.y[test]
    keep = stratified_subset(y_tr, n_train, seed)
    keep_test = stratified_subset(y_te, n_test, 0)
    tensors = (torch.from_numpy(x_tr[keep]), torch.from_numpy(y_tr[keep]), torch.from_numpy(x_te[keep_test]),
               torch.from_numpy(y_te[keep_test]))
    return tensors, data


def _model(args, owner: str, seed: int):
    """The user's ``--model`` (built after seeding, so a run is reproducible), or None."""
    if args.model is None:
        return None
    import torch

    from leanscale.cli._spec import build_model

    torch.manual_seed(seed)
    return build_model(args.model, "--model", owner)


def run_noise(args) -> int:
    from leanscale.core.validation import Interval, check_param
    from leanscale.large_batch.noise_scale import (
        measure_noise_scale,
    )
    from leanscale.large_batch.train import (
        TrainConfig,
        load_image_data,
        train_classifier,
    )
    from leanscale.train.user_data import output_cross_entropy

    # every flag is checked before the data are loaded and the warm-up steps run
    owner = "leanscale batch noise"
    check_param("--warm-steps", args.warm_steps, [Interval(int, 0, None)], owner=owner)
    check_param("--batch-size", args.batch_size, [Interval(int, 1, None)], owner=owner)
    check_param("--n-batches", args.n_batches, [Interval(int, 2, None)], owner=owner)
    check_param("--base-batch", args.base_batch, [Interval(int, 1, None)], owner=owner)
    check_param("--base-lr", args.base_lr, [Interval(float, 0, float("inf"), closed="neither")], owner=owner)
    check_param("--seed", args.seed, [Interval(int, 0, None)], owner=owner)
    cfg = TrainConfig(width=args.width, data_root=args.data_root, seed=args.seed, batch_size=128, lr=args.base_lr,
                      decay="none", milestones=(), n_test=1000)
    from leanscale.large_batch.train import _check_config

    _check_config(cfg)
    user = _user_data(args, owner, n_test=1000, seed=args.seed)
    data = load_image_data(cfg) if user is None else user[0]
    if data[0].ndim != 4:
        cfg = TrainConfig(**{**cfg.__dict__, "model": "mlp"})  # flat features: the reference MLP
    n = len(data[1])
    if args.batch_size > n:
        raise InvalidParameterError(
            f"The '--batch-size' parameter of {owner} must be at most the {n:,} training examples of --data "
            f"{args.data!r}. Got {args.batch_size} instead.")
    if args.batch_size * args.n_batches > n:
        raise InvalidParameterError(
            f"The '--batch-size' and '--n-batches' parameters of {owner} must draw at most the {n:,} training "
            f"examples of --data {args.data!r} (disjoint batches). Got {args.batch_size} x {args.n_batches} = "
            f"{args.batch_size * args.n_batches:,}: try --batch-size {max(1, n // max(args.n_batches, 1))} or "
            f"--n-batches {max(2, n // args.batch_size)}.")
    warm_batch = min(128, n)
    cfg = TrainConfig(**{**cfg.__dict__, "batch_size": warm_batch})
    model = _model(args, owner, args.seed)
    steps = args.warm_steps
    if steps > 0:
        cfg = TrainConfig(**{**cfg.__dict__, "epochs": steps * warm_batch / n,
                             "eval_every_epochs": steps * warm_batch / n})
        model = train_classifier(cfg, data=data, model=model, keep_model=True, progress_bar=not args.json).model
    elif model is None:  # --warm-steps 0: measure at initialisation (no training at all)
        from leanscale.large_batch.train import build_model

        model = build_model(cfg, tuple(data[0].shape[1:]), int(max(data[1].max(), data[3].max())) + 1)
    with warnings.catch_warnings():  # the CLI reports reliability itself, in the text and the JSON
        warnings.simplefilter("ignore", RuntimeWarning)
        measured = measure_noise_scale(model, output_cross_entropy, (data[0], data[1]),
                                       batch_size=args.batch_size, n_batches=args.n_batches,
                                       progress_bar=not args.json)
        advice = (measured.advise(base_lr=args.base_lr, base_batch_size=args.base_batch, n_examples=len(data[1]))
                  if measured.reliable else None)
    where = f"after {steps} warm-up steps, {args.n_batches} batches of {args.batch_size}"
    warning_list = [measured.warning] if measured.warning else list(advice.warnings if advice else ())
    if args.json:
        blob = {"b_simple": float(measured.b_simple) if measured.reliable else None, "reliable": measured.reliable,
                "data": args.data if user is None else user[1].source, "model": args.model,
                "warnings": warning_list, "warm_steps": steps, "measurement": measured.to_dict(),
                "advice": advice}
        print_json(blob)
    elif advice is None:
        print(f"B_simple: no reliable estimate ({where}).")
        print(f"warning: {measured.warning}")
        print(f"  raw estimates: |G|^2 = {measured.grad_sq_norm:.4g}, tr(Sigma) = {measured.trace_sigma:.4g}"
              + (f", relative standard error ~{measured.relative_error:.0%}" if measured.relative_error else ""))
        print(f"  try: --n-batches {max(2 * args.n_batches, 40)} (more batches), or a larger --batch-size")
    else:
        print(f"B_simple = {measured.b_simple:.0f} ({where})")
        print(advice)
    # an estimate that cannot be trusted is a failed measurement: exit 1 (the JSON says why)
    return 0 if measured.reliable else 1


def run_train(args) -> int:
    from torch import nn

    from leanscale.core.config import apply_overrides
    from leanscale.core.io import atomic_write_json
    from leanscale.large_batch.train import TrainConfig, train_classifier

    recipe = _recipe(args)
    _check_out_path(args.out)
    owner = "leanscale batch train"
    for item in args.overrides:
        key = str(item).partition("=")[0].strip()
        if key == "dataset":
            raise InvalidParameterError(
                f"The '--set' parameter of {owner} must not set 'dataset': pass --data (fashion-mnist, or your "
                f".npz / .csv / .jsonl / .parquet file, image folder or datasets folder). Got {item!r}.")
        if key == "model" and args.model is not None:
            raise InvalidParameterError(
                f"The '--set' parameter of {owner} must not set 'model' together with --model {args.model!r} (one "
                f"would silently replace the other). Got {item!r}.")
        if key in _RECIPE_KEYS:
            raise InvalidParameterError(
                f"The '--set' parameter of leanscale batch train must not set {key!r}: the recipe sets it "
                f"(use {_RECIPE_KEYS[key]}). Got {item!r}."
            )
        if key == "milestones" and args.milestones:
            raise InvalidParameterError(
                f"The '--set' parameter of leanscale batch train must not set 'milestones' together with "
                f"--milestones (one would silently replace the other). Got {item!r} and --milestones "
                f"{','.join(f'{m:g}' for m in args.milestones)}."
            )
    base = TrainConfig(batch_size=args.base_batch, lr=args.base_lr, epochs=args.epochs)
    base = apply_overrides(base, args.overrides)
    if args.milestones:
        base = TrainConfig(**{**base.__dict__, "milestones": tuple(m / args.epochs for m in args.milestones)})
    user = _user_data(args, owner, n_train=base.n_train, n_test=base.n_test, seed=base.seed)
    model = _model(args, owner, base.seed)
    if model is not None and args.ghost_batch is None and not any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        # the recipe's Ghost BatchNorm has nothing to act on: off, said once, instead of a warning per run
        print(f"note: --model {args.model} has no BatchNorm layer: no Ghost BatchNorm (--ghost-batch 0).",
              file=sys.stderr)
        args.ghost_batch = 0
        recipe = _recipe(args)
    config = recipe.train_config(base)
    if user is not None and user[0][0].ndim != 4 and not any(
            str(item).partition("=")[0].strip() == "model" for item in args.overrides):
        # flat features: the reference MLP (with --model, only so that train_classifier's check of the
        # built-in CNN's input does not refuse the user's model)
        config = TrainConfig(**{**config.__dict__, "model": "mlp"})
    with torchrun_rank() as rank:
        result = train_classifier(config, data=None if user is None else user[0], model=model,
                                  progress_bar=not args.json)
    if rank != 0:
        return 0  # under torchrun only rank 0 reports
    blob = result.to_dict()
    blob["recipe"] = recipe.plan().to_dict()
    blob["data"] = args.data if user is None else user[1].source
    blob["model"] = args.model if args.model is not None else config.model
    if user is not None:
        blob["classes"] = list(user[1].classes)
    if args.out:
        atomic_write_json(args.out, blob)
    if args.json:
        print_json(blob)
    else:
        print(recipe.describe())
        print(f"test accuracy {result.test_accuracy:.4f} after {result.steps} steps of {config.batch_size} "
              f"({result.seconds:.0f} s, {result.world_size} process(es))")
        for w in result.warnings:
            print(f"warning: {w}")
    return 1 if result.warnings else 0
