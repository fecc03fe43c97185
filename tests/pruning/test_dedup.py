"""Deduplication (exact, MinHash LSH, SemDeDup) against brute force on small synthetic data."""

import unicodedata

import numpy as np
import pytest

from leanscale.core.errors import InvalidParameterError
from leanscale.pruning import deduplicate, near_duplicate_pairs, normalize_text
from leanscale.pruning.dedup import shingle_hashes
from leanscale.pruning.kmeans import KMeans


def _word_shingles(text, k):
    words = " ".join(unicodedata.normalize("NFKC", text).casefold().split()).split()
    if len(words) < k:
        return {tuple(words)} if words else set()
    return {tuple(words[i:i + k]) for i in range(len(words) - k + 1)}


def _jaccard(a, b):
    return len(a & b) / len(a | b)


def _corpus(seed=0, n_base=40, n_words=40):
    """Random 'documents' with planted near duplicates (1-2 words changed: Jaccard of 3-grams ~0.7-0.9),
    looser copies (5 words changed: Jaccard of 3-grams ~0.3-0.5) and an exact copy in other case/spacing."""
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(3000)]
    docs = [" ".join(rng.choice(vocab, n_words)) for _ in range(n_base)]
    for b in range(0, n_base, 3):
        words = docs[b].split()
        for _ in range(int(rng.integers(1, 3))):
            words[int(rng.integers(n_words))] = str(rng.choice(vocab))
        docs.append(" ".join(words))
    for b in range(1, n_base, 5):
        words = docs[b].split()
        for p in rng.choice(n_words, 5, replace=False):
            words[p] = str(rng.choice(vocab))
        docs.append(" ".join(words))
    docs.append("  " + docs[2].upper().replace(" ", "\n "))
    order = rng.permutation(len(docs))
    return [docs[i] for i in order]


def _brute_pairs(texts, k, threshold):
    sets = [_word_shingles(t, k) for t in texts]
    return {(j, i): _jaccard(sets[i], sets[j]) for i in range(len(texts)) for j in range(i)
            if sets[i] and sets[j] and _jaccard(sets[i], sets[j]) >= threshold}


def _brute_greedy(n, pairs):
    dup = np.full(n, -1)
    for i in range(n):
        best = None
        for j in range(i):
            s = pairs.get((j, i))
            if s is not None and dup[j] < 0 and (best is None or s > best[1]):
                best = (j, s)
        if best:
            dup[i] = best[0]
    return dup


def test_normalize_text_steps_and_canonical_order():
    assert normalize_text("  Ｆｕｌｌ\u00a0WIDTH\tﬁne  ") == "full width fine"
    assert normalize_text("Straße", ("casefold",)) == "strasse"
    assert normalize_text("A, b! 12", ["whitespace", "digits", "punctuation", "lower"]) == "a b 00"
    assert normalize_text("A  B", None) == "A  B"


def test_exact_matches_a_set_of_normalised_texts():
    rng = np.random.default_rng(1)
    base = ["alpha beta", "Gamma delta", "epsilon", "zeta eta theta", "ｉｏｔａ"]
    variants = [lambda s: s, str.upper, lambda s: f"  {s} ", lambda s: s.replace(" ", "\t\n ")]
    texts = [variants[int(rng.integers(4))](base[int(rng.integers(5))]) for _ in range(60)]
    r = deduplicate(texts, method="exact")
    first = {}
    for i, t in enumerate(texts):
        first.setdefault(" ".join(unicodedata.normalize("NFKC", t).casefold().split()), i)
    assert r.kept_indices.tolist() == sorted(first.values())
    for rec in r.records():
        assert normalize_text(texts[rec["index"]]) == normalize_text(texts[rec["duplicate_of"]])
        assert rec["method"] == "exact" and rec["similarity"] == 1.0 and rec["duplicate_of"] < rec["index"]
    raw = deduplicate(texts, method="exact", normalization=None)  # only byte-identical texts
    assert raw.kept_indices.tolist() == sorted({t: i for i, t in reversed(list(enumerate(texts)))}.values())


@pytest.mark.parametrize("lsh_threshold", [None, 0.2])
def test_minhash_finds_exactly_the_pairs_above_the_threshold(lsh_threshold):
    texts = _corpus()
    truth = _brute_pairs(texts, 3, 0.6)
    assert len(truth) >= 14  # the planted pairs (and the exact copy) are there
    assert len(_brute_pairs(texts, 3, 0.25)) >= len(truth) + 5  # and the loose copies, below the threshold
    # with lsh_threshold=0.2 LSH proposes the loose copies (Jaccard 0.1-0.4) too: verification drops them
    pairs = near_duplicate_pairs(texts, threshold=0.6, shingle_size=3, lsh_threshold=lsh_threshold)
    assert {(j, i) for j, i, _ in pairs} == set(truth)
    for j, i, s in pairs:
        assert s == pytest.approx(truth[(j, i)], abs=1e-12)
    r = deduplicate(texts, method="minhash", threshold=0.6, shingle_size=3, lsh_threshold=lsh_threshold)
    assert r.duplicate_of.tolist() == _brute_greedy(len(texts), truth).tolist()


def test_char_shingles_match_brute_force():
    rng = np.random.default_rng(3)
    letters = list("abcdefghij ")
    base = ["".join(rng.choice(letters, 60)) for _ in range(15)]
    texts = base + [b[:30] + "x" + b[31:] for b in base[:5]]
    sets = [{t[i:i + 4] for i in range(len(t) - 3)} for t in (" ".join(x.split()) for x in texts)]
    truth = {(j, i) for i in range(len(texts)) for j in range(i) if _jaccard(sets[i], sets[j]) >= 0.7}
    got = near_duplicate_pairs(texts, threshold=0.7, shingle="char", shingle_size=4, normalization=("whitespace",))
    assert {(j, i) for j, i, _ in got} == truth and len(truth) >= 5
    assert len(shingle_hashes("abcabc", shingle="char", size=3, normalization=None)) == 3  # abc, bca, cab


def _clustered_embeddings(seed=0, n=120, d=16):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(4, d)) * 3
    x = centers[rng.integers(4, size=n)] + rng.normal(size=(n, d))
    dups = rng.choice(n, 30, replace=False)
    near = x[dups] + rng.normal(scale=0.02, size=(30, d))  # cosine ~0.999 to their source
    return np.concatenate([x, near])


def _brute_semdedup(x, labels, to_center, eps, keep):
    dup = np.full(len(x), -1)
    for c in np.unique(labels):
        members = [int(i) for i in np.flatnonzero(labels == c)]
        if keep == "far":
            members.sort(key=lambda i: (to_center[i], i))
        kept = []
        for i in members:
            sims = [(float(x[i] @ x[j]), j) for j in kept]
            best = max(sims, default=(-2.0, -1), key=lambda t: t[0])
            if best[0] > 1 - eps:
                dup[i] = best[1]
            else:
                kept.append(i)
    return dup


@pytest.mark.parametrize("keep", ["far", "first"])
def test_semdedup_matches_all_pairs_cosine_within_clusters(keep):
    emb = _clustered_embeddings()
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    eps = 0.01
    r = deduplicate(None, method="semantic", embeddings=emb, eps=eps, n_clusters=4, semantic_keep=keep, seed=3)
    km = KMeans(n_clusters=4, metric="cosine", seed=3, backend="torch").fit(x.astype(np.float32))
    to_center = np.einsum("nd,nd->n", x, km.cluster_centers_[km.labels_].astype(np.float64))
    ref = _brute_semdedup(x, km.labels_, to_center, eps, keep)
    assert r.duplicate_of.tolist() == ref.tolist()
    assert 25 <= (~r.keep).sum() <= 40  # the 30 planted copies (or their sources), give or take a chance pair
    for rec in r.records():
        assert km.labels_[rec["index"]] == km.labels_[rec["duplicate_of"]]
        assert rec["similarity"] == pytest.approx(float(x[rec["index"]] @ x[rec["duplicate_of"]]), abs=1e-6)


def test_semdedup_with_one_cluster_is_greedy_all_pairs():
    """One cluster, data order: item i goes iff some kept j < i has cosine > 1 - eps (no k-means involved)."""
    emb = _clustered_embeddings(seed=5, n=60)
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sims = x @ x.T
    keep = []
    for i in range(len(x)):
        if not any(sims[i, j] > 0.98 for j in keep):
            keep.append(i)
    r = deduplicate(None, method="semantic", embeddings=emb, eps=0.02, n_clusters=1, semantic_keep="first")
    assert r.kept_indices.tolist() == keep
    kept = x[r.keep]
    off = kept @ kept.T - 2 * np.eye(len(kept))
    assert off.max() <= 0.98  # no two kept items are semantic duplicates


def test_manifest_is_consistent_across_stages_and_deterministic():
    texts = _corpus(seed=2)
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(len(texts), 8))
    emb[7] = emb[3] + 1e-3  # a semantic duplicate that no text stage sees
    kwargs = dict(method="semantic,exact,minhash", threshold=0.6, shingle_size=3, embeddings=emb, eps=0.001,
                  n_clusters=2)
    r = deduplicate(texts, **kwargs)
    assert r.settings["method"] == ["exact", "minhash", "semantic"]  # the canonical order
    recs = r.records()
    assert [d["index"] for d in recs] == r.removed_indices.tolist()
    assert r.keep.sum() + len(recs) == len(texts)
    stage_of = {d["index"]: ["exact", "minhash", "semantic"].index(d["method"]) for d in recs}
    for d in recs:
        assert d["duplicate_of"] != d["index"] and r.keep[d["kept_representative"]]
        # the item it duplicates survived the stage that removed this one
        assert stage_of.get(d["duplicate_of"], 99) > stage_of[d["index"]]
    counts = {s["method"]: s["n_removed"] for s in r.stages}
    assert counts == {m: sum(d["method"] == m for d in recs) for m in ("exact", "minhash", "semantic")}
    assert counts["exact"] >= 1 and counts["minhash"] >= 10 and counts["semantic"] >= 1
    again = deduplicate(texts, **kwargs)
    assert again.records() == recs


@pytest.mark.parametrize("kwargs, name", [
    (dict(method="fuzzy"), "method"),
    (dict(method="exact,exact"), "method"),
    (dict(threshold=1.5), "threshold"),
    (dict(shingle="line"), "shingle"),
    (dict(shingle_size=0), "shingle_size"),
    (dict(num_perm=1), "num_perm"),
    (dict(method="semantic", eps=-0.1, embeddings=np.ones((3, 2))), "eps"),
    (dict(method="semantic", embeddings=np.ones((2, 2))), "embeddings"),
    (dict(method="semantic", embeddings=np.full((3, 2), np.nan)), "embeddings"),
    (dict(normalization=["nfkd"]), "normalization"),
    (dict(semantic_keep="middle"), "semantic_keep"),
    (dict(lsh_threshold=0.0), "lsh_threshold"),
])
def test_bad_parameters_name_the_parameter(kwargs, name):
    with pytest.raises(InvalidParameterError, match=f"'{name}' parameter of deduplicate"):
        deduplicate(["a b", "c d", "e f"], **kwargs)


def test_bad_texts_are_refused():
    with pytest.raises(InvalidParameterError, match="'texts' parameter of deduplicate.*int 3 at index 1"):
        deduplicate(["a", 3])
    with pytest.raises(InvalidParameterError, match="'texts' parameter of deduplicate"):
        deduplicate("one string")
    with pytest.raises(InvalidParameterError, match="may be None only"):
        deduplicate(None, method="exact")


def test_semantic_default_embeds_with_minilm():
    """The one test that loads MiniLM: a paraphrase goes, an unrelated text stays, as with its embeddings given."""
    from leanscale.models.encoders import embed_texts

    texts = ["The cat sat on the mat.", "Stock markets fell sharply today.", "A cat was sitting on the mat."]
    r = deduplicate(texts, method="semantic", eps=0.2, n_clusters=1, semantic_keep="first")
    assert r.kept_indices.tolist() == [0, 1] and r.records()[0]["duplicate_of"] == 0
    given = deduplicate(texts, method="semantic", eps=0.2, n_clusters=1, semantic_keep="first",
                        embeddings=embed_texts(texts))
    assert given.records() == r.records() and r.settings["embeddings"] == "MiniLM-L6"


def test_minhash_without_datasketch_names_the_extra(monkeypatch):
    import sys

    from leanscale.core.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "datasketch", None)  # `import datasketch` now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'leanscale\[dedup\]'"):
        deduplicate(["a b c", "a b d"], method="minhash")
    assert deduplicate(["a", "A"], method="exact").kept_indices.tolist() == [0]  # exact needs nothing


@pytest.mark.parametrize("num_perm, threshold", [(2, 0.5), (8, 0.99), (128, 1.0)])
def test_extreme_lsh_settings_still_find_identical_shingle_sets(num_perm, threshold):
    texts = ["a b c d e f", "A b c d e  f", "a b c d e g", "x y z"]  # 1 and 0 share every shingle
    r = deduplicate(texts, method="minhash", num_perm=num_perm, threshold=threshold, shingle_size=2)
    assert 1 not in r.kept_indices and {0, 3} <= set(r.kept_indices.tolist())
    assert r.records()[0] == {"index": 1, "duplicate_of": 0, "kept_representative": 0, "method": "minhash",
                              "similarity": 1.0}
