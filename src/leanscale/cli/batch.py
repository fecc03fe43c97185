"""``leanscale batch``: large batches without the generalization gap.

Four actions: ``plan`` turns a small-batch configuration into a large-batch one (LR scaling,
Ghost BatchNorm, regime adaptation, warmup; AdamW's weight decay and betas); ``noise`` measures the
gradient noise scale of a model on a data set and advises a batch size and LR; ``critical`` measures
the critical batch by branching from checkpoints of the small-batch run (Merrill et al. 2025) and
prints the batch-size warmup it implies; ``train`` trains the reference CNN on Fashion-MNIST -- or
the user's ``--model`` on the user's ``--data`` -- with a recipe (``--batch``, ``--optimizer adamw``)
or a batch-size warmup (``--batch-schedule``), single process or under ``torchrun``.

Examples::

    leanscale batch critical --set n_train=10000 --at 0.05,0.15,0.4 --sizes 128,256,512,1024
    leanscale batch train --batch-schedule 0:128,0.3:256,0.6:512 --set n_train=10000
    leanscale batch train --batch 512 --optimizer adamw --base-lr 1e-3 --weight-decay 0.1 --betas 0.9,0.99
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
  leanscale batch train --batch 512 --optimizer adamw --base-lr 1e-3 --weight-decay 0.1 --betas 0.9,0.99
  leanscale batch critical --at 0.05,0.15,0.4 --sizes 128,256,512,1024 --json   CBS by branching
  leanscale batch train --batch-schedule 0:128,0.384:256 --milestones 0.5,0.75   batch-size warmup
  leanscale batch train --base-batch 32 --batch-schedule 0:32,0.25:64 --model mymodel.py:build --data digits.npz
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

    def recipe_args(q, batch_required=True):
        q.add_argument("--batch", type=int, required=batch_required,
                       help="the large (global) batch" + ("" if batch_required else " (or --batch-schedule)"))
        q.add_argument("--base-batch", type=int, default=128, help="small batch the base settings are for (128)")
        q.add_argument("--base-lr", type=float, default=0.1, help="small-batch learning rate (0.1)")
        q.add_argument("--epochs", type=float, default=1.0, help="small-batch epochs (1)")
        q.add_argument("--milestones", type=_floats, default=(), help="small-batch LR-drop epochs, e.g. 5,8")
        # large_batch.schedules.DEFAULT_LR_RULE, written out: the parser must not import torch
        q.add_argument("--rule", default="sqrt",
                       help="LR scaling: sqrt (Hoffer, default), linear (Goyal; add --warmup-epochs), none")
        q.add_argument("--ghost-batch", type=int, default=None, help="ghost batch (default: the base batch; 0: off)")
        q.add_argument("--regime", type=float, default=None,
                       help="regime adaptation: 1 = as many updates as the small batch (default), 0 = as many epochs")
        q.add_argument("--warmup-epochs", type=float, default=0.0, help="gradual warmup epochs (0)")
        q.add_argument("--optimizer", default="sgd", help="sgd, lars, lamb or adamw")
        q.add_argument("--clip", type=float, default=None, help="clip the gradient norm to this")
        q.add_argument("--max-lr", type=float, default=None, help="cap on the scaled LR")

    def run_args(q):  # the training subcommands: your model and data, config overrides, output
        _user_args(q)
        q.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                       help="change a field of the small-batch TrainConfig (repeatable), e.g. n_train=10000")
        q.add_argument("--out", default=None, help="write the result JSON here")
        q.add_argument("--json", action="store_true", help="print JSON")

    def adamw_args(q, dataset_size=True):
        q.add_argument("--weight-decay", type=float, default=None,
                       help="AdamW: small-batch weight decay (0.01); moved to keep the EMA timescale")
        q.add_argument("--betas", type=_floats, default=None, help="AdamW: small-batch beta1,beta2 (0.9,0.999)")
        if dataset_size:
            q.add_argument("--dataset-size", type=int, default=None,
                           help="AdamW: examples per epoch, to report the EMA timescale tau = B/(lr*wd*D)")
        q.add_argument("--no-timescale-rule", action="store_true", help="AdamW: keep the weight decay")
        q.add_argument("--no-beta2-rule", action="store_true", help="AdamW: keep beta2")
        q.add_argument("--beta1-rule", action="store_true", help="AdamW: scale beta1 like beta2")

    q = sub.add_parser("plan", help="large-batch settings from small-batch ones, with the reasoning")
    recipe_args(q)
    adamw_args(q)
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

    q = sub.add_parser("critical", help="the critical batch by branching from checkpoints of the small-batch run, "
                       "and the batch-size warmup it implies")
    q.add_argument("--base-batch", type=int, default=128, help="the small batch of the run to branch from (128)")
    q.add_argument("--base-lr", type=float, default=0.1, help="its learning rate (0.1)")
    q.add_argument("--epochs", type=float, default=1.0, help="its epochs (1)")
    q.add_argument("--milestones", type=_floats, default=(), help="its LR-drop epochs, e.g. 0.5,0.75")
    q.add_argument("--rule", default="sqrt", help="LR scaling of the branches and the schedule: sqrt (default), "
                   "linear, none")
    q.add_argument("--ghost-batch", type=int, default=None,
                   help="ghost batch of the run and every branch (default: the base batch; 0: off)")
    q.add_argument("--at", type=_floats, default=(0.05, 0.15, 0.4),
                   help="checkpoints, fractions of the run (0.05,0.15,0.4)")
    q.add_argument("--sizes", default=None, help="batches to branch at (default: base batch x 1,2,4,8)")
    q.add_argument("--examples", type=int, default=None,
                   help="examples per branch, a multiple of every size (default: 32 x the base batch)")
    q.add_argument("--lr-grid", type=_floats, default=(1.0,), help="LR multipliers per branch (1; e.g. 0.5,1,2)")
    q.add_argument("--tolerance", type=float, default=0.01,
                   help="allowed relative loss increase over the base batch's branch (0.01)")
    q.add_argument("--margin", type=float, default=2.0,
                   help="warmup: raise the batch once the CBS is this times the new batch (2)")
    q.add_argument("--max-batch", type=int, default=None, help="warmup: the largest batch (default: the largest size)")
    q.add_argument("--eval-mode", default="auto", choices=("auto", "train", "eval"),
                   help="branch loss with batch statistics (train) or running ones (eval); auto: train if the "
                   "model has BatchNorm")
    run_args(q)
    q.set_defaults(action_func=run_critical)

    q = sub.add_parser("train", help="train the reference CNN on Fashion-MNIST (or your model on your data) "
                       "with a large-batch recipe or a batch-size warmup")
    recipe_args(q, batch_required=False)
    q.add_argument("--batch-schedule", default=None, metavar="F:B,...",
                   help="batch-size warmup instead of --batch: FRACTION:BATCH points, fractions of the run's "
                   "examples from 0 (e.g. 0:128,0.3:256,0.6:512; `leanscale batch critical` suggests one); the "
                   "LR follows each batch by --rule from --base-lr at --base-batch")
    adamw_args(q, dataset_size=False)
    run_args(q)
    q.set_defaults(action_func=run_train)
    return p


run = run_action  # the action chosen, or the help and exit status 2


def _recipe(args):
    from leanscale.large_batch.recipe import LargeBatchRecipe

    return LargeBatchRecipe(
        batch_size=args.batch, base_batch_size=args.base_batch, base_lr=args.base_lr, base_epochs=args.epochs,
        base_milestones=args.milestones, lr_rule=args.rule, ghost_batch_size=args.ghost_batch,
        regime_adaptation=1.0 if args.regime is None else args.regime, warmup_epochs=args.warmup_epochs,
        optimizer=args.optimizer, clip_grad_norm=args.clip, max_lr=args.max_lr,
        base_weight_decay=args.weight_decay, base_betas=args.betas,
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


def _check_out_path(out: str | None, flag: str = "--out", owner: str = "leanscale batch train") -> None:
    """Refuse an output path that cannot be written *before* any training starts. A missing folder is
    fine: it is created."""
    if out is None:
        return
    path = Path(out)
    where = f"The {flag!r} parameter of {owner}"
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


def _check_overrides(args, owner: str, refused: dict[str, str]) -> None:
    """Refuse a ``--set`` that another flag owns (it would be silently overwritten)."""
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
        if key in refused:
            raise InvalidParameterError(
                f"The '--set' parameter of {owner} must not set {key!r}: {refused[key]}. Got {item!r}."
            )
        if key == "milestones" and args.milestones:
            raise InvalidParameterError(
                f"The '--set' parameter of {owner} must not set 'milestones' together with "
                f"--milestones (one would silently replace the other). Got {item!r} and --milestones "
                f"{','.join(f'{m:g}' for m in args.milestones)}."
            )


def _base_config(args, **fields):
    """The small-batch TrainConfig of ``--base-batch``, ``--base-lr``, ``--epochs``, ``--milestones`` and ``--set``."""
    from leanscale.core.config import apply_overrides
    from leanscale.large_batch.train import TrainConfig

    base = TrainConfig(batch_size=args.base_batch, lr=args.base_lr, epochs=args.epochs, **fields)
    base = apply_overrides(base, args.overrides)
    if args.milestones:
        base = TrainConfig(**{**base.__dict__, "milestones": tuple(m / args.epochs for m in args.milestones)})
    return base


def _flat_features(config, args, user):
    """Flat features: the reference MLP (with --model, only so that train_classifier's check of the built-in
    CNN's input does not refuse the user's model)."""
    from leanscale.large_batch.train import TrainConfig

    if user is not None and user[0][0].ndim != 4 and not any(
            str(item).partition("=")[0].strip() == "model" for item in args.overrides):
        return TrainConfig(**{**config.__dict__, "model": "mlp"})
    return config


def _has_batchnorm(model) -> bool:
    from torch import nn

    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


_SCHEDULE_FORM = ("comma-separated FRACTION:BATCH points: fractions of the run's examples starting at 0 and "
                  "increasing strictly below 1, batches positive integers (e.g. 0:128,0.3:256,0.6:512)")


def _parse_schedule(text: str, owner: str) -> list[tuple[float, int]]:
    """``--batch-schedule`` as ``(fraction, batch)`` pairs; every malformed form is refused by name."""
    import math

    where = f"The '--batch-schedule' parameter of {owner} must be {_SCHEDULE_FORM}"
    points = []
    for item in str(text).split(","):
        frac, sep, batch = item.strip().partition(":")
        try:
            point = (float(frac), int(batch))
        except ValueError:
            point = None
        if not sep or point is None or not math.isfinite(point[0]):
            raise InvalidParameterError(f"{where}. Got {text!r}: {item.strip()!r} is not FRACTION:BATCH.")
        points.append(point)
    fractions = [f for f, _ in points]
    if points[0][0] != 0:
        raise InvalidParameterError(f"{where}; the first point is the batch from the start, at fraction 0. "
                                    f"Got {text!r}, which starts at {fractions[0]:g}.")
    outside = [f for f in fractions if not 0 <= f < 1]
    if outside:
        raise InvalidParameterError(f"{where}. Got {text!r}, with fractions outside [0, 1): "
                                    f"{', '.join(f'{f:g}' for f in outside)}.")
    if fractions != sorted(set(fractions)):
        raise InvalidParameterError(f"{where}. Got {text!r}, whose fractions do not increase strictly: "
                                    f"{', '.join(f'{f:g}' for f in fractions)}.")
    bad = [b for _, b in points if b < 1]
    if bad:
        raise InvalidParameterError(f"{where}. Got {text!r}, with batch sizes below 1: {', '.join(map(str, bad))}.")
    return points


def _schedule(points, text: str, owner: str, n: int, epochs: float, lr_rule: str):
    """The BatchSizeSchedule of the parsed ``--batch-schedule`` for ``n`` training examples (and the
    processes of this run): the batches fit the data and split over the processes."""
    from leanscale.core.distributed import rank_and_world
    from leanscale.large_batch.critical_batch import BatchSizeSchedule

    where = f"The '--batch-schedule' parameter of {owner} must"
    big = [b for _, b in points if b > n]
    if big:
        raise InvalidParameterError(f"{where} hold batch sizes of at most the {n:,} training examples. Got {text!r}, "
                                    f"with {', '.join(map(str, big))}.")
    world = rank_and_world()[1]
    odd = [b for _, b in points if b % world]
    if odd:
        raise InvalidParameterError(f"{where} hold batch sizes divisible by the {world} processes (each takes an "
                                    f"equal part of every batch). Got {text!r}, with {', '.join(map(str, odd))}.")
    total = max(1, int(epochs * n))
    try:
        return BatchSizeSchedule.from_fractions(points, total, lr_rule=lr_rule)
    except InvalidParameterError as exc:
        raise InvalidParameterError(f"{where} be {_SCHEDULE_FORM}. Got {text!r}: {exc}") from exc


def _schedule_flag(schedule, total_examples: int) -> str:
    """``schedule`` as a ``--batch-schedule`` value for a run of ``total_examples`` examples (fractions
    with as many digits as give back the same boundaries)."""
    parts = [f"0:{schedule.batch_sizes[0]}"]
    for b, bound in zip(schedule.batch_sizes[1:], schedule.boundaries):
        for digits in range(3, 18):
            text = f"{bound / total_examples:.{digits}g}"
            if round(float(text) * total_examples) == bound:
                break
        parts.append(f"{text}:{b}")
    return ",".join(parts)


def _schedule_ghost(ghost: int | None, base_batch: int, schedule, owner: str) -> int | None:
    """The ghost batch (per process) of a ``--batch-schedule`` run: ``--ghost-batch`` (0: none), or the
    schedule's default (:meth:`BatchSizeSchedule.ghost_batch_size`)."""
    from leanscale.core.distributed import rank_and_world

    world = rank_and_world()[1]
    smallest = min(schedule.batch_sizes) // world
    if ghost is None:
        return schedule.ghost_batch_size(base_batch, world)
    if ghost > smallest:
        raise InvalidParameterError(
            f"The '--ghost-batch' parameter of {owner} must be at most the smallest per-process batch of "
            f"--batch-schedule ({smallest} = {smallest * world} / {world} process(es)). Got {ghost}.")
    return ghost if 0 < ghost < max(schedule.batch_sizes) // world else None


# --set keys an AdamW run takes from --weight-decay and --betas (through the recipe)
_ADAMW_KEYS = {"weight_decay": "--weight-decay", "momentum": "--betas (beta1)", "beta2": "--betas (beta2)"}


def run_train(args) -> int:
    from leanscale.core.io import atomic_write_json
    from leanscale.core.validation import Interval, check_param
    from leanscale.large_batch.train import TrainConfig, _check_config, train_classifier

    owner = "leanscale batch train"
    scheduled = args.batch_schedule is not None
    if scheduled == (args.batch is not None):
        raise InvalidParameterError(
            f"The '--batch' parameter of {owner} is required, or '--batch-schedule' instead (a fixed large batch or "
            f"a batch-size warmup, one of the two). Got "
            + (f"both: --batch {args.batch} and --batch-schedule {args.batch_schedule!r}." if scheduled else "neither.")
        )
    refused = {k: f"the recipe sets it (use {v})" for k, v in _RECIPE_KEYS.items()}
    if args.optimizer == "adamw":
        refused.update({k: f"--optimizer adamw sets it (use {v})" for k, v in _ADAMW_KEYS.items()})
    if scheduled:
        points = _parse_schedule(args.batch_schedule, owner)
        for flag, value in (("--regime", args.regime), ("--max-lr", args.max_lr)):
            if value is not None:
                raise InvalidParameterError(
                    f"The {flag!r} parameter of {owner} applies to --batch (the recipe's fixed large batch), not to "
                    f"--batch-schedule (the base run's examples at the schedule's batches, the LR moved by --rule). "
                    f"Got {flag} {value:g}.")
        for flag, value in (("--no-timescale-rule", args.no_timescale_rule), ("--no-beta2-rule", args.no_beta2_rule),
                            ("--beta1-rule", args.beta1_rule)):
            if value:
                raise InvalidParameterError(
                    f"The {flag!r} parameter of {owner} applies to --batch: with --batch-schedule AdamW keeps "
                    f"--weight-decay and --betas in every phase (the schedule moves only the LR). Got {flag}.")
        if args.optimizer != "adamw":
            for flag, value in (("--weight-decay", args.weight_decay), ("--betas", args.betas)):
                if value is not None:
                    raise InvalidParameterError(
                        f"The {flag!r} parameter of {owner} needs --optimizer adamw (SGD, LARS and LAMB: "
                        f"--set weight_decay=... / momentum=...). Got {flag} with --optimizer {args.optimizer}.")
        if args.betas is not None and len(args.betas) != 2:
            raise InvalidParameterError(
                f"The '--betas' parameter of {owner} must be two numbers, beta1,beta2. Got {args.betas!r}.")
        recipe = None
    else:
        recipe = _recipe(args)
    _check_out_path(args.out)
    _check_overrides(args, owner, refused)
    base = _base_config(args)
    if scheduled:
        from leanscale.large_batch.schedules import _check_rule

        _check_rule(args.rule, owner)
        check_param("--ghost-batch", args.ghost_batch, [None, Interval(int, 0, None)], owner=owner)
        # the ghost batch (per process) is set below, once the processes are known
        fields = {"warmup_epochs": args.warmup_epochs, "optimizer": args.optimizer, "clip_grad_norm": args.clip}
        if args.optimizer == "adamw":
            wd = 0.01 if args.weight_decay is None else args.weight_decay  # torch.optim.AdamW's defaults
            b1, b2 = (0.9, 0.999) if args.betas is None else args.betas
            fields.update(weight_decay=wd, momentum=b1, beta2=b2)
        config = TrainConfig(**{**base.__dict__, **fields})
        _check_config(config)
    user = _user_data(args, owner, n_train=base.n_train, n_test=base.n_test, seed=base.seed)
    model = _model(args, owner, base.seed)
    if model is not None and args.ghost_batch is None and not _has_batchnorm(model):
        # the recipe's Ghost BatchNorm has nothing to act on: off, said once, instead of a warning per run
        print(f"note: --model {args.model} has no BatchNorm layer: no Ghost BatchNorm (--ghost-batch 0).",
              file=sys.stderr)
        args.ghost_batch = 0
        if not scheduled:
            recipe = _recipe(args)
    if not scheduled:
        config = recipe.train_config(base)
    config = _flat_features(config, args, user)
    schedule = None
    with torchrun_rank() as rank:
        if scheduled:
            from leanscale.large_batch.train import load_image_data

            data = load_image_data(config) if user is None else user[0]
            schedule = _schedule(points, args.batch_schedule, owner, len(data[1]), config.epochs, args.rule)
            config = TrainConfig(**{**config.__dict__,
                                    "ghost_batch_size": _schedule_ghost(args.ghost_batch, args.base_batch, schedule,
                                                                        owner)})
            user_tensors = data
        else:
            user_tensors = None if user is None else user[0]
        result = train_classifier(config, data=user_tensors, model=model, progress_bar=not args.json,
                                  batch_schedule=schedule)
    if rank != 0:
        return 0  # under torchrun only rank 0 reports
    blob = result.to_dict()
    if scheduled:
        blob["batch_schedule"] = args.batch_schedule
        blob["schedule"] = schedule.to_dict()
        blob["fixed_batch_steps"] = max(1, int(config.epochs * len(user_tensors[1]) // config.batch_size))
    else:
        blob["recipe"] = recipe.plan().to_dict()
    blob["data"] = args.data if user is None else user[1].source
    blob["model"] = args.model if args.model is not None else config.model
    if user is not None:
        blob["classes"] = list(user[1].classes)
    if args.out:
        atomic_write_json(args.out, blob)
    if args.json:
        print_json(blob)
    elif scheduled:
        phases = ", then ".join(
            [f"{schedule.batch_sizes[0]}"]
            + [f"{b} from {e:,} examples" for b, e in zip(schedule.batch_sizes[1:], schedule.boundaries)])
        print(f"batch-size warmup: batch {phases} (LR by the {args.rule} rule from {config.lr:g} at batch "
              f"{config.batch_size}" + (f", ghost batch {config.ghost_batch_size}" if config.ghost_batch_size else "")
              + (f", {config.optimizer.upper()}" if config.optimizer != "sgd" else "") + ")")
        print(f"test accuracy {result.test_accuracy:.4f} after {result.steps} steps (the fixed batch "
              f"{config.batch_size}: {blob['fixed_batch_steps']}; {result.seconds:.0f} s, "
              f"{result.world_size} process(es))")
        for w in result.warnings:
            print(f"warning: {w}")
    else:
        print(recipe.describe())
        print(f"test accuracy {result.test_accuracy:.4f} after {result.steps} steps of {config.batch_size} "
              f"({result.seconds:.0f} s, {result.world_size} process(es))")
        for w in result.warnings:
            print(f"warning: {w}")
    return 1 if result.warnings else 0


def _ints(text: str | None, flag: str, owner: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(t) for t in str(text).split(",") if t.strip())
    except ValueError:
        raise InvalidParameterError(
            f"The {flag!r} parameter of {owner} must be comma-separated integers (e.g. 128,256,512). "
            f"Got {text!r}.") from None


def run_critical(args) -> int:
    import math

    from leanscale.core.io import atomic_write_json
    from leanscale.core.validation import Interval, check_param
    from leanscale.large_batch.critical_batch import measure_batch_warmup
    from leanscale.large_batch.schedules import _check_rule
    from leanscale.large_batch.train import TrainConfig, _check_config, load_image_data

    # every flag is checked before the base run trains
    owner = "leanscale batch critical"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InvalidParameterError(
            f"{owner} runs in one process (the branches are short independent runs from copies of the checkpoint); "
            f"run it without torchrun, then train the schedule it prints under torchrun. Got WORLD_SIZE="
            f"{os.environ['WORLD_SIZE']}.")
    _check_out_path(args.out, owner=owner)
    check_param("--base-batch", args.base_batch, [Interval(int, 1, None)], owner=owner)
    check_param("--ghost-batch", args.ghost_batch, [None, Interval(int, 0, None)], owner=owner)
    _check_rule(args.rule, owner)
    at = args.at
    if not at or any(not (0 < f < 1) for f in at) or list(at) != sorted(set(at)):
        raise InvalidParameterError(
            f"The '--at' parameter of {owner} must be checkpoints as increasing fractions of the run in (0, 1), e.g. "
            f"0.05,0.15,0.4. Got {','.join(f'{f:g}' for f in at) or 'none'}.")
    sizes = _ints(args.sizes, "--sizes", owner) or tuple(args.base_batch * k for k in (1, 2, 4, 8))
    if len(sizes) < 2 or len(set(sizes)) != len(sizes) or min(sizes) < 1:
        raise InvalidParameterError(
            f"The '--sizes' parameter of {owner} must be at least two distinct positive batch sizes. "
            f"Got {args.sizes!r}.")
    sizes = tuple(sorted(sizes))
    ghost = args.base_batch if args.ghost_batch is None else (args.ghost_batch or None)
    if ghost is not None and sizes[0] < ghost:
        raise InvalidParameterError(
            f"The '--sizes' parameter of {owner} must hold batches of at least the ghost batch ({ghost}; "
            f"--ghost-batch 0: none). Got {','.join(map(str, sizes))}.")
    examples = 32 * args.base_batch if args.examples is None else args.examples
    check_param("--examples", examples, [Interval(int, 1, None)], owner=owner)
    odd = [b for b in sizes if examples % b]
    if odd:
        raise InvalidParameterError(
            f"The '--examples' parameter of {owner} must be a multiple of every batch of --sizes (each branch trains "
            f"on the same examples); {examples} is not a multiple of {','.join(map(str, odd))}. Got {examples}.")
    if not args.lr_grid or not all(math.isfinite(m) and m > 0 for m in args.lr_grid):
        raise InvalidParameterError(
            f"The '--lr-grid' parameter of {owner} must be finite LR multipliers > 0, e.g. 0.5,1,2. "
            f"Got {args.lr_grid!r}.")
    check_param("--tolerance", args.tolerance, [Interval(float, 0, math.inf, closed="left")], owner=owner)
    check_param("--margin", args.margin, [Interval(float, 0, math.inf, closed="neither")], owner=owner)
    top = sizes[-1] if args.max_batch is None else args.max_batch
    check_param("--max-batch", top, [Interval(int, args.base_batch, None)], owner=owner)
    _check_overrides(args, owner, {
        "batch_size": "use --base-batch", "lr": "use --base-lr", "epochs": "use --epochs",
        "ghost_batch_size": "use --ghost-batch",
        "target_accuracy": "the run must reach every checkpoint", "max_examples": "the run must reach every checkpoint",
    })
    config = _base_config(args, ghost_batch_size=ghost)
    _check_config(config)
    user = _user_data(args, owner, n_train=config.n_train, n_test=config.n_test, seed=config.seed)
    model = _model(args, owner, config.seed)
    if model is not None and args.ghost_batch is None and not _has_batchnorm(model):
        config = TrainConfig(**{**config.__dict__, "ghost_batch_size": None})
    config = _flat_features(config, args, user)
    data = load_image_data(config) if user is None else user[0]
    if sizes[-1] > len(data[1]):
        raise InvalidParameterError(
            f"The '--sizes' parameter of {owner} must hold batches of at most the {len(data[1]):,} training examples. "
            f"Got {','.join(map(str, sizes))}.")
    m = measure_batch_warmup(config, data=data, model=model, at=at, batch_sizes=sizes,
                             examples=examples, lr_grid=tuple(args.lr_grid), tolerance=args.tolerance,
                             margin=args.margin, max_batch_size=top, lr_rule=args.rule, eval_mode=args.eval_mode,
                             progress_bar=not args.json)
    base_run, results, schedule, cautions = m.base_run, m.checkpoints, m.schedule, m.warnings
    total_examples, warm_steps = m.total_examples, m.steps
    total_steps = base_run.steps  # the checkpoints' fractions of the run are of these steps
    flag = _schedule_flag(schedule, total_examples)
    blob = {**m.to_dict(), "batch_schedule": flag, "margin": args.margin,
            "data": args.data if user is None else user[1].source,
            "model": args.model if args.model is not None else config.model}
    if args.out:
        atomic_write_json(args.out, blob)
    if args.json:
        print_json(blob)
        return 0
    print(f"base run: batch {config.batch_size}, LR {config.lr:g}, {base_run.steps} steps, test accuracy "
          f"{base_run.test_accuracy:.4f}")
    for step, res in results:
        passed = f"{res.critical_batch}+" if res.saturated else f"{res.critical_batch}"
        print(f"step {step} ({res.examples_seen:,} examples, {step / total_steps:.0%} of the run): loss "
              f"{res.start_loss:.4f}; branches of {res.examples:,} examples at batch "
              f"{' / '.join(map(str, res.batch_sizes))}: {' / '.join(f'{v:.4f}' for v in res.losses)} -> "
              f"critical batch {passed} (within {res.tolerance:.0%} of batch {res.batch_sizes[0]}'s loss)")
    print(f"batch-size warmup (margin {args.margin:g}): {warm_steps} steps instead of {base_run.steps} "
          f"({1 - warm_steps / base_run.steps:.0%} fewer)")
    print(f"train it: leanscale batch train --batch-schedule {flag} --base-batch {config.batch_size} --base-lr "
          f"{config.lr:g} --epochs {args.epochs:g} --rule {args.rule} (and the same --set, --model, --data)")
    for w in cautions:
        print(f"warning: {w}")
    return 0
