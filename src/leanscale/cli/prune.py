"""``leanscale prune``: score every training example, then keep the ones that teach the most.

Two actions: ``score`` trains the scoring model(s) (or embeds the data) and writes one score per
example (``scores.npy``) with a manifest; ``select`` turns scores into a kept set
(``kept.npy`` + ``manifest.json`` saying what was dropped, by which metric and why). The data is
never modified: the kept indices refer to the rows of the training split (or of your ``.npz``).
"""

from __future__ import annotations

import argparse
import json
import sys

EPILOG = """\
examples:
  leanscale prune score --data fashion-mnist --metric el2n --seeds 2 --out prune/el2n
  leanscale prune select --scores prune/el2n --data fashion-mnist --keep 0.7 --strategy auto
  leanscale prune score --data wordnet --metric prototypes --out prune/proto    (needs [encoders])
  leanscale prune score --data my_data.npz --metric forgetting --epochs 5 --out prune/fg
  torchrun --nproc_per_node=2 -m leanscale.cli.main prune score --metric grand --out prune/grand

data: fashion-mnist, wordnet, an .npz with x (n, ...) and y (n,), or a folder with the IDX /
WordNet files. Scoring resumes after an interruption: run the same command again.
"""


def _keep(text: str) -> float | int:
    value = float(text)
    return int(value) if value > 1 and value.is_integer() else value


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "prune", help="score training examples and prune the data set",
        description="Data pruning (Sorscher et al. 2022; Paul et al. 2021): score every example with "
        "EL2N, GraNd, forgetting, uncertainty or (self-supervised) prototypes, then keep a fraction, "
        "hard or easy examples, class-balanced.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="action", title="actions", metavar="<action>")

    def data_args(q, required=True):
        q.add_argument("--data", default="fashion-mnist" if required else None,
                       help="fashion-mnist (default), wordnet, an .npz file or a data folder")
        q.add_argument("--data-root", default=None, help="folder of a built-in data set's files")
        q.add_argument("--n-train", type=int, default=None, help="stratified subset of the training split")

    q = sub.add_parser("score", help="one score per training example (higher = harder)")
    data_args(q)
    q.add_argument("--metric", default="el2n",
                   help="el2n (default), grand, forgetting, margin, entropy, least_confidence, prototypes, "
                   "supervised_prototypes, random")
    q.add_argument("--epochs", type=float, default=None, help="epochs of each scoring run (metric's default)")
    q.add_argument("--seeds", type=int, default=1, help="scoring runs to average (1)")
    q.add_argument("--n-clusters", type=int, default=None, help="k-means clusters for prototypes (#classes)")
    q.add_argument("--batch-size", type=int, default=128)
    q.add_argument("--lr", type=float, default=0.1)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", required=True, help="folder for scores.npy, manifest.json and the resumable state")
    q.add_argument("--json", action="store_true", help="print the manifest as JSON")
    q.set_defaults(action_func=run_score)

    q = sub.add_parser("select", help="keep a fraction of the examples from their scores")
    q.add_argument("--scores", required=True, help="scores.npy, or the folder `prune score` wrote")
    data_args(q, required=False)
    q.add_argument("--keep", type=_keep, required=True, help="fraction in (0, 1] or a number of examples")
    q.add_argument("--strategy", default="auto", help="auto (Sorscher's rule, default), hard, easy, random")
    q.add_argument("--no-class-balance", action="store_true", help="rank over all classes together")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", default=None, help="folder for kept.npy and manifest.json (default: next to the scores)")
    q.add_argument("--json", action="store_true", help="print the manifest as JSON")
    q.set_defaults(action_func=run_select)
    p.set_defaults(func=run, print_help=p.print_help)
    return p


def run(args) -> int:
    func = getattr(args, "action_func", None)
    if func is None:
        args.print_help()
        return 0
    return func(args)


def _labels(data):
    return None if data.y_train is None else data.y_train.numpy()


def _print(manifest: dict, as_json: bool, path) -> None:
    if as_json:
        json.dump({k: v for k, v in manifest.items() if k != "dropped_indices"}, sys.stdout, indent=2)
        print()
        return
    s = manifest["strategy"]
    print(f"{manifest['metric']}: kept {manifest['n_kept']:,} of {manifest['n_examples']:,} "
          f"({s['resolved']}: {s['reason']})")
    print(f"scores min {manifest['scores']['min']:.4g}, median {manifest['scores']['median']:.4g}, "
          f"max {manifest['scores']['max']:.4g} (higher = harder)")
    print(f"wrote {path}")


def run_score(args) -> int:
    from leanscale.core.distributed import init_from_env, rank_and_world, shutdown
    from leanscale.core.io import read_json
    from leanscale.pruning.datasets import load_pruning_data
    from leanscale.pruning.pruner import DataPruner

    data = load_pruning_data(args.data, root=args.data_root, n_train=args.n_train)
    pruner = DataPruner(metric=args.metric, keep=1.0, strategy="hard", score_epochs=args.epochs,
                        n_seeds=args.seeds, n_clusters=args.n_clusters, out_dir=args.out, seed=args.seed,
                        batch_size=args.batch_size, lr=args.lr)
    started = init_from_env()
    try:
        pruner.fit(data.x_train, _labels(data))
        path = pruner.write_manifest(args.out)
    finally:
        if started:
            shutdown()
    if rank_and_world()[0] != 0:
        return 0
    _print(read_json(path), args.json, path)
    return 0


def run_select(args) -> int:
    from pathlib import Path

    import numpy as np

    from leanscale.core.errors import InvalidParameterError
    from leanscale.core.io import atomic_write_json, read_json
    from leanscale.pruning.pruner import DataPruner

    src = Path(args.scores)
    scores_path = src / "scores.npy" if src.is_dir() else src
    if not scores_path.is_file():
        raise InvalidParameterError(
            f"The '--scores' parameter of leanscale prune select must be a scores.npy file or the folder "
            f"`leanscale prune score` wrote. Got {args.scores!r}, which has no scores.npy."
        )
    scores = np.load(scores_path)
    scored = read_json(scores_path.parent / "manifest.json") if (scores_path.parent / "manifest.json").is_file() else {}
    labels = None
    if args.data is not None:
        from leanscale.pruning.datasets import load_pruning_data

        data = load_pruning_data(args.data, root=args.data_root, n_train=args.n_train)
        labels = _labels(data)
    # The scores are given: DataPruner only selects (its metric_ becomes "given").
    pruner = DataPruner(metric="random", keep=args.keep, strategy=args.strategy, class_balance=not args.no_class_balance,
                        seed=args.seed)
    pruner.fit(None, labels, scores=scores)
    out = Path(args.out) if args.out else scores_path.parent
    path = pruner.write_manifest(out)
    manifest = read_json(path)
    manifest["metric"] = scored.get("metric", "given")
    manifest["scores_file"] = str(scores_path.resolve())
    atomic_write_json(path, manifest)
    _print(manifest, args.json, path)
    return 0
