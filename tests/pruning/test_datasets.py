"""load_pruning_data: built-in sets, the user's .npz and folders."""

import numpy as np
import pytest
import torch

from leanscale.core.errors import DataFormatError, InvalidParameterError
from leanscale.data.fashion_mnist import write_idx
from leanscale.pruning import datasets
from leanscale.pruning.datasets import load_pruning_data


def test_fashion_mnist_subset_is_stratified_and_indexed():
    data = load_pruning_data("fashion-mnist", n_train=200, n_test=100, seed=3)
    assert data.kind == "image" and tuple(data.x_train.shape) == (200, 1, 28, 28)
    assert np.bincount(data.y_train.numpy(), minlength=10).tolist() == [20] * 10
    assert data.x_test.shape[0] == 100 and data.n_classes == 10
    full = load_pruning_data("fashion-mnist")
    # train_index maps each kept row back to the full training split.
    assert torch.equal(full.x_train[data.train_index], data.x_train)


def test_npz_with_features_labels_and_test_split(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "mine.npz"
    np.savez(path, x=rng.normal(size=(50, 7)), y=np.arange(50) % 3, x_test=rng.normal(size=(10, 7)),
             y_test=np.arange(10) % 3)
    data = load_pruning_data(path, n_train=30)
    assert data.kind == "features" and data.classes == ("0", "1", "2")
    assert data.x_train.shape == (30, 7) and data.x_train.dtype == torch.float32
    assert data.x_test.shape == (10, 7) and data.train_index.shape == (30,)
    np.savez(tmp_path / "nolabels.npz", embeddings=rng.normal(size=(5, 4)))
    unl = load_pruning_data(tmp_path / "nolabels.npz")
    assert unl.y_train is None and unl.x_test is None


def test_idx_folder_is_read_like_the_builtin_set(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("t10k", 20)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte", rng.integers(0, 255, size=(n, 28, 28), dtype=np.uint8))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))
    data = load_pruning_data(tmp_path)
    assert data.x_train.shape == (40, 1, 28, 28) and data.x_test.shape == (20, 1, 28, 28)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"data": 3}, "'data' parameter of load_pruning_data"),
     ({"data": "fashion-mnst"}, "'data' parameter of load_pruning_data must be one of"),
     ({"data": "fashion-mnist", "n_train": 0}, "'n_train' parameter"),
     ({"data": "fashion-mnist", "seed": -1}, "'seed' parameter")],
)
def test_bad_arguments_name_the_parameter(kwargs, match):
    with pytest.raises(InvalidParameterError, match=match):
        load_pruning_data(**kwargs)


def test_bad_files_say_what_is_wrong(tmp_path):
    np.savez(tmp_path / "a.npz", z=np.zeros((3, 2)))
    with pytest.raises(DataFormatError, match="array named 'x'"):
        load_pruning_data(tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", x=np.zeros((3, 2)), y=np.array([0.5, 1.0, 2.0]))
    with pytest.raises(DataFormatError, match="1-d integer array"):
        load_pruning_data(tmp_path / "b.npz")
    np.savez(tmp_path / "c.npz", x=np.zeros((3,)))
    with pytest.raises(DataFormatError, match="2-d features"):
        load_pruning_data(tmp_path / "c.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match="neither Fashion-MNIST"):
        load_pruning_data(tmp_path / "empty")


def test_builtin_names():
    assert datasets.BUILTIN_DATASETS == ("fashion-mnist", "wordnet")
    assert "cached_text_embeddings" not in datasets.__all__  # one home: leanscale.data.embeddings
