"""Benchmark 2 of the SWAT issue: wall-clock of a training step on this CPU, dense vs SWAT.

The training runs of ``swat_accuracy.py`` time whole epochs, which other jobs on the machine
disturb; this script times single steps in isolation: for each setting, ``--warmup`` steps, then
the median of ``--steps`` timed steps (forward, backward, SGD update) on a fixed batch of 128
Fashion-MNIST-shaped inputs, in ``--threads`` threads. Seconds per epoch = median step x 468.

Usage: python benchmarks/sparse/step_time.py [--threads 2] [--steps 60]
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


def time_steps(model, x, y, warmup: int, steps: int) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 1, 28, 28, generator=g), torch.randint(0, 10, (128,), generator=g)
    rows = []
    for model_name in ("bncnn", "lenet-300-100"):
        dense_step = None
        for label, sparsity, kw in SETTINGS:
            torch.manual_seed(0)
            model = BNCNN(width=8) if model_name == "bncnn" else lenet_300_100()
            if kw is not None:
                apply_swat(model, sparsity, dense_first_layer=(model_name == "bncnn"), **kw)
            seconds = time_steps(model, x, y, args.warmup, args.steps)
            dense_step = dense_step or seconds
            rows.append({"model": model_name, "setting": label, "step_ms": 1e3 * seconds,
                         "seconds_per_epoch": seconds * STEPS_PER_EPOCH, "ratio_vs_dense": seconds / dense_step})
            print(f"{model_name:>14} {label:<30} {1e3 * seconds:7.1f} ms/step  {rows[-1]['ratio_vs_dense']:.2f}x dense",
                  flush=True)
    atomic_write_json(RESULTS / "sparse" / "step_time.json", {
        "benchmark": "swat_step_time", "machine": machine(), "threads": args.threads, "batch": 128,
        "steps_timed": args.steps, "warmup_steps": args.warmup, "rows": rows,
    })
    atomic_write_csv(RESULTS / "sparse" / "step_time.csv", rows)


if __name__ == "__main__":
    main()
