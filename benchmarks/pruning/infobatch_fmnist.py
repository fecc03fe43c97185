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

Resumable: one JSON task per (arm, seed) under benchmarks/results/pruning/infobatch/; run again
after an interruption. Results: benchmarks/results/pruning/infobatch.json and infobatch.csv.

Usage: python benchmarks/pruning/infobatch_fmnist.py [--seeds 2] [--epochs 8] [--width 8]
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
from leanscale.core.io import JobState, atomic_write_csv, atomic_write_json
from leanscale.data.fashion_mnist import fashion_mnist_tensors
from leanscale.models.cnn import BNCNN
from leanscale.pruning.infobatch import InfoBatch

ARMS = ("full", "infobatch")
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


def train(arm: str, seed: int, epochs: int, width: int, data) -> dict:
    x, y, x_test, y_test = data
    n = len(y)
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
        if ib is None:  # the baseline: a seeded shuffle of all examples
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
                      "examples": examples, "kept_this_epoch": len(order), "train_wall_seconds": wall})
        print(f"  {arm} seed {seed} epoch {epoch + 1}/{epochs}: kept {len(order)}, "
              f"test acc {curve[-1]['test_accuracy']:.4f}, {wall:.0f} s", flush=True)
    return {
        "arm": arm, "seed": seed, "epochs": epochs, "width": width, "train_wall_seconds": wall,
        "train_cpu_seconds": cpu, "infobatch_bookkeeping_seconds": bookkeeping, "examples_processed": examples,
        "optimizer_steps": steps, "full_data_examples": n * epochs, "test_accuracy": curve[-1]["test_accuracy"],
        "curve": curve, "fraction_skipped": 0.0 if ib is None else ib.fraction_skipped_,
        "history": [] if ib is None else ib.history_,
        "load_average_start": load_start, "load_average_end": os.getloadavg(),
    }


def summarize(rows: list[dict]) -> dict:
    by = {(r["arm"], r["seed"]): r for r in rows}
    seeds = sorted(s for (a, s) in by if a == "full" and ("infobatch", s) in by)
    if not seeds:
        return {}
    pairs = [(by[("full", s)], by[("infobatch", s)]) for s in seeds]

    def mean_std(values):
        values = list(values)
        return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    out = {"paired_seeds": seeds}
    for arm in ARMS:
        runs = [by[(arm, s)] for s in seeds]
        acc = mean_std(100 * r["test_accuracy"] for r in runs)
        out[arm] = {
            "test_accuracy_mean": acc[0], "test_accuracy_std": acc[1],
            "test_accuracies": [100 * r["test_accuracy"] for r in runs],
            "train_wall_seconds_mean": statistics.mean(r["train_wall_seconds"] for r in runs),
            "train_cpu_seconds_mean": statistics.mean(r["train_cpu_seconds"] for r in runs),
            "examples_processed_mean": statistics.mean(r["examples_processed"] for r in runs),
            "optimizer_steps_mean": statistics.mean(r["optimizer_steps"] for r in runs),
            "infobatch_bookkeeping_seconds_mean": statistics.mean(r["infobatch_bookkeeping_seconds"] for r in runs),
        }
    for key, name in (("examples_processed", "examples"), ("train_wall_seconds", "wall"),
                      ("train_cpu_seconds", "cpu")):
        saving = mean_std(100 * (1 - ib[key] / full[key]) for full, ib in pairs)
        out[f"saving_{name}_percent_mean"], out[f"saving_{name}_percent_std"] = saving
    diff = mean_std(100 * (ib["test_accuracy"] - full["test_accuracy"]) for full, ib in pairs)
    out["accuracy_infobatch_minus_full_points_mean"], out["accuracy_infobatch_minus_full_points_std"] = diff
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--n-train", type=int, default=None, help="training subset (default: all 60,000)")
    ap.add_argument("--out", type=Path, default=RESULTS / "pruning", help="folder of the results (smoke tests)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = args.out / "infobatch"
    state = JobState(out)
    config = {"epochs": args.epochs, "width": args.width, "n_train": args.n_train, "batch_size": BATCH,
              "peak_lr": PEAK_LR, "warmup_fraction": WARMUP, "schedule": "linear warm-up then cosine to 0, by "
              "fraction of epochs done", "momentum": MOMENTUM, "nesterov": True, "weight_decay": WEIGHT_DECAY,
              "prune_ratio": PRUNE_RATIO, "delta": DELTA, "torch_threads": 1}
    state.write_config(config)
    t_all = time.perf_counter()
    data = None
    for seed in range(args.seeds):
        for arm in ARMS:
            key = f"{arm}-e{args.epochs}-w{args.width}-n{args.n_train or 'all'}-seed{seed}"
            if state.is_done(key):
                continue
            if data is None:
                train_set = fashion_mnist_tensors("train", n=args.n_train)
                test_set = fashion_mnist_tensors("test")
                data = (train_set.x, train_set.y, test_set.x, test_set.y)
            print(f"{key}", flush=True)
            state.save(key, train(arm, seed, args.epochs, args.width, data))

    prefix = f"-e{args.epochs}-w{args.width}-n{args.n_train or 'all'}-"
    rows = [state.load(k) for k in state if prefix in k]
    summary = summarize(rows)
    atomic_write_csv(args.out / "infobatch.csv", [
        {k: v for k, v in r.items() if k not in ("curve", "history")} for r in sorted(rows, key=lambda r: (r["seed"], r["arm"]))
    ])
    atomic_write_json(args.out / "infobatch.json", {
        "benchmark": "infobatch_fmnist", "machine": machine(),
        "load_note": "2 CPU cores shared with 5 other jobs running at the same time (load average per run in "
                     "'runs'); wall seconds are noisy. Examples processed (forward + backward) is the "
                     "deterministic cost; CPU seconds of this single-threaded process are less load-sensitive.",
        "data": f"Fashion-MNIST, {args.n_train or 60000} train / 10,000 test",
        "model": f"BNCNN(width={args.width})", "config": config, "summary": summary,
        "paper": "Qin et al. 2024 (ICLR), Table 1: prune_ratio 0.5, delta 0.875 saved about 40% of the "
                 "overall cost on CIFAR-10/100 (ResNet-18/50) at unchanged accuracy (numbers not copied "
                 "here: see the paper).",
        "runs": rows, "wall_seconds_this_call": time.perf_counter() - t_all,
    })
    for arm in ARMS:
        if arm in summary:
            s = summary[arm]
            print(f"{arm:>9}: test acc {s['test_accuracy_mean']:.2f} +- {s['test_accuracy_std']:.2f}, "
                  f"{s['examples_processed_mean']:.0f} examples, {s['train_wall_seconds_mean']:.0f} s wall, "
                  f"{s['train_cpu_seconds_mean']:.0f} s CPU")
    if summary:
        print(f"saving: examples {summary['saving_examples_percent_mean']:.1f}%, wall "
              f"{summary['saving_wall_percent_mean']:.1f}%, CPU {summary['saving_cpu_percent_mean']:.1f}%; "
              f"accuracy difference {summary['accuracy_infobatch_minus_full_points_mean']:+.2f} points")


if __name__ == "__main__":
    main()
