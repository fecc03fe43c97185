"""load_pruning_data: built-in sets, the user's files and folders (read by load_dataset)."""

import json

import numpy as np
import pytest
import torch

from leanscale.core.errors import DataFormatError, InvalidParameterError
from leanscale.data import load_dataset
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
    """The user's files are read by load_dataset: its messages (#15)."""
    np.savez(tmp_path / "a.npz", z=np.zeros((3, 2)))
    with pytest.raises(DataFormatError, match=r"a.npz' has no array 'x' .*Its arrays are: 'z'"):
        load_pruning_data(tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", x=np.zeros((3, 2)), y=np.array([0.5, 1.0, 2.0]))
    with pytest.raises(DataFormatError, match=r"labels 'y' of .*b.npz', row 0: the label must be an integer or a "
                                              r"string \(a class\). Got 0.5"):
        load_pruning_data(tmp_path / "b.npz")
    np.savez(tmp_path / "c.npz", x=np.zeros((3, 2, 2, 2, 2)))
    with pytest.raises(DataFormatError, match="2-d features"):
        load_pruning_data(tmp_path / "c.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match="neither Fashion-MNIST.*datasets folder.*sub-folder of images"):
        load_pruning_data(tmp_path / "empty")
    (tmp_path / "d.txt").write_text("x\n")
    with pytest.raises(InvalidParameterError, match=r"'data' parameter of load_pruning_data must be one of .*"
                                                    r"\.csv, .*\.npz, \.parquet.* Got '.*d.txt'"):
        load_pruning_data(tmp_path / "d.txt")
    (tmp_path / "r.jsonl").write_text('{"a": 1, "label": 0}\n{"b": 2, "label": 1}\n')
    with pytest.raises(DataFormatError, match=r"r.jsonl', line 2: no key 'a' \(a feature column"):
        load_pruning_data(tmp_path / "r.jsonl")


def test_one_d_x_and_negative_or_string_labels_load_like_load_dataset(tmp_path):
    """What load_dataset accepts, load_pruning_data accepts: a 1-d x is one feature, labels may be negative
    integers or strings (classes keep the original values, as strings)."""
    np.savez(tmp_path / "c.npz", x=np.array([3.0, 1.0, 2.0]), y=np.array([-1, 0, -1]))
    d = load_pruning_data(tmp_path / "c.npz")
    assert d.kind == "features" and d.x_train.tolist() == [[3.0], [1.0], [2.0]]
    assert d.classes == ("-1", "0") and d.y_train.tolist() == [0, 1, 0]
    np.savez(tmp_path / "s.npz", x=np.eye(4), y=np.array(["dog", "cat", "dog", "eel"]))
    s = load_pruning_data(tmp_path / "s.npz")
    assert s.classes == ("cat", "dog", "eel") and [s.classes[c] for c in s.y_train] == ["dog", "cat", "dog", "eel"]


def test_tables_datasets_and_image_folders_through_load_dataset(tmp_path):
    """CSV, JSONL (rows with extra keys), parquet, a datasets folder and an image folder give the arrays
    load_dataset reads, as PruningData tensors; token ids stay int64."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(1)
    x = rng.normal(size=(20, 3)).round(3)
    labels = np.array(["ant", "bee"])[np.arange(20) % 2]
    lines = ["a,b,c,label"] + [f"{r[0]!r},{r[1]!r},{r[2]!r},{lab}" for r, lab in zip(x.tolist(), labels)]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    rows = [{"a": r[0], "b": r[1], "c": r[2], "label": str(lab)} for r, lab in zip(x.tolist(), labels)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pq.write_table(pa.table({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "label": labels.tolist()}),
                   tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    ref = load_dataset(tmp_path / "d.csv")
    for name in ("d.csv", "d.jsonl", "d.parquet", "ds"):
        d = load_pruning_data(tmp_path / name, n_train=10, seed=2)
        assert d.kind == "features" and d.x_train.dtype == torch.float32 and d.classes == ("ant", "bee"), name
        assert np.allclose(d.x_train.numpy(), x[d.train_index], atol=1e-6), name
        assert d.y_train.tolist() == ref.y[d.train_index].tolist(), name
        assert np.bincount(d.y_train.numpy()).tolist() == [5, 5], name  # a stratified subset
    # JSONL rows with metadata in some rows only: the same data
    rows[3]["note"] = "checked"
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataFormatError, match=r"m.jsonl', line 1: no key 'note' \(a feature column"):
        load_pruning_data(tmp_path / "m.jsonl")  # an unused key becomes a default feature: name the features
    ids = np.arange(12).reshape(4, 3)
    np.savez(tmp_path / "t.npz", input_ids=ids, y=np.array([0, 1, 0, 1]))
    t = load_pruning_data(tmp_path / "t.npz")
    assert t.kind == "tokens" and t.x_train.dtype == torch.int64 and t.x_train.tolist() == ids.tolist()
    for cls, value in (("dark", 0), ("light", 255)):
        (tmp_path / "img" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((4, 5), value, dtype=np.uint8), mode="L").save(tmp_path / "img" / cls / f"{i}.png")
    img = load_pruning_data(tmp_path / "img")
    assert img.kind == "image" and tuple(img.x_train.shape) == (4, 1, 4, 5) and img.classes == ("dark", "light")
    assert img.x_train[:2].max() == 0 and img.x_train[2:].min() == 1 and img.y_train.tolist() == [0, 0, 1, 1]


def test_builtin_names():
    assert datasets.BUILTIN_DATASETS == ("fashion-mnist", "wordnet")
    assert "cached_text_embeddings" not in datasets.__all__  # one home: leanscale.data.embeddings
