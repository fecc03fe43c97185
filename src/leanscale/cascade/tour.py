"""The tour's chapter on cascades and routers (WordNet glosses, then the LLM gateway on GSM8K), and the
README headline from the benchmark."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

import numpy as np

from leanscale.core.errors import InvalidParameterError
from leanscale.core.registry import read_result

__all__ = ["chapter", "headline", "gateway_section", "gateway_comparison", "gsm8k_candidates",
           "load_gsm8k_responses", "gsm8k_split"]

_MAIN_BENCHMARK = "wordnet.json"


def _seconds_per_request(fn, items, batch=64) -> tuple[float, int, str]:
    """Wall seconds per request of ``fn`` on ``items`` in batches of ``batch`` (after a warm-up
    call), and the peak increase of resident memory while it ran, with how it was measured."""
    import time

    from leanscale.core.measure import measure

    fn(items[:batch])  # warm-up: the first call loads MiniLM
    with measure("cpu", interval_seconds=0.002) as m:
        t0 = time.perf_counter()
        for s in range(0, len(items), batch):
            fn(items[s: s + batch])
        seconds = time.perf_counter() - t0
    return seconds / len(items), m.peak_memory_bytes, m.method


class _KnownEmbeddings:
    """``texts -> (n, 384)`` MiniLM embeddings for the big model: rows computed once for the
    chapter's glosses (:func:`~leanscale.data.embeddings.cached_text_embeddings`, cached on disk)
    are looked up; a batch with any other text, or any batch while ``live`` is set, runs MiniLM.

    The cascade's calibration runs the big model on every calibration request twice (temperature,
    then the frontier), and the guarantee mode again: with the lookup those passes cost a table
    read instead of ~7 ms of MiniLM per request, for the same embeddings (up to float rounding:
    MiniLM's output depends slightly on the batch a text is padded in). The stages' cost per request
    is measured with ``live`` set, so the bill is MiniLM's."""

    def __init__(self, texts, embeddings):
        self.row = {t: i for i, t in enumerate(texts)}
        self.embeddings = embeddings  # (n, 384)
        self.live = False

    def __call__(self, texts):
        from leanscale.models.encoders import embed_texts

        rows = [self.row.get(t) for t in texts]
        if self.live or any(r is None for r in rows):
            return embed_texts(list(texts))
        return self.embeddings[rows]


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
    # quick: 3,000 training glosses, 1,000 calibration, 1,000 test (MiniLM embeds 5,000 texts, ~35 s
    # on 2 cores, cached on disk); full: 14,000 training glosses, 3,000 calibration and 3,000 test
    # (20,000 texts, ~2 minutes of MiniLM on the first run; the benchmark: 20,000 training glosses,
    # 8,000 calibration and 8,000 test: 36,000 texts were most of a 636-s full tour).
    n_train, n_cal, n_test = (3000, 1000, 1000) if ctx.quick else (14000, 3000, 3000)
    g = load_wordnet_glosses()
    names = np.array(g.label_names, dtype=object)
    idx = np.random.default_rng(ctx.seed).permutation(
        np.sort(stratified_indices(np.asarray(g.labels), n_train + n_cal + n_test, ctx.seed)))
    texts = [g.texts[i] for i in idx]
    y = names[g.labels[idx]]
    ctx.log(f"embedding {len(texts):,} glosses with MiniLM (cached after the first run)")
    # shortest first: batches of similar length pad less (3,072 glosses here: 57 CPU s instead of 71)
    by_length = np.argsort([len(t) for t in texts], kind="stable")
    emb_sorted = cached_text_embeddings([texts[i] for i in by_length])  # (n, 384)
    emb = np.empty_like(emb_sorted)
    emb[by_length] = emb_sorted
    tr, cal, te = np.arange(n_train), np.arange(n_train, n_train + n_cal), np.arange(n_train + n_cal, len(texts))
    X = texts

    def sub(ix):
        return [X[i] for i in ix]

    rules = mine_rules(sub(tr), y[tr], min_precision=0.9)
    tfidf = TfidfClassifier().fit(sub(tr), y[tr])
    known = _KnownEmbeddings(texts, emb)
    enc = StackedEncoder(tfidf, embed=known)
    torch.manual_seed(ctx.seed)
    F_tr = np.hstack([emb[tr], cross_fitted_logp(sub(tr), y[tr], tfidf.classes_, ctx.seed)]).astype(np.float32)
    big = EmbeddingClassifier(encoder=enc, hidden=512, epochs=20, seed=ctx.seed).fit_embeddings(F_tr, y[tr])
    stages = ([rules.to_stage(name="rules")] if len(rules) else []) + [ModelStage(tfidf, name="tfidf"),
                                                                       ModelStage(big, name="big")]
    sample = sub(te[:256])
    known.live = True  # the bill: MiniLM itself runs while the costs are measured
    memory = {}
    for s in stages:  # measured cost: wall seconds per request in batches of 64, and peak memory
        s.cost, memory[s.name], memory_method = _seconds_per_request(s.predict, sample)
    known.live = False

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
        # seconds: the measured cost per request of each stage a request went through, summed;
        # memory: the peak increase while each stage served the 256 timed requests (models loaded),
        # the cascade's the largest of the stages it called
        compare = "cascade: rules -> TF-IDF -> big vs the big model alone"
        order = [s.name for s in stages]
        answered_by = [order.index(k) for k in set(out.stage.tolist()) if k in order]
        used = order[: max(answered_by) + 1] if answered_by else order  # every stage a request passed
        note = "peak while serving 256 requests in batches of 64, models loaded"
        ctx.ledger.record("cascade: test requests through the cascade", seconds=float(out.cost.sum()),
                          n_examples=len(te), peak_memory_bytes=max(memory[k] for k in used) if used else None,
                          memory_method=memory_method, memory_note=note, compare=compare, side="technique")
        ctx.ledger.record("cascade: the same requests, big model alone", seconds=big_cost * len(te),
                          n_examples=len(te), peak_memory_bytes=memory["big"], memory_method=memory_method,
                          memory_note=note, compare=compare, side="baseline")
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
    report.add_paragraph(
        f"Every gloss is embedded by MiniLM once ({len(texts):,} texts, cached on disk for the next run): the "
        "calibration passes of the cascade (temperature, frontier, guarantee mode) and the test read the big "
        "model's embeddings from that table instead of running MiniLM again (the same embeddings, up to float "
        "rounding). The "
        "costs per request above are measured with MiniLM running, on 256 test requests.")
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
            "router's gap-recovered metrics are not meaningful (they divide by the accuracy gap). With more "
            "training glosses (the full tour: 14,000; the benchmark: 20,000) the gap grows: about 6 points in "
            "the benchmark.", kind="info")
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
    summary += gateway_section(ctx)
    d = read_result("cascade", _MAIN_BENCHMARK)
    if d is not None:
        f = d["frontier"]
        summary.append({"metric": "benchmark: measured speed-up vs big model, accuracy gap",
                        "value": f"{f['measured']['speedup']:.1f}x, {f['accuracy_gap_points']:.2f} points less",
                        "paper": "goal: >= 5x at <= 0.5 points"})
    mid = read_result("cascade", "wordnet_middle.json")
    if mid is not None:  # the middle stage (static embeddings) and the learned deferral (issue 17)
        best = max(mid["configurations"].items(), key=lambda kv: kv[1]["speedup_by_cost"])
        summary.append({"metric": f"benchmark: {best[0]}",
                        "value": f"{best[1]['speedup_by_cost']:.1f}x, {best[1]['accuracy_gap_points']:.2f} points less",
                        "paper": "goal: >= 5x at <= 0.5 points"})
    return ChapterResult(title="Filters and simpler models first: cascades and routers", summary_rows=summary)


# ------------------------------------------------------------------------------ the LLM gateway
# Real model behaviour, offline: 1,319 GSM8K questions with Mixtral-8x7B's ("small") and GPT-4's
# ("big") recorded answers and correctness (lm-sys/RouteLLM, Apache-2.0), replayed by two fake
# OpenAI-compatible backends behind the gateway.
GSM8K_FILE = "gsm8k_responses.csv"
GSM8K_MODELS = {"small": "mistralai/Mixtral-8x7B-Instruct-v0.1", "big": "gpt-4-1106-preview"}
GATEWAY_PRICES = {"small": (0.0006, 0.0018), "big": (0.01, 0.03)}  # USD per 1k prompt / completion tokens
_NO_RECORD = "(no recorded answer for this prompt)"


def gsm8k_candidates() -> list[Path]:
    """Where the tour looks for the RouteLLM GSM8K responses file, in order:
    ``$LEANSCALE_DATA_ROOT/routellm/`` and ``$LEANSCALE_DATA_ROOT/`` when that variable is set,
    then ``shared/data/routellm/`` beside the source checkout and beside the current folder."""
    from leanscale.data.paths import DATA_ROOT_ENV

    out: list[Path] = []
    env = os.environ.get(DATA_ROOT_ENV)
    if env:
        root = Path(env).expanduser()
        out += [root / "routellm" / GSM8K_FILE, root / GSM8K_FILE]
    checkout = Path(__file__).resolve().parents[3]  # src/leanscale/cascade/tour.py -> the repository
    for base in (checkout.parent, Path.cwd().resolve().parent):
        path = base / "shared" / "data" / "routellm" / GSM8K_FILE
        if path not in out:
            out.append(path)
    return out


def load_gsm8k_responses(path: str | os.PathLike) -> list[dict]:
    """The GSM8K file's rows as ``{"prompt", "correct": {model: bool}, "response": {model: str}}``
    (``model``: "small", "big").

    Raises:
        DataFormatError: the file lacks one of the columns (they are named).
    """
    import csv

    from leanscale.core.errors import DataFormatError

    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        need = ["prompt"] + [c + s for c in GSM8K_MODELS.values() for s in ("", "_response")]
        missing = [c for c in need if c not in (reader.fieldnames or ())]
        if missing:
            raise DataFormatError(f"The GSM8K responses file {str(path)!r} must have the columns {need}. "
                                  f"Missing: {missing}.")
        return [{"prompt": r["prompt"],
                 "correct": {m: r[c].strip().lower() == "true" for m, c in GSM8K_MODELS.items()},
                 "response": {m: r[c + "_response"] for m, c in GSM8K_MODELS.items()}} for r in reader]


def gsm8k_split(n_rows: int, n_train: int, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) row indices: a seeded permutation, its first ``n_test`` rows for the test and
    the next ``n_train`` for training."""
    order = np.random.default_rng(seed).permutation(n_rows)
    return order[n_test:n_test + n_train], order[:n_test]


@contextlib.contextmanager
def _running_gateway(config):
    """``create_gateway_app(config)`` served by uvicorn on a free 127.0.0.1 port in a thread;
    yields the base URL (``.../v1``); stopped and joined on exit."""
    import threading
    import time

    import uvicorn

    from leanscale.cascade.gateway import create_gateway_app

    server = uvicorn.Server(uvicorn.Config(create_gateway_app(config), host="127.0.0.1", port=0,
                                           log_level="error", access_log=False, lifespan="on", ws="none",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, name="tour-gateway", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    try:
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start within 30 s")
            time.sleep(0.005)
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(30)
    if thread.is_alive():  # reached only when the block ended without an exception
        raise RuntimeError("the gateway did not shut down within 30 s")


async def _send(url: str, model: str, prompts: list[str], concurrency: int) -> list[tuple]:
    """POST a chat completion per prompt with ``model``; (status, answering model, text, cost header)."""
    import asyncio

    import httpx

    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30.0) as client:
        async def one(prompt: str):
            async with gate:
                r = await client.post("/chat/completions", json={
                    "model": model, "messages": [{"role": "user", "content": prompt}]})
            text = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.text
            return r.status_code, r.headers.get("x-leanscale-model"), text, r.headers.get("x-leanscale-cost-usd")

        return list(await asyncio.gather(*(one(p) for p in prompts)))


def gateway_comparison(csv_path: str | os.PathLike, *, n_train: int = 300, n_test: int = 150,
                       knobs: tuple[float, ...] = (0.2, 0.5, 0.8), threshold: float = 0.5, seed: int = 0,
                       folds: int = 5, concurrency: int = 4, log=None) -> dict:
    """Accuracy and cost per request of the gateway's policies on held-out GSM8K questions, through
    the running gateway over HTTP.

    Two :class:`~leanscale.cascade.gateway.testing.FakeOpenAIBackend` servers replay Mixtral's
    ("small") and GPT-4's ("big") recorded answers; the router
    (:func:`~leanscale.cascade.gateway.policies.train_router`) and the cascade's answer scorer
    (:func:`~leanscale.cascade.gateway.policies.train_scorer`) are trained on ``n_train`` questions;
    the ``n_test`` others are sent through the gateway once per policy, each answer scored with the
    file's correctness of the model that answered (``x-leanscale-model``) and costed by
    ``x-leanscale-cost-usd`` (the fake counts words as tokens; :data:`GATEWAY_PRICES`).

    Args:
        csv_path: the RouteLLM GSM8K responses file.
        n_train, n_test: questions to train on and to test on (disjoint; :func:`gsm8k_split`).
        knobs: the router's knobs (the share of requests sent to big), ``leanscale-router:<knob>``.
        threshold: the cascade's threshold (``leanscale-cascade``).
        seed: the split's seed.
        folds: the router's cross-validation folds (its out-of-fold thresholds).
        concurrency: requests in flight at once.
        log: a function of one line of progress text, or None.

    Returns:
        ``{"rows": [{"policy", "model", "accuracy", "cost_per_request_usd", "big_share",
        "gap_recovered", "failed"}...], "n_train", "n_test", "test_index", "train_s", "http_s",
        "http_peak_memory_bytes" (the peak increase of this process's resident memory while the
        requests ran), "memory_method",
        "requests", "usd", "gateway_url"}``; the first two rows are always-small and always-big.
    """
    import asyncio
    import tempfile
    import time

    from leanscale.cascade.gateway import GatewayConfig
    from leanscale.cascade.gateway.policies import train_router, train_scorer
    from leanscale.cascade.gateway.testing import FakeOpenAIBackend, count_tokens
    from leanscale.core.measure import measure

    say = log or (lambda message: None)
    rows = load_gsm8k_responses(csv_path)
    if n_train + n_test > len(rows):
        raise InvalidParameterError(f"The 'n_train' and 'n_test' parameters of gateway_comparison must add up to at "
                                    f"most the file's {len(rows)} questions. Got {n_train} + {n_test}.")
    tr, te = gsm8k_split(len(rows), n_train, n_test, seed)
    train, test = [rows[i] for i in tr], [rows[i] for i in te]
    models = list(GSM8K_MODELS)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="leanscale-tour-gateway-") as tmp:
        say(f"gateway: training the router and the answer scorer on {n_train} GSM8K questions")
        prompts = [r["prompt"] for r in train]
        p_tok = np.array([count_tokens(p) for p in prompts], dtype=float)
        c_tok = {m: np.array([count_tokens(r["response"][m]) for r in train], dtype=float) for m in models}
        train_router(prompts, {m: np.array([r["correct"][m] for r in train]) for m in models},
                     {m: (p_tok * GATEWAY_PRICES[m][0] + c_tok[m] * GATEWAY_PRICES[m][1]) / 1000 for m in models},
                     Path(tmp) / "router", folds=folds, seed=seed, prompt_tokens=p_tok, completion_tokens=c_tok)
        train_scorer(prompts, [r["response"]["small"] for r in train],
                     np.array([r["correct"]["small"] for r in train]), Path(tmp) / "scorer")
        train_s = time.perf_counter() - t0
        replies = {m: {r["prompt"]: r["response"][m] for r in test} for m in models}
        policies = [("always-small", "small"), ("always-big", "big")]
        policies += [(f"router, knob {k:g}", f"leanscale-router:{k:g}") for k in knobs]
        policies.append((f"cascade, threshold {threshold:g}", "leanscale-cascade"))
        out: list[dict] = []
        t1 = time.perf_counter()
        with measure("cpu", interval_seconds=0.01) as meter:  # the HTTP part: gateway, fakes and client
            with FakeOpenAIBackend(reply=lambda p: replies["small"].get(p, _NO_RECORD)) as small, \
                    FakeOpenAIBackend(reply=lambda p: replies["big"].get(p, _NO_RECORD)) as big:
                backend = {"small": small, "big": big}
                config = GatewayConfig.from_dict({
                    "models": [{"name": m, "base_url": backend[m].base_url, "input_price_per_1k": GATEWAY_PRICES[m][0],
                                "output_price_per_1k": GATEWAY_PRICES[m][1]} for m in models],
                    "fallbacks": {"small": ["big"]},
                    "router": {"path": str(Path(tmp) / "router")},
                    "cascade": {"models": models, "scorer": str(Path(tmp) / "scorer"), "threshold": threshold},
                })
                with _running_gateway(config) as url:
                    say(f"gateway: {len(policies)} policies x {n_test} questions through {url}")
                    for label, model in policies:
                        answers = asyncio.run(_send(url, model, [r["prompt"] for r in test], concurrency))
                        ok, cost, big_calls, failed = [], [], 0, 0
                        for (status, by, text, usd), r in zip(answers, test):
                            try:
                                usd = float(usd)
                            except (TypeError, ValueError):  # no header, or "unknown" (no usage)
                                usd = None
                            if status != 200 or by not in models or text != r["response"][by] or usd is None:
                                failed += 1  # counted wrong and free: shown in the table, never hidden
                                ok.append(False)
                                cost.append(0.0)
                                continue
                            ok.append(r["correct"][by])
                            cost.append(usd)
                            big_calls += by == "big"
                        out.append({"policy": label, "model": model, "accuracy": float(np.mean(ok)),
                                    "cost_per_request_usd": float(np.mean(cost)), "big_share": big_calls / n_test,
                                    "failed": failed})
            http_s = time.perf_counter() - t1
    acc_small, acc_big = out[0]["accuracy"], out[1]["accuracy"]
    for row in out:
        gap = acc_big - acc_small
        row["gap_recovered"] = (row["accuracy"] - acc_small) / gap if gap > 0 else None
    return {"rows": out, "n_train": n_train, "n_test": n_test, "test_index": te, "train_s": train_s,
            "http_s": http_s, "http_peak_memory_bytes": meter.peak_memory_bytes, "memory_method": meter.method,
            "requests": n_test * len(policies),
            "usd": float(sum(r["cost_per_request_usd"] for r in out) * n_test), "gateway_url": url}


def gateway_section(ctx, csv_path: str | os.PathLike | None = None) -> list[dict]:
    """The cascade chapter's LLM gateway section: :func:`gateway_comparison` (``--quick``: 120
    training and 40 test questions, router knobs 0.2 and 0.5; else 300 and 150, knobs 0.2, 0.5 and
    0.8), a table and a figure in ``ctx.report``.
    Skipped, with the reason in the report and the summary row, when the GSM8K file is not found
    (``csv_path``, or :func:`gsm8k_candidates`) or the gateway's extra is not installed.

    Returns:
        The chapter's summary rows of this section.
    """
    import time

    report = ctx.report
    t0 = time.perf_counter()
    # quick: 120 / 40 questions, 2 router knobs (200 requests); full: 300 / 150, 3 knobs (900 requests).
    # Each request costs ~5 ms of CPU here (client, gateway and fakes share this process).
    n_train, n_test, knobs, folds = (120, 40, (0.2, 0.5), 3) if ctx.quick else (300, 150, (0.2, 0.5, 0.8), 5)
    report.add_section("An OpenAI-compatible LLM gateway: router and cascade on GSM8K "
                       f"({n_train} training, {n_test} test questions)", level=3)
    report.add_paragraph(
        "The same ideas for LLM calls: `leanscale gateway` serves the OpenAI API; an app points its OpenAI "
        "client at it (base_url) and picks a policy by the request's model name: a configured model, "
        "`leanscale-router:<share of big calls>` (a router trained on logged outcomes decides up front) or "
        "`leanscale-cascade` (the small model answers first; a trained answer scorer decides whether to "
        "escalate to the big one, paying both calls). Here two fake OpenAI-compatible servers replay "
        "Mixtral-8x7B's (small) and GPT-4's (big) real recorded answers to GSM8K questions (RouteLLM's data), "
        "and every test question goes through the gateway over HTTP; each answer is scored with the recorded "
        "correctness of the model that answered and costed by the gateway's x-leanscale-cost-usd header.")
    tried = [Path(csv_path)] if csv_path is not None else gsm8k_candidates()
    found = next((p for p in tried if p.is_file()), None)
    reason = None
    if found is None:
        reason = ("the GSM8K responses file (RouteLLM's gsm8k_responses.csv) was not found; looked in "
                  + ", ".join(str(p) for p in tried) + ". Put it in $LEANSCALE_DATA_ROOT/routellm/ to run this section")
    else:
        missing = [m for m in ("httpx", "uvicorn", "fastapi", "yaml") if importlib.util.find_spec(m) is None]
        if missing:
            reason = (f"the gateway's dependencies are not installed ({', '.join(missing)}): "
                      "pip install 'leanscale[gateway]'")
    if reason is not None:
        report.add_note(f"Skipped: {reason}.", kind="planned")
        ctx.log(f"gateway section skipped: {reason}")
        return [{"metric": "LLM gateway on GSM8K", "value": f"skipped: {reason}", "paper": ""}]

    res = gateway_comparison(found, n_train=n_train, n_test=n_test, knobs=knobs, folds=folds, seed=ctx.seed,
                             log=ctx.log)
    rows = res["rows"]
    small, big = rows[0], rows[1]
    big_usd = big["cost_per_request_usd"] or None
    table = [{"policy": r["policy"], "model (request)": r["model"], "accuracy": r["accuracy"],
              "USD / 1k requests": 1000 * r["cost_per_request_usd"],
              "cost vs big": f"{r['cost_per_request_usd'] / big_usd:.0%}" if big_usd else None,
              "answered by big": f"{r['big_share']:.0%}", "gap recovered": r["gap_recovered"],
              "failed": r["failed"]} for r in rows]
    report.add_table(table, caption=(
        f"{n_test} held-out GSM8K questions through the gateway (prices per 1k tokens: small "
        f"${GATEWAY_PRICES['small'][0]}/${GATEWAY_PRICES['small'][1]}, big ${GATEWAY_PRICES['big'][0]}/"
        f"${GATEWAY_PRICES['big'][1]}, words as tokens); gap recovered = (accuracy - small's) / (big's - small's); "
        "the cascade's cost includes the small call of every escalated request"))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        ends = [small, big]
        ax.plot([r["cost_per_request_usd"] * 1e3 for r in ends], [100 * r["accuracy"] for r in ends], "--",
                color="0.6", label="random mix of small and big")
        ax.plot([r["cost_per_request_usd"] * 1e3 for r in ends], [100 * r["accuracy"] for r in ends], "ko")
        for r, text in ((small, "always small"), (big, "always big")):
            ax.annotate(text, (r["cost_per_request_usd"] * 1e3, 100 * r["accuracy"]), textcoords="offset points",
                        xytext=(4, -10), fontsize=8)
        routers = [r for r in rows if r["model"].startswith("leanscale-router")]
        ax.plot([r["cost_per_request_usd"] * 1e3 for r in routers], [100 * r["accuracy"] for r in routers], "s-",
                label="leanscale-router (knobs " + ", ".join(r["model"].split(":")[1] for r in routers) + ")")
        casc = rows[-1]
        ax.plot([casc["cost_per_request_usd"] * 1e3], [100 * casc["accuracy"]], "*", ms=13, label=casc["policy"])
        ax.set_xlabel("USD per 1,000 requests")
        ax.set_ylabel("test accuracy (%)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        report.add_figure(fig, caption="Accuracy against cost per request of each gateway policy (GSM8K, held out)")
        plt.close(fig)
    except ImportError:  # plots are an optional extra
        pass
    casc = rows[-1]
    text = (f"The router and the scorer trained in {res['train_s']:.1f} s; {res['requests']:,} requests went "
            f"through the gateway in {res['http_s']:.1f} s (gateway, fakes and client in this one process, so "
            "these seconds say nothing about the gateway's overhead: benchmarks/gateway/load.py measures it). ")
    bench = read_result("gateway", "quality.json")
    try:
        fam = bench["families"]
        goal = bench["goals"]["cascade_default_within_1pt_of_big_at_le_40pct_cost"]
        text += (f"The benchmark, on {bench['settings']['n_test']} held-out questions (quality.json): the cascade "
                 f"recovers {fam['leanscale-cascade']['pgr_at_50pct_big']:.2f} of the small-to-big gap at 50% big "
                 f"calls, the router {fam['leanscale-router']['pgr_at_50pct_big']:.2f}, random "
                 f"{fam['random']['pgr_at_50pct_big']:.2f}; the goal (the cascade within 1 point of big's accuracy "
                 f"at <= 40% of its cost) is {'met' if goal['met'] else 'not met'}. ")
    except (TypeError, KeyError):  # no benchmark result (or another layout): nothing to quote
        pass
    report.add_paragraph(text + "How to point an app at the gateway and train the router from its own logs: the "
                         "cascade method card (src/leanscale/cascade/README.md, 'LLM gateway').")
    if ctx.ledger is not None:
        ctx.ledger.record("cascade: LLM gateway, GSM8K policies over HTTP", seconds=res["http_s"],
                          n_examples=res["requests"], usd_simulated=round(res["usd"], 6),
                          peak_memory_bytes=res["http_peak_memory_bytes"], memory_method=res["memory_method"])
    ctx.log(f"gateway section: {time.perf_counter() - t0:.1f} s")
    return [
        {"metric": f"gateway cascade vs always-big, GSM8K ({n_test} held out)",
         "value": f"{casc['accuracy']:.1%} vs {big['accuracy']:.1%} at "
                  f"{casc['cost_per_request_usd'] / big_usd:.0%} of its cost" if big_usd else "n/a",
         "paper": "FrugalGPT: GPT-4's accuracy at up to 98% lower cost"},
        {"metric": "gateway router: gap recovered at each knob",
         "value": ", ".join(f"{r['model'].split(':')[1]}: {r['gap_recovered']:.2f}"
                            if r["gap_recovered"] is not None else f"{r['model'].split(':')[1]}: n/a"
                            for r in rows if r["model"].startswith("leanscale-router")),
         "paper": "RouteLLM: random routing recovers the share of big calls"},
    ]


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
    student = read_result("cascade", "wordnet_student_idle.json", results_root)  # method card, benchmark 1d
    if student is not None and student.get("best_within_0.5_points_by_cost"):
        best = student["configurations"][student["best_within_0.5_points_by_cost"]]
        if "measured" in best:
            text += (f"; with a distilled student as middle stage {best['measured']['speedup_min']:.1f}x "
                     f"at {best['accuracy_gap_points']:.2f} points")
    return text
