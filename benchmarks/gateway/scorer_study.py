"""Which quality estimator for the gateway's cascade? Cross-validation on the TRAIN half only.

The cascade (``leanscale-cascade``) calls the cheap model (Mixtral-8x7B) first and escalates to the
big one (GPT-4) when its answer scorer does not trust the cheap answer. This study compares
candidate scorers of ``P(cheap answer correct | prompt, answer)`` on the train half of the same
seeded split as ``quality.py`` (``--test-fraction 0.5 --seed 0``: the test half is never read
here), with repeated stratified K-fold cross-validation (``--folds 5 --repeats 3``).

Candidates (features x learner):

* ``v1``: the first scorer (logistic regression on word TF-IDF of prompt and answer + 7 length /
  final-number features) -- the baseline;
* ``math``: the 21 dense features of ``scorer.ALL_FEATURES`` -- the structure of a math answer: final
  number (``####``, integer, sign, size, equal to the last computed result), equations checked
  with the safe arithmetic evaluator (how many, how many false), prompt numbers used, hedging
  words, lines, lengths;
* ``tfidf+math``: both TF-IDFs + the math features (the new AnswerScorer's layout);
* ``minilm``: MiniLM-L6 embeddings (``leanscale.models.embed_texts``, offline) of prompt and
  answer (768 dims), with or without the math features;
* learners: scikit-learn ``LogisticRegression`` (L2, C from a small grid) and
  ``HistGradientBoostingClassifier`` (default settings, and a shallow regularised one).

Reported per candidate (mean and sd over the repeats): out-of-fold ROC AUC, and the cascade's
cost/accuracy trade-off from the out-of-fold scores (escalate the lowest-scored share s of the
questions: accuracy = cheap answer's correctness where kept, big's where escalated; cost = the
cheap call always + big's call when escalated, tokens = words x quality.py's default prices):
accuracy and PGR at 20 / 30 / 40 / 50% escalations, the least escalation share (and its cost vs
always-big) reaching big's accuracy - 1 point (the issue's goal) and whether that costs <= 40% of
big. Also: per-feature single AUC of the math features, and the scorer's time per request.

Usage: python benchmarks/gateway/scorer_study.py [--folds 5 --repeats 3 --no-minilm]
Writes benchmarks/results/gateway/scorer_study.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import RESULTS, machine
from benchmarks.gateway.quality import CSV, load_rows, offline_cost, split

PRICE = {"small": (0.0006, 0.0018), "big": (0.01, 0.03)}  # quality.py's defaults
SHARES = (0.2, 0.3, 0.4, 0.5)


def tradeoff(p: np.ndarray, ok_small: np.ndarray, ok_big: np.ndarray, c_small: np.ndarray,
             c_big: np.ndarray) -> dict:
    """The cascade's trade-off when the lowest-scored k questions are escalated, k = 0..n."""
    n = len(p)
    order = np.argsort(p, kind="stable")  # least trusted first
    gain = (ok_big.astype(float) - ok_small.astype(float))[order]
    acc = ok_small.mean() + np.concatenate([[0.0], np.cumsum(gain)]) / n  # (n+1,)
    cost = c_small.sum() / n + np.concatenate([[0.0], np.cumsum(c_big[order])]) / n
    share = np.arange(n + 1) / n
    acc_s, acc_b, cost_b = ok_small.mean(), ok_big.mean(), c_big.mean()
    out = {"auc": auc(ok_small, p)}
    for s in SHARES:
        a = float(np.interp(s, share, acc))
        out[f"acc_at_{int(s * 100)}pct"] = a
        out[f"pgr_at_{int(s * 100)}pct"] = (a - acc_s) / (acc_b - acc_s)
    reach = np.flatnonzero(acc >= acc_b - 0.01)
    if len(reach):
        k = int(reach[0])
        out.update(share_to_reach_big_minus_1pt=float(share[k]), cost_vs_big_there=float(cost[k] / cost_b),
                   goal_met=bool(cost[k] <= 0.4 * cost_b))
    else:
        out.update(share_to_reach_big_minus_1pt=None, cost_vs_big_there=None, goal_met=False)
    out["acc_at_40pct_cost"] = float(acc[np.flatnonzero(cost <= 0.4 * cost_b)[-1]])
    return out


def auc(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y.astype(int), p))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", default=str(CSV))
    ap.add_argument("--test-fraction", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0, help="the split's seed (quality.py's)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-minilm", action="store_true", help="skip the MiniLM candidates")
    ap.add_argument("--out", default=str(RESULTS / "gateway" / "scorer_study.json"))
    args = ap.parse_args()
    if args.folds < 2 or args.repeats < 1:
        ap.error(f"--folds must be >= 2 and --repeats >= 1. Got {args.folds} and {args.repeats}.")
    from scipy import sparse
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import RepeatedStratifiedKFold

    from leanscale.cascade.gateway.scorer import (
        ALL_FEATURES,
        DENSE_FEATURES_V1,
        AnswerScorer,
        dense_features,
    )

    t_start = time.perf_counter()
    train, _test = split(load_rows(Path(args.csv)), args.test_fraction, args.seed)  # the test half is not used
    prompts = [r["prompt"] for r in train]
    answers = [r["response"]["small"] for r in train]
    ok_s = np.array([r["correct"]["small"] for r in train])
    ok_b = np.array([r["correct"]["big"] for r in train])
    c_s = np.array([offline_cost(r, "small", PRICE) for r in train])
    c_b = np.array([offline_cost(r, "big", PRICE) for r in train])
    n = len(train)

    t0 = time.perf_counter()
    M = dense_features(prompts, answers, ALL_FEATURES)  # (n, 21)
    math_us = (time.perf_counter() - t0) / n * 1e6
    v1_cols = [ALL_FEATURES.index(f) for f in DENSE_FEATURES_V1]
    single = {f: auc(ok_s, M[:, j]) for j, f in enumerate(ALL_FEATURES)}
    flagged = M[:, ALL_FEATURES.index("any_wrong_equation")] > 0
    emb = None
    embed_ms = None
    if not args.no_minilm:
        from leanscale.models import embed_texts

        embed_texts(["warm up"])
        t0 = time.perf_counter()
        emb = np.hstack([embed_texts(prompts), embed_texts(answers)]).astype(np.float64)  # (n, 768)
        embed_ms = (time.perf_counter() - t0) / (2 * n) * 1e3
        t0 = time.perf_counter()
        for p, a in zip(prompts[:20], answers[:20]):
            embed_texts([p]), embed_texts([a])
        embed_one_ms = (time.perf_counter() - t0) / 20 * 1e3

    def standardise(tr, te):
        mu, sd = tr.mean(0), tr.std(0)
        sd = np.where(sd > 1e-12, sd, 1.0)
        return (tr - mu) / sd, (te - mu) / sd

    def tfidf(tr_idx, te_idx):
        blocks = []
        for texts in (prompts, answers):
            vec = TfidfVectorizer(max_features=20_000, ngram_range=(1, 2), sublinear_tf=True)
            vec.fit([texts[i] for i in tr_idx])
            blocks.append((vec.transform([texts[i] for i in tr_idx]), vec.transform([texts[i] for i in te_idx])))
        return blocks

    def lr(C):
        def fit_predict(Xtr, ytr, Xte):
            m = LogisticRegression(C=C, max_iter=5000).fit(Xtr, ytr)
            return m.predict_proba(Xte)[:, 1]
        return fit_predict

    def hgb(**kw):
        def fit_predict(Xtr, ytr, Xte):
            m = HistGradientBoostingClassifier(random_state=0, **kw).fit(Xtr, ytr)
            return m.predict_proba(Xte)[:, 1]
        return fit_predict

    def features(kind, tr, te):
        """(X_train, X_test) of a feature set on the fold."""
        if kind == "v1":
            d_tr, d_te = standardise(M[tr][:, v1_cols], M[te][:, v1_cols])
            (p_tr, p_te), (a_tr, a_te) = tfidf(tr, te)
            return (sparse.hstack([p_tr, a_tr, sparse.csr_matrix(d_tr)], format="csr"),
                    sparse.hstack([p_te, a_te, sparse.csr_matrix(d_te)], format="csr"))
        if kind == "math":
            return standardise(M[tr], M[te])
        if kind.startswith("tfidf+math"):
            w = float(kind.split("*")[1]) if "*" in kind else 1.0  # weight of the dense block
            d_tr, d_te = standardise(M[tr], M[te])
            (p_tr, p_te), (a_tr, a_te) = tfidf(tr, te)
            return (sparse.hstack([p_tr, a_tr, sparse.csr_matrix(w * d_tr)], format="csr"),
                    sparse.hstack([p_te, a_te, sparse.csr_matrix(w * d_te)], format="csr"))
        if kind == "answer-tfidf+math":
            d_tr, d_te = standardise(M[tr], M[te])
            _, (a_tr, a_te) = tfidf(tr, te)
            return (sparse.hstack([a_tr, sparse.csr_matrix(d_tr)], format="csr"),
                    sparse.hstack([a_te, sparse.csr_matrix(d_te)], format="csr"))
        if kind == "minilm":
            return emb[tr], emb[te]
        if kind == "minilm+math":
            d_tr, d_te = standardise(M[tr], M[te])
            return np.hstack([emb[tr], d_tr]), np.hstack([emb[te], d_te])
        raise ValueError(kind)

    candidates = {
        "v1 (tfidf + 7 dense) / LR C=1 [baseline]": ("v1", lr(1.0)),
        "math / LR C=0.1": ("math", lr(0.1)),
        "math / LR C=1": ("math", lr(1.0)),
        "math / HGB default": ("math", hgb()),
        "math / HGB shallow (depth 3, 100 it, lr 0.05, l2 1)": (
            "math", hgb(max_depth=3, max_iter=100, learning_rate=0.05, l2_regularization=1.0, min_samples_leaf=20)),
        "tfidf+math / LR C=0.3": ("tfidf+math", lr(0.3)),
        "tfidf+math / LR C=1": ("tfidf+math", lr(1.0)),
        "tfidf+math (dense x3) / LR C=0.3": ("tfidf+math*3", lr(0.3)),
        "tfidf+math (dense x3) / LR C=1": ("tfidf+math*3", lr(1.0)),
        "answer-tfidf+math / LR C=1": ("answer-tfidf+math", lr(1.0)),
    }
    if emb is not None:
        candidates.update({
            "minilm / LR C=0.1": ("minilm", lr(0.1)),
            "minilm / LR C=1": ("minilm", lr(1.0)),
            "minilm+math / LR C=0.1": ("minilm+math", lr(0.1)),
            "minilm+math / LR C=1": ("minilm+math", lr(1.0)),
            "minilm+math / HGB shallow": (
                "minilm+math", hgb(max_depth=3, max_iter=100, learning_rate=0.05, l2_regularization=1.0,
                                   min_samples_leaf=20)),
        })
    cv = RepeatedStratifiedKFold(n_splits=args.folds, n_repeats=args.repeats, random_state=0)
    splits = list(cv.split(np.zeros(n), ok_s))
    results = {}
    for name, (kind, learner) in candidates.items():
        t0 = time.perf_counter()
        per_repeat = []
        for r in range(args.repeats):
            oof = np.zeros(n)
            for tr, te in splits[r * args.folds:(r + 1) * args.folds]:
                Xtr, Xte = features(kind, tr, te)
                oof[te] = learner(Xtr, ok_s[tr].astype(int), Xte)
            per_repeat.append(tradeoff(oof, ok_s, ok_b, c_s, c_b))
        summary = {}
        for key in per_repeat[0]:
            vals = [d[key] for d in per_repeat]
            if all(isinstance(v, bool) for v in vals):
                summary[key] = f"{sum(vals)}/{len(vals)} repeats"
            elif all(isinstance(v, (int, float)) for v in vals):
                summary[key] = {"mean": float(np.mean(vals)), "sd": float(np.std(vals))}
            else:
                summary[key] = vals
        summary["cv_seconds"] = time.perf_counter() - t0
        results[name] = summary
        print(f"{name:55s} auc={summary['auc']['mean']:.3f}±{summary['auc']['sd']:.3f} "
              f"pgr20={summary['pgr_at_20pct']['mean']:.2f} pgr50={summary['pgr_at_50pct']['mean']:.2f} "
              f"acc@40%cost={summary['acc_at_40pct_cost']['mean']:.3f} "
              f"reach={summary['share_to_reach_big_minus_1pt']}", flush=True)

    # the scorer's own time per request (features + TF-IDF + dot product), the new default
    scorer = AnswerScorer().fit(prompts, answers, ok_s)
    scorer.predict_proba(prompts[:5], answers[:5])
    t0 = time.perf_counter()
    for p, a in zip(prompts[:200], answers[:200]):
        scorer.predict_proba([p], [a])
    scorer_us = (time.perf_counter() - t0) / 200 * 1e6

    record = {
        "benchmark": "gateway_scorer_study",
        "machine": machine(),
        "settings": {"csv": str(args.csv), "test_fraction": args.test_fraction, "split_seed": args.seed,
                     "n_train": n, "folds": args.folds, "repeats": args.repeats, "prices_usd_per_1k": PRICE,
                     "note": "cross-validation on the train half only; the test half is never read"},
        "train_half": {"acc_small": float(ok_s.mean()), "acc_big": float(ok_b.mean()),
                       "oracle_acc": float((ok_s | ok_b).mean()), "oracle_big_share": float((~ok_s & ok_b).mean()),
                       "cost_small_vs_big": float(c_s.mean() / c_b.mean())},
        "single_feature_auc": single,
        "wrong_equation_flag": {"share_of_answers": float(flagged.mean()),
                                "acc_small_when_flagged": float(ok_s[flagged].mean()) if flagged.any() else None,
                                "acc_small_otherwise": float(ok_s[~flagged].mean()),
                                "share_of_wrong_answers_flagged": float(flagged[~ok_s].mean())},
        "candidates": results,
        "latency": {"math_features_us_per_request": math_us, "default_scorer_us_per_request": scorer_us,
                    "minilm_ms_per_text_batched": embed_ms,
                    "minilm_ms_per_request_prompt_and_answer_unbatched": (2 * embed_one_ms) if emb is not None
                    else None},
        "seconds_total": time.perf_counter() - t_start,
    }
    from leanscale.core.io import atomic_write_json

    out = Path(args.out)
    atomic_write_json(out, record, indent=1)
    print(json.dumps({k: record[k] for k in ("train_half", "wrong_equation_flag", "latency")}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
