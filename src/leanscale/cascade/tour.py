"""The tour's chapter on cascades and routers, and the README headline from the benchmark."""

from __future__ import annotations

import numpy as np

from leanscale.core.registry import read_result

__all__ = ["chapter", "headline"]

_MAIN_BENCHMARK = "wordnet.json"


def _seconds_per_request(fn, items, batch=64) -> float:
    import time

    fn(items[:batch])  # warm-up: the first call loads MiniLM
    t0 = time.perf_counter()
    for s in range(0, len(items), batch):
        fn(items[s: s + batch])
    return (time.perf_counter() - t0) / len(items)


def chapter(ctx):
    import torch

    from leanscale.cascade import (
        Cascade,
        EmbeddingClassifier,
        ModelStage,
        Router,
        TfidfClassifier,
        evaluate_router,
        mine_rules,
    )
    from leanscale.cascade.stacking import StackedEncoder, cross_fitted_logp
    from leanscale.core.errors import InvalidParameterError
    from leanscale.data._sampling import stratified_indices
    from leanscale.data.embeddings import cached_text_embeddings
    from leanscale.data.wordnet import load_wordnet_glosses
    from leanscale.report.chapter import ChapterResult

    report = ctx.report
    report.add_paragraph(
        "Most requests do not need the biggest model. A cascade asks the cheapest stage first and passes a "
        "request on only when that stage is not confident enough; the thresholds are chosen on held-out data "
        "from the exact cost-accuracy frontier, optionally with a finite-sample guarantee (Learn-then-Test). "
        "Wang et al. (2022) made an EfficientNet cascade 5.4x faster than B7 at equal accuracy; FrugalGPT "
        "matched GPT-4 at up to 98% lower cost. A router (RouteLLM) decides up front from the text alone."
    )
    # quick: 3,000 training glosses, 1,000 calibration, 1,000 test (MiniLM embeds 5,000 texts, ~1 min
    # on 2 cores, cached on disk); full: the benchmark's 20,000 / 8,000 / 8,000.
    n_train, n_cal, n_test = (3000, 1000, 1000) if ctx.quick else (20000, 8000, 8000)
    g = load_wordnet_glosses()
    names = np.array(g.label_names, dtype=object)
    idx = np.random.default_rng(ctx.seed).permutation(
        np.sort(stratified_indices(np.asarray(g.labels), n_train + n_cal + n_test, ctx.seed)))
    texts = [g.texts[i] for i in idx]
    y = names[g.labels[idx]]
    ctx.log(f"embedding {len(texts):,} glosses with MiniLM (cached after the first run)")
    emb = cached_text_embeddings(texts)
    tr, cal, te = np.arange(n_train), np.arange(n_train, n_train + n_cal), np.arange(n_train + n_cal, len(texts))
    X = texts

    def sub(ix):
        return [X[i] for i in ix]

    rules = mine_rules(sub(tr), y[tr], min_precision=0.9)
    tfidf = TfidfClassifier().fit(sub(tr), y[tr])
    enc = StackedEncoder(tfidf)
    torch.manual_seed(ctx.seed)
    F_tr = np.hstack([emb[tr], cross_fitted_logp(sub(tr), y[tr], tfidf.classes_, ctx.seed)]).astype(np.float32)
    big = EmbeddingClassifier(encoder=enc, hidden=512, epochs=20, seed=ctx.seed).fit_embeddings(F_tr, y[tr])
    stages = ([rules.to_stage(name="rules")] if len(rules) else []) + [ModelStage(tfidf, name="tfidf"),
                                                                       ModelStage(big, name="big")]
    sample = sub(te[:256])
    for s in stages:  # measured cost: wall seconds per request in batches of 64
        s.cost = _seconds_per_request(s.predict, sample)

    # the big model on cached embeddings for calibration (same numbers as calling it, much faster)
    def big_proba(ix):
        return big.predict_proba_embeddings(enc.features(emb[ix], sub(ix)))

    acc_big = {name: float(np.mean(big.classes_[big_proba(ix).argmax(1)] == y[ix])) for name, ix in
               (("cal", cal), ("test", te))}
    acc_tfidf = float(np.mean(tfidf.predict(sub(te)) == y[te]))
    target = acc_big["cal"] - 0.005
    casc = Cascade(stages, target_accuracy=target).fit(sub(cal), y[cal])
    out = casc.predict_detailed(sub(te))
    acc = float(np.mean(out.labels == y[te]))
    big_cost = stages[-1].cost
    speedup = big_cost / float(out.cost.mean())
    if ctx.ledger is not None:
        ctx.ledger.record("cascade: test requests through the cascade", seconds=float(out.cost.sum()),
                          n_examples=len(te))
        ctx.ledger.record("cascade: the same requests, big model alone", seconds=big_cost * len(te),
                          n_examples=len(te))
    rows = [{"model": "rules" if len(rules) else "rules (none passed 0.9)",
             "test accuracy": None, "answers": f"{np.mean(out.stage == 'rules'):.1%}",
             "ms / request": stages[0].cost * 1e3 if len(rules) else None},
            {"model": "TF-IDF alone", "test accuracy": acc_tfidf, "answers": "100%",
             "ms / request": casc.costs_["tfidf"] * 1e3},
            {"model": "big (MiniLM + TF-IDF head) alone", "test accuracy": acc_big["test"], "answers": "100%",
             "ms / request": big_cost * 1e3},
            {"model": "cascade", "test accuracy": acc, "answers": "100%", "ms / request": float(out.cost.mean()) * 1e3}]
    report.add_section(f"WordNet glosses -> 45 classes ({n_train:,} training, {n_cal:,} calibration, "
                       f"{n_test:,} test)", level=3)
    report.add_table(rows, caption="costs measured on this machine (batches of 64); the cascade's cost is the sum "
                     "of the stages each request went through")
    report.add_preformatted(casc.explain())
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        fr = casc.frontier_
        ax.plot(fr.cost * 1e3, 100 * fr.accuracy, ".-", label=f"exact frontier ({len(fr)} settings)")
        ax.plot([big_cost * 1e3], [100 * acc_big["cal"]], "s", label="big model alone")
        ax.plot([casc.expected_cost_ * 1e3], [100 * casc.expected_accuracy_], "*", ms=12, label="chosen")
        ax.set_xscale("log")
        ax.set_xlabel("mean ms per request (log)")
        ax.set_ylabel("calibration accuracy (%)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        report.add_figure(fig, caption="Every Pareto-optimal threshold setting found by the exact search")
        plt.close(fig)
    except ImportError:  # plots are an optional extra
        pass

    # guarantee mode, one draw
    g_target = round(acc_big["cal"] - 0.01, 3)
    try:
        gc = Cascade(stages, target_accuracy=g_target, guarantee=True, delta=0.05).fit(sub(cal), y[cal])
        g_out = gc.predict_detailed(sub(te))
        g_row = (f"{float(np.mean(g_out.labels == y[te])):.1%} at {float(g_out.cost.mean()) * 1e3:.2f} ms "
                 f"(target {g_target:.1%})")
    except InvalidParameterError as exc:  # the target may not be certifiable on a small calibration set
        g_row = f"not certified: {exc}"
    report.add_paragraph(f"Guarantee mode (accuracy >= {g_target:.1%} with probability 95%): {g_row}.")

    # router: weak = TF-IDF, strong = big, trained on the calibration split's outcomes
    ok_w = tfidf.predict(sub(cal)) == y[cal]
    ok_s = big.classes_[big_proba(cal).argmax(1)] == y[cal]
    router = Router().fit(sub(cal), outcomes={"weak": ok_w, "strong": ok_s},
                          costs={"weak": casc.costs_["tfidf"], "strong": big_cost})
    ev = evaluate_router(router, sub(te), tfidf.predict(sub(te)) == y[te],
                         big.classes_[big_proba(te).argmax(1)] == y[te])
    if acc_big["test"] < acc_tfidf + 0.01:
        report.add_note(
            f"With {n_train:,} training glosses the big model is not clearly better than TF-IDF "
            f"({acc_big['test']:.1%} vs {acc_tfidf:.1%}), so the cascade rightly leaves it almost idle and the "
            "router's gap-recovered metrics are not meaningful (they divide by the accuracy gap). With 20,000 "
            "training glosses (the full tour, the benchmark) the gap is about 6 points.", kind="info")
    report.add_paragraph(
        f"Router (TF-IDF features, decides before calling any model): APGR {ev['apgr']:.3f} "
        f"(random {ev['random']['apgr']:.3f}, oracle {ev['oracle']['apgr']:.3f}); CPT(50%) {ev['cpt_50']:.1%} "
        "of requests sent to the big model to recover half of the accuracy gap.")
    summary = [
        {"metric": f"cascade vs big model, WordNet test ({n_test:,})",
         "value": f"{acc:.1%} vs {acc_big['test']:.1%}, {speedup:.1f}x cheaper per request",
         "paper": "Wang et al. 2022: 5.4x faster at equal accuracy"},
        {"metric": "answered by rules / TF-IDF / big",
         "value": " / ".join(f"{np.mean(out.stage == k):.0%}" for k in ("rules", "tfidf", "big")), "paper": ""},
        {"metric": "router APGR (random 0.5)", "value": f"{ev['apgr']:.3f}", "paper": "RouteLLM metric"},
    ]
    d = read_result("cascade", _MAIN_BENCHMARK)
    if d is not None:
        f = d["frontier"]
        summary.append({"metric": "benchmark: measured speed-up vs big model, accuracy gap",
                        "value": f"{f['measured']['speedup']:.1f}x, {f['accuracy_gap_points']:.2f} points less",
                        "paper": "goal: >= 5x at <= 0.5 points"})
    return ChapterResult(title="Filters and simpler models first: cascades and routers", summary_rows=summary)


def headline(results_root=None) -> str:
    """One line for the README table, from the committed benchmark results."""
    d = read_result("cascade", _MAIN_BENCHMARK, results_root)
    if d is None:
        return ""
    f, gr = d["frontier"], d["guarantee"]
    text = (f"WordNet cascade (rules -> TF-IDF -> MiniLM head): {f['measured']['speedup']:.1f}x the big model's "
            f"requests/s at {f['accuracy_gap_points']:.2f} points less accuracy")
    if gr.get("fraction_meeting_target") is not None:
        text += f"; guarantee held in {gr['fraction_meeting_target']:.0%} of {gr['splits'] - gr['refused']} splits"
    return text
