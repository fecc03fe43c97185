"""Print the method card's benchmark tables (markdown) from the committed pruning results.

Usage: python benchmarks/pruning/tables.py [fraction_kept_fashion-mnist-mlp.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results" / "pruning"
NAMES = {"random": "random", "el2n": "EL2N", "grand": "GraNd", "forgetting": "forgetting",
         "ssl_prototypes": "self-sup. prototypes", "sup_prototypes": "sup. prototypes", "rs2": "RS2 (new subset per epoch)",
         "pca_prototypes": "PCA prototypes", "rp_prototypes": "random-projection prototypes"}


def fraction_kept_table(blob: dict) -> str:
    fracs = sorted({r["fraction"] for r in blob["summary"]}, reverse=True)
    head = "| metric | keep | " + " | ".join(f"{f:.0%}" for f in fracs) + " |"
    lines = [head, "|---|---|" + "---|" * len(fracs)]
    full = blob["full_data_accuracy_mean"] * 100
    sd = (blob.get("full_data_accuracy_sd") or 0) * 100
    lines.append(f"| all data | — | {full:.2f} ± {sd:.2f} (100%) " + "| " * (len(fracs) - 1) + "|")
    rows = {}
    for r in blob["summary"]:
        rows.setdefault((r["metric"], r["strategy"]), {})[r["fraction"]] = r
    best = {f: max((r for r in blob["summary"] if r["fraction"] == f), key=lambda r: r["test_accuracy_mean"])
            for f in fracs}
    for (metric, strategy), by in sorted(rows.items(), key=lambda kv: (list(NAMES).index(kv[0][0])
                                                                       if kv[0][0] in NAMES else 99, kv[0][1])):
        cells = []
        for f in fracs:
            r = by.get(f)
            if r is None:
                cells.append("")
                continue
            text = f"{100 * r['test_accuracy_mean']:.2f}"
            if r.get("test_accuracy_sd") is not None:
                text += f" ± {100 * r['test_accuracy_sd']:.2f}"
            if r is best[f]:
                text = f"**{text}**"
            cells.append(text)
        lines.append(f"| {NAMES.get(metric, metric)} | {strategy} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cost_table(blob: dict) -> str:
    lines = ["| metric | seconds per seed | seeds | fraction of one full run (total) |", "|---|---|---|---|"]
    for name, c in blob["scoring_cost"].items():
        lines.append(f"| {NAMES.get(name, name)} | {c['seconds_per_seed']:.1f} | {c['seeds']} | "
                     f"{c['fraction_of_full_run_total']:.2f} |")
    return "\n".join(lines)


def tta_table(blob: dict) -> str:
    """Time-to-accuracy (issue #17): scoring + one training run, for the rows that reach the target."""
    tta = blob.get("tta")
    if not tta:
        return ""
    lines = [f"Target: {100 * tta['target_accuracy']:.2f}% (full data - {tta['drop_points']:g} point)", "",
             "| metric | keep | fraction | accuracy | scoring FLOPs / full run | time-to-accuracy FLOPs / full run | "
             "scoring s | train s |", "|---|---|---|---|---|---|---|---|"]
    full = blob["full_run_flops"]
    for r in sorted(blob["summary"], key=lambda r: (-r["fraction"], r.get("tta_flops") or float("inf"))):
        if "reaches_tta_target" not in r or r["fraction"] not in (0.9, 0.7, 0.5, 0.3):
            continue
        sf = "n/a" if r["scoring_flops"] is None else f"{r['scoring_flops'] / full:.3f}"
        tf = ("not reached" if not r["reaches_tta_target"] else "n/a" if r["tta_flops"] is None
              else f"**{r['tta_flops'] / full:.2f}**")
        ss = "n/a" if r["scoring_s"] is None else f"{r['scoring_s']:.1f}"
        lines.append(f"| {NAMES.get(r['metric'], r['metric'])} | {r['strategy']} | {r['fraction']:.0%} | "
                     f"{100 * r['test_accuracy_mean']:.2f} | {sf} | {tf} | {ss} | {r['train_s_mean']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    paths = [Path(p) for p in sys.argv[1:]] or sorted(RESULTS.glob("fraction_kept_*.json"))
    for p in paths:
        blob = json.loads(p.read_text())
        print(f"### {p.name}\n")
        print(fraction_kept_table(blob))
        print()
        print(cost_table(blob))
        print()
        if blob.get("tta"):
            print(tta_table(blob))
            print()
        print(json.dumps(blob["goals"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
