"""Hit quality of the semantic cache's two embedders (MiniLM-L6 and its static distillation), on
the 1,319 GSM8K questions of the RouteLLM file.

* **Paraphrase hits**: each question against a rewording of it (the six forms of
  :func:`benchmarks.gateway.cache_latency.paraphrase`, each question with every form): the share
  whose cosine reaches the threshold (a hit the cache should make).
* **False hits**: each question against the most similar *other* question (a hit the cache must
  not make: another question's answer), with and without the cache's ``semantic_same_numbers``
  filter (a hit needs the same numbers in order: on GSM8K it removes nearly every false hit).
* **Latency**: milliseconds to embed one question alone (median over 200), each embedder, on this
  machine with torch's default threads.

For thresholds 0.90..0.995, per embedder. Reports the threshold where the static embedder's false
hits (no number filter) are no more than MiniLM's at its default 0.95 -- the evidence for the
static default.

Run: ``python -m benchmarks.gateway.cache_quality [--static-dir DIR]``; writes
``benchmarks/results/gateway/cache_quality.json``.
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import RESULTS, machine
from benchmarks.gateway.cache_latency import questions

THRESHOLDS = [0.90, 0.92, 0.94, 0.95, 0.96, 0.97, 0.975, 0.98, 0.985, 0.99, 0.995]
FORMS = {
    "lower": lambda t: t.lower(),
    "prefix_question": lambda t: "Question: " + t,
    "period": lambda t: t.rstrip("?.") + ".",
    "prefix_please": lambda t: "Please solve this: " + t,
    "what_number_of": lambda t: t.replace("How many", "What number of"),
    "can_you_tell_me": lambda t: "Can you tell me: " + t[0].lower() + t[1:],
}
HAND_PAIRS = {  # (a, b, same question?)
    "how do / how can": ("How do I reset my password?", "How can I reset my password?", True),
    "capital, case": ("What is the capital of France?", "what's the capital of france", True),
    "negation": ("Is Paris the capital of France?", "Is Paris not the capital of France?", False),
    "other account question": ("How do I reset my password?", "How do I change my email address?", False),
}


def numbers(text: str) -> tuple[str, ...]:
    return tuple(re.findall(r"\d+", text))


def evaluate(name: str, embed, qs: list[str]) -> dict:
    e = embed(qs)  # (n, d), unit rows
    sims = e @ e.T
    np.fill_diagonal(sims, -np.inf)
    nearest = sims.max(axis=1)  # the most similar other question
    same_num = np.array([[numbers(a) == numbers(b) for b in qs] for a in qs])
    np.fill_diagonal(same_num, False)
    nearest_same_num = np.where(same_num, sims, -np.inf).max(axis=1)
    para = {}
    for form, f in FORMS.items():
        p = embed([f(q) for q in qs])
        para[form] = (e * p).sum(axis=1)
    all_para = np.concatenate(list(para.values()))
    t0 = []
    for q in qs[:200]:
        s = time.perf_counter()
        embed([q])
        t0.append(time.perf_counter() - s)
    hand = {}
    for label, (a, b, same) in HAND_PAIRS.items():
        x, y = embed([a, b])
        hand[label] = {"cosine": float(x @ y), "same_question": same}
    return {
        "embedder": name,
        "ms_per_text_alone_p50": 1e3 * statistics.median(t0),
        "by_threshold": [{
            "threshold": t,
            "paraphrase_hit_rate": float((all_para >= t).mean()),
            "paraphrase_hit_rate_by_form": {k: float((v >= t).mean()) for k, v in para.items()},
            "false_hit_rate": float((nearest >= t).mean()),
            "false_hit_rate_same_numbers": float((nearest_same_num >= t).mean()),
        } for t in THRESHOLDS],
        "nearest_other_quantiles": {str(q): float(np.quantile(nearest, q)) for q in (0.5, 0.9, 0.99, 1.0)},
        "paraphrase_cosine_quantiles": {str(q): float(np.quantile(all_para, q)) for q in (0.0, 0.01, 0.05, 0.5)},
        "hand_pairs": hand,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--static-dir", default=None, help="a built static embedder (default: build one in a temp dir)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "gateway" / "cache_quality.json"))
    args = ap.parse_args()
    random.seed(args.seed)
    from leanscale.models import embed_texts, static_text_encoder

    t_start = time.perf_counter()
    qs = questions()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        static = static_text_encoder(args.static_dir or Path(tmp) / "static")
        build_s = time.perf_counter() - t
        results = [evaluate("minilm", lambda texts: embed_texts(texts), qs),
                   evaluate("static", lambda texts: static.encode(texts), qs)]
    minilm_false = next(r["false_hit_rate"] for r in results[0]["by_threshold"] if r["threshold"] == 0.95)
    ok = [r for r in results[1]["by_threshold"] if r["false_hit_rate"] <= minilm_false]
    record = {
        "benchmark": "gateway_cache_quality",
        "machine": machine(),
        "settings": {"questions": len(qs), "source": "RouteLLM gsm8k_responses.csv (prompt column)",
                     "paraphrase_forms": list(FORMS), "static": {"pca_dims": 256, "build_s": build_s,
                                                                 "dir_given": bool(args.static_dir)}},
        "embedders": results,
        "static_threshold_matching_minilm_095": {
            "minilm_false_hit_rate_at_0.95": minilm_false,
            "lowest_static_threshold_with_no_more_false_hits": ok[0]["threshold"] if ok else None,
            "static_paraphrase_hit_rate_there": ok[0]["paraphrase_hit_rate"] if ok else None,
            "minilm_paraphrase_hit_rate_at_0.95": next(r["paraphrase_hit_rate"] for r in results[0]["by_threshold"]
                                                       if r["threshold"] == 0.95),
        },
        "seconds_total": time.perf_counter() - t_start,
    }
    from leanscale.core.io import atomic_write_json

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, record)
    print(f"wrote {args.out}")
    for r in results:
        print(r["embedder"], f"{r['ms_per_text_alone_p50']:.2f} ms/text")
        for row in r["by_threshold"]:
            print(f"  t={row['threshold']:.3f} para={row['paraphrase_hit_rate']:.3f} false={row['false_hit_rate']:.4f} "
                  f"false_same_numbers={row['false_hit_rate_same_numbers']:.4f}")
    print(record["static_threshold_matching_minilm_095"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
