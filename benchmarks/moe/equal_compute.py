"""Benchmarks 1-3 of the MoE issue: a small GPT on Webster 1913 (gcide), dense vs mixture of
experts with the same active parameters per token.

Runs (same tokens, same optimiser settings, same seed; ``train_run`` of the scaling package):

* ``dense``: GPT(n_layer, n_embd) with a 4x MLP in every block;
* ``moe``: the same with every second MLP replaced by 8 experts of the same size, top-1 routing
  (Switch), capacity factor 1.25, load-balancing loss 0.01, z-loss 1e-3 — one expert per token,
  so the FLOPs per token are the dense model's plus the router's;
* ``moe_no_balance``: the same without the load-balancing loss (what the loss buys);
* ``moe_balance_0.1``: a 10x larger balancing coefficient (what more balance costs in loss).

Recorded: validation-loss curves against tokens, training FLOPs (cost ledger, per active expert)
and wall time; tokens per second; every ``--stats-every`` steps each MoE layer's max/mean expert
load (MaxVio = max/mean - 1) and dropped fraction (``balance.py`` compares the balancing
methods). Goals: the MoE reaches the dense model's final validation loss in <= 0.6x its steps;
MoE tokens/s >= 0.75x dense; max/mean load <= 1.2 after warm-up with the loss. Resumable per
run (``benchmarks/results/moe/equal_compute/tasks``).

Usage: python benchmarks/moe/equal_compute.py [--tokens 3e6] [--n-embd 128] [--n-layer 4] [--seeds 1]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import numpy as np
import torch

from benchmarks.common import RESULTS, machine
from leanscale.core.flops import count_flops
from leanscale.core.io import JobState, atomic_write_json
from leanscale.data.text import TokenStream, encode_corpus
from leanscale.models.transformer import GPT
from leanscale.scaling._train import RunSpec, model_config, train_run
from leanscale.sparse import apply_moe, moe_aux_loss, moe_stats

VARIANTS = {
    "dense": None,
    "moe": {"load_balancing_coef": 0.01},
    "moe_no_balance": {"load_balancing_coef": 0.0},
    "moe_balance_0.1": {"load_balancing_coef": 0.1},  # 10x Switch's coefficient: what more balance costs
}
N_EXPERTS, TOP_K, CAPACITY = 8, 1, 1.25


def make_spec(args, seed: int, vocab: int) -> RunSpec:
    lr = 5e-3 * (32 / args.n_embd) ** 1.5  # the sweep's width rule (leanscale.scaling.sweep)
    n_head = args.n_embd // 8
    cfg_n = GPT(model_config_from(args, vocab, n_head)).n_params()
    return RunSpec(
        run_id=f"L{args.n_layer}-d{args.n_embd}", budget_flops=6.0 * cfg_n * args.tokens, n_layer=args.n_layer,
        n_head=n_head, n_embd=args.n_embd, seq_len=args.seq_len, vocab_size=vocab, n_params=cfg_n,
        n_params_non_embedding=cfg_n, n_tokens=int(args.tokens), flops=6.0 * cfg_n * args.tokens,
        flops_appendix_f=0.0, lr=lr, batch_size=args.batch_size, warmup_fraction=0.05, min_lr_ratio=0.1,
        weight_decay=0.1, grad_clip=1.0, n_curve_points=args.curve_points, val_batches=16, val_fraction=0.05,
        corpus="gcide", max_bytes=None, seed=seed,
    )


def model_config_from(args, vocab: int, n_head: int):
    from leanscale.models.transformer import GPTConfig

    return GPTConfig(vocab_size=vocab, block_size=args.seq_len, n_layer=args.n_layer, n_head=n_head,
                     n_embd=args.n_embd, dropout=0.0, bias=False, tie_weights=True)


def run_variant(name: str, spec: RunSpec, stream: TokenStream, stats_every: int) -> dict:
    kw = VARIANTS[name]
    prepare = None if kw is None else (
        lambda m: apply_moe(m, N_EXPERTS, every=2, top_k=TOP_K, capacity_factor=CAPACITY, **kw))
    history: list[dict] = []
    step = {"n": 0}

    def aux(model):
        step["n"] += 1
        if step["n"] % stats_every == 0:
            history.append({"step": step["n"], "layers": moe_stats(model)})
        return moe_aux_loss(model)

    result = train_and_cost(spec, stream, prepare, None if kw is None else aux)
    result["balance_history"] = history
    result["variant"] = name
    return result


def train_and_cost(spec: RunSpec, stream: TokenStream, prepare, aux) -> dict:
    """``train_run`` with ``prepare_model=prepare`` and ``aux_loss=aux``, timed; then the training
    FLOPs per token from the ledger's rules (MoE: per active expert) and the parameter count of
    the same model, measured on one batch."""
    t0 = time.perf_counter()
    result = train_run(spec, stream, prepare_model=prepare, aux_loss=aux)
    result["wall_seconds"] = time.perf_counter() - t0
    torch.manual_seed(spec.seed)
    model = GPT(model_config(spec))
    if prepare is not None:
        model = prepare(model)
    x = torch.randint(0, spec.vocab_size, (spec.batch_size, spec.seq_len))
    result["flops_per_token"] = count_flops(model, x, x).total / x.numel()
    result["n_params_total"] = sum(p.numel() for p in model.parameters())
    return result


def steps_to_reach(curve: list[dict], target: float, tokens_per_step: int) -> float | None:
    """First point where the validation loss is <= target, interpolated linearly in log tokens."""
    prev = None
    for point in curve:
        if point["loss"] <= target:
            if prev is None:
                return point["n_tokens"] / tokens_per_step
            l0, l1 = prev["loss"], point["loss"]
            t0, t1 = math.log(prev["n_tokens"]), math.log(point["n_tokens"])
            frac = (l0 - target) / (l0 - l1) if l0 != l1 else 1.0
            return math.exp(t0 + frac * (t1 - t0)) / tokens_per_step
        prev = point
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=float, default=3e6)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--curve-points", type=int, default=20)
    ap.add_argument("--stats-every", type=int, default=20)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--tag", default=None)
    args = ap.parse_args()
    name = "equal_compute" + (f"_{args.tag}" if args.tag else "")
    state = JobState(RESULTS / "moe" / name)
    tokens = encode_corpus("gcide", args.vocab)
    stream = TokenStream(np.asarray(tokens), 0.05)
    for seed in range(args.seeds):
        spec = make_spec(args, seed, args.vocab)
        for variant in VARIANTS:
            key = f"{variant}-seed{seed}"
            if state.is_done(key):
                continue
            result = run_variant(variant, spec, stream, args.stats_every)
            state.save(key, result)
            print(f"{key}: val loss {result['loss']:.4f}, {result['tokens_per_second']:.0f} tokens/s, "
                  f"{result['flops_per_token'] / 1e6:.2f} MFLOP/token, {result['n_params_total']:,} params", flush=True)
    summarize(name, state, args)


def summarize(name: str, state: JobState, args) -> None:
    rows = {k: state.load(k) for k in state}
    seeds = sorted({r["seed"] for r in rows.values()})
    per_seed = []
    for seed in seeds:
        dense, moe, nob, strong = (rows.get(f"{v}-seed{seed}") for v in
                                   ("dense", "moe", "moe_no_balance", "moe_balance_0.1"))
        if dense is None or moe is None:
            continue
        tps = args.batch_size * args.seq_len
        reach = steps_to_reach(moe["curve"], dense["loss"], tps)

        def balance(run):
            if run is None:
                return None
            late = [h for h in run["balance_history"] if h["step"] > 0.1 * run["n_steps"]]  # after warm-up
            ratios = [layer["max_over_mean_load"] for h in late for layer in h["layers"]
                      if layer["max_over_mean_load"] is not None]
            dropped = [layer["dropped_fraction"] for h in late for layer in h["layers"]
                       if layer["dropped_fraction"] is not None]
            return {"max_over_mean_load_mean": statistics.mean(ratios) if ratios else None,
                    "max_vio_mean": statistics.mean(ratios) - 1 if ratios else None,  # MaxVio = max/mean - 1
                    "max_over_mean_load_p90": float(np.percentile(ratios, 90)) if ratios else None,
                    "dropped_fraction_mean": statistics.mean(dropped) if dropped else None,
                    "final_loss": run["loss"]}

        per_seed.append({
            "seed": seed, "dense_final_loss": dense["loss"], "moe_final_loss": moe["loss"],
            "dense_steps": dense["n_steps"], "moe_steps_to_dense_loss": reach,
            "steps_ratio": None if reach is None else reach / dense["n_steps"],
            "tokens_per_second_ratio": moe["tokens_per_second"] / dense["tokens_per_second"],
            "flops_per_token_ratio": moe["flops_per_token"] / dense["flops_per_token"],
            "params_ratio": moe["n_params_total"] / dense["n_params_total"],
            "balance_with_loss": balance(moe), "balance_without_loss": balance(nob),
            "balance_with_loss_0.1": balance(strong),
            "steps_ratio_balance_0.1": None if strong is None else (
                None if (r := steps_to_reach(strong["curve"], dense["loss"], tps)) is None else r / dense["n_steps"]),
        })
    if not per_seed:
        return
    ratio = [s["steps_ratio"] for s in per_seed if s["steps_ratio"] is not None]
    atomic_write_json(RESULTS / "moe" / f"{name}.json", {
        "benchmark": name, "machine": machine(), "corpus": "gcide (Webster 1913), byte-level BPE",
        "settings": vars(args) | {"n_experts": N_EXPERTS, "top_k": TOP_K, "capacity_factor": CAPACITY, "every": 2},
        "runs": {k: {kk: v for kk, v in r.items() if kk != "balance_history"} | {
            "balance_history": r["balance_history"]} for k, r in rows.items()},
        "per_seed": per_seed,
        "goals": {
            "steps_ratio_mean": statistics.mean(ratio) if ratio else None,
            "goal_steps_ratio_le_0.6": bool(ratio) and statistics.mean(ratio) <= 0.6,
            "tokens_per_second_ratio_mean": statistics.mean(s["tokens_per_second_ratio"] for s in per_seed),
            "goal_tokens_per_second_ge_0.75": statistics.mean(s["tokens_per_second_ratio"] for s in per_seed) >= 0.75,
        },
        "paper": "Fedus et al. 2021 (Switch): 7x faster pre-training than T5-Base at equal FLOPs per token "
                 "with 128 experts; the step speed-up grows with the number of experts.",
    })
    for s in per_seed:
        print(s)


if __name__ == "__main__":
    main()
