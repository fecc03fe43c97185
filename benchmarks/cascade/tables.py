"""Print the WordNet tables of the cascade method card from the committed benchmark JSON.

Usage: python benchmarks/cascade/tables.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.common import RESULTS
from leanscale.core.io import read_csv, read_json


def main() -> None:
    d = read_json(RESULTS / "cascade" / "wordnet.json")
    a, f, g, r, c = d["alone"], d["frontier"], d["guarantee"], d["router"], d["costs_seconds_per_request"]
    n = d["data"]
    print(f"WordNet glosses, {n['n_train']:,} training / {n['n_cal']:,} calibration / {n['n_test']:,} test "
          "(stratified, 45 classes).\n")
    print("| model alone | test accuracy | ms / request | requests / s |")
    print("|---|---|---|---|")
    print(f"| rules ({a['rules']['n_rules']} mined at min_precision {d['settings']['min_precision']}) | "
          f"{a['rules']['precision_test']:.2%} precision on the {a['rules']['coverage']:.1%} they cover | "
          f"{c['rules'] * 1e3:.3f} | |")
    print(f"| TF-IDF + logistic regression | {a['tfidf']['test_accuracy']:.2%} | {c['tfidf'] * 1e3:.3f} | "
          f"{1 / c['tfidf']:,.0f} |")
    print(f"| MiniLM + MLP head (no TF-IDF) | {a['minilm_mlp_without_tfidf']['test_accuracy']:.2%} | | |")
    print(f"| big: MiniLM + TF-IDF log-probs, MLP head | {a['big']['test_accuracy']:.2%} | {c['big'] * 1e3:.3f} | "
          f"{1 / c['big']:,.0f} |")
    m = f["measured"]
    print(f"| **cascade** (target: big's calibration accuracy - {d['settings']['slack']} points) | "
          f"{f['test_accuracy']:.2%} | {f['mean_cost_s_test'] * 1e3:.3f} | measured {m['cascade_requests_per_second']:,.0f} "
          f"vs big {m['big_requests_per_second']:,.0f} |")
    print()
    fr = ", ".join(f"{k} {v:.1%}" for k, v in f["answered_fraction_test"].items())
    print(f"Answered by each stage (test): {fr}. Thresholds: {f['thresholds']}. Frontier: "
          f"{f['frontier_points']} Pareto points out of {f['configurations_evaluated']:,} settings, exact: "
          f"{f['frontier_exact']}. Measured speed-up {m['speedup']:.2f}x at {f['accuracy_gap_points']:+.2f} points "
          f"(by cost: {f['speedup_by_cost']:.2f}x).\n")
    rows = read_csv(RESULTS / "cascade" / "wordnet_frontier.csv")
    big_acc, big_cost = a["big"]["test_accuracy"], c["big"]
    print("| points below the big model (test) | best speed-up on the frontier |")
    print("|---|---|")
    for gap in (0.0, 0.5, 1.0, 2.0, 3.0):
        ok = [float(x["test_cost_s"]) for x in rows if float(x["test_accuracy"]) >= big_acc - gap / 100]
        print(f"| <= {gap:.1f} | {big_cost / min(ok):.2f}x |" if ok else f"| <= {gap:.1f} | - |")
    print()
    print(f"Guarantee: target {g['target_accuracy']}, delta {g['delta']}, {g['splits']} splits, {g['refused']} refused; "
          f"met (pool) {g['fraction_meeting_target']}, met (test half) {g['fraction_meeting_target_on_test_half']}, "
          f"uncertified met (pool) {g['uncertified_fraction_meeting_target']}; cost {g['mean_cost_s_guaranteed'] * 1e3:.3f} "
          f"vs uncertified {g['mean_cost_s_uncertified'] * 1e3:.3f} ms (price {g['price_of_guarantee']:+.0%}).\n")
    print("| router features | APGR | CPT(50%) | CPT(80%) | random APGR | oracle APGR |")
    print("|---|---|---|---|---|---|")
    for k, v in r.items():
        print(f"| {k} | {v['apgr']:.3f} | {v['cpt_50']:.1%} | {v['cpt_80']:.1%} | {v['random']['apgr']:.3f} | "
              f"{v['oracle']['apgr']:.3f} |")

    distill_table()


def distill_table() -> None:
    """Sections 1c and 1d: the distilled cheap stages (``wordnet_distill*.json``) and the student
    middle stage (``wordnet_student*.json``, the same shape), where they have been run."""
    for pattern in ("wordnet_distill*.json", "wordnet_student*.json"):
        for path in sorted((RESULTS / "cascade").glob(pattern)):
            distill_run(path)


def distill_run(path: Path) -> None:
    d = read_json(path)
    a, c = d["alone"], d.get("configurations", {})
    print(f"\n{path.name}: {d['data']['unlabelled_pool']}.\n")
    load = d.get("load_average_during_costs", {}).get("before")
    print(f"Settings: {d['settings']}; load average before the costs: {load}.\n")
    print("| stage alone | test accuracy | agreement with big (test) | ms / request |")
    print("|---|---|---|---|")
    for k, v in a.items():
        agree = v.get("test_agreement_with_big")
        ms = v.get("seconds_per_request", d.get("costs_seconds_per_request", {}).get(k))
        print(f"| {k} | {v['test_accuracy']:.2%} | {'' if agree is None else f'{agree:.1%}'} | "
              f"{'' if ms is None else f'{ms * 1e3:.2f}'} |")
    print("\n| cascade (deferral) | test accuracy gap | answered (test) | speed-up by cost (min / median costs) | measured |")
    print("|---|---|---|---|---|")
    for k, v in c.items():
        fr = " / ".join(f"{x:.1%}" for x in v["answered_fraction_test"].values())
        m = v.get("measured")
        meas = f"{m['speedup_min']:.2f}x (median {m['speedup_median']:.2f}x)" if m else ""
        print(f"| {k} | {v['accuracy_gap_points']:.2f} points | {fr} | {v['speedup_by_cost']:.2f}x / "
              f"{v['speedup_by_median_cost']:.2f}x | {meas} |")


if __name__ == "__main__":
    main()
