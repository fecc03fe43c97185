"""Benchmark 2 of the SWAT issue: wall-clock of a training step on this CPU, dense vs SWAT.

The training runs of ``swat_accuracy.py`` time whole epochs, which other jobs on the machine
disturb; this script times single steps (forward, backward, SGD update) on a fixed batch of 128
Fashion-MNIST-shaped inputs, in ``--threads`` threads. All settings of a model are built first
and timed *interleaved*: ``--rounds`` rounds, each running ``--steps`` steps of every setting in
turn, so a slow phase of the (shared) machine hits all settings alike. Reported: the median step
time over all rounds, and the median over rounds of each round's ratio to dense. Seconds per
epoch = median step x 468.

Usage: python benchmarks/sparse/step_time.py [--threads 2] [--rounds 6] [--steps 10]
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

from benchmarks.common import RESULTS, machine
from benchmarks.sparse.swat_accuracy import lenet_300_100
from leanscale.core.io import atomic_write_csv, atomic_write_json
from leanscale.models import BNCNN
from leanscale.sparse import apply_swat

SETTINGS = [  # (label, sparsity, apply_swat keyword arguments)
    ("dense", 0.0, None),
    ("SWAT-U 50%", 0.5, {}),
    ("SWAT-U 80%", 0.8, {}),
    ("SWAT-U 90%", 0.9, {}),
    ("SWAT-ERK 80%", 0.8, {"distribution": "erk"}),
    ("SWAT-U 80%, topk_period=100", 0.8, {"topk_period": 100}),
    ("SWAT-U 80%, structured", 0.8, {"structured": True}),
    ("SWAT-U 80%, no CompactReLU", 0.8, {"compact_relu": False}),
]
STEPS_PER_EPOCH = 60000 // 128


def make_step(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def time_block(step, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per setting and round")
    ap.add_argument("--warmup", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 1, 28, 28, generator=g), torch.randint(0, 10, (128,), generator=g)
    rows = []
    for model_name in ("bncnn", "lenet-300-100"):
        steps = {}
        for label, sparsity, kw in SETTINGS:
            torch.manual_seed(0)
            model = BNCNN(width=8) if model_name == "bncnn" else lenet_300_100()
            if kw is not None:
                apply_swat(model, sparsity, dense_first_layer=(model_name == "bncnn"), dense_last_layer=False, **kw)
            steps[label] = make_step(model, x, y)
            time_block(steps[label], args.warmup)
        times = {label: [] for label in steps}
        ratios = {label: [] for label in steps}
        for _ in range(args.rounds):
            block = {label: statistics.median(time_block(step, args.steps)) for label, step in steps.items()}
            for label in steps:
                times[label].append(block[label])
                ratios[label].append(block[label] / block["dense"])
        for label in steps:
            seconds = statistics.median(times[label])
            rows.append({"model": model_name, "setting": label, "step_ms": 1e3 * seconds,
                         "seconds_per_epoch": seconds * STEPS_PER_EPOCH,
                         "ratio_vs_dense": statistics.median(ratios[label]),
                         "ratio_min": min(ratios[label]), "ratio_max": max(ratios[label])})
            print(f"{model_name:>14} {label:<30} {1e3 * seconds:7.1f} ms/step  {rows[-1]['ratio_vs_dense']:.2f}x dense "
                  f"({rows[-1]['ratio_min']:.2f}-{rows[-1]['ratio_max']:.2f})", flush=True)
    atomic_write_json(RESULTS / "sparse" / "step_time.json", {
        "benchmark": "swat_step_time", "machine": machine(), "threads": args.threads, "batch": 128,
        "steps_timed": args.steps * args.rounds, "rounds": args.rounds, "warmup_steps": args.warmup, "rows": rows,
    })
    atomic_write_csv(RESULTS / "sparse" / "step_time.csv", rows)


if __name__ == "__main__":
    main()
