"""Bad input to leanscale.sparse (SWAT, MoE, export) and its CLI: a clear LeanscaleError naming the
parameter or the file, never a traceback or a silent result; saved files are untrusted (no code
runs on load, sizes are checked before allocation, a mutated file gives only LeanscaleError)."""

import copy
import os
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from leanscale.cli.main import main
from leanscale.core.errors import DataFormatError, DataNotFoundError, InvalidParameterError, LeanscaleError
from leanscale.models.transformer import MLP
from leanscale.sparse import (
    SWAT,
    MoE,
    SparseLinear,
    SWATLinear,
    apply_moe,
    apply_swat,
    erk_densities,
    export_pruned,
    load_pruned,
    load_swat_checkpoint,
    save_pruned,
    save_swat_checkpoint,
    set_swat_sparsity,
    swat_layers,
    swat_summary,
    to_sparse_kernels,
    topk_threshold,
    weight_sparsity,
)


def net():
    """The architecture of the saved files below (also used by the CLI through --model)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.BatchNorm1d(8))


def mlp():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def swat_mlp():
    return apply_swat(mlp(), 0.5, dense_first_layer=False)


# ----------------------------------------------------------------------------- API sweep

API_CASES = [
    # (call, exception, text the message must contain)
    (lambda: apply_swat(None), InvalidParameterError, "'model' parameter of apply_swat"),
    (lambda: apply_swat(mlp(), "0.5"), InvalidParameterError, "'sparsity' parameter of apply_swat"),
    (lambda: apply_swat(mlp(), float("nan")), InvalidParameterError, "'sparsity' parameter of apply_swat"),
    (lambda: apply_swat(mlp(), 1.0), InvalidParameterError, "'sparsity' parameter of apply_swat"),
    (lambda: apply_swat(mlp(), 0.5, distribution="erdos"), InvalidParameterError, "'distribution' parameter"),
    (lambda: apply_swat(mlp(), 0.5, topk_period=0), InvalidParameterError, "'topk_period' parameter"),
    (lambda: apply_swat(mlp(), 0.5, warmup_steps=-1), InvalidParameterError, "'warmup_steps' parameter"),
    (lambda: apply_swat(mlp(), 0.5, structured="yes"), InvalidParameterError, "'structured' parameter"),
    (lambda: apply_swat(mlp(), 0.5, layers=3), InvalidParameterError, "'layers' parameter of apply_swat"),
    (lambda: apply_swat(mlp(), 0.5, layers=[0]), InvalidParameterError, "'layers' parameter of apply_swat"),
    (lambda: apply_swat(mlp(), 0.5, layers=[]), InvalidParameterError, "'layers' parameter of apply_swat"),
    (lambda: apply_swat(mlp(), 0.5, layers=["nope"]), InvalidParameterError, "must name submodules"),
    (lambda: apply_swat(mlp(), 0.5, layers=["1"]), InvalidParameterError, "layer SWAT can convert"),
    (lambda: apply_swat(swat_mlp(), 0.5), InvalidParameterError, "converted already"),
    (lambda: apply_swat(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular")), 0.5,
                       dense_last_layer=False),
     InvalidParameterError, "'padding_mode'"),
    (lambda: swat_mlp()(torch.randn(2, 5)), InvalidParameterError, "'x' parameter of SWATLinear"),
    (lambda: swat_mlp()(torch.ones(2, 4, dtype=torch.long)), InvalidParameterError, "floating tensor"),
    (lambda: apply_swat(nn.Sequential(nn.Conv2d(1, 2, 3)), 0.5, dense_first_layer=False, dense_last_layer=False)(torch.randn(1, 3, 8, 8)),
     InvalidParameterError, "'x' parameter of SWATConv2d"),
    (lambda: set_swat_sparsity(None, 0.5), InvalidParameterError, "'model' parameter"),
    (lambda: set_swat_sparsity(mlp(), 0.5), InvalidParameterError, "has no SWAT layer"),
    (lambda: set_swat_sparsity(swat_mlp(), 1.5), InvalidParameterError, "'sparsity' parameter of set_swat_sparsity"),
    (lambda: swat_layers("model"), InvalidParameterError, "'model' parameter"),
    (lambda: swat_summary(None), InvalidParameterError, "'model' parameter"),
    (lambda: export_pruned(None), InvalidParameterError, "'model' parameter"),
    (lambda: export_pruned(mlp()), InvalidParameterError, "no SWAT layer to export"),
    (lambda: erk_densities([(3, 3)], 0.5), InvalidParameterError, "'shapes' parameter of erk_densities"),
    (lambda: erk_densities({"a": (0, 3)}, 0.5), InvalidParameterError, "'shapes' parameter of erk_densities"),
    (lambda: erk_densities({"a": (-1, 3)}, 0.5), InvalidParameterError, "shape of positive ints"),
    (lambda: erk_densities({"a": (3, 3)}, 0.0), InvalidParameterError, "'density' parameter"),
    (lambda: topk_threshold(None, 0.5), InvalidParameterError, "'t' parameter of topk_threshold"),
    (lambda: topk_threshold(torch.randn(4), -0.1), InvalidParameterError, "'density' parameter of topk_threshold"),
    (lambda: SWAT(0.5, nope=1), InvalidParameterError, "Got 'nope'"),
    (lambda: SWAT(2.0), InvalidParameterError, "'sparsity' parameter of SWAT"),
    (lambda: SWATLinear(3, 4, sparsity=-1), InvalidParameterError, "'sparsity' parameter of SWATLinear"),
    (lambda: to_sparse_kernels(None), InvalidParameterError, "'model' parameter of to_sparse_kernels"),
    (lambda: to_sparse_kernels(swat_mlp()), InvalidParameterError, "still has SWAT layers"),
    (lambda: to_sparse_kernels(mlp(), 0.0)(torch.randn(2, 5)), InvalidParameterError, "'x' parameter of SparseLinear"),
    (lambda: weight_sparsity(nn.ReLU()), InvalidParameterError, "'module' parameter of weight_sparsity"),
    (lambda: SparseLinear.from_dense(nn.Conv2d(1, 1, 1)), InvalidParameterError, "'module' parameter"),
    (lambda: save_pruned(None, "x.pt"), InvalidParameterError, "'model' parameter of save_pruned"),
    (lambda: save_pruned(mlp(), 3), InvalidParameterError, "'path' parameter of save_pruned"),
    (lambda: save_pruned(mlp(), os.getcwd()), InvalidParameterError, "must be a file path"),
    (lambda: save_pruned(mlp(), "x.pt", min_sparsity=2), InvalidParameterError, "'min_sparsity' parameter"),
    (lambda: load_pruned(None, "x.pt"), InvalidParameterError, "'model' parameter of load_pruned"),
    (lambda: load_pruned(mlp(), None), InvalidParameterError, "'path' parameter of load_pruned"),
    (lambda: load_pruned(mlp(), "/nonexistent/x.pt"), DataNotFoundError, "'/nonexistent/x.pt' does not exist"),
    (lambda: load_pruned(mlp(), os.getcwd()), DataFormatError, "is a folder"),
    (lambda: save_swat_checkpoint(mlp(), "x.pt"), InvalidParameterError, "has no SWAT layer"),
    (lambda: save_swat_checkpoint(swat_mlp(), "x.pt", {"sparsity": 2.0}), InvalidParameterError, "'sparsity'"),
    (lambda: save_swat_checkpoint(swat_mlp(), "x.pt", {"nope": 1}), InvalidParameterError, "must hold only"),
    (lambda: load_swat_checkpoint(3), InvalidParameterError, "'path' parameter of load_swat_checkpoint"),
    (lambda: save_swat_checkpoint(swat_mlp(), "x.pt", extra={"a": np.zeros(2)}), InvalidParameterError,
     "'extra' parameter of save_swat_checkpoint must hold only plain data"),
    (lambda: save_swat_checkpoint(swat_mlp(), "x.pt", settings=[0.5]), InvalidParameterError, "'settings' parameter"),
    (lambda: MoE(0, 4, 2), InvalidParameterError, "'n_embd' parameter of MoE"),
    (lambda: MoE(4, 4, 2, top_k=3), InvalidParameterError, "'top_k' parameter of MoE"),
    (lambda: MoE(4, 4, 2, capacity_factor=0), InvalidParameterError, "'capacity_factor' parameter of MoE"),
    (lambda: MoE(4, 4, 2, capacity_factor=float("nan")), InvalidParameterError, "'capacity_factor' parameter"),
    (lambda: MoE(4, 4, 2, capacity_factor=float("inf")), InvalidParameterError, "None means dropless"),
    (lambda: MoE(4, 4, 2, load_balancing_coef=float("inf")), InvalidParameterError, "'load_balancing_coef'"),
    (lambda: MoE(4, 4, 2, jitter=1.0), InvalidParameterError, "'jitter' parameter of MoE"),
    (lambda: MoE(4, 4, 2, bias="yes"), InvalidParameterError, "'bias' parameter of MoE"),
    (lambda: MoE(4, 4, 2)(torch.randn(2, 5)), InvalidParameterError, "'x' parameter of MoE"),
    (lambda: MoE(4, 4, 2)(torch.ones(2, 4, dtype=torch.long)), InvalidParameterError, "floating tensor"),
    (lambda: MoE(4, 4, 2)([[1.0] * 4]), InvalidParameterError, "'x' parameter of MoE"),
    (lambda: MoE(4, 4, 2).reset_parameters(-1), InvalidParameterError, "'std' parameter"),
    (lambda: apply_moe(None, 2), InvalidParameterError, "'model' parameter of apply_moe"),
    (lambda: apply_moe(mlp(), 2), InvalidParameterError, "no leanscale.models.transformer.MLP"),
    (lambda: apply_moe(nn.Sequential(MLP(4, 8)), 2, every=1, init="zero"), InvalidParameterError, "'init' parameter"),
    (lambda: apply_moe(nn.Sequential(MLP(4, 8)), 2, every=0), InvalidParameterError, "'every' parameter"),
    (lambda: apply_moe(nn.Sequential(MLP(4, 8)), 2, every=3), InvalidParameterError, "'every' parameter"),
    (lambda: apply_moe(nn.Sequential(MLP(4, 8)), True, every=1), InvalidParameterError, "'n_experts' parameter"),
    (lambda: apply_moe(nn.Sequential(MLP(4, 8)), 2, top_k=3, every=1), InvalidParameterError, "'top_k' parameter"),
]


@pytest.mark.parametrize("call,exc,text", API_CASES, ids=[f"case{i}" for i in range(len(API_CASES))])
def test_api_bad_input_is_a_clear_error(call, exc, text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(exc) as info:
        call()
    assert text in str(info.value)


@settings(max_examples=40, deadline=None)
@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3), st.text(max_size=3),
                 st.none(), st.booleans()))
def test_apply_swat_sparsity_in_range_or_refused(value):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1
    if ok:
        model = apply_swat(mlp(), value, dense_first_layer=False)
        assert all(m.sparsity == pytest.approx(value) for _, m in swat_layers(model))
    else:
        with pytest.raises(InvalidParameterError, match=r"'sparsity' parameter of apply_swat .* Got "):
            apply_swat(mlp(), value)


@settings(max_examples=40, deadline=None)
@given(n_experts=st.integers(-2, 6), top_k=st.integers(-1, 7),
       capacity=st.one_of(st.none(), st.floats(-1, 4), st.just(float("inf")), st.just(float("nan"))))
def test_moe_arguments_valid_or_refused(n_experts, top_k, capacity):
    import math

    valid = n_experts >= 1 and 1 <= top_k <= n_experts and (capacity is None or (math.isfinite(capacity) and capacity > 0))
    if valid:
        out = MoE(4, 8, n_experts, top_k=top_k, capacity_factor=capacity)(torch.randn(6, 4))
        assert out.output.shape == (6, 4) and bool(torch.isfinite(out.output).all())
    else:
        with pytest.raises(InvalidParameterError, match=r"The '(n_experts|top_k|capacity_factor)' parameter of MoE"):
            MoE(4, 8, n_experts, top_k=top_k, capacity_factor=capacity)


# ----------------------------------------------------------------------------- crafted files


class _Evil:
    """Unpickling this would run os.system: a file holding it must be refused without running it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("wrap", ["top", "nested"])
def test_a_crafted_pickle_does_not_run(tmp_path, wrap):
    marker = tmp_path / "PWNED"
    evil = _Evil(marker)
    path = tmp_path / "evil.pt"
    torch.save(evil if wrap == "top" else {"leanscale_pruned": 1, "state": {"0.weight": evil}}, path)
    for load in (lambda: load_pruned(mlp(), path), lambda: load_swat_checkpoint(path)):
        with pytest.raises(DataFormatError) as info:
            load()
        assert str(path) in str(info.value) and "never loads" in str(info.value)
    assert main(["sparse", "export", "--checkpoint", str(path), "--sparsity", "0.5", "--out", str(tmp_path / "o.pt")]) == 2
    assert not marker.exists()  # no code ran
    assert not (tmp_path / "o.pt").exists()


def test_real_save_pruned_files_load_with_weights_only(tmp_path):
    """save_pruned stores a tuple 'shape': weights_only=True must read it (it does)."""
    model = export_pruned(apply_swat(net(), 0.9, dense_first_layer=False))
    path = save_pruned(model, tmp_path / "p.pt", min_sparsity=0.5)
    blob = torch.load(path, weights_only=True)
    assert isinstance(blob["state"]["0.weight"], dict) and blob["state"]["0.weight"]["shape"] == (32, 16)
    back = load_pruned(net(), path)
    for (k, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k


def test_numpy_settings_are_stored_as_plain_values_that_load_with_weights_only(tmp_path):
    model = apply_swat(mlp(), np.float64(0.5), topk_period=np.int64(2), dense_first_layer=False)
    path = save_swat_checkpoint(model, tmp_path / "s.pt", {"sparsity": np.float64(0.5), "topk_period": np.int64(2)})
    ckpt = load_swat_checkpoint(path)
    assert ckpt["settings"] == {"sparsity": 0.5, "topk_period": 2} and type(ckpt["settings"]["topk_period"]) is int
    assert ckpt["layers"]["0"] == {"sparsity": 0.5, "activation_sparsity": 0.5, "topk_period": 2,
                                   "structured": False, "warmup_steps": 0}


def test_a_csr_entry_claiming_a_huge_shape_is_refused_before_allocating(tmp_path):
    model = export_pruned(apply_swat(net(), 0.9, dense_first_layer=False))
    path = save_pruned(model, tmp_path / "p.pt")
    blob = torch.load(path, weights_only=True)
    blob["state"]["0.weight"]["shape"] = (10**9, 10**9)  # 4e18 bytes if it were densified
    blob["state"]["0.weight"]["crow"] = torch.zeros(3, dtype=torch.int32)
    torch.save(blob, tmp_path / "huge.pt")
    with pytest.raises(DataFormatError, match=r"'0.weight' .* must have the model's shape \(32, 16\)\. Got shape "
                                              r"\(1000000000, 1000000000\)"):
        load_pruned(net(), tmp_path / "huge.pt")
    blob["state"]["0.weight"]["shape"] = (32, 16)  # the right shape, but 3 row pointers for 32 rows
    torch.save(blob, tmp_path / "rows.pt")
    with pytest.raises(DataFormatError, match=r"not a valid CSR matrix of shape \(32, 16\): got 3 row pointers"):
        load_pruned(net(), tmp_path / "rows.pt")


def test_a_text_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("this is not a checkpoint\n")
    for load in (lambda: load_pruned(mlp(), path), lambda: load_swat_checkpoint(path)):
        with pytest.raises(DataFormatError, match=r"notes.pt' is not a readable torch checkpoint"):
            load()


# ----------------------------------------------------------------------------- fuzz

WEIRD = [None, 1, -1, 2.5, float("nan"), "x", [], {}, (10**9, 10**9), [10**12], torch.zeros(0), torch.zeros(3, 3),
         torch.zeros(5, dtype=torch.int64), torch.full((33,), 10**9, dtype=torch.int32), torch.tensor(True), b"x"]


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, (list, tuple)) and len(obj) < 10:
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _mutated(blob, path, value, delete):
    """A deep copy of ``blob`` with the entry at ``path`` deleted or replaced (tuples rebuilt)."""
    blob = copy.deepcopy(blob)
    if not path:
        return value
    chain = [blob]
    for k in path[:-1]:
        chain.append(chain[-1][k])
    parent, key = chain[-1], path[-1]
    if isinstance(parent, tuple):
        items = list(parent)
        if delete:
            del items[key]
        else:
            items[key] = value
        chain[-2][path[-2]] = tuple(items)
    elif delete:
        del parent[key]
    else:
        parent[key] = value
    return blob


def _byte_mutations(raw, rng, n):
    for i in range(n):
        b = bytearray(raw)
        if i % 3 == 0:
            b = b[: rng.randrange(len(b))]  # truncated
        elif i % 3 == 1:
            for _ in range(rng.randint(1, 8)):  # flipped bytes
                b[rng.randrange(len(b))] = rng.randrange(256)
        else:
            b = bytearray(rng.randrange(256) for _ in range(rng.randint(0, 400)))  # random bytes
        yield bytes(b)


def _only_leanscale_errors(load, path):
    try:
        load(path)
    except LeanscaleError:
        return "refused"
    return "loaded"


def _export(path):
    """The whole `sparse export` path on a checkpoint of net(): load, rebuild, check, export."""
    code = main(["sparse", "export", "--checkpoint", str(path), "--model", "tests.sparse.test_bad_inputs:net",
                 "--out", str(path.parent / "out.pt")])
    if code != 0:
        raise LeanscaleError("refused")  # main turned a LeanscaleError into exit code 2
    return code


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    m = apply_swat(net(), 0.8, dense_first_layer=False)
    return {
        "swat": save_swat_checkpoint(m, root / "swat.pt", {"sparsity": 0.8, "dense_first_layer": False}),
        "pruned": save_pruned(export_pruned(m), root / "pruned.pt", min_sparsity=0.5),
    }


@pytest.mark.parametrize("kind", ["pruned", "swat"])
def test_fuzz_structured_mutations_give_only_leanscale_errors(kind, saved, tmp_path, capsys):
    load = (lambda p: load_pruned(net(), p)) if kind == "pruned" else _export
    blob = torch.load(saved[kind], weights_only=True)
    mutations = [(path, delete, value) for path in _paths(blob)
                 for delete, value in [(True, None)] + [(False, w) for w in WEIRD] if path or not delete]
    # every entry deleted, and a seeded sample of the replacements (all of them take ~30 s)
    chosen = [m for m in mutations if m[1]] + random.Random(1).sample([m for m in mutations if not m[1]], 110)
    outcomes = []
    for path, delete, value in chosen:
        target = tmp_path / "m.pt"
        torch.save(_mutated(blob, path, value, delete), target)
        outcomes.append(_only_leanscale_errors(load, target))  # anything else fails the test
    capsys.readouterr()
    assert outcomes.count("refused") > 0.7 * len(outcomes)


@pytest.mark.parametrize("kind", ["pruned", "swat"])
def test_fuzz_damaged_bytes_give_only_leanscale_errors(kind, saved, tmp_path):
    load = (lambda p: load_pruned(net(), p)) if kind == "pruned" else load_swat_checkpoint
    raw = saved[kind].read_bytes()
    rng = random.Random(0)
    outcomes = []
    for data in _byte_mutations(raw, rng, 90):
        target = tmp_path / "m.pt"
        target.write_bytes(data)
        outcomes.append(_only_leanscale_errors(load, target))
    assert outcomes.count("refused") >= 60  # truncation and random bytes are always refused


# ----------------------------------------------------------------------------- CLI flags

CLI_CASES = [
    (["sparse", "report", "--batch", "1"], "'--batch' parameter of leanscale sparse report"),
    (["sparse", "report", "--batch", "4", "--sparsity", "nan"], "'sparsity' parameter of apply_swat"),
    (["sparse", "report", "--batch", "4", "--warmup-steps", "-2"], "'warmup_steps' parameter of apply_swat"),
    (["sparse", "report", "--batch", "4", "--activation-sparsity", "1"], "'activation_sparsity' parameter"),
    (["sparse", "report", "--model", "os:getcwd"], "must return a torch.nn.Module"),
    (["sparse", "export", "--checkpoint", "/nonexistent.pt", "--out", "o.pt"], "'/nonexistent.pt' does not exist"),
]


@pytest.mark.parametrize("argv,text", CLI_CASES, ids=[f"cli{i}" for i in range(len(CLI_CASES))])
def test_cli_bad_flags(argv, text, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert text in err and "Traceback" not in err


@pytest.mark.parametrize("arch,text", [
    ({"model": "bncnn", "width": 60000, "in_shape": [1, 28, 28], "n_classes": 10},
     "records an architecture of"),  # ~3e10 parameters: counted on the meta device, never allocated
    ({"model": "bncnn", "width": 60000, "in_shape": [1, 28, 28], "num_classes": 10},
     "records an architecture of"),  # the key before #14 is still read (and checked the same way)
    ({"model": "os:system", "width": 8, "in_shape": [1, 28, 28], "n_classes": 10}, "invalid architecture"),
    ({"model": "bncnn", "width": 8, "in_shape": [1, 28, 28]}, "invalid architecture"),
    ({"model": "mlp", "width": -1, "in_shape": [4], "n_classes": 3}, "invalid architecture"),
    ({"model": "mlp", "width": 8, "in_shape": [4], "n_classes": 3, "num_classes": 3}, "invalid architecture"),
    ({"model": "bncnn", "width": True, "in_shape": [1, 28, 28], "n_classes": 10}, "invalid architecture"),
    ("bncnn", "invalid architecture"),
])
def test_export_refuses_a_damaged_recorded_architecture(arch, text, tmp_path, capsys):
    model = apply_swat(net(), 0.8, dense_first_layer=False)
    path = save_swat_checkpoint(model, tmp_path / "s.pt", {"sparsity": 0.8}, extra={"architecture": arch})
    assert main(["sparse", "export", "--checkpoint", str(path), "--out", str(tmp_path / "o.pt")]) == 2
    err = capsys.readouterr().err
    assert text in err and str(path) in err and "Traceback" not in err
