"""``leanscale sparse``: SWAT sparse weight activation training (Raihan & Aamodt 2020).

Three actions: ``report`` converts a model and prints, per layer, the sparsity, the training
FLOPs (dense vs SWAT) and the bytes held for backward (measured on one training step);
``train`` trains the reference CNN (or MLP) on Fashion-MNIST with SWAT, single process or under
``torchrun``, and can save the hard-pruned model and the SWAT model with its settings; ``export``
hard-prunes a SWAT checkpoint into a compact file with the settings the checkpoint records.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from leanscale.cli import (
    add_actions,
    add_command,
    print_json,
    run_action,
    torchrun_rank,
)
from leanscale.cli._spec import add_data_arguments

EPILOG = """\
examples:
  leanscale sparse report                                   the BatchNorm CNN at 80% (SWAT-U)
  leanscale sparse report --model mypkg.models:Net --input-shape 3,32,32 --sparsity 0.9 --distribution erk
  leanscale sparse train --sparsity 0.8 --epochs 1 --save pruned.pt --checkpoint swat.pt
  leanscale sparse train --model mymodel.py:build --data digits.npz --epochs 3 --checkpoint swat.pt
  leanscale sparse export --model mymodel.py:build --checkpoint swat.pt --out pruned.pt
  torchrun --nproc_per_node=2 -m leanscale.cli.main sparse train --set n_train=10000
  leanscale sparse export --checkpoint swat.pt --out pruned.pt      the settings recorded in swat.pt
  leanscale sparse export --checkpoint state_dict.pt --sparsity 0.8 --distribution erk --out pruned.pt

export refuses SWAT flags that contradict the settings a `sparse train --checkpoint` file records
(other settings keep other weights and break the model); a plain state_dict needs --sparsity.
"""

DEFAULT_MODEL = "leanscale.models:BNCNN"


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(",") if t.strip())


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = add_command(
        subparsers, "sparse", help="SWAT sparse training: convert, report, train, export",
        description="Sparse weight activation training (SWAT, Raihan & Aamodt 2020): top-K weights in the "
        "forward pass, top-K activations kept compactly for the backward pass, measured FLOPs and memory.",
        epilog=EPILOG,
    )
    sub = add_actions(p)

    def swat_args(q, export=False):
        # export: every default None, so an unset flag takes the checkpoint's recorded value
        d = (lambda v: None) if export else (lambda v: v)
        rec = " (default: the checkpoint's)" if export else ""
        q.add_argument("--sparsity", type=float, default=d(0.8), help=f"weight (and activation) sparsity (0.8){rec}")
        q.add_argument("--distribution", default=d("uniform"), help=f"uniform (SWAT-U) or erk (SWAT-ERK){rec}")
        q.add_argument("--activation-sparsity", type=float, default=None, help=f"default: --sparsity{rec}")
        q.add_argument("--topk-period", type=int, default=d(1), help=f"recompute top-K every N steps (1){rec}")
        q.add_argument("--structured", action="store_true", default=d(False), help=f"keep whole channels{rec}")
        q.add_argument("--warmup-steps", type=int, default=d(0), help=f"ramp the sparsity over N steps (0){rec}")
        q.add_argument("--sparse-first-layer", action="store_true", default=d(False),
                       help=f"convert the first layer too{rec}")

    q = sub.add_parser("report", help="per-layer sparsity, training FLOPs and backward memory of a converted model")
    q.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"'package.module:callable' returning an nn.Module ({DEFAULT_MODEL})")
    q.add_argument("--input-shape", type=_ints, default=(1, 28, 28), help="one example's shape (1,28,28)")
    q.add_argument("--batch", type=int, default=128, help="batch of the measured step (128)")
    swat_args(q)
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(action_func=run_report)

    q = sub.add_parser("train", help="train the reference model on Fashion-MNIST (or your model on your data) with SWAT")
    swat_args(q)
    q.add_argument("--model", default="bncnn",
                   help="bncnn or mlp (bncnn), or your model: 'package.module:factory' or 'path/to/file.py:factory'")
    add_data_arguments(q, builtins=("fashion-mnist",), default="fashion-mnist")
    q.add_argument("--test-fraction", type=float, default=0.2,
                   help="share of your data held out for evaluation when it has no test split (0.2)")
    q.add_argument("--epochs", type=float, default=1.0)
    q.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                   help="change a field of the TrainConfig (repeatable), e.g. n_train=10000")
    q.add_argument("--save", default=None, help="write the hard-pruned model here (save_pruned format)")
    q.add_argument("--checkpoint", default=None,
                   help="write the SWAT model with its SWAT settings here (the input of `sparse export`)")
    q.add_argument("--out", default=None, help="write the result JSON here")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(action_func=run_train)

    q = sub.add_parser("export", help="hard-prune a SWAT checkpoint into a compact file")
    q.add_argument("--model", default=None,
                   help=f"'package.module:callable' (default: the model recorded by `sparse train --checkpoint`, "
                   f"else {DEFAULT_MODEL})")
    q.add_argument("--checkpoint", required=True,
                   help="`sparse train --checkpoint` file (SWAT settings recorded) or a plain state_dict (torch.save)")
    q.add_argument("--out", required=True, help="output file (load with leanscale.sparse.load_pruned)")
    swat_args(q, export=True)
    q.set_defaults(action_func=run_export)
    return p


run = run_action  # the action chosen, or the help and exit status 2


def _build(spec: str):
    """Call ``package.module:callable`` with no arguments; clear errors for a bad spec."""
    from torch import nn

    from leanscale.cli._spec import call_without_arguments, import_object
    from leanscale.core.errors import InvalidParameterError

    factory = import_object(spec, "--model", "leanscale sparse", kind="callable")
    model = call_without_arguments(factory, spec, "The '--model' parameter of leanscale sparse must name a callable "
                                   "that takes no arguments and returns a torch.nn.Module.")
    if not isinstance(model, nn.Module):
        raise InvalidParameterError(
            f"The '--model' parameter of leanscale sparse must return a torch.nn.Module. Got {type(model).__name__} "
            f"from {spec!r}."
        )
    return model


def _check_out_paths(action: str, paths: dict) -> None:
    """Refuse output paths that cannot be written *before* any work starts (as `batch train` does): a
    folder, a path under a file, a folder that cannot be written, two outputs on one file. A missing
    folder is fine: the writes create it."""
    import os

    from leanscale.core.errors import InvalidParameterError

    seen = {}
    for flag, value in paths.items():
        if value is None:
            continue
        where = f"The {flag!r} parameter of leanscale sparse {action}"
        path = Path(value)
        if path.is_dir() or str(value).endswith(("/", os.sep)):
            raise InvalidParameterError(f"{where} must be a file to write. Got {value!r}, which names a folder.")
        folder = path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            raise InvalidParameterError(
                f"{where} must be a file in a folder. Got {value!r}, but {str(folder)!r} is a file, not a folder.")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise InvalidParameterError(f"{where} must be in a folder you can write. Got {value!r}.")
        key = path.resolve()
        if key in seen:
            raise InvalidParameterError(
                f"{where} must differ from {seen[key]}. Got {value!r} for both: one file would overwrite the other.")
        seen[key] = flag


def _settings(args) -> dict:
    """apply_swat's keyword arguments from the SWAT flags (report, train)."""
    return {"sparsity": args.sparsity, "distribution": args.distribution,
            "activation_sparsity": args.activation_sparsity, "topk_period": args.topk_period,
            "structured": args.structured, "warmup_steps": args.warmup_steps,
            "dense_first_layer": not args.sparse_first_layer}


def _apply(model, args):
    from leanscale.sparse import apply_swat

    return apply_swat(model, **_settings(args))


def run_report(args) -> int:
    import torch

    from leanscale.core.errors import InvalidParameterError
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
        print_json(report)
    else:
        print(report["text"])
    return 0


def run_train(args) -> int:
    from leanscale.cli.batch import _user_data
    from leanscale.core.config import apply_overrides
    from leanscale.core.io import atomic_write_json
    from leanscale.large_batch.train import (
        TrainConfig,
        build_model,
        load_image_data,
        train_classifier,
    )
    from leanscale.sparse import (
        export_pruned,
        save_pruned,
        save_swat_checkpoint,
        swat_conversion_report,
        swat_summary,
    )

    owner = "leanscale sparse train"
    _check_out_paths("train", {"--out": args.out, "--save": args.save, "--checkpoint": args.checkpoint})
    user_model = ":" in str(args.model)
    config = apply_overrides(TrainConfig(model="bncnn" if user_model else args.model, epochs=args.epochs,
                                         eval_every_epochs=args.epochs), args.overrides)
    user = _user_data(args, owner, n_train=config.n_train, n_test=config.n_test, seed=config.seed)
    if user is not None and user[0][0].ndim != 4 and (user_model or args.model == "bncnn"):
        config = TrainConfig(**{**config.__dict__, "model": "mlp"})  # flat features (the CNN's input check)
    with torchrun_rank() as rank:
        data = load_image_data(config) if user is None else user[0]
        import torch

        torch.manual_seed(config.seed)
        if user_model:
            from leanscale.cli._spec import build_model as build_user_model

            base = build_user_model(args.model, "--model", owner)
        else:
            base = build_model(config, tuple(data[0].shape[1:]), int(max(data[1].max(), data[3].max())) + 1)
        model = _apply(base, args)
        result = train_classifier(config, data=data, model=model, keep_model=True, progress_bar=not args.json)
    if rank != 0:
        return 0  # under torchrun only rank 0 reports
    blob = result.to_dict()
    blob["swat_layers"] = swat_summary(result.model)
    # what was converted, what was skipped and why, and whether every converted layer's input is
    # really stored compactly (one forward on a few training examples; nothing changes)
    report = swat_conversion_report(result.model, data[0][:8])
    blob["conversion"] = {k: v for k, v in report.items() if k != "text"}
    blob["sparsity"], blob["distribution"] = args.sparsity, args.distribution
    blob["swat_settings"] = _settings(args)
    blob["data"] = args.data if user is None else user[1].source
    blob["model"] = args.model
    if args.checkpoint:
        # the SWAT model in training form, with what made it: `sparse export` rebuilds exactly this
        # (a user's --model is not recorded as code to import: `sparse export` needs --model again)
        extra = {"user_model": args.model} if user_model else {"architecture": {
            "model": config.model, "width": config.width, "in_shape": list(data[0].shape[1:]),
            "n_classes": int(max(data[1].max(), data[3].max())) + 1}}
        save_swat_checkpoint(result.model, args.checkpoint, _settings(args), extra=extra)
    if args.save:
        save_pruned(export_pruned(result.model), args.save)
    if args.out:
        atomic_write_json(args.out, blob)
    if args.json:
        print_json(blob)
    else:
        wrote = "".join(f"; {what} -> {path}" for what, path in (("SWAT checkpoint", args.checkpoint),
                                                                ("pruned model", args.save)) if path)
        print(f"SWAT-{'U' if args.distribution == 'uniform' else 'ERK'} {args.sparsity:.0%}: test accuracy "
              f"{result.test_accuracy:.4f} after {result.steps} steps ({result.seconds:.0f} s, "
              f"{result.world_size} process(es)){wrote}")
        print(report["text"])
    return 0


# export flag -> apply_swat keyword; the defaults apply_swat would use
_EXPORT_FLAGS = {"sparsity": "--sparsity", "distribution": "--distribution",
                 "activation_sparsity": "--activation-sparsity", "topk_period": "--topk-period",
                 "structured": "--structured", "warmup_steps": "--warmup-steps",
                 "dense_first_layer": "--sparse-first-layer"}
_DEFAULTS = {"sparsity": 0.8, "distribution": "uniform", "activation_sparsity": None, "topk_period": 1,
             "structured": False, "warmup_steps": 0, "dense_first_layer": True}


def _given(args) -> dict:
    """The SWAT flags given on the command line (unset ones are None)."""
    given = {k: getattr(args, k) for k in ("sparsity", "distribution", "activation_sparsity", "topk_period",
                                           "structured", "warmup_steps") if getattr(args, k) is not None}
    if args.sparse_first_layer:
        given["dense_first_layer"] = False
    return given


def _effective(settings: dict, key: str):
    value = settings.get(key, _DEFAULTS[key])
    if key == "activation_sparsity" and value is None:
        return settings.get("sparsity", _DEFAULTS["sparsity"])
    return value


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return abs(float(a) - float(b)) <= 1e-12
        except (TypeError, ValueError):
            return False
    return a == b


def _recorded_model(arch, source: str, state: dict):
    """The model `sparse train` recorded: only the built-in "bncnn"/"mlp" (nothing from the file is
    imported), its size checked against the checkpoint's tensors before it is allocated."""
    import math

    import torch

    from leanscale.core.errors import DataFormatError
    from leanscale.large_batch.train import TrainConfig, build_model

    def small_int(v, hi):
        return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= hi

    if isinstance(arch, dict) and "num_classes" in arch and "n_classes" not in arch:  # written before #14
        arch = {("n_classes" if k == "num_classes" else k): v for k, v in arch.items()}
    ok = (isinstance(arch, dict) and set(arch) == {"model", "width", "in_shape", "n_classes"}
          and arch["model"] in ("bncnn", "mlp") and small_int(arch["width"], 2**16)
          and small_int(arch["n_classes"], 2**24) and isinstance(arch["in_shape"], list)
          and 1 <= len(arch["in_shape"]) <= 3 and all(small_int(d, 2**16) for d in arch["in_shape"])
          and (arch["model"] != "bncnn" or len(arch["in_shape"]) == 3))
    if not ok:
        raise DataFormatError(
            f"The SWAT checkpoint {source} records an invalid architecture {arch!r:.200}: it must be "
            f"{{'model': 'bncnn' or 'mlp', 'width': int, 'in_shape': [ints], 'n_classes': int}} ('num_classes' in older "
            f"checkpoints)."
        )
    config = TrainConfig(model=arch["model"], width=arch["width"])
    with torch.device("meta"):  # count the parameters without allocating them
        probe = build_model(config, tuple(arch["in_shape"]), arch["n_classes"])
    need = sum(math.prod(t.shape) for t in probe.state_dict().values())
    have = sum(t.numel() for t in state.values())
    if need > have:
        raise DataFormatError(
            f"The SWAT checkpoint {source} records an architecture of {need:,} values but holds tensors of "
            f"only {have:,}: it is damaged."
        )
    return build_model(config, tuple(arch["in_shape"]), arch["n_classes"])


def run_export(args) -> int:
    from leanscale.core.errors import InvalidParameterError
    from leanscale.sparse import apply_swat, export_pruned, save_pruned
    from leanscale.sparse.export import check_swat_layers, load_swat_checkpoint

    _check_out_paths("export", {"--out": args.out})
    if Path(args.out).resolve() == Path(args.checkpoint).resolve():
        raise InvalidParameterError(
            f"The '--out' parameter of leanscale sparse export must differ from --checkpoint. Got {args.out!r} for "
            f"both: the export would overwrite the SWAT checkpoint."
        )
    ckpt = load_swat_checkpoint(args.checkpoint)
    source = repr(args.checkpoint)
    given, recorded = _given(args), ckpt["settings"]
    warnings = []
    if recorded is None:
        if "sparsity" not in given:
            raise InvalidParameterError(
                f"The '--sparsity' parameter of leanscale sparse export is required for {source}: it is a plain "
                f"state_dict without recorded SWAT settings, so the training run's sparsity is unknown. Pass the "
                f"--sparsity, --distribution (and other SWAT flags) used in training, or export a file written by "
                f"`leanscale sparse train --checkpoint` (or leanscale.sparse.save_swat_checkpoint)."
            )
        settings = {**_DEFAULTS, **given}
        warnings.append(
            f"{source} records no SWAT settings: exported with sparsity={settings['sparsity']}, "
            f"distribution={settings['distribution']!r}, structured={settings['structured']}, "
            f"warmup_steps={settings['warmup_steps']}, dense_first_layer={settings['dense_first_layer']} as given; "
            f"if the training run used other settings, the exported model is wrong."
        )
    else:
        for key, value in given.items():
            if not _same(_effective(given, key), _effective(recorded, key)):
                flag = _EXPORT_FLAGS[key]
                shown = (f"dense_first_layer={_effective(recorded, key)!r}" if key == "dense_first_layer"
                         else f"{flag} {_effective(recorded, key)!r}")
                raise InvalidParameterError(
                    f"The {flag!r} parameter of leanscale sparse export must match the training run recorded in "
                    f"{source} ({shown}). Got {value!r} instead: exporting with other SWAT settings keeps other "
                    f"weights and breaks the model. Omit it to use the recorded value."
                )
        settings = {**_DEFAULTS, **recorded}
    arch = (ckpt["extra"] or {}).get("architecture")
    recorded_user = (ckpt["extra"] or {}).get("user_model")
    if args.model is None and arch is None and isinstance(recorded_user, str):
        raise InvalidParameterError(
            f"The '--model' parameter of leanscale sparse export is required for {source}: it was trained with your "
            f"model {recorded_user[:200]!r}, which is not imported from a checkpoint file. Pass --model "
            f"{recorded_user[:200]} (the same factory).")
    if args.model is not None:
        model = _build(args.model)
    elif arch is not None:
        model = _recorded_model(arch, source, ckpt["state_dict"])
    else:
        model = _build(DEFAULT_MODEL)
    # convert exactly the layers the run trained as SWAT layers (checkpoints written before heads were
    # kept dense by default converted the head too): the recorded layer list, else the step counters
    trained = list(ckpt["layers"]) if isinstance(ckpt.get("layers"), dict) and ckpt["layers"] else sorted(
        {k.rsplit(".", 1)[0] for k in ckpt["state_dict"] if k.endswith(".swat_step")})
    model = apply_swat(model, **{k: v for k, v in settings.items() if k not in ("dense_first_layer", "dense_last_layer")},
                       layers=trained) if trained else apply_swat(model, **settings)
    try:
        missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    except RuntimeError as exc:  # tensors of other shapes
        raise InvalidParameterError(
            f"The '--checkpoint' parameter of leanscale sparse export does not fit --model "
            f"{args.model or ('recorded ' + repr(arch) if arch else DEFAULT_MODEL)!r}: {str(exc)[:300]}"
        ) from None
    missing = [k for k in missing if not k.endswith("swat_step")]  # a dense checkpoint has no step counters
    if missing or unexpected:
        raise InvalidParameterError(
            f"The '--checkpoint' parameter of leanscale sparse export does not fit --model "
            f"{args.model or ('recorded ' + repr(arch) if arch else DEFAULT_MODEL)!r}: "
            f"missing {missing[:5]}, unexpected {list(unexpected)[:5]}."
        )
    if ckpt["layers"] is not None:
        check_swat_layers(model, ckpt["layers"], source=source)
    path = save_pruned(export_pruned(model), args.out)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"hard-pruned model -> {path} (sparsity {settings['sparsity']}, distribution {settings['distribution']}"
          f"{', settings recorded in the checkpoint' if recorded is not None else ''})")
    return 0
