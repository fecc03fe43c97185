"""Global-batch vs micro-batch load-balancing loss under DDP (Qwen, Qiu et al. 2025, arXiv 2501.11873).

Run it under ``torchrun --nproc_per_node=2`` (gloo, CPU). Both runs train the Switch-loss MoE GPT
of ``balance.py`` (every second MLP -> 8 top-1 experts, capacity 1.25, balancing loss 0.01,
z-loss 1e-3) on the same tokens from the same initialisation, with a small micro-batch per rank
(``--batch-size`` is the global batch: ``--batch-size 4`` is 2 sequences per rank):

* ``batch``: ``balance_loss="batch"``, the Switch loss of each rank's micro-batch (what a DDP
  run computes by default; with 2 sequences per rank it is almost a sequence-level loss);
* ``global``: ``balance_loss="global"``, ``f_i`` counted over both ranks' tokens (one
  ``all_reduce`` per MoE layer and step); ``P_i`` stays the rank's own, and DDP averages the
  gradients, so the loss is that of the global batch.

Recorded per run: validation curve and final loss; every ``--stats-every`` steps, per MoE layer,
MaxVio (max load / mean load - 1) of the **global** load (both ranks' assignments) of that
step's forward and accumulated over the window of ``--stats-every`` steps, and the mean over the
ranks of each rank's own micro-batch MaxVio; after training an expert-specialisation proxy on
validation windows: per MoE layer the mutual information between the input token id and the
top-1 expert (nats, and divided by the routing entropy) and the purity (share of a token type's
occurrences that go to its most frequent expert, weighted by frequency); and how concentrated each
128-token sequence is on few experts: the mean per-sequence MaxVio of the top-1 choices and the
mutual information between the sequence and the expert (what a near-sequence-level balancing loss
pushes down). These proxies are ours, not Qwen's (who compare experts' selection frequencies
across domains; Webster 1913 has no domain labels). ``balance.balance`` summarises
MaxVio after warm-up (first 10% of steps excluded). Paired differences (global - batch) by seed.
Resumable per run (``benchmarks/results/moe/global_balance/``); the JSON is rewritten after
every run, so a cut job still leaves the finished runs.

**Gradient accumulation** (``--accumulate K``, #17): each rank's batch is split into ``K``
micro-batches of ``batch_size / (world * K)`` sequences, one backward each, every micro-batch's
loss (cross-entropy + balancing + z-loss) divided by ``K``. ``batch`` is then the Switch loss of
each micro-batch; ``global`` runs every step inside ``moe_global_batch`` (f_i over the step's
micro-batches so far, of all ranks: at the last micro-batch the global batch's), so the global
batch can be ``K`` (x ranks) times the micro-batch in one process. Results go to
``global_balance_accum<K>.json`` (``--tag`` to change); without ``--accumulate`` as before.

Usage: torchrun --nproc_per_node=2 benchmarks/moe/global_balance.py [--tokens 6e5] [--batch-size 4]
       [--seeds 3] [--threads 1] [--save-weights DIR]
       python benchmarks/moe/global_balance.py --accumulate 8 --batch-size 16 [--seeds 3] [--seed-list 1 2]
The committed results: --tokens 6e5 --batch-size 4 --seeds 3 --threads 1 (2 sequences per rank,
1,171 steps; 333-549 s per run on 2 shared cores). ``--summarize-only`` (one process) rewrites the
JSON from the saved runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import numpy as np
import torch

from benchmarks.common import RESULTS, machine
from benchmarks.moe.balance import (
    CAPACITY,
    _mean_sd,
    balance,
    make_spec,
    runs_without_history,
    train_and_cost,
)
from leanscale.core.distributed import init_from_env, rank_and_world, shutdown
from leanscale.core.io import JobState, atomic_write_json
from leanscale.data.text import TokenStream, encode_corpus
from leanscale.scaling._train import model_config
from leanscale.sparse import (
    apply_moe,
    moe_aux_loss,
    moe_global_batch,
    moe_layers,
    moe_stats,
)
from leanscale.train.lm import ADAM_BETAS, ADAM_EPS, curve_steps, validation_loss
from leanscale.train.loop import MicroBatches, fit, seeded
from leanscale.train.optim import param_groups
from leanscale.train.schedules import lr_factor

SWITCH = {"n_experts": 8, "every": 2, "top_k": 1, "load_balancing_coef": 0.01}  # balance.py's "switch"
VARIANTS = {"batch": SWITCH | {"balance_loss": "batch"}, "global": SWITCH | {"balance_loss": "global"}}


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    t = t.detach().to(torch.float64).clone()
    if rank_and_world()[1] > 1:
        dist.all_reduce(t)
    return t


def _max_vio(c: torch.Tensor) -> float | None:
    return None if float(c.sum()) <= 0 else float(c.max()) * c.numel() / float(c.sum()) - 1.0


def global_rows(model) -> list[dict]:
    """Per MoE layer: MaxVio of the global load of the last training forward (``max_vio``) and of
    the window since the last call (``max_vio_accumulated``), the ranks' mean micro-batch MaxVio
    (``max_vio_local``) and dropped fraction. One all_reduce; every rank must call it."""
    _, world = rank_and_world()
    rows = moe_stats(model, reset=False)
    layers = [m.moe for _, m in moe_layers(model)]
    parts = []
    for row, moe in zip(rows, layers):
        E = moe.n_experts
        load = torch.tensor(row["load"] if row["load"] is not None else [0.0] * E)  # (E,) this rank
        acc = moe.stats_counts if moe.stats_counts is not None else torch.zeros(E, dtype=torch.float64)
        parts += [load, acc.cpu(), torch.tensor([row["max_vio"] or 0.0, row["dropped_fraction"] or 0.0])]
    total = _all_reduce(torch.cat([p.to(torch.float64) for p in parts]))
    out, i = [], 0
    for row, moe in zip(rows, layers):
        E = moe.n_experts
        load, acc, scal = total[i:i + E], total[i + E:i + 2 * E], total[i + 2 * E:i + 2 * E + 2]
        i += 2 * E + 2
        out.append({"name": row["name"], "max_vio": _max_vio(load), "max_vio_accumulated": _max_vio(acc),
                    "max_vio_local": float(scal[0]) / world, "dropped_fraction": float(scal[1]) / world})
        moe.stats_counts = None  # the window restarts
    return out


@torch.no_grad()
def specialisation(model, stream: TokenStream, vocab: int, batch_size: int, seq_len: int, n_batches: int) -> list[dict]:
    """Expert-specialisation proxy on validation windows, per MoE layer: mutual information
    I(token id; top-1 expert) in nats, its ratio to the routing entropy H(expert), and the
    frequency-weighted purity (share of a token type's occurrences routed to its most frequent
    top-1 expert). Ranks split the batches; the joint counts are all-reduced."""
    rank, world = rank_and_world()
    layers = moe_layers(model)
    joint = [torch.zeros(vocab, m.moe.n_experts, dtype=torch.float64) for _, m in layers]  # (V, E) each
    per_seq = [torch.zeros(3, dtype=torch.float64) for _ in layers]  # sums of MaxVio, entropy; count
    current = {}

    def hook(i):
        def fn(module, inputs):
            x = inputs[0]  # (B, T, C)
            E = module.n_experts
            _, probs = module._route(x.reshape(-1, module.n_embd))  # (N, E)
            if module.expert_bias is not None:
                probs = probs + module.expert_bias.float()
            top1 = probs.argmax(dim=-1)  # (N,) the first choice
            joint[i].index_put_((current["idx"], top1), torch.ones_like(top1, dtype=torch.float64), accumulate=True)
            B, T = x.shape[0], x.shape[1]
            seq = torch.arange(B * T).div(T, rounding_mode="floor")  # (N,)
            c = torch.bincount(seq * E + top1, minlength=B * E).view(B, E).double()  # (B, E) per sequence
            q = c / T
            ent = -(q * q.clamp(min=1e-30).log()).sum(1)  # (B,) routing entropy within each sequence
            per_seq[i] += torch.stack([(c.max(1).values * E / T - 1).sum(), ent.sum(), torch.tensor(float(B))])
        return fn

    handles = [m.moe.register_forward_pre_hook(hook(i)) for i, (_, m) in enumerate(layers)]
    model.eval()
    try:
        for b, (x, y) in enumerate(stream.val_batches(batch_size, seq_len, n_batches)):
            if b % world != rank:
                continue
            current["idx"] = x.reshape(-1)
            model(x, y)
    finally:
        for h in handles:
            h.remove()
        model.train()
    out = []
    for (name, _), J, ps in zip(layers, joint, per_seq):
        J, ps = _all_reduce(J), _all_reduce(ps)
        seq_vio, seq_ent = float(ps[0] / ps[2]), float(ps[1] / ps[2])
        n = float(J.sum())
        p = J / n
        pv, pe = p.sum(1, keepdim=True), p.sum(0, keepdim=True)  # (V, 1), (1, E)
        nz = p > 0
        mi = float((p[nz] * (p[nz] / (pv @ pe)[nz]).log()).sum())
        h_e = float(-(pe[pe > 0] * pe[pe > 0].log()).sum())
        purity = float(J.max(dim=1).values.sum() / n)
        out.append({"name": name, "mutual_information_nats": mi, "routing_entropy_nats": h_e,
                    "mi_over_entropy": mi / h_e if h_e > 0 else None, "purity": purity, "n_tokens": int(n),
                    # how concentrated a sequence's tokens are on few experts (what a micro-batch loss of
                    # few sequences pushes down): mean per-sequence MaxVio and I(sequence; expert)
                    "sequence_max_vio": seq_vio, "sequence_mi_nats": h_e - seq_ent, "n_sequences": int(ps[2])})
    return out


def train_accumulated(spec, stream: TokenStream, prepare, on_step, accumulate: int, global_batch: bool) -> dict:
    """``train_run``'s loop (the same model init, windows, AdamW, schedule, clipping and validation
    curve) with each rank's batch split into ``accumulate`` micro-batches; ``global_batch``: every
    step inside :func:`moe_global_batch`. ``on_step(model)`` after every optimizer step."""
    from leanscale.models import GPT

    rank, world = rank_and_world()
    with seeded(spec.seed):
        model = prepare(GPT(model_config(spec)))
    n_steps, local = spec.n_steps, spec.batch_size // world
    micro = local // accumulate
    batches = stream.train_batches(local, spec.seq_len, n_steps * spec.batch_size * spec.seq_len, seed=spec.seed,
                                   rank=rank, world_size=world)
    parts = (MicroBatches([(x[j * micro:(j + 1) * micro], y[j * micro:(j + 1) * micro]) for j in range(accumulate)])
             for x, y in batches)
    optimizer = torch.optim.AdamW(param_groups(model, spec.weight_decay), lr=spec.lr, betas=ADAM_BETAS, eps=ADAM_EPS)
    warmup = max(1, round(spec.warmup_fraction * n_steps))
    eval_after, curve = set(curve_steps(n_steps, spec.n_curve_points)), []

    def loss_fn(net, part):
        x, y = part
        return (net(x, y)[1] + moe_aux_loss(model)) / accumulate  # parts of equal size

    def after_step(out) -> None:
        on_step(model)
        if out.step in eval_after or out.last:
            curve.append({"n_tokens": out.step * spec.batch_size * spec.seq_len,
                          "loss": validation_loss(model, stream, spec.batch_size, spec.seq_len, spec.val_batches)})

    model.train()
    t0 = time.perf_counter()
    result = fit(model, optimizer, parts, loss_fn, n_steps=n_steps, lr=spec.lr,
                 schedule=lambda step: lr_factor(step + 1, n_steps, warmup_steps=warmup, floor=spec.min_lr_ratio),
                 clip_grad_norm=spec.grad_clip, on_step=after_step,
                 accumulate_context=moe_global_batch if global_batch else None)
    return {"loss": curve[-1]["loss"], "curve": curve, "n_steps": result.steps, "seed": spec.seed,
            "world_size": world, "wall_seconds": time.perf_counter() - t0, "accumulate": accumulate,
            "micro_batch_sequences": micro}


def run_variant(name: str, kw: dict, spec, stream: TokenStream, args) -> dict:
    held: list = []

    def prepare(m):
        m = apply_moe(m, capacity_factor=CAPACITY, **kw)
        held.append(m)  # the first is the trained model (train_and_cost builds a second to count FLOPs)
        return m

    history: list[dict] = []
    step = {"n": 0}

    t0 = time.perf_counter()

    def aux(model):
        step["n"] += 1
        if step["n"] % args.stats_every == 0:
            history.append({"step": step["n"], "layers": global_rows(model)})
        if step["n"] % 100 == 0 and rank_and_world()[0] == 0:
            print(f"  {name} seed {spec.seed}: step {step['n']}/{spec.n_steps}, {time.perf_counter() - t0:.0f} s",
                  flush=True)
        return moe_aux_loss(model)

    if args.accumulate > 1:
        prev: dict[int, torch.Tensor] = {}  # per layer: stats_counts after the previous step

        def on_step(model):
            step["n"] += 1
            layers = [m.moe for _, m in moe_layers(model)]
            step_counts = [moe.stats_counts - prev.get(i, 0) for i, moe in enumerate(layers)]  # this step's
            prev.update({i: moe.stats_counts.clone() for i, moe in enumerate(layers)})
            if step["n"] % args.stats_every == 0:
                rows = global_rows(model)  # max_vio(_local): the last micro-batch; the window restarts
                glob = _all_reduce(torch.cat(step_counts)).split([m.n_experts for m in layers])
                for row, c in zip(rows, glob):  # MaxVio of the whole step (all micro-batches and ranks)
                    row["max_vio_last_micro_batch"] = row["max_vio"]
                    row["max_vio"] = _max_vio(c)
                history.append({"step": step["n"], "layers": rows})
                prev.clear()
            if step["n"] % 50 == 0 and rank_and_world()[0] == 0:
                print(f"  {name} seed {spec.seed}: step {step['n']}/{spec.n_steps}, "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)

        result = train_accumulated(spec, stream, prepare, on_step, args.accumulate, kw["balance_loss"] == "global")
    else:
        result = train_and_cost(spec, stream, prepare, aux)
    result["balance_history"] = history
    result["variant"], result["moe_settings"] = name, kw
    result["specialisation"] = specialisation(held[0], stream, spec.vocab_size, args.batch_size, spec.seq_len,
                                              args.spec_batches)
    if args.save_weights and rank_and_world()[0] == 0:  # for later analyses (not committed: a few MB)
        Path(args.save_weights).mkdir(parents=True, exist_ok=True)
        torch.save(held[0].state_dict(), Path(args.save_weights) / f"{name}-seed{spec.seed}.pt")
    del held[:]
    return result


def local_vio(run: dict) -> float | None:
    late = [h for h in run["balance_history"] if h["step"] > 0.1 * run["n_steps"]]
    v = [r["max_vio_local"] for h in late for r in h["layers"]]
    return statistics.mean(v) if v else None


def result_name(args) -> str:
    return "global_balance" + (f"_accum{args.accumulate}" if args.accumulate > 1 else "") + (
        f"_{args.tag}" if args.tag else "")


def summarize(state: JobState, args) -> None:
    rows = {k: state.load(k) for k in state}
    world = max((r["world_size"] for r in rows.values()), default=rank_and_world()[1])
    per_seed = []
    for seed in sorted({r["seed"] for r in rows.values()}):
        out = {"seed": seed, "variants": {}}
        for variant in VARIANTS:
            run = rows.get(f"{variant}-seed{seed}")
            if run is None:
                continue
            spec = run["specialisation"]
            out["variants"][variant] = {
                "final_loss": run["loss"], "n_steps": run["n_steps"], "wall_seconds": run["wall_seconds"],
                **balance(run), "max_vio_local_batch_mean": local_vio(run),
                "mi_nats_mean": statistics.mean(s["mutual_information_nats"] for s in spec),
                "mi_over_entropy_mean": statistics.mean(s["mi_over_entropy"] for s in spec),
                "purity_mean": statistics.mean(s["purity"] for s in spec),
                "sequence_max_vio_mean": statistics.mean(s["sequence_max_vio"] for s in spec),
                "sequence_mi_nats_mean": statistics.mean(s["sequence_mi_nats"] for s in spec),
            }
        if len(out["variants"]) == len(VARIANTS):
            g, b = out["variants"]["global"], out["variants"]["batch"]
            out["global_minus_batch"] = {k: g[k] - b[k] for k in (
                "final_loss", "max_vio_batch_mean", "max_vio_window_mean", "max_vio_local_batch_mean",
                "mi_nats_mean", "mi_over_entropy_mean", "purity_mean", "sequence_max_vio_mean",
                "sequence_mi_nats_mean") if g[k] is not None and b[k] is not None}
        per_seed.append(out)
    paired = [s["global_minus_batch"] for s in per_seed if "global_minus_batch" in s]
    summary = {}
    for key in (paired[0] if paired else {}):
        mean, sd = _mean_sd([p[key] for p in paired if key in p])
        summary[key] = {"mean": mean, "sd": sd, "n": len(paired)}
    name = result_name(args)
    accumulated = args.accumulate > 1
    note = ("torchrun --nproc_per_node=2, gloo, CPU, 1 torch thread per rank" if not accumulated else
            f"gradient accumulation: {args.accumulate} micro-batches of {args.batch_size // world // args.accumulate} "
            f"sequences per rank and step ({world} process(es)), each micro-batch's loss / {args.accumulate}; "
            "global: every step inside moe_global_batch (f_i over the step's micro-batches so far: the whole global "
            "batch's at the last micro-batch); batch: each micro-batch's own Switch loss")
    atomic_write_json(RESULTS / "moe" / f"{name}.json", {
        "benchmark": name, "machine": machine(), "corpus": "gcide (Webster 1913), byte-level BPE",
        "settings": {k: v for k, v in vars(args).items() if k not in ("summarize_only", "save_weights", "seed_list", "only")} | {
            "world_size": world, "sequences_per_rank": args.batch_size // world,
            "capacity_factor": CAPACITY, "variants": VARIANTS, "val_batches": args.val_batches},
        "note": note + "; other jobs shared the 2 "
                "cores, so wall_seconds are not comparable between runs. max_vio_* (balance.balance, first 10% "
                "of steps excluded): the GLOBAL load (all ranks' assignments) of the sampled step "
                "(batch) and of each window of stats_every steps (window); max_vio_local_batch_mean: each "
                "rank's own micro-batch, averaged over the ranks. Specialisation: our proxy (mutual "
                "information token id - top-1 expert, purity) on spec_batches validation batches, not Qwen's "
                "domain measure; its finite-sample bias is the same for both runs. global_minus_batch: paired "
                "by seed (same initialisation and tokens); summary: mean, sd (n-1; null for one seed), n. "
                + ("The global batch is only 2x the micro-batch here (2 ranks, no gradient accumulation); "
                   "Qwen's gains are at much larger ratios. Floors of uniformly random top-1 routing (8 experts): "
                   "MaxVio 0.18 (one step's 512 tokens), 0.26 (one rank's 256), 0.06 (10-step window); "
                   "per-sequence MaxVio 0.37 and I(sequence; expert) 0.028 nats (128 tokens). Re-running seed 0 "
                   "reproduced both runs bit for bit." if not accumulated else
                   "max_vio_local_batch_mean: the last micro-batch of the sampled step. Floors of uniformly "
                   "random top-1 routing (8 experts): MaxVio 0.09 (one step's 2,048 tokens), 0.26 (one "
                   "micro-batch's 256), 0.03 (10-step window); per-sequence MaxVio 0.37, I(sequence; expert) "
                   "0.028 nats (128 tokens)."),
        "per_seed": per_seed, "summary_global_minus_batch": summary,
        "runs": runs_without_history(rows, name),
        "paper": "Qiu et al. 2025 (arXiv 2501.11873; ACL 2025 long paper 249), abstract (checked): with a "
                 "micro-batch of few sequences the micro-batch balancing loss is almost sequence-level; "
                 "synchronising f_i over the global batch improves pre-training perplexity and downstream tasks "
                 "(MoEs up to 42.8B total parameters, 400B tokens) and greatly improves experts' domain "
                 "specialisation. The tables' numbers are not verified (not reachable from this machine).",
    })


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=float, default=6e5)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4, help="global batch (sequences over all ranks)")
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--curve-points", type=int, default=8)
    ap.add_argument("--stats-every", type=int, default=10)
    ap.add_argument("--val-batches", type=int, default=64, help="validation batches (of --batch-size)")
    ap.add_argument("--spec-batches", type=int, default=64, help="validation batches for specialisation")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--seed-list", type=int, nargs="*", default=None, help="run these seeds only")
    ap.add_argument("--only", nargs="*", default=None, choices=sorted(VARIANTS), help="run only these variants")
    ap.add_argument("--accumulate", type=int, default=1,
                    help="micro-batches per rank and optimizer step (gradient accumulation)")
    ap.add_argument("--tag", default=None, help="suffix of the result names")
    ap.add_argument("--save-weights", default=None, help="folder for each trained model's state dict")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--summarize-only", action="store_true")
    args = ap.parse_args()
    if args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    init_from_env()
    rank, world = rank_and_world()
    if args.accumulate < 1:
        ap.error(f"--accumulate must be >= 1, got {args.accumulate}")
    if world < 2 and args.accumulate < 2 and not args.summarize_only:
        ap.error(f"run under torchrun --nproc_per_node=2 or with --accumulate >= 2: in one process without "
                 f"accumulation 'global' is 'batch' exactly (world size {world})")
    if args.batch_size % (world * args.accumulate):
        ap.error(f"--batch-size must be divisible by the {world} ranks x --accumulate {args.accumulate}, "
                 f"got {args.batch_size}")
    state = JobState(RESULTS / "moe" / result_name(args))
    tokens = encode_corpus("gcide", args.vocab)
    stream = TokenStream(np.asarray(tokens), 0.05)
    seeds = list(range(args.seeds)) if args.seed_list is None else args.seed_list
    for seed in ([] if args.summarize_only else seeds):
        spec = dataclasses.replace(make_spec(args, seed, args.vocab), val_batches=args.val_batches)
        for variant, kw in VARIANTS.items():
            key = f"{variant}-seed{seed}"
            if state.is_done(key) or (args.only and variant not in args.only):
                continue
            result = run_variant(variant, kw, spec, stream, args)
            if rank == 0:
                state.save(key, result)
                summarize(state, args)
                print(f"{key}: val loss {result['loss']:.4f}, {result['wall_seconds']:.0f} s, "
                      f"{result['n_steps']} steps, {balance(result)}, local {local_vio(result):.3f}, "
                      f"purity {[round(s['purity'], 3) for s in result['specialisation']]}", flush=True)
            if world > 1:
                import torch.distributed as dist

                dist.barrier()  # rank 1 must see the saved run before checking the next key
    if rank == 0:
        summarize(state, args)
    if world > 1:
        shutdown()  # train_run released DDP and its optimizer; gc.collect, barrier, destroy


if __name__ == "__main__":
    main()
