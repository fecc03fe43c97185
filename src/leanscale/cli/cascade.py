"""``leanscale cascade``: train, evaluate and serve a cascade of cheap-to-expensive text classifiers.

Three actions:

* ``fit`` loads labelled texts (WordNet glosses or the user's ``.csv`` / ``.tsv`` / ``.jsonl``),
  splits them into train / calibration / test, trains the requested stages on train (mined
  keyword rules, TF-IDF + logistic regression, a MiniLM-embedding head, and the user's own models
  given by ``--model NAME=MODULE:FACTORY``), chooses the thresholds on
  calibration (:class:`leanscale.cascade.Cascade`), measures the result on test, and saves the
  cascade plus ``<out stem>.eval.json`` (split indices and the test summary);
* ``eval`` measures a saved cascade on data (the test split recorded at fit time when the data are
  the ones it was fit on);
* ``serve`` is ``leanscale serve``: the same arguments and code.

The protocol itself (split, stages, fit, evaluation, the eval record) is the API of
:mod:`leanscale.cascade.evaluation`; this module parses the arguments, calls it and prints.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from leanscale.cli import add_actions, add_command, print_json, run_action
from leanscale.cli import serve as serve_cli

EPILOG = """\
examples:
  leanscale cascade fit --data wordnet --out cascade.json
      rules -> TF-IDF -> MiniLM head on 20,000 WordNet glosses
  leanscale cascade fit --data tickets.csv --text-column body --label-column queue \\
      --stages rules,tfidf --target-accuracy 0.9 --out tickets.json
  leanscale cascade fit --data tickets.jsonl --stages rules,tfidf --costs rules=0.0001,tfidf=0.01 \\
      --budget 0.005 --out tickets.json
  leanscale cascade fit --data wordnet --target-accuracy 0.7 --guarantee --delta 0.05 --out g.json
  leanscale cascade fit --data tickets.csv --stages rules,tfidf,minilm --deferral learned --out l.json
  leanscale cascade fit --data tickets.csv --text-column body --label-column queue \
      --stages rules,mine,minilm --model mine=models.py:make --costs mine=0.01 --out c.json
      your model as the stage 'mine', between the rules and MiniLM (see --model below)
  leanscale cascade eval cascade.json --data wordnet        on the test split recorded at fit time
  leanscale cascade eval tickets.json --data new.csv --text-column body --label-column queue
  leanscale cascade serve cascade.json --port 9000          the same as `leanscale serve`

your own model as a stage (--model NAME=SPEC, repeatable):
  SPEC is 'package.module:factory' (the current folder is importable) or 'path/to/file.py:factory';
  the factory takes no arguments and returns, unfitted, either
    - a scikit-learn classifier taking the raw texts, e.g.
        make_pipeline(TfidfVectorizer(), LogisticRegression()) or
        make_pipeline(HashingVectorizer(), SGDClassifier(loss="log_loss"))
      fit on the train split; saved with skops (scikit-learn classes only), or
    - a torch.nn.Module mapping MiniLM-L6 embeddings (batch, 384) to logits (batch, n_labels),
      e.g. nn.Sequential(nn.Linear(384, 64), nn.ReLU(), nn.Linear(64, n_labels)), trained on the
      train split's embeddings like the built-in minilm head (AdamW, cosine decay, 20 epochs);
      saved as an allow-listed exported graph + weights.
  NAME is the stage's name: put it in --stages at its place (cheapest first); --costs NAME=COST
  declares its cost. The saved cascade needs none of your code: `cascade eval` and `leanscale
  serve` load it anywhere.

files written by fit (--out cascade.json):
  cascade.json                  the cascade (Cascade.load reads it; no pickle)
  cascade.<stage>.arrays*       the weights of each model stage (.skops: a scikit-learn stage)
  cascade.eval.json             train/calibration/test indices and the test summary
"""

# Every built-in stage, cheapest first (leanscale.cascade.evaluation.TEXT_STAGES, written out: this
# module imports nothing heavy at start-up; the stage names are checked by the API's check).
DEFAULT_STAGES = "rules,tfidf,minilm"
WORDNET_MAX_EXAMPLES = 20_000

_FIT = "leanscale cascade fit"
_EVAL = "leanscale cascade eval"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = add_command(
        subparsers, "cascade", help="train, evaluate and serve a cascade: rules -> TF-IDF -> MiniLM",
        description="Filters and simpler models first: train a cascade of keyword rules, TF-IDF and a MiniLM head on "
        "labelled texts, choose its thresholds from the exact cost-accuracy frontier (target accuracy, budget or a "
        "finite-sample guarantee), evaluate it and serve it over HTTP.",
        epilog=EPILOG,
    )
    sub = add_actions(p)

    def data_args(q):
        q.add_argument("--data", required=True, metavar="wordnet|PATH",
                       help="'wordnet' (glosses -> 45 lexicographer files), a .csv, .tsv, .jsonl or .parquet file, or "
                       "a Hugging Face datasets folder (save_to_disk) with a text and a label column")
        q.add_argument("--text-column", default="text", help="column (CSV/TSV) or key (JSONL) of the text (text)")
        q.add_argument("--label-column", default="label", help="column or key of the label (label)")
        q.add_argument("--data-root", default=None, help="folder of the WordNet files (default: the system's)")

    q = add_command(sub, "fit", help="train the stages, choose the thresholds, evaluate and save",
                    description="Split the data 60/20/20 into train/calibration/test (stratified), train the stages "
                    "on train, fit the cascade's thresholds on calibration, report on test, save.",
                    epilog=EPILOG)
    data_args(q)
    q.add_argument("--max-examples", type=int, default=None,
                   help=f"stratified subsample of the data (default: {WORDNET_MAX_EXAMPLES} for wordnet, all rows of a file)")
    q.add_argument("--out", required=True, help="the cascade JSON to write (missing folders are created)")
    q.add_argument("--stages", default=DEFAULT_STAGES,
                   help=f"comma-separated, cheapest first, from {DEFAULT_STAGES.replace(',', ', ')} and the names "
                   f"given by --model ({DEFAULT_STAGES})")
    q.add_argument("--model", action="append", default=[], metavar="NAME=MODULE:FACTORY",
                   help="your own model as the stage NAME (repeatable): the factory returns an unfitted scikit-learn "
                   "classifier taking the texts, or a torch.nn.Module from 384-d MiniLM embeddings to logits; "
                   "place NAME in --stages (see below)")
    q.add_argument("--min-precision", type=float, default=0.9,
                   help="lower confidence bound on the precision of each mined rule (0.9)")
    goal = q.add_mutually_exclusive_group()
    goal.add_argument("--target-accuracy", type=float, default=None,
                      help="the cheapest setting reaching this calibration accuracy "
                      "(default: the last stage's own accuracy)")
    goal.add_argument("--budget", type=float, default=None,
                      help="the most accurate setting whose mean cost per request is at most this")
    q.add_argument("--guarantee", action="store_true",
                   help="certify --target-accuracy with probability >= 1 - delta (Learn-then-Test)")
    q.add_argument("--delta", type=float, default=0.05, help="risk level of --guarantee (0.05)")
    q.add_argument("--calibrate", action="store_true", help="fit a temperature per model stage first")
    q.add_argument("--deferral", choices=("confidence", "learned"), default="confidence",
                   help="when a stage passes a request on: its raw confidence below a threshold (default), or a "
                   "learned score of whether its answer is right (margin, entropy, length, agreement with earlier "
                   "stages; fitted on the calibration split)")
    q.add_argument("--costs", default=None, metavar="NAME=COST,...",
                   help="declared cost per request of some stages, e.g. rules=0.001,tfidf=0.05,minilm=2 "
                   "(default: measured, wall seconds per request)")
    q.add_argument("--seed", type=int, default=0, help="subsample, split and training seed (0)")
    q.set_defaults(action_func=run_fit)

    q = add_command(sub, "eval", help="accuracy, per-stage share and mean cost of a saved cascade on data",
                    description="Evaluate a saved cascade. When --data are the data it was fit on (checked against "
                    "<stem>.eval.json), only the recorded test split is used, unless --all.",
                    epilog=EPILOG)
    q.add_argument("cascade", help="the cascade JSON written by fit (or Cascade.save)")
    data_args(q)
    q.add_argument("--all", action="store_true", help="evaluate on every example, even the ones fit on")
    q.add_argument("--objects", default=None, metavar="MODULE:NAME",
                   help="stage name -> object for stages saved by name, as in `leanscale serve --objects`")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(action_func=run_eval)

    q = add_command(sub, "serve", help="serve a saved cascade over HTTP (the same as `leanscale serve`)",
                    description="Serve a saved cascade: POST /v1/predict, GET /healthz, GET /metrics, GET /openapi.json "
                    "(GET /docs with --docs); "
                    "exactly `leanscale serve`.",
                    epilog=serve_cli.EPILOG)
    serve_cli.add_arguments(q)
    q.set_defaults(action_func=serve_cli.run)
    return p


run = run_action  # the action chosen, or the help and exit status 2


# ------------------------------------------------------------------------------------ helpers


def _parse_stages(text: str, models: list[str] = ()) -> list[str]:
    from leanscale.cascade.evaluation import check_stage_names

    names = [t.strip() for t in str(text).split(",") if t.strip()]
    return check_stage_names(names, _FIT, param="--stages", given=text, models=models, models_param="--model")


def _parse_models(items: list[str]) -> dict[str, str]:
    """``--model NAME=SPEC`` flags -> ``{name: spec}`` (the syntax only; :func:`_load_models` imports them)."""
    from leanscale.core.errors import InvalidParameterError

    sources: dict[str, str] = {}
    for item in items:
        name, sep, spec = (t.strip() for t in str(item).partition("="))
        if not sep or not name or not spec:
            raise InvalidParameterError(
                f"The '--model' parameter of {_FIT} must look like 'NAME=package.module:factory' or "
                f"'NAME=path/to/file.py:factory' (NAME: the stage's name in --stages). Got {item!r}.")
        if name in sources:
            raise InvalidParameterError(f"The '--model' parameter of {_FIT} gives stage {name!r} twice: "
                                        f"{sources[name]!r} and {spec!r}.")
        sources[name] = spec
    return sources


def _load_models(sources: dict[str, str]) -> dict:
    """``{name: the model its factory returns}``, each checked to be a scikit-learn classifier or a
    torch module (before any data are loaded)."""
    from leanscale.cascade.user_stages import check_user_model
    from leanscale.cli._spec import call_without_arguments, import_object

    models = {}
    for name, spec in sources.items():
        factory = import_object(spec, "--model", _FIT, kind="callable")
        expected = (f"The '--model' parameter of {_FIT} must name a callable that takes no arguments and returns an "
                    "unfitted scikit-learn classifier or a torch.nn.Module.")
        models[name] = call_without_arguments(factory, spec, expected)
        check_user_model(models[name], name, param="--model", owner=_FIT, source=spec)
    return models


def _parse_costs(text: str | None, stages: list[str]) -> dict[str, float]:
    from leanscale.core.errors import InvalidParameterError
    from leanscale.core.validation import unknown_name_error

    if text is None:
        return {}
    costs: dict[str, float] = {}
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        try:
            cost = float(value) if sep else math.nan
        except ValueError:
            cost = math.nan
        if not sep or not name or not math.isfinite(cost) or cost < 0:
            raise InvalidParameterError(
                f"The '--costs' parameter of {_FIT} must look like 'rules=0.001,tfidf=0.05' with non-negative "
                f"numbers. Got {item!r} in {text!r}.")
        if name not in stages:
            raise unknown_name_error("--costs", name, stages, owner=_FIT)
        costs[name] = cost
    return costs


def _check_args(args) -> None:
    from leanscale.cascade.evaluation import MIN_EXAMPLES
    from leanscale.core.errors import InvalidParameterError
    from leanscale.core.validation import Interval, check_param

    if args.target_accuracy is not None:
        check_param("--target-accuracy", args.target_accuracy, [Interval("real", 0, 1)], _FIT)
    if args.budget is not None:
        check_param("--budget", args.budget, [Interval("real", 0, None)], _FIT)
    check_param("--delta", args.delta, [Interval("real", 0, 1, closed="neither")], _FIT)
    check_param("--min-precision", args.min_precision, [Interval("real", 0, 1, closed="right")], _FIT)
    check_param("--seed", args.seed, [Interval(int, 0, None)], _FIT)
    if args.max_examples is not None:
        check_param("--max-examples", args.max_examples, [Interval(int, MIN_EXAMPLES, None)], _FIT)
    if args.guarantee and args.target_accuracy is None:
        raise InvalidParameterError(
            f"The '--guarantee' parameter of {_FIT} needs --target-accuracy: the accuracy to certify.")
    if args.guarantee and args.deferral == "learned":
        raise InvalidParameterError(
            f"The '--deferral' parameter of {_FIT} must be 'confidence' with --guarantee (the certificate covers "
            "thresholds on the raw confidence). Got 'learned'.")


def _source_name(data: str) -> str:
    return "wordnet" if data.lower() == "wordnet" else str(Path(data).resolve())


def _say(text: str) -> None:
    print(text, flush=True)


# ---------------------------------------------------------------------------------------- fit


def load_texts(args, owner: str):
    """``(texts, labels)`` of ``--data``: WordNet, or the user's table or datasets folder through
    :func:`leanscale.data.load_dataset` (the same loader and messages as every other command); labels come
    back as strings, whatever the format."""
    import numpy as np

    if str(args.data).lower() == "wordnet":
        from leanscale.cascade.data import load_labelled_texts

        return load_labelled_texts(args.data, text_column=args.text_column, label_column=args.label_column,
                                   root=args.data_root)
    from leanscale.cli._spec import load_user_data

    data = load_user_data(args, owner, ("wordnet",), text_column=args.text_column)
    if data.y is None:
        from leanscale.core.errors import InvalidParameterError

        raise InvalidParameterError(f"The '--data' parameter of {owner} must have labels. Got {data.source}.")
    return list(data.texts), np.array([str(v) for v in data.labels], dtype=object)


def run_fit(args) -> int:
    from leanscale.cascade.evaluation import (
        fit_text_cascade,
        format_evaluation,
        save_text_cascade,
        split_labelled,
    )
    from leanscale.core.errors import InvalidParameterError

    _check_args(args)
    sources = _parse_models(args.model)
    names = _parse_stages(args.stages, list(sources))
    costs = _parse_costs(args.costs, names)
    out = Path(args.out)
    if out.suffix.lower() != ".json":
        raise InvalidParameterError(f"The '--out' parameter of {_FIT} must be a .json file. Got {args.out!r}.")
    if out.is_dir():
        raise InvalidParameterError(f"The '--out' parameter of {_FIT} names {args.out!r}, which is a folder; give a "
                                    ".json file path.")
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise InvalidParameterError(f"The '--out' parameter of {_FIT} names {args.out!r}, but {str(folder)!r} is a "
                                    "file, not a folder.")

    models = _load_models(sources)
    texts, y = load_texts(args, _FIT)
    out.parent.mkdir(parents=True, exist_ok=True)
    is_wordnet = args.data.lower() == "wordnet"
    max_examples = args.max_examples if args.max_examples is not None else (WORDNET_MAX_EXAMPLES if is_wordnet else None)
    split = split_labelled(y, max_examples=max_examples, seed=args.seed)
    n_total, n_pool = split.n_examples, len(split.pool)
    _say(f"data: {args.data}, {n_pool:,} examples" + (f" (stratified sample of {n_total:,})" if n_pool < n_total
                                                     else "")
         + f", {split.n_classes} labels; train {len(split.train):,} / calibration {len(split.calibration):,} / "
         f"test {len(split.test):,}")

    result = fit_text_cascade(
        texts, y, stages=names, split=split, min_precision=args.min_precision, costs=costs,
        target_accuracy=args.target_accuracy, budget=args.budget, guarantee=args.guarantee, delta=args.delta,
        calibrate=args.calibrate, seed=args.seed, log=_say, models=models, model_sources=sources,
        model_param="--model", owner=_FIT, deferral=args.deferral,
    )
    _say("")
    _say(result.cascade.explain())
    _say("")
    summary = result.test_summary
    _say(format_evaluation(summary, "test split"))
    for w in summary["warnings"]:
        _say(f"WARNING: {w}")

    ev = save_text_cascade(result, out, source=_source_name(args.data), text_column=args.text_column,
                           label_column=args.label_column)
    _say(f"\nsaved: {out} (load with leanscale.cascade.Cascade.load); split and test summary: {ev}")
    return 0


# --------------------------------------------------------------------------------------- eval


def run_eval(args) -> int:
    from leanscale.cascade import Cascade
    from leanscale.cascade.evaluation import evaluate_saved_cascade, format_evaluation

    cascade = Cascade.load(args.cascade, objects=serve_cli._objects(args.objects, owner=_EVAL))
    texts, y = load_texts(args, _EVAL)
    summary = evaluate_saved_cascade(args.cascade, texts, y, all_examples=args.all, cascade=cascade)
    if args.json:
        print_json(summary)
    else:
        for w in summary["warnings"]:
            print(f"WARNING: {w}", file=sys.stderr, flush=True)
        _say(f"{args.cascade} on {args.data} ({summary['examples_used']})")
        for w in summary["warnings"]:
            _say(f"WARNING: {w}")
        _say(format_evaluation(summary, "evaluation"))
    return 0
