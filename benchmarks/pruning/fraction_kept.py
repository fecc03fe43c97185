"""Benchmark 1 of the pruning issue: test accuracy vs fraction of the training set kept.

Sorscher et al. 2022 (arXiv 2206.14486) Fig. 3-5 and Paul et al. 2021 (arXiv 2107.07075) Fig. 1,
on Fashion-MNIST (images) and WordNet glosses (MiniLM embeddings, 45 classes).

Metrics: random, EL2N, GraNd, forgetting, self-supervised prototypes (no labels) and supervised
prototypes; each kept "hard" (highest scores) and "easy" (lowest), class-balanced; fractions
100, 90, 70, 50, 30, 20, 10%; >= 3 seeds. Every subset is trained for the same number of
epochs as the full data (so a 50% subset costs half the compute: pruning's saving).

Issue #17 added three label-free rows:
  - ``rs2``: RS2 (Okanovic et al. 2024, arXiv 2305.18424), a fresh random subset of the fraction
    every epoch (without replacement across epochs, :class:`leanscale.pruning.RS2Sampler`), the
    same epochs and steps as a static subset of that size; no scoring;
  - ``pca_prototypes`` / ``rp_prototypes``: prototypes (k-means, cosine) in a training-free
    embedding of the pixels (:func:`leanscale.pruning.fast_embedding`: PCA or a random
    projection to 32 dimensions) instead of the SimCLR encoder.
Their cost is measured against full training runs in alternation (``--cost-reps`` pairs: wall and
CPU seconds, min and median) and in FLOPs (deterministic). Time-to-accuracy: a row reaches the
target (the full data's mean accuracy minus ``--tta-drop`` points) when its mean final accuracy
does; its cost is the scoring (all scoring seeds) plus one training run, in FLOPs and seconds.
``--fractions`` / ``--strategies`` choose what is trained now; finished runs at the other
fractions are reported too. ``--results-name`` writes the JSON under another name (e.g. a
2-seed run next to the committed 3-seed one, sharing its state folder).

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
from leanscale.core.io import (
    JobState,
    atomic_write_bytes,
    atomic_write_csv,
    atomic_write_json,
)
from leanscale.models.cnn import BNCNN, MLPClassifier
from leanscale.pruning._train import train_scoring_model
from leanscale.pruning.datasets import load_pruning_data
from leanscale.pruning.forgetting import ForgettingTracker
from leanscale.pruning.grand import grand_scores
from leanscale.pruning.prototypes import prototype_scores
from leanscale.pruning.rs2 import RS2Sampler
from leanscale.pruning.scores import collect_probs, el2n_scores
from leanscale.pruning.select import select

FRACTIONS = (1.0, 0.9, 0.7, 0.5, 0.3, 0.2, 0.1)
METRICS = ("random", "el2n", "grand", "forgetting", "ssl_prototypes", "sup_prototypes", "rs2", "pca_prototypes",
           "rp_prototypes")
LABEL_FREE = ("random", "ssl_prototypes", "rs2", "pca_prototypes", "rp_prototypes")
FAST = {"pca_prototypes": "pca", "rp_prototypes": "random-projection"}  # metric -> fast_embedding method
FAST_DIM = 32
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


def forward_flops(make_model, x) -> float:
    """Forward FLOPs of the model on ONE example (leanscale.core.flops)."""
    from leanscale.core.flops import count_flops

    return float(count_flops(make_model().eval(), x[:1]).forward)  # eval: BatchNorm takes one example


def fast_scores(metric: str, data, k: int) -> tuple[np.ndarray, dict]:
    """Training-free prototype scores: fast_embedding + k-means; seconds (wall, CPU) and FLOPs."""
    from leanscale.pruning.features import fast_embedding
    from leanscale.pruning.kmeans import KMeans

    x = data.x_train
    t0, c0 = time.perf_counter(), time.process_time()
    emb = fast_embedding(x, FAST[metric], dim=FAST_DIM, seed=0)
    embed_s, embed_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    scores = prototype_scores(emb, n_clusters=k, metric="cosine", seed=0)
    kmeans_s, kmeans_cpu = time.perf_counter() - t0, time.process_time() - c0
    n, d = x.shape[0], int(np.prod(x.shape[1:]))
    dim, fit = emb.shape[1], min(n, 10_000)
    # FLOPs: covariance 2 r d^2 + eigh ~ 9 d^3 (PCA), projection 2 n d dim, and Lloyd's iterations of the
    # same k-means (2 n k dim each, plus the assignment of the k-means++ seeding, k passes of 2 n dim)
    embed_flops = 2.0 * n * d * dim + (2.0 * fit * d * d + 9.0 * d ** 3 if FAST[metric] == "pca" else 0.0)
    iters = KMeans(k, metric="cosine", seed=0).fit(emb).n_iter_
    kmeans_flops = 2.0 * n * k * dim * (iters + 1)
    return scores, {"method": FAST[metric], "dim": int(dim), "embed_s": embed_s, "embed_cpu_s": embed_cpu,
                    "kmeans_s": kmeans_s, "kmeans_cpu_s": kmeans_cpu, "kmeans_iterations": int(iters),
                    "embed_flops": embed_flops, "kmeans_flops": kmeans_flops, "flops": embed_flops + kmeans_flops}


def fast_task(metric: str, data, args, state: JobState, out: Path) -> dict:
    key = f"fast-{metric}"
    if state.is_done(key):
        return state.load(key)
    scores, info = fast_scores(metric, data, args.n_clusters or data.n_classes)
    atomic_write_bytes(out / "scores" / f"{metric}.npy", npy_bytes(scores))
    state.save(key, info)
    return info


def cost_ab(rep: int, data, make_model, args, state: JobState, fast_metrics: list[str]) -> dict:
    """One pair of the cost measurement: a full training run, then each fast scoring, back to back
    (so both see about the same machine load). Wall and CPU seconds of this process."""
    key = f"cost-ab-rep{rep}"
    if state.is_done(key):
        return state.load(key)
    t0, c0 = time.perf_counter(), time.process_time()
    train_scoring_model(make_model, data.x_train, data.y_train, epochs=args.epochs, batch_size=args.batch_size,
                        lr=args.lr, seed=100 + rep)
    result = {"rep": rep, "full_run_s": time.perf_counter() - t0, "full_run_cpu_s": time.process_time() - c0}
    for metric in fast_metrics:
        _, info = fast_scores(metric, data, args.n_clusters or data.n_classes)
        result[metric] = {"s": info["embed_s"] + info["kmeans_s"], "cpu_s": info["embed_cpu_s"] + info["kmeans_cpu_s"]}
    state.save(key, result)
    print(f"  cost pair {rep}: full run {result['full_run_s']:.1f} s; " + ", ".join(
        f"{m} {result[m]['s']:.2f} s" for m in fast_metrics), flush=True)
    return result


def load_scores(out: Path, metric: str, seeds: int) -> np.ndarray | None:
    if metric in ("ssl_prototypes", "sup_prototypes", *FAST):
        return np.load(out / "scores" / f"{metric}.npy", allow_pickle=False)
    if metric in ("random", "rs2"):
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
    ap.add_argument("--strategies", default="hard,easy", help="strategies of the scored metrics trained now")
    ap.add_argument("--results-name", default=None, help="name of the JSON/CSV/PNG (default fraction_kept_<tag>)")
    ap.add_argument("--tta-drop", type=float, default=1.0,
                    help="time-to-accuracy target: the full data's mean accuracy minus this many points")
    ap.add_argument("--cost-reps", type=int, default=2, help="alternating pairs (full run, fast scorings)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads or max(1, torch.get_num_threads()))

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
    if args.results_name:  # a variant run sharing the state folder: keep the folder's config.json
        atomic_write_json(out / f"config_{args.results_name}.json", dict(vars(args)))
    else:
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
    proto = prototype_task(data, args, state, out) if any(m in ("ssl_prototypes", "sup_prototypes")
                                                           for m in metrics) else None
    fast = {m: fast_task(m, data, args, state, out) for m in metrics if m in FAST}
    strategies_now = [s for s in args.strategies.split(",") if s]

    rows = []
    for r in full_runs:
        rows.append({"metric": "full", "strategy": "-", "fraction": 1.0, "seed": r["seed"], "n_kept": len(y_np),
                     "test_accuracy": r["test_accuracy"], "train_s": r["train_s"]})
    for metric in metrics:
        scores = load_scores(out, metric, args.score_seeds)
        strategies = ("random",) if metric in ("random", "rs2") else ("hard", "easy")
        for strategy in strategies:
            for frac in sorted(set(FRACTIONS) | set(fractions), reverse=True):
                if frac >= 1.0:
                    continue
                for s in seeds:
                    # The scores depend on how many scoring runs were averaged: part of the key
                    # unless it is the default (the keys of the committed results).
                    key = f"{metric}-{strategy}-{frac:g}-seed{s}" + (
                        f"-scored{args.score_seeds}" if metric in ("el2n", "grand", "forgetting")
                        and args.score_seeds != DEFAULT_SCORE_SEEDS else "")
                    train_now = frac in fractions and (strategy == "random" or strategy in strategies_now)
                    if not state.is_done(key) and not train_now:
                        continue  # reported when done, trained only when asked for
                    if not state.is_done(key) and metric == "rs2":  # a new random subset every epoch
                        t0 = time.perf_counter()
                        model = train_scoring_model(make_model, data.x_train, data.y_train, epochs=args.epochs,
                                                    batch_size=args.batch_size, lr=args.lr, seed=s,
                                                    sampler=RS2Sampler(len(y_np), ratio=frac, seed=s))
                        train_s = time.perf_counter() - t0
                        state.save(key, {"metric": metric, "strategy": strategy, "fraction": frac, "seed": s,
                                         "n_kept": RS2Sampler(len(y_np), ratio=frac).subset_size,
                                         "test_accuracy": accuracy(model, data.x_test, data.y_test),
                                         "train_s": train_s})
                        print(f"  {key}: {state.load(key)['test_accuracy']:.4f}", flush=True)
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

    # after the training runs: the cost measurement is the least important part of a cut-short run
    cost_pairs = [cost_ab(r, data, make_model, args, state, list(fast)) for r in range(args.cost_reps)] if fast else []

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
    for metric, info in fast.items():
        costs[metric] = {"seconds_per_seed": info["embed_s"] + info["kmeans_s"], "seeds": 1}
    for c in costs.values():
        c["fraction_of_full_run_per_seed"] = c["seconds_per_seed"] / full_s
        c["fraction_of_full_run_total"] = c["seconds_per_seed"] * c["seeds"] / full_s
    for metric in fast:  # measured next to a full run (cost_pairs): those seconds and that share instead
        if cost_pairs:
            c = costs[metric]
            c["seconds_first_run"] = c["seconds_per_seed"]
            c["seconds_per_seed"] = statistics.median(p[metric]["s"] for p in cost_pairs)
            c["fraction_of_full_run_per_seed"] = c["fraction_of_full_run_total"] = statistics.median(
                p[metric]["s"] / p["full_run_s"] for p in cost_pairs)
            c["note"] = "seconds: median over cost_pairs; fraction: median wall share next to a full run"

    # FLOPs (deterministic): a training step on b examples costs 3 x forward FLOPs x b (forward + backward).
    f1 = forward_flops(make_model, data.x_train)
    n_all = len(y_np)
    steps_per_epoch = lambda m: max(1, m // args.batch_size)  # noqa: E731 (train_scoring_model's batches)

    def train_flops(m: int, epochs: float) -> float:  # examples processed ~= steps x (m / steps) = epochs x m
        return 3.0 * f1 * round(epochs * steps_per_epoch(m)) * (m / steps_per_epoch(m))

    full_flops = train_flops(n_all, args.epochs)
    scoring_flops = {"random": 0.0, "rs2": 0.0,
                     "el2n": n_seeds * (train_flops(n_all, args.score_epochs) + f1 * n_all),
                     # GraNd: per-example gradients ~ one forward + backward per example (approximate)
                     "grand": n_seeds * (train_flops(n_all, args.score_epochs) + 3.0 * f1 * n_all),
                     "forgetting": n_seeds * full_flops,
                     "ssl_prototypes": None, "sup_prototypes": None}  # SimCLR's steps were not recorded
    scoring_flops.update({m: info["flops"] for m, info in fast.items()})
    for metric, c in costs.items():
        c["flops_total"] = scoring_flops.get(metric)
        c["fraction_of_full_run_flops"] = None if c["flops_total"] is None else c["flops_total"] / full_flops
    cost_share = {}
    if cost_pairs:
        for metric in fast:
            wall = [p[metric]["s"] / p["full_run_s"] for p in cost_pairs]
            cpu = [p[metric]["cpu_s"] / p["full_run_cpu_s"] for p in cost_pairs]
            cost_share[metric] = {"wall_share_min": min(wall), "wall_share_median": statistics.median(wall),
                                  "cpu_share_min": min(cpu), "cpu_share_median": statistics.median(cpu),
                                  "flops_share": scoring_flops[metric] / full_flops, "pairs": len(cost_pairs)}

    # Time-to-accuracy: scoring + one training run of the subset, when its mean accuracy reaches the target.
    target = full_mean - args.tta_drop / 100
    full_train_s = statistics.fmean(r["train_s"] for r in full_runs)
    for r in summary:
        m_kept = round(r["fraction"] * n_all)
        train_s = statistics.fmean(x["train_s"] for x in rows if x["metric"] == r["metric"]
                                   and x["strategy"] == r["strategy"] and x["fraction"] == r["fraction"])
        sc = costs.get(r["metric"])
        score_s = 0.0 if r["metric"] in ("random", "rs2") else (None if sc is None else
                                                                 sc["seconds_per_seed"] * sc["seeds"])
        sf = scoring_flops.get(r["metric"])
        reached = r["test_accuracy_mean"] >= target
        tf = train_flops(m_kept, args.epochs)
        r.update({"train_s_mean": train_s, "scoring_s": score_s, "scoring_flops": sf, "train_flops": tf,
                  "reaches_tta_target": reached,
                  "tta_s": (score_s + train_s) if reached and score_s is not None else None,
                  "tta_flops": (sf + tf) if reached and sf is not None else None,
                  "tta_flops_vs_full": (sf + tf) / full_flops if reached and sf is not None else None})

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
        "fast_prototypes": fast,
        "cost_share_vs_full_run": cost_share,
        "cost_pairs": cost_pairs,
        "cost_note": "fast scoring and full training runs measured back to back in alternation (cost_pairs) on 2 CPU "
                     "cores shared with other jobs: wall seconds are noisy, CPU seconds less so, FLOPs exact "
                     "(training step = 3 x forward FLOPs per example; k-means: 2 n k dim per Lloyd iteration).",
        "forward_flops_per_example": f1,
        "full_run_flops": full_flops,
        "full_run_train_s_mean": full_train_s,
        "tta": {"target_accuracy": target, "drop_points": args.tta_drop,
                "definition": "a row reaches the target when its mean final test accuracy does; its time-to-accuracy "
                              "is the scoring cost (all scoring seeds) + one training run of the subset (train_s of "
                              "the row's runs, measured under different machine loads: compare FLOPs)."},
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
    for metric in fast:  # issue #17: the cheap label-free path, <= 15% of a run, within 1 point of SSL at 70%
        at70 = best_at(0.7, [metric])
        gap = None if not (at70 and ssl_70) else 100 * (ssl_70["test_accuracy_mean"] - at70["test_accuracy_mean"])
        share = cost_share.get(metric, {})
        g[metric] = {"at_70pct": at70, "gap_to_ssl_at_70pct_points": gap,
                     "within_1_point_of_ssl": gap is not None and gap <= 1.0,
                     "cost_share_wall_median": share.get("wall_share_median"),
                     "cost_share_cpu_median": share.get("cpu_share_median"), "cost_share_flops": share.get("flops_share"),
                     "cost_goal_met": share.get("cpu_share_median") is not None and share["cpu_share_median"] <= 0.15
                     and share["wall_share_median"] <= 0.15}
    name = args.results_name or f"fraction_kept_{tag}"
    atomic_write_json(RESULTS / "pruning" / f"{name}.json", blob)
    atomic_write_csv(RESULTS / "pruning" / f"{name}.csv", rows)
    from leanscale.pruning.figures import fraction_kept_figure
    from leanscale.report.figures import figure_to_png_bytes

    atomic_write_bytes(RESULTS / "pruning" / f"{name}.png",
                       figure_to_png_bytes(fraction_kept_figure(blob)))
    print(f"[{tag}] full {full_mean:.4f}; most pruned within 0.3 points: "
          f"{None if most is None else (most['metric'], most['strategy'], most['fraction'])}; "
          f"SSL gap at 70%: {g['ssl_gap_at_70pct_points']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
