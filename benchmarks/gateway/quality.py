"""Accuracy vs cost per request of the gateway's policies on a held-out split of GSM8K, through the
running gateway with real HTTP calls, on real model behaviour (issue #16).

Data: ``/work/shared/data/routellm/gsm8k_responses.csv`` (lm-sys/RouteLLM, Apache-2.0): 1,319
GSM8K questions with Mixtral-8x7B's ("small") and GPT-4's ("big") recorded responses and whether
each was correct. A seeded split keeps ``--test-fraction`` of the questions for the evaluation;
the rest trains the learned policies. Two fake OpenAI-compatible backends
(:class:`~leanscale.cascade.gateway.testing.FakeOpenAIBackend`, each in its own process) replay
each model's recorded response for the prompt; the gateway (its own process) sits in front of
them with a fallback ``small -> big``. For every answer the benchmark reads the model that
answered (``x-leanscale-model``) and the cost (``x-leanscale-cost-usd``: the fake's ``usage`` --
whitespace-separated words as tokens -- times the configured prices; defaults Mixtral-like
0.0006 / 0.0018 and GPT-4-like 0.01 / 0.03 USD per 1k prompt / completion tokens), checks that the
text is the answering model's recorded response, and scores it with the CSV's correctness.

Policies (``--policies``; :func:`run_policy` takes one name):

* ``always-small``, ``always-big``: ``model`` = that model;
* ``random:<p>``: the client sends ``big`` with probability p (seeded), else ``small``;
* ``leanscale-router:<knob>``: the gateway's learned router (``<knob>``: the share of big calls,
  or ``$<usd>`` a budget per request), trained on the train split with
  ``leanscale.cascade.gateway.policies.train_router``;
* ``leanscale-cascade[:<threshold>]``: small first, escalate to big when the answer scorer (trained
  on the train split with ``train_scorer``) does not trust the small answer; the cost is both calls'.

A policy the gateway does not offer (the training code or the config section is missing, the
gateway answers 404) is recorded as ``"available": false`` with the reason; nothing fails.

Reported per policy: accuracy, cost per request (USD), the share of requests answered by big,
the share of the small-to-big accuracy gap recovered, PGR = (acc - acc_small) / (acc_big -
acc_small); per family (random, router, cascade) the PGR at 20% and 50% big calls (interpolated
on the family's points, with (0, small) and (1, big) as ends) and APGR, the area under PGR vs
share of big calls (RouteLLM's summary; 0.5 for random routing). Goal (issue): the cascade
matches big's accuracy within 1 point at <= 40% of big's cost. The offline oracle (big exactly
when small is wrong and big right, from the CSV) is reported for scale.

Usage: python benchmarks/gateway/quality.py [--test-fraction 0.5 --concurrency 16 --limit 0]
Writes benchmarks/results/gateway/quality.json.
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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import RESULTS, machine
from benchmarks.gateway.common import (
    chat_body,
    classify,
    drive,
    start_backend,
    start_gateway,
)

CSV = Path("/work/shared/data/routellm/gsm8k_responses.csv")
SMALL_COL, BIG_COL = "mistralai/Mixtral-8x7B-Instruct-v0.1", "gpt-4-1106-preview"
COLUMNS = {"small": SMALL_COL, "big": BIG_COL}
DEFAULT_POLICIES = ("always-small,always-big,random:0.2,random:0.5,"
                    "leanscale-router:0.1,leanscale-router:0.2,leanscale-router:0.3,leanscale-router:0.5,"
                    "leanscale-router:0.7,leanscale-router:0.9,"
                    "leanscale-cascade:0.3,leanscale-cascade,leanscale-cascade:0.6,leanscale-cascade:0.7,"
                    "leanscale-cascade:0.75,leanscale-cascade:0.8,leanscale-cascade:0.85,leanscale-cascade:0.9")


def words(text: str) -> int:
    """The fake backend's token count."""
    return len(text.split())


def load_rows(path: Path) -> list[dict]:
    """The CSV's rows as {prompt, correct: {small, big}, response: {small, big}}."""
    if not path.is_file():
        raise SystemExit(f"error: --csv {str(path)!r} does not exist (expected the RouteLLM GSM8K responses file).")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        need = {"prompt", SMALL_COL, BIG_COL, SMALL_COL + "_response", BIG_COL + "_response"}
        missing = need - set(reader.fieldnames or ())
        if missing:
            raise SystemExit(f"error: --csv {str(path)!r} lacks the columns {sorted(missing)}.")
        rows = []
        for r in reader:
            rows.append({"prompt": r["prompt"],
                         "correct": {m: r[c].strip().lower() == "true" for m, c in COLUMNS.items()},
                         "response": {m: r[c + "_response"] for m, c in COLUMNS.items()}})
    return rows


def split(rows: list[dict], test_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, test): a seeded permutation; the first ``test_fraction`` of it is the test split."""
    order = np.random.default_rng(seed).permutation(len(rows))
    n_test = round(test_fraction * len(rows))
    return [rows[i] for i in order[n_test:]], [rows[i] for i in order[:n_test]]


def prices(args) -> dict[str, tuple[float, float]]:
    return {"small": (args.small_input_price, args.small_output_price),
            "big": (args.big_input_price, args.big_output_price)}


def offline_cost(row: dict, model: str, price: dict) -> float:
    pin, pout = price[model]
    return (words(row["prompt"]) * pin + words(row["response"][model]) * pout) / 1000.0


def cv_threshold(train: list[dict], price: dict, folds: int = 5, seed: int = 0) -> dict:
    """The cascade threshold chosen on the TRAIN split only: out-of-fold ``AnswerScorer``
    probabilities (``folds``-fold, stratified), then the lowest threshold (the cheapest) whose
    out-of-fold cascade accuracy is within 1 point of big's accuracy on the train split (the
    issue's goal), with its out-of-fold big share and cost vs big."""
    from sklearn.model_selection import StratifiedKFold

    from leanscale.cascade.gateway.scorer import AnswerScorer

    prompts = [r["prompt"] for r in train]
    answers = [r["response"]["small"] for r in train]
    ok_s = np.array([r["correct"]["small"] for r in train])
    ok_b = np.array([r["correct"]["big"] for r in train])
    c_s = np.array([offline_cost(r, "small", price) for r in train])
    c_b = np.array([offline_cost(r, "big", price) for r in train])
    oof = np.zeros(len(train))
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(train)), ok_s):
        sc = AnswerScorer().fit([prompts[i] for i in tr], [answers[i] for i in tr], ok_s[tr])
        oof[te] = sc.predict_proba([prompts[i] for i in te], [answers[i] for i in te])
    target = ok_b.mean() - 0.01
    for t in np.round(np.arange(0.05, 1.0, 0.01), 2):
        esc = oof < t
        acc = float(np.where(esc, ok_b, ok_s).mean())
        if acc >= target:
            return {"threshold": float(t), "oof_accuracy": acc, "oof_big_share": float(esc.mean()),
                    "oof_cost_vs_big": float((c_s.sum() + c_b[esc].sum()) / c_b.sum()),
                    "train_acc_big": float(ok_b.mean()), "folds": folds}
    return {"threshold": None, "note": "no threshold reaches big's accuracy - 1 point out of fold"}


def train_learned_policies(train: list[dict], price: dict, folder: Path) -> tuple[dict, dict]:
    """Train the router and the cascade's answer scorer on the train split with the gateway's own
    training functions; (config sections to add, {policy: why not available})."""
    sections, unavailable = {}, {}
    try:
        from leanscale.cascade.gateway.policies import train_router
    except ImportError as exc:
        unavailable["leanscale-router"] = f"leanscale.cascade.gateway.policies.train_router: {exc}"
    else:
        try:
            prompts = [r["prompt"] for r in train]
            train_router(prompts, {m: np.array([r["correct"][m] for r in train]) for m in COLUMNS},
                         {m: np.array([offline_cost(r, m, price) for r in train]) for m in COLUMNS},
                         folder / "router", prompt_tokens=np.array([words(p) for p in prompts], dtype=float),
                         completion_tokens={m: np.array([words(r["response"][m]) for r in train], dtype=float)
                                            for m in COLUMNS})
            sections["router"] = {"path": str(folder / "router")}
        except Exception as exc:  # noqa: BLE001 -- the policy is reported as not available
            unavailable["leanscale-router"] = f"train_router failed: {type(exc).__name__}: {exc}"[:500]
    try:
        from leanscale.cascade.gateway.policies import train_scorer
    except ImportError as exc:
        unavailable["leanscale-cascade"] = f"leanscale.cascade.gateway.policies.train_scorer: {exc}"
    else:
        try:
            train_scorer([r["prompt"] for r in train], [r["response"]["small"] for r in train],
                         np.array([r["correct"]["small"] for r in train]), folder / "scorer")
            sections["cascade"] = {"models": ["small", "big"], "scorer": str(folder / "scorer")}
        except Exception as exc:  # noqa: BLE001 -- the policy is reported as not available
            unavailable["leanscale-cascade"] = f"train_scorer failed: {type(exc).__name__}: {exc}"[:500]
    return sections, unavailable


def run_policy(policy: str, test: list[dict], url: str, concurrency: int, seed: int) -> dict:
    """Send every test prompt through the gateway under ``policy`` (see the module docstring) and
    score the answers. A policy the gateway refuses (non-200 on the first prompt) is returned as
    ``{"available": False, "reason": ...}``."""
    if policy in ("always-small", "always-big"):
        models = [policy.split("-")[1]] * len(test)
    elif policy.startswith("random:"):
        p = float(policy.split(":", 1)[1])
        rng = random.Random(seed)
        models = ["big" if rng.random() < p else "small" for _ in test]
    else:  # a gateway policy: leanscale-router[:knob], leanscale-cascade[:threshold]
        models = [policy] * len(test)
    (first,), _ = drive(url, [chat_body(models[0], test[0]["prompt"])], 1)
    if first.status != 200:
        kind, detail = classify(first)
        try:
            reason = json.loads(first.data)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            reason = f"{kind}: {detail}"
        return {"available": False, "reason": f"HTTP {first.status}: {reason}"[:500]}
    bodies = [chat_body(m, r["prompt"]) for m, r in zip(models, test)]
    t0 = time.perf_counter()
    results, wall = drive(url, bodies, concurrency)
    correct, cost, big, failed, mismatched = [], [], 0, 0, 0
    for r, row in zip(results, test):
        kind, content = classify(r)
        if kind != "ok" or r.model not in COLUMNS:
            failed += 1
            correct.append(False)
            cost.append(0.0)
            continue
        if content != row["response"][r.model]:
            mismatched += 1
        correct.append(row["correct"][r.model])
        try:
            cost.append(float(r.cost))
        except (TypeError, ValueError):
            cost.append(float("nan"))
        big += r.model == "big"
    n = len(test)
    return {"available": True, "requests": n, "failed": failed, "answers_not_matching_the_record": mismatched,
            "accuracy": float(np.mean(correct)), "cost_per_request_usd": float(np.mean(cost)),
            "big_share": big / n, "wall_s": time.perf_counter() - t0 if wall else None}


def gap_recovered(acc: float, acc_small: float, acc_big: float) -> float | None:
    gap = acc_big - acc_small
    return (acc - acc_small) / gap if gap > 0 else None


def family_summary(points: list[tuple[float, float]], acc_small: float, acc_big: float) -> dict:
    """PGR at 20% / 50% big calls (linear interpolation between the family's points, sorted by
    share of big calls, with (0, small) and (1, big) as ends) and APGR (the area under PGR vs
    share of big calls on [0, 1])."""
    pts = sorted([(0.0, acc_small), *points, (1.0, acc_big)])
    x = np.array([p[0] for p in pts])
    pgr = np.array([gap_recovered(a, acc_small, acc_big) or 0.0 for _, a in pts])
    x, idx = np.unique(x, return_index=True)  # one point per share (the first)
    pgr = pgr[idx]
    area = float(np.sum((x[1:] - x[:-1]) * (pgr[1:] + pgr[:-1]) / 2))
    return {"pgr_at_20pct_big": float(np.interp(0.2, x, pgr)), "pgr_at_50pct_big": float(np.interp(0.5, x, pgr)),
            "apgr": area, "points": [{"big_share": float(a), "pgr": float(b)} for a, b in zip(x, pgr)]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", default=str(CSV), help="the RouteLLM GSM8K responses file")
    ap.add_argument("--test-fraction", type=float, default=0.5, help="held-out share of the questions (0.5)")
    ap.add_argument("--limit", type=int, default=0, help="at most this many test questions (0: all)")
    ap.add_argument("--policies", default=DEFAULT_POLICIES, help="comma-separated policy names")
    ap.add_argument("--concurrency", type=int, default=16, help="concurrent clients (16)")
    ap.add_argument("--small-input-price", type=float, default=0.0006, help="USD per 1k prompt tokens (0.0006)")
    ap.add_argument("--small-output-price", type=float, default=0.0018, help="USD per 1k completion tokens")
    ap.add_argument("--big-input-price", type=float, default=0.01, help="USD per 1k prompt tokens (0.01)")
    ap.add_argument("--big-output-price", type=float, default=0.03, help="USD per 1k completion tokens (0.03)")
    ap.add_argument("--no-train", action="store_true", help="do not train the router and the cascade's scorer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "gateway" / "quality.json"))
    args = ap.parse_args()
    if not 0 < args.test_fraction < 1:
        ap.error(f"--test-fraction must be in (0, 1). Got {args.test_fraction}.")
    if args.limit < 0 or args.concurrency < 1:
        ap.error(f"--limit must be >= 0 and --concurrency >= 1. Got {args.limit} and {args.concurrency}.")
    for name in ("small_input_price", "small_output_price", "big_input_price", "big_output_price"):
        if not getattr(args, name) >= 0:
            ap.error(f"--{name.replace('_', '-')} must be >= 0. Got {getattr(args, name)}.")
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    for p in policies:
        if p.startswith("random:"):
            try:
                ok = 0 <= float(p.split(":", 1)[1]) <= 1
            except ValueError:
                ok = False
            if not ok:
                ap.error(f"--policies: {p!r} must be random:<p> with p in [0, 1].")
    t_start = time.perf_counter()
    rows = load_rows(Path(args.csv))
    train, test = split(rows, args.test_fraction, args.seed)
    if args.limit:
        test = test[:args.limit]
    price = prices(args)
    cascade_cv = None
    if not args.no_train and any(p.split(":", 1)[0] == "leanscale-cascade" for p in policies):
        cascade_cv = cv_threshold(train, price, seed=args.seed)  # the train split only
        if cascade_cv.get("threshold") is not None:
            chosen = f"leanscale-cascade:{cascade_cv['threshold']:g}"
            cascade_cv["policy"] = chosen
            if chosen not in policies:
                policies.append(chosen)
        print(f"cascade threshold chosen by 5-fold CV on the train split: {cascade_cv}", flush=True)

    with tempfile.TemporaryDirectory(prefix="leanscale-gw-quality-") as tmp:
        t0 = time.perf_counter()
        sections, unavailable = ({}, {p: "--no-train" for p in ("leanscale-router", "leanscale-cascade")}) \
            if args.no_train else train_learned_policies(train, price, Path(tmp))
        train_s = time.perf_counter() - t0
        backends = {}
        gateway = None
        try:
            for m, col in COLUMNS.items():
                backends[m] = start_backend(m, {"csv": str(args.csv), "prompt_column": "prompt",
                                                "response_column": col + "_response"})
            config = {"models": [{"name": m, "base_url": backends[m].base_url, "input_price_per_1k": price[m][0],
                                  "output_price_per_1k": price[m][1], "timeout_s": 30} for m in COLUMNS],
                      "fallbacks": {"small": ["big"]}}
            try:
                gateway = start_gateway({**config, **sections})
            except RuntimeError as exc:  # the gateway does not take the policy sections (yet)
                for key in sections:
                    unavailable[f"leanscale-{key}"] = f"the gateway refused the '{key}:' config section: " + \
                        str(exc).strip().splitlines()[-1][:400]
                gateway = start_gateway(config)
            url = gateway.base_url + "/chat/completions"
            results = {}
            for policy in policies:
                base = policy.split(":", 1)[0]
                if base in unavailable:
                    results[policy] = {"available": False, "reason": unavailable[base]}
                else:
                    results[policy] = run_policy(policy, test, url, args.concurrency, args.seed)
                r = results[policy]
                print(f"{policy:24s} " + (f"acc={r['accuracy']:.3f} cost=${r['cost_per_request_usd']:.5f} "
                                          f"big={r['big_share']:.2f} failed={r['failed']}" if r["available"]
                                          else f"not available: {r['reason'][:100]}"), flush=True)
        finally:
            for child in (gateway, *backends.values()):
                if child is not None:
                    child.stop()

    # the two ends and the gap
    acc = {m: float(np.mean([r["correct"][m] for r in test])) for m in COLUMNS}
    cost = {m: float(np.mean([offline_cost(r, m, price) for r in test])) for m in COLUMNS}
    ends = {m: results.get(f"always-{m}", {}) for m in COLUMNS}
    acc_small = ends["small"].get("accuracy", acc["small"])
    acc_big = ends["big"].get("accuracy", acc["big"])
    cost_big = ends["big"].get("cost_per_request_usd", cost["big"])
    for r in results.values():
        if r.get("available"):
            r["pgr"] = gap_recovered(r["accuracy"], acc_small, acc_big)
            r["cost_vs_big"] = r["cost_per_request_usd"] / cost_big if cost_big else None
    families = {}
    for fam in ("random", "leanscale-router", "leanscale-cascade"):
        pts = [(r["big_share"], r["accuracy"]) for p, r in results.items()
               if p.split(":", 1)[0] == fam and r.get("available")]
        if pts:
            families[fam] = family_summary(pts, acc_small, acc_big)
    oracle_big = [not r["correct"]["small"] and r["correct"]["big"] for r in test]
    oracle = {"accuracy": float(np.mean([r["correct"]["small"] or r["correct"]["big"] for r in test])),
              "big_share": float(np.mean(oracle_big)),
              "cost_per_request_usd": float(np.mean([offline_cost(r, "big" if b else "small", price)
                                                     for r, b in zip(test, oracle_big)])),
              "note": "offline, from the CSV: big exactly when small is wrong and big right (not a policy)"}
    cascades = {p: r for p, r in results.items() if p.startswith("leanscale-cascade") and r.get("available")}

    def cascade_goal(r: dict) -> bool:
        return r["accuracy"] >= acc_big - 0.01 and r["cost_per_request_usd"] <= 0.4 * cost_big

    goals = {
        "cascade_default_within_1pt_of_big_at_le_40pct_cost": (
            {"value": {"accuracy": cascades["leanscale-cascade"]["accuracy"],
                       "cost_vs_big": cascades["leanscale-cascade"]["cost_vs_big"]},
             "goal": f"accuracy >= {acc_big - 0.01:.4f} and cost <= 40% of big's", "met":
             cascade_goal(cascades["leanscale-cascade"])} if "leanscale-cascade" in cascades
            else {"value": "not available", "goal": "accuracy within 1 point of big at <= 40% of its cost",
                  "met": None}),
        "cascade_cv_threshold_meets_it (threshold chosen on the train split)": (
            {"value": {"policy": cascade_cv["policy"], "accuracy": cascades[cascade_cv["policy"]]["accuracy"],
                       "cost_vs_big": cascades[cascade_cv["policy"]]["cost_vs_big"]},
             "goal": f"accuracy >= {acc_big - 0.01:.4f} and cost <= 40% of big's",
             "met": cascade_goal(cascades[cascade_cv["policy"]])}
            if cascade_cv and cascade_cv.get("policy") in cascades else {"value": "not available", "met": None}),
        "cascade_any_threshold_meets_it (chosen on the test split: optimistic)": (
            {"value": sorted(p for p, r in cascades.items() if cascade_goal(r)), "met":
             any(cascade_goal(r) for r in cascades.values())} if cascades else {"value": "not available",
                                                                               "met": None}),
        "no_failed_requests": {"value": sum(r.get("failed", 0) for r in results.values()), "goal": "== 0",
                               "met": all(r.get("failed", 0) == 0 for r in results.values())},
        "answers_match_the_records": {"value": sum(r.get("answers_not_matching_the_record", 0)
                                                   for r in results.values()), "goal": "== 0",
                                      "met": all(r.get("answers_not_matching_the_record", 0) == 0
                                                 for r in results.values())},
        "gateway_ends_match_offline": {"value": {"always-small": acc_small, "always-big": acc_big,
                                                 "offline_small": acc["small"], "offline_big": acc["big"]},
                                       "goal": "equal", "met": acc_small == acc["small"] and acc_big == acc["big"]},
    }
    record = {
        "benchmark": "gateway_quality",
        "machine": machine(),
        "settings": {
            "csv": str(args.csv), "models": {"small": SMALL_COL, "big": BIG_COL}, "questions": len(rows),
            "test_fraction": args.test_fraction, "n_train": len(train), "n_test": len(test), "seed": args.seed,
            "limit": args.limit, "prices_usd_per_1k": {m: {"input": p[0], "output": p[1]} for m, p in price.items()},
            "tokens": "whitespace-separated words (the fake backend's usage)", "concurrency": args.concurrency,
            "policies": policies, "learned_policy_sections": sections, "train_s": train_s,
            "router_training": "leanscale.cascade.gateway.policies.train_router on the train split (TF-IDF "
                               "features, per-request costs from the recorded answers' words and the prices)",
            "cascade_training": "train_scorer on (prompt, small's recorded answer, small correct) of the train split",
            "cascade_threshold_cv": cascade_cv,
        },
        "offline": {"accuracy": acc, "cost_per_request_usd": cost, "oracle": oracle},
        "policies": results,
        "families": families,
        "goals": goals,
        "seconds_total": time.perf_counter() - t_start,
    }
    from leanscale.core.io import atomic_write_json

    out = Path(args.out)
    atomic_write_json(out, record, indent=1)
    print(json.dumps({"families": {k: {kk: v[kk] for kk in ("pgr_at_20pct_big", "pgr_at_50pct_big", "apgr")}
                                   for k, v in families.items()}, "goals": goals}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
