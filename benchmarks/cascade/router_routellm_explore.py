"""The GSM8K router ideas of issue #17's second attempt that did *not* make it into the library,
measured with the protocol of ``router_routellm.py`` (5 folds over the questions, seeds 0 1 2,
out-of-fold scores pooled, APGR / AUC mean and sd over the seeds), so the card's statements
about them can be rerun:

* ``aux_*``: learning with privileged information through auxiliary regressors: ridge
  regressions from the question (MiniLM + stats + math) to 14 numbers read off the two
  responses (log length, lines, ``=`` signs, numbers, arithmetic operators, log10 of the final
  answer, non-integer answer; GPT-4's and Mixtral's), nested out-of-fold (the training rows get
  inner 5-fold predictions, the held-out fold the full fit), appended as features.
* ``teacher=*``: the library's ``distill`` with other teachers: the hand-made response numbers
  above instead of ``prompt_stats``; both responses; the response's MiniLM embedding; the
  question's features too.
* ``knn``: the mean gain ``strong - weak`` of the k nearest training questions (MiniLM cosine).
* ``multinomial``: one 3-class logistic regression (strong better / tie / weak better), score
  ``P(strong better) - P(weak better)``; ``win``: one binary regression on "strong strictly
  better"; ``C``: the L2 strength.
* ``rank-avg``: the average of the per-seed ranks of several routers' out-of-fold scores.
* ``response_number_auc``: the AUC for "strong strictly better" of the 14 response numbers
  themselves (what a perfect auxiliary regressor could pass on).

A scratch re-implementation with plain scikit-learn (two logistic regressions, score
``P(strong) - P(weak)``) that reproduces the library's numbers to the last digit where both
exist (``base:*`` rows). Usage: ``nice -n 10 python benchmarks/cascade/router_routellm_explore.py``
writes ``benchmarks/results/cascade/router_routellm_explore.json`` (~10 min on 2 loaded cores).
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.cascade.router_routellm import (  # noqa: E402
    DATA,
    STRONG,
    WEAK,
    folds_by_group,
    load_gsm8k,
)
from benchmarks.common import RESULTS, machine  # noqa: E402
from leanscale.cascade.router import evaluate_router, math_question_stats, prompt_stats  # noqa: E402
from leanscale.core.io import atomic_write_json  # noqa: E402

NUM = re.compile(r"\d+(?:[.,]\d+)*")


def final_answer(r: str) -> float:
    m = re.findall(r"####\s*\$?\s*(-?[\d,]*\.?\d+)", r) or NUM.findall(r)[-1:] or ["0"]
    try:
        return float(m[-1].replace(",", ""))
    except ValueError:
        return 0.0


def response_numbers(responses) -> np.ndarray:
    """(n, 7) per response: log1p of chars, non-empty lines, '=' signs, numbers, operators; log10(1 +
    |final answer|); final answer not an integer."""
    rows = []
    for r in responses:
        a = final_answer(r)
        rows.append([math.log1p(len(r)), math.log1p(sum(1 for x in r.splitlines() if x.strip())),
                     math.log1p(r.count("=")), math.log1p(len(NUM.findall(r))),
                     math.log1p(len(re.findall(r"[\d)]\s*[-+*/x×÷]\s*[\d(]", r))), math.log10(abs(a) + 1),
                     float(a != round(a))])
    return np.array(rows)


def main() -> None:
    import pandas as pd
    import scipy.sparse as sp
    import torch
    from scipy.stats import rankdata
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.metrics import roc_auc_score
    from threadpoolctl import threadpool_limits

    from leanscale.data.embeddings import cached_text_embeddings

    torch.set_num_threads(1)
    threadpool_limits(1)
    t_start = time.perf_counter()
    D = load_gsm8k()
    texts, groups = D["texts"], D["groups"]
    n = len(texts)
    wq, sq = D["weak_q"], D["strong_q"]
    win, gain = sq > wq, sq - wq
    raw = pd.read_csv(DATA / "gsm8k_responses.csv")
    RW = raw[WEAK + "_response"].fillna("").astype(str).tolist()
    RS = raw[STRONG + "_response"].fillna("").astype(str).tolist()
    E = cached_text_embeddings(texts).astype(np.float64)
    ER = cached_text_embeddings(RS).astype(np.float64)  # GPT-4's responses (one teacher only)
    ST, MS, AUX = prompt_stats(texts), math_question_stats(texts), np.hstack([response_numbers(RS), response_numbers(RW)])
    PS, PSW = prompt_stats(RS), prompt_stats([a + "\n" + b for a, b in zip(RS, RW)])

    def zs(A, tr):
        mu, sd = A[tr].mean(0), A[tr].std(0)
        return (A - mu) / np.where(sd > 1e-12, sd, 1.0) / math.sqrt(A.shape[1])

    def stack(parts):
        if any(sp.issparse(p) for p in parts):
            return sp.hstack([p if sp.issparse(p) else sp.csr_matrix(p) for p in parts], format="csr")
        return np.hstack(parts)

    def tfidf(corpus, tr, held):
        v = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, max_features=50000)
        return v.fit_transform([corpus[i] for i in tr]), v.transform([corpus[i] for i in held])

    def question(blocks, tr, held):
        a, b = [], []
        if "tfidf" in blocks:
            x, y = tfidf(texts, tr, held)
            a.append(x), b.append(y)
        for name, M in (("minilm", E), ("stats", ST), ("math", MS)):
            if name in blocks:
                Z = M if name == "minilm" else zs(M, tr)
                a.append(Z[tr]), b.append(Z[held])
        return stack(a), stack(b)

    def lr(X, y, C=1.0, w=None):
        return LogisticRegression(C=C, max_iter=2000).fit(X, y, sample_weight=w)

    def pair(Xtr, Xh, tr, C=1.0, soft=None):
        out = 0.0
        for sign, y in ((1, sq > 0), (-1, wq > 0)):
            if soft is None:
                p = lr(Xtr, y[tr], C).predict_proba(Xh)[:, 1]
            else:  # soft labels: each row twice, weights p and 1 - p
                s = soft[0 if sign == 1 else 1]
                p = lr(stack([Xtr, Xtr]) if sp.issparse(Xtr) else np.vstack([Xtr, Xtr]),
                       np.r_[np.ones(len(tr)), np.zeros(len(tr))], C, np.r_[s, 1 - s]).predict_proba(Xh)[:, 1]
            out = out + sign * p
        return out

    def inner_folds(m, seed, k=5):
        return np.random.default_rng(100 + seed).permutation(m) % k

    def aux_features(tr, held, seed, cols):
        X = np.hstack([E, zs(ST, tr), zs(MS, tr)])
        out = np.zeros((n, len(cols)))
        out[held] = Ridge(alpha=1.0).fit(X[tr], AUX[tr][:, cols]).predict(X[held])
        f = inner_folds(len(tr), seed)
        for i in range(5):
            a, b = tr[f != i], tr[f == i]
            out[b] = Ridge(alpha=1.0).fit(X[a], AUX[a][:, cols]).predict(X[b])
        return zs(out, tr)

    def teacher(tr, seed, kind):
        """Inner-OOF teacher logits (strong, weak) on the training rows."""
        f = inner_folds(len(tr), seed)
        out = np.zeros((2, len(tr)))
        corpus = [a + "\n" + b for a, b in zip(RS, RW)] if kind == "both" else RS
        dense = {"hand": AUX[:, :7], "both": np.hstack([AUX, PSW]), "emb": PS, "question": PS}[kind]
        for i in range(5):
            a, b = tr[f != i], tr[f == i]
            A, B = tfidf(corpus, a, b)
            Z = zs(dense, tr)
            A, B = [A, Z[a]], [B, Z[b]]
            if kind == "emb":
                A.append(ER[a]), B.append(ER[b])
            if kind == "question":
                Q = np.hstack([E, zs(ST, tr), zs(MS, tr)])
                A.append(Q[a]), B.append(Q[b])
            for c, y in enumerate((sq > 0, wq > 0)):
                out[c, f == i] = lr(stack(A), y[a]).decision_function(stack(B))
        return out

    def sig(z):
        return 1 / (1 + np.exp(-z))

    def knn(tr, held, k):
        idx = np.argsort(-(E[held] @ E[tr].T), axis=1)[:, :k]
        return gain[tr][idx].mean(1)

    B3 = ("minilm", "stats", "math")
    settings = {
        "base:tfidf+minilm+stats": lambda tr, h, s: pair(*question(("tfidf", "minilm", "stats"), tr, h), tr),
        "base:minilm+stats+math": lambda tr, h, s: pair(*question(B3, tr, h), tr),
        "base:tfidf+minilm+stats+math": lambda tr, h, s: pair(*question(("tfidf",) + B3, tr, h), tr),
        "base:tfidf": lambda tr, h, s: pair(*question(("tfidf",), tr, h), tr),
        "base:minilm": lambda tr, h, s: pair(*question(("minilm",), tr, h), tr),
        "base:stats+math": lambda tr, h, s: pair(*question(("stats", "math"), tr, h), tr),
        "base:math": lambda tr, h, s: pair(*question(("math",), tr, h), tr),
        "minilm+stats+math C=0.3": lambda tr, h, s: pair(*question(B3, tr, h), tr, C=0.3),
        "minilm+stats+math C=3": lambda tr, h, s: pair(*question(B3, tr, h), tr, C=3.0),
        "minilm+stats+math win": lambda tr, h, s: lr(question(B3, tr, h)[0], win[tr]).decision_function(question(B3, tr, h)[1]),
    }

    def multinomial(tr, h, s):
        Xtr, Xh = question(B3, tr, h)
        m = lr(Xtr, gain[tr].astype(int))
        P, cl = m.predict_proba(Xh), list(m.classes_)
        return P[:, cl.index(1)] - P[:, cl.index(-1)]

    settings["minilm+stats+math multinomial"] = multinomial
    for name, cols in (("aux_gpt4_5", [0, 1, 2, 3, 4]), ("aux_all_14", list(range(14)))):
        def fn(tr, h, s, cols=cols):
            Xtr, Xh = question(B3, tr, h)
            Z = aux_features(tr, h, s, cols)
            return pair(np.hstack([Xtr, Z[tr]]), np.hstack([Xh, Z[h]]), tr)
        settings[f"minilm+stats+math + {name}"] = fn
    for k in (25, 50, 100, 200):
        settings[f"knn k={k}"] = lambda tr, h, s, k=k: knn(tr, h, k)
    for kind in ("hand", "both", "emb", "question"):
        def fn(tr, h, s, kind=kind):
            T = teacher(tr, s, kind)
            soft = [0.6 * sig(T[c]) + 0.4 * y[tr] for c, y in enumerate((sq > 0, wq > 0))]
            return pair(*question(B3, tr, h), tr, soft=soft)
        settings[f"minilm+stats+math distill=0.6 teacher={kind}"] = fn

    results, oofs = {}, {}
    for name, fn in settings.items():
        t0 = time.perf_counter()
        ap, au, per = [], [], []
        for seed in (0, 1, 2):
            oof = np.zeros(n)
            for held in folds_by_group(groups, 5, seed):
                tr = np.setdiff1d(np.arange(n), held)
                oof[held] = fn(tr, held, seed)
            ap.append(evaluate_router(oof, None, wq, sq)["apgr"])
            au.append(float(roc_auc_score(win, oof)))
            per.append(oof)
        oofs[name] = per
        results[name] = {"apgr": {"mean": float(np.mean(ap)), "sd": float(np.std(ap, ddof=1)), "per_seed": ap},
                         "auc": {"mean": float(np.mean(au))}, "seconds": time.perf_counter() - t0}
        print(f"{name:50s} APGR {np.mean(ap):.3f} +- {np.std(ap, ddof=1):.3f}  AUC {np.mean(au):.3f}", flush=True)
    for combo in (("base:tfidf", "base:minilm", "base:stats+math"), ("base:tfidf", "base:minilm", "base:stats+math", "knn k=50"),
                  ("base:tfidf+minilm+stats+math", "knn k=50")):
        ap = [evaluate_router(sum(rankdata(oofs[c][s]) / n for c in combo), None, wq, sq)["apgr"] for s in range(3)]
        results["rank-avg " + " + ".join(combo)] = {"apgr": {"mean": float(np.mean(ap)), "sd": float(np.std(ap, ddof=1)),
                                                             "per_seed": ap}}
        print(f"rank-avg {combo}  APGR {np.mean(ap):.3f} +- {np.std(ap, ddof=1):.3f}", flush=True)
    names = [f"{who}_{x}" for who in ("gpt4", "mixtral") for x in ("chars", "lines", "equals", "numbers", "operators",
                                                                    "log10_answer", "non_integer_answer")]
    # how much the privileged numbers themselves say about "strong strictly better" (the true values, not predicted)
    response_auc = {nm: float(roc_auc_score(win, AUX[:, j])) for j, nm in enumerate(names)}
    print("AUC of the true response numbers:", {k: round(v, 3) for k, v in response_auc.items()})
    out = RESULTS / "cascade" / "router_routellm_explore.json"
    atomic_write_json(out, {
        "benchmark": "cascade/router_routellm_explore", "machine": machine(),
        "protocol": "as router_routellm.py: GSM8K, 5 folds over questions, seeds 0 1 2, out-of-fold scores pooled; "
                    "mean and sd over seeds. Scratch scikit-learn re-implementation (base:* rows reproduce the library).",
        "selection_note": f"{len(results)} settings measured on the same 1,319 questions: the best of them is biased upward",
        "response_number_auc": response_auc, "results": results, "total_seconds": time.perf_counter() - t_start})
    print(f"wrote {out} in {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
