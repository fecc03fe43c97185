"""``leanscale active``: pool-based active learning on a data set's features.

Labels are revealed from the data set's own labels (the oracle) as the learner asks for them; the
model is :class:`~leanscale.models.linear.SoftmaxRegression` on the features (MiniLM embeddings for
``wordnet``, standardised pixels for ``fashion-mnist``, ``x`` of your ``.npz``). Each round's
accuracy on the test split goes to ``--out`` after every fit, so an interrupted run resumes where
it stopped when started again with the same arguments.
"""

from __future__ import annotations

import argparse
import json
import sys

EPILOG = """\
examples:
  leanscale active --data wordnet --strategy margin --budget 3000 --batch-size 200   (needs [encoders])
  leanscale active --data fashion-mnist --strategy diversity --budget 2000 --out al-run
  leanscale active --data my_features.npz --strategy entropy --budget 500 --json

strategies: random, margin (default), entropy, least_confidence, diversity (cluster-margin)
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "active", help="pool-based active learning: label the examples that teach the most",
        description="Active learning: start from a few random labels, then repeatedly fit the model and "
        "ask for the labels of the most uncertain (or most uncertain and diverse) pool examples.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", default="fashion-mnist", help="fashion-mnist (default), wordnet, .npz or a data folder")
    p.add_argument("--data-root", default=None, help="folder of a built-in data set's files")
    p.add_argument("--n-train", type=int, default=None, help="stratified subset of the pool")
    p.add_argument("--strategy", default="margin", help="random, margin, entropy, least_confidence, diversity")
    p.add_argument("--budget", type=int, default=2000, help="labels to ask for in total (2000)")
    p.add_argument("--batch-size", type=int, default=100, help="labels per round (100)")
    p.add_argument("--initial", type=int, default=100, help="random labels before the first fit (100)")
    p.add_argument("--C", type=float, default=1.0, help="inverse L2 strength of the softmax regression (1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for history.json and the resumable state")
    p.add_argument("--json", action="store_true", help="print the history as JSON")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from pathlib import Path

    import numpy as np

    from leanscale.core.io import atomic_write_json, read_json
    from leanscale.models.linear import SoftmaxRegression
    from leanscale.pruning.active import ActiveLearner
    from leanscale.pruning.datasets import load_pruning_data

    data = load_pruning_data(args.data, root=args.data_root, n_train=args.n_train)
    if data.y_train is None:
        from leanscale.core.errors import InvalidParameterError

        raise InvalidParameterError(
            f"The '--data' parameter of leanscale active must have labels (y) to answer the learner's "
            f"queries. Got {args.data!r} without them."
        )
    x = data.x_train.flatten(1).numpy().astype(np.float64)
    x_eval = None if data.x_test is None else data.x_test.flatten(1).numpy().astype(np.float64)
    y_eval = None if data.y_test is None else data.y_test.numpy()
    learner = ActiveLearner(SoftmaxRegression(C=args.C), strategy=args.strategy, batch_size=args.batch_size,
                            initial_size=args.initial, seed=args.seed)
    out = Path(args.out) if args.out else None
    settings = {"data": args.data, "n_train": args.n_train, "strategy": args.strategy, "budget": args.budget,
                "batch_size": args.batch_size, "initial": args.initial, "C": args.C, "seed": args.seed}
    state_path = None if out is None else out / "state.json"
    if state_path is not None and state_path.is_file():
        saved = read_json(state_path)
        if saved.get("settings") == settings:
            learner.load_state_dict(saved["learner"])

    def save(lr: ActiveLearner) -> None:
        if state_path is not None:
            atomic_write_json(state_path, {"settings": settings, "learner": lr.state_dict()})
        if not args.json:
            h = lr.history_[-1]
            acc = "" if h["accuracy"] is None else f", test accuracy {h['accuracy']:.4f}"
            print(f"  {h['n_labels']:>6,} labels{acc}", flush=True)

    learner.run(x, data.y_train.numpy(), budget=args.budget, X_eval=x_eval, y_eval=y_eval, on_round=save)
    blob = {"settings": settings, "history": learner.history_,
            "labeled_indices": learner.labeled_indices_.tolist()}
    if out is not None:
        atomic_write_json(out / "history.json", blob)
    if args.json:
        json.dump({k: v for k, v in blob.items() if k != "labeled_indices"}, sys.stdout, indent=2)
        print()
    elif out is not None:
        print(f"wrote {out / 'history.json'}")
    return 0
