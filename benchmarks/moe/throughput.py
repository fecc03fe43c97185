"""Benchmark 2 of the MoE issue: training tokens per second, MoE vs dense with equal active parameters.

The equal-compute runs record tokens/s too, but each run takes minutes and anything else on the
machine during one of them skews the ratio. Here the two models train *interleaved*: blocks of
``--steps`` AdamW steps (forward, backward, optimiser, the MoE's auxiliary losses included),
alternating dense / MoE / dense / ..., on the same random batches; the ratio is the median over
``--blocks`` block pairs, so slow drifts of the machine cancel. Also: a dropless MoE and a
top-2 MoE, and the whole step measured at 1 and 2 threads.

Usage: python benchmarks/moe/throughput.py [--n-embd 128] [--n-layer 4] [--blocks 7] [--steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch

from benchmarks.common import RESULTS, machine
from leanscale.core.io import atomic_write_csv, atomic_write_json
from leanscale.models.transformer import GPT, GPTConfig
from leanscale.sparse import apply_moe, moe_aux_loss

VARIANTS = {
    "dense": None,
    "moe8-top1-cf1.25": {"n_experts": 8, "top_k": 1, "capacity_factor": 1.25},
    "moe8-top1-dropless": {"n_experts": 8, "top_k": 1, "capacity_factor": None},
    "moe8-top2-cf1.25": {"n_experts": 8, "top_k": 2, "capacity_factor": 1.25},
}


def build(args, kw):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=args.vocab, block_size=args.seq_len, n_layer=args.n_layer, n_head=args.n_embd // 8,
                    n_embd=args.n_embd, dropout=0.0, bias=False, tie_weights=True)
    model = GPT(cfg)
    if kw is not None:
        model = apply_moe(model, kw["n_experts"], every=2, top_k=kw["top_k"], capacity_factor=kw["capacity_factor"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, opt, kw is not None


def block(model, opt, is_moe, batches) -> float:
    t0 = time.perf_counter()
    for x in batches:
        _, loss = model(x, x)
        if is_moe:
            loss = loss + moe_aux_loss(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--blocks", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", default="2,1")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=g) for _ in range(args.steps)]
    tokens = args.steps * args.batch_size * args.seq_len
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        models = {name: build(args, kw) for name, kw in VARIANTS.items()}
        for m, o, moe in models.values():  # warm-up: allocator, kernels
            block(m, o, moe, batches[:2])
        times = {name: [] for name in VARIANTS}
        for _ in range(args.blocks):
            for name, (m, o, moe) in models.items():
                times[name].append(block(m, o, moe, batches))
        dense_tps = [tokens / t for t in times["dense"]]
        for name in VARIANTS:
            tps = [tokens / t for t in times[name]]
            ratios = [a / b for a, b in zip(tps, dense_tps)]
            rows.append({"threads": threads, "variant": name, "tokens_per_second_median": statistics.median(tps),
                         "ratio_to_dense_median": statistics.median(ratios), "ratio_min": min(ratios),
                         "ratio_max": max(ratios), "n_params": sum(p.numel() for p in models[name][0].parameters())})
            print(f"{threads} threads  {name:20s} {statistics.median(tps):8.0f} tokens/s  "
                  f"x{statistics.median(ratios):.3f} dense", flush=True)
    out = RESULTS / "moe"
    atomic_write_csv(out / "throughput.csv", rows)
    main_row = next(r for r in rows if r["threads"] == 2 and r["variant"] == "moe8-top1-cf1.25")
    atomic_write_json(out / "throughput.json", {
        "benchmark": "moe/throughput", "machine": machine(), "settings": vars(args), "rows": rows,
        "goal_tokens_per_second_ge_0.75x": main_row["ratio_to_dense_median"] >= 0.75,
        "main_ratio": main_row["ratio_to_dense_median"],
    })


if __name__ == "__main__":
    main()
