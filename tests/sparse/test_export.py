"""Export after SWAT: CSR kernels give the dense layer's outputs, only sparse-enough layers are
swapped, compact checkpoints round-trip and are smaller, bad input."""

import warnings

import pytest
import torch
from torch import nn

from leanscale.core.errors import InvalidParameterError
from leanscale.sparse import (
    SparseLinear,
    apply_swat,
    export_pruned,
    load_pruned,
    save_pruned,
    to_sparse_kernels,
    weight_sparsity,
)


def pruned_mlp(sparsity=0.95):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    with torch.no_grad():
        model[0].weight[torch.rand(128, 64) < sparsity] = 0
        model[2].weight[torch.rand(10, 128) < 0.3] = 0
    return model


def test_sparse_kernels_match_dense_and_respect_the_threshold():
    model = pruned_mlp()
    x = torch.randn(3, 7, 64)
    expected = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the CSR "beta" warning is not passed on
        to_sparse_kernels(model, min_sparsity=0.9)
    assert isinstance(model[0], SparseLinear) and type(model[2]) is nn.Linear
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_swat_model_exports_to_sparse_kernels():
    torch.manual_seed(1)
    model = apply_swat(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4)), 0.9, dense_first_layer=False,
                       dense_last_layer=False)
    model(torch.randn(8, 32)).sum().backward()
    with pytest.raises(InvalidParameterError, match=r"still has SWAT layers: call leanscale.sparse.export_pruned"):
        to_sparse_kernels(model)
    model.eval()
    x = torch.randn(5, 32)
    expected = model(x)
    export_pruned(model)
    assert weight_sparsity(model[0]) == pytest.approx(0.9, abs=1e-3)
    to_sparse_kernels(model, min_sparsity=0.85)  # K = round(0.1 * 2048) = 205 kept: 89.99% sparse
    assert isinstance(model[0], SparseLinear) and isinstance(model[2], SparseLinear)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_save_and_load_pruned(tmp_path):
    model = pruned_mlp(0.9)
    path = save_pruned(model, tmp_path / "m.pt")
    dense_path = tmp_path / "dense.pt"
    torch.save(model.state_dict(), dense_path)
    assert path.stat().st_size < 0.5 * dense_path.stat().st_size
    fresh = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    load_pruned(fresh, path)
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(InvalidParameterError, match=r"'path' parameter of load_pruned must be a file written by save_pruned"):
        load_pruned(fresh, tmp_path / "other.pt")


def test_bad_input():
    with pytest.raises(InvalidParameterError, match=r"'min_sparsity' parameter of to_sparse_kernels.*Got 1.5"):
        to_sparse_kernels(pruned_mlp(), min_sparsity=1.5)
    with pytest.raises(InvalidParameterError, match=r"'module' parameter of SparseLinear.from_dense must be a torch.nn.Linear"):
        SparseLinear.from_dense(nn.Conv2d(1, 1, 1))


# --- format versions and atomic saves ----------------------------------------------------------------


def swat_net():
    torch.manual_seed(0)
    return apply_swat(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), 0.8, dense_first_layer=False)


def _saved_both(tmp_path):
    from leanscale.sparse import save_swat_checkpoint

    model = swat_net()
    return (save_pruned(export_pruned(swat_net()), tmp_path / "p.pt"),
            save_swat_checkpoint(model, tmp_path / "s.pt", {"sparsity": 0.8, "dense_first_layer": False}))


def test_checkpoints_keep_their_format_and_record_their_version_in_the_marker(tmp_path):
    from leanscale.sparse.export import PRUNED_FORMAT_VERSION, SWAT_FORMAT_VERSION

    pruned, swat = _saved_both(tmp_path)
    assert PRUNED_FORMAT_VERSION == SWAT_FORMAT_VERSION == 1
    blob = torch.load(pruned, weights_only=True)  # still a plain torch file
    assert set(blob) == {"leanscale_pruned", "state"} and blob["leanscale_pruned"] == 1
    blob = torch.load(swat, weights_only=True)
    # exactly the keys of version 1: a new file stays readable by the releases before this change
    assert set(blob) == {"leanscale_swat", "settings", "layers", "extra", "state_dict"} and blob["leanscale_swat"] == 1


@pytest.mark.parametrize("kind", ["pruned", "swat"])
def test_a_newer_or_malformed_format_version_is_refused(tmp_path, kind):
    from leanscale.core.errors import DataFormatError
    from leanscale.sparse import load_swat_checkpoint

    pruned, swat = _saved_both(tmp_path)
    path, key = (pruned, "leanscale_pruned") if kind == "pruned" else (swat, "leanscale_swat")
    load = (lambda p: load_pruned(export_pruned(swat_net()), p)) if kind == "pruned" else load_swat_checkpoint
    blob = torch.load(path, weights_only=True)
    blob[key] = 2
    torch.save(blob, tmp_path / "new.pt")
    with pytest.raises(DataFormatError, match=rf"new.pt' has {key} 2: it was written by a newer leanscale, and this "
                                              r"one reads up to version 1\. Upgrade"):
        load(tmp_path / "new.pt")
    for bad in (0, "1", True, 1.0, None):
        blob[key] = bad
        torch.save(blob, tmp_path / "bad.pt")
        with pytest.raises(DataFormatError, match="expected an int >= 1"):
            load(tmp_path / "bad.pt")
    blob[key] = 1  # the files written before this change load as before
    torch.save(blob, tmp_path / "v1.pt")
    assert load(tmp_path / "v1.pt") is not None


@pytest.mark.parametrize("kind", ["pruned", "swat"])
def test_a_failed_save_leaves_the_previous_file_whole(tmp_path, kind, monkeypatch):
    import os

    from leanscale.sparse import load_swat_checkpoint, save_swat_checkpoint

    pruned, swat = _saved_both(tmp_path)
    path = pruned if kind == "pruned" else swat
    before = path.read_bytes()

    def killed(src, dst):
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr(os, "replace", killed)
    other = swat_net()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        if kind == "pruned":
            save_pruned(export_pruned(other), path)
        else:
            save_swat_checkpoint(other, path, {"sparsity": 0.8})
    monkeypatch.undo()
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["p.pt", "s.pt"]
    if kind == "pruned":
        load_pruned(export_pruned(swat_net()), path)
    else:
        assert load_swat_checkpoint(path)["settings"] == {"sparsity": 0.8, "dense_first_layer": False}
