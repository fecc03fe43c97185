"""Deduplication benchmark of the data-pruning issue: the duplicate share of our two LM corpora.

Corpora (as :func:`leanscale.data.load_corpus` reads them):

* ``gcide``: Webster's Revised Unabridged Dictionary (1913) via GCIDE (Debian dict-gcide), cleaned as
  for the scaling sweep, split into dictionary entries (a blank line followed by a line that starts
  in column 0, i.e. a headword line): ~126,000 documents.
* ``stdlib``: the CPython standard-library sources of this interpreter, one document per ``*.py``
  file (files that are not UTF-8 skipped, as in the corpus): ~1,800 documents.

For each corpus: ``exact`` (BLAKE2b of the NFKC + casefold + whitespace-collapsed text) then
``minhash`` (word 5-gram shingles, 128 permutations, LSH tuned for threshold - 0.1, every candidate
verified with its true Jaccard) at Jaccard thresholds 0.8 (default) and 0.5, on the whole corpus.
``semantic`` (SemDeDup on MiniLM-L6 embeddings, eps 0.05, ceil(n/1000) clusters, farthest from the
centroid kept) runs after exact + minhash (0.8) on a seeded random sample of ``--semantic-sample``
gcide entries (MiniLM embedded 10,000 entries in 11 minutes on the 2 shared cores, so all
126,000 would take over 2 hours) and on every stdlib
file. MiniLM reads the first 256 word pieces of a text only, so for a source file it embeds the
header (licence, docstring, imports): stdlib semantic duplicates are "files that start alike".
Embeddings are cached on disk (``leanscale.data.embeddings.cached_text_embeddings``): a rerun
reports the cached cost, which the JSON says.

Recorded: documents and characters removed by each stage (share of the corpus), the settings, the
seconds of every stage, and a few example pairs. Wall-clock seconds are noisy: other jobs shared the
2 cores while this ran (the load average is written next to them).

``--lm`` runs only the effect of deduplication on the validation loss of the sweep's small LM (see
:func:`lm_effect`) and adds it to the JSON (a later plain run keeps it).

Usage: python benchmarks/pruning/dedup.py [--semantic-sample 4000] [--corpora gcide,stdlib] [--lm]
Result: benchmarks/results/pruning/dedup.json
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import numpy as np

from benchmarks.common import RESULTS, machine
from leanscale.core.io import atomic_write_json
from leanscale.data.text import _stdlib_files, load_corpus
from leanscale.pruning.dedup import deduplicate

THRESHOLDS = (0.8, 0.5)
EPS = 0.05
SHINGLE, SHINGLE_SIZE, NUM_PERM = "word", 5, 128


def gcide_documents() -> list[str]:
    text = load_corpus("gcide")
    return [d.strip() for d in re.split(r"\n\s*\n(?=\S)", text) if d.strip()]


def stdlib_documents() -> tuple[list[str], list[str]]:
    base, files = _stdlib_files(None)
    docs, names = [], []
    for path in files:
        try:
            docs.append(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            continue  # as load_corpus: CPython's deliberately mis-encoded test modules
        names.append(path.relative_to(base).as_posix())
    return docs, names


def _examples(result, docs, names, method, k=3, chars=100):
    out = []
    for rec in result.records():
        if rec["method"] != method:
            continue
        a, b = rec["index"], rec["duplicate_of"]
        show = (lambda i: names[i]) if names is not None else (lambda i: docs[i][:chars])
        out.append({"removed": show(a), "duplicate_of": show(b), "similarity": rec["similarity"]})
        if len(out) == k:
            break
    return out


def _stage_rows(result, docs):
    chars = np.array([len(d) for d in docs], dtype=np.float64)
    total = chars.sum()
    rows = {}
    for stage in result.stages:
        removed = np.array([m == stage["method"] for m in result.method])
        rows[stage["method"]] = {"n_in": stage["n_in"], "removed": stage["n_removed"],
                                 "removed_share": stage["n_removed"] / len(docs),
                                 "removed_char_share": float(chars[removed].sum() / total),
                                 "seconds": stage["seconds"],
                                 **{k: v for k, v in stage.items()
                                    if k not in ("method", "n_in", "n_removed", "seconds")}}
    return rows


def run_corpus(name: str, docs: list[str], names, semantic_sample: int | None, seed: int = 0) -> dict:
    print(f"{name}: {len(docs):,} documents, {sum(map(len, docs)) / 1e6:.1f} M characters", flush=True)
    out = {"n_documents": len(docs), "n_characters": int(sum(map(len, docs))), "text_stages": {}}
    for thr in THRESHOLDS:
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        r = deduplicate(docs, method="exact,minhash", threshold=thr, shingle=SHINGLE, shingle_size=SHINGLE_SIZE,
                        num_perm=NUM_PERM, seed=seed)
        secs = time.perf_counter() - t0
        rows = _stage_rows(r, docs)
        out["text_stages"][f"jaccard_{thr}"] = {
            "threshold": thr, "stages": rows, "removed_share": 1 - r.keep.mean(), "seconds": round(secs, 2),
            "load_average_at_start": load, "examples": {m: _examples(r, docs, names, m) for m in rows}}
        print(f"  jaccard {thr}: " + ", ".join(f"{m} {v['removed']:,} ({100 * v['removed_share']:.2f}%)"
                                               for m, v in rows.items()) + f" in {secs:.1f} s", flush=True)
        if thr == THRESHOLDS[0]:
            survivors = r.kept_indices
    # SemDeDup on the survivors of exact + minhash (0.8), or on a sample of them
    rng = np.random.default_rng(seed)
    pool = np.sort(rng.choice(survivors, semantic_sample, replace=False)) if (
        semantic_sample is not None and semantic_sample < len(survivors)) else survivors
    texts = [docs[i] for i in pool]
    from leanscale.data.embeddings import cached_text_embeddings
    from leanscale.data.paths import cache_dir

    digest_dir = cache_dir() / "embeddings"
    before = set(digest_dir.glob("*.npy")) if digest_dir.is_dir() else set()
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    emb = cached_text_embeddings(texts, batch_size=64)
    embed_secs = time.perf_counter() - t0
    cached = digest_dir.is_dir() and not (set(digest_dir.glob("*.npy")) - before)
    t0 = time.perf_counter()
    r = deduplicate(None, method="semantic", embeddings=emb, eps=EPS, semantic_keep="far", seed=seed)
    secs = time.perf_counter() - t0
    sub_names = None if names is None else [names[i] for i in pool]
    stage = r.stages[0]
    out["semantic"] = {
        "pool": "all survivors of exact + minhash (0.8)" if len(pool) == len(survivors) else
        f"a seeded random sample of {len(pool):,} of the {len(survivors):,} survivors of exact + minhash (0.8)",
        "n_in": len(pool), "removed": stage["n_removed"], "removed_share_of_pool": stage["n_removed"] / len(pool),
        "eps": EPS, "n_clusters": stage["n_clusters"], "keep": "far (farthest from the centroid)",
        "embedder": "MiniLM-L6 (all-MiniLM-L6-v2; first 256 word pieces of a text)",
        "embed_seconds": round(embed_secs, 2), "embeddings_from_cache": bool(cached),
        "semdedup_seconds": round(secs, 2), "load_average_at_start": load,
        "removed_share_by_eps": {},
        "examples": _examples(r, texts, sub_names, "semantic", k=5)}
    for eps in (0.01, 0.02, 0.05, 0.1, 0.2):
        r_eps = deduplicate(None, method="semantic", embeddings=emb, eps=eps, semantic_keep="far", seed=seed)
        out["semantic"]["removed_share_by_eps"][str(eps)] = r_eps.stages[0]["n_removed"] / len(pool)
    print(f"  semantic (eps {EPS}) on {len(pool):,}: {stage['n_removed']:,} ({100 * stage['n_removed'] / len(pool):.2f}%)"
          f"; embed {embed_secs:.1f} s{' (cached)' if cached else ''}, SemDeDup {secs:.1f} s; by eps "
          f"{out['semantic']['removed_share_by_eps']}", flush=True)
    return out


def lm_effect(budget: float = 5e11, seeds: tuple[int, ...] = (0, 1)) -> dict:
    """Validation loss of the sweep's small LM trained on the stdlib corpus as it is and deduplicated.

    The documents (files) are split as the sweep splits the corpus: the last 5% of the text (whole
    files, in the corpus' order) is validation, the same for both arms. The training files are
    deduplicated (exact + minhash 0.8, within the training files only) or not; both arms are then
    encoded with the corpus' BPE tokenizer (vocabulary 512, the sweep's default) and train the same
    model (the sweep's compute-optimal size for ``budget``, ``D = C / 6N`` tokens, one epoch, seeded
    windows) for the same number of tokens.
    """
    from dataclasses import replace

    import torch

    from leanscale.data.text import (
        DOCUMENT_SEPARATOR,
        TokenStream,
        encode_text,
        train_bpe_tokenizer,
    )
    from leanscale.scaling._train import train_run
    from leanscale.scaling.grid import plan_isoflop_grid
    from leanscale.scaling.sweep_config import SweepConfig

    torch.set_num_threads(2)
    docs, _names = stdlib_documents()
    sizes = np.cumsum([len(d) for d in docs])
    n_val_docs = int(np.sum(sizes > 0.95 * sizes[-1]))
    train_docs, val_docs = docs[:-n_val_docs], docs[-n_val_docs:]
    r = deduplicate(train_docs, method="exact,minhash", threshold=0.8, seed=0)
    tok = train_bpe_tokenizer("stdlib", 512)
    val_ids = encode_text(tok, DOCUMENT_SEPARATOR.join(val_docs))
    arms = {"raw": train_docs, "dedup": [train_docs[i] for i in r.kept_indices]}
    config = SweepConfig(corpus="stdlib", budgets_flops=(budget,), n_sizes=1)
    out = {"corpus": "stdlib", "budget_flops": budget, "seeds": list(seeds), "val_documents": n_val_docs,
           "val_tokens": int(len(val_ids)), "train_documents": {k: len(v) for k, v in arms.items()},
           "removed_train_char_share": 1 - sum(map(len, arms["dedup"])) / sum(map(len, arms["raw"])),
           "runs": []}
    for arm, arm_docs in arms.items():
        train_ids = encode_text(tok, DOCUMENT_SEPARATOR.join(arm_docs))
        tokens = np.concatenate([train_ids, val_ids])
        stream = TokenStream(tokens, len(val_ids) / len(tokens))
        out.setdefault("train_tokens", {})[arm] = int(stream.n_train_tokens)
        (spec,) = plan_isoflop_grid(config, n_train_tokens=stream.n_train_tokens)
        for seed in seeds:
            t0 = time.perf_counter()
            res = train_run(replace(spec, val_fraction=stream.val_fraction, seed=seed), stream)
            out["runs"].append({"arm": arm, "seed": seed, "val_loss": float(res["loss"]),
                                "train_loss": float(res["train_loss"]), "n_params": int(res["n_params"]),
                                "n_tokens": int(res["n_tokens"]), "seconds": round(time.perf_counter() - t0, 1)})
            print(f"  lm {arm} seed {seed}: val loss {res['loss']:.4f} ({out['runs'][-1]['seconds']:.0f} s)",
                  flush=True)
    mean = {a: float(np.mean([x["val_loss"] for x in out["runs"] if x["arm"] == a])) for a in arms}
    out["mean_val_loss"] = mean
    out["dedup_minus_raw"] = mean["dedup"] - mean["raw"]
    out["seed_spread"] = {a: float(np.ptp([x["val_loss"] for x in out["runs"] if x["arm"] == a])) for a in arms}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--semantic-sample", type=int, default=4000, help="gcide entries embedded for SemDeDup")
    ap.add_argument("--corpora", default="gcide,stdlib")
    ap.add_argument("--lm", action="store_true",
                    help="only the LM comparison (raw vs deduplicated stdlib), added to an existing dedup.json")
    args = ap.parse_args()
    os.environ.setdefault("LEANSCALE_NO_PROGRESS", "1")
    if args.lm:
        from leanscale.core.io import read_json

        path = RESULTS / "pruning" / "dedup.json"
        blob = read_json(path, what="benchmark result")
        t0 = time.perf_counter()
        blob["lm_effect"] = lm_effect()
        blob["lm_effect"]["seconds"] = round(time.perf_counter() - t0, 1)
        blob["lm_effect"]["machine"] = machine()
        blob["notes"] = [n for n in blob.get("notes", []) if "was not measured" not in n]
        atomic_write_json(path, blob)
        print(blob["lm_effect"])
        return
    t0 = time.perf_counter()
    results = {}
    for name in args.corpora.split(","):
        if name == "gcide":
            results[name] = run_corpus(name, gcide_documents(), None, args.semantic_sample)
            results[name]["documents"] = "dictionary entries (split at a blank line before a headword line)"
        elif name == "stdlib":
            docs, names = stdlib_documents()
            results[name] = run_corpus(name, docs, names, None)
            results[name]["documents"] = "one per *.py file of the standard library (non-UTF-8 files skipped)"
        else:
            raise SystemExit(f"unknown corpus {name!r}")
    blob = {
        "benchmark": "dedup",
        "machine": machine(),
        "settings": {"normalization": ["nfkc", "casefold", "whitespace"], "shingle": SHINGLE,
                     "shingle_size": SHINGLE_SIZE, "num_perm": NUM_PERM, "jaccard_thresholds": list(THRESHOLDS),
                     "lsh_threshold": "threshold - 0.1", "semdedup_eps": EPS,
                     "semdedup_clusters": "ceil(n / 1000)", "semantic_sample_gcide": args.semantic_sample,
                     "seed": 0},
        "corpora": results,
        "total_seconds": round(time.perf_counter() - t0, 1),
        "notes": ["Wall-clock seconds were measured on 2 cores shared with other jobs (load average given): noisy.",
                  "The LM sweep's validation loss with and without deduplication was not measured (see the "
                  "method card)."],
    }
    old = RESULTS / "pruning" / "dedup.json"
    if old.is_file():  # the LM comparison (--lm) of an earlier call is kept
        from leanscale.core.io import read_json

        previous = read_json(old, what="benchmark result")
        if "lm_effect" in previous:
            blob["lm_effect"] = previous["lm_effect"]
            blob["notes"] = [n for n in blob["notes"] if "was not measured" not in n]
    path = atomic_write_json(old, blob)
    print(f"wrote {path} in {blob['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
