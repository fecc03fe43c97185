"""SWAT layers: forward with the top-K weights, input gradient through them, weight gradient from
the top-K activations (by hand), sparsity 0 == dense, thresholds refreshed every topk_period,
compact storage with the closed-form byte count, ERK, surgery, export, FLOPs, bad input."""

import doctest
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leanscale.core.errors import InvalidParameterError
from leanscale.core.flops import count_flops
from leanscale.models import BNCNN, MLPClassifier
from leanscale.sparse import (
    CompactReLU,
    SWATConv2d,
    SWATLinear,
    apply_swat,
    erk_densities,
    export_pruned,
    set_swat_sparsity,
    swat_layers,
    swat_summary,
    topk_threshold,
    track_saved_tensors,
)
from leanscale.sparse import swat as swat_mod
from leanscale.sparse.swat import pack_bits, pack_topk, unpack_bits, unpack_topk


def test_doctests():
    assert doctest.testmod(swat_mod, raise_on_error=False).failed == 0


def topk_mask(t, density):
    """Reference top-K by sorting: exactly K = round(density * n) largest magnitudes."""
    flat = t.detach().abs().reshape(-1)
    k = max(1, round(density * flat.numel()))
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[flat.argsort(descending=True)[:k]] = True
    return mask.view_as(t) & (t != 0)


# ------------------------------------------------------------------------- primitives


def test_topk_threshold_keeps_exactly_k_without_ties():
    t = torch.randn(1000)
    for density in (0.05, 0.2, 0.5, 0.99):
        thr = topk_threshold(t, density)
        assert int((t.abs() >= thr).sum()) == round(density * 1000)
        assert torch.equal(t.abs() >= thr, topk_mask(t, density))
    assert topk_threshold(t, 1.0) == 0


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4, 5), (1,)])
def test_pack_unpack_roundtrip_and_size(shape):
    x = torch.randn(shape)
    mask = torch.rand(shape) < 0.3
    values, bits = pack_topk(x, mask)
    n = math.prod(shape)
    assert values.numel() == int(mask.sum()) and bits.numel() == math.ceil(n / 8) and bits.dtype == torch.uint8
    assert torch.equal(unpack_topk(values, bits, shape), x * mask)
    assert torch.equal(unpack_bits(pack_bits(mask), shape), mask)


def test_compact_relu_equals_relu():
    x = torch.tensor([[-1.0, 0.0, 2.0, 3.0, -0.5, 0.0, 1.0, 4.0, -2.0]], requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    g = torch.randn(1, 9)
    y, y2 = CompactReLU()(x), F.relu(x2)
    y.backward(g)
    y2.backward(g)
    assert torch.equal(y, y2) and torch.equal(x.grad, x2.grad)


# ------------------------------------------------------------------------- the layer maths


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9])
def test_linear_forward_and_gradients_by_hand(sparsity):
    torch.manual_seed(0)
    dense = nn.Linear(40, 12)
    W, b = dense.weight.detach().clone(), dense.bias.detach().clone()
    layer = SWATLinear.from_dense(dense, sparsity=sparsity)
    x = torch.randn(3, 16, 40, requires_grad=True)  # extra leading dims are flattened
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)

    w_mask = topk_mask(W, 1 - sparsity)
    x_s = x.detach() * topk_mask(x, 1 - sparsity)
    torch.testing.assert_close(y, F.linear(x.detach(), W * w_mask, b), rtol=0, atol=1e-6)
    torch.testing.assert_close(x.grad, g @ (W * w_mask), rtol=0, atol=1e-6)  # sparse weights
    g2 = g.reshape(-1, 12)
    torch.testing.assert_close(dense.weight.grad, g2.t() @ x_s.reshape(-1, 40), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense.bias.grad, g2.sum(0))
    # The weight gradient is dense: pruned weights get gradient too and can grow back.
    assert (dense.weight.grad[~w_mask] != 0).float().mean() > 0.9


@pytest.mark.parametrize("stride,padding,groups", [(1, 1, 1), (2, 0, 1), (1, 1, 2)])
def test_conv_forward_and_gradients_by_hand(stride, padding, groups):
    torch.manual_seed(1)
    dense = nn.Conv2d(4, 6, 3, stride=stride, padding=padding, groups=groups, bias=True)
    W, b = dense.weight.detach().clone(), dense.bias.detach().clone()
    layer = SWATConv2d.from_dense(dense, sparsity=0.8)
    x = torch.randn(5, 4, 9, 9, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)

    w_mask = topk_mask(W, 0.2)
    x_s = (x.detach() * topk_mask(x, 0.2)).requires_grad_(False)
    torch.testing.assert_close(y, F.conv2d(x.detach(), W * w_mask, b, stride, padding, 1, groups), rtol=0, atol=1e-5)
    # reference gradients from autograd of plain convolutions: input through W*mask, weight from x_s
    xr = x.detach().clone().requires_grad_(True)
    F.conv2d(xr, W * w_mask, b, stride, padding, 1, groups).backward(g)
    Wr = W.clone().requires_grad_(True)
    F.conv2d(x_s, Wr, None, stride, padding, 1, groups).backward(g)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense.weight.grad, Wr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense.bias.grad, g.sum((0, 2, 3)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_sparsity_zero_equals_dense_exactly(kind):
    torch.manual_seed(2)
    dense = nn.Linear(10, 4) if kind == "linear" else nn.Conv2d(3, 4, 3, padding=1)
    ref = nn.Linear(10, 4) if kind == "linear" else nn.Conv2d(3, 4, 3, padding=1)
    ref.load_state_dict(dense.state_dict())
    layer = (SWATLinear if kind == "linear" else SWATConv2d).from_dense(dense, sparsity=0.0)
    x = torch.randn(6, 10) if kind == "linear" else torch.randn(2, 3, 5, 5)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y1, y2 = layer(x1), ref(x2)
    y1.sum().backward()
    y2.sum().backward()
    assert torch.equal(y1, y2) and torch.equal(x1.grad, x2.grad)
    assert torch.equal(dense.weight.grad, ref.weight.grad) and torch.equal(dense.bias.grad, ref.bias.grad)


def test_first_layer_input_without_grad_and_frozen_weight():
    layer = SWATConv2d(2, 3, 3, padding=1, sparsity=0.5)
    x = torch.randn(2, 2, 6, 6)  # no input gradient: the first layer of a network
    layer(x).sum().backward()
    assert layer.weight.grad is not None
    layer.weight.requires_grad_(False)
    x = torch.randn(2, 2, 6, 6, requires_grad=True)
    layer(x).sum().backward()  # frozen weight: nothing stored for dW, input gradient still right
    expected = torch.autograd.grad(F.conv2d(x, layer.weight * layer.weight_mask(), layer.bias, 1, 1).sum(), x)[0]
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-6)


def test_structured_keeps_whole_channels():
    torch.manual_seed(3)
    dense = nn.Linear(20, 10)
    W = dense.weight.detach().clone()
    layer = SWATLinear.from_dense(dense, sparsity=0.6, structured=True)
    x = torch.randn(8, 20, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    rows = W.norm(dim=1).argsort(descending=True)[:4]  # 40% of the 10 output channels
    cols = x.detach().norm(dim=0).argsort(descending=True)[:8]  # 40% of the 20 input features
    w_mask = torch.zeros(10, 1, dtype=torch.bool)
    w_mask[rows] = True
    a_mask = torch.zeros(1, 20, dtype=torch.bool)
    a_mask[:, cols] = True
    assert torch.equal(layer.weight_mask(), w_mask.expand(10, 20))
    torch.testing.assert_close(y, F.linear(x.detach(), W * w_mask, dense.bias.detach()), rtol=0, atol=1e-6)
    torch.testing.assert_close(dense.weight.grad, g.t() @ (x.detach() * a_mask), rtol=1e-5, atol=1e-6)
    assert layer.last_stats["activation_density"] == pytest.approx(0.4)


def test_threshold_reused_between_refreshes():
    torch.manual_seed(4)
    layer = SWATLinear(50, 20, sparsity=0.9, topk_period=3)
    x = torch.randn(4, 50)
    layer(x)  # step 0: thresholds computed
    thr = layer._w_threshold.clone()
    with torch.no_grad():
        layer.weight.mul_(2.0)  # every magnitude doubles: the old threshold now keeps far more
    layer(x)  # step 1: reused
    assert torch.equal(layer._w_threshold, thr)
    assert layer.last_stats["weight_density"] > 0.2
    layer(x)  # step 2: reused
    layer(x)  # step 3: refreshed -> exactly 10% again
    assert layer.last_stats["weight_density"] == pytest.approx(0.1)
    assert int(layer.swat_step) == 4


def test_warmup_ramps_the_sparsity():
    layer = SWATLinear(100, 10, sparsity=0.8, warmup_steps=4)
    x = torch.randn(8, 100)
    densities = []
    for _ in range(6):
        layer(x)
        densities.append(layer.last_stats["weight_density"])
    assert densities == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.2, 0.2])


def test_eval_uses_exact_topk_weights_without_touching_the_step():
    layer = SWATLinear(30, 5, sparsity=0.7).eval()
    x = torch.randn(3, 30)
    expected = F.linear(x, layer.weight * topk_mask(layer.weight, 0.3), layer.bias)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)
    assert int(layer.swat_step) == 0


# ------------------------------------------------------------------------- memory, measured


def test_saved_bytes_match_the_closed_form():
    torch.manual_seed(5)
    layer = SWATLinear(256, 64, sparsity=0.8)
    x = torch.randn(128, 256, requires_grad=True)
    with track_saved_tensors(layer) as saved:
        y = layer(x)
    nnz = int(topk_mask(x, 0.2).sum())
    # values (float32) + activation bits + weight-mask bits; the weight itself is a parameter
    assert saved.total_bytes == 4 * nnz + math.ceil(x.numel() / 8) + math.ceil(layer.weight.numel() / 8)
    dense = nn.Linear(256, 64)
    with track_saved_tensors(dense) as saved_dense:
        dense(x)
    assert saved_dense.total_bytes == 4 * x.numel()
    assert saved.total_bytes / saved_dense.total_bytes == pytest.approx(0.2 + 1 / 32 + 64 / 128 / 32, abs=1e-3)
    y.sum().backward()


def test_bncnn_whole_model_memory_drops_only_with_compact_relu():
    x = torch.randn(16, 1, 28, 28)

    def total(**kw):
        torch.manual_seed(0)
        model = BNCNN(width=8)
        if kw:
            apply_swat(model, 0.8, **kw)
        with track_saved_tensors(model) as saved:
            model(x).sum().backward()
        return saved

    dense, plain, compact = total(), total(compact_relu=False), total(compact_relu=True)
    # ReLU keeps its dense output, the next layer's input: SWAT's compact copy comes on top of it.
    assert plain.total_bytes > dense.total_bytes
    assert compact.total_bytes < 0.9 * dense.total_bytes
    # What each converted layer holds for its own backward drops by ~75% (closed form ~0.23).
    for name in ("features.3", "features.7", "features.10"):
        assert compact.held_by_module[name] < 0.25 * dense.held_by_module[name]


# ------------------------------------------------------------------------- FLOPs


def test_flop_rule_counts_sparse_forward_and_backward():
    layer = SWATLinear(64, 32, sparsity=0.75)
    x = torch.randn(10, 64, requires_grad=True)
    count = count_flops(layer, x)
    dense_fwd = 2 * 64 * 32 * 10
    assert count.forward == pytest.approx(dense_fwd * 0.25)
    a_density = layer.last_stats["activation_density"]
    assert count.backward == pytest.approx(dense_fwd * 0.25 + dense_fwd * a_density)
    assert a_density == pytest.approx(0.25, abs=0.01)


def test_bncnn_training_flops_drop_about_as_the_paper_counts():
    model = apply_swat(BNCNN(width=16), 0.8)
    dense = BNCNN(width=16)
    x = torch.randn(8, 1, 28, 28)
    ratio = count_flops(model, x).total / count_flops(dense, x).total
    assert 0.2 < ratio < 0.35  # 80% of the convertible work removed, the dense first layer and BN stay


# ------------------------------------------------------------------------- distributions and surgery


def test_erk_densities_keep_the_budget_and_follow_the_formula():
    shapes = {"a": (64, 32, 3, 3), "b": (128, 64, 3, 3), "c": (10, 128)}
    for density in (0.1, 0.2, 0.5):
        d = erk_densities(shapes, density)
        numel = {k: math.prod(s) for k, s in shapes.items()}
        kept = sum(d[k] * numel[k] for k in shapes)
        assert kept == pytest.approx(density * sum(numel.values()))
        free = [k for k in shapes if d[k] < 1]
        ratios = {k: d[k] / (sum(shapes[k]) / numel[k]) for k in free}
        assert max(ratios.values()) == pytest.approx(min(ratios.values()))  # one epsilon for all
    assert erk_densities(shapes, 1.0) == {"a": 1.0, "b": 1.0, "c": 1.0}


def test_apply_swat_uniform_and_erk():
    model = BNCNN(width=8)
    first = model.features[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    params_before = [id(p) for p in model.parameters()]
    apply_swat(model, 0.8, optimizers=opt)
    assert model.features[0] is first  # the first layer stays dense
    assert [id(p) for p in model.parameters()] == params_before  # same Parameters: the optimizer still works
    assert [id(p) for g in opt.param_groups for p in g["params"]] == params_before
    # the first layer and the classifier head stay dense (dense_first_layer, dense_last_layer)
    assert [n for n, _ in swat_layers(model)] == ["features.3", "features.7", "features.10"]
    assert type(model.classifier) is nn.Linear
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    erk = apply_swat(BNCNN(width=8), 0.8, distribution="erk", dense_last_layer=False)
    assert [n for n, _ in swat_layers(erk)] == ["features.3", "features.7", "features.10", "classifier"]
    rows = swat_summary(erk)
    numel = [math.prod(r["weight_shape"]) for r in rows]
    kept = sum((1 - r["sparsity"]) * n for r, n in zip(rows, numel))
    assert kept == pytest.approx(0.2 * sum(numel))
    assert rows[-1]["sparsity"] < rows[1]["sparsity"]  # the small classifier stays denser


def test_apply_swat_layers_and_set_sparsity():
    model = MLPClassifier(20, 16, 3)
    apply_swat(model, 0.5, layers=["net.0"])
    assert isinstance(model.net[0], SWATLinear) and type(model.net[3]) is nn.Linear
    set_swat_sparsity(model, 0.9)
    assert model.net[0].sparsity == 0.9 and model.net[0].activation_sparsity == 0.9


def test_training_reduces_loss_and_export_matches_eval():
    torch.manual_seed(6)
    x, y = torch.randn(256, 20), torch.randint(0, 3, (256,))
    x[y == 1] += 2.0
    x[y == 2] -= 2.0
    model = apply_swat(MLPClassifier(20, 32, 3), 0.7, dense_first_layer=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    model.eval()
    expected = model(x)
    pruned = export_pruned(model)
    assert not swat_layers(pruned) and not any(isinstance(m, CompactReLU) for m in pruned.modules())
    torch.testing.assert_close(pruned(x), expected)
    w = pruned.net[0].weight
    assert (w == 0).float().mean() == pytest.approx(0.7, abs=0.01)


def test_state_dict_roundtrip_resumes_the_warmup():
    a = apply_swat(MLPClassifier(8, 8, 2), 0.5, warmup_steps=10, dense_first_layer=False)
    for _ in range(3):
        a(torch.randn(4, 8))
    b = apply_swat(MLPClassifier(8, 8, 2), 0.5, warmup_steps=10, dense_first_layer=False)
    b.load_state_dict(a.state_dict())
    assert int(b.net[0].swat_step) == 3
    assert b.net[0].current_sparsity() == a.net[0].current_sparsity()


# ------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,match", [
    ({"sparsity": 1.0}, r"'sparsity' parameter of apply_swat.*Got 1.0"),
    ({"sparsity": -0.1}, r"'sparsity' parameter of apply_swat.*Got -0.1"),
    ({"topk_period": 0}, r"'topk_period' parameter of apply_swat.*Got 0"),
    ({"distribution": "erdos"}, r"'distribution' parameter of apply_swat.*Got 'erdos'"),
    ({"activation_sparsity": 1.5}, r"'activation_sparsity' parameter of apply_swat.*Got 1.5"),
    ({"dense_last_layer": "no"}, r"'dense_last_layer' parameter of apply_swat.*Got 'no'"),
])
def test_apply_swat_bad_parameters(kwargs, match):
    model = BNCNN(width=4)
    with pytest.raises(InvalidParameterError, match=match):
        apply_swat(model, **{"sparsity": 0.8, **kwargs})
    assert not swat_layers(model)  # nothing changed


def test_unsupported_layer_lists_the_supported_ones():
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Linear(4, 4))
    with pytest.raises(InvalidParameterError, match=r"'layers \('0'\)'.*torch.nn.Linear, torch.nn.Conv2d.*Conv1d"):
        apply_swat(model, layers=["0"])
    with pytest.raises(InvalidParameterError, match=r"'layers' parameter.*must name submodules.*'nope'"):
        apply_swat(model, layers=["nope"])
    with pytest.raises(InvalidParameterError, match=r"'module' parameter of SWATLinear.from_dense.*Conv1d"):
        SWATLinear.from_dense(nn.Conv1d(2, 3, 3))
    with pytest.raises(InvalidParameterError, match=r"'padding_mode'.*'zeros'.*'reflect'"):
        SWATConv2d.from_dense(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"))


def test_nothing_to_convert():
    with pytest.raises(InvalidParameterError, match=r"'model' parameter of apply_swat has nothing to convert.*no torch.nn"):
        apply_swat(nn.Sequential(nn.ReLU(), nn.Conv1d(2, 2, 1)))
    with pytest.raises(InvalidParameterError, match=r"nothing to convert.*besides the first"):
        apply_swat(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
    with pytest.raises(InvalidParameterError, match=r"nothing to convert.*besides the first.*and the output head.*"
                                                     r"dense_last_layer=True"):
        apply_swat(nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2)))
    model = apply_swat(BNCNN(width=4))
    with pytest.raises(InvalidParameterError, match=r"nothing to convert.*converted already"):
        apply_swat(model)
    with pytest.raises(InvalidParameterError, match=r"'model' parameter of apply_swat must be an instance"):
        apply_swat("model")
    with pytest.raises(InvalidParameterError, match=r"'sparsity' parameter of SWATLinear.*Got 1"):
        SWATLinear(3, 3, sparsity=1)


def test_structured_conv_keeps_whole_filters_and_input_channels():
    torch.manual_seed(7)
    dense = nn.Conv2d(8, 6, 3, padding=1, bias=False)
    W = dense.weight.detach().clone()
    layer = SWATConv2d.from_dense(dense, sparsity=0.5, structured=True)
    x = torch.randn(4, 8, 7, 7, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    filters = W.flatten(1).norm(dim=1).argsort(descending=True)[:3]  # 3 of 6 output channels
    channels = x.detach().transpose(0, 1).flatten(1).norm(dim=1).argsort(descending=True)[:4]  # 4 of 8 inputs
    w_mask = torch.zeros(6, 1, 1, 1, dtype=torch.bool)
    w_mask[filters] = True
    a_mask = torch.zeros(1, 8, 1, 1, dtype=torch.bool)
    a_mask[:, channels] = True
    torch.testing.assert_close(y, F.conv2d(x.detach(), W * w_mask, None, 1, 1), rtol=0, atol=1e-5)
    Wr = W.clone().requires_grad_(True)
    F.conv2d(x.detach() * a_mask, Wr, None, 1, 1).backward(g)
    torch.testing.assert_close(dense.weight.grad, Wr.grad, rtol=1e-5, atol=1e-5)
    xr = x.detach().clone().requires_grad_(True)
    F.conv2d(xr, W * w_mask, None, 1, 1).backward(g)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    with track_saved_tensors(layer) as saved:
        layer(x)
    # the 4 kept channels (float32) + their int64 indices + the weight-mask bits
    assert saved.total_bytes == 4 * 4 * 4 * 7 * 7 + 4 * 8 + math.ceil(W.numel() / 8)


def test_ties_at_the_threshold_are_broken_to_the_exact_count():
    """Standardised images: every background pixel has the same magnitude. A threshold landing on
    that value must not keep them all."""
    torch.manual_seed(8)
    x = torch.full((32, 100), -0.8)
    x[:, :30] = torch.randn(32, 30) * 2  # 30% "foreground" pixels
    layer = SWATLinear(100, 4, sparsity=0.5)  # keep 50%: the threshold falls on the background value
    layer(x)
    assert layer.last_stats["activation_density"] == pytest.approx(0.5, abs=0.01)
