"""Bring your own model: upcycle a small Llama-style LM (Hugging Face, built from a config) into a
mixture of experts and compare it with the dense model trained on, at equal steps and FLOPs.

Komatsuzaki et al. (2022, "Sparse Upcycling", arXiv 2212.05055) start the experts as copies of a
trained dense MLP and continue training; the upcycled model starts exactly where the dense one
is and, with top-1 routing, costs about the same FLOPs per token. Here, on Webster 1913:

1. train the dense model for ``--dense-steps`` steps (leanscale's engine, ``train_lm``: AdamW,
   warmup + cosine, clipping);
2. from that checkpoint, continue three ways for ``--steps`` steps each with the same schedule:
   dense; upcycled with 8 experts, top-1 (every second MLP); upcycled with 8 experts, top-2;
3. record the validation curves, the training FLOPs per token of each (the cost ledger's rules on
   one validation batch: active experts only, and tokens over an expert's capacity -- factor 1.25
   -- are not computed, so a top-1 MoE can cost a little less than the dense model) and, at step
   0, that the top-2 upcycled model (no token dropped) computes the dense model's loss.

Usage: python benchmarks/byo/moe_upcycling.py [--dense-steps 1200 --steps 1000 --threads 1]
Writes benchmarks/results/byo/moe_upcycling.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, machine  # noqa: E402


class CausalLM(nn.Module):
    """An HF causal LM behind the engine's convention ``model(x, y) -> (logits, mean loss)``."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, x, y=None):
        logits = self.hf(input_ids=x).logits  # (B, T, V)
        loss = None if y is None else F.cross_entropy(logits.flatten(0, 1), y.flatten())
        return logits, loss


def build(vocab: int, seq: int, seed: int) -> CausalLM:
    from transformers import LlamaConfig, LlamaForCausalLM

    from leanscale.train import seeded

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=172, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=seq)
    with seeded(seed):
        return CausalLM(LlamaForCausalLM(cfg))


def flops_per_token(model: nn.Module, x: torch.Tensor) -> float:
    from leanscale.core.flops import count_flops

    return count_flops(model, x).total / x.numel()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dense-steps", type=int, default=1200)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-bytes", type=int, default=4_000_000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from leanscale.data.text import TokenStream, encode_corpus
    from leanscale.sparse import apply_moe, moe_aux_loss
    from leanscale.train.lm import train_lm, validation_loss

    vocab = 512
    stream = TokenStream(np.asarray(encode_corpus("gcide", vocab, max_bytes=args.max_bytes)), 0.05)
    kw = dict(batch_size=args.batch_size, seq_len=args.seq, lr=args.lr, n_curve_points=8, val_batches=16)
    t0 = time.perf_counter()
    dense = build(vocab, args.seq, args.seed)
    pre = train_lm(dense, stream, n_steps=args.dense_steps, seed=args.seed, **kw)
    print(f"dense pretraining: {args.dense_steps} steps, val loss {pre.loss:.4f} ({pre.seconds:.0f} s)", flush=True)

    x_probe = next(iter(stream.val_batches(args.batch_size, args.seq, 1)))[0]
    runs = {}
    for name, n_experts, top_k in (("dense", None, None), ("moe_8x_top1", 8, 1), ("moe_8x_top2", 8, 2)):
        model = copy.deepcopy(dense)
        extra = None
        start_loss = None
        if n_experts is not None:
            if top_k == 2:  # exactness: copied experts, renormalised top-2 gates, nothing dropped
                exact = copy.deepcopy(dense)
                apply_moe(exact, n_experts, every=2, top_k=2, init="copy", capacity_factor=None)
                start_loss = validation_loss(exact, stream, args.batch_size, args.seq, 16)
            apply_moe(model, n_experts, every=2, top_k=top_k, init="copy")
            extra = moe_aux_loss
        model.eval()
        fpt = flops_per_token(model, x_probe)
        model.train()
        run = train_lm(model, stream, n_steps=args.steps, seed=args.seed + 1, extra_loss=extra, label=name, **kw)
        runs[name] = {
            "n_params": sum(p.numel() for p in model.parameters()),
            "train_flops_per_token": fpt,
            "val_loss": run.loss,
            "curve": run.curve,
            "seconds": run.seconds,
            "tokens_per_second": run.n_tokens / run.seconds,
            "val_loss_at_start_no_drop": start_loss,
        }
        print(f"{name:12s} val loss {run.loss:.4f}  params {runs[name]['n_params']:,}  "
              f"FLOPs/token {fpt:,.0f}  {run.seconds:.0f} s", flush=True)

    d = runs["dense"]
    goals = {
        "dense_val_loss_before_upcycling": pre.loss,
        "upcycled_top2_start_equals_dense": abs(runs["moe_8x_top2"]["val_loss_at_start_no_drop"] - pre.loss),
        "top1_loss_minus_dense": runs["moe_8x_top1"]["val_loss"] - d["val_loss"],
        "top1_flops_ratio": runs["moe_8x_top1"]["train_flops_per_token"] / d["train_flops_per_token"],
        "top2_loss_minus_dense": runs["moe_8x_top2"]["val_loss"] - d["val_loss"],
        "top2_flops_ratio": runs["moe_8x_top2"]["train_flops_per_token"] / d["train_flops_per_token"],
    }
    out = RESULTS / "byo" / "moe_upcycling.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": "MoE upcycling of a Hugging Face Llama-style model on Webster 1913",
              "settings": vars(args), "pretraining": {"val_loss": pre.loss, "curve": pre.curve},
              "runs": runs, "goals": goals, "machine": machine(),
              "seconds_total": time.perf_counter() - t0}
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(goals, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
