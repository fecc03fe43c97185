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
from functools import partial
from pathlib import Path
from types import SimpleNamespace

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


def add_setup_args(ap: argparse.ArgumentParser) -> None:
    """The data, stage and timing options shared with ``wordnet_distill.py``."""
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


def setup(args, log=print) -> SimpleNamespace:
    """Data, split and the three stages of this benchmark (all trained on the training split).

    Returns a namespace: ``texts`` (the sample, in split order), ``emb`` (MiniLM, cached), ``S``
    (static embeddings), ``X_tr``/``X_pool`` (training texts / calibration + test texts),
    ``y_tr``/``y_pool``, ``cal``/``test`` (indices into the pool), ``tfidf``, ``L_tr`` (cross-fitted
    TF-IDF block of the training split), ``stack``, ``big``, ``encoder``, ``head`` (static),
    ``real`` (name -> stage) and ``train_seconds``.
    """
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
    log(f"trained in {time.perf_counter() - t_start:.0f} s (static embeddings of {len(texts)} texts "
        f"{t_embed_static:.1f} s, static head {t_static:.1f} s)")
    real = {"tfidf": ModelStage(tfidf, name="tfidf"), "static": static_stage, "big": ModelStage(big, name="big")}
    return SimpleNamespace(
        texts=texts, emb=emb, S=S, X_tr=X_tr, X_pool=X_pool, y_tr=y_tr, y_pool=y_pool, cal=cal, test=test,
        tfidf=tfidf, L_tr=L_tr, stack=stack, big=big, encoder=encoder, head=head, real=real,
        train_seconds={"tfidf_and_big": t_big, "static_embed_all_texts": t_embed_static, "static_head": t_static})


def measure_costs(real: dict, sample: list, repeats: int, log=print) -> tuple[dict, dict, dict]:
    """Seconds per request of each stage (batches of 64): ``(min, median, all repetitions)`` over
    ``repeats`` interleaved repetitions on ``sample``, after a warm-up call each."""
    for s in real.values():
        s.predict(sample[:64])  # warm-up (loads MiniLM, allocates)
    reps = {k: [] for k in real}
    for _ in range(repeats):
        for k, s in real.items():
            reps[k].append(timed(s.predict, sample) / len(sample))
    costs = {k: float(min(v)) for k, v in reps.items()}
    costs_median = {k: float(np.median(v)) for k, v in reps.items()}
    log("seconds per request (min): " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in costs.items()))
    return costs, costs_median, reps


def pool_outputs(d: SimpleNamespace) -> tuple[dict, np.ndarray]:
    """Outputs of tfidf, static and big on the calibration + test texts, and the TF-IDF block
    ``L_pool`` (STACK_SCALE * log p_tfidf) of those texts."""
    n_pool = len(d.X_pool)
    n_train = len(d.X_tr)
    p_tf = d.tfidf.predict_proba(d.X_pool)
    L_pool = d.stack.features(np.zeros((n_pool, 0), np.float32), d.X_pool)  # STACK_SCALE * log p_tfidf
    outs = {
        "tfidf": output_from_proba(p_tf, d.tfidf.classes_),
        "static": output_from_proba(d.head.predict_proba_embeddings(np.hstack([d.S[n_train:], L_pool])),
                                    d.head.classes_),
        "big": output_from_proba(d.big.predict_proba_embeddings(np.hstack([d.emb[n_train:], L_pool])),
                                 d.big.classes_),
    }
    return outs, L_pool


def accuracy_alone(outs: dict, d: SimpleNamespace, costs: dict) -> dict:
    correct = {k: o.labels == d.y_pool for k, o in outs.items()}
    return {k: {"test_accuracy": float(correct[k][d.test].mean()), "cal_accuracy": float(correct[k][d.cal].mean()),
                "seconds_per_request": costs[k], "speedup_by_cost": costs["big"] / costs[k]} for k in outs}


def run_cascades(chains, outs: dict, d: SimpleNamespace, costs: dict, costs_median: dict, target: float,
                 big_test: float, max_thresholds: int, log=print) -> tuple[dict, dict]:
    """Fit every chain with raw-confidence and learned deferral on the calibration split (replayed
    outputs), evaluate on the test split; returns ``(configs, fitted)`` keyed "a->b (deferral)"."""
    row = {}
    for i, t in enumerate(d.X_pool):  # a repeated gloss: every stage answers it the same way
        row.setdefault(t, i)
    X_cal, X_test = [d.X_pool[i] for i in d.cal], [d.X_pool[i] for i in d.test]
    y_pool, test = d.y_pool, d.test
    configs, fitted = {}, {}
    for chain in chains:
        for deferral in ("confidence", "learned"):
            key = f"{'->'.join(chain)} ({deferral})"
            t0 = time.perf_counter()
            casc = Cascade([LookupStage(k, costs[k], outs[k], row) for k in chain], target_accuracy=target,
                           deferral=deferral, max_thresholds=max_thresholds).fit(X_cal, y_pool[d.cal])
            t_fit = time.perf_counter() - t0
            det = casc.predict_detailed(X_test)
            acc = float(np.mean(det.labels == y_pool[test]))
            fractions = {k: float(np.mean(det.stage == k)) for k in chain}
            mean_cost = float(det.cost.mean())
            mean_cost_median = float(sum(costs_median[k] * np.mean([chain.index(st) >= chain.index(k)
                                                                    for st in det.stage]) for k in chain))
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
            log(f"{key}: test accuracy {acc:.4f} (gap {c['accuracy_gap_points']:.2f} points), answered "
                f"{fractions}, speed-up by cost {c['speedup_by_cost']:.2f}x (fit {t_fit:.1f} s)")
    return configs, fitted


def measure_end_to_end(fitted: dict, configs: dict, real: dict, X_thr: list, target: float, repeats: int,
                       log=print) -> dict:
    """The real stages (MiniLM included) on ``X_thr`` through each fitted cascade and through the
    big model alone, interleaved, ``repeats`` times; adds ``measured`` to ``configs``; returns the
    walls."""
    n_thr = len(X_thr)
    runners = {"big alone": real["big"].predict}
    for key, casc in fitted.items():
        chain = [s.name for s in casc.stages]
        r = Cascade([real[k] for k in chain], target_accuracy=target, deferral=casc.deferral)
        r.thresholds_, r.costs_, r.errors_ = dict(casc.thresholds_), dict(casc.costs_), {}
        r.deferral_ = casc.deferral_
        runners[key] = r.predict_detailed
    for fn in runners.values():
        fn(X_thr[:64])
    walls = {k: [] for k in runners}
    for _ in range(repeats):
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
        log(f"{key}: measured speed-up {configs[key]['measured']['speedup_min']:.2f}x (min), "
            f"{configs[key]['measured']['speedup_median']:.2f}x (median)")
    return walls


def main() -> None:
    ap = argparse.ArgumentParser()
    add_setup_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(2)
    name = "wordnet_middle" + (f"_{args.tag}" if args.tag else "")
    t_start = time.perf_counter()
    log = partial(print, flush=True)

    d = setup(args, log)
    real = d.real
    costs, costs_median, reps = measure_costs(real, d.X_pool[: args.cost_sample], args.repeats, log)
    outs, _ = pool_outputs(d)
    alone = accuracy_alone(outs, d, costs)
    log("alone on test: " + ", ".join(f"{k} {v['test_accuracy']:.4f}" for k, v in alone.items()))

    target = alone["big"]["cal_accuracy"] - args.slack / 100
    big_test = alone["big"]["test_accuracy"]
    configs, fitted = run_cascades((("tfidf", "big"), ("tfidf", "static", "big")), outs, d, costs, costs_median,
                                   target, big_test, args.max_thresholds, log)
    n_thr = min(args.throughput_requests, len(d.test))
    walls = measure_end_to_end(fitted, configs, real, [d.X_pool[i] for i in d.test[:n_thr]], target,
                               args.repeats, log)

    atomic_write_json(OUT / f"{name}.json", {
        "benchmark": "cascade/wordnet_middle", "machine": machine(), "settings": vars(args),
        "data": {"source": "WordNet 3.0 glosses -> 45 lexicographer files", "n_train": len(d.X_tr),
                 "n_cal": len(d.cal), "n_test": len(d.test)},
        "stages": {"tfidf": "TfidfClassifier (word uni+bigrams, logistic regression)",
                   "static": f"StaticEmbeddingStage: model2vec-distilled MiniLM-L6 (256-d) + cross-fitted TF-IDF "
                             f"log-probabilities, MLP head (hidden {args.static_hidden})",
                   "big": "MiniLM-L6 embeddings + cross-fitted TF-IDF log-probabilities, MLP head (hidden 512)"},
        "train_seconds": d.train_seconds,
        "costs_seconds_per_request": costs, "costs_seconds_per_request_median": costs_median,
        "cost_repeats": reps, "alone": alone, "target_cal_accuracy": target, "big_test_accuracy": big_test,
        "configurations": configs, "measured_walls_s": walls,
        "timing_note": ("per-stage costs: min (and median) over interleaved repetitions on 2 shared, noisy cores; "
                        "speed-up by cost = big alone's cost / the cascade's mean cost per test request from the "
                        "routing; measured = wall time of the real stages, interleaved with the big model"),
        "goal": ">= 5x the big model's requests/s at <= 0.5 points less accuracy (issue 17)",
        "seconds_total": time.perf_counter() - t_start,
    })
    log(f"wrote {OUT / (name + '.json')} in {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
