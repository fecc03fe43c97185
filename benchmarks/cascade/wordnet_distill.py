"""Knowledge distillation of the big model into the cascade's cheap middle stage (issue 17:
>= 5x the big model's requests/s at <= 0.5 points less accuracy on WordNet).

Same data, split, TF-IDF, static and big stages as ``wordnet_middle.py`` (imported from it). The
unlabelled pool: the WordNet 3.0 glosses *outside* the benchmark's 36,000-gloss stratified sample
(and not repeating any text in it), in a seeded random order; their labels are never read. Each pool
gloss is embedded with MiniLM (chunks of 2,000 through :func:`cached_text_embeddings`, so a cut or
repeated run reuses them) and labelled with the big model's class probabilities (the big model
trained on the 20,000 training glosses only). The distilled middle stage has the static stage's
architecture and cost (model2vec static embeddings + TF-IDF log-probabilities, MLP head, wrapped in
:class:`StaticEmbeddingStage`), trained on the training split with its hard labels plus the first
``m`` pool glosses with the big model's soft labels (cross-entropy to the target distribution;
``--targets hard``: the big model's argmax instead). ``EmbeddingClassifier.fit_embeddings`` takes
hard labels only, so the head is trained here with the same loop, optimiser and schedule.

Cascades ``tfidf -> static -> big`` (m = 0, as wordnet_middle.py) and ``tfidf -> distilled_m ->
big`` for each pool size m (``--pool-sizes``), raw-confidence and learned deferral, fitted on the
calibration split to the big model's calibration accuracy - ``--slack`` points, evaluated on the
test split; speed-up by cost (per-stage costs measured interleaved, min and median) and measured
end to end for the largest pool.

Usage:
  nice -n 5 python benchmarks/cascade/wordnet_distill.py embed --pool 80000 --threads 1   # background
  nice -n 5 python benchmarks/cascade/wordnet_distill.py run --pool-sizes 0,10000,all [--wait-embed-pid PID]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import numpy as np
import torch

from benchmarks.cascade.wordnet_middle import (
    OUT,
    accuracy_alone,
    add_setup_args,
    measure_costs,
    measure_end_to_end,
    output_from_proba,
    pool_outputs,
    run_cascades,
    setup,
)
from benchmarks.common import machine
from leanscale.cascade import (
    EmbeddingClassifier,
    ModelStage,
    StaticEmbeddingStage,
    TfidfClassifier,
)
from leanscale.core.io import atomic_write_json
from leanscale.data._sampling import stratified_indices
from leanscale.data.embeddings import cached_text_embeddings
from leanscale.data.wordnet import load_wordnet_glosses

CHUNK = 2000  # pool glosses per cache entry: a cut embedding run keeps every finished chunk


def unlabelled_pool(g, n_sample: int, seed: int) -> list[str]:
    """The WordNet glosses outside the benchmark's stratified sample of ``n_sample`` (the
    train/calibration/test glosses of wordnet.py), minus any whose text also occurs in that sample,
    deduplicated, in a seeded random order. Their labels are never read."""
    sample = stratified_indices(np.asarray(g.labels), n_sample, seed)
    taken = set(g.texts[i] for i in sample)
    rest = np.setdiff1d(np.arange(len(g.texts)), sample)
    out, seen = [], set()
    for i in np.random.default_rng(seed + 1).permutation(rest):
        t = g.texts[i]
        if t not in taken and t not in seen:
            seen.add(t)
            out.append(t)
    return out


def pool_embeddings(texts: list[str], n: int, *, only_cached: bool = False, log=None) -> np.ndarray:
    """MiniLM embeddings (m, 384) of the first ``n`` pool texts, in chunks of ``CHUNK`` through
    :func:`cached_text_embeddings` (so a rerun, or a cut run, reuses every finished chunk).
    ``only_cached``: stop at the first chunk not in the cache (m <= n, a multiple of CHUNK)."""
    import hashlib

    from leanscale.data.paths import cache_dir

    parts = []
    for s in range(0, min(n, len(texts)), CHUNK):
        chunk = texts[s: min(s + CHUNK, n, len(texts))]
        if only_cached:
            digest = hashlib.sha1("\x00".join(chunk).encode()).hexdigest()[:16]
            if not (cache_dir() / "embeddings" / f"minilm-l6-{len(chunk)}-{digest}.npy").exists():
                break
        t0 = time.perf_counter()
        parts.append(cached_text_embeddings(chunk))
        if log:
            log(f"pool chunk {s}..{s + len(chunk)}: {time.perf_counter() - t0:.1f} s")
    return np.vstack(parts) if parts else np.zeros((0, 384), np.float32)


def embed_main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-sample", type=int, default=36_000)
    ap.add_argument("--pool", type=int, default=80_000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    g = load_wordnet_glosses()
    texts = unlabelled_pool(g, args.n_sample, args.seed)
    print(f"pool: {len(texts)} glosses outside the sample", flush=True)
    pool_embeddings(texts, args.pool, log=lambda m: print(m, flush=True))


def fit_soft_head(F: np.ndarray, T: np.ndarray, classes: np.ndarray, *, hidden: int, epochs: int,
                  seed: int = 0, lr: float = 1e-3, batch_size: int = 256, weight_decay: float = 1e-2
                  ) -> EmbeddingClassifier:
    """An :class:`EmbeddingClassifier` head trained on features ``F`` (n, d) against target
    distributions ``T`` (n, k; rows sum to 1, columns in ``classes`` order): ``fit_embeddings``
    with ``soft_targets`` (cross-entropy to ``T``; one-hot rows give the usual loss)."""
    clf = EmbeddingClassifier(encoder=None, hidden=hidden, epochs=epochs, lr=lr, batch_size=batch_size,
                              weight_decay=weight_decay, seed=seed)
    clf.fit_embeddings(F, np.asarray(classes)[T.argmax(1)], soft_targets=T)
    if list(clf.classes_) != list(classes):  # every class is some row's argmax (the labelled rows)
        raise ValueError(f"the targets' argmax covers {len(clf.classes_)} of {len(classes)} classes")
    return clf


def wait_for_embedding(pid: int | None, until_utc: str | None, log) -> None:
    """Sleep while the background ``embed`` process ``pid`` runs, at most until ``until_utc`` (HH:MM)."""
    if pid is None:
        return
    deadline = None
    if until_utc:
        hh, mm = map(int, until_utc.split(":"))
        now = time.gmtime()
        deadline = time.time() + ((hh * 60 + mm) - (now.tm_hour * 60 + now.tm_min)) * 60 - now.tm_sec
    while os.path.exists(f"/proc/{pid}") and (deadline is None or time.time() < deadline):
        time.sleep(20)
    log(f"stopped waiting for the embedding process {pid} (alive: {os.path.exists(f'/proc/{pid}')})")


def run_main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    add_setup_args(ap)
    ap.add_argument("--pool-sizes", default="0,10000,all",
                    help="comma-separated unlabelled pool sizes m (0: the undistilled static stage; 'all': "
                         "every cached pool embedding)")
    ap.add_argument("--max-pool", type=int, default=80_000)
    ap.add_argument("--targets", choices=("soft", "hard"), default="soft")
    ap.add_argument("--distill-hidden", type=int, default=None, help="head width (default: --static-hidden)")
    ap.add_argument("--min-epochs", type=int, default=8,
                    help="epochs: max(this, ceil(20 * n_train / rows)), at least the static head's steps")
    ap.add_argument("--threads", type=int, default=1, help="torch threads while training")
    ap.add_argument("--cost-threads", type=int, default=2, help="torch threads while timing (wordnet_middle: 2)")
    ap.add_argument("--distill-tfidf", action="store_true",
                    help="also a TF-IDF stage trained on the training split + the whole pool (the big model's argmax "
                         "labels: TfidfClassifier takes hard labels), as the first stage")
    ap.add_argument("--wait-embed-pid", type=int, default=None)
    ap.add_argument("--wait-until", default=None, help="UTC HH:MM: stop waiting for the embedding then")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    name = "wordnet_distill" + (f"_{args.tag}" if args.tag else "")
    t_start = time.perf_counter()
    log = partial(print, flush=True)
    result = {"benchmark": "cascade/wordnet_distill", "machine": machine(), "settings": vars(args),
              "goal": ">= 5x the big model's requests/s at <= 0.5 points less accuracy (issue 17)"}

    def save():
        result["seconds_total"] = time.perf_counter() - t_start
        atomic_write_json(OUT / f"{name}.json", result)

    d = setup(args, log)
    n_total = args.n_train + args.n_cal + args.n_test
    pool_texts = unlabelled_pool(load_wordnet_glosses(), n_total, args.seed)
    wait_for_embedding(args.wait_embed_pid, args.wait_until, log)
    t0 = time.perf_counter()
    E_unl = pool_embeddings(pool_texts, args.max_pool, only_cached=args.wait_embed_pid is not None)
    n_unl = len(E_unl)
    U = pool_texts[:n_unl]
    L_unl = d.stack.features(np.zeros((n_unl, 0), np.float32), U)  # TF-IDF block, as at serving time
    Q = d.big.predict_proba_embeddings(np.hstack([E_unl, L_unl]))  # the big model's soft labels (n_unl, 45)
    S_unl = d.encoder.encode(U)
    t_label = time.perf_counter() - t0
    log(f"pool: {n_unl} of {len(pool_texts)} unlabelled glosses embedded and labelled in {t_label:.0f} s")
    classes = d.big.classes_
    col = {c: j for j, c in enumerate(classes)}
    T_tr = np.zeros((len(d.y_tr), len(classes)), np.float32)
    T_tr[np.arange(len(d.y_tr)), [col[c] for c in d.y_tr]] = 1.0
    T_unl = Q if args.targets == "soft" else np.eye(len(classes), dtype=np.float32)[Q.argmax(1)]
    F_tr = np.hstack([d.S[: args.n_train], d.L_tr]).astype(np.float32)
    F_unl = np.hstack([S_unl, L_unl]).astype(np.float32)
    train_s = {}
    sizes = sorted({min(n_unl, int(v)) if v != "all" else n_unl for v in args.pool_sizes.split(",")})
    hidden = args.distill_hidden or args.static_hidden

    outs, L_pool = pool_outputs(d)
    real = dict(d.real)
    if args.distill_tfidf:
        t0 = time.perf_counter()
        tf_d = TfidfClassifier().fit(list(d.X_tr) + U, np.concatenate([d.y_tr, classes[Q.argmax(1)]]))
        train_s["tfidf_distilled"] = {"seconds": time.perf_counter() - t0, "rows": args.n_train + n_unl}
        real["tfidf_distilled"] = ModelStage(tf_d, name="tfidf_distilled")
        outs["tfidf_distilled"] = output_from_proba(tf_d.predict_proba(d.X_pool), tf_d.classes_)
        log(f"tfidf_distilled: trained on {args.n_train + n_unl} rows in {train_s['tfidf_distilled']['seconds']:.0f} s; "
            f"test accuracy {np.mean(outs['tfidf_distilled'].labels[d.test] == d.y_pool[d.test]):.4f}")
    F_eval = np.hstack([d.S[args.n_train:], L_pool]).astype(np.float32)
    stage_of = {0: "static"}
    heads = {}
    for m in sizes:
        if m == 0:
            continue
        rows = args.n_train + m
        epochs = max(args.min_epochs, -(-20 * args.n_train // rows))
        t0 = time.perf_counter()
        head = fit_soft_head(np.vstack([F_tr, F_unl[:m]]), np.vstack([T_tr, T_unl[:m]]), classes, hidden=hidden,
                             epochs=epochs, seed=args.seed)
        train_s[m] = {"seconds": time.perf_counter() - t0, "epochs": epochs, "rows": rows}
        key = f"distilled_{m}"
        stage_of[m], heads[m] = key, head
        real[key] = StaticEmbeddingStage(head, d.encoder, tfidf=d.tfidf, name=key)
        outs[key] = output_from_proba(head.predict_proba_embeddings(F_eval), head.classes_)
        log(f"{key}: trained on {rows} rows, {epochs} epochs in {train_s[m]['seconds']:.0f} s; test accuracy "
            f"{np.mean(outs[key].labels[d.test] == d.y_pool[d.test]):.4f}")
    result.update({
        "data": {"source": "WordNet 3.0 glosses -> 45 lexicographer files", "n_train": len(d.X_tr),
                 "n_cal": len(d.cal), "n_test": len(d.test),
                 "unlabelled_pool": f"{n_unl} WordNet glosses outside the {n_total}-gloss sample (of {len(pool_texts)} "
                                    "available; texts in the sample removed), labels not used",
                 "pool_sizes": sizes},
        "train_seconds": {**d.train_seconds, "pool_embed_and_label": t_label,
                          "distilled_heads": {str(k): v for k, v in train_s.items()}},
    })
    save()

    # ---- costs: every stage interleaved (the distilled heads share one architecture) -------------
    torch.set_num_threads(args.cost_threads)
    timed_stages = {k: real[k] for k in ("tfidf", "static", "big")}
    if heads:
        timed_stages["distilled"] = real[stage_of[max(heads)]]
    if "tfidf_distilled" in real:
        timed_stages["tfidf_distilled"] = real["tfidf_distilled"]
    costs, costs_median, reps = measure_costs(timed_stages, d.X_pool[: args.cost_sample], args.repeats, log)
    for m in heads:
        costs[stage_of[m]], costs_median[stage_of[m]] = costs["distilled"], costs_median["distilled"]
    alone = accuracy_alone(outs, d, costs)
    for k, o in outs.items():
        alone[k]["test_agreement_with_big"] = float(np.mean(o.labels[d.test] == outs["big"].labels[d.test]))
    log("alone on test: " + ", ".join(f"{k} {v['test_accuracy']:.4f} (agrees with big "
                                      f"{v['test_agreement_with_big']:.3f})" for k, v in alone.items()))
    target = alone["big"]["cal_accuracy"] - args.slack / 100
    big_test = alone["big"]["test_accuracy"]
    chains = [("tfidf", stage_of[m], "big") for m in sizes]
    if heads:
        chains.append((stage_of[max(heads)], "big"))
    if "tfidf_distilled" in real:
        chains += [("tfidf_distilled", "big")] + ([("tfidf_distilled", stage_of[max(heads)], "big")] if heads else [])
    configs, fitted = run_cascades(chains, outs, d, costs, costs_median, target, big_test, args.max_thresholds, log)
    curve = []
    for m in sizes:
        for deferral in ("confidence", "learned"):
            c = configs[f"tfidf->{stage_of[m]}->big ({deferral})"]
            curve.append({"pool": m, "deferral": deferral, "middle_test_accuracy": alone[stage_of[m]]["test_accuracy"],
                          "middle_agreement_with_big": alone[stage_of[m]]["test_agreement_with_big"],
                          "gap_points": c["accuracy_gap_points"], "speedup_by_cost": c["speedup_by_cost"],
                          "speedup_by_median_cost": c["speedup_by_median_cost"],
                          "answered_fraction_test": c["answered_fraction_test"]})
    result.update({
        "stages": {"tfidf": "TfidfClassifier (word uni+bigrams, logistic regression)",
                   "static": f"StaticEmbeddingStage: model2vec-distilled MiniLM-L6 (256-d) + cross-fitted TF-IDF "
                             f"log-probabilities, MLP head (hidden {args.static_hidden}), training split only",
                   "distilled_<m>": f"the static stage's features and architecture (hidden {hidden}), trained on the "
                                    f"training split (hard labels) + m pool glosses ({args.targets} labels of the big model)",
                   "big": "MiniLM-L6 embeddings + cross-fitted TF-IDF log-probabilities, MLP head (hidden 512)"},
        "costs_seconds_per_request": costs, "costs_seconds_per_request_median": costs_median, "cost_repeats": reps,
        "alone": alone, "target_cal_accuracy": target, "big_test_accuracy": big_test,
        "configurations": configs, "curve": curve,
    })
    save()

    # ---- measured end to end: the largest pool's cascades vs the big model alone ------------------
    if heads and args.throughput_requests > 0:
        best = stage_of[max(heads)]
        sel = {k: v for k, v in fitted.items() if k.startswith(f"tfidf->{best}->big")}
        n_thr = min(args.throughput_requests, len(d.test))
        result["measured_walls_s"] = measure_end_to_end(sel, configs, real, [d.X_pool[i] for i in d.test[:n_thr]],
                                                        target, args.repeats, log)
    result["timing_note"] = (
        f"training with {args.threads} torch thread(s), timing with {args.cost_threads}, nice -n 5, on 2 cores shared "
        "with other benchmarks; per-stage costs: min (and median) over interleaved repetitions; speed-up by cost = big "
        "alone's cost / the cascade's mean cost per test request from the routing; measured = wall time of the real "
        "stages, interleaved with the big model alone")
    save()
    log(f"wrote {OUT / (name + '.json')} in {time.perf_counter() - t_start:.0f} s")


def main(argv=None) -> None:
    """``embed [options]`` (the pool's MiniLM embeddings, into the cache) or ``run [options]``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "embed":
        embed_main(argv[1:])
    elif argv and argv[0] == "run":
        run_main(argv[1:])
    else:
        print("usage: wordnet_distill.py embed|run [options] (see the module docstring)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
