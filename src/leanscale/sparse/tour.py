"""The tour's chapter on SWAT sparse training, and the README headline from the benchmarks."""

from __future__ import annotations

from leanscale.core.registry import read_result

__all__ = ["chapter", "headline"]

_MAIN_BENCHMARK = "swat_bncnn.json"


def chapter(ctx):
    import torch

    from leanscale.core.measure import measure
    from leanscale.data.fashion_mnist import fashion_mnist_tensors
    from leanscale.models.cnn import BNCNN
    from leanscale.report.chapter import ChapterResult
    from leanscale.sparse import apply_swat
    from leanscale.sparse.report import swat_report
    from leanscale.train import param_groups, seeded
    from leanscale.train.classifier import fit_classifier

    report = ctx.report
    report.add_paragraph(
        "Dense training multiplies every weight with every activation, twice more in the backward pass. "
        "SWAT (Raihan & Aamodt 2020) uses only the top-K weights by magnitude in the forward pass and keeps "
        "only the top-K activations for the weight gradient, stored compactly; the weight gradient stays "
        "dense so pruned weights can grow back. On ResNet-50/ImageNet it removed 80% of the training FLOPs "
        "for 1.63 points of accuracy."
    )
    # quick: 6,000 images, 2 epochs (~90 steps); full: 20,000 images, 3 epochs. BNCNN width 8, first
    # conv dense. SWAT needs steps: with fewer, pruned weights have no time to regrow (method card).
    n_train, epochs = (6000, 2.0) if ctx.quick else (20000, 3.0)
    sparsity = 0.8
    train = fashion_mnist_tensors("train", n=n_train, seed=ctx.seed)
    test = fashion_mnist_tensors("test", n=2000, seed=0)
    data = (train.x, train.y, test.x, test.y)
    rows, measured = [], {}
    for label in ctx.progress(["dense", f"SWAT-U {sparsity:.0%}"], desc="sparse: training"):
        with seeded(ctx.seed):
            model = BNCNN(10, in_channels=1, width=8)
        if label != "dense":
            apply_swat(model, sparsity)
        model.train()
        # SGD, momentum 0.9, weight decay 5e-4, LR 0.1 with a 0.1-epoch warmup and a cosine (the
        # large-batch chapter's baseline); one evaluation at the end
        optimizer = torch.optim.SGD(param_groups(model, 5e-4), lr=0.1, momentum=0.9)
        with measure("cpu", interval_seconds=0.01) as m:
            result = fit_classifier(model, data, optimizer, batch_size=128, epochs=epochs, lr=0.1, seed=ctx.seed,
                                    decay="cosine", milestones=(), warmup_epochs=0.1, eval_every_epochs=epochs,
                                    technique="sparse")
        measured[label] = model
        rows.append({"model": label, "test accuracy": result.test_accuracy, "seconds": result.seconds,
                     "steps": result.steps})
        if ctx.ledger is not None:
            ctx.ledger.record(f"sparse: train {label}", flops=result.flops_per_example * result.examples,
                              seconds=result.seconds, n_examples=int(result.examples),
                              peak_memory_bytes=m.peak_memory_bytes, memory_method=m.method,
                              compare=f"sparse: SWAT-U {sparsity:.0%} vs dense (BNCNN)",
                              side="baseline" if label == "dense" else "technique")
    dense_model, swat_model = measured["dense"], measured[f"SWAT-U {sparsity:.0%}"]
    step = swat_report(dense_model, swat_model, data[0][:128])
    t = step["total"]
    rows[0].update({"training MFLOP / example": t["train_flops_dense"] / t["batch"] / 1e6,
                    "MB saved for backward (batch 128)": t["saved_bytes_dense"] / 1e6})
    rows[1].update({"training MFLOP / example": t["train_flops_swat"] / t["batch"] / 1e6,
                    "MB saved for backward (batch 128)": t["saved_bytes_swat"] / 1e6})
    report.add_section(f"BNCNN on {n_train:,} Fashion-MNIST images, dense vs SWAT-U {sparsity:.0%}", level=3)
    report.add_table(rows, caption=f"{epochs:g} epoch(s) each; FLOPs from the cost ledger's rules (SWAT's as the "
                     "paper counts them), memory measured with saved-tensor hooks on one step")
    report.add_preformatted(step["text"])
    flops_cut = 1 - t["train_flops_swat"] / t["train_flops_dense"]
    held_cut = 1 - t["held_bytes_converted_swat"] / t["held_bytes_converted_dense"]
    report.add_paragraph(
        f"With {rows[0]['steps']} steps SWAT trails dense by more than in the benchmark below (3 epochs of "
        "all 60,000 images): the weights it prunes need updates to grow back. "
        f"The converted layers hold {held_cut:.0%} fewer bytes for backward, the whole model "
        f"{1 - t['saved_bytes_swat'] / t['saved_bytes_dense']:.0%}: BatchNorm and max-pooling keep their dense "
        "inputs. On this CPU SWAT is slower per step than dense: the FLOPs it removes are inside dense "
        "kernels that still run at full size (see the method card)."
    )
    moe_rows = _moe_section(ctx)
    summary = [{"metric": f"SWAT-U {sparsity:.0%} vs dense, test accuracy ({n_train:,} images)",
                "value": f"{100 * rows[1]['test accuracy']:.1f}% vs {100 * rows[0]['test accuracy']:.1f}%",
                "paper": "ResNet-50/ImageNet: -1.63 points"},
               {"metric": "training FLOPs removed (one step)", "value": f"{flops_cut:.0%}", "paper": "80%"}]
    bench = read_result("sparse", _MAIN_BENCHMARK)
    if bench is not None:
        g = bench["goals_at_80pct"]
        for dist, r in g.items():
            summary.append({"metric": f"benchmark: SWAT-{'U' if dist == 'uniform' else 'ERK'} 80%, full Fashion-MNIST",
                            "value": f"{-r['accuracy_drop_points']:+.2f} points, FLOPs -{r['training_flops_reduction']:.0%}, "
                                     f"layer memory -{r['held_bytes_reduction_converted_layers']:.0%}",
                            "paper": "goal: <= 1 point, >= 70% FLOPs, >= 50% memory"})
    return ChapterResult(title="Sparse activation: SWAT and mixture of experts", summary_rows=summary + moe_rows)


def _moe_section(ctx) -> list[dict]:
    """Dense GPT vs the same GPT with every second MLP turned into 8 top-1 experts, same tokens."""
    import numpy as np

    from leanscale.core.measure import measure
    from leanscale.data.text import TokenStream, encode_corpus
    from leanscale.models.transformer import GPT, GPTConfig
    from leanscale.sparse import apply_moe, moe_aux_loss, moe_stats
    from leanscale.train import seeded
    from leanscale.train.lm import train_lm

    report = ctx.report
    report.add_section("Mixture of experts: 8x the MLP parameters, the same FLOPs per token", level=3)
    report.add_paragraph(
        "A router sends each token to one of 8 expert MLPs (Switch Transformer, Fedus et al. 2021): the "
        "layer holds 8x the parameters of the MLP it replaces, but each token pays for one expert plus the "
        "router. A load-balancing loss keeps the experts evenly used; tokens beyond an expert's capacity "
        "are dropped (the residual connection carries them)."
    )
    # quick: a 2-layer, 32-wide GPT on the first 600 kB of Webster 1913 for 200k tokens; full: 4 layers,
    # 64 wide, 500k tokens (244 steps, ~65 s for both runs on 2 cores; 1.5M tokens took 3x that, the
    # full tour has a 600-s budget). Every second MLP becomes an MoE (Switch's layout).
    n_layer, n_embd, n_tokens, seq = (2, 32, 200_000, 64) if ctx.quick else (4, 64, 500_000, 128)
    tokens = encode_corpus("gcide", 512, max_bytes=600_000 if ctx.quick else None)
    stream = TokenStream(np.asarray(tokens), 0.05)
    cfg = GPTConfig(vocab_size=512, block_size=seq, n_layer=n_layer, n_head=n_embd // 8, n_embd=n_embd)
    n_params = GPT(cfg).n_params()
    batch_size = 16
    rows, stats = [], {}
    for label in ctx.progress(["dense", "MoE, 8 experts, top-1"], desc="sparse: MoE"):
        moe = label != "dense"
        last = {}

        def aux(model, last=last):
            last["stats"] = moe_stats(model)
            return moe_aux_loss(model)

        with seeded(ctx.seed):
            model = GPT(cfg)
            if moe:
                model = apply_moe(model, 8, every=2)
        # the sweep's optimisation (AdamW, warmup + cosine to 10%, clipping at 1)
        with measure("cpu", interval_seconds=0.01) as m:
            run = train_lm(model, stream, n_steps=n_tokens // (batch_size * seq), batch_size=batch_size,
                           seq_len=seq, lr=5e-3 * (32 / n_embd) ** 1.5, seed=ctx.seed,
                           extra_loss=aux if moe else None, label=label)
        stats[label] = last.get("stats")
        rows.append({"model": label, "parameters": model.n_params(), "validation loss": run.loss,
                     "tokens / s": run.n_tokens / run.seconds, "seconds": run.seconds})
        if ctx.ledger is not None:
            ctx.ledger.record(f"sparse: GPT {label}", flops=6.0 * n_params * run.n_tokens,
                              seconds=run.seconds, n_examples=int(run.n_tokens),
                              peak_memory_bytes=m.peak_memory_bytes, memory_method=m.method,
                              compare="sparse: MoE, 8 experts top-1, vs dense GPT (equal FLOPs per token)",
                              side="technique" if moe else "baseline")
    report.add_table(rows, caption=f"{n_tokens:,} tokens each, same optimiser and seed; the MoE's FLOPs per token "
                     "are the dense model's plus the router's")
    layers = stats["MoE, 8 experts, top-1"] or []
    if layers:
        report.add_paragraph(
            "Expert load at the last step (max / mean, 1 = perfectly even): "
            + ", ".join(f"{r['name']}: {r['max_over_mean_load']:.2f}, MaxVio {r['max_vio']:.2f} "
                        f"({r['dropped_fraction']:.0%} dropped)" for r in layers)
            + ". Short runs start unbalanced: the balancing loss needs steps to spread the tokens."
        )
    dense, moe_row = rows
    out = [{"metric": "MoE (8 experts, top-1) vs dense GPT, validation loss",
            "value": f"{moe_row['validation loss']:.3f} vs {dense['validation loss']:.3f} "
                     f"({moe_row['parameters'] / dense['parameters']:.1f}x parameters)",
            "paper": "Switch: lower loss at equal FLOPs"},
           {"metric": "MoE tokens / s vs dense", "value": f"{moe_row['tokens / s'] / dense['tokens / s']:.2f}x",
            "paper": "goal >= 0.75x"}]
    bench = read_result("moe", "equal_compute.json")
    if bench is not None:
        g = bench["goals"]
        if g.get("steps_ratio_mean") is not None:
            out.append({"metric": "benchmark: MoE steps to the dense model's final loss",
                        "value": f"{g['steps_ratio_mean']:.2f}x", "paper": "goal <= 0.6x"})
    return out


def headline(results_root=None) -> str:
    """One line for the README table, from the committed benchmark results."""
    bench = read_result("sparse", _MAIN_BENCHMARK, results_root)
    if bench is None:
        return ""
    g = bench["goals_at_80pct"].get("uniform")
    if not g:
        return ""
    return (f"SWAT-U 80% on Fashion-MNIST (BNCNN): {-g['accuracy_drop_points']:+.2f} points, training FLOPs "
            f"-{g['training_flops_reduction']:.0%}, backward memory of the converted layers "
            f"-{g['held_bytes_reduction_converted_layers']:.0%} (whole model -{g['saved_bytes_reduction_whole_model']:.0%})")
