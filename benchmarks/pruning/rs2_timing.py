"""RS2 vs a static random subset, wall and CPU seconds, interleaved A/B on WordNet.

The fraction-kept benchmark (``fraction_kept.py --data wordnet``) records each run's training
seconds, but its static rows and its RS2 rows were trained on different days under different
loads, so their seconds do not compare. Here every arm trains back to back in each repetition
(the order reversed every other repetition, seed = repetition), single-threaded, at the
benchmark's settings (MLP 384-256-45 on MiniLM embeddings, 20,000 glosses, 5 epochs, batch 128,
LR 0.05):

* ``static-F``: a class-balanced random subset of a fraction F (``select(strategy="random")``);
* ``rs2-F``: all examples with ``sampler=RS2Sampler(n, ratio=F)`` (a fresh subset each epoch);
* ``full-1.0``: all examples.

Writes the min and median over repetitions to
``benchmarks/results/pruning/fraction_kept_wordnet-mlp-rs2-timing.json``.

Usage: python benchmarks/pruning/rs2_timing.py [--reps 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import RESULTS, machine  # noqa: E402

EPOCHS, BATCH, LR, WIDTH = 5.0, 128, 0.05, 256


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=7, help="repetitions of every arm (7)")
    args = ap.parse_args()

    import numpy as np
    import torch

    from leanscale.core.io import atomic_write_json
    from leanscale.models.cnn import MLPClassifier
    from leanscale.pruning._train import train_scoring_model
    from leanscale.pruning.datasets import load_pruning_data
    from leanscale.pruning.rs2 import RS2Sampler
    from leanscale.pruning.select import select

    torch.set_num_threads(1)
    data = load_pruning_data("wordnet", n_train=20000, n_test=5000)
    x, y = data.x_train, data.y_train
    n = len(y)

    def make():
        return MLPClassifier(384, WIDTH, data.n_classes)

    res: dict[str, list[tuple[float, float]]] = {}
    for rep in range(args.reps):
        arms = [("static", 0.7), ("rs2", 0.7), ("static", 0.3), ("rs2", 0.3), ("full", 1.0)]
        if rep % 2:
            arms = arms[::-1]
        for arm, f in arms:
            w0, c0 = time.perf_counter(), time.process_time()
            if arm == "static":
                idx = select(np.zeros(n), f, strategy="random", labels=y.numpy(), class_balance=True, seed=rep)
                train_scoring_model(make, x[idx], y[idx], epochs=EPOCHS, batch_size=BATCH, lr=LR, seed=rep)
            elif arm == "rs2":
                train_scoring_model(make, x, y, epochs=EPOCHS, batch_size=BATCH, lr=LR, seed=rep,
                                    sampler=RS2Sampler(n, ratio=f, seed=rep))
            else:
                train_scoring_model(make, x, y, epochs=EPOCHS, batch_size=BATCH, lr=LR, seed=rep)
            res.setdefault(f"{arm}-{f}", []).append((time.perf_counter() - w0, time.process_time() - c0))
    out = {k: {"wall_min": min(w for w, _ in v), "wall_median": statistics.median(w for w, _ in v),
               "cpu_min": min(c for _, c in v), "cpu_median": statistics.median(c for _, c in v), "reps": len(v)}
           for k, v in res.items()}
    blob = {"benchmark": "pruning/fraction_kept rs2 timing", "data": "wordnet", "n_train": n, "model": "mlp",
            "width": WIDTH, "epochs": EPOCHS, "batch_size": BATCH, "lr": LR, "threads": 1,
            "arms": {"static-F": "train_scoring_model on a class-balanced random subset of F (select, strategy='random')",
                     "rs2-F": "train_scoring_model on all examples with sampler=RS2Sampler(n, ratio=F)",
                     "full-1.0": "train_scoring_model on all examples"},
            "timings": out, "load_average_after": os.getloadavg(),
            "note": "interleaved A/B: each repetition runs every arm once back to back, the order reversed every "
                    "other repetition (seed = repetition); wall and CPU seconds of this process on 2 CPU cores "
                    "shared with other jobs (nice 5): min and median over repetitions. Measured because the train_s "
                    "of the rs2 rows in fraction_kept_wordnet-mlp-rs2.json were measured on another day and load "
                    "than the static rows.",
            "machine": machine()}
    print(json.dumps(out, indent=1))
    atomic_write_json(RESULTS / "pruning" / "fraction_kept_wordnet-mlp-rs2-timing.json", blob)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
