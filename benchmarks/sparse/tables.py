"""Print the markdown tables of the SWAT method card from the committed benchmark JSON files.

Usage: python benchmarks/sparse/tables.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.common import RESULTS
from leanscale.core.io import read_json


def accuracy_table(name: str) -> None:
    path = RESULTS / "sparse" / f"{name}.json"
    if not path.is_file():
        return
    d = read_json(path)
    print(f"### {name}.json: {d['model']}, {d['epochs']:g} epochs\n")
    print("| setting | sparsity | test accuracy (%) | vs dense (points) | training FLOPs | saved for backward, whole model "
          "| held by converted layers | s / epoch (in the run) |")
    print("|---|---|---|---|---|---|---|---|")
    for t in d["table"]:
        label = {"dense": "dense", "uniform": "SWAT-U", "erk": "SWAT-ERK"}[t["distribution"]]
        held = t["held_bytes_reduction_converted_layers"]
        print(f"| {label} | {t['sparsity']:.0%} | {t['test_accuracy_mean']:.2f} ± {t['test_accuracy_sd']:.2f} "
              f"| {-t['accuracy_drop_points']:+.2f} | -{t['training_flops_reduction']:.0%} "
              f"| -{t['saved_bytes_reduction_whole_model']:.0%} | {'-' if held is None else f'-{held:.0%}'} "
              f"| {t['seconds_per_epoch_mean']:.0f} |")
    print()


def step_table() -> None:
    path = RESULTS / "sparse" / "step_time.json"
    if not path.is_file():
        return
    d = read_json(path)
    print(f"### step_time.json ({d['threads']} threads, batch {d['batch']}, median of {d['steps_timed']} steps)\n")
    print("| model | setting | ms / step | x dense |")
    print("|---|---|---|---|")
    for r in d["rows"]:
        print(f"| {r['model']} | {r['setting']} | {r['step_ms']:.1f} | {r['ratio_vs_dense']:.2f} |")
    print()


def inference_table() -> None:
    path = RESULTS / "sparse" / "inference.json"
    if not path.is_file():
        return
    d = read_json(path)
    print(f"### inference.json ({d['threads']} threads)\n")
    print("| model | sparsity | batch | dense ms | CSR ms | CSR speed-up | file kB (pruned / dense) |")
    print("|---|---|---|---|---|---|---|")
    for r in d["rows"]:
        print(f"| {r['model']} | {r['sparsity']:.0%} | {r['batch']} | {r['dense_ms']:.3f} | {r['csr_ms']:.3f} "
              f"| {r['csr_speedup']:.2f}x | {r['pruned_file_bytes'] / 1e3:.0f} / {r['dense_file_bytes'] / 1e3:.0f} |")
    print("\nCSR faster from:", d["csr_faster_from_sparsity"], "\n")


if __name__ == "__main__":
    for name in ("swat_bncnn", "swat_mlp", "swat_bncnn_long10"):
        accuracy_table(name)
    step_table()
    inference_table()
