"""DataPruner: the scikit-learn contract, every metric equal to its score function on the same
trained models, resumable scoring, the manifest, bad input."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from leanscale.core.errors import (
    DataFormatError,
    DataNotFoundError,
    InvalidParameterError,
    NotFittedError,
)
from leanscale.models import encoders
from leanscale.pruning import _train, embed
from leanscale.pruning.forgetting import ForgettingTracker
from leanscale.pruning.grand import grand_scores
from leanscale.pruning.prototypes import prototype_scores
from leanscale.pruning.pruner import (
    MANIFEST_FORMAT_VERSION,
    DataPruner,
    default_model_fn,
    read_pruning_manifest,
)
from leanscale.pruning.scores import collect_probs, el2n_scores, uncertainty_scores
from leanscale.pruning.select import AUTO_MIN_FRACTION, resolve_strategy, select

N, D, K = 60, 4, 3
FAST = {"batch_size": 16, "lr": 0.1, "score_epochs": 2}


def _data(n=N, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % K
    centers = rng.normal(scale=2.0, size=(K, D))
    x = (centers[y] + rng.normal(size=(n, D))).astype(np.float32)  # (n, D) three noisy blobs
    return x, y


def _mlp():
    return nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, K))


def _trained(x, y, seed, epochs=2, on_batch=None):
    return _train.train_scoring_model(_mlp, x, y, epochs=epochs, batch_size=16, lr=0.1, seed=seed,
                                      on_batch=on_batch)


# --- the estimator contract ----------------------------------------------------------------------
def test_params_are_stored_as_given_and_checked_in_fit():
    pruner = DataPruner(metric="el2m", keep=1.5)  # not checked yet
    assert pruner.get_params()["metric"] == "el2m" and pruner.keep == 1.5
    with pytest.raises(InvalidParameterError, match="'metric'.*Did you mean 'el2n'"):
        pruner.fit(*_data())
    assert pruner.set_params(metric="random") is pruner
    with pytest.raises(InvalidParameterError, match="'keep' parameter of DataPruner must be an int"):
        pruner.fit(*_data())
    with pytest.raises(InvalidParameterError, match="'colour'"):
        pruner.set_params(colour=1)
    assert repr(DataPruner(metric="grand", keep=0.3)) == "DataPruner(metric='grand', keep=0.3)"


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"keep": 0.0}, "'keep'"),
        ({"keep": True}, "'keep'"),
        ({"strategy": "medium"}, "'strategy'"),
        ({"n_seeds": 0}, "'n_seeds'"),
        ({"score_epochs": -1}, "'score_epochs'"),
        ({"embedding": "minilm"}, "'embedding'.*an array"),
        ({"class_balance": 1}, "'class_balance'"),
        ({"model_fn": 3}, "'model_fn'"),
        ({"seed": -1}, "'seed'"),
    ],
)
def test_bad_parameters_name_the_parameter(params, match):
    with pytest.raises(InvalidParameterError, match=match):
        DataPruner(**{"metric": "random", **params}).fit(*_data())


def test_transform_before_fit_says_call_fit_first():
    with pytest.raises(NotFittedError, match="call fit first"):
        DataPruner().transform()
    with pytest.raises(NotFittedError, match="call fit first"):
        DataPruner().write_manifest("/nonexistent")


@pytest.mark.parametrize("metric", ["el2n", "grand", "forgetting", "margin", "supervised_prototypes"])
def test_label_metrics_need_y(metric):
    x, _ = _data()
    with pytest.raises(InvalidParameterError, match=f"'y' parameter.*required for metric '{metric}'"):
        DataPruner(metric=metric).fit(x)


def test_bad_data():
    x, y = _data()
    with pytest.raises(InvalidParameterError, match="'x', 'y'.*x=60, y=59"):
        DataPruner(metric="random").fit(x, y[:-1])
    with pytest.raises(InvalidParameterError, match="'keep'.*at most the number of examples \\(60\\)"):
        DataPruner(metric="random", keep=61).fit(x, y)
    with pytest.raises(InvalidParameterError, match="'scores'.*finite"):
        DataPruner().fit(x, y, scores=np.full(N, np.nan))
    with pytest.raises(InvalidParameterError, match="'x', 'y', 'scores'.*scores=5"):
        DataPruner().fit(x, y, scores=np.zeros(5))
    with pytest.raises(InvalidParameterError, match="'x' parameter.*required"):
        DataPruner(metric="el2n").fit(None, y)
    with pytest.raises(InvalidParameterError, match="'score_epochs'.*at least 1 for metric 'forgetting'"):
        DataPruner(metric="forgetting", score_epochs=0.5, model_fn=_mlp).fit(x, y)
    with pytest.raises(InvalidParameterError, match="'n_clusters'.*required"):
        DataPruner(metric="prototypes").fit(x)
    with pytest.raises(InvalidParameterError, match=r"'embedding'.*\(n_examples=60, d\). Got shape \(60,\)"):
        DataPruner(metric="prototypes", n_clusters=3, embedding=np.zeros(N)).fit(x)
    fitted = DataPruner(metric="random").fit(x, y)
    with pytest.raises(InvalidParameterError, match="'x' parameter of DataPruner.transform.*60"):
        fitted.transform(x[:3])
    with pytest.raises(InvalidParameterError, match="'y'"):
        fitted.fit(x, y[:, None])
    with pytest.raises(NotFittedError):  # a failed refit does not leave the old result behind
        fitted.transform()


# --- each metric equals its score function ----------------------------------------------------------
def test_el2n_is_the_seed_average_of_early_trained_models():
    x, y = _data()
    pruner = DataPruner(metric="el2n", model_fn=_mlp, n_seeds=2, seed=5, **FAST)
    assert pruner.fit(x, y) is pruner
    probs = [collect_probs(_trained(x, y, seed), x) for seed in (5, 6)]
    np.testing.assert_allclose(pruner.scores_, el2n_scores(probs, y), rtol=0, atol=1e-12)
    assert pruner.scores_.dtype == np.float64 and pruner.n_examples_ == N and pruner.score_epochs_ == 2.0


def test_grand_forgetting_and_uncertainty_equal_their_score_functions():
    x, y = _data()
    model = _trained(x, y, 0)
    grand = DataPruner(metric="grand", model_fn=_mlp, **FAST).fit(x, y)
    np.testing.assert_allclose(grand.scores_, grand_scores(model, (torch.as_tensor(x), torch.as_tensor(y))),
                               rtol=1e-6)
    for kind in ("margin", "entropy", "least_confidence"):
        pruner = DataPruner(metric=kind, model_fn=_mlp, **FAST).fit(x, y)
        np.testing.assert_allclose(pruner.scores_, uncertainty_scores(collect_probs(model, x), kind=kind),
                                   rtol=0, atol=1e-12)

    tracker = ForgettingTracker(N)
    _trained(x, y, 0, epochs=3,
             on_batch=lambda idx, logits, yb: tracker.update(idx, (logits.argmax(1) == yb)))
    forgetting = DataPruner(metric="forgetting", model_fn=_mlp, **{**FAST, "score_epochs": 3}).fit(x, y)
    np.testing.assert_array_equal(forgetting.scores_, tracker.scores(never_learned="max"))


def test_uncertainty_averages_the_probabilities_of_the_seeds():
    x, y = _data()
    pruner = DataPruner(metric="entropy", model_fn=_mlp, n_seeds=2, **FAST).fit(x, y)
    mean = (collect_probs(_trained(x, y, 0), x) + collect_probs(_trained(x, y, 1), x)) / 2
    np.testing.assert_allclose(pruner.scores_, uncertainty_scores(mean, kind="entropy"), rtol=0, atol=1e-12)


def test_default_model_is_a_bncnn_for_images_and_an_mlp_otherwise():
    from leanscale.models.cnn import BNCNN, MLPClassifier

    assert isinstance(default_model_fn((10, 1, 28, 28), 10)(), BNCNN)
    mlp = default_model_fn((10, 3, 5), 4)()
    assert isinstance(mlp, MLPClassifier) and mlp(torch.zeros(2, 3, 5)).shape == (2, 4)
    images = torch.randn(24, 1, 8, 8)
    labels = torch.arange(24) % 2
    pruner = DataPruner(metric="el2n", score_epochs=1, batch_size=8, keep=12).fit(images, labels)
    assert pruner.scores_.shape == (24,) and np.isfinite(pruner.scores_).all()
    assert len(pruner.transform()) == 12


def test_prototype_metrics_with_array_callable_and_default_embeddings():
    x, y = _data()
    emb = np.random.default_rng(1).normal(size=(N, 5))
    given = DataPruner(metric="prototypes", embedding=emb, n_clusters=4, seed=2).fit(x)
    np.testing.assert_allclose(given.scores_, prototype_scores(emb, 4, metric="cosine", seed=2))
    assert given.n_clusters_ == 4

    def fn(batch):
        return np.asarray(batch)[:, :2] * 3.0

    called = DataPruner(metric="prototypes", embedding=fn, seed=2).fit(x, y)  # n_clusters: the 3 classes
    np.testing.assert_allclose(called.scores_, prototype_scores(encoders.embed_with(fn, x), 3, metric="cosine", seed=2))
    flat = DataPruner(metric="prototypes", n_clusters=3).fit(x)  # 2-d x is its own embedding
    np.testing.assert_allclose(flat.scores_, prototype_scores(x, 3, metric="cosine", seed=0))
    sup = DataPruner(metric="supervised_prototypes", embedding=emb).fit(x, y)
    np.testing.assert_allclose(sup.scores_, prototype_scores(emb, labels=y, metric="cosine"))
    no_x = DataPruner(metric="prototypes", embedding=emb, n_clusters=2).fit()  # the embedding is enough
    assert no_x.n_examples_ == N


def test_images_without_embedding_train_a_self_supervised_encoder_once(tmp_path, monkeypatch):
    images = torch.randn(30, 1, 8, 8)
    calls = []

    def fake_ssl(imgs, **kwargs):
        calls.append(kwargs)
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 6))

    monkeypatch.setattr(embed, "train_ssl_encoder", fake_ssl)
    pruner = DataPruner(metric="prototypes", n_clusters=3, seed=4, out_dir=tmp_path).fit(images)
    expected = prototype_scores(encoders.embed_images(fake_ssl(images), images), 3, metric="cosine", seed=4)
    np.testing.assert_allclose(pruner.scores_, expected, rtol=1e-6)
    assert calls[0] == {"seed": 4}
    again = DataPruner(metric="prototypes", n_clusters=3, seed=4, out_dir=tmp_path).fit(images)
    assert len(calls) == 2  # fit + the reference above; the second fit reused the saved embedding
    assert again.reused_ and np.array_equal(again.scores_, pruner.scores_)


def test_texts_without_embedding_use_minilm(monkeypatch):
    texts = [f"gloss number {i}" for i in range(12)]
    seen = []

    def fake_embed_texts(batch):
        seen.append(list(batch))
        return np.array([[len(t), t.count("1") + 1.0, 1.0] for t in batch], dtype=np.float32)

    monkeypatch.setattr(encoders, "embed_texts", fake_embed_texts)
    pruner = DataPruner(metric="prototypes", n_clusters=2, keep=4).fit(texts)
    assert seen == [texts]
    np.testing.assert_allclose(pruner.scores_, prototype_scores(fake_embed_texts(texts), 2, metric="cosine"))
    assert len(pruner.transform()) == 4 and pruner.strategy_ == "easy"  # 4 of 12 kept: 33% < 40%


def test_random_scores_are_seeded_and_precomputed_scores_are_used_as_given():
    x, y = _data()
    a = DataPruner(metric="random", seed=3).fit(x, y)
    b = DataPruner(metric="random", seed=3).fit(x, y)
    c = DataPruner(metric="random", seed=4).fit(x, y)
    assert np.array_equal(a.scores_, b.scores_) and not np.array_equal(a.scores_, c.scores_)
    assert ((a.scores_ >= 0) & (a.scores_ < 1)).all()
    scores = np.arange(N, dtype=float)
    pruner = DataPruner(keep=0.5, strategy="hard", class_balance=False).fit(scores=scores)
    assert pruner.metric_ == "given"
    assert np.array_equal(pruner.transform(), np.arange(30, 60))
    easy = DataPruner(keep=0.5, strategy="easy", class_balance=False).fit_transform(scores=scores)
    assert np.array_equal(easy, np.arange(30))


@pytest.mark.parametrize(("keep", "strategy"), [(0.5, "auto"), (6, "auto"), (24, "auto"), (23, "auto"), (0.2, "hard"),
                                               (0.7, "random")])
def test_kept_indices_follow_select_and_the_resolved_strategy(keep, strategy):
    x, y = _data()
    scores = np.random.default_rng(0).normal(size=N)
    pruner = DataPruner(keep=keep, strategy=strategy, seed=1).fit(x, y, scores=scores)
    kept = select(scores, keep, strategy, labels=y, class_balance=True, seed=1)
    assert np.array_equal(pruner.transform(), kept)
    resolved, reason = resolve_strategy(strategy, len(kept), N, AUTO_MIN_FRACTION)
    assert (pruner.strategy_, pruner.strategy_reason_) == (resolved, reason)
    if strategy == "auto":  # the rule is on the fraction of all N scored examples: 24 of 60 = 40% is hard
        assert pruner.strategy_ == ("hard" if len(kept) >= 24 else "easy")
        assert f"({len(kept)} of {N})" in reason
    if strategy == "auto":  # the resolved rule gives the same indices
        assert np.array_equal(select(scores, keep, resolved, labels=y, seed=1), kept)
    assert pruner.transform() is not pruner.transform()  # a copy each time


# --- resumable scoring ---------------------------------------------------------------------------
def test_interrupted_scoring_resumes_without_retraining_finished_seeds(tmp_path, monkeypatch):
    x, y = _data()
    real = _train.train_scoring_model
    calls = []
    fail_on = {11}

    def counting(*args, seed, **kwargs):
        calls.append(seed)
        if seed in fail_on:
            raise RuntimeError("simulated interruption")
        return real(*args, seed=seed, **kwargs)

    monkeypatch.setattr(_train, "train_scoring_model", counting)
    params = dict(metric="el2n", model_fn=_mlp, n_seeds=3, seed=10, out_dir=tmp_path / "run", **FAST)
    with pytest.raises(RuntimeError, match="simulated interruption"):
        DataPruner(**params).fit(x, y)
    assert calls == [10, 11]
    fail_on.clear()
    calls.clear()
    resumed = DataPruner(**params).fit(x, y)
    assert calls == [11, 12]  # seed 10 was loaded, not retrained
    assert len(resumed.reused_) == 1 and "seed10" in resumed.reused_[0]

    calls.clear()
    fresh = DataPruner(**{**params, "out_dir": tmp_path / "fresh"}).fit(x, y)
    assert calls == [10, 11, 12]
    np.testing.assert_array_equal(resumed.scores_, fresh.scores_)
    # margin shares the probabilities of the same runs: nothing is retrained
    calls.clear()
    margin = DataPruner(**{**params, "metric": "margin"}).fit(x, y)
    assert calls == [] and len(margin.reused_) == 3
    # other data, or other training settings: nothing is reused
    DataPruner(**params).fit(x + 1, y)
    DataPruner(**{**params, "score_epochs": 1}).fit(x, y)
    assert calls == [10, 11, 12, 10, 11, 12]


# --- the manifest ----------------------------------------------------------------------------------
def test_manifest_scores_and_kept_are_written_atomically_and_data_is_untouched(tmp_path):
    x, y = _data()
    labels = np.array(["cat", "dog", "eel"])[y]
    x_before = x.copy()
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    np.save(data_dir / "x.npy", x)
    pruner = DataPruner(metric="el2n", keep=0.7, strategy="auto", model_fn=_mlp, **FAST).fit(x, labels)
    path = pruner.write_manifest(data_dir)
    assert path == data_dir / "manifest.json"
    assert sorted(p.name for p in data_dir.iterdir()) == ["kept.npy", "manifest.json", "scores.npy", "x.npy"]
    assert np.array_equal(np.load(data_dir / "x.npy", allow_pickle=False), x_before) and np.array_equal(x, x_before)
    np.testing.assert_array_equal(np.load(data_dir / "scores.npy", allow_pickle=False), pruner.scores_)
    kept = np.load(data_dir / "kept.npy", allow_pickle=False)
    np.testing.assert_array_equal(kept, pruner.transform())

    m = json.loads(path.read_text())
    assert m["metric"] == "el2n"
    assert m["strategy"] == {"requested": "auto", "resolved": pruner.strategy_, "reason": pruner.strategy_reason_}
    assert pruner.strategy_ == "hard" and "keeping 70% of the examples (42 of 60)" in pruner.strategy_reason_
    assert m["keep"] == 0.7 and m["n_examples"] == N and m["n_kept"] == len(kept) == 42
    assert m["n_dropped"] == N - 42
    assert sorted(m["dropped_indices"] + kept.tolist()) == list(range(N))
    assert m["per_class"] == {c: {"n": 20, "kept": 14, "dropped": 6} for c in ("cat", "dog", "eel")}
    s = pruner.scores_
    assert m["scores"]["min"] == s.min() and m["scores"]["max"] == s.max()
    assert m["scores"]["median"] == pytest.approx(np.median(s))
    assert m["settings"]["score_epochs"] == 2.0 and m["settings"]["n_seeds"] == 1
    assert set(m["versions"]) == {"leanscale", "torch", "numpy"} and m["versions"]["torch"] == torch.__version__
    assert m["created"].endswith("+00:00")


def test_write_manifest_defaults_to_out_dir_and_needs_a_folder(tmp_path):
    x, y = _data()
    pruner = DataPruner(metric="random", out_dir=tmp_path).fit(x, y)
    assert pruner.write_manifest() == tmp_path / "manifest.json"
    assert json.loads((tmp_path / "manifest.json").read_text())["per_class"]["0"]["n"] == 20
    with pytest.raises(InvalidParameterError, match="'out_dir'"):
        DataPruner(metric="random").fit(x, y).write_manifest()


def test_manifest_is_versioned_and_records_the_hash_of_both_arrays(tmp_path):
    import hashlib

    x, y = _data()
    pruner = DataPruner(metric="random", keep=0.5, seed=1).fit(x, y)
    m = json.loads(pruner.write_manifest(tmp_path).read_text())
    assert MANIFEST_FORMAT_VERSION == 1 and m["format_version"] == 1 and next(iter(m)) == "format_version"
    assert m["files"] == {"scores": "scores.npy", "kept": "kept.npy"}
    for name in ("scores.npy", "kept.npy"):
        assert m["sha256"][name] == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
    # the arrays are plain .npy files (np.load works, no pickle), bit-identical to the fitted attributes
    np.testing.assert_array_equal(np.load(tmp_path / "scores.npy", allow_pickle=False), pruner.scores_)
    assert np.load(tmp_path / "kept.npy", allow_pickle=False).dtype == np.int64


def _written(tmp_path):
    x, y = _data()
    DataPruner(metric="random", keep=0.5, seed=1).fit(x, y).write_manifest(tmp_path)
    return tmp_path / "manifest.json"


def _edit(path, **changes):
    doc = json.loads(path.read_text())
    for k, v in changes.items():
        if v is ...:
            doc.pop(k)
        else:
            doc[k] = v
    path.write_text(json.dumps(doc))


def test_read_pruning_manifest_round_trips_and_refuses_a_newer_format(tmp_path):
    path = _written(tmp_path)
    written = json.loads(path.read_text())
    assert read_pruning_manifest(tmp_path) == written == read_pruning_manifest(str(path))  # folder or file
    _edit(path, format_version=MANIFEST_FORMAT_VERSION + 1)
    with pytest.raises(DataFormatError, match=r"manifest '.*manifest.json' has format_version 2: it was written by a "
                                              r"newer leanscale.*Upgrade"):
        read_pruning_manifest(tmp_path)
    for bad in ("1", 0, True, None, 1.5):
        _edit(path, format_version=bad)
        with pytest.raises(DataFormatError, match="format_version .*expected an int >= 1"):
            read_pruning_manifest(tmp_path)
    _edit(path, format_version=..., sha256=...)  # a manifest of leanscale 0.1: no version, no hashes
    assert read_pruning_manifest(tmp_path)["n_kept"] == 30


def test_read_pruning_manifest_refuses_arrays_that_do_not_belong_to_it(tmp_path):
    path = _written(tmp_path)
    np.save(tmp_path / "kept.npy", np.arange(3))  # a later write killed before its manifest
    with pytest.raises(DataFormatError, match=r"kept file '.*kept.npy' does not belong to the manifest"):
        read_pruning_manifest(tmp_path)
    assert read_pruning_manifest(tmp_path, verify=("scores.npy",))["n_examples"] == N  # scores are intact
    assert read_pruning_manifest(tmp_path, verify=False)["n_examples"] == N
    (tmp_path / "scores.npy").unlink()
    with pytest.raises(DataNotFoundError, match=r"scores file '.*scores.npy' recorded in the manifest"):
        read_pruning_manifest(tmp_path, verify=("scores.npy",))
    _edit(path, sha256={"scores.npy": "zz"})
    with pytest.raises(DataFormatError, match="malformed sha256"):
        read_pruning_manifest(tmp_path)


@pytest.mark.parametrize(("content", "error", "match"), [
    (None, DataNotFoundError, "does not exist"),
    (b"[1, 2]", DataFormatError, "must hold a JSON object"),
    (b"{", DataFormatError, "must be valid JSON"),
    (b'{"sha256": [1]}', DataFormatError, "'sha256' as an object"),
])
def test_read_pruning_manifest_bad_files_name_the_file(tmp_path, content, error, match):
    if content is not None:
        (tmp_path / "manifest.json").write_bytes(content)
    with pytest.raises(error, match=match) as info:
        read_pruning_manifest(tmp_path)
    assert "manifest.json" in str(info.value)


def test_read_pruning_manifest_bad_parameters():
    with pytest.raises(InvalidParameterError, match="'path' parameter of read_pruning_manifest"):
        read_pruning_manifest(3)
    with pytest.raises(InvalidParameterError, match="'verify' parameter of read_pruning_manifest"):
        read_pruning_manifest(".", verify=("x.npy",))


def test_docstring_examples_run():
    import doctest

    from leanscale.pruning import pruner as pruner_module

    result = doctest.testmod(pruner_module)
    assert result.attempted >= 2 and result.failed == 0
