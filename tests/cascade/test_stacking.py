"""Stacked big model: out-of-fold TF-IDF log-probabilities and the stacked encoder."""

from __future__ import annotations

import numpy as np

from leanscale.cascade import EmbeddingClassifier, TfidfClassifier
from leanscale.cascade.stacking import STACK_SCALE, StackedEncoder, cross_fitted_logp


def toy(n=300, seed=0):
    rng = np.random.default_rng(seed)
    words = {"a": "apple", "b": "banana", "c": "cherry"}
    y = rng.choice(list(words), n)
    X = [f"{words[c]} fruit {rng.integers(100)}" if rng.random() < 0.9 else f"fruit {rng.integers(100)}" for c in y]
    return X, y.astype(object)


def test_cross_fitted_logp_is_out_of_fold():
    X, y = toy()
    classes = np.array(["a", "b", "c"], dtype=object)
    L = cross_fitted_logp(X, y, classes, seed=3)
    assert L.shape == (300, 3) and np.all(L <= 0) and np.all(L >= STACK_SCALE * np.log(1e-6) - 1e-9)
    # fold 0 must equal a model fitted on fold 1 only
    perm = np.random.default_rng(3).permutation(300)
    f0, f1 = np.array_split(perm, 2)
    m = TfidfClassifier().fit([X[i] for i in f1], y[f1])
    expect = STACK_SCALE * np.log(np.clip(m.predict_proba([X[i] for i in f0]), 1e-6, 1))
    np.testing.assert_allclose(L[f0], expect, rtol=1e-6)
    # and differs from in-sample predictions of a model fitted on everything (over-confident)
    full = TfidfClassifier().fit(X, y)
    insample = STACK_SCALE * np.log(np.clip(full.predict_proba(X), 1e-6, 1))
    assert insample.max(axis=1).mean() > L.max(axis=1).mean()


def test_stacked_encoder_features_and_training():
    X, y = toy()
    tfidf = TfidfClassifier().fit(X, y)

    def embed(texts):  # a deterministic toy encoder: length and digit features
        return np.array([[len(t) / 20.0, sum(ch.isdigit() for ch in t) / 3.0] for t in texts], dtype=np.float32)

    enc = StackedEncoder(tfidf, embed=embed)
    F = enc(X[:5])
    assert F.shape == (5, 2 + 3) and F.dtype == np.float32
    np.testing.assert_allclose(F[:, :2], embed(X[:5]))
    np.testing.assert_allclose(F[:, 2:], STACK_SCALE * np.log(np.clip(tfidf.predict_proba(X[:5]), 1e-6, 1)), rtol=1e-6)
    F_tr = np.hstack([embed(X), cross_fitted_logp(X, y, tfidf.classes_)]).astype(np.float32)
    big = EmbeddingClassifier(encoder=enc, hidden=16, epochs=30, lr=1e-2).fit_embeddings(F_tr, y)
    assert np.mean(big.predict(X) == y) > 0.85  # predict on raw texts goes through the encoder
