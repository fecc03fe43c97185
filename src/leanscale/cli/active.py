"""``leanscale active``: pool-based active learning on a data set's features.

Labels are revealed from the data set's own labels (the oracle) as the learner asks for them; the
model is :class:`~leanscale.models.linear.SoftmaxRegression` on the features (MiniLM embeddings for
``wordnet``, standardised pixels for ``fashion-mnist``, ``x`` of your ``.npz``). Each round's
accuracy on the test split goes to ``--out`` after every fit, so an interrupted run resumes where
it stopped when started again with the same arguments.
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings

from leanscale.cli import add_command, print_json

EPILOG = """\
examples:
  leanscale active --data wordnet --strategy margin --budget 3000 --batch-size 200   (needs [encoders])
  leanscale active --data fashion-mnist --strategy diversity --budget 2000 --out al-run
  leanscale active --data my_features.npz --strategy entropy --budget 500 --json
  leanscale active --data tickets.csv --text-column body --label-column queue --budget 300   (needs [encoders])
  leanscale active --data d.csv --model mymodel.py:make_estimator --budget 200

strategies: random, margin (default), entropy, least_confidence, diversity (cluster-margin)
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = add_command(
        subparsers, "active", help="pool-based active learning: label the examples that teach the most",
        description="Active learning: start from a few random labels, then repeatedly fit the model and "
        "ask for the labels of the most uncertain (or most uncertain and diverse) pool examples.",
        epilog=EPILOG,
    )
    from leanscale.cli._spec import add_data_arguments

    add_data_arguments(p, builtins=("fashion-mnist", "wordnet"), default="fashion-mnist", text=True)
    p.add_argument("--model", default=None, metavar="MODULE:FACTORY",
                   help="your model: 'package.module:factory' or 'path/to/file.py:factory', a callable with no arguments "
                   "returning an estimator with fit(X, y) and predict_proba(X), e.g. a scikit-learn classifier "
                   "(default: softmax regression with --C)")
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

    from leanscale.cli.prune import load_data
    from leanscale.core.errors import LeanscaleError
    from leanscale.core.io import atomic_write_json, read_json
    from leanscale.core.progress import write_line
    from leanscale.core.validation import Interval, check_param, unknown_name_error
    from leanscale.models.linear import SoftmaxRegression
    from leanscale.pruning.active import STRATEGIES, ActiveLearner

    owner = "leanscale active"
    for flag, value, rng in (("--budget", args.budget, Interval(int, 1, None)),
                             ("--batch-size", args.batch_size, Interval(int, 1, None)),
                             ("--initial", args.initial, Interval(int, 1, None)),
                             ("--C", args.C, Interval(float, 0, None, closed="neither")),
                             ("--seed", args.seed, Interval(int, 0, None))):
        check_param(flag, value, [rng], owner=owner)
    if args.n_train is not None:
        check_param("--n-train", args.n_train, [Interval(int, 1, None)], owner=owner)
    make_model = _model_factory(args, owner, SoftmaxRegression)
    data = load_data(args, owner)
    if data.y_train is None:
        from leanscale.core.errors import InvalidParameterError

        raise InvalidParameterError(
            f"The '--data' parameter of leanscale active must have labels (y) to answer the learner's "
            f"queries. Got {args.data!r} without them."
        )
    x = data.x_train.flatten(1).numpy().astype(np.float64)
    x_eval = None if data.x_test is None else data.x_test.flatten(1).numpy().astype(np.float64)
    y_eval = None if data.y_test is None else data.y_test.numpy()
    learner = ActiveLearner(make_model(), strategy=args.strategy, batch_size=args.batch_size,
                            initial_size=args.initial, seed=args.seed)
    if args.strategy not in STRATEGIES:
        raise unknown_name_error("strategy", args.strategy, STRATEGIES, owner="ActiveLearner")
    notes = _pool_warnings(args, len(x), owner)  # refuses --initial larger than the pool
    out = Path(args.out) if args.out else None
    settings = {"data": args.data, "model": args.model, "n_train": args.n_train, "strategy": args.strategy, "budget": args.budget,
                "batch_size": args.batch_size, "initial": args.initial, "C": args.C, "seed": args.seed}
    state_path = None if out is None else out / "state.json"
    resumed: list[str] = []  # warnings of the fits of the run this one resumes
    if state_path is not None and state_path.is_file():
        # The state is only a shortcut (every label comes from the data set): a damaged one is
        # reported and the run starts over, instead of failing or resuming from garbage.
        try:
            saved = read_json(state_path, what="active-learning state")
            if not isinstance(saved, dict):
                raise LeanscaleError(f"it holds a {type(saved).__name__}, not a JSON object")
            if saved.get("settings") == settings:
                learner.load_state_dict(saved.get("learner"))
                earlier = saved.get("warnings", [])
                if not isinstance(earlier, list) or not all(isinstance(w, str) for w in earlier):
                    raise LeanscaleError("its 'warnings' are not a list of strings")
                resumed = [w[:2000] for w in earlier[:100]]
                if learner.n_pool_ is not None and learner.n_pool_ != len(x):
                    raise LeanscaleError(f"it was saved for a pool of {learner.n_pool_} examples, not {len(x)}")
                idx = learner.labeled_indices_
                if idx.size and (int(idx.max()) >= len(x) or learner.labels_.shape != idx.shape
                                 or not np.array_equal(learner.labels_, data.y_train.numpy()[idx])):
                    raise LeanscaleError("its labels are not the data set's labels of those examples")
        except LeanscaleError as exc:
            resumed = []
            notes.insert(0, f"ignoring the damaged state file {str(state_path)!r} and starting over: {exc}")
            learner = ActiveLearner(make_model(), strategy=args.strategy,
                                    batch_size=args.batch_size, initial_size=args.initial, seed=args.seed)

    def save(lr: ActiveLearner) -> None:
        if state_path is not None:
            atomic_write_json(state_path, {"settings": settings, "learner": lr.state_dict(),
                                           "warnings": _dedupe(resumed, caught)})
        if not args.json:
            h = lr.history_[-1]
            acc = "" if h["accuracy"] is None else f", test accuracy {h['accuracy']:.4f}"
            write_line(f"  {h['n_labels']:>6,} labels{acc}")  # below the progress bar, not through it

    for note in notes:  # before the rounds: they say what the run below will be
        print(f"warning: {note}", file=sys.stderr, flush=True)
    # Warnings of the fits (a ConvergenceWarning, ...) are reported once each, not with a file and line
    # every round.
    with warnings.catch_warnings(record=True) as caught:  # (save reads it: it is called only in here)
        warnings.simplefilter("always")
        learner.run(x, data.y_train.numpy(), budget=args.budget, X_eval=x_eval, y_eval=y_eval, on_round=save,
                    progress_bar=not args.json)
    raised = _dedupe(resumed, caught)
    for note in raised:
        print(f"warning: {note}", file=sys.stderr)
    blob = {"settings": settings, "history": learner.history_, "warnings": notes + raised,
            "labeled_indices": learner.labeled_indices_.tolist()}
    if out is not None:
        atomic_write_json(out / "history.json", blob)
    if args.json:
        print_json({k: v for k, v in blob.items() if k != "labeled_indices"})
    elif out is not None:
        print(f"wrote {out / 'history.json'}")
    return 0


def _model_factory(args, owner: str, default):
    """A function making the learner's model: ``--model`` (checked once, here) or softmax regression."""
    if args.model is None:
        return lambda: default(C=args.C)
    from leanscale.cli._spec import call_without_arguments, import_object
    from leanscale.core.errors import InvalidParameterError

    factory = import_object(args.model, "--model", owner, kind="callable")
    expected = (f"The '--model' parameter of {owner} must name a callable that takes no arguments and returns an "
                f"estimator with fit(X, y) and predict_proba(X).")
    model = call_without_arguments(factory, args.model, expected)
    if not (callable(getattr(model, "fit", None)) and callable(getattr(model, "predict_proba", None))):
        raise InvalidParameterError(f"{expected} Got a {type(model).__name__} from {args.model!r}.")
    return factory


def _pool_warnings(args, n_pool: int, owner: str) -> list[str]:
    """What makes this run less than it asks for, said before it starts. ``--initial`` larger than
    the pool is refused (every label would be random and the flag cannot be honoured); a budget
    larger than the pool is clipped to it, and random labels that use up the whole budget are
    flagged (the result is random sampling, not active learning)."""
    from leanscale.core.errors import InvalidParameterError

    if args.initial > n_pool:
        raise InvalidParameterError(
            f"The '--initial' parameter of {owner} must be at most the pool size ({n_pool:,} examples in "
            f"{args.data!r}{'' if args.n_train is None else f' with --n-train {args.n_train}'}). Got {args.initial:,} "
            f"instead: pass a smaller --initial (it is 100 unless given)."
        )
    notes = []
    target = min(args.budget, n_pool)
    if args.budget > n_pool:
        notes.append(
            f"--budget {args.budget:,} is more than the {n_pool:,} examples in the pool: labelling stops at "
            f"{n_pool:,} (every example labelled)."
        )
    if args.initial >= target:
        notes.append(
            f"--initial {args.initial:,} random labels use up the whole budget of {target:,}: no label is chosen "
            f"by the --strategy {args.strategy!r} (this is random sampling); lower --initial."
        )
    return notes


def _dedupe(earlier: list[str], caught) -> list[str]:
    """One line per distinct warning (numbers aside), with how many times it was raised: the
    ``earlier`` lines (of the run this one resumes, as this function wrote them) and the ``caught``
    warnings."""
    counts: dict[str, list] = {}
    for text in earlier:
        times = re.search(r" \((\d+) times\)$", text)
        base = text[:times.start()] if times else text
        counts.setdefault(_NUMBERS.sub("#", base), [base, 0])[1] += int(times.group(1)) if times else 1
    for w in caught:
        text = f"{w.category.__name__}: {w.message}"
        counts.setdefault(_NUMBERS.sub("#", text), [text, 0])[1] += 1
    return [text if n <= 1 else f"{text} ({n} times)" for text, n in counts.values()]


_NUMBERS = re.compile(r"[-+]?\d[\d.,]*(?:e[-+]?\d+)?")
