"""Benchmark 3 of the large-batch issue: training throughput (examples/s) per batch size on this
machine, and one 2-process ``torchrun`` (gloo) run against the same run in one process.

Model: BNCNN(width=8) on Fashion-MNIST-shaped inputs, SGD with momentum. For each batch size
32 ... 4096: plain BatchNorm in one forward, and Ghost BatchNorm (ghost 128 where the batch
allows) with micro-batches of 256 (the same step, in pieces that stay in cache). Then
``leanscale batch train`` on 8,192 training images, batch 1024, in 1 process and under
``torchrun --nproc_per_node=2``. Run it on a quiet machine: the numbers are wall-clock.

Usage: python benchmarks/large_batch/throughput.py [--seconds 4]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch
import torch.nn.functional as F

from benchmarks.common import RESULTS, machine
from leanscale.core.io import atomic_write_json
from leanscale.large_batch.ghost_bn import (
    accumulate_running_stats,
    apply_ghost_batchnorm,
)
from leanscale.models.cnn import BNCNN


def examples_per_second(batch: int, ghost: int | None, micro: int | None, seconds: float) -> float:
    torch.manual_seed(0)
    model = BNCNN(width=8)
    if ghost is not None:
        apply_ghost_batchnorm(model, ghost)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))

    def step():
        opt.zero_grad()
        if micro is None or micro >= batch:
            F.cross_entropy(model(x), y).backward()
        else:
            with accumulate_running_stats(model):
                for xb, yb in zip(x.split(micro), y.split(micro)):
                    (F.cross_entropy(model(xb), yb) * len(yb) / batch).backward()
        opt.step()

    step()  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += batch
    return n / (time.perf_counter() - t0)


def torchrun_comparison(tmp: Path) -> dict:
    common = ["batch", "train", "--batch", "1024", "--base-batch", "128", "--regime", "0",
              "--epochs", "2", "--set", "n_train=8192", "--set", "n_test=1000", "--set", "width=8",
              "--json"]
    out = {}
    env = {**os.environ, "LEANSCALE_NO_PROGRESS": "1"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, prefix, extra_env in (
        ("1 process (2 threads)", [sys.executable, "-m", "leanscale.cli.main"], {}),
        ("torchrun, 2 processes x 1 thread (gloo)",
         [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
          "-m", "leanscale.cli.main"], {"OMP_NUM_THREADS": "1"}),
    ):
        path = tmp / f"{len(out)}.json"
        t0 = time.perf_counter()
        subprocess.run([*prefix, *common, "--out", str(path)], check=True, capture_output=True, text=True,
                       env={**env, **extra_env})
        wall = time.perf_counter() - t0
        blob = json.loads(path.read_text())
        out[name] = {"wall_seconds": wall, "train_seconds": blob["seconds"], "examples": blob["examples"],
                     "examples_per_second": blob["examples"] / blob["seconds"], "world_size": blob["world_size"],
                     "test_accuracy": blob["test_accuracy"], "train_loss": blob["train_loss"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=4.0)
    args = ap.parse_args()
    rows = []
    for k in range(5, 13):
        batch = 2**k
        plain = examples_per_second(batch, None, None, args.seconds)
        ghost = min(128, batch)
        gbn = examples_per_second(batch, ghost, 256, args.seconds)
        rows.append({"batch_size": batch, "plain_bn_examples_per_second": plain,
                     "ghost_bn_micro256_examples_per_second": gbn, "ghost_batch_size": ghost})
        print(f"B={batch:5d}: {plain:7.0f} ex/s plain BN, {gbn:7.0f} ex/s Ghost BN {ghost} + micro-batches of 256",
              flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        ddp = torchrun_comparison(Path(tmp))
    for name, r in ddp.items():
        print(f"{name}: {r['examples_per_second']:.0f} ex/s, accuracy {r['test_accuracy']:.4f}")
    atomic_write_json(RESULTS / "large_batch" / "throughput.json", {
        "benchmark": "throughput", "machine": machine(), "model": "BNCNN(width=8), 1x28x28 inputs, SGD momentum",
        "torch_threads": torch.get_num_threads(), "per_batch": rows, "torchrun": ddp,
    })


if __name__ == "__main__":
    main()
