import doctest
import json
import zlib

import numpy as np
import pytest

from leanscale.cascade import text_models
from leanscale.cascade.stages import ModelStage
from leanscale.cascade.text_models import (
    EmbeddingClassifier,
    TfidfClassifier,
    load_arrays,
    load_model,
    load_state,
    model_from_state,
    save_arrays,
    save_state,
)
from leanscale.core.errors import InvalidParameterError, NotFittedError

KEYWORDS = {
    "sport": ["football", "tennis", "marathon", "goalkeeper", "stadium"],
    "food": ["pasta", "omelette", "bakery", "spinach", "dessert"],
    "tech": ["compiler", "laptop", "database", "router", "software"],
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def keyword_task(n, seed):
    """Texts of 6 random filler words plus one class keyword at a random position."""
    rng = np.random.default_rng(seed)
    filler = [f"w{i}" for i in range(300)]
    names = sorted(KEYWORDS)
    texts, labels = [], []
    for _ in range(n):
        label = names[rng.integers(len(names))]
        words = list(rng.choice(filler, size=6))
        words.insert(int(rng.integers(7)), KEYWORDS[label][rng.integers(5)])
        texts.append(" ".join(words))
        labels.append(label)
    return texts, np.asarray(labels)


ALL_KEYWORDS = [w for name in sorted(KEYWORDS) for w in KEYWORDS[name]]


def hashed_bow(texts, dim=16):
    """A deterministic toy encoder: keyword counts plus a hashed bag of words, unit norm."""
    out = np.zeros((len(texts), len(ALL_KEYWORDS) + dim), dtype=np.float32)
    for i, t in enumerate(texts):
        for w in t.split():
            if w in ALL_KEYWORDS:
                out[i, ALL_KEYWORDS.index(w)] += 1.0
            out[i, len(ALL_KEYWORDS) + zlib.crc32(w.encode()) % dim] += 1.0
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def test_doctests():
    assert doctest.testmod(text_models, raise_on_error=False).failed == 0


# ---------------------------------------------------------------------------------- TF-IDF


def test_tfidf_learns_keyword_task_and_round_trips_exactly(tmp_path):
    texts, y = keyword_task(400, seed=0)
    test_texts, y_test = keyword_task(200, seed=1)
    clf = TfidfClassifier(min_df=1)
    assert clf.fit(texts, y) is clf
    assert clf.classes_.tolist() == ["food", "sport", "tech"]
    assert (clf.predict(test_texts) == y_test).mean() > 0.95
    P = clf.predict_proba(test_texts)
    assert P.shape == (200, 3) and P.dtype == np.float64
    np.testing.assert_allclose(P.sum(axis=1), 1.0)

    meta, arrays = clf.get_state()
    json.dumps(meta)  # JSON-able
    assert set(arrays) == {"idf", "coef", "intercept"}
    assert arrays["coef"].shape == (3, len(meta["tfidf"]["vocabulary"]))
    clone = TfidfClassifier.from_state(meta, arrays)
    assert np.array_equal(clone.predict_proba(test_texts), P)
    assert clone.classes_.dtype == clf.classes_.dtype
    assert clone.get_params() == clf.get_params()

    folder = clf.save(tmp_path / "tfidf")
    assert (folder / "meta.json").is_file() and len(list(folder.glob("arrays-*.safetensors"))) == 1
    for loaded in (TfidfClassifier.load(folder), load_model(folder)):
        assert isinstance(loaded, TfidfClassifier)
        assert np.array_equal(loaded.predict_proba(test_texts), P)
        assert np.array_equal(loaded.predict(test_texts), clf.predict(test_texts))


def test_tfidf_binary_int_labels_and_model_stage():
    texts, y = keyword_task(300, seed=2)
    yb = (y == "tech").astype(np.int64)
    clf = TfidfClassifier(min_df=1, solver="lbfgs", max_iter=200).fit(texts, yb)
    assert clf.classes_.tolist() == [0, 1]
    clone = TfidfClassifier.from_state(*clf.get_state())
    assert clone.classes_.dtype == np.int64
    assert np.array_equal(clone.predict_proba(texts[:50]), clf.predict_proba(texts[:50]))
    stage = ModelStage(clone, name="tfidf", cost=1.0)
    out = stage.predict(texts[:50])
    assert out.answered.all()
    assert (out.labels.astype(int) == yb[:50]).mean() > 0.95


def test_tfidf_is_deterministic_and_records_convergence():
    texts, y = keyword_task(200, seed=3)
    a = TfidfClassifier(min_df=1).fit(texts, y)
    b = TfidfClassifier(min_df=1).fit(texts, y)
    assert np.array_equal(a.predict_proba(texts), b.predict_proba(texts))
    c = TfidfClassifier(min_df=1, max_iter=1, tol=1e-12).fit(texts, y)  # stops early, no warning
    assert c.converged_ is False and c.n_iter_ == 1


def test_tfidf_bad_inputs():
    texts, y = keyword_task(20, seed=4)
    with pytest.raises(NotFittedError, match="fit"):
        TfidfClassifier().predict_proba(texts)
    with pytest.raises(InvalidParameterError, match="'C'"):
        TfidfClassifier(C=0).fit(texts, y)
    with pytest.raises(InvalidParameterError, match="'solver'"):
        TfidfClassifier(solver="sag").fit(texts, y)
    with pytest.raises(InvalidParameterError, match="'ngram_range'"):
        TfidfClassifier(ngram_range=(2, 1)).fit(texts, y)
    with pytest.raises(InvalidParameterError, match="same length"):
        TfidfClassifier().fit(texts, y[:-1])
    with pytest.raises(InvalidParameterError, match="at least 2 classes"):
        TfidfClassifier().fit(texts, ["a"] * len(texts))
    with pytest.raises(InvalidParameterError, match="'texts'"):
        TfidfClassifier().fit("one string", ["a"])
    with pytest.raises(InvalidParameterError, match="min_df"):
        TfidfClassifier(min_df=5).fit(["a b", "c d"], [0, 1])
    meta, arrays = TfidfClassifier(min_df=1).fit(texts, y).get_state()
    with pytest.raises(InvalidParameterError, match="'coef'"):
        TfidfClassifier.from_state(meta, {"idf": arrays["idf"], "intercept": arrays["intercept"]})
    with pytest.raises(InvalidParameterError, match="EmbeddingClassifier"):
        EmbeddingClassifier.from_state(meta, arrays)


# ------------------------------------------------------------------------------ embeddings


def test_embedding_classifier_learns_with_toy_encoder_and_round_trips(tmp_path):
    texts, y = keyword_task(400, seed=5)
    test_texts, y_test = keyword_task(200, seed=6)
    clf = EmbeddingClassifier(encoder=hashed_bow, hidden=32, epochs=30, lr=3e-2, batch_size=100)
    assert clf.fit(texts, y) is clf
    assert clf.loss_history_[-1] < clf.loss_history_[0]
    assert (clf.predict(test_texts) == y_test).mean() > 0.95
    P = clf.predict_proba(test_texts)
    np.testing.assert_allclose(P.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(clf.embed(test_texts), hashed_bow(test_texts))
    np.testing.assert_array_equal(clf.predict_proba_embeddings(hashed_bow(test_texts)), P)

    # a user callable cannot be saved; with encoder=None the head can, and the callable comes back
    with pytest.raises(InvalidParameterError, match="callable"):
        clf.get_state()
    clf.set_params(encoder=None)
    meta, arrays = clf.get_state()
    json.dumps(meta)
    assert all(k.startswith("head.") for k in arrays)
    clone = EmbeddingClassifier.from_state(meta, arrays, encoder=hashed_bow)
    assert np.array_equal(clone.predict_proba(test_texts), P)
    folder = clf.save(tmp_path / "emb")
    again = load_model(folder, encoder=hashed_bow)
    assert isinstance(again, EmbeddingClassifier)
    assert np.array_equal(again.predict_proba(test_texts), P)
    headless = EmbeddingClassifier.load(folder)
    with pytest.raises(InvalidParameterError, match="'encoder'"):
        headless.predict_proba(test_texts)
    assert np.array_equal(headless.predict_proba_embeddings(hashed_bow(test_texts)), P)


def test_embedding_classifier_precomputed_linear_and_deterministic():
    rng = np.random.default_rng(0)
    E = rng.normal(size=(300, 8)).astype(np.float32)
    y = (E[:, 0] + E[:, 1] > 0).astype(np.int64)
    a = EmbeddingClassifier(encoder=None, hidden=0, epochs=20, lr=5e-2, batch_size=100).fit_embeddings(E, y)
    b = EmbeddingClassifier(encoder=None, hidden=0, epochs=20, lr=5e-2, batch_size=100).fit_embeddings(E, y)
    assert np.array_equal(a.predict_proba_embeddings(E), b.predict_proba_embeddings(E))
    assert (a.predict_embeddings(E) == y).mean() > 0.95
    _, arrays = a.get_state()
    assert set(arrays) == {"head.0.weight", "head.0.bias"}
    assert arrays["head.0.weight"].shape == (2, 8)
    with pytest.raises(InvalidParameterError, match="8 columns"):
        a.predict_proba_embeddings(E[:, :4])
    with pytest.raises(InvalidParameterError, match="'hidden'"):
        EmbeddingClassifier(encoder=None, hidden=-1).fit_embeddings(E, y)
    with pytest.raises(InvalidParameterError, match="'encoder'"):
        EmbeddingClassifier(encoder="bert").fit_embeddings(E, y)
    with pytest.raises(InvalidParameterError, match="'E', 'y'"):
        EmbeddingClassifier(encoder=None).fit_embeddings(E, y[:-1])


def test_embedding_classifier_minilm_state_round_trip(tmp_path):
    texts = [f"the {w} was delicious" for w in ("pasta", "soup", "cake", "bread", "salad")] * 2 + \
            [f"the {w} crashed again" for w in ("laptop", "server", "compiler", "phone", "router")] * 2
    y = ["food"] * 10 + ["tech"] * 10
    clf = EmbeddingClassifier(hidden=0, epochs=30, lr=5e-2, batch_size=8).fit(texts, y)
    assert clf.n_features_in_ == 384
    assert (clf.predict(texts) == np.asarray(y)).mean() == 1.0
    folder = clf.save(tmp_path / "minilm")
    meta, _ = load_state(folder)
    assert meta["params"]["encoder"] == "minilm"
    clone = EmbeddingClassifier.load(folder)
    assert clone.encoder == "minilm"
    assert np.array_equal(clone.predict_proba(texts), clf.predict_proba(texts))


# ---------------------------------------------------------------------------------- arrays


def test_save_and_load_arrays_safetensors_and_npz(tmp_path):
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([True, False]),
              "c": np.array([1, 2], dtype=np.int64)}
    for name in ("x.safetensors", "x.npz"):
        path = save_arrays(tmp_path / name, arrays)
        assert path == tmp_path / name
        back = load_arrays(path)
        assert set(back) == set(arrays)
        for k, value in arrays.items():
            assert back[k].dtype == value.dtype
            np.testing.assert_array_equal(back[k], value)
    assert (tmp_path / "x.npz").read_bytes()[:2] == b"PK"
    assert (tmp_path / "x.safetensors").read_bytes()[:2] != b"PK"
    with pytest.raises(InvalidParameterError, match="JSON meta"):
        save_arrays(tmp_path / "y.safetensors", {"s": np.array(["a", "b"])})
    with pytest.raises(InvalidParameterError, match="keys"):
        save_arrays(tmp_path / "y.safetensors", {1: np.zeros(2)})
    save_state(tmp_path / "st", {"class": "Nothing"}, {"w": np.zeros(3)})
    meta, back = load_state(tmp_path / "st")
    assert meta == {"class": "Nothing"} and back["w"].shape == (3,)
    with pytest.raises(InvalidParameterError, match="'class'"):
        model_from_state(meta, back)
    with pytest.raises(FileNotFoundError, match="meta.json"):
        load_state(tmp_path / "missing")
