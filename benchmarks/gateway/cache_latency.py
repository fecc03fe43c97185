"""Latency of the gateway's semantic response cache (issue #16 goal: overhead p50 <= 10 ms).

A stream of chat requests (temperature 0, GSM8K questions from the RouteLLM file) where ~30% repeat
an earlier question exactly, ~20% paraphrase one (lower case, a "Question:" prefix, a changed first
word order..., the same numbers) and the rest are new, sent by ``--concurrency`` clients to

* ``direct``: the fake backend itself (``--backend-latency-ms`` per answer, jittered);
* ``gateway_nocache``: the gateway without a cache;
* ``gateway_cache_unbatched``: the gateway with ``cache: {semantic: true, embed_batch_ms: 0}``
  (every miss of the exact layer embeds its text alone, in a worker thread: the code before the
  micro-batcher);
* ``gateway_cache``: the same with the micro-batcher (``embed_batch_ms``, default 2).
* ``gateway_cache_static``: the semantic layer with ``embedder: static`` (MiniLM-L6 distilled into
  static token embeddings, ``leanscale.models.static_text_encoder``; ``embed_batch_ms: 0``: at
  ~0.3 ms a text, waiting for a batch would cost more than it saves), its default threshold.

Each gateway is a fresh process (an empty cache) with the real MiniLM-L6 (offline), warmed up by
``--warmup`` requests of other questions. Reported per class of request (new / exact repeat /
paraphrase): p50/p99 latency, how many were answered from the cache, and the overhead: p50 through
the gateway minus p50 of the same requests sent directly. The goal applies to the requests that
reach the backend (the new ones: they pay the exact look-up, the embedding and the semantic
look-up before the backend call); hits do not call the backend and answer in milliseconds.

Run: ``python -m benchmarks.gateway.cache_latency [--requests 2000] [--concurrency 64]``;
results in ``benchmarks/results/gateway/cache_latency.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS, machine
from benchmarks.gateway.common import (
    chat_body,
    drive,
    latency_summary,
    start_backend,
    start_gateway,
)

CSV = Path("/work/shared/data/routellm/gsm8k_responses.csv")
CLASSES = ("new", "exact", "paraphrase")


def questions() -> list[str]:
    with open(CSV, newline="", encoding="utf-8") as f:
        return [row["prompt"] for row in csv.DictReader(f)]


def paraphrase(text: str, rng: random.Random) -> str:
    """A rewording that keeps every number (the cache's ``semantic_same_numbers``)."""
    forms = [lambda t: t.lower(), lambda t: "Question: " + t, lambda t: t.rstrip("?.") + ".",
             lambda t: "Please solve this: " + t, lambda t: t.replace("How many", "What number of"),
             lambda t: "Can you tell me: " + t[0].lower() + t[1:]]
    return rng.choice(forms)(text)


def stream(n: int, pool: list[str], rng: random.Random, gap: int) -> tuple[list[str], list[str]]:
    """(texts, classes): ~30% exact repeats and ~20% paraphrases of questions sent at least ``gap``
    requests earlier (their answer is stored by then), the rest new questions."""
    texts, classes, sent = [], [], []
    fresh = iter(pool)
    for i in range(n):
        u = rng.random()
        old = sent[: max(0, i - gap)]
        if old and u < 0.3:
            texts.append(rng.choice(old))
            classes.append("exact")
        elif old and u < 0.5:
            texts.append(paraphrase(rng.choice(old), rng))
            classes.append("paraphrase")
        else:
            q = next(fresh)
            texts.append(q)
            sent.append(q)
            classes.append("new")
    return texts, classes


def per_class(results, classes: list[str]) -> dict:
    out = {}
    for c in CLASSES:
        rs = [r for r, k in zip(results, classes) if k == c]
        hits = sum(1 for r in rs if r.status == 200 and b'"chatcmpl-cache-' in r.data)
        out[c] = {"requests": len(rs), "answered_200": sum(r.status == 200 for r in rs), "cache_hits": hits,
                  "latency_ms": latency_summary([r.seconds for r in rs if r.status is not None])}
    out["all"] = {"requests": len(results), "answered_200": sum(r.status == 200 for r in results),
                  "latency_ms": latency_summary([r.seconds for r in results if r.status is not None])}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000, help="requests per phase (2,000)")
    ap.add_argument("--concurrency", type=int, default=64, help="concurrent clients (64)")
    ap.add_argument("--backend-latency-ms", type=float, default=300.0, help="the fake's time to answer (300 ms)")
    ap.add_argument("--latency-jitter", type=float, default=0.5, help="uniform factor in [1-j, 1+j] (0.5)")
    ap.add_argument("--embed-batch-ms", type=float, default=2.0, help="the batcher's window (2 ms)")
    ap.add_argument("--embed-wait-ms", type=float, default=0.0,
                    help="cache.embed_wait_ms of the batched phase (0: no limit)")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch.set_num_threads in the gateway process (default: torch's own)")
    ap.add_argument("--warmup", type=int, default=200, help="uncounted requests of other questions per gateway")
    ap.add_argument("--static-dir", default=None,
                    help="the static embedder's folder (default: built in a temporary folder first)")
    ap.add_argument("--phases", default="direct,gateway_nocache,gateway_cache_unbatched,gateway_cache,"
                                        "gateway_cache_static",
                    help="comma-separated phases to run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "gateway" / "cache_latency.json"))
    args = ap.parse_args()
    if args.requests < 1 or args.concurrency < 1:
        ap.error(f"--requests and --concurrency must be positive. Got {args.requests} and {args.concurrency}.")
    t_start = time.perf_counter()
    rng = random.Random(args.seed)
    pool = questions()
    rng.shuffle(pool)
    warm_pool, pool = pool[: args.warmup], pool[args.warmup:]
    texts, classes = stream(args.requests, pool, rng, gap=2 * args.concurrency)
    bodies = [chat_body("small", t, temperature=0) for t in texts]
    warm = [chat_body("small", t, temperature=0) for t in warm_pool]
    small = start_backend("small", {"text": "The answer is 42."}, latency_s=args.backend_latency_ms / 1e3,
                          latency_jitter=args.latency_jitter, seed=args.seed)
    model = {"name": "small", "base_url": small.base_url, "input_price_per_1k": 0.0006,
             "output_price_per_1k": 0.0018, "timeout_s": 30, "max_concurrency": max(64, args.concurrency)}
    wanted = args.phases.split(",")
    phases: dict[str, dict] = {}
    tmp = tempfile.TemporaryDirectory()
    static_dir = args.static_dir or str(Path(tmp.name) / "static")
    if "gateway_cache_static" in wanted:
        from leanscale.models import static_text_encoder

        static_text_encoder(static_dir)  # built here, not in the measured gateway's start
    try:
        def run(tag: str, url: str, extra: dict | None = None) -> None:
            if warm:
                drive(url, warm, min(args.concurrency, len(warm)))
            small.command("reseed", args.seed)
            results, wall = drive(url, bodies, args.concurrency)
            out = per_class(results, classes)
            out["wall_s"], out["throughput_rps"] = wall, len(results) / wall
            if extra:
                out.update(extra)
            phases[tag] = out
            print(f"{tag:24s} " + " ".join(f"{c}: p50={out[c]['latency_ms'].get('p50', float('nan')):.1f} ms "
                                            f"hits={out[c].get('cache_hits', '-')}/{out[c]['requests']}"
                                            for c in CLASSES), flush=True)

        if "direct" in wanted:
            run("direct", small.base_url + "/chat/completions")
        for tag, cache in (("gateway_nocache", None),
                           ("gateway_cache_unbatched", {"semantic": True, "embed_batch_ms": 0}),
                           ("gateway_cache", {"semantic": True, "embed_batch_ms": args.embed_batch_ms,
                                             "embed_wait_ms": args.embed_wait_ms}),
                           ("gateway_cache_static", {"semantic": True, "embedder": "static",
                                                     "embedder_path": static_dir, "embed_batch_ms": 0})):
            if tag not in wanted:
                continue
            config = {"models": [model]}
            if cache is not None:
                config["cache"] = cache
            gateway = start_gateway(config, torch_threads=args.torch_threads)
            try:
                run(tag, gateway.base_url + "/chat/completions", {"cache": cache})
            finally:
                gateway.stop()
    finally:
        small.stop()
        tmp.cleanup()

    overhead = {}
    if "direct" in phases:
        d = phases["direct"]
        for tag, ph in phases.items():
            if tag == "direct":
                continue
            overhead[tag] = {c: ph[c]["latency_ms"]["p50"] - d[c]["latency_ms"]["p50"] for c in (*CLASSES, "all")}
            overhead[tag]["p99_new"] = ph["new"]["latency_ms"]["p99"] - d["new"]["latency_ms"]["p99"]
    goals = {}
    for tag in ("gateway_cache", "gateway_cache_unbatched", "gateway_cache_static"):
        if tag in overhead:
            v = overhead[tag]["new"]
            goals[f"{tag}_overhead_p50_ms_on_backend_calls"] = {"value": v, "goal": "<= 10", "met": v <= 10.0}
    record = {
        "benchmark": "gateway_cache_latency", "machine": machine(),
        "settings": {"requests": args.requests, "concurrency": args.concurrency,
                     "backend_latency_ms": args.backend_latency_ms, "latency_jitter": args.latency_jitter,
                     "embed_batch_ms": args.embed_batch_ms, "embed_wait_ms": args.embed_wait_ms,
                     "torch_threads": args.torch_threads,
                     "warmup": args.warmup, "seed": args.seed, "embedding": "MiniLM-L6 (leanscale.models.embed_texts); gateway_cache_static: its static "
                                  "distillation (leanscale.models.static_text_encoder, 256 dims)",
                     "mix": {c: classes.count(c) for c in CLASSES},
                     "data": "GSM8K questions of /work/shared/data/routellm/gsm8k_responses.csv; paraphrases: "
                             "lower case, prefixes, 'How many' -> 'What number of', final punctuation"},
        "phases": phases, "overhead_p50_ms": overhead,
        "overhead_definition": "p50 through the gateway minus p50 of the same requests sent directly to the fake "
                               "backend, per class (new: misses that call the backend; exact/paraphrase: "
                               "negative when answered from the cache)",
        "goals": goals, "seconds_total": time.perf_counter() - t_start,
    }
    from leanscale.core.io import atomic_write_json

    atomic_write_json(Path(args.out), record, indent=1)
    print(json.dumps({"overhead_p50_ms": overhead, "goals": goals}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
