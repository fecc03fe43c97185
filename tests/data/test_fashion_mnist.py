import gzip

import numpy as np
import pytest
import torch

from leanscale.core.errors import DataNotFoundError, InvalidParameterError
from leanscale.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    DataFormatError,
    fashion_mnist_tensors,
    load_fashion_mnist,
    read_idx,
    write_idx,
)

DTYPES = ["uint8", "int8", "int16", "int32", "float32", "float64"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (2, 1, 3, 2)])
@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, dtype, shape, gz):
    rng = np.random.default_rng(0)
    if dtype.startswith("float"):
        arr = rng.standard_normal(shape).astype(dtype)
    else:
        info = np.iinfo(dtype)
        arr = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    path = write_idx(tmp_path / ("a.idx.gz" if gz else "a.idx"), arr)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == gz
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, arr)


def test_idx_is_big_endian_per_spec(tmp_path):
    # magic 0x00000C01: int32, one dimension of size 2; values 0x01020304 and -2
    raw = bytes.fromhex("00000c01" "00000002" "01020304" "fffffffe")
    (tmp_path / "a").write_bytes(raw)
    np.testing.assert_array_equal(read_idx(tmp_path / "a"), [0x01020304, -2])
    (tmp_path / "b.gz").write_bytes(gzip.compress(raw))
    np.testing.assert_array_equal(read_idx(tmp_path / "b.gz"), [0x01020304, -2])


def test_idx_empty_dimension(tmp_path):
    out = read_idx(write_idx(tmp_path / "e", np.zeros((0, 28, 28), dtype=np.uint8)))
    assert out.shape == (0, 28, 28)


@pytest.mark.parametrize(
    "raw, match",
    [
        (bytes.fromhex("01000801" "00000001" "05"), "bad magic number"),
        (bytes.fromhex("00000701" "00000001" "05"), "unknown IDX type code 0x07"),
        (bytes.fromhex("000008"), "shorter than the 4-byte magic"),
        (bytes.fromhex("00000803" "0000000a"), "truncated IDX header"),
        (bytes.fromhex("00000801" "00000003" "0506"), "payload truncated"),
        (bytes.fromhex("00000801" "00000001" "0506"), "trailing bytes"),
    ],
)
def test_idx_corrupt_files_raise_clear_errors(tmp_path, raw, match):
    path = tmp_path / "bad-idx"
    path.write_bytes(raw)
    with pytest.raises(DataFormatError, match=match) as exc:
        read_idx(path)
    assert str(path) in str(exc.value)
    assert isinstance(exc.value, ValueError)


def test_idx_truncated_gzip(tmp_path):
    good = gzip.compress(bytes.fromhex("00000801" "00000100") + bytes(256))
    path = tmp_path / "t.gz"
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataFormatError, match="corrupt or truncated gzip"):
        read_idx(path)


def test_write_idx_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(DataFormatError, match="cannot store dtype int64"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.int64))


def _fake_root(tmp_path, n_train=40, n_test=20, gz=False):
    rng = np.random.default_rng(1)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}",
                  rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}",
                  (np.arange(n) % 10).astype(np.uint8))
    return tmp_path


@pytest.mark.parametrize("gz", [False, True])
def test_user_root_with_or_without_gz(tmp_path, gz):
    root = _fake_root(tmp_path, gz=gz)
    ds = load_fashion_mnist("train", root=root)
    assert ds.images.shape == (40, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == [i % 10 for i in range(40)]
    assert load_fashion_mnist("test", root=root).images.shape == (20, 28, 28)


def test_user_root_with_inconsistent_files(tmp_path):
    root = _fake_root(tmp_path)
    write_idx(root / "t10k-labels-idx1-ubyte", np.zeros(3, dtype=np.uint8))
    with pytest.raises(DataFormatError, match="20 images but labels of shape"):
        load_fashion_mnist("test", root=root)


def test_missing_root_says_how_to_install(tmp_path):
    with pytest.raises(DataNotFoundError, match="sudo apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)


def test_bad_parameters(tmp_path):
    root = _fake_root(tmp_path)
    with pytest.raises(InvalidParameterError, match=r"'split'.*'test', 'train'.*Did you mean 'train'"):
        load_fashion_mnist("trian", root=root)
    with pytest.raises(InvalidParameterError, match=r"'n' parameter .* range \[1, 40\]. Got 41"):
        fashion_mnist_tensors("train", root=root, n=41)
    with pytest.raises(InvalidParameterError, match="'seed'"):
        fashion_mnist_tensors("train", root=root, seed=-1)


def test_tensors_subset_is_stratified_and_deterministic(tmp_path):
    root = _fake_root(tmp_path)
    a = fashion_mnist_tensors("train", root=root, n=20, seed=3)
    b = fashion_mnist_tensors("train", root=root, n=20, seed=3)
    c = fashion_mnist_tensors("train", root=root, n=20, seed=4)
    assert a.x.shape == (20, 1, 28, 28) and a.x.dtype == torch.float32 and a.y.dtype == torch.int64
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)
    assert torch.bincount(a.y, minlength=10).tolist() == [2] * 10


@pytest.mark.requires_data("fashion-mnist")
def test_real_fashion_mnist_shapes_and_classes():
    train = load_fashion_mnist("train")
    test = load_fashion_mnist("test")
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert train.classes == FASHION_MNIST_CLASSES and len(train.classes) == 10
    assert torch.bincount(train.labels, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(test.labels, minlength=10).tolist() == [1000] * 10


@pytest.mark.requires_data("fashion-mnist")
def test_normalization_constants_match_the_data():
    images = load_fashion_mnist("train").images
    counts = torch.bincount(images.flatten(), minlength=256).double()  # exact pixel histogram
    values = torch.arange(256, dtype=torch.float64) / 255.0
    mean = (counts * values).sum() / counts.sum()
    std = ((counts * (values - mean) ** 2).sum() / counts.sum()).sqrt()  # population std
    assert abs(mean.item() - FASHION_MNIST_MEAN) < 1e-6 and abs(std.item() - FASHION_MNIST_STD) < 1e-6
    x, y = fashion_mnist_tensors("train")
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.float32 and y.shape == (60000,)
    expected = (images[:500].double() / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    torch.testing.assert_close(x[:500, 0].double(), expected, atol=1e-5, rtol=0)


@pytest.mark.requires_data("fashion-mnist")
def test_real_subset_per_class():
    x, y = fashion_mnist_tensors("test", n=1005, seed=0)
    assert x.shape == (1005, 1, 28, 28)
    counts = torch.bincount(y, minlength=10).tolist()
    assert sum(counts) == 1005 and max(counts) - min(counts) <= 1


# ------------------------------------------------------------------ bad input (issue #13)
def test_read_idx_missing_file_and_folder_are_clean_errors(tmp_path):
    with pytest.raises(DataNotFoundError, match="The IDX file .*nope.idx' does not exist"):
        read_idx(tmp_path / "nope.idx")
    with pytest.raises(DataFormatError, match="is a folder, not a file"):
        read_idx(tmp_path)


def test_read_idx_refuses_a_gzip_bomb_before_allocating(tmp_path, monkeypatch):
    import leanscale.data.fashion_mnist as fm

    header = bytes([0, 0, 8, 1]) + (8 << 20).to_bytes(4, "big")
    path = tmp_path / "bomb.idx.gz"
    path.write_bytes(gzip.compress(header + bytes(8 << 20)))  # 8 MiB of zeros in ~8 KiB
    monkeypatch.setattr(fm, "MAX_IDX_BYTES", 1 << 20)
    with pytest.raises(DataFormatError, match="decompresses to more than 1,048,576 bytes; refused"):
        read_idx(path)


def test_read_idx_reads_concatenated_gzip_members(tmp_path):
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    raw = bytes([0, 0, 8, 2]) + (3).to_bytes(4, "big") + (4).to_bytes(4, "big") + arr.tobytes()
    path = tmp_path / "two.idx.gz"
    path.write_bytes(gzip.compress(raw[:10]) + gzip.compress(raw[10:]))
    np.testing.assert_array_equal(read_idx(path), arr)
