"""Benchmark 2 of the large-batch issue: McCandlish et al. 2018 (arXiv 1812.06162) on
Fashion-MNIST with the BatchNorm CNN.

For batch sizes 32 ... 4096 (powers of two) train to a target test accuracy (the mean of the last
3 evaluations, taken at steps growing by 8%, so that the fluctuations of constant-LR SGD do not
decide the crossing) and record the steps S
and examples E = B S it took, with the learning rate tuned per batch size (the best of a small
grid: the previous batch's best LR x sqrt(2), twice and half that, extended while the best is at
an edge; at most 5 LRs per batch). Fit the paper's trade-off (S/S_min - 1)(E/E_min - 1) = 1, i.e.
S(B) = S_min + E_min / B, by least squares on log S; B_crit = E_min / S_min. Compare with
B_simple = tr(Sigma) / |G|^2 measured by GradientNoiseScale on the batch-128 run early in training
(10% of the steps it needed) and near the target.

Every model uses Ghost BatchNorm with ghost batches of 32, so the normalization (and hence the
function being trained) is the same at every batch size and only the gradient noise changes;
micro-batches of 256 make large steps faster on a CPU without changing them.

Resumable: one JSON task per (batch size, LR) under benchmarks/results/large_batch/critical_batch/.
Usage: python benchmarks/large_batch/critical_batch.py [--target 0.80] [--width 8]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import numpy as np
import torch.nn.functional as F

from benchmarks.common import RESULTS, machine
from leanscale.core.io import JobState, atomic_write_json
from leanscale.large_batch.train import TrainConfig, load_image_data, train_classifier

BATCHES = tuple(2**k for k in range(5, 13))  # 32 ... 4096
GHOST, MICRO = 32, 256


def run_config(batch: int, lr: float, args, max_examples: int) -> TrainConfig:
    return TrainConfig(
        width=args.width, batch_size=batch, lr=lr, decay="none", milestones=(), epochs=args.max_epochs,
        n_test=args.n_test, ghost_batch_size=GHOST, micro_batch_size=min(batch, MICRO), threads=args.threads,
        target_accuracy=args.target, eval_growth=1.08, target_smoothing=3, max_examples=max_examples, seed=0,
    )


def fit_tradeoff(batches: np.ndarray, steps: np.ndarray) -> dict:
    """Least squares of log S = log(S_min + E_min / B) over (log S_min, log E_min)."""
    from scipy.optimize import least_squares

    def resid(p):
        return np.log(np.exp(p[0]) + np.exp(p[1]) / batches) - np.log(steps)

    start = np.log([steps.min() / 2, (batches * steps).min() / 2])
    sol = least_squares(resid, start, method="lm")
    s_min, e_min = np.exp(sol.x)
    return {"s_min": float(s_min), "e_min": float(e_min), "b_crit": float(e_min / s_min),
            "rms_log_residual": float(np.sqrt(np.mean(sol.fun**2)))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", type=float, default=0.80)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--max-epochs", type=float, default=20.0)
    ap.add_argument("--noise-batches", type=int, default=40)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = ap.parse_args()
    out = RESULTS / "large_batch" / "critical_batch"
    state = JobState(out)
    data = load_image_data(TrainConfig(n_test=args.n_test))
    t_all = time.perf_counter()

    best: dict[int, dict] = {}
    guess = 0.025  # LR to try first at the smallest batch; then the previous batch's best x sqrt(2)
    for batch in BATCHES:
        # Runs already done for this batch (also from an earlier grid) count as tried.
        tried: dict[float, dict] = {}
        for key in state:
            if key.startswith(f"B{batch}-lr"):
                row = state.load(key)
                tried[row["config"]["lr"]] = row
        candidates = [lr for lr in (guess, guess * 2, guess / 2) if not any(math.isclose(lr, t) for t in tried)]
        while candidates:
            lr = candidates.pop(0)
            key = f"B{batch}-lr{lr:.4g}"
            cap = int(args.max_epochs * len(data[1]))
            done = [r["examples"] for r in tried.values() if r["reached_target"]]
            if done:
                cap = min(cap, 2 * min(done))  # a worse LR need not run longer than 2x the best
            result = train_classifier(run_config(batch, lr, args, cap), data=data)
            row = result.to_dict()
            state.save(key, row)
            print(f"{key}: steps to {args.target:.0%} = {result.steps_to_target} ({result.seconds:.0f} s)", flush=True)
            tried[lr] = row
            ok = {k: v for k, v in tried.items() if v["steps_to_target"] is not None}
            if ok and not candidates:
                best_lr = min(ok, key=lambda k: ok[k]["steps_to_target"])
                lrs = sorted(tried)
                # extend the grid while the best LR is at its edge (at most 5 LRs per batch)
                if best_lr == lrs[0] and len(tried) < 5:
                    candidates.append(best_lr / 2)
                elif best_lr == lrs[-1] and len(tried) < 5 and best_lr < 3.2:
                    candidates.append(best_lr * 2)
        ok = {k: v for k, v in tried.items() if v["steps_to_target"] is not None}
        if not ok:
            print(f"B={batch}: no learning rate reached the target", flush=True)
            continue
        best_lr = min(ok, key=lambda k: ok[k]["steps_to_target"])
        guess = best_lr * math.sqrt(2)
        best[batch] = {"batch_size": batch, "lr": best_lr, "steps": ok[best_lr]["steps_to_target"],
                       "examples": ok[best_lr]["steps_to_target"] * batch, "seconds": ok[best_lr]["seconds"],
                       "lrs_tried": sorted(tried)}

    b = np.array(sorted(best), dtype=float)
    s = np.array([best[int(x)]["steps"] for x in b])
    fit = fit_tradeoff(b, s)
    rng = np.random.default_rng(0)
    boot = []
    for _ in range(1000):
        idx = rng.integers(0, len(b), len(b))
        if len(set(idx)) < 3:
            continue
        try:
            boot.append(fit_tradeoff(b[idx], s[idx])["b_crit"])
        except (ValueError, np.linalg.LinAlgError):  # a degenerate resample
            continue
    fit["b_crit_low"], fit["b_crit_high"] = (float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5)))

    # B_simple on the batch-128 run, at 10% of its steps to target ("early") and at the target.
    from leanscale.large_batch.noise_scale import measure_noise_scale

    noise_rows = []
    ref = best.get(128)
    if ref is not None:
        for label, frac in (("early (10% of steps)", 0.10), ("25% of steps", 0.25), ("at target", 1.0)):
            key = f"noise-{frac}"
            if state.is_done(key):
                noise_rows.append(state.load(key))
                continue
            steps = max(1, round(frac * ref["steps"]))
            cfg = run_config(128, ref["lr"], args, steps * 128)
            cfg = TrainConfig(**{**cfg.__dict__, "target_accuracy": None, "eval_growth": None,
                                 "epochs": steps * 128 / len(data[1]), "eval_every_epochs": steps * 128 / len(data[1])})
            trained = train_classifier(cfg, data=data, keep_model=True)
            res = measure_noise_scale(trained.model, F.cross_entropy, (data[0], data[1]),
                                      batch_size=128, n_batches=args.noise_batches)
            row = {"label": label, "fraction_of_steps": frac, "step": steps, "b_simple": float(res.b_simple),
                   "test_accuracy": trained.test_accuracy}
            state.save(key, row)
            noise_rows.append(row)
            print(f"B_simple {label}: {res.b_simple:.0f}", flush=True)
    early = next((r["b_simple"] for r in noise_rows if r["fraction_of_steps"] == 0.10), None)
    ratio = None if early is None else max(early / fit["b_crit"], fit["b_crit"] / early)
    atomic_write_json(RESULTS / "large_batch" / "critical_batch.json", {
        "benchmark": "critical_batch", "machine": machine(), "target_accuracy": args.target,
        "model": f"BNCNN(width={args.width}) with Ghost BatchNorm 32", "n_test": args.n_test,
        "per_batch": [best[k] for k in sorted(best)], "fit": fit, "b_simple": noise_rows,
        "b_simple_early_over_b_crit_factor": ratio, "goal_factor": 3.0,
        "paper": "McCandlish et al. 2018: B_crit and B_noise agree within roughly an order of magnitude "
                 "across tasks; B_simple approximates B_noise when the Hessian is well conditioned.",
        "wall_seconds_this_call": time.perf_counter() - t_all,
    })
    print(fit, noise_rows, ratio)


if __name__ == "__main__":
    main()
