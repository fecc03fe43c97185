"""The tour's chapter on large batches, and the README headline from the benchmarks."""

from __future__ import annotations

import time

from leanscale.core.registry import read_result

__all__ = ["chapter", "headline"]


def _accuracy_figure(rows):
    from leanscale.report.figures import new_figure

    fig, ax = new_figure(width=5.5, height=3.0)
    labels = [r["run"] for r in rows]
    values = [100 * r["test accuracy"] for r in rows]
    ax.barh(labels[::-1], values[::-1], color=["#888888"] + ["#4477aa"] * (len(rows) - 1))
    lo = min(values) - 5
    ax.set_xlim(max(0, lo), 100)
    ax.set_xlabel("test accuracy (%)")
    for y, v in enumerate(values[::-1]):
        ax.text(v, y, f" {v:.1f}", va="center", fontsize=8)
    return fig


def chapter(ctx):
    import torch.nn.functional as F

    from leanscale.core.measure import measure
    from leanscale.large_batch.noise_scale import measure_noise_scale
    from leanscale.large_batch.recipe import LargeBatchRecipe
    from leanscale.large_batch.train import (
        TrainConfig,
        load_image_data,
        train_classifier,
    )
    from leanscale.report.chapter import ChapterResult

    report = ctx.report
    report.add_paragraph(
        "Bigger batches cut wall-clock time with data parallelism, but trained naively they take fewer "
        "updates and generalize worse (Keskar et al. 2017). Hoffer et al. (2017) closed the gap with a "
        "square-root LR rule, Ghost BatchNorm and regime adaptation (\"train longer\"); McCandlish et al. "
        "(2018) showed the gradient noise scale predicts the largest useful batch."
    )
    # quick: 2,048 images x 2 epochs, batch 512 (4x); full: 12,000 x 1 epoch, batch 1024 (8x).
    n_train, n_test, epochs, large = (2048, 500, 2.0, 512) if ctx.quick else (12000, 2000, 1.0, 1024)
    small = 128
    base = TrainConfig(width=8, n_train=n_train, n_test=n_test, batch_size=small, lr=0.1, epochs=epochs,
                       seed=ctx.seed, eval_every_epochs=epochs)
    data = load_image_data(base)
    recipe = LargeBatchRecipe(batch_size=large, base_batch_size=small, base_lr=base.lr, base_epochs=epochs)
    naive = TrainConfig(**{**base.__dict__, "batch_size": large})
    fixed = recipe.train_config(base)
    fixed = TrainConfig(**{**fixed.__dict__, "micro_batch_size": 256})  # same step, faster on a CPU
    runs = [("batch 128 (small batch)", base), (f"batch {large}, same epochs and LR", naive),
            (f"batch {large} + sqrt LR + Ghost BN + regime adaptation", fixed)]
    report.add_section(f"Small batch vs large batch on Fashion-MNIST ({n_train:,} training images)", level=3)
    rows, results = [], []
    # the cost ledger's figure sets the recipe's run next to the small batch's
    compare = f"large_batch: batch {large} + recipe vs batch {small}"
    sides = {runs[0][0]: "baseline", runs[2][0]: "technique"}
    for label, cfg in ctx.progress(runs, desc="large_batch: training"):
        t0 = time.perf_counter()
        with measure("cpu", interval_seconds=0.01) as m:
            result = train_classifier(cfg, data=data, keep_model=label.startswith("batch 128"))
        results.append(result)
        rows.append({"run": label, "batch": cfg.batch_size, "lr": cfg.lr, "epochs": cfg.epochs,
                     "updates": result.steps, "test accuracy": result.test_accuracy,
                     "seconds": time.perf_counter() - t0})
        if ctx.ledger is not None:
            tag = {"compare": compare, "side": sides[label]} if label in sides else {}
            ctx.ledger.record(f"large_batch: {label}", flops=result.flops_per_example * result.examples,
                              seconds=result.seconds, n_examples=result.examples,
                              peak_memory_bytes=m.peak_memory_bytes, memory_method=m.method,
                              updates=result.steps, **tag)
    report.add_table(rows, caption="Same model, same data; the last run follows LargeBatchRecipe")
    report.add_figure(_accuracy_figure(rows), caption="Test accuracy of the three runs")
    report.add_preformatted(recipe.describe())

    report.add_section("How large a batch? The gradient noise scale", level=3)
    import warnings

    with warnings.catch_warnings():  # an unreliable estimate is reported in the text below
        warnings.simplefilter("ignore", RuntimeWarning)
        measured = measure_noise_scale(results[0].model, F.cross_entropy, (data[0], data[1]), batch_size=64,
                                       n_batches=10 if ctx.quick else 30)
    b_simple, b_simple_reliable = float(measured.b_simple), measured.reliable
    value = f"{b_simple:.0f}" if b_simple_reliable else f"no reliable estimate ({measured.warning})"
    report.add_paragraph(
        f"B_simple = tr(Sigma)/|G|^2 of the small-batch model, measured from {10 if ctx.quick else 30} batches of "
        f"64, at the end of its training: {value}. McCandlish et al.: below it, doubling the batch "
        f"nearly halves the steps; above it, extra examples buy few steps. It grows as training proceeds "
        f"(the gradient shrinks faster than its noise), so a measurement after the LR drops is larger than "
        f"one early in training."
    )
    d = read_result("large_batch", "critical_batch.json")
    if d is not None:
        measured = ", ".join(f"{r['b_simple']:.0f} {r['label']}" for r in d.get("b_simple", []))
        report.add_paragraph(
            f"The benchmark (critical_batch.json): B_crit = {d['fit']['b_crit']:.0f} from steps and examples "
            f"to {d['target_accuracy']:.0%} test accuracy at batch sizes 32-4096; B_simple {measured}."
        )
    gap_naive = rows[0]["test accuracy"] - rows[1]["test accuracy"]
    gap_fixed = rows[0]["test accuracy"] - rows[2]["test accuracy"]
    summary = [
        {"metric": f"accuracy gap, batch {large} vs 128, naive", "value": f"{100 * gap_naive:.1f} points",
         "paper": "Hoffer: a gap of several points"},
        {"metric": f"accuracy gap, batch {large} vs 128, with the recipe", "value": f"{100 * gap_fixed:.1f} points",
         "paper": "Hoffer: closed"},
        {"metric": "B_simple of the small-batch model",
         "value": f"{b_simple:.0f}" if b_simple_reliable else "unreliable", "paper": "McCandlish: ~B_crit"},
    ]
    table1 = read_result("large_batch", "hoffer_table1.json")
    if table1 is not None:
        gap = table1.get("gap_sb_minus_all_fixes_points")
        if gap is not None:
            summary.append({"metric": "benchmark: gap with all fixes, batch 2048 vs 128, 3 seeds",
                            "value": f"{gap:.2f} points", "paper": "goal <= 0.3"})
    return ChapterResult(title="Large batches", summary_rows=summary)


def headline(results_root=None) -> str:
    """One line for the README table, from the committed benchmark results."""
    parts = []
    d = read_result("large_batch", "hoffer_table1.json", results_root)
    if d is not None:
        by = {r["column"]: r for r in d["table"]}
        if "SB" in by and "+RA" in by and "LB" in by:
            parts.append(f"Fashion-MNIST, batch 2048 vs 128: {by['LB']['test_accuracy_mean']:.1f}% naive, "
                         f"{by['+RA']['test_accuracy_mean']:.1f}% with all fixes vs {by['SB']['test_accuracy_mean']:.1f}% "
                         f"({by['SB']['n_seeds']} seeds)")
    d = read_result("large_batch", "critical_batch.json", results_root)
    if d is not None:
        early = next((r["b_simple"] for r in d.get("b_simple", []) if r["fraction_of_steps"] == 0.1), None)
        text = f"B_crit {d['fit']['b_crit']:.0f}"
        if early is not None:
            text += f" vs B_simple {early:.0f}"
        parts.append(text)
    return "; ".join(parts) if parts else "benchmarks not run yet"
