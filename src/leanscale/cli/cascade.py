"""``leanscale cascade``: train, evaluate and serve a cascade of cheap-to-expensive text classifiers.

Three actions:

* ``fit`` loads labelled texts (WordNet glosses or the user's ``.csv`` / ``.tsv`` / ``.jsonl``),
  splits them into train / calibration / test, trains the requested stages on train (mined
  keyword rules, TF-IDF + logistic regression, a MiniLM-embedding head), chooses the thresholds on
  calibration (:class:`leanscale.cascade.Cascade`), measures the result on test, and saves the
  cascade plus ``<out stem>.eval.json`` (split indices and the test summary);
* ``eval`` measures a saved cascade on data (the test split recorded at fit time when the data are
  the ones it was fit on);
* ``serve`` is ``leanscale serve``: the same arguments and code.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

from leanscale.cli import run_action
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
  leanscale cascade eval cascade.json --data wordnet        on the test split recorded at fit time
  leanscale cascade eval tickets.json --data new.csv --text-column body --label-column queue
  leanscale cascade serve cascade.json --port 9000          the same as `leanscale serve`

files written by fit (--out cascade.json):
  cascade.json                  the cascade (Cascade.load reads it; no pickle)
  cascade.<stage>.arrays*       the weights of each model stage
  cascade.eval.json             train/calibration/test indices and the test summary
"""

VALID_STAGES = ("rules", "tfidf", "minilm")
DEFAULT_STAGES = "rules,tfidf,minilm"
WORDNET_MAX_EXAMPLES = 20_000
FRACTIONS = (0.6, 0.2, 0.2)
EVAL_FORMAT = "leanscale.cascade.eval"
MIN_EXAMPLES = 10

_FIT = "leanscale cascade fit"
_EVAL = "leanscale cascade eval"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "cascade", help="train, evaluate and serve a cascade: rules -> TF-IDF -> MiniLM",
        description="Filters and simpler models first: train a cascade of keyword rules, TF-IDF and a MiniLM head on "
        "labelled texts, choose its thresholds from the exact cost-accuracy frontier (target accuracy, budget or a "
        "finite-sample guarantee), evaluate it and serve it over HTTP.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="action", title="actions", metavar="<action>")

    def data_args(q):
        q.add_argument("--data", required=True, metavar="wordnet|PATH",
                       help="'wordnet' (glosses -> 45 lexicographer files) or a .csv, .tsv or .jsonl file")
        q.add_argument("--text-column", default="text", help="column (CSV/TSV) or key (JSONL) of the text (text)")
        q.add_argument("--label-column", default="label", help="column or key of the label (label)")
        q.add_argument("--data-root", default=None, help="folder of the WordNet files (default: the system's)")

    q = sub.add_parser("fit", help="train the stages, choose the thresholds, evaluate and save",
                       description="Split the data 60/20/20 into train/calibration/test (stratified), train the stages "
                       "on train, fit the cascade's thresholds on calibration, report on test, save.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    data_args(q)
    q.add_argument("--max-examples", type=int, default=None,
                   help=f"stratified subsample of the data (default: {WORDNET_MAX_EXAMPLES} for wordnet, all rows of a file)")
    q.add_argument("--out", required=True, help="the cascade JSON to write")
    q.add_argument("--stages", default=DEFAULT_STAGES,
                   help=f"comma-separated, cheapest first, from {', '.join(VALID_STAGES)} ({DEFAULT_STAGES})")
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
    q.add_argument("--costs", default=None, metavar="NAME=COST,...",
                   help="declared cost per request of some stages, e.g. rules=0.001,tfidf=0.05,minilm=2 "
                   "(default: measured, wall seconds per request)")
    q.add_argument("--seed", type=int, default=0, help="subsample, split and training seed (0)")
    q.set_defaults(action_func=run_fit)

    q = sub.add_parser("eval", help="accuracy, per-stage share and mean cost of a saved cascade on data",
                       description="Evaluate a saved cascade. When --data are the data it was fit on (checked against "
                       "<stem>.eval.json), only the recorded test split is used, unless --all.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("cascade", help="the cascade JSON written by fit (or Cascade.save)")
    data_args(q)
    q.add_argument("--all", action="store_true", help="evaluate on every example, even the ones fit on")
    q.add_argument("--objects", default=None, metavar="MODULE:NAME",
                   help="stage name -> object for stages saved by name, as in `leanscale serve --objects`")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(action_func=run_eval)

    q = sub.add_parser("serve", help="serve a saved cascade over HTTP (the same as `leanscale serve`)",
                       description="Serve a saved cascade: POST /v1/predict, GET /healthz, GET /metrics, GET /openapi.json "
                       "(GET /docs with --docs); "
                       "exactly `leanscale serve`.",
                       epilog=serve_cli.EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve_cli.add_arguments(q)
    q.set_defaults(action_func=serve_cli.run)
    p.set_defaults(func=run, print_help=p.print_help)
    return p


run = run_action  # the action chosen, or the help and exit status 2


# ------------------------------------------------------------------------------------ helpers


def _parse_stages(text: str) -> list[str]:
    from leanscale.core.errors import InvalidParameterError
    from leanscale.core.validation import unknown_name_error

    names = [t.strip() for t in str(text).split(",") if t.strip()]
    if not names:
        raise InvalidParameterError(
            f"The '--stages' parameter of {_FIT} must name at least one of {', '.join(VALID_STAGES)}. Got {text!r}.")
    for name in names:
        if name not in VALID_STAGES:
            raise unknown_name_error("--stages", name, VALID_STAGES, owner=_FIT)
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InvalidParameterError(f"The '--stages' parameter of {_FIT} repeats {', '.join(dup)}. Got {text!r}.")
    return names


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


def _source_name(data: str) -> str:
    return "wordnet" if data.lower() == "wordnet" else str(Path(data).resolve())


def _fingerprint(texts, labels, idx) -> str:
    h = hashlib.sha256()
    for i in idx:
        h.update(texts[i].encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
        h.update(str(labels[i]).encode("utf-8", "surrogatepass"))
        h.update(b"\x01")
    return h.hexdigest()


def eval_path(cascade_path: str | Path) -> Path:
    """``<stem>.eval.json`` beside the cascade JSON."""
    p = Path(cascade_path)
    return p.parent / f"{p.stem}.eval.json"


def evaluate(cascade, texts, labels) -> dict:
    """Accuracy, per-stage share and accuracy, mean cost and the last stage alone, on ``(texts, labels)``."""
    import numpy as np

    from leanscale.cascade import FALLBACK
    from leanscale.cascade.stages import StageError

    y = np.asarray(labels, dtype=object)
    t0 = time.perf_counter()
    out = cascade.predict_detailed(texts)
    seconds = time.perf_counter() - t0
    correct = np.array([a == b for a, b in zip(out.labels, y)], dtype=bool)
    per_stage = {}
    for name in [s.name for s in cascade.stages] + [FALLBACK]:
        sel = out.stage == name
        per_stage[name] = {"n": int(sel.sum()), "fraction": float(sel.mean()),
                           "accuracy": float(correct[sel].mean()) if sel.any() else None}
    last = cascade.stages[-1]
    warnings = []
    unanswered = int((~np.asarray(out.answered, dtype=bool)).sum())
    if unanswered:
        given = "no label" if cascade.fallback_label is None else f"the fallback label {cascade.fallback_label!r}"
        warnings.append(f"{unanswered} of {len(texts)} requests got no answer from any stage (they got {given} "
                        f"and count as wrong); stage errors: {dict(out.errors) or 'none'}")
    try:
        alone = last.predict(texts)
        last_acc = float(np.mean([a and lab == t for a, lab, t in zip(alone.answered, alone.labels, y)]))
    except StageError as exc:
        last_acc = None
        warnings.append(f"the last stage alone could not be measured: {exc}")
    last_cost = float(cascade.costs_[last.name])
    mean_cost = float(out.cost.mean())
    fr = cascade.frontier_
    return {
        "n": len(texts), "accuracy": float(correct.mean()), "mean_cost": mean_cost, "stages": per_stage,
        "last_stage": {"name": last.name, "accuracy": last_acc, "cost": last_cost},
        "speedup_vs_last_stage": last_cost / mean_cost if mean_cost > 0 else None,
        "errors": dict(out.errors), "unanswered": unanswered, "seconds": seconds,
        "calibration": {"accuracy": float(cascade.expected_accuracy_), "mean_cost": float(cascade.expected_cost_)},
        "frontier": {"points": len(fr), "exact": bool(fr.exact)},
        "warnings": warnings,
    }


def format_summary(s: dict, title: str) -> str:
    last = s["last_stage"]
    speed = s["speedup_vs_last_stage"]
    lines = [f"{title}: {s['n']:,} examples",
             f"  accuracy {s['accuracy']:.4f} at mean cost {s['mean_cost']:.6g} per request",
             f"  {last['name']} alone: accuracy "
             + ("unknown" if last["accuracy"] is None else f"{last['accuracy']:.4f}")
             + f" at {last['cost']:.6g} per request"
             + (f"; the cascade is {speed:.2f}x cheaper" if speed is not None else "")]
    width = max(len(k) for k in s["stages"])
    lines.append(f"  {'stage':<{width}}  answered  accuracy")
    for name, d in s["stages"].items():
        acc = "-" if d["accuracy"] is None else f"{d['accuracy']:.4f}"
        lines.append(f"  {name:<{width}}  {d['fraction']:>8.1%}  {acc:>8}")
    if s["errors"]:
        lines.append("  stage errors (requests passed on): " + ", ".join(f"{k} {v}" for k, v in s["errors"].items()))
    fr = s["frontier"]
    lines.append(f"  frontier: {fr['points']} Pareto-optimal setting(s) ({'exact' if fr['exact'] else 'subsampled'}); "
                 f"calibration accuracy {s['calibration']['accuracy']:.4f} at {s['calibration']['mean_cost']:.6g}")
    return "\n".join(lines)


def _say(text: str) -> None:
    print(text, flush=True)


# ---------------------------------------------------------------------------------------- fit


def run_fit(args) -> int:
    import numpy as np

    from leanscale.cascade import Cascade, ModelStage, mine_rules
    from leanscale.cascade.data import load_labelled_texts, split_three
    from leanscale.cascade.text_models import EmbeddingClassifier, TfidfClassifier
    from leanscale.core.errors import InvalidParameterError
    from leanscale.core.io import atomic_write_json, to_jsonable
    from leanscale.data._sampling import stratified_indices

    _check_args(args)
    names = _parse_stages(args.stages)
    costs = _parse_costs(args.costs, names)
    out = Path(args.out)
    if out.suffix.lower() != ".json":
        raise InvalidParameterError(f"The '--out' parameter of {_FIT} must be a .json file. Got {args.out!r}.")
    if out.is_dir():
        raise InvalidParameterError(f"The '--out' parameter of {_FIT} names {args.out!r}, which is a folder; give a "
                                    ".json file path.")
    if out.parent and not out.parent.is_dir():
        raise InvalidParameterError(f"The '--out' parameter of {_FIT} names {args.out!r}, whose folder does not exist.")

    texts, y = load_labelled_texts(args.data, text_column=args.text_column, label_column=args.label_column,
                                   root=args.data_root)
    n_total = len(texts)
    is_wordnet = args.data.lower() == "wordnet"
    max_examples = args.max_examples if args.max_examples is not None else (WORDNET_MAX_EXAMPLES if is_wordnet else None)
    if max_examples is not None and max_examples < n_total:
        pool = stratified_indices(y, max_examples, args.seed).astype(np.int64)
    else:
        pool = np.arange(n_total, dtype=np.int64)
    n_classes = len(set(y[pool].tolist()))
    if len(pool) < MIN_EXAMPLES or n_classes < 2:
        raise InvalidParameterError(
            f"The '--data' parameter of {_FIT} must hold at least {MIN_EXAMPLES} examples of at least 2 labels "
            f"to split into train, calibration and test. Got {len(pool)} example(s) of {n_classes} label(s) "
            f"in {args.data!r}.")
    tr, ca, te = (pool[ix] for ix in split_three(len(pool), FRACTIONS, seed=args.seed, labels=y[pool]))
    _say(f"data: {args.data}, {len(pool):,} examples" + (f" (stratified sample of {n_total:,})" if len(pool) < n_total
                                                        else "")
         + f", {n_classes} labels; train {len(tr):,} / calibration {len(ca):,} / test {len(te):,}")

    def sub(ix):
        return [texts[i] for i in ix]

    X_tr, y_tr = sub(tr), y[tr]
    stages = []
    for name in names:
        t0 = time.perf_counter()
        if name == "rules":
            mined = mine_rules(X_tr, y_tr, min_precision=args.min_precision)
            if len(mined) == 0:
                _say(f"rules: no keyword rule reached precision {args.min_precision} with enough support on "
                     f"{len(tr):,} training examples; stage skipped (lower --min-precision or add data)")
                continue
            stage = mined.to_stage(name="rules", cost=costs.get("rules"))
            what = f"{len(mined)} rule(s) mined (precision lower bound >= {args.min_precision})"
        elif name == "tfidf":
            stage = ModelStage(TfidfClassifier(seed=args.seed).fit(X_tr, y_tr), name="tfidf", cost=costs.get("tfidf"))
            what = "TF-IDF + logistic regression trained"
        else:
            _say(f"minilm: embedding {len(tr):,} training texts with all-MiniLM-L6-v2 ...")
            stage = ModelStage(EmbeddingClassifier("minilm", seed=args.seed).fit(X_tr, y_tr), name="minilm",
                               cost=costs.get("minilm"))
            what = "MiniLM-embedding head trained"
        _say(f"{name}: {what} in {time.perf_counter() - t0:.1f} s")
        stages.append(stage)
    if not stages:
        raise InvalidParameterError(
            f"The '--stages' parameter of {_FIT} left no stage to run: no rule passed --min-precision "
            f"{args.min_precision}. Add tfidf or minilm to --stages, or lower --min-precision.")

    cascade = Cascade(stages, target_accuracy=args.target_accuracy, budget=args.budget, guarantee=args.guarantee,
                      delta=args.delta, calibrate=args.calibrate, random_state=args.seed)
    cascade.fit(sub(ca), y[ca])
    _say("")
    _say(cascade.explain())
    _say("")
    summary = evaluate(cascade, sub(te), y[te])
    _say(format_summary(summary, "test split"))
    for w in summary["warnings"]:
        _say(f"WARNING: {w}")

    cascade.save(out)
    from leanscale.core.io import sha256_file

    doc = {
        "format": EVAL_FORMAT, "version": 1, "cascade": out.name,
        # the save this split belongs to: `eval` refuses the split for any other cascade file
        "cascade_sha256": sha256_file(out),
        "data": {"source": _source_name(args.data), "text_column": args.text_column,
                 "label_column": args.label_column, "n_examples": n_total,
                 "test_fingerprint": _fingerprint(texts, y, te)},
        "max_examples": max_examples, "seed": args.seed, "fractions": list(FRACTIONS),
        "stages_requested": names, "stages": [s.name for s in stages], "costs_declared": costs,
        "settings": {"target_accuracy": args.target_accuracy, "budget": args.budget, "guarantee": args.guarantee,
                     "delta": args.delta, "calibrate": args.calibrate, "min_precision": args.min_precision},
        "indices": {"train": tr, "calibration": ca, "test": te},
        "test": summary,
    }
    ev = atomic_write_json(eval_path(out), to_jsonable(doc))
    _say(f"\nsaved: {out} (load with leanscale.cascade.Cascade.load); split and test summary: {ev}")
    return 0


# --------------------------------------------------------------------------------------- eval


def _recorded_test(cascade_path: str, texts, y, warnings: list) -> tuple[list[int] | None, str]:
    """The recorded test indices when the eval JSON exists, belongs to this cascade file and
    matches these data, with a note; anything doubtful is appended to ``warnings``.

    Raises:
        DataFormatError: the eval JSON records these data but another save of the cascade (a fit
            was interrupted between the two files): its test split may hold training examples.
    """
    from leanscale.core.errors import DataFormatError
    from leanscale.core.io import read_json, sha256_file

    path = eval_path(cascade_path)
    if not path.is_file():
        warnings.append(f"no {path.name} beside the cascade: every example is used, including any it was "
                        "trained or calibrated on")
        return None, f"no {path.name} beside the cascade: every example is used"
    try:
        doc = read_json(path, what="eval split file")
        te = [int(i) for i in doc["indices"]["test"]]
        data = doc["data"]
        n_recorded, fp = int(data["n_examples"]), data["test_fingerprint"]
        recorded_hash = doc.get("cascade_sha256")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        warnings.append(f"{path.name} cannot be read ({exc}): every example is used, including any the cascade "
                        "was trained or calibrated on")
        return None, f"{path.name} cannot be read: every example is used"
    if doc.get("format") != EVAL_FORMAT or n_recorded != len(texts) or not te or max(te) >= len(texts) \
            or min(te) < 0 or _fingerprint(texts, y, te) != fp:
        return None, f"these data are not the ones recorded in {path.name}: every example is used"
    if recorded_hash is None:
        warnings.append(f"{path.name} does not record which save of the cascade it belongs to (written by an older "
                        "leanscale): its test split is used unchecked")
    elif recorded_hash != sha256_file(cascade_path):
        raise DataFormatError(
            f"The eval split file {str(path)!r} belongs to another save of {str(cascade_path)!r} (the cascade's "
            f"sha256 is not the one recorded): the fit that wrote this cascade did not finish, so its test split is "
            f"unknown and the recorded one may hold examples it was trained on. Re-run `{_FIT}`, or pass --all to "
            "evaluate on every example (training examples included).")
    return te, f"the test split recorded in {path.name}"


def _label_warnings(cascade, y, warnings: list) -> None:
    """Refuse data none of whose labels the cascade knows; warn when some are unknown."""
    from collections import Counter

    from leanscale.core.errors import DataFormatError

    known = set(cascade.classes_.tolist())
    counts = Counter(y.tolist())
    unseen = sorted((lab for lab in counts if lab not in known), key=str)
    if not unseen:
        return
    shown = ", ".join(repr(v) for v in unseen[:10]) + (f", ... ({len(unseen)} in all)" if len(unseen) > 10 else "")
    n_bad = sum(counts[lab] for lab in unseen)
    known_shown = ", ".join(repr(v) for v in sorted(known, key=str)[:10]) + (", ..." if len(known) > 10 else "")
    if n_bad == len(y):
        raise DataFormatError(
            f"The '--data' parameter of {_EVAL} holds no label the cascade knows: its labels ({shown}) are all unseen "
            f"(the cascade's labels: {known_shown}), so the accuracy would be 0 whatever it predicts. Check "
            "--label-column and that these are the data it was fit for (labels from files are read as strings).")
    warnings.append(f"{n_bad:,} of {len(y):,} examples ({n_bad / len(y):.1%}) have labels the cascade never saw "
                    f"and can never predict: {shown}; they count as wrong")


def run_eval(args) -> int:
    from leanscale.cascade import Cascade
    from leanscale.cascade.data import load_labelled_texts
    from leanscale.core.io import to_jsonable

    cascade = Cascade.load(args.cascade, objects=serve_cli._objects(args.objects, owner="leanscale cascade eval"))
    texts, y = load_labelled_texts(args.data, text_column=args.text_column, label_column=args.label_column,
                                   root=args.data_root)
    warnings: list[str] = []
    if args.all:
        idx, note = None, "every example (--all)"
    else:
        idx, note = _recorded_test(args.cascade, texts, y, warnings)
    if idx is not None:
        texts, y = [texts[i] for i in idx], y[idx]
    _label_warnings(cascade, y, warnings)
    summary = evaluate(cascade, texts, y)
    summary["examples_used"] = note
    summary["warnings"] = warnings + summary.pop("warnings", [])
    if args.json:
        json.dump(to_jsonable(summary), sys.stdout, indent=2)
        print()
    else:
        for w in summary["warnings"]:
            print(f"WARNING: {w}", file=sys.stderr, flush=True)
        _say(f"{args.cascade} on {args.data} ({note})")
        for w in summary["warnings"]:
            _say(f"WARNING: {w}")
        _say(format_summary(summary, "evaluation"))
    return 0
