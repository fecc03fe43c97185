"""A student that learns its token vectors, distilled from the big model, as the cascade's middle
stage (issue 17: >= 5x the big model's requests/s at <= 0.5 points less accuracy on WordNet).

Same data, split, TF-IDF, static and big stages as ``wordnet_middle.py`` and the same unlabelled
pool and soft labels as ``wordnet_distill.py`` (imported from them; the pool's MiniLM embeddings
come from the embedding cache that ``wordnet_distill.py embed`` filled). Stages:

* ``tfidf``, ``big``: as wordnet_middle.py; ``tfidf_distilled``, ``distilled``: wordnet_distill.py's
  TF-IDF (training split + pool, the big model's argmax) and static head (training split + pool,
  soft labels);
* students (:class:`leanscale.cascade.StudentClassifier`, trained on the training split's hard
  labels + the pool's soft labels, with the cross-fitted TF-IDF block as the big model has):
  ``bag`` -- the static MiniLM token table trained with the head (fastText-style, mean of token
  vectors); ``bag_bigrams`` -- plus hashed token bigrams; ``tf1`` -- plus a one-layer transformer
  over the tokens before the mean (``--students`` picks them).

Cascades (raw-confidence and learned deferral, fitted on the calibration split to the big model's
calibration accuracy - ``--slack`` points, evaluated on the test split): ``tfidf_distilled ->
student -> big``, ``tfidf -> student -> big``, ``student -> big`` and the reference ``tfidf_distilled
-> distilled -> big`` (1c's best). Speed-up by cost as wordnet_middle.py (per-stage seconds per
request, batches of 64, min and median of interleaved repetitions); ``--measure`` also runs the
best cascade within 0.5 points end to end.

Usage: nice -n 5 python benchmarks/cascade/wordnet_student.py [--students bag,bag_bigrams] [--epochs 8]
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

from benchmarks.cascade.wordnet_distill import (
    fit_soft_head,
    pool_embeddings,
    unlabelled_pool,
)
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
    ModelStage,
    StaticEmbeddingStage,
    StudentClassifier,
    TfidfClassifier,
)
from leanscale.core.io import atomic_write_json
from leanscale.data.wordnet import load_wordnet_glosses

STUDENTS = {  # name -> StudentClassifier parameters (besides tfidf, epochs, seed)
    "bag": {"learn_tokens": True},
    "bag_bigrams": {"learn_tokens": True, "bigram_buckets": 1 << 16},
    "tf1": {"learn_tokens": True, "layers": 1, "heads": 4, "max_tokens": 64},
}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    add_setup_args(ap)
    ap.add_argument("--students", default="bag,bag_bigrams", help=f"comma-separated, of {sorted(STUDENTS)}")
    ap.add_argument("--epochs", type=int, default=8, help="student epochs")
    ap.add_argument("--tf-epochs", type=int, default=None, help="epochs of the transformer students (default --epochs)")
    ap.add_argument("--max-pool", type=int, default=80_000)
    ap.add_argument("--threads", type=int, default=1, help="torch threads while training")
    ap.add_argument("--cost-threads", type=int, default=2, help="torch threads while timing (wordnet_middle: 2)")
    ap.add_argument("--measure", action="store_true", help="measure the best cascade within 0.5 points end to end")
    args = ap.parse_args(argv)
    names = [s for s in args.students.split(",") if s]
    unknown = [s for s in names if s not in STUDENTS]
    if unknown:
        print(f"error: --students must be names of {sorted(STUDENTS)}; got {unknown}", file=sys.stderr)
        sys.exit(2)
    torch.set_num_threads(args.threads)
    name = "wordnet_student" + (f"_{args.tag}" if args.tag else "")
    t_start = time.perf_counter()
    log = partial(print, flush=True)
    result = {"benchmark": "cascade/wordnet_student", "machine": machine(), "settings": vars(args),
              "goal": ">= 5x the big model's requests/s at <= 0.5 points less accuracy (issue 17)"}

    def save():
        result["seconds_total"] = time.perf_counter() - t_start
        atomic_write_json(OUT / f"{name}.json", result)

    d = setup(args, log)
    n_total = args.n_train + args.n_cal + args.n_test
    pool_texts = unlabelled_pool(load_wordnet_glosses(), n_total, args.seed)
    t0 = time.perf_counter()
    E_unl = pool_embeddings(pool_texts, args.max_pool, only_cached=True)  # the cache wordnet_distill.py filled
    n_unl = len(E_unl)
    U = pool_texts[:n_unl]
    L_unl = d.stack.features(np.zeros((n_unl, 0), np.float32), U)  # TF-IDF block, as at serving time
    Q = d.big.predict_proba_embeddings(np.hstack([E_unl, L_unl]))  # the big model's soft labels (n_unl, 45)
    S_unl = d.encoder.encode(U)
    log(f"pool: {n_unl} of {len(pool_texts)} glosses labelled in {time.perf_counter() - t0:.0f} s")
    classes = d.big.classes_
    col = {c: j for j, c in enumerate(classes)}
    T_tr = np.eye(len(classes), dtype=np.float32)[[col[c] for c in d.y_tr]]
    T = np.vstack([T_tr, Q]).astype(np.float32)
    y_all = np.concatenate([d.y_tr, classes[Q.argmax(1)]])
    L_all = np.vstack([d.L_tr, L_unl]).astype(np.float32)
    X_all = list(d.X_tr) + U

    outs, L_pool = pool_outputs(d)
    real = dict(d.real)
    train_s = {}
    # 1c's stages, retrained identically (the reference cascade tfidf_distilled -> distilled -> big)
    t0 = time.perf_counter()
    tf_d = TfidfClassifier().fit(X_all, y_all)
    train_s["tfidf_distilled"] = time.perf_counter() - t0
    real["tfidf_distilled"] = ModelStage(tf_d, name="tfidf_distilled")
    outs["tfidf_distilled"] = output_from_proba(tf_d.predict_proba(d.X_pool), tf_d.classes_)
    t0 = time.perf_counter()
    F_all = np.hstack([np.vstack([d.S[: args.n_train], S_unl]), L_all]).astype(np.float32)
    epochs_d = max(8, -(-20 * args.n_train // len(X_all)))
    head = fit_soft_head(F_all, T, classes, hidden=args.static_hidden, epochs=epochs_d, seed=args.seed)
    train_s["distilled"] = time.perf_counter() - t0
    real["distilled"] = StaticEmbeddingStage(head, d.encoder, tfidf=d.tfidf, name="distilled")
    outs["distilled"] = output_from_proba(head.predict_proba_embeddings(np.hstack([d.S[args.n_train:], L_pool])),
                                          head.classes_)
    log(f"tfidf_distilled {train_s['tfidf_distilled']:.0f} s, distilled {train_s['distilled']:.0f} s")

    big_labels = outs["big"].labels[d.test]
    students = {}
    for s in names:
        t0 = time.perf_counter()
        epochs = args.tf_epochs if (STUDENTS[s].get("layers") and args.tf_epochs) else args.epochs
        st = StudentClassifier(tfidf=d.tfidf, epochs=epochs, seed=args.seed, **STUDENTS[s]).fit(
            X_all, y_all, soft_targets=T, tfidf_features=L_all)
        train_s[s] = time.perf_counter() - t0
        students[s] = st
        real[s] = ModelStage(st, name=s)
        outs[s] = output_from_proba(st.predict_proba(d.X_pool), st.classes_)
        acc = float(np.mean(outs[s].labels[d.test] == d.y_pool[d.test]))
        agree = float(np.mean(outs[s].labels[d.test] == big_labels))
        result.setdefault("students_alone_partial", {})[s] = {"test_accuracy": acc, "test_agreement_with_big": agree,
                                                             "train_seconds": train_s[s], "epochs": epochs,
                                                             "loss_history": st.loss_history_}
        log(f"{s}: trained in {train_s[s]:.0f} s ({epochs} epochs); test accuracy {acc:.4f}, "
            f"agrees with big {agree:.4f}")
        save()
    result.update({
        "data": {"source": "WordNet 3.0 glosses -> 45 lexicographer files", "n_train": len(d.X_tr),
                 "n_cal": len(d.cal), "n_test": len(d.test),
                 "unlabelled_pool": f"{n_unl} WordNet glosses outside the {n_total}-gloss sample (labels not used)"},
        "train_seconds": {**d.train_seconds, **train_s},
    })
    save()

    # ---- costs: every stage interleaved ------------------------------------------------------
    torch.set_num_threads(args.cost_threads)
    timed_stages = {k: real[k] for k in ("tfidf", "tfidf_distilled", "distilled", "big", *names)}
    load_before = os.getloadavg()
    costs, costs_median, reps = measure_costs(timed_stages, d.X_pool[: args.cost_sample], args.repeats, log)
    load_after = os.getloadavg()
    alone = accuracy_alone({k: outs[k] for k in timed_stages}, d, costs)
    for k in alone:
        alone[k]["test_agreement_with_big"] = float(np.mean(outs[k].labels[d.test] == big_labels))
    log("alone on test: " + ", ".join(f"{k} {v['test_accuracy']:.4f} (agrees {v['test_agreement_with_big']:.3f})"
                                      for k, v in alone.items()))
    target = alone["big"]["cal_accuracy"] - args.slack / 100
    big_test = alone["big"]["test_accuracy"]
    chains = [("tfidf_distilled", "distilled", "big")]
    for s in names:
        chains += [("tfidf_distilled", s, "big"), ("tfidf", s, "big"), (s, "big")]
    configs, fitted = run_cascades(chains, outs, d, costs, costs_median, target, big_test, args.max_thresholds, log)
    ok = {k: c for k, c in configs.items() if c["accuracy_gap_points"] <= 0.5}
    best = max(ok, key=lambda k: ok[k]["speedup_by_cost"]) if ok else None
    result.update({
        "stages": {"tfidf": "TfidfClassifier (word uni+bigrams, logistic regression), training split",
                   "tfidf_distilled": "TfidfClassifier, training split + pool (the big model's argmax)",
                   "distilled": f"1c's distilled static head (model2vec MiniLM-L6 256-d + TF-IDF block, MLP "
                                f"{args.static_hidden}), training split + pool soft labels, {epochs_d} epochs",
                   **{s: f"StudentClassifier({STUDENTS[s]}, tfidf=tfidf, hidden=512), training split (hard) + "
                         f"pool (big's soft labels)" for s in names},
                   "big": "MiniLM-L6 embeddings + cross-fitted TF-IDF log-probabilities, MLP head (hidden 512)"},
        "costs_seconds_per_request": costs, "costs_seconds_per_request_median": costs_median, "cost_repeats": reps,
        "load_average_during_costs": {"before": load_before, "after": load_after},
        "alone": alone, "target_cal_accuracy": target, "big_test_accuracy": big_test,
        "configurations": configs, "best_within_0.5_points_by_cost": best,
    })
    save()
    if best:
        log(f"best within 0.5 points: {best}: {configs[best]['speedup_by_cost']:.2f}x by cost, gap "
            f"{configs[best]['accuracy_gap_points']:.2f}")

    # ---- measured end to end: the best cascade vs the big model alone ------------------------
    if args.measure and best:
        n_thr = min(args.throughput_requests, len(d.test))
        load_before = os.getloadavg()
        result["measured_walls_s"] = measure_end_to_end({best: fitted[best]}, configs, real,
                                                        [d.X_pool[i] for i in d.test[:n_thr]], target,
                                                        args.repeats, log)
        result["load_average_during_measured"] = {"before": load_before, "after": os.getloadavg()}
    result["timing_note"] = (
        f"training with {args.threads} torch thread(s), timing with {args.cost_threads}, nice -n 5, on 2 cores shared "
        "with other benchmarks; per-stage costs: min (and median) over interleaved repetitions of "
        f"{args.cost_sample} requests in batches of 64; speed-up by cost = big alone's cost / the cascade's mean cost "
        "per test request from the routing; measured = wall time of the real stages, interleaved with the big model")
    save()
    log(f"wrote {OUT / (name + '.json')} in {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
