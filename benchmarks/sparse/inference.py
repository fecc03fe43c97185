"""Inference after SWAT on this CPU: dense matrix products vs CSR kernels (:func:`to_sparse_kernels`)
and checkpoint sizes (:func:`save_pruned`), at 0-99% weight sparsity.

Models: LeNet-300-100 (784-300-100-10) and a wide MLP (1024-1024-1024-10); weights pruned by
magnitude (the SWAT top-K) of a random initialisation: speed does not depend on the values.
Latency: median of ``--repeats`` timed calls after warm-up, batch 1 and batch 128, in
``torch.get_num_threads()`` threads. Prints and writes ``benchmarks/results/sparse/inference.json``.

Usage: python benchmarks/sparse/inference.py [--repeats 200]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch
from torch import nn

from benchmarks.common import RESULTS, machine
from leanscale.core.io import atomic_write_csv, atomic_write_json
from leanscale.sparse import save_pruned, to_sparse_kernels, topk_threshold

SPARSITIES = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
MODELS = {"lenet-300-100": (784, 300, 100, 10), "mlp-1024": (1024, 1024, 1024, 10)}


def build(widths: tuple[int, ...], sparsity: float) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers).eval()
    if sparsity > 0:
        with torch.no_grad():
            for m in model:
                if isinstance(m, nn.Linear):
                    m.weight.mul_(m.weight.abs() >= topk_threshold(m.weight, 1 - sparsity))
    return model


def latency(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        for _ in range(max(5, repeats // 10)):
            model(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, widths in MODELS.items():
            for sparsity in SPARSITIES:
                dense = build(widths, sparsity)
                dense_file = Path(tmp) / "dense.pt"
                torch.save(dense.state_dict(), dense_file)
                pruned_file = save_pruned(dense, Path(tmp) / "pruned.pt")
                csr = to_sparse_kernels(build(widths, sparsity), min_sparsity=0.0)
                for batch in (1, 128):
                    x = torch.randn(batch, widths[0])
                    t_dense, t_csr = latency(dense, x, args.repeats), latency(csr, x, args.repeats)
                    rows.append({"model": name, "sparsity": sparsity, "batch": batch,
                                 "dense_ms": 1e3 * t_dense, "csr_ms": 1e3 * t_csr, "csr_speedup": t_dense / t_csr,
                                 "dense_file_bytes": dense_file.stat().st_size,
                                 "pruned_file_bytes": pruned_file.stat().st_size})
                    r = rows[-1]
                    print(f"{name:>14} {sparsity:4.2f} batch {batch:3d}: dense {r['dense_ms']:.3f} ms, "
                          f"CSR {r['csr_ms']:.3f} ms ({r['csr_speedup']:.2f}x); file {r['pruned_file_bytes'] / 1e3:.0f} kB "
                          f"vs {r['dense_file_bytes'] / 1e3:.0f} kB", flush=True)
    # the smallest sparsity from which CSR is faster at every larger sparsity, per model and batch
    break_even = {}
    for name in MODELS:
        for batch in (1, 128):
            rs = sorted((r for r in rows if r["model"] == name and r["batch"] == batch), key=lambda r: r["sparsity"])
            wins = [r["csr_speedup"] > 1 for r in rs]
            first = next((i for i in range(len(rs)) if all(wins[i:])), None)
            break_even[f"{name}/batch{batch}"] = None if first is None else rs[first]["sparsity"]
    atomic_write_json(RESULTS / "sparse" / "inference.json", {
        "benchmark": "sparse_inference", "machine": machine(), "threads": torch.get_num_threads(),
        "repeats": args.repeats, "rows": rows, "csr_faster_from_sparsity": break_even,
    })
    atomic_write_csv(RESULTS / "sparse" / "inference.csv", rows)
    print("CSR faster from sparsity:", break_even)


if __name__ == "__main__":
    main()
