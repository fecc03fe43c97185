"""Benchmark 1 of the pruning issue: test accuracy vs fraction of the training set kept.

Sorscher et al. 2022 (arXiv 2206.14486) Fig. 3-5 and Paul et al. 2021 (arXiv 2107.07075) Fig. 1,
on Fashion-MNIST (images) and WordNet glosses (MiniLM embeddings, 45 classes).

Metrics: random, EL2N, GraNd, forgetting, self-supervised prototypes (no labels) and supervised
prototypes; each kept "hard" (highest scores) and "easy" (lowest), class-balanced; fractions
100, 90, 70, 50, 30, 20, 10%; >= 3 seeds. Every subset is trained for the same number of
epochs as the full data (so a 50% subset costs half the compute: pruning's saving).

Scoring (per scoring seed, then averaged over ``--score-seeds`` seeds as in Paul et al.):
  - a full-data run of E epochs with a ForgettingTracker: forgetting scores, and the 100% point;
  - an early model (``--score-epochs`` epochs): EL2N (its probabilities) and GraNd;
  - prototypes: Fashion-MNIST -> a SimCLR encoder trained on the images without labels
    (``--ssl-budget`` seconds), k-means in its embedding; WordNet -> k-means in the MiniLM space.
Scoring cost is reported as a fraction of one full training run (wall seconds on this machine).

Resumable: each training run and each score vector is a task under
``benchmarks/results/pruning/fraction_kept_<data>/``; run again after an interruption.

Usage: python benchmarks/pruning/fraction_kept.py --data fashion-mnist [--model mlp] [--seeds 3]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import numpy as np
import torch

from benchmarks.common import RESULTS, machine
from leanscale.core.io import JobState, atomic_write_bytes, atomic_write_csv, atomic_write_json
from leanscale.models.cnn import BNCNN, MLPClassifier
from leanscale.pruning._train import train_scoring_model
from leanscale.pruning.datasets import load_pruning_data
from leanscale.pruning.forgetting import ForgettingTracker
from leanscale.pruning.grand import grand_scores
from leanscale.pruning.prototypes import prototype_scores
from leanscale.pruning.scores import collect_probs, el2n_scores
from leanscale.pruning.select import select

FRACTIONS = (1.0, 0.9, 0.7, 0.5, 0.3, 0.2, 0.1)
METRICS = ("random", "el2n", "grand", "forgetting", "ssl_prototypes", "sup_prototypes")
LABEL_FREE = ("random", "ssl_prototypes")
DEFAULT_SCORE_SEEDS = 3  # scoring runs averaged (Paul et al. averaged 10)


def model_factory(kind: str, data, width: int):
    shape = tuple(data.x_train.shape[1:])
    k = data.n_classes
    if kind == "bncnn":
        return lambda: BNCNN(n_classes=k, in_channels=shape[0], width=width)
    return lambda: MLPClassifier(int(np.prod(shape)), width, k)


def accuracy(model, x, y) -> float:
    probs = collect_probs(model, x, batch_size=2048)
    return float((probs.argmax(1) == y.numpy()).mean())


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def score_seed(seed, data, make_model, args, state: JobState, out: Path) -> dict:
    """Full run with forgetting (also the 100% point) and the early model's EL2N and GraNd."""
    key = f"score-seed{seed}"
    if state.is_done(key):
        return state.load(key)
    x, y = data.x_train, data.y_train
    n = x.shape[0]
    tracker = ForgettingTracker(n)

    def on_batch(indices, logits, targets):
        tracker.update(indices, (logits.argmax(1) == targets))

    t0 = time.perf_counter()
    full = train_scoring_model(make_model, x, y, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                               seed=seed, on_batch=on_batch)
    full_s = time.perf_counter() - t0
    full_acc = accuracy(full, data.x_test, data.y_test)

    t0 = time.perf_counter()
    early = train_scoring_model(make_model, x, y, epochs=args.score_epochs, batch_size=args.batch_size,
                                lr=args.lr, seed=1000 + seed)
    early_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    probs = collect_probs(early, x, batch_size=2048)
    el2n = el2n_scores(probs, y.numpy())
    el2n_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    grand = grand_scores(early, (x, y), batch_size=512)
    grand_s = time.perf_counter() - t0
    forgetting = tracker.scores(never_learned="max")
    for name, arr in (("el2n", el2n), ("grand", grand), ("forgetting", forgetting)):
        atomic_write_bytes(out / "scores" / f"{name}-seed{seed}.npy", npy_bytes(arr.astype(np.float64)))
    result = {"seed": seed, "full_train_s": full_s, "full_test_accuracy": full_acc,
              "early_train_s": early_s, "el2n_pass_s": el2n_s, "grand_pass_s": grand_s,
              "n_never_learned": int((~tracker.ever_correct_).sum())}
    state.save(key, result)
    return result


def prototype_task(data, args, state: JobState, out: Path) -> dict:
    key = "prototypes"
    if state.is_done(key):
        return state.load(key)
    t0 = time.perf_counter()
    if data.kind == "image":
        from leanscale.models.encoders import embed_images
        from leanscale.pruning.embed import train_ssl_encoder

        encoder = train_ssl_encoder(data.x_train, seed=0, time_budget_s=args.ssl_budget)
        emb = embed_images(encoder, data.x_train)
        how = f"SimCLR encoder trained on the training images without labels ({args.ssl_budget:.0f} s budget)"
    else:
        emb = data.x_train.numpy()
        how = "the MiniLM-L6 embeddings the classifier reads (pretrained; no extra cost)"
    embed_s = time.perf_counter() - t0
    k = args.n_clusters or data.n_classes
    t0 = time.perf_counter()
    ssl = prototype_scores(emb, n_clusters=k, metric="cosine", seed=0)
    kmeans_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    sup = prototype_scores(emb, metric="cosine", labels=data.y_train.numpy())
    sup_s = time.perf_counter() - t0
    atomic_write_bytes(out / "scores" / "ssl_prototypes.npy", npy_bytes(ssl))
    atomic_write_bytes(out / "scores" / "sup_prototypes.npy", npy_bytes(sup))
    result = {"embedding": how, "embed_s": embed_s, "n_clusters": k, "kmeans_s": kmeans_s, "sup_prototypes_s": sup_s,
              "embedding_dim": int(emb.shape[1])}
    state.save(key, result)
    return result


def load_scores(out: Path, metric: str, seeds: int) -> np.ndarray | None:
    if metric in ("ssl_prototypes", "sup_prototypes"):
        return np.load(out / "scores" / f"{metric}.npy", allow_pickle=False)
    if metric == "random":
        return None
    return np.mean([np.load(out / "scores" / f"{metric}-seed{s}.npy", allow_pickle=False) for s in range(seeds)], axis=0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="fashion-mnist", help="fashion-mnist or wordnet")
    ap.add_argument("--model", default=None, help="mlp or bncnn (default: mlp)")
    ap.add_argument("--width", type=int, default=None, help="hidden units (mlp) or channels (bncnn)")
    ap.add_argument("--epochs", type=float, default=None, help="epochs of every training run")
    ap.add_argument("--score-epochs", type=float, default=1.0, help="epochs of the early model (EL2N, GraNd)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--seeds", type=int, default=3, help="training seeds of every subset")
    ap.add_argument("--score-seeds", type=int, default=DEFAULT_SCORE_SEEDS,
                    help="scoring runs averaged (EL2N, GraNd, forgetting)")
    ap.add_argument("--fractions", default=",".join(map(str, FRACTIONS)))
    ap.add_argument("--metrics", default=",".join(METRICS))
    ap.add_argument("--n-clusters", type=int, default=None, help="k-means clusters (default: number of classes)")
    ap.add_argument("--ssl-budget", type=float, default=120.0, help="seconds of SimCLR training")
    ap.add_argument("--n-train", type=int, default=None, help="stratified subset of the training split")
    ap.add_argument("--n-test", type=int, default=None, help="stratified subset of the test split")
    ap.add_argument("--tag", default=None, help="results sub-folder name (default: the data set)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    data = load_pruning_data(args.data, n_train=args.n_train, n_test=args.n_test)
    defaults = {"fashion-mnist": ("mlp", 256, 5.0, 0.05), "wordnet": ("mlp", 256, 5.0, 0.05)}
    d_model, d_width, d_epochs, d_lr = defaults.get(args.data, ("mlp", 256, 5.0, 0.05))
    args.model = args.model or d_model
    args.width = args.width or d_width
    args.epochs = args.epochs or d_epochs
    args.lr = args.lr or d_lr
    fractions = [float(f) for f in args.fractions.split(",")]
    metrics = [m for m in args.metrics.split(",") if m]
    tag = args.tag or f"{args.data}-{args.model}"
    out = RESULTS / "pruning" / f"fraction_kept_{tag}"
    state = JobState(out)
    state.write_config({k: v for k, v in vars(args).items()})
    make_model = model_factory(args.model, data, args.width)
    y_np = data.y_train.numpy()

    print(f"[{tag}] {data.x_train.shape[0]} training examples, {data.n_classes} classes, model {args.model} "
          f"width {args.width}, {args.epochs:g} epochs", flush=True)
    seeds = range(args.seeds)
    scoring = [score_seed(s, data, make_model, args, state, out) for s in range(args.score_seeds)]
    for r in scoring:
        print(f"  seed {r['seed']}: full data {r['full_test_accuracy']:.4f} in {r['full_train_s']:.0f} s", flush=True)
    # The 100% point of each training seed: the scoring run of that seed, or a plain full-data run.
    full_runs = []
    for s in seeds:
        if s < len(scoring):
            full_runs.append({"seed": s, "test_accuracy": scoring[s]["full_test_accuracy"],
                              "train_s": scoring[s]["full_train_s"]})
            continue
        key = f"full-seed{s}"
        if not state.is_done(key):
            t0 = time.perf_counter()
            model = train_scoring_model(make_model, data.x_train, data.y_train, epochs=args.epochs,
                                        batch_size=args.batch_size, lr=args.lr, seed=s)
            state.save(key, {"seed": s, "train_s": time.perf_counter() - t0,
                             "test_accuracy": accuracy(model, data.x_test, data.y_test)})
        full_runs.append(state.load(key))
    proto = prototype_task(data, args, state, out) if any("prototypes" in m for m in metrics) else None

    rows = []
    for r in full_runs:
        rows.append({"metric": "full", "strategy": "-", "fraction": 1.0, "seed": r["seed"], "n_kept": len(y_np),
                     "test_accuracy": r["test_accuracy"], "train_s": r["train_s"]})
    for metric in metrics:
        scores = load_scores(out, metric, args.score_seeds)
        strategies = ("random",) if metric == "random" else ("hard", "easy")
        for strategy in strategies:
            for frac in fractions:
                if frac >= 1.0:
                    continue
                for s in seeds:
                    # The scores depend on how many scoring runs were averaged: part of the key
                    # unless it is the default (the keys of the committed results).
                    key = f"{metric}-{strategy}-{frac:g}-seed{s}" + (
                        f"-scored{args.score_seeds}" if metric in ("el2n", "grand", "forgetting")
                        and args.score_seeds != DEFAULT_SCORE_SEEDS else "")
                    if not state.is_done(key):
                        sc = np.zeros(len(y_np)) if scores is None else scores
                        idx = select(sc, frac, strategy=strategy, labels=y_np, class_balance=True, seed=s)
                        t0 = time.perf_counter()
                        model = train_scoring_model(make_model, data.x_train[idx], data.y_train[idx],
                                                    epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                                    seed=s)
                        train_s = time.perf_counter() - t0
                        state.save(key, {"metric": metric, "strategy": strategy, "fraction": frac, "seed": s,
                                         "n_kept": int(len(idx)), "test_accuracy": accuracy(model, data.x_test,
                                                                                           data.y_test),
                                         "train_s": train_s})
                        print(f"  {key}: {state.load(key)['test_accuracy']:.4f}", flush=True)
                    rows.append(state.load(key))

    # --- summary ---
    full_accs = [r["test_accuracy"] for r in full_runs]
    full_mean = statistics.fmean(full_accs)
    full_s = statistics.fmean(r["full_train_s"] for r in scoring)
    table = {}
    for r in rows:
        if r["metric"] == "full":
            continue
        table.setdefault((r["metric"], r["strategy"], r["fraction"]), []).append(r["test_accuracy"])
    summary = []
    for (metric, strategy, frac), accs in sorted(table.items(), key=lambda kv: (kv[0][0], kv[0][1], -kv[0][2])):
        summary.append({"metric": metric, "strategy": strategy, "fraction": frac,
                        "test_accuracy_mean": statistics.fmean(accs),
                        "test_accuracy_sd": statistics.stdev(accs) if len(accs) > 1 else None,
                        "n_seeds": len(accs),
                        "drop_vs_full_points": 100 * (full_mean - statistics.fmean(accs))})

    def best_at(frac, allowed):
        cands = [r for r in summary if r["fraction"] == frac and r["metric"] in allowed]
        return max(cands, key=lambda r: r["test_accuracy_mean"]) if cands else None

    # Goal 1: the most pruned subset within 0.3 points of the full data.
    ok = [r for r in summary if r["drop_vs_full_points"] <= 0.3]
    most = min(ok, key=lambda r: r["fraction"]) if ok else None
    label_metrics = [m for m in metrics if m not in LABEL_FREE]
    best_label_70 = best_at(0.7, label_metrics)
    ssl_70 = best_at(0.7, ["ssl_prototypes"])
    costs = {}
    n_seeds = len(scoring)
    early = statistics.fmean(r["early_train_s"] for r in scoring)
    costs["el2n"] = {"seconds_per_seed": early + statistics.fmean(r["el2n_pass_s"] for r in scoring),
                     "seeds": n_seeds}
    costs["grand"] = {"seconds_per_seed": early + statistics.fmean(r["grand_pass_s"] for r in scoring),
                      "seeds": n_seeds}
    costs["forgetting"] = {"seconds_per_seed": full_s, "seeds": n_seeds}
    if proto:
        costs["ssl_prototypes"] = {"seconds_per_seed": proto["embed_s"] + proto["kmeans_s"], "seeds": 1}
        costs["sup_prototypes"] = {"seconds_per_seed": proto["embed_s"] + proto["sup_prototypes_s"], "seeds": 1}
    for c in costs.values():
        c["fraction_of_full_run_per_seed"] = c["seconds_per_seed"] / full_s
        c["fraction_of_full_run_total"] = c["seconds_per_seed"] * c["seeds"] / full_s

    blob = {
        "benchmark": "pruning/fraction_kept",
        "data": args.data, "model": args.model, "width": args.width, "epochs": args.epochs,
        "score_epochs": args.score_epochs, "batch_size": args.batch_size, "lr": args.lr,
        "n_train": int(len(y_np)), "n_test": int(data.y_test.shape[0]), "seeds": args.seeds,
        "score_seeds": args.score_seeds,
        "full_data_accuracy_mean": full_mean,
        "full_data_accuracy_sd": statistics.stdev(full_accs) if len(full_accs) > 1 else None,
        "full_run_seconds": full_s,
        "prototypes": proto,
        "scoring_cost": costs,
        "goals": {
            "most_pruned_within_0.3_points": most,
            "pruned_fraction_within_0.3_points": None if most is None else 1 - most["fraction"],
            "goal_30pct_pruned_met": bool(most is not None and most["fraction"] <= 0.7),
            "best_label_metric_at_70pct": best_label_70,
            "ssl_prototypes_at_70pct": ssl_70,
            "ssl_gap_at_70pct_points": (None if not (best_label_70 and ssl_70) else
                                         100 * (best_label_70["test_accuracy_mean"] - ssl_70["test_accuracy_mean"])),
        },
        "summary": summary,
        "machine": machine(),
    }
    g = blob["goals"]
    g["goal_ssl_within_1_point_met"] = g["ssl_gap_at_70pct_points"] is not None and g["ssl_gap_at_70pct_points"] <= 1.0
    if "ssl_prototypes" in costs:
        g["ssl_prototypes_cost_fraction"] = costs["ssl_prototypes"]["fraction_of_full_run_total"]
        g["goal_prototype_cost_met"] = g["ssl_prototypes_cost_fraction"] <= 0.15
    atomic_write_json(RESULTS / "pruning" / f"fraction_kept_{tag}.json", blob)
    atomic_write_csv(RESULTS / "pruning" / f"fraction_kept_{tag}.csv", rows)
    from leanscale.pruning.figures import fraction_kept_figure
    from leanscale.report.figures import figure_to_png_bytes

    atomic_write_bytes(RESULTS / "pruning" / f"fraction_kept_{tag}.png",
                       figure_to_png_bytes(fraction_kept_figure(blob)))
    print(f"[{tag}] full {full_mean:.4f}; most pruned within 0.3 points: "
          f"{None if most is None else (most['metric'], most['strategy'], most['fraction'])}; "
          f"SSL gap at 70%: {g['ssl_gap_at_70pct_points']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
