"""The tour's chapter on data pruning, and the README headline from the benchmarks."""

from __future__ import annotations

import functools
import time

from leanscale.core.registry import read_result

__all__ = ["chapter", "headline"]

_MAIN_BENCHMARK = "fraction_kept_fashion-mnist-mlp.json"


def _accuracy(model, x, y) -> float:
    from leanscale.pruning.scores import collect_probs

    return float((collect_probs(model, x, batch_size=2048).argmax(1) == y.numpy()).mean())


def chapter(ctx):
    from leanscale.core.flops import count_flops
    from leanscale.core.measure import measure
    from leanscale.models.cnn import MLPClassifier
    from leanscale.pruning._train import train_scoring_model
    from leanscale.pruning.datasets import load_pruning_data
    from leanscale.pruning.pruner import DataPruner
    from leanscale.pruning.select import select
    from leanscale.report.chapter import ChapterResult

    report = ctx.report
    report.add_paragraph(
        "Not every example teaches a model the same amount. Paul et al. (2021) score each example by how "
        "wrong an early model still is (EL2N) and prune the easy ones; Sorscher et al. (2022) showed that "
        "with a good score, error can fall faster than a power law in data set size, that one should keep "
        "the hard examples when data is abundant and the easy ones when it is scarce, and that a label-free "
        "score (distance to a k-means prototype in a self-supervised embedding) does as well as the "
        "supervised ones."
    )
    # quick: 2,000 images, 3 epochs; full: 10,000 images, 6 epochs. An MLP (784-256-10) keeps it fast.
    n_train, n_test, epochs = (2000, 1000, 3.0) if ctx.quick else (10000, 2000, 6.0)
    keep = 0.5
    data = load_pruning_data("fashion-mnist", n_train=n_train, n_test=n_test, seed=ctx.seed)
    x, y = data.x_train, data.y_train
    make_model = functools.partial(MLPClassifier, 784, 256, data.n_classes)
    flops_per_example = count_flops(make_model().eval(), x[:1]).total * 3  # forward + backward ~ 3x forward

    # the cost ledger's figure sets scoring + training on the kept half next to training on all data
    compare = f"pruning: EL2N scoring + train on the hardest {keep:.0%} vs all data"
    t0 = time.perf_counter()
    with measure("cpu", interval_seconds=0.01) as m:
        pruner = DataPruner(metric="el2n", keep=keep, strategy="hard", model_fn=make_model, score_epochs=1.0,
                            n_seeds=2, seed=ctx.seed, lr=0.05).fit(x, y.numpy())
    score_s = time.perf_counter() - t0
    score_examples = 2 * 1.0 * n_train
    if ctx.ledger is not None:
        ctx.ledger.record("pruning: EL2N scoring (2 seeds x 1 epoch)", flops=flops_per_example * score_examples,
                          seconds=score_s, n_examples=int(score_examples), peak_memory_bytes=m.peak_memory_bytes,
                          memory_method=m.method, compare=compare, side="technique")
    subsets = [
        ("all data", None),
        (f"random {keep:.0%}", select(pruner.scores_, keep, strategy="random", labels=y.numpy(), seed=ctx.seed)),
        (f"EL2N, hardest {keep:.0%}", pruner.kept_indices_),
        (f"EL2N, easiest {keep:.0%}", select(pruner.scores_, keep, strategy="easy", labels=y.numpy())),
    ]
    report.add_section(f"Prune half of {n_train:,} Fashion-MNIST images with EL2N", level=3)
    rows = []
    for label, idx in ctx.progress(subsets, desc="pruning: training"):
        xs, ys = (x, y) if idx is None else (x[idx], y[idx])
        t0 = time.perf_counter()
        with measure("cpu", interval_seconds=0.01) as m:
            model = train_scoring_model(make_model, xs, ys, epochs=epochs, lr=0.05, seed=ctx.seed)
        seconds = time.perf_counter() - t0
        examples = epochs * len(ys)
        rows.append({"training set": label, "examples": len(ys), "epochs": epochs,
                     "test accuracy": _accuracy(model, data.x_test, data.y_test),
                     "training GFLOPs": flops_per_example * examples / 1e9, "seconds": seconds})
        if ctx.ledger is not None:
            side = {"all data": "baseline", f"EL2N, hardest {keep:.0%}": "technique"}.get(label)
            ctx.ledger.record(f"pruning: train on {label}", flops=flops_per_example * examples, seconds=seconds,
                              n_examples=int(examples), peak_memory_bytes=m.peak_memory_bytes,
                              memory_method=m.method, **({"compare": compare, "side": side} if side else {}))
    report.add_table(rows, caption=f"MLP 784-256-10, {epochs:g} epochs on each set; scoring cost "
                     f"{score_examples / (epochs * n_train):.0%} of one full-data run")
    report.add_paragraph(
        f"Keeping {keep:.0%}, DataPruner(strategy='auto') keeps the hardest examples: our benchmarks on "
        "Fashion-MNIST and WordNet found keep-hard better from 50% kept up and keep-easy better from 30% "
        "down (Sorscher et al.'s crossover), so 'auto' switches at 40% (AUTO_MIN_FRACTION) and writes its "
        f"reason into the manifest. With only {n_train:,} images and {epochs:g} epochs every subset is "
        "short of data, so the gaps here are larger than in the full benchmark below."
    )

    summary = [{"metric": f"test accuracy, EL2N-hard {keep:.0%} vs all data ({n_train:,} images)",
                "value": f"{100 * rows[2]['test accuracy']:.1f}% vs {100 * rows[0]['test accuracy']:.1f}%",
                "paper": "Paul et al.: half of CIFAR-10 at no loss"}]
    d = read_result("pruning", _MAIN_BENCHMARK)
    if d is not None:
        from leanscale.pruning.figures import fraction_kept_figure

        report.add_section("The benchmark: all of Fashion-MNIST, six metrics, keep hard and easy", level=3)
        report.add_figure(fraction_kept_figure(d), caption=(
            f"{d['model'].upper()} on {d['n_train']:,} images, {d['epochs']:g} epochs per run, {d['seeds']} seeds "
            f"(benchmarks/results/pruning/{_MAIN_BENCHMARK})"))
        g = d["goals"]
        if g.get("pruned_fraction_within_0.3_points") is not None:
            best = g["most_pruned_within_0.3_points"]
            summary.append({"metric": "benchmark: most data pruned within 0.3 points of full data",
                            "value": f"{g['pruned_fraction_within_0.3_points']:.0%} ({best['metric']}, {best['strategy']})",
                            "paper": "goal >= 30%"})
        if g.get("ssl_gap_at_70pct_points") is not None:
            summary.append({"metric": "benchmark: self-supervised prototypes vs best label metric at 70% kept",
                            "value": f"{g['ssl_gap_at_70pct_points']:+.2f} points behind",
                            "paper": "Sorscher: matches; goal <= 1"})
    al = read_result("pruning", "active_learning.json")
    if al is not None:
        for name, r in _best_active(al).items():
            summary.append({"metric": f"benchmark: active learning ({r['strategy']}), labels to 95% of full "
                            f"accuracy, {name}", "value": f"{r['ratio_vs_random']:.2f}x fewer than random",
                            "paper": "goal >= 2x"})
    ib = read_result("pruning", "infobatch.json")
    if ib is not None:
        s = ib["summary"]
        summary.append({"metric": "benchmark: InfoBatch on Fashion-MNIST, examples processed saved",
                        "value": f"{s['saving_examples_percent_mean']:.0f}% at "
                                 f"{s['accuracy_infobatch_minus_full_points_mean']:+.2f} points",
                        "paper": "Qin et al.: ~40% saved, lossless"})
    return ChapterResult(title="Data pruning", summary_rows=summary)


def _best_active(blob) -> dict:
    """Per data set, the strategy needing the fewest labels (its ratio vs random sampling)."""
    best = {}
    for name, res in blob.get("results", {}).items():
        rows = [r for r in res.get("summary", []) if r["strategy"] != "random" and r.get("ratio_vs_random")]
        if rows:
            best[name] = max(rows, key=lambda r: r["ratio_vs_random"])
    return best


def headline(results_root=None) -> str:
    """One line for the README table, from the committed benchmark results."""
    parts = []
    bench = read_result("pruning", _MAIN_BENCHMARK, results_root)
    if bench is not None:
        g = bench["goals"]
        if g.get("pruned_fraction_within_0.3_points") is not None:
            best = g["most_pruned_within_0.3_points"]
            parts.append(f"Fashion-MNIST: {g['pruned_fraction_within_0.3_points']:.0%} pruned within 0.3 points "
                         f"({best['metric']}, {best['strategy']})")
        if g.get("ssl_gap_at_70pct_points") is not None:
            gap = g["ssl_gap_at_70pct_points"]  # best label-using accuracy minus the label-free one
            side = "below" if gap >= 0 else "above"
            parts.append(f"label-free prototypes {abs(gap):.1f} points {side} the best label-using score at 70% kept")
    al = read_result("pruning", "active_learning.json", results_root)
    if al is not None:
        best = _best_active(al)
        if best:
            parts.append("active learning, labels to 95% of full accuracy vs random: " + ", ".join(
                f"{r['strategy']} {r['ratio_vs_random']:.2f}x fewer ({name})" for name, r in best.items()))
    return "; ".join(parts) if parts else "benchmarks not run yet"
