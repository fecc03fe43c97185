"""A middle stage and a learned deferral rule for the WordNet cascade (issue 17: >= 5x the big
model's requests/s at <= 0.5 points less accuracy).

Same data, split and big model as ``benchmarks/cascade/wordnet.py`` (WordNet glosses -> 45
lexicographer classes; 20,000 train, 8,000 calibration, 8,000 test; ``big`` = MLP head on MiniLM-L6
embeddings stacked with TF-IDF log-probabilities). Stages (all trained on the training split):

* ``tfidf``: :class:`TfidfClassifier`;
* ``static``: :class:`StaticEmbeddingStage` -- MiniLM-L6 distilled by model2vec into static token
  embeddings (256-d, ~0.3 ms a text) stacked with the TF-IDF log-probabilities (cross-fitted on the
  training split), under an MLP head: the big model's recipe with the transformer replaced by a
  table lookup;
* ``big``: as in wordnet.py.

Configurations, each fitted on the calibration split to the big model's calibration accuracy
minus ``--slack`` points and evaluated on the test split: ``tfidf -> big`` and ``tfidf -> static
-> big``, each with raw-confidence deferral (``Cascade()``) and learned deferral
(``Cascade(deferral="learned")``). Speed-up is reported two ways:

* **by cost**: per-stage seconds per request measured separately (batches of 64, the minimum over
  ``--repeats`` interleaved repetitions; median too), combined with the routing fractions on the
  test split -- the number the noisy shared cores disturb least;
* **measured**: the real stages (MiniLM included) run ``--throughput-requests`` test requests
  through each cascade and through the big model alone, interleaved, min and median of
  ``--repeats``.

Usage: nice -n 5 python benchmarks/cascade/wordnet_middle.py [--slack 0.3] [--max-thresholds 256]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import numpy as np
import torch

from benchmarks.common import RESULTS, machine
from leanscale.cascade import (
    CallableStage,
    Cascade,
    EmbeddingClassifier,
    ModelStage,
    StageOutput,
    StaticEmbeddingStage,
    TfidfClassifier,
)
from leanscale.cascade.stacking import StackedEncoder, cross_fitted_logp
from leanscale.cascade.stages import _default_static_encoder, proba_features
from leanscale.core.io import atomic_write_json
from leanscale.data._sampling import stratified_indices
from leanscale.data.embeddings import cached_text_embeddings
from leanscale.data.wordnet import load_wordnet_glosses

OUT = RESULTS / "cascade"


class LookupStage(CallableStage):
    """Replays precomputed outputs (features included) of the pool's texts (the requests are the
    texts themselves, so that the learned deferral sees their real lengths)."""

    def __init__(self, name, cost, out: StageOutput, row: dict):
        super().__init__(lambda ids: None, name=name, cost=cost, batched=True)
        self._o, self._row = out, row

    def _predict(self, items):
        i = np.array([self._row[t] for t in items], dtype=np.int64)
        o = self._o
        return StageOutput(o.labels[i].astype(object), o.confidence[i], o.answered[i], o.features[i])


def output_from_proba(p: np.ndarray, classes: np.ndarray) -> StageOutput:
    top = p.argmax(1)
    return StageOutput(np.asarray(classes, dtype=object)[top], p[np.arange(len(p)), top], np.ones(len(p), bool),
                       proba_features(p))


def timed(fn, items, batch=64) -> float:
    t0 = time.perf_counter()
    for s in range(0, len(items), batch):
        fn(items[s: s + batch])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-train", type=int, default=20_000)
    ap.add_argument("--n-cal", type=int, default=8_000)
    ap.add_argument("--n-test", type=int, default=8_000)
    ap.add_argument("--slack", type=float, default=0.3, help="points below the big model's calibration accuracy")
    ap.add_argument("--max-thresholds", type=int, default=256, help="candidate thresholds of the outer stage")
    ap.add_argument("--static-hidden", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cost-sample", type=int, default=512)
    ap.add_argument("--throughput-requests", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    name = "wordnet_middle" + (f"_{args.tag}" if args.tag else "")
    t_start = time.perf_counter()

    g = load_wordnet_glosses()
    names = np.array(g.label_names, dtype=object)
    labels_all = names[g.labels]
    n_total = args.n_train + args.n_cal + args.n_test
    idx = np.sort(stratified_indices(np.asarray(g.labels), n_total, args.seed))
    idx = np.random.default_rng(args.seed).permutation(idx)  # the split of wordnet.py
    tr, pool = idx[: args.n_train], idx[args.n_train:]
    texts = [g.texts[i] for i in idx]
    emb = cached_text_embeddings(texts)  # MiniLM (n_total, 384), cached on disk
    X_tr, X_pool = texts[: args.n_train], texts[args.n_train:]
    y_tr, y_pool = labels_all[tr], labels_all[pool]
    n_pool = len(pool)
    cal, test = np.arange(args.n_cal), np.arange(args.n_cal, n_pool)

    # ---- stages -----------------------------------------------------------------------------
    t0 = time.perf_counter()
    tfidf = TfidfClassifier().fit(X_tr, y_tr)
    L_tr = cross_fitted_logp(X_tr, y_tr, tfidf.classes_, args.seed)  # shared by both stacked heads
    stack = StackedEncoder(tfidf)
    big = EmbeddingClassifier(encoder=stack, hidden=512, epochs=20, seed=args.seed).fit_embeddings(
        np.hstack([emb[: args.n_train], L_tr]).astype(np.float32), y_tr)
    t_big = time.perf_counter() - t0
    t0 = time.perf_counter()
    encoder = _default_static_encoder()  # cache_dir()/minilm-static-256, built there once (~15 s)
    S = encoder.encode(texts)  # (n_total, 256)
    t_embed_static = time.perf_counter() - t0
    t0 = time.perf_counter()
    head = EmbeddingClassifier(encoder=None, hidden=args.static_hidden, epochs=20, seed=args.seed).fit_embeddings(
        np.hstack([S[: args.n_train], L_tr]).astype(np.float32), y_tr)
    static_stage = StaticEmbeddingStage(head, encoder, tfidf=tfidf, name="static")
    t_static = time.perf_counter() - t0
    print(f"trained in {time.perf_counter() - t_start:.0f} s (static embeddings of {len(texts)} texts "
          f"{t_embed_static:.1f} s, static head {t_static:.1f} s)", flush=True)

    tfidf_stage = ModelStage(tfidf, name="tfidf")
    big_stage = ModelStage(big, name="big")
    real = {"tfidf": tfidf_stage, "static": static_stage, "big": big_stage}

    # ---- per-stage costs, measured separately: interleaved repetitions, min and median ----------
    sample = X_pool[: args.cost_sample]
    for s in real.values():
        s.predict(sample[:64])  # warm-up (loads MiniLM, allocates)
    reps = {k: [] for k in real}
    for _ in range(args.repeats):
        for k, s in real.items():
            reps[k].append(timed(s.predict, sample) / len(sample))
    costs = {k: float(min(v)) for k, v in reps.items()}
    costs_median = {k: float(np.median(v)) for k, v in reps.items()}
    print("seconds per request (min): " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in costs.items()), flush=True)

    # ---- outputs on the pool, computed once ------------------------------------------------------
    p_tf = tfidf.predict_proba(X_pool)
    L_pool = stack.features(np.zeros((n_pool, 0), np.float32), X_pool)  # STACK_SCALE * log p_tfidf
    outs = {
        "tfidf": output_from_proba(p_tf, tfidf.classes_),
        "static": output_from_proba(head.predict_proba_embeddings(np.hstack([S[args.n_train:], L_pool])), head.classes_),
        "big": output_from_proba(big.predict_proba_embeddings(np.hstack([emb[args.n_train:], L_pool])), big.classes_),
    }
    correct = {k: o.labels == y_pool for k, o in outs.items()}
    alone = {k: {"test_accuracy": float(correct[k][test].mean()), "cal_accuracy": float(correct[k][cal].mean()),
                 "seconds_per_request": costs[k], "speedup_by_cost": costs["big"] / costs[k]} for k in outs}
    print("alone on test: " + ", ".join(f"{k} {v['test_accuracy']:.4f}" for k, v in alone.items()), flush=True)

    # ---- cascades -----------------------------------------------------------------------------
    row = {}
    for i, t in enumerate(X_pool):  # a repeated gloss: every stage answers it the same way
        row.setdefault(t, i)
    X_cal, X_test = [X_pool[i] for i in cal], [X_pool[i] for i in test]
    target = alone["big"]["cal_accuracy"] - args.slack / 100
    big_test = alone["big"]["test_accuracy"]
    configs = {}
    fitted = {}
    for chain in (("tfidf", "big"), ("tfidf", "static", "big")):
        for deferral in ("confidence", "learned"):
            key = f"{'->'.join(chain)} ({deferral})"
            t0 = time.perf_counter()
            casc = Cascade([LookupStage(k, costs[k], outs[k], row) for k in chain], target_accuracy=target,
                           deferral=deferral, max_thresholds=args.max_thresholds).fit(X_cal, y_pool[cal])
            t_fit = time.perf_counter() - t0
            det = casc.predict_detailed(X_test)
            acc = float(np.mean(det.labels == y_pool[test]))
            fractions = {k: float(np.mean(det.stage == k)) for k in chain}
            mean_cost = float(det.cost.mean())
            mean_cost_median = float(sum(costs_median[k] * np.mean([chain.index(st) >= chain.index(k)
                                                                    for st in det.stage]) for k in chain))
            # the test split's own frontier (descriptive: the best any threshold choice could do here)
            configs[key] = {
                "thresholds": casc.thresholds_, "fit_seconds": t_fit, "test_accuracy": acc,
                "accuracy_gap_points": 100 * (big_test - acc), "answered_fraction_test": fractions,
                "mean_cost_s_test": mean_cost, "speedup_by_cost": costs["big"] / mean_cost,
                "speedup_by_median_cost": costs_median["big"] / mean_cost_median,
                "cal_accuracy": casc.expected_accuracy_, "explain": casc.explain(),
            }
            c = configs[key]
            c["goal_5x_at_0.5_points_by_cost"] = bool(c["speedup_by_cost"] >= 5 and c["accuracy_gap_points"] <= 0.5)
            fitted[key] = casc
            print(f"{key}: test accuracy {acc:.4f} (gap {c['accuracy_gap_points']:.2f} points), answered "
                  f"{fractions}, speed-up by cost {c['speedup_by_cost']:.2f}x (fit {t_fit:.1f} s)", flush=True)

    # ---- measured end to end: the real stages on test requests, interleaved with the big model ----
    n_thr = min(args.throughput_requests, len(test))
    X_thr = [X_pool[i] for i in test[:n_thr]]
    runners = {"big alone": big_stage.predict}
    for key, casc in fitted.items():
        chain = [s.name for s in casc.stages]
        r = Cascade([real[k] for k in chain], target_accuracy=target, deferral=casc.deferral)
        r.thresholds_, r.costs_, r.errors_ = dict(casc.thresholds_), dict(casc.costs_), {}
        r.deferral_ = casc.deferral_
        runners[key] = r.predict_detailed
    for fn in runners.values():
        fn(X_thr[:64])
    walls = {k: [] for k in runners}
    for _ in range(args.repeats):
        for k, fn in runners.items():
            walls[k].append(timed(fn, X_thr))
    for key in fitted:
        configs[key]["measured"] = {
            "requests": n_thr, "speedup_min": min(walls["big alone"]) / min(walls[key]),
            "speedup_median": float(np.median(walls["big alone"]) / np.median(walls[key])),
            "cascade_requests_per_second_best": n_thr / min(walls[key]),
            "big_requests_per_second_best": n_thr / min(walls["big alone"]),
        }
        configs[key]["goal_5x_at_0.5_points_measured"] = bool(
            configs[key]["measured"]["speedup_min"] >= 5 and configs[key]["accuracy_gap_points"] <= 0.5)
        print(f"{key}: measured speed-up {configs[key]['measured']['speedup_min']:.2f}x (min), "
              f"{configs[key]['measured']['speedup_median']:.2f}x (median)", flush=True)

    atomic_write_json(OUT / f"{name}.json", {
        "benchmark": "cascade/wordnet_middle", "machine": machine(), "settings": vars(args),
        "data": {"source": "WordNet 3.0 glosses -> 45 lexicographer files", "n_train": len(tr),
                 "n_cal": len(cal), "n_test": len(test)},
        "stages": {"tfidf": "TfidfClassifier (word uni+bigrams, logistic regression)",
                   "static": f"StaticEmbeddingStage: model2vec-distilled MiniLM-L6 (256-d) + cross-fitted TF-IDF "
                             f"log-probabilities, MLP head (hidden {args.static_hidden})",
                   "big": "MiniLM-L6 embeddings + cross-fitted TF-IDF log-probabilities, MLP head (hidden 512)"},
        "train_seconds": {"tfidf_and_big": t_big, "static_embed_all_texts": t_embed_static, "static_head": t_static},
        "costs_seconds_per_request": costs, "costs_seconds_per_request_median": costs_median,
        "cost_repeats": reps, "alone": alone, "target_cal_accuracy": target, "big_test_accuracy": big_test,
        "configurations": configs, "measured_walls_s": walls,
        "timing_note": ("per-stage costs: min (and median) over interleaved repetitions on 2 shared, noisy cores; "
                        "speed-up by cost = big alone's cost / the cascade's mean cost per test request from the "
                        "routing; measured = wall time of the real stages, interleaved with the big model"),
        "goal": ">= 5x the big model's requests/s at <= 0.5 points less accuracy (issue 17)",
        "seconds_total": time.perf_counter() - t_start,
    })
    print(f"wrote {OUT / (name + '.json')} in {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
