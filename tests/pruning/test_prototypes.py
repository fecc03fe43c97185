"""prototype_scores: distances to k-means or class prototypes order examples from typical to atypical."""

import doctest

import numpy as np
import pytest
import torch

from leanscale.core.errors import InvalidParameterError
from leanscale.pruning import prototypes as prototypes_mod
from leanscale.pruning.prototypes import prototype_scores


def ring_clusters(radii, centers):
    """Each centre gets, for each radius r, the 4 points centre +- r e_0, centre +- r e_1 (mean = centre)."""
    d = centers.shape[1]
    rows, dist = [], []
    for c in centers:
        for r in radii:
            for axis in (0, 1):
                for sign in (1.0, -1.0):
                    e = np.zeros(d)
                    e[axis] = sign * r
                    rows.append(c + e)
                    dist.append(r)
    return np.asarray(rows), np.asarray(dist)


def test_doctests():
    assert doctest.testmod(prototypes_mod, raise_on_error=False).failed == 0


def test_self_supervised_euclidean_scores_are_distances_to_the_cluster_centre():
    centers = np.array([[0.0, 0.0, 0.0], [50.0, 0.0, 0.0], [0.0, 50.0, 10.0]])
    radii = np.array([0.1, 0.5, 1.0, 2.0, 3.0])
    x, r = ring_clusters(radii, centers)
    s = prototype_scores(x, n_clusters=3, metric="euclidean")
    assert s.dtype == np.float64 and s.shape == (len(x),)
    np.testing.assert_allclose(s, r, atol=1e-4)  # nearer the centre -> lower score


def test_an_outlier_scores_highest():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (100, 4)), rng.normal(20, 1, (100, 4)), [[0.0, 0.0, 0.0, 9.0]]])
    for metric in ("euclidean", "cosine"):
        x_m = x if metric == "euclidean" else x + np.array([30.0, 0, 0, 0])  # directions differ for cosine
        s = prototype_scores(x_m, n_clusters=2, metric=metric, seed=1)
        assert int(np.argmax(s)) == 200


def test_self_supervised_cosine_scores_are_one_minus_cos_to_the_centre_direction():
    angles = np.array([0.05, 0.1, 0.2, 0.4])
    rows, expected = [], []
    for base in (0.0, np.pi / 2, np.pi):  # three directions in the plane, each with a scale
        for a in angles:
            for sign in (1, -1):
                for scale in (1.0, 7.0):
                    rows.append(scale * np.array([np.cos(base + sign * a), np.sin(base + sign * a)]))
                    expected.append(1 - np.cos(a))
    s = prototype_scores(np.asarray(rows), n_clusters=3, metric="cosine")
    np.testing.assert_allclose(s, expected, atol=1e-5)


def test_supervised_prototypes_use_class_means_even_where_kmeans_splits_differently():
    rng = np.random.default_rng(1)
    # class 0: two far blobs (left and right) plus one point at the class mean; class 1: one blob
    left, right = rng.normal([-10, 0], 0.3, (40, 2)), rng.normal([10, 0], 0.3, (40, 2))
    left -= left.mean(0) - [-10, 0]
    right -= right.mean(0) - [10, 0]
    far = rng.normal([0, 40], 0.3, (40, 2))
    x = np.concatenate([left, right, [[0.0, 0.0]], far])
    y = np.r_[np.zeros(81, int), np.ones(40, int)]
    sup = prototype_scores(x, labels=y, metric="euclidean")
    means = np.stack([x[y == c].mean(0) for c in (0, 1)])
    np.testing.assert_allclose(sup, np.linalg.norm(x - means[y], axis=1), rtol=1e-9, atol=1e-9)
    assert int(np.argmin(sup[:81])) == 80  # the point at the class-0 mean is the most typical
    # k-means with one centroid per class puts centroids in the blobs: that point is then atypical
    unsup = prototype_scores(x, n_clusters=3, metric="euclidean")
    assert unsup[80] > np.quantile(unsup, 0.95)
    # n_clusters is ignored with labels
    np.testing.assert_array_equal(prototype_scores(x, n_clusters=7, labels=y, metric="euclidean"), sup)


def test_supervised_cosine_is_scale_invariant_and_uses_the_normalised_mean():
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, (60, 5)) + np.r_[3.0, 0, 0, 0, 0]
    y = rng.integers(0, 3, 60)
    s = prototype_scores(x, labels=y)  # default metric: cosine
    s_scaled = prototype_scores(x * rng.uniform(0.1, 10, (60, 1)), labels=y)
    np.testing.assert_allclose(s, s_scaled, atol=1e-6)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    protos = np.stack([xn[y == c].mean(0) for c in range(3)])
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    np.testing.assert_allclose(s, 1 - (xn * protos[y]).sum(1), atol=1e-6)


def test_string_labels_tensor_input_and_determinism():
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (50, 4)).astype(np.float32)
    labels = np.array(["cat", "dog"])[rng.integers(0, 2, 50)]
    a = prototype_scores(torch.from_numpy(x), labels=labels)
    b = prototype_scores(x, labels=(labels == "dog").astype(int))
    np.testing.assert_allclose(a, b)
    u1 = prototype_scores(x, n_clusters=4, seed=5)
    u2 = prototype_scores(torch.from_numpy(x), n_clusters=4, seed=5)
    np.testing.assert_array_equal(u1, u2)


@pytest.mark.parametrize("kwargs, match", [
    ({"embeddings": np.zeros((5, 2))}, r"'n_clusters'.*required without labels"),
    ({"embeddings": np.zeros((5, 2)), "n_clusters": 6}, r"'n_clusters'.*at most the number of examples \(5\)\. Got 6"),
    ({"embeddings": np.zeros((5, 2)), "n_clusters": 0}, r"'n_clusters'.*Got 0"),
    ({"embeddings": np.zeros(5), "n_clusters": 2}, r"'embeddings'.*2-d array.*\(5,\)"),
    ({"embeddings": np.zeros((5, 2, 2)), "n_clusters": 2}, r"'embeddings'.*2-d array.*\(5, 2, 2\)"),
    ({"embeddings": np.zeros((0, 2)), "n_clusters": 1}, r"'embeddings'.*at least 1"),
    ({"embeddings": np.array([[1.0, np.inf]]), "n_clusters": 1}, r"'embeddings'.*finite"),
    ({"embeddings": np.zeros((5, 2)), "labels": [0, 1, 0]}, r"'embeddings', 'labels'.*embeddings=5, labels=3"),
    ({"embeddings": np.zeros((4, 2)), "labels": np.zeros((4, 1))}, r"'labels'.*1-d"),
    ({"embeddings": np.zeros((5, 2)), "n_clusters": 2, "metric": "euclidian"}, r"'metric'.*Did you mean 'euclidean'"),
])
def test_bad_input(kwargs, match):
    with pytest.raises(InvalidParameterError, match=match):
        prototype_scores(**kwargs)
