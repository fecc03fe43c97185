"""Benchmark 3 of the data-pruning issue: InfoBatch (Qin et al. 2024, arXiv 2303.04947) -- wall
time saved at equal accuracy -- on Fashion-MNIST with the BatchNorm CNN.

Two arms, the same number of epochs, the same seeds, run alternately (so both see the same machine
load): the full data every epoch (baseline) and InfoBatch (prune_ratio 0.5, delta 0.875: the
last 1/8 of the epochs on the full data). Model BNCNN(width), SGD with Nesterov momentum 0.9,
weight decay 5e-4, batch 128, and a cosine learning rate with a linear warm-up driven by the
fraction of the *epoch* done (a pruned epoch has fewer steps but covers the same part of the
schedule). The baseline shuffles all examples with a seeded permutation and takes the mean loss;
the InfoBatch arm takes the mean of the weighted per-example losses and records them, so its
bookkeeping is part of its cost.

Recorded per run: wall seconds and CPU seconds of this process spent training (evaluation
excluded), examples processed (forward + backward: the deterministic cost), the seconds spent in
InfoBatch's own bookkeeping, test accuracy after every epoch. Torch uses one thread: the
machine's 2 cores are shared with other jobs, and one thread per process is faster there than two
fighting for the cores. Wall times are noisy under that load; the load average at the start and
end of each run is written next to it.

Issue #17 added three baselines at the same number of epochs (``--arms``), each recording the
same per-epoch curve:

* ``rs2``: RS2 (Okanovic et al. 2024, arXiv 2305.18424), a fresh random ``--ratio`` of the data
  every epoch, without replacement across epochs (:class:`leanscale.pruning.RS2Sampler`); no
  scoring, no reweighting;
* ``random``: one static random subset of ``--ratio`` (class-balanced), trained every epoch;
* ``el2n``: the static EL2N keep-hard subset of ``--ratio`` (class-balanced), scored by the same
  CNN trained for ``--score-epochs`` on the full data (Paul et al. 2021); its scoring time and
  FLOPs are part of its cost.

``--ratio`` defaults to 0.7, about InfoBatch's share of examples processed (71% in the committed
60,000-example run), so the arms cost about the same. **Time-to-accuracy**: the first epoch at
which a run's test accuracy reaches the target (the full-data arm's mean final accuracy minus
``--tta-drop`` points); its cost is the scoring plus the training up to that epoch, in wall
seconds, CPU seconds and FLOPs (3 x the forward FLOPs per example processed, from
``leanscale.core.flops``).

Resumable: one JSON task per (arm, seed) under benchmarks/results/pruning/<name>/; run again
after an interruption. Results: benchmarks/results/pruning/<name>.json and <name>.csv
(``--name``, default infobatch).

Usage: python benchmarks/pruning/infobatch_fmnist.py [--seeds 2] [--epochs 8] [--width 8]
       python benchmarks/pruning/infobatch_fmnist.py --name infobatch_rs2 --n-train 12000 --epochs 6 \
           --arms full,infobatch,rs2,random,el2n
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import RESULTS, machine
from leanscale.core.flops import count_flops
from leanscale.core.io import JobState, atomic_write_csv, atomic_write_json
from leanscale.data.fashion_mnist import fashion_mnist_tensors
from leanscale.models.cnn import BNCNN
from leanscale.pruning.infobatch import InfoBatch
from leanscale.pruning.rs2 import RS2Sampler
from leanscale.pruning.scores import el2n_scores
from leanscale.pruning.select import select

ARMS = ("full", "infobatch", "rs2", "random", "el2n")
BATCH, PEAK_LR, MOMENTUM, WEIGHT_DECAY = 128, 0.1, 0.9, 5e-4
WARMUP = 0.05  # fraction of training with a linear LR warm-up from 0 to PEAK_LR
PRUNE_RATIO, DELTA = 0.5, 0.875  # the paper's defaults


def lr_at(progress: float) -> float:
    """Learning rate at ``progress`` in [0, 1] of training: linear warm-up, then cosine to 0."""
    if progress < WARMUP:
        return PEAK_LR * progress / WARMUP
    return PEAK_LR * 0.5 * (1.0 + math.cos(math.pi * (progress - WARMUP) / (1.0 - WARMUP)))


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(1000), y.split(1000)))
    model.train()
    return correct / len(y)


def el2n_subset(seed: int, score_epochs: float, width: int, ratio: float, data) -> tuple[np.ndarray, dict]:
    """The EL2N keep-hard subset: the CNN trained ``score_epochs`` on all examples (the full arm's
    recipe, its own schedule), EL2N of its predictions, class-balanced selection. Costs recorded."""
    x, y = data[0], data[1]
    n = len(y)
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    torch.manual_seed(1000 + seed)
    model = BNCNN(n_classes=10, in_channels=1, width=width)
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY)
    steps = 0
    n_epochs = math.ceil(score_epochs)
    for epoch in range(n_epochs):
        order = torch.from_numpy(np.random.default_rng([1000 + seed, epoch]).permutation(n))
        batches = torch.tensor_split(order, math.ceil(n / BATCH))
        stop = len(batches) if epoch + 1 <= score_epochs else round((score_epochs - epoch) * len(batches))
        for b, idx in enumerate(batches[:stop]):
            for group in opt.param_groups:
                group["lr"] = lr_at(min(1.0, (epoch + b / len(batches)) / score_epochs))
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += len(idx)
    model.eval()
    with torch.no_grad():
        probs = torch.cat([F.softmax(model(xb), 1) for xb in x.split(1000)]).numpy()  # (n, 10)
    scores = el2n_scores(probs, y.numpy())
    kept = select(scores, ratio, strategy="hard", labels=y.numpy(), class_balance=True, seed=seed)
    cost = {"scoring_wall_seconds": time.perf_counter() - t_wall, "scoring_cpu_seconds": time.process_time() - t_cpu,
            "scoring_examples_trained": steps, "scoring_examples_scored": n, "score_epochs": score_epochs}
    return kept, cost


def train(arm: str, seed: int, epochs: int, width: int, data, ratio: float = 0.7, score_epochs: float = 1.0) -> dict:
    x, y, x_test, y_test = data
    n = len(y)
    scoring = {"scoring_wall_seconds": 0.0, "scoring_cpu_seconds": 0.0, "scoring_examples_trained": 0,
               "scoring_examples_scored": 0}
    static = None  # a fixed subset (random, el2n)
    if arm == "random":
        static = select(np.zeros(n), ratio, strategy="random", labels=y.numpy(), class_balance=True, seed=seed)
    elif arm == "el2n":
        static, scoring = el2n_subset(seed, score_epochs, width, ratio, data)
    rs2 = RS2Sampler(n, ratio=ratio, seed=seed) if arm == "rs2" else None
    torch.manual_seed(seed)
    model = BNCNN(n_classes=10, in_channels=1, width=width)
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY)
    ib = InfoBatch(n, epochs=epochs, prune_ratio=PRUNE_RATIO, delta=DELTA, seed=seed) if arm == "infobatch" \
        else None
    load_start = os.getloadavg()
    wall = cpu = bookkeeping = 0.0
    examples, steps, curve = 0, 0, []
    for epoch in range(epochs):
        t_wall, t_cpu = time.perf_counter(), time.process_time()
        t0 = time.perf_counter()
        if rs2 is not None:
            order = rs2.epoch_indices(epoch)  # (m,) this epoch's fresh random subset
            bookkeeping += time.perf_counter() - t0
        elif static is not None:  # a seeded shuffle of the fixed subset
            order = torch.from_numpy(static[np.random.default_rng([seed, epoch]).permutation(static.size)])
        elif ib is None:  # the baseline: a seeded shuffle of all examples
            order = torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(n))  # (n,)
        else:
            order = ib.epoch_indices(epoch)  # (n_kept,) this epoch's shuffled kept examples
            bookkeeping += time.perf_counter() - t0
        # ceil(n_kept / BATCH) batches of nearly equal size: never a BatchNorm batch of 1
        batches = torch.tensor_split(order, math.ceil(len(order) / BATCH))
        for b, idx in enumerate(batches):
            for group in opt.param_groups:
                group["lr"] = lr_at((epoch + b / len(batches)) / epochs)
            losses = F.cross_entropy(model(x[idx]), y[idx], reduction="none")  # (b,)
            if ib is None:
                loss = losses.mean()
            else:
                t0 = time.perf_counter()
                w = ib.weights(idx)  # (b,) 1 / (1 - r) for kept well-learned examples, else 1
                bookkeeping += time.perf_counter() - t0
                loss = (losses * w).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ib is not None:
                t0 = time.perf_counter()
                ib.update(idx, losses.detach())
                bookkeeping += time.perf_counter() - t0
            examples += len(idx)
            steps += 1
        wall += time.perf_counter() - t_wall
        cpu += time.process_time() - t_cpu
        curve.append({"epoch": epoch + 1, "test_accuracy": accuracy(model, x_test, y_test),
                      "examples": examples, "kept_this_epoch": len(order), "train_wall_seconds": wall,
                      "train_cpu_seconds": cpu})
        print(f"  {arm} seed {seed} epoch {epoch + 1}/{epochs}: kept {len(order)}, "
              f"test acc {curve[-1]['test_accuracy']:.4f}, {wall:.0f} s", flush=True)
    return {
        "arm": arm, "seed": seed, "epochs": epochs, "width": width, "train_wall_seconds": wall,
        "train_cpu_seconds": cpu, "infobatch_bookkeeping_seconds": bookkeeping, "examples_processed": examples,
        "optimizer_steps": steps, "full_data_examples": n * epochs, "test_accuracy": curve[-1]["test_accuracy"],
        "curve": curve, "fraction_skipped": 0.0 if ib is None else ib.fraction_skipped_,
        "history": [] if ib is None else ib.history_,
        "load_average_start": load_start, "load_average_end": os.getloadavg(),
        "ratio": ratio if arm in ("rs2", "random", "el2n") else None, **scoring,
    }


def summarize(rows: list[dict], arms: tuple[str, ...] = ARMS, flops_per_example: float | None = None,
              tta_drop: float = 0.5) -> dict:
    """Per arm: accuracy, costs, savings against the full arm on the same seeds, time-to-accuracy."""
    by = {(r["arm"], r["seed"]): r for r in rows}
    seeds = sorted(s for (a, s) in by if a == "full" and all((b, s) in by for b in arms))
    if not seeds:
        return {}

    def mean_std(values):
        values = list(values)
        return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    f3 = None if flops_per_example is None else 3.0 * flops_per_example  # a training step per example
    full_runs = [by[("full", s)] for s in seeds]
    target = statistics.mean(r["test_accuracy"] for r in full_runs) - tta_drop / 100
    out = {"paired_seeds": seeds, "arms": list(arms), "forward_flops_per_example": flops_per_example,
           "tta_target_accuracy": 100 * target, "tta_drop_points": tta_drop,
           "tta_definition": "first epoch whose test accuracy reaches the target (the full arm's mean final accuracy "
                             "minus tta_drop_points); cost = scoring + training up to that epoch"}
    for arm in arms:
        runs = [by[(arm, s)] for s in seeds]
        acc = mean_std(100 * r["test_accuracy"] for r in runs)
        tta = []
        for r in runs:
            hit = next((c for c in r["curve"] if c["test_accuracy"] >= target), None)
            score_flops = None if f3 is None else f3 * r.get("scoring_examples_trained", 0) + \
                flops_per_example * r.get("scoring_examples_scored", 0)
            tta.append(None if hit is None else {
                "epoch": hit["epoch"],
                "wall_seconds": r.get("scoring_wall_seconds", 0.0) + hit["train_wall_seconds"],
                "cpu_seconds": r.get("scoring_cpu_seconds", 0.0) + hit.get("train_cpu_seconds", float("nan")),
                "flops": None if f3 is None else score_flops + f3 * hit["examples"],
                "examples": hit["examples"]})
        reached = [t for t in tta if t is not None]
        out[arm] = {
            "test_accuracy_mean": acc[0], "test_accuracy_std": acc[1],
            "test_accuracies": [100 * r["test_accuracy"] for r in runs],
            "train_wall_seconds_mean": statistics.mean(r["train_wall_seconds"] for r in runs),
            "train_cpu_seconds_mean": statistics.mean(r["train_cpu_seconds"] for r in runs),
            "examples_processed_mean": statistics.mean(r["examples_processed"] for r in runs),
            "optimizer_steps_mean": statistics.mean(r["optimizer_steps"] for r in runs),
            "infobatch_bookkeeping_seconds_mean": statistics.mean(r["infobatch_bookkeeping_seconds"] for r in runs),
            "scoring_wall_seconds_mean": statistics.mean(r.get("scoring_wall_seconds", 0.0) for r in runs),
            "scoring_cpu_seconds_mean": statistics.mean(r.get("scoring_cpu_seconds", 0.0) for r in runs),
            "tta_per_seed": tta,
            "tta_reached_seeds": len(reached),
            "tta_wall_seconds_mean": statistics.mean(t["wall_seconds"] for t in reached) if reached else None,
            "tta_cpu_seconds_mean": statistics.mean(t["cpu_seconds"] for t in reached) if reached else None,
            "tta_flops_mean": statistics.mean(t["flops"] for t in reached) if reached and f3 else None,
            "tta_epoch_mean": statistics.mean(t["epoch"] for t in reached) if reached else None,
        }
        if arm == "full":
            continue
        pairs = list(zip(full_runs, runs))
        for key, name in (("examples_processed", "examples"), ("train_wall_seconds", "wall"),
                          ("train_cpu_seconds", "cpu")):
            saving = mean_std(100 * (1 - b[key] / a[key]) for a, b in pairs)
            out[arm][f"saving_{name}_percent_mean"], out[arm][f"saving_{name}_percent_std"] = saving
        diff = mean_std(100 * (b["test_accuracy"] - a["test_accuracy"]) for a, b in pairs)
        out[arm]["accuracy_minus_full_points_mean"], out[arm]["accuracy_minus_full_points_std"] = diff
    if "infobatch" in arms:  # the keys of the committed infobatch.json
        ib = out["infobatch"]
        for name in ("examples", "wall", "cpu"):
            out[f"saving_{name}_percent_mean"] = ib[f"saving_{name}_percent_mean"]
            out[f"saving_{name}_percent_std"] = ib[f"saving_{name}_percent_std"]
        out["accuracy_infobatch_minus_full_points_mean"] = ib["accuracy_minus_full_points_mean"]
        out["accuracy_infobatch_minus_full_points_std"] = ib["accuracy_minus_full_points_std"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--n-train", type=int, default=None, help="training subset (default: all 60,000)")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {','.join(ARMS)}")
    ap.add_argument("--ratio", type=float, default=0.7, help="rs2 / random / el2n: fraction of the data per epoch")
    ap.add_argument("--score-epochs", type=float, default=1.0, help="el2n: epochs of the scoring model")
    ap.add_argument("--tta-drop", type=float, default=0.5, help="time-to-accuracy target: full accuracy minus this")
    ap.add_argument("--name", default="infobatch", help="results name: <out>/<name>/, <name>.json, <name>.csv")
    ap.add_argument("--out", type=Path, default=RESULTS / "pruning", help="folder of the results (smoke tests)")
    args = ap.parse_args()
    arms = tuple(a for a in args.arms.split(",") if a)
    if "full" not in arms or any(a not in ARMS for a in arms):
        ap.error(f"--arms must include full and name arms from {','.join(ARMS)}; got {args.arms!r}")
    torch.set_num_threads(1)
    out = args.out / args.name
    state = JobState(out)
    config = {"epochs": args.epochs, "width": args.width, "n_train": args.n_train, "batch_size": BATCH,
              "peak_lr": PEAK_LR, "warmup_fraction": WARMUP, "schedule": "linear warm-up then cosine to 0, by "
              "fraction of epochs done", "momentum": MOMENTUM, "nesterov": True, "weight_decay": WEIGHT_DECAY,
              "prune_ratio": PRUNE_RATIO, "delta": DELTA, "torch_threads": 1, "arms": list(arms),
              "ratio": args.ratio, "score_epochs": args.score_epochs, "tta_drop_points": args.tta_drop}
    state.write_config(config)
    t_all = time.perf_counter()
    data = None
    prefix = f"-e{args.epochs}-w{args.width}-n{args.n_train or 'all'}-"

    def key_of(arm: str, seed: int) -> str:
        key = f"{arm}{prefix}seed{seed}"
        if arm in ("rs2", "random", "el2n"):
            key += f"-r{args.ratio:g}" + (f"-s{args.score_epochs:g}" if arm == "el2n" else "")
        return key

    for seed in range(args.seeds):
        for arm in arms:  # the arms alternate, so they see about the same machine load
            key = key_of(arm, seed)
            if state.is_done(key):
                continue
            if data is None:
                train_set = fashion_mnist_tensors("train", n=args.n_train)
                test_set = fashion_mnist_tensors("test")
                data = (train_set.x, train_set.y, test_set.x, test_set.y)
            print(f"{key}", flush=True)
            state.save(key, train(arm, seed, args.epochs, args.width, data, args.ratio, args.score_epochs))

    keys = {key_of(arm, seed) for arm in arms for seed in range(args.seeds)}
    rows = [state.load(k) for k in state if k in keys]
    f1 = float(count_flops(BNCNN(n_classes=10, in_channels=1, width=args.width).eval(),
                           torch.zeros(1, 1, 28, 28)).forward)
    summary = summarize(rows, arms, f1, args.tta_drop)
    atomic_write_csv(args.out / f"{args.name}.csv", [
        {k: v for k, v in r.items() if k not in ("curve", "history")} for r in sorted(rows, key=lambda r: (r["seed"], r["arm"]))
    ])
    atomic_write_json(args.out / f"{args.name}.json", {
        "benchmark": "infobatch_fmnist", "machine": machine(),
        "load_note": "2 CPU cores shared with 5 other jobs running at the same time (load average per run in "
                     "'runs'); wall seconds are noisy. Examples processed (forward + backward) is the "
                     "deterministic cost; CPU seconds of this single-threaded process are less load-sensitive.",
        "data": f"Fashion-MNIST, {args.n_train or 60000} train / 10,000 test",
        "model": f"BNCNN(width={args.width})", "config": config, "summary": summary,
        "paper": "Qin et al. 2024 (ICLR), Table 1: prune_ratio 0.5, delta 0.875 saved about 40% of the "
                 "overall cost on CIFAR-10/100 (ResNet-18/50) at unchanged accuracy (numbers not copied "
                 "here: see the paper). RS2: Okanovic et al. 2024 (ICLR), arXiv 2305.18424.",
        "runs": rows, "wall_seconds_this_call": time.perf_counter() - t_all,
    })
    for arm in arms:
        if arm in summary:
            s = summary[arm]
            tta = "not reached" if s["tta_flops_mean"] is None else (
                f"TTA {s['tta_flops_mean'] / 1e12:.2f} TFLOP, {s['tta_cpu_seconds_mean']:.0f} s CPU "
                f"({s['tta_reached_seeds']} seeds)")
            print(f"{arm:>9}: test acc {s['test_accuracy_mean']:.2f} +- {s['test_accuracy_std']:.2f}, "
                  f"{s['examples_processed_mean']:.0f} examples, {s['train_wall_seconds_mean']:.0f} s wall, "
                  f"{s['train_cpu_seconds_mean']:.0f} s CPU, scoring {s['scoring_cpu_seconds_mean']:.0f} s CPU; {tta}")


if __name__ == "__main__":
    main()
