"""The training-free prototype path: fast_embedding (PCA, random projection) and
DataPruner(metric="prototypes", embedding="pca"), checked against brute force."""

import numpy as np
import pytest
import torch

from leanscale.core.errors import InvalidParameterError
from leanscale.pruning import DataPruner, fast_embedding, prototype_scores


def _data(n=90, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4.0, size=(3, 12))
    x = centres[np.arange(n) % 3] + rng.normal(size=(n, 12)) * np.linspace(0.2, 2.0, 12)
    return x.reshape(n, 3, 2, 2).astype(np.float32)  # "images": flattened to 12 values


def _brute_pca(x, k):
    flat = x.reshape(len(x), -1).astype(np.float64)
    centred = flat - flat.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)  # rows: principal directions
    return centred @ vt[:k].T  # (n, k)


def test_pca_matches_an_svd_up_to_the_sign_of_each_direction():
    x = _data()
    got = fast_embedding(x, "pca", dim=4).astype(np.float64)
    ref = _brute_pca(x, 4)
    signs = np.sign((got * ref).sum(0))
    assert np.allclose(got, ref * signs, atol=1e-3)
    assert np.array_equal(fast_embedding(torch.from_numpy(x), "pca", dim=4), fast_embedding(x, "pca", dim=4))


def test_random_projection_is_a_centred_gaussian_map_that_keeps_distances():
    x = np.random.default_rng(1).normal(size=(60, 400))
    e = fast_embedding(x, "random-projection", dim=256, seed=5).astype(np.float64)
    assert e.shape == (60, 256)
    # a linear map of the centred data: the same map applied to differences
    d_in = np.linalg.norm(x[:, None] - x[None], axis=2)[np.triu_indices(60, 1)]
    d_out = np.linalg.norm(e[:, None] - e[None], axis=2)[np.triu_indices(60, 1)]
    ratio = d_out / d_in
    assert 0.8 < ratio.min() and ratio.max() < 1.2  # Johnson-Lindenstrauss at dim 256
    assert not np.allclose(e, fast_embedding(x, "random-projection", dim=256, seed=6))
    assert np.allclose(e.mean(0), 0, atol=1e-4)  # centred


def test_fit_rows_subsample_and_dim_capped_at_input_width():
    x = _data(n=200)
    assert fast_embedding(x, "pca", dim=100).shape == (200, 12)
    sub = fast_embedding(x, "pca", dim=3, fit_rows=50, seed=2)
    full = fast_embedding(x, "pca", dim=3)
    # a 50-row estimate of the leading direction is close to the full one on well-separated clusters
    assert abs(np.corrcoef(sub[:, 0], full[:, 0])[0, 1]) > 0.95


def test_data_pruner_prototype_scores_rank_like_brute_force():
    x = _data()
    pruner = DataPruner(metric="prototypes", keep=0.5, strategy="hard", embedding="pca", n_clusters=3, seed=0)
    kept = pruner.fit_transform(x)
    # brute force: SVD-PCA of the same width (32 > 12: all directions), k-means prototypes, cosine distance
    ref = prototype_scores(_brute_pca(x, 12), n_clusters=3, metric="cosine", seed=0)
    assert np.allclose(pruner.scores_, ref, atol=1e-5)
    assert np.array_equal(np.argsort(pruner.scores_[kept]), np.argsort(ref[kept]))
    assert np.array_equal(kept, np.sort(np.argsort(-ref, kind="stable")[:45]))


def test_bad_inputs_name_the_parameter():
    x = _data()
    with pytest.raises(InvalidParameterError, match="'method' parameter of fast_embedding"):
        fast_embedding(x, "umap")
    with pytest.raises(InvalidParameterError, match="'dim' parameter of fast_embedding"):
        fast_embedding(x, "pca", dim=0)
    with pytest.raises(InvalidParameterError, match="'x' parameter of fast_embedding"):
        fast_embedding(np.where(np.arange(x.size).reshape(x.shape) == 5, np.nan, x), "pca")
    with pytest.raises(InvalidParameterError, match="'embedding' parameter of DataPruner"):
        DataPruner(metric="prototypes", embedding="tiny-ssl", n_clusters=3).fit(x)
    with pytest.raises(InvalidParameterError, match="'embedding' parameter of DataPruner"):
        DataPruner(metric="prototypes", embedding="pca", n_clusters=1).fit(["a text", "another"])
