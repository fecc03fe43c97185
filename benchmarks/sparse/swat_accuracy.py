"""Benchmarks 1 and 2 of the SWAT issue: accuracy vs sparsity on Fashion-MNIST, with training
FLOPs, measured saved-for-backward memory and wall-clock per epoch on this CPU.

Raihan & Aamodt 2020 (arXiv 2001.01969): SWAT-U / SWAT-ERK at 0, 50, 70, 80, 90% sparsity
(weights in the forward, activations stored for backward), >= 3 seeds, for

* ``--model bncnn``: the BatchNorm CNN (BNCNN width 8; first conv dense, as in the paper);
* ``--model mlp``: LeNet-300-100 (784-300-100-10, ReLU; every layer SWAT: the first layer
  holds 88% of the weights, so keeping it dense would leave little to sparsify).

Per run: test accuracy; training FLOPs per example (the cost ledger's rules, SWAT's counted as
the paper does, on a batch of 128 in training mode); bytes saved for backward measured with
saved-tensor hooks on a batch of 128 (the whole model, and what the converted layers hold for
their own backward); seconds per epoch. Resumable: every run is a task JSON under
``benchmarks/results/sparse/swat_<model>/tasks``; run again after an interruption.

Usage: python benchmarks/sparse/swat_accuracy.py --model bncnn [--seeds 3] [--epochs 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import RESULTS, machine
from leanscale.core.io import JobState, atomic_write_csv, atomic_write_json
from leanscale.core.flops import count_flops
from leanscale.large_batch.train import (
    TrainConfig,
    build_model,
    load_image_data,
    train_classifier,
)
from leanscale.sparse import apply_swat, swat_layers, track_saved_tensors

SPARSITIES = (0.0, 0.5, 0.7, 0.8, 0.9)
DISTRIBUTIONS = ("uniform", "erk")
MEASURE_BATCH = 128


def lenet_300_100() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                         nn.Linear(100, 10))


def base_config(model: str, epochs: float, seed: int, n_train: int | None, width: int = 8) -> TrainConfig:
    # BNCNN: SGD momentum 0.9, LR 0.1 with cosine decay after 0.1 epoch of warmup, batch 128.
    # MLP: the same with LR 0.05 (0.1 diverges now and then without BatchNorm).
    return TrainConfig(model="bncnn" if model == "bncnn" else "mlp", width=width, lr=0.1 if model == "bncnn" else 0.05,
                       epochs=epochs, decay="cosine", warmup_epochs=0.1, milestones=(), seed=seed,
                       eval_every_epochs=epochs, n_train=n_train)


def build(model: str, cfg: TrainConfig, sparsity: float, distribution: str) -> nn.Module:
    torch.manual_seed(cfg.seed)
    net = build_model(cfg, (1, 28, 28), 10) if model == "bncnn" else lenet_300_100()
    if sparsity > 0:
        apply_swat(net, sparsity, distribution=distribution, dense_first_layer=(model == "bncnn"),
                   dense_last_layer=False)  # the numbers of the committed results: the head converted too
    return net


def measure(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """FLOPs and saved bytes of one training step on ``x`` (the model is left as it was)."""
    state = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    flops = count_flops(net, x)
    with track_saved_tensors(net) as saved:
        loss = F.cross_entropy(net(x), y)
    loss.backward()
    net.zero_grad(set_to_none=True)
    net.load_state_dict(state)
    names = [n for n, _ in swat_layers(net)]
    return {"flops_per_example_forward": flops.forward / len(x), "flops_per_example": flops.total / len(x),
            "saved_bytes": saved.total_bytes, "saved_bytes_by_module": saved.by_module,
            "held_bytes_by_module": saved.held_by_module, "swat_layers": names}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=("bncnn", "mlp"), default="bncnn")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=float, default=None, help="default: 2 (bncnn), 5 (mlp)")
    ap.add_argument("--n-train", type=int, default=None, help="stratified training subset (default: all 60,000)")
    ap.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)))
    ap.add_argument("--tag", default=None, help="results folder suffix")
    ap.add_argument("--width", type=int, default=8, help="BNCNN width (channels of the first conv)")
    ap.add_argument("--distributions", default=",".join(DISTRIBUTIONS))
    args = ap.parse_args()
    distributions = tuple(d for d in args.distributions.split(",") if d)
    epochs = args.epochs if args.epochs is not None else (2.0 if args.model == "bncnn" else 5.0)
    name = f"swat_{args.model}" + (f"_{args.tag}" if args.tag else "")
    out = RESULTS / "sparse" / name
    state = JobState(out)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    data = None
    for seed in range(args.seeds):
        for sparsity in sparsities:
            for distribution in distributions if sparsity > 0 else ("dense",):
                key = f"{distribution}-{sparsity}-seed{seed}"
                if state.is_done(key):
                    continue
                cfg = base_config(args.model, epochs, seed, args.n_train, args.width)
                if data is None:
                    data = load_image_data(cfg)
                net = build(args.model, cfg, sparsity, distribution)
                t0 = time.perf_counter()
                result = train_classifier(cfg, data=data, model=net, keep_model=True)
                seconds = time.perf_counter() - t0
                g = torch.Generator().manual_seed(7)
                idx = torch.randperm(len(data[1]), generator=g)[:MEASURE_BATCH]
                row = {"distribution": distribution, "sparsity": sparsity, "seed": seed,
                       "test_accuracy": result.test_accuracy, "train_seconds": seconds,
                       "seconds_per_epoch": result.seconds / epochs, "epochs": epochs, "steps": result.steps,
                       "config": result.to_dict()["config"], **measure(result.model, data[0][idx], data[1][idx])}
                state.save(key, row)
                print(f"{key}: {100 * result.test_accuracy:.2f}%  {row['seconds_per_epoch']:.0f} s/epoch  "
                      f"{row['flops_per_example'] / 1e6:.2f} MFLOP/example  {row['saved_bytes'] / 2**20:.2f} MiB saved",
                      flush=True)
    summarize(args.model, name, out, state, epochs, args.width)


def summarize(model: str, name: str, out: Path, state: JobState, epochs: float, width: int = 8) -> None:
    rows = [state.load(k) for k in state]
    dense = [r for r in rows if r["distribution"] == "dense"]
    if not dense:
        return
    d_acc = statistics.mean(100 * r["test_accuracy"] for r in dense)
    d_flops = statistics.mean(r["flops_per_example"] for r in dense)
    d_saved = statistics.mean(r["saved_bytes"] for r in dense)
    d_sec = statistics.mean(r["seconds_per_epoch"] for r in dense)
    swat_names = next((r["swat_layers"] for r in rows if r["swat_layers"]), [])
    d_held = statistics.mean(sum(r["held_bytes_by_module"].get(n, 0) for n in swat_names) for r in dense)
    table = []
    for distribution in ("dense", *DISTRIBUTIONS):
        for sparsity in sorted({r["sparsity"] for r in rows}):
            runs = [r for r in rows if r["distribution"] == distribution and r["sparsity"] == sparsity]
            if not runs:
                continue
            acc = [100 * r["test_accuracy"] for r in runs]
            held = statistics.mean(sum(r["held_bytes_by_module"].get(n, 0) for n in swat_names) for r in runs)
            table.append({
                "distribution": distribution, "sparsity": sparsity, "n_seeds": len(runs),
                "test_accuracy_mean": statistics.mean(acc),
                "test_accuracy_sd": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                "accuracy_drop_points": d_acc - statistics.mean(acc),
                "training_flops_per_example": statistics.mean(r["flops_per_example"] for r in runs),
                "training_flops_reduction": 1 - statistics.mean(r["flops_per_example"] for r in runs) / d_flops,
                "saved_bytes_whole_model": statistics.mean(r["saved_bytes"] for r in runs),
                "saved_bytes_reduction_whole_model": 1 - statistics.mean(r["saved_bytes"] for r in runs) / d_saved,
                "held_bytes_converted_layers": held,
                "held_bytes_reduction_converted_layers": 1 - held / d_held if d_held else None,
                "seconds_per_epoch_mean": statistics.mean(r["seconds_per_epoch"] for r in runs),
                "wall_clock_ratio_vs_dense": statistics.mean(r["seconds_per_epoch"] for r in runs) / d_sec,
            })
    at80 = {t["distribution"]: t for t in table if t["sparsity"] == 0.8}
    goals = {
        dist: {
            "accuracy_drop_points": t["accuracy_drop_points"], "goal_drop_le_1_point": t["accuracy_drop_points"] <= 1.0,
            "training_flops_reduction": t["training_flops_reduction"],
            "goal_flops_reduction_ge_70pct": t["training_flops_reduction"] >= 0.70,
            "saved_bytes_reduction_whole_model": t["saved_bytes_reduction_whole_model"],
            "held_bytes_reduction_converted_layers": t["held_bytes_reduction_converted_layers"],
            "goal_memory_reduction_ge_50pct_converted_layers": (t["held_bytes_reduction_converted_layers"] or 0) >= 0.5,
            "goal_memory_reduction_ge_50pct_whole_model": t["saved_bytes_reduction_whole_model"] >= 0.5,
        }
        for dist, t in at80.items()
    }
    blob = {
        "benchmark": name, "machine": machine(), "data": "Fashion-MNIST, 60,000 train / 10,000 test",
        "model": f"BNCNN(width={width}), first conv dense" if model == "bncnn" else "LeNet-300-100, every layer SWAT",
        "epochs": epochs, "measure_batch": MEASURE_BATCH, "threads": torch.get_num_threads(),
        "dense_test_accuracy": d_acc, "table": table, "goals_at_80pct": goals,
        "paper": "Raihan & Aamodt 2020: ResNet-50 on ImageNet, SWAT-U 80%: -1.63 points, 80% fewer training "
                 "FLOPs; backward memory -23 to -50% for activations and -50 to -90% for weights; "
                 "CIFAR-10 ResNet-18 at 90%: within ~1 point.",
    }
    atomic_write_json(RESULTS / "sparse" / f"{name}.json", blob)
    atomic_write_csv(RESULTS / "sparse" / f"{name}.csv", table, columns=list(table[0]))
    for t in table:
        print(f"{t['distribution']:>7} {t['sparsity']:.1f}: {t['test_accuracy_mean']:.2f} +- {t['test_accuracy_sd']:.2f}"
              f"  FLOPs -{100 * t['training_flops_reduction']:.0f}%  saved -{100 * t['saved_bytes_reduction_whole_model']:.0f}%"
              f" (layers -{100 * (t['held_bytes_reduction_converted_layers'] or 0):.0f}%)"
              f"  {t['seconds_per_epoch_mean']:.0f} s/epoch")


if __name__ == "__main__":
    main()
