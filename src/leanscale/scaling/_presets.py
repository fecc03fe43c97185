"""The sweep's executors and named presets: plain data, importable without torch (the CLI's
parser lists them without paying for ``import torch``)."""

from __future__ import annotations

from typing import Any

EXECUTORS = ("serial", "process", "ray")

# Named starting points; `--preset` on the command line. Throughput measured with train_run on
# this project's 2-core CPU (AMD EPYC, torch 2.13 CPU build, batch 32 x 128 tokens), in 6 N D
# FLOP/s: 1 thread 21 (33k params) to 43 GFLOP/s (840k); 2 threads 33 to 65 GFLOP/s. Two
# 1-thread processes beat one 2-thread process for these tiny models, hence the benchmark's
# executor. Corpus, not time, bounds the budgets: see SweepConfig.
PRESETS: dict[str, dict[str, Any]] = {
    # The defaults: 3 budgets over 10x x 5 sizes, 2.2e13 FLOPs: 11 minutes measured, serially
    # with 2 threads; every budget's loss minimum is inside its bracket.
    "default": {},
    # For the tour and smoke tests: 2 budgets x 3 sizes of 5k-41k parameters on the first
    # 600 kB of gcide, ~7 s. Too little text for the bracket to reach below the optimum: its
    # IsoFLOP curves fall towards the smallest model instead of having a minimum inside.
    "quick": dict(
        max_bytes=600_000, seq_len=32, budgets_flops=(4e9, 1.2e10), n_sizes=3,
        size_span=4.0, tokens_per_param=5.0, n_curve_points=5, val_batches=4,
    ),
    # The benchmark: 4 budgets over 32x x 5 sizes (6k-205k parameters), 2.9e13 FLOPs, 2 worker
    # processes: 21 minutes measured while another 2-process sweep shared the 2 cores (a version
    # with larger batches took 11.5 alone); every budget's loss minimum is inside its bracket.
    "benchmark": dict(
        budgets_flops=(1.25e11, 4e11, 1.25e12, 4e12), n_sizes=5, executor="process", n_workers=2,
    ),
}
