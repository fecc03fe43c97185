"""``leanscale prune``: score every training example, then keep the ones that teach the most.

Two actions: ``score`` trains the scoring model(s) (or embeds the data) and writes one score per
example (``scores.npy``) with a manifest; ``select`` turns scores into a kept set
(``kept.npy`` + ``manifest.json`` saying what was dropped, by which metric and why). The data is
never modified: the kept indices refer to the rows of the training split (or of your ``.npz``).
"""

from __future__ import annotations

import argparse
import sys

from leanscale.cli import (
    add_actions,
    add_command,
    print_json,
    run_action,
    torchrun_rank,
)
from leanscale.cli._spec import add_data_arguments

BUILTIN_DATA = ("fashion-mnist", "wordnet")

EPILOG = """\
examples:
  leanscale prune score --data fashion-mnist --metric el2n --seeds 2 --out prune/el2n
  leanscale prune select --scores prune/el2n --data fashion-mnist --keep 0.7 --strategy auto
  leanscale prune score --data wordnet --metric prototypes --out prune/proto    (needs [encoders])
  leanscale prune score --data fashion-mnist --metric prototypes --embedding pca --out prune/pca   (no training)
  leanscale prune score --data my_data.npz --metric forgetting --epochs 5 --out prune/fg
  leanscale prune score --data tickets.csv --text-column body --label-column queue --metric prototypes --out p
  leanscale prune score --model mymodel.py:build --data photos/ --image-size 32 --out prune/mine
  torchrun --nproc_per_node=2 -m leanscale.cli.main prune score --metric grand --out prune/grand
  leanscale prune dedup --data docs.jsonl --method exact,minhash --threshold 0.8 --out dedup/
  leanscale prune dedup --data docs.csv --text-column body --method semantic --eps 0.05 --out d  (needs [encoders])

data: fashion-mnist, wordnet, a folder with the IDX / WordNet files, or your own: an .npz with x (n, ...)
and y (n,) (string labels allowed), a .csv / .tsv / .jsonl / .parquet table (feature columns, or a
--text-column embedded with MiniLM), an image folder (one sub-folder per class) or a Hugging Face
datasets folder. Scoring resumes after an interruption: run the same command again.
"""


def _keep(text: str) -> float | int:
    value = float(text)
    return int(value) if value > 1 and value.is_integer() else value


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = add_command(
        subparsers, "prune", help="score training examples and prune the data set",
        description="Data pruning (Sorscher et al. 2022; Paul et al. 2021): score every example with "
        "EL2N, GraNd, forgetting, uncertainty or (self-supervised) prototypes, then keep a fraction, "
        "hard or easy examples, class-balanced.",
        epilog=EPILOG,
    )
    sub = add_actions(p)

    def data_args(q, required=True):
        add_data_arguments(q, builtins=BUILTIN_DATA, default="fashion-mnist" if required else None, text=True)
        q.add_argument("--data-root", default=None, help="folder of a built-in data set's files")
        q.add_argument("--n-train", type=int, default=None, help="stratified subset of the training split")

    q = sub.add_parser("score", help="one score per training example (higher = harder)")
    data_args(q)
    q.add_argument("--metric", default="el2n",
                   help="el2n (default), grand, forgetting, margin, entropy, least_confidence, prototypes, "
                   "supervised_prototypes, random")
    q.add_argument("--model", default=None, metavar="MODULE:FACTORY",
                   help="the scoring model: 'package.module:factory' or 'path/to/file.py:factory', a callable with no "
                   "arguments returning a fresh nn.Module (default: a CNN for images, an MLP for features)")
    q.add_argument("--epochs", type=float, default=None, help="epochs of each scoring run (metric's default)")
    q.add_argument("--seeds", type=int, default=1, help="scoring runs to average (1)")
    q.add_argument("--n-clusters", type=int, default=None, help="k-means clusters for prototypes (#classes)")
    q.add_argument("--embedding", default=None, metavar="METHOD",
                   help="prototypes: pca or random-projection, a training-free embedding of the inputs (seconds; "
                   "default: a SimCLR encoder for images, MiniLM for texts, the features themselves)")
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

    q = sub.add_parser("dedup", help="remove exact, near (MinHash) and semantic (SemDeDup) duplicates",
                       description="Deduplicate a text file: exact (hash of the normalised text), near "
                       "duplicates (MinHash LSH, verified with the true Jaccard similarity; needs [dedup]) and "
                       "semantic duplicates (SemDeDup, Abbas et al. 2023, on MiniLM or given embeddings). Writes "
                       "the kept rows as they were, kept.npy, manifest.jsonl (each removed row, the row it "
                       "duplicates, the method and the similarity) and summary.json.")
    q.add_argument("--data", required=True, metavar="FILE",
                   help=".jsonl / .ndjson (one JSON object per line), .csv / .tsv (a header row) or .txt (one item "
                   "per line)")
    q.add_argument("--text-column", default=None, help="key or column of the text (jsonl, csv, tsv; default 'text')")
    q.add_argument("--method", default="exact,minhash", help="comma-separated: exact, minhash, semantic "
                   "(default exact,minhash); they run in that order")
    q.add_argument("--normalize", default="nfkc,casefold,whitespace",
                   help="normalisation before hashing and shingling, comma-separated from nfkc, nfc, casefold, "
                   "lower, punctuation, digits, whitespace, or 'none' (default nfkc,casefold,whitespace)")
    q.add_argument("--threshold", type=float, default=0.8, help="minhash: Jaccard similarity of a near duplicate (0.8)")
    q.add_argument("--shingle", default="word", help="minhash: word or char n-grams (word)")
    q.add_argument("--shingle-size", type=int, default=5, help="minhash: n of the n-grams (5)")
    q.add_argument("--num-perm", type=int, default=128, help="minhash: permutations (128)")
    q.add_argument("--eps", type=float, default=0.05, help="semantic: remove at cosine similarity > 1 - eps (0.05)")
    q.add_argument("--n-clusters", type=int, default=None, help="semantic: k-means clusters (default ceil(n/1000))")
    q.add_argument("--embeddings", default=None, metavar="FILE.npy",
                   help="semantic: an (n, d) .npy of the rows' embeddings instead of MiniLM's")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", required=True, help="folder for kept.<ext>, kept.npy, manifest.jsonl and summary.json")
    q.add_argument("--json", action="store_true", help="print the summary as JSON")
    q.set_defaults(action_func=run_dedup)
    return p


run = run_action  # the action chosen, or the help and exit status 2


def _labels(data):
    return None if data.y_train is None else data.y_train.numpy()


def _print(manifest: dict, as_json: bool, path) -> None:
    if as_json:
        print_json({k: v for k, v in manifest.items() if k != "dropped_indices"})
        return
    s = manifest["strategy"]
    print(f"{manifest['metric']}: kept {manifest['n_kept']:,} of {manifest['n_examples']:,} "
          f"({s['resolved']}: {s['reason']})")
    print(f"scores min {manifest['scores']['min']:.4g}, median {manifest['scores']['median']:.4g}, "
          f"max {manifest['scores']['max']:.4g} (higher = harder)")
    if manifest.get("n_dropped"):
        print("classes balanced: " + ("yes" if manifest.get("class_balance") else "no"))
    print(f"wrote {path}")


def _check_flags(owner: str, **flags) -> None:
    """Range checks of numeric flags, with the flag's own name in the message."""
    from leanscale.core.validation import Interval, check_param

    ranges = {
        "--seeds": [Interval(int, 1, None)], "--epochs": [None, Interval(float, 0, None, closed="neither")],
        "--n-clusters": [None, Interval(int, 1, None)], "--batch-size": [Interval(int, 1, None)],
        "--lr": [Interval(float, 0, None, closed="neither")], "--seed": [Interval(int, 0, None)],
        "--n-train": [None, Interval(int, 1, None)],
    }
    for flag, value in flags.items():
        check_param(flag, value, ranges[flag], owner=owner)


def load_data(args, owner: str):
    """The :class:`~leanscale.pruning.datasets.PruningData` of ``--data``: a built-in set (or a folder of its
    files) through ``load_pruning_data``; the user's own file or folder through :func:`leanscale.data.load_dataset`
    (texts embedded with MiniLM). ``--n-train`` takes a stratified subset, as for the built-in sets."""
    from pathlib import Path

    import numpy as np
    import torch

    from leanscale.cli._spec import is_builtin_data, load_user_data, stratified_subset
    from leanscale.pruning.datasets import PruningData, load_pruning_data

    path = Path(str(args.data)).expanduser()
    idx_or_wordnet = path.is_dir() and (any(path.glob("train-images-idx3-ubyte*")) or (path / "data.noun").exists())
    if is_builtin_data(args.data, BUILTIN_DATA) or idx_or_wordnet:
        return load_pruning_data(args.data.lower() if is_builtin_data(args.data, BUILTIN_DATA) else args.data,
                                 root=args.data_root, n_train=args.n_train)
    data = load_user_data(args, owner, BUILTIN_DATA)
    if data.kind == "text":
        from leanscale.data.embeddings import cached_text_embeddings

        x = cached_text_embeddings(data.texts)
        x_test = None if data.texts_test is None else cached_text_embeddings(data.texts_test)
    else:
        x, x_test = data.x, data.x_test
    y = data.y
    idx = (stratified_subset(y, args.n_train) if y is not None
           else np.arange(len(x), dtype=np.int64)[: args.n_train])
    as_t = (lambda a, dt: None if a is None else torch.as_tensor(a, dtype=dt))
    x_dtype = torch.int64 if data.kind == "tokens" else torch.float32  # token ids stay integers
    return PruningData(name=data.source, kind=data.kind if data.kind == "tokens" else "image" if x.ndim == 4
                       else "features",
                       x_train=as_t(x[idx], x_dtype), y_train=None if y is None else as_t(y[idx], torch.int64),
                       x_test=as_t(x_test, x_dtype), y_test=as_t(data.y_test if x_test is not None else None,
                                                                      torch.int64),
                       classes=tuple(str(c) for c in data.classes), train_index=idx)


def _model_fn(spec: str | None, owner: str):
    """The ``--model`` factory, called once here so a bad one fails before any scoring."""
    if spec is None:
        return None
    from leanscale.cli._spec import build_model, import_object

    build_model(spec, "--model", owner)
    return import_object(spec, "--model", owner, kind="callable")


def run_score(args) -> int:
    from leanscale.core.io import atomic_write_json, read_json
    from leanscale.pruning.pruner import DataPruner

    _check_flags("leanscale prune score", **{"--seeds": args.seeds, "--epochs": args.epochs,
                                             "--n-clusters": args.n_clusters, "--batch-size": args.batch_size,
                                             "--lr": args.lr, "--seed": args.seed, "--n-train": args.n_train})
    owner = "leanscale prune score"
    model_fn = _model_fn(args.model, owner)
    data = load_data(args, owner)
    pruner = DataPruner(metric=args.metric, keep=1.0, strategy="hard", score_epochs=args.epochs, model_fn=model_fn,
                        n_seeds=args.seeds, n_clusters=args.n_clusters, embedding=args.embedding, out_dir=args.out,
                        seed=args.seed,
                        batch_size=args.batch_size, lr=args.lr)
    with torchrun_rank() as rank:
        pruner.fit(data.x_train, _labels(data), progress_bar=not args.json)
        path = pruner.write_manifest(args.out)
    if rank != 0:
        return 0  # under torchrun only rank 0 reports
    manifest = read_json(path, what="manifest")
    # which data was scored: `prune select` names it when it needs the labels again
    manifest["data"] = {"data": str(args.data), "data_root": args.data_root, "n_train": args.n_train,
                        "source": data.name, "classes": list(data.classes), "model": args.model}
    atomic_write_json(path, manifest)
    _print(manifest, args.json, path)
    return 0


def _select_warnings(pruner, scored: dict) -> list[str]:
    if not pruner.warnings_:
        return []
    data = scored.get("data") if isinstance(scored.get("data"), dict) else {}
    hint = ""
    if isinstance(data.get("data"), str):
        hint = f" --data {data['data']}" + (f" --n-train {data['n_train']}" if isinstance(data.get("n_train"), int) else "")
    return [
        "no class balancing was done: class balance is on by default, but without --data there are no labels, "
        "so the examples were ranked over all classes together and a class can be over- or under-pruned. "
        f"Pass{hint or ' --data'} to balance the classes, or --no-class-balance to rank them together on purpose."
    ]


def run_select(args) -> int:
    from pathlib import Path

    from leanscale.core.errors import DataFormatError, InvalidParameterError
    from leanscale.core.io import atomic_write_json, read_json, read_npy
    from leanscale.pruning.pruner import DataPruner

    _check_flags("leanscale prune select", **{"--seed": args.seed, "--n-train": args.n_train})
    src = Path(args.scores)
    scores_path = src / "scores.npy" if src.is_dir() else src
    if not scores_path.is_file():
        raise InvalidParameterError(
            f"The '--scores' parameter of leanscale prune select must be a scores.npy file or the folder "
            f"`leanscale prune score` wrote. Got {args.scores!r}, which has no scores.npy."
        )
    scores = read_npy(scores_path, what="scores file", ndim=1)
    if scores.dtype.kind not in "fiu":
        raise DataFormatError(f"The scores file {str(scores_path)!r} must hold numbers. Got dtype {scores.dtype}.")
    from leanscale.pruning.pruner import read_pruning_manifest

    manifest_in = scores_path.parent / "manifest.json"
    try:  # the manifest's format version, and the scores against the SHA-256 it recorded
        verify = ("scores.npy",) if scores_path.name == "scores.npy" else False
        scored = read_pruning_manifest(manifest_in, verify=verify) if manifest_in.is_file() else {}
    except DataFormatError as exc:
        if "does not belong to the manifest" not in str(exc):
            raise
        raise DataFormatError(f"{exc} Run `leanscale prune score` again (it resumes) to write both.") from None
    labels = None
    if args.data is not None:
        data = load_data(args, "leanscale prune select")
        labels = _labels(data)
        if labels is None:
            raise InvalidParameterError(
                f"The '--data' parameter of leanscale prune select must have labels (y) to balance the classes. "
                f"Got {args.data!r} without them; leave --data out (no balancing) instead."
            )
        if len(labels) != len(scores):
            raise InvalidParameterError(
                f"The '--data' parameter of leanscale prune select must have one training example per score. Got "
                f"{len(labels):,} examples in {args.data!r} for {len(scores):,} scores in {str(scores_path)!r} "
                f"(pass the --data and --n-train that `prune score` used)."
            )
    # The scores are given: DataPruner only selects (its metric_ becomes "given").
    pruner = DataPruner(metric="random", keep=args.keep, strategy=args.strategy, class_balance=not args.no_class_balance,
                        seed=args.seed)
    pruner.fit(None, labels, scores=scores)
    out = Path(args.out) if args.out else scores_path.parent
    path = pruner.write_manifest(out)
    manifest = read_json(path, what="manifest")
    metric = scored.get("metric", "given")
    manifest["metric"] = metric if isinstance(metric, str) else "given"
    manifest["scores_file"] = str(scores_path.resolve())
    manifest["warnings"] = _select_warnings(pruner, scored)
    atomic_write_json(path, manifest)
    _print(manifest, args.json, path)
    for w in manifest["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    return 0


_DEDUP_FLAGS = {"method": "--method", "normalization": "--normalize", "threshold": "--threshold",
                "shingle": "--shingle", "shingle_size": "--shingle-size", "num_perm": "--num-perm", "eps": "--eps",
                "n_clusters": "--n-clusters", "embeddings": "--embeddings", "seed": "--seed", "path": "--data",
                "text_column": "--text-column"}


def _as_flag_error(exc, owner: str):
    """An API error about parameter 'x' of deduplicate / read_text_rows, about the flag instead."""
    from leanscale.core.errors import InvalidParameterError

    message = str(exc)
    for param, flag in _DEDUP_FLAGS.items():
        for api in ("deduplicate", "read_text_rows"):
            head = f"The {param!r} parameter of {api}"
            if message.startswith(head):
                return InvalidParameterError(f"The {flag!r} parameter of {owner}{message[len(head):]}")
    return exc


def run_dedup(args) -> int:
    from leanscale.core.errors import InvalidParameterError
    from leanscale.core.io import read_npy
    from leanscale.pruning.dedup import deduplicate, read_text_rows, write_dedup

    owner = "leanscale prune dedup"
    from pathlib import Path

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise InvalidParameterError(
            f"The '--out' parameter of {owner} must be a folder (created if missing). Got {args.out!r}, which is a file.")
    normalization = None if args.normalize.strip().lower() == "none" else args.normalize
    try:
        rows = read_text_rows(args.data, args.text_column)
        embeddings = None
        if args.embeddings is not None:
            embeddings = read_npy(args.embeddings, what="embeddings file (--embeddings)", ndim=2)
        result = deduplicate(rows.texts, method=args.method, normalization=normalization, threshold=args.threshold,
                             shingle=args.shingle, shingle_size=args.shingle_size, num_perm=args.num_perm,
                             eps=args.eps, n_clusters=args.n_clusters, embeddings=embeddings, seed=args.seed)
    except InvalidParameterError as exc:
        raise _as_flag_error(exc, owner) from None
    paths = write_dedup(args.out, result, rows)
    summary = result.summary()
    if args.json:
        print_json({**summary, "files": {k: str(v) for k, v in paths.items()}})
        return 0
    print(f"kept {summary['n_kept']:,} of {summary['n_items']:,} rows ({summary['n_removed']:,} removed, "
          f"{100 * summary['removed_share']:.1f}%)")
    for stage in summary["stages"]:
        print(f"  {stage['method']}: {stage['n_removed']:,} of {stage['n_in']:,} removed ({stage['seconds']:.2f} s)")
    print(f"wrote {paths['kept']}, {paths['manifest']} and {paths['summary']}")
    return 0
