"""KMeans: recovery of separated clusters, agreement with a naive Lloyd, cosine mode, backends, errors."""

import doctest
import sys
import types

import numpy as np
import pytest
import torch

from leanscale.core.errors import (
    InvalidParameterError,
    MissingDependencyError,
    NotFittedError,
)
from leanscale.pruning import kmeans as kmeans_mod
from leanscale.pruning.kmeans import KMeans


def blobs(n_per=100, k=5, d=8, spread=0.2, sep=10.0, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, sep, (k, d))
    y = np.repeat(np.arange(k), n_per)
    x = centers[y] + rng.normal(0, spread, (k * n_per, d))
    return x.astype(np.float32), y, centers


def same_partition(a, b):
    """True when the labelings are equal up to a permutation of the cluster ids."""
    pairs = set(zip(np.asarray(a).tolist(), np.asarray(b).tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def naive_lloyd(x, centers, metric="euclidean", max_iter=300):
    """Textbook Lloyd in float64 numpy: full distance matrix, empty clusters keep their centre."""
    x = x.astype(np.float64)
    c = centers.astype(np.float64)
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    labels = None
    for _ in range(max_iter):
        d = ((x[:, None, :] - c[None, :, :]) ** 2).sum(-1)  # (n, k)
        new = d.argmin(1)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        for j in range(len(c)):
            if np.any(labels == j):
                c[j] = x[labels == j].mean(0)
                if metric == "cosine":
                    c[j] /= np.linalg.norm(c[j])
    d = ((x[:, None, :] - c[None, :, :]) ** 2).sum(-1)
    labels = d.argmin(1)
    obj = d[np.arange(len(x)), labels]
    inertia = (obj / 2 if metric == "cosine" else obj).sum()
    return c, labels, inertia


def test_doctests():
    assert doctest.testmod(kmeans_mod, raise_on_error=False).failed == 0


def test_recovers_well_separated_gaussian_clusters():
    x, y, _ = blobs()
    km = KMeans(5, seed=0, backend="torch").fit(x)
    assert km.backend_ == "torch"
    assert same_partition(km.labels_, y)
    assert km.cluster_centers_.shape == (5, 8) and km.cluster_centers_.dtype == np.float32
    assert km.labels_.dtype == np.int64 and km.labels_.shape == (500,)
    # the centroids are the cluster means, the inertia the sum of squared distances to them
    for j in range(5):
        np.testing.assert_allclose(km.cluster_centers_[j], x[km.labels_ == j].mean(0), atol=1e-4)
    ref = ((x - km.cluster_centers_[km.labels_]) ** 2).sum()
    assert km.inertia_ == pytest.approx(float(ref), rel=1e-4)
    assert 1 <= km.n_iter_ <= km.max_iter
    np.testing.assert_array_equal(km.predict(x), km.labels_)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_inertia_not_worse_than_naive_lloyd_from_the_same_init(metric):
    # overlapping clusters, so that Lloyd needs several iterations
    x, _, _ = blobs(n_per=60, k=6, d=4, spread=3.0, sep=3.0, seed=1)
    seed = 3
    km = KMeans(6, metric=metric, seed=seed, tol=0.0, max_iter=300, chunk_size=50, backend="torch")
    xt = km._prepare(x, "test")
    init = km._kmeans_pp(xt, (xt * xt).sum(1), torch.Generator().manual_seed(seed)).numpy()
    km.fit(x)
    assert km.n_iter_ > 2
    _, ref_labels, ref_inertia = naive_lloyd(x, init, metric)
    assert km.inertia_ <= ref_inertia * (1 + 1e-5)
    assert np.mean(km.labels_ == ref_labels) >= 0.99


def test_seeding_on_a_subsample_when_n_is_large(monkeypatch):
    monkeypatch.setattr(kmeans_mod, "INIT_SAMPLE_MIN", 20)
    monkeypatch.setattr(kmeans_mod, "INIT_SAMPLE_PER_CLUSTER", 5)  # 25 of 500 rows for k = 5
    x, y, _ = blobs()
    km = KMeans(5, seed=0, backend="torch")
    xt = torch.from_numpy(x)
    init = km._kmeans_pp(xt, (xt * xt).sum(1), torch.Generator().manual_seed(0))
    assert len({int(np.argmin(((x - c.numpy()) ** 2).sum(1))) // 100 for c in init}) == 5  # one per blob
    assert same_partition(km.fit(x).labels_, y)


def test_chunk_size_does_not_change_the_result():
    x, _, _ = blobs(n_per=50, k=4, d=3, spread=2.0, sep=3.0, seed=2)
    a = KMeans(4, seed=1, chunk_size=7, backend="torch").fit(x)
    b = KMeans(4, seed=1, chunk_size=10_000, backend="torch").fit(x)
    np.testing.assert_array_equal(a.labels_, b.labels_)
    np.testing.assert_allclose(a.cluster_centers_, b.cluster_centers_, atol=1e-5)


def test_deterministic_with_seed_and_n_init_keeps_the_best():
    x, _, _ = blobs(n_per=40, k=6, d=3, spread=2.5, sep=3.0, seed=4)
    a = KMeans(6, seed=5, backend="torch").fit(x)
    b = KMeans(6, seed=5, backend="torch").fit(x)
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    multi = KMeans(6, seed=5, n_init=4, backend="torch").fit(x)
    # the first initialisation of n_init=4 is the same draw as n_init=1: the best is no worse
    assert multi.inertia_ <= a.inertia_ + 1e-6


def test_empty_cluster_is_reseeded_with_the_farthest_point():
    x, y, _ = blobs(n_per=30, k=3, d=2, spread=0.1, sep=10.0, seed=0)
    km = KMeans(3, tol=0.0, backend="torch")
    xt = torch.from_numpy(x)
    means = np.stack([x[y == j].mean(0) for j in range(3)])
    # two centres inside blob 0 and 1, one far from everything: it gets no point at first
    start = torch.tensor(np.stack([means[0], means[1], [1e3, 1e3]]), dtype=torch.float32)
    centers, _ = km._lloyd(xt, (xt * xt).sum(1), start, 0.0)
    labels, _ = km._assign(xt, (xt * xt).sum(1), centers)
    assert sorted(np.bincount(labels.numpy(), minlength=3).tolist()) == [30, 30, 30]
    assert same_partition(labels.numpy(), y)


def test_cosine_groups_by_direction_not_norm():
    rng = np.random.default_rng(0)
    dirs = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    y = np.repeat(np.arange(3), 40)
    scale = np.tile(np.r_[np.full(20, 0.5), np.full(20, 20.0)], 3)[:, None]  # two very different norms
    x = (dirs[y] + rng.normal(0, 0.05, (120, 3))) * scale
    cos = KMeans(3, metric="cosine", seed=0, backend="torch").fit(x)
    assert same_partition(cos.labels_, y)
    np.testing.assert_allclose(np.linalg.norm(cos.cluster_centers_, axis=1), 1.0, atol=1e-5)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    one_minus_cos = 1 - xn @ cos.cluster_centers_.T.astype(np.float64)  # (n, k)
    np.testing.assert_allclose(cos.transform(x), one_minus_cos, atol=1e-5)
    assert cos.inertia_ == pytest.approx(one_minus_cos.min(1).sum(), rel=1e-4, abs=1e-4)
    # Euclidean k-means splits by norm instead: the far points dominate
    euc = KMeans(3, metric="euclidean", seed=0, backend="torch").fit(x)
    assert not same_partition(euc.labels_, y)


def test_transform_and_predict_on_new_points():
    x, _, _ = blobs(n_per=30, k=3, d=4, seed=3)
    km = KMeans(3, seed=0, backend="torch").fit(x)
    new = x[:10] + 0.01
    dist = km.transform(new)
    assert dist.shape == (10, 3) and dist.dtype == np.float32
    ref = np.linalg.norm(new[:, None, :] - km.cluster_centers_[None], axis=-1)
    np.testing.assert_allclose(dist, ref, rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(km.predict(new), dist.argmin(1))
    # torch input gives the same result as numpy input
    np.testing.assert_array_equal(km.predict(torch.from_numpy(new)), km.predict(new))


def test_tensor_input_and_fit_predict():
    x, y, _ = blobs(n_per=30, k=3, d=4, seed=5)
    a = KMeans(3, seed=2, backend="torch").fit_predict(torch.from_numpy(x))
    b = KMeans(3, seed=2, backend="torch").fit_predict(x)
    np.testing.assert_array_equal(a, b)
    assert same_partition(a, y)


def test_not_fitted():
    with pytest.raises(NotFittedError, match="call fit first"):
        KMeans(2).predict(np.zeros((3, 2)))
    with pytest.raises(NotFittedError, match="call fit first"):
        KMeans(2).transform(np.zeros((3, 2)))


@pytest.mark.parametrize("kwargs, X, match", [
    ({"n_clusters": 5}, np.zeros((4, 2)), r"'n_clusters'.*at most the number of examples in X \(4\)\. Got 5"),
    ({"n_clusters": 0}, np.zeros((4, 2)), r"'n_clusters'.*int in the range \[1, inf\)\. Got 0"),
    ({"n_clusters": True}, np.zeros((4, 2)), r"'n_clusters'.*Got True"),
    ({"n_clusters": 2}, np.zeros(4), r"'X'.*2-d array.*shape \(4,\)"),
    ({"n_clusters": 2}, torch.zeros(4, 2, 2), r"'X'.*2-d array.*\(4, 2, 2\)"),
    ({"n_clusters": 2}, np.array([[0.0, 1.0], [np.nan, 0.0], [1.0, 1.0]]), r"'X'.*finite.*nan"),
    ({"n_clusters": 2, "metric": "cosin"}, np.zeros((4, 2)), r"'metric'.*'cosine', 'euclidean'.*Did you mean 'cosine'"),
    ({"n_clusters": 2, "backend": "cuda"}, np.zeros((4, 2)), r"'backend'.*'auto', 'faiss', 'torch'"),
    ({"n_clusters": 2, "tol": -1.0}, np.zeros((4, 2)), r"'tol'.*Got -1.0"),
    ({"n_clusters": 2, "chunk_size": 0}, np.zeros((4, 2)), r"'chunk_size'"),
])
def test_bad_input(kwargs, X, match):
    with pytest.raises(InvalidParameterError, match=match):
        KMeans(**{"backend": "torch", **kwargs}).fit(X)


def test_predict_with_another_number_of_features():
    km = KMeans(2, backend="torch").fit(np.arange(12, dtype=np.float32).reshape(6, 2))
    with pytest.raises(InvalidParameterError, match=r"'X'.*2 features.*Got 3"):
        km.predict(np.zeros((2, 3)))


def test_params_round_trip():
    km = KMeans(3, metric="cosine")
    assert km.get_params()["metric"] == "cosine" and repr(km) == "KMeans(n_clusters=3, metric='cosine')"
    assert km.set_params(seed=4) is km and km.seed == 4
    with pytest.raises(InvalidParameterError, match="Did you mean 'seed'"):
        km.set_params(sed=1)


def test_faiss_backend_without_faiss_raises_and_auto_falls_back(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError, installed or not
    x, y, _ = blobs(n_per=20, k=2, d=2)
    with pytest.raises(MissingDependencyError, match=r"pip install 'leanscale\[faiss\]'"):
        KMeans(2, backend="faiss").fit(x)
    km = KMeans(2, backend="auto").fit(x)
    assert km.backend_ == "torch" and same_partition(km.labels_, y)


def test_faiss_backend_is_called_like_faiss_kmeans(monkeypatch):
    """A stand-in faiss module: the wiring (arguments, centroids, labels) is checked without faiss."""
    calls = {}

    class FakeKmeans:
        def __init__(self, d, k, **kwargs):
            calls.update(d=d, k=k, **kwargs)
            self.centroids = None

        def train(self, arr):
            calls["train_dtype"] = arr.dtype
            self.centroids = arr[:: len(arr) // calls["k"]][: calls["k"]] * 1.0

    fake = types.ModuleType("faiss")
    fake.Kmeans = FakeKmeans
    monkeypatch.setitem(sys.modules, "faiss", fake)
    x, y, _ = blobs(n_per=20, k=3, d=4, seed=6)
    km = KMeans(3, metric="cosine", max_iter=7, n_init=2, seed=1).fit(x)  # auto -> faiss
    assert km.backend_ == "faiss" and km.n_iter_ == 7
    assert calls["d"] == 4 and calls["k"] == 3 and calls["niter"] == 7 and calls["nredo"] == 2
    assert calls["spherical"] is True and calls["train_dtype"] == np.float32
    assert same_partition(km.labels_, y)  # one training row of each blob as the centroids
    np.testing.assert_allclose(np.linalg.norm(km.cluster_centers_, axis=1), 1.0, atol=1e-5)
