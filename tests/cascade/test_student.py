"""StudentClassifier: learned static token vectors (bigrams, a tiny transformer) distilled into a cascade stage."""

from __future__ import annotations

import numpy as np
import pytest

from leanscale.cascade import ModelStage, StudentClassifier, TfidfClassifier
from leanscale.core.errors import InvalidParameterError

WORDS = ["dog", "cat", "river", "stone", "music", "bread", "cloud", "iron", "paper", "salt", "horse", "glass"]


def _order_task():
    """'a b' is class 0 and 'b a' class 1 for every pair: the same bag of tokens in both classes."""
    texts, y = [], []
    for i, a in enumerate(WORDS):
        for b in WORDS[i + 1:]:
            texts += [f"{a} {b}", f"{b} {a}"]
            y += [0, 1]
    return texts, np.array(y)


def test_frozen_bag_is_the_static_encoder(static_encoder_dir):
    from leanscale.models import static_text_encoder

    texts = ["a small domesticated carnivore", "the act of running quickly", "", "an unknown zzqx token",
             "a long gloss " * 30]
    st = StudentClassifier(encoder_path=str(static_encoder_dir), learn_tokens=False, hidden=0, epochs=1,
                           max_tokens=4096).fit(texts, [0, 1, 0, 1, 0])
    enc = static_text_encoder(static_encoder_dir, build=False)
    ref = enc.encode(texts)  # (5, 256), float16 precision
    np.testing.assert_allclose(st.embed(texts), ref, atol=2e-3)
    # a transformer starts as the bag: its output projections are zero (a negligible step size keeps them there)
    tf = StudentClassifier(encoder_path=str(static_encoder_dir), layers=1, hidden=0, epochs=1, lr=1e-12,
                           max_tokens=4096).fit(texts, [0, 1, 0, 1, 0])
    np.testing.assert_allclose(tf.embed(texts), ref, atol=2e-3)
    # the table is frozen: fitting did not move it
    np.testing.assert_array_equal(st.net_.tok.weight.detach().numpy(), np.asarray(enc._model.embedding, np.float32))


def test_bigrams_and_attention_see_order_the_bag_cannot(static_encoder_dir):
    texts, y = _order_task()  # 132 texts
    kw = dict(encoder_path=str(static_encoder_dir), hidden=32, epochs=25, lr=1e-2, batch_size=32)
    bag = StudentClassifier(**{**kw, "epochs": 5}).fit(texts, y)
    # identical bags -> identical predictions for 'a b' and 'b a': exactly half right, however long it trains
    assert np.mean(bag.predict(texts) == y) == 0.5
    bigrams = StudentClassifier(bigram_buckets=1024, **kw).fit(texts, y)
    assert np.mean(bigrams.predict(texts) == y) == 1.0
    tf = StudentClassifier(layers=1, heads=4, **{**kw, "batch_size": 16, "epochs": 20, "hidden": 64,
                                                  "weight_decay": 0.0}).fit(texts, y)  # positions: order is visible
    assert np.mean(tf.predict(texts) == y) >= 0.75


def test_soft_one_hot_targets_equal_hard_labels_and_seeded(static_encoder_dir):
    texts, y = _order_task()
    kw = dict(encoder_path=str(static_encoder_dir), bigram_buckets=256, hidden=16, epochs=3, seed=3)
    hard = StudentClassifier(**kw).fit(texts, y)
    soft = StudentClassifier(**kw).fit(texts, y, soft_targets=np.eye(2)[y])
    again = StudentClassifier(**kw).fit(texts, y)
    np.testing.assert_allclose(soft.predict_proba(texts), hard.predict_proba(texts), atol=1e-6)
    np.testing.assert_array_equal(again.predict_proba(texts), hard.predict_proba(texts))
    # the targets, not the labels, drive training: all mass on one class for every text
    for c in (0, 1):
        q = np.tile(np.eye(2)[c], (len(texts), 1))
        pulled = StudentClassifier(**{**kw, "epochs": 10, "lr": 1e-2}).fit(texts, y, soft_targets=q)
        assert (pulled.predict_proba(texts)[:, c] > 0.6).all()


def test_tfidf_block_save_load_and_stage(static_encoder_dir, tmp_path):
    texts, y = _order_task()
    labels = np.where(y == 0, "first", "second")
    tfidf = TfidfClassifier(min_df=1).fit(texts, labels)
    st = StudentClassifier(encoder_path=str(static_encoder_dir), layers=1, bigram_buckets=64, tfidf=tfidf,
                           hidden=8, epochs=2).fit(texts, labels)
    assert st.net_.head[0].in_features == 256 + 2  # the text vector, then the TF-IDF block
    st.save(tmp_path / "student")
    back = StudentClassifier.load(tmp_path / "student")
    np.testing.assert_array_equal(back.predict_proba(texts), st.predict_proba(texts))
    assert list(back.classes_) == ["first", "second"] and back.tfidf is not None
    out = ModelStage(back, name="student").predict(texts[:5])
    assert list(out.labels) == list(st.predict(texts[:5]))


def test_bad_inputs(static_encoder_dir, tmp_path):
    texts, y = _order_task()
    d = str(static_encoder_dir)
    with pytest.raises(InvalidParameterError, match="'bigram_buckets'"):
        StudentClassifier(encoder_path=d, bigram_buckets=-1).fit(texts, y)
    with pytest.raises(InvalidParameterError, match="'tfidf'"):
        StudentClassifier(encoder_path=d, tfidf="tfidf").fit(texts, y)
    with pytest.raises(InvalidParameterError, match="'soft_targets'"):
        StudentClassifier(encoder_path=d, epochs=1).fit(texts, y, soft_targets=np.ones((3, 2)) / 2)
    with pytest.raises(InvalidParameterError, match="'tfidf_features'"):
        StudentClassifier(encoder_path=d, epochs=1).fit(texts, y, tfidf_features=np.zeros((len(texts), 2)))
    tfidf = TfidfClassifier(min_df=1).fit(texts, y)
    with pytest.raises(InvalidParameterError, match=r"'tfidf_features'.*\(132, 2\)"):
        StudentClassifier(encoder_path=d, tfidf=tfidf, epochs=1).fit(texts, y, tfidf_features=np.zeros((5, 2)))
    with pytest.raises(InvalidParameterError, match="'texts' and 'y'|'y'"):
        StudentClassifier(encoder_path=d, epochs=1).fit(texts, y[:-1])
    with pytest.raises(Exception, match="not fitted|fit"):
        StudentClassifier(encoder_path=d).predict_proba(["a"])
    st = StudentClassifier(encoder_path=d, hidden=0, epochs=1).fit(texts, y)
    meta, arrays = st.get_state()
    arrays["net.head.0.weight"] = arrays["net.head.0.weight"][:, :10]
    with pytest.raises(InvalidParameterError, match="'net.head.0.weight'"):
        StudentClassifier.from_state(meta, arrays)
    meta, arrays = st.get_state()
    with pytest.raises(InvalidParameterError, match="tokenizer"):
        StudentClassifier.from_state({**meta, "tokenizer": {"json": "{not json"}}, arrays)
