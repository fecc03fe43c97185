"""Structured SWAT (``apply_structured_swat``): whole channels by SWAT's top-K rule, computed with
smaller dense matmuls. Checked against brute force: a dense layer whose non-kept output channels
are zeroed (forward, input gradient) and whose weight gradient sees the activation with the
non-kept input channels zeroed; the kept channels against a sort of the norms; the masked
``apply_swat(structured=True)`` as a second reference; bad input; a small third-party-like model
(conversion, training, state_dict round trip, export)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leanscale.core.errors import InvalidParameterError
from leanscale.core.flops import count_flops
from leanscale.sparse import (
    StructuredSWATConv2d,
    StructuredSWATLinear,
    apply_structured_swat,
    apply_swat,
    export_pruned,
    swat_layers,
    top_channels,
)
from leanscale.sparse.report import swat_conversion_report

pytestmark = pytest.mark.usefixtures("one_thread")


def brute_top(scores: torch.Tensor, density: float) -> list[int]:
    """The K = max(1, round(density * n)) largest scores' indices, by a full sort, ascending."""
    n = scores.numel()
    k = max(1, min(n, round(density * n)))
    order = sorted(range(n), key=lambda i: -float(scores[i]))
    return sorted(order[:k])


def masked_reference(layer: nn.Module, x: torch.Tensor, g: torch.Tensor, w_sparsity: float, a_sparsity: float):
    """Output, dL/dx, dL/dW, dL/db of the masked dense layer, all by brute force (float64)."""
    w = layer.weight.detach().double()
    b = None if layer.bias is None else layer.bias.detach().double()
    x = x.detach().double()
    is_conv = w.dim() == 4
    rows = brute_top(torch.tensor([float(w[i].pow(2).sum()) for i in range(w.shape[0])]), 1 - w_sparsity)
    cdim = 1 if is_conv else x.dim() - 1
    xs = x.movedim(cdim, 0)
    cols = brute_top(torch.tensor([float(xs[c].pow(2).sum()) for c in range(xs.shape[0])]), 1 - a_sparsity)
    row_mask = torch.zeros(w.shape[0], dtype=torch.double)
    row_mask[rows] = 1
    col_mask = torch.zeros(x.shape[cdim], dtype=torch.double)
    col_mask[cols] = 1
    w_masked = w * row_mask.view(-1, *[1] * (w.dim() - 1))
    x_masked = x * (col_mask.view(1, -1, 1, 1) if is_conv else col_mask)
    xr = x.clone().requires_grad_()
    wr = w_masked.clone().requires_grad_()
    if is_conv:
        kw = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
        y = F.conv2d(xr, wr, b, **kw)
        (gx,) = torch.autograd.grad(y, xr, g.double())
        gw = torch.nn.grad.conv2d_weight(x_masked, w.shape, g.double(), **kw)  # g^T * x with x's dropped channels zeroed
        gb = g.double().sum((0, 2, 3))
    else:
        y = F.linear(xr, wr, b)
        (gx,) = torch.autograd.grad(y, xr, g.double())
        g2 = g.double().reshape(-1, w.shape[0])
        gw = g2.t() @ x_masked.reshape(-1, w.shape[1])
        gb = g2.sum(0)
    return y.detach(), gx, gw, gb, rows, cols


def run_layer(layer, x, g):
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(g)
    return y.detach(), x.grad, layer.weight.grad, None if layer.bias is None else layer.bias.grad


@pytest.mark.parametrize("w_sparsity,a_sparsity", [(0.5, 0.5), (0.75, 0.3), (0.9, 0.0), (0.0, 0.6)])
def test_linear_equals_masked_dense_layer(w_sparsity, a_sparsity):
    torch.manual_seed(0)
    dense = nn.Linear(24, 20)
    layer = StructuredSWATLinear.from_dense(copy.deepcopy(dense), sparsity=w_sparsity, activation_sparsity=a_sparsity)
    x, g = torch.randn(6, 5, 24), torch.randn(6, 5, 20)  # extra leading dims too
    y, gx, gw, gb = run_layer(layer, x, g)
    y_ref, gx_ref, gw_ref, gb_ref, rows, cols = masked_reference(dense, x, g, w_sparsity, a_sparsity)
    for got, ref in ((y, y_ref), (gx, gx_ref), (gw, gw_ref), (gb, gb_ref)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    # the dropped output rows still get a gradient (SWAT: pruned weights keep learning) ...
    dropped = sorted(set(range(20)) - set(rows))
    if dropped:
        assert gw[dropped][:, cols].abs().sum() > 0
    # ... while the input columns left out of the activation get none this step
    assert gw[:, sorted(set(range(24)) - set(cols))].abs().sum() == 0
    assert layer.last_stats == {"weight_density": len(rows) / 20, "activation_density": len(cols) / 24}


@pytest.mark.parametrize("stride,padding,bias", [(1, 1, True), (2, 0, False)])
def test_conv_equals_masked_dense_layer(stride, padding, bias):
    torch.manual_seed(1)
    dense = nn.Conv2d(6, 10, 3, stride=stride, padding=padding, bias=bias)
    layer = StructuredSWATConv2d.from_dense(copy.deepcopy(dense), sparsity=0.6, activation_sparsity=0.5)
    x = torch.randn(3, 6, 9, 9)
    g = torch.randn_like(dense(x))
    y, gx, gw, gb = run_layer(layer, x, g)
    y_ref, gx_ref, gw_ref, gb_ref, rows, cols = masked_reference(dense, x, g, 0.6, 0.5)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx.double(), gx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw.double(), gw_ref, rtol=1e-5, atol=1e-5)
    if bias:
        torch.testing.assert_close(gb.double(), gb_ref, rtol=1e-5, atol=1e-5)
    assert layer.last_stats == {"weight_density": len(rows) / 10, "activation_density": len(cols) / 6}


def test_kept_channels_are_the_brute_force_top_k():
    torch.manual_seed(2)
    for n, density in ((7, 0.5), (100, 0.3), (64, 0.1), (5, 0.01), (9, 1.0)):
        scores = torch.rand(n)
        assert top_channels(scores, density).tolist() == brute_top(scores, density)
    layer = StructuredSWATLinear(30, 40, sparsity=0.7)
    norms = layer.weight.detach().norm(dim=1)
    assert layer.kept_output_channels().tolist() == brute_top(norms, 0.3)
    rows = layer.weight_mask().all(dim=1)
    assert rows.nonzero().flatten().tolist() == brute_top(norms, 0.3)
    assert not layer.weight_mask()[~rows].any()  # whole rows, nothing else


def test_same_as_the_masked_structured_swat_on_a_model():
    """The masked implementation (apply_swat(structured=True)) computes the same math with
    full-size kernels: outputs and every gradient agree over a few training steps. (The masked
    one keeps every channel at or above a threshold, so exact ties of channel norms keep more
    than K there: Tanh, not ReLU, and convolutions without bias, whose dropped channels are 0 --
    ties at 0 add nothing to the weight gradient -- instead of a constant bias.)"""
    torch.manual_seed(3)
    conv = lambda i, o: nn.Conv2d(i, o, 3, padding=1, bias=False)  # noqa: E731
    base = nn.Sequential(conv(3, 8), nn.Tanh(), conv(8, 12), nn.Tanh(), conv(12, 12), nn.Tanh(), nn.Flatten(),
                         nn.Linear(12 * 36, 32), nn.Tanh(), nn.Linear(32, 5))
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    apply_structured_swat(a, 0.5)
    apply_swat(b, 0.5, structured=True, compact_relu=False)
    assert [n for n, _ in swat_layers(a)] == [n for n, _ in swat_layers(b)] == ["2", "4", "7"]
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.05), torch.optim.SGD(b.parameters(), lr=0.05)
    for step in range(3):
        x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 5, (8,))
        for net, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=f"{name} at step {step}")
        opt_a.step()
        opt_b.step()


def test_eval_forward_uses_the_kept_channels_and_flops_shrink():
    torch.manual_seed(4)
    dense = nn.Linear(16, 32)
    layer = StructuredSWATLinear.from_dense(copy.deepcopy(dense), sparsity=0.75).eval()
    x = torch.randn(5, 16)
    rows = brute_top(dense.weight.detach().norm(dim=1), 0.25)
    mask = torch.zeros(32, 1)
    mask[rows] = 1
    torch.testing.assert_close(layer(x), F.linear(x, dense.weight * mask, dense.bias))
    # the cost ledger counts the reduced matmuls: forward, input gradient and weight gradient
    net = nn.Sequential(nn.Linear(8, 16), StructuredSWATLinear(16, 32, sparsity=0.75, activation_sparsity=0.5))
    flops = count_flops(net.train(), torch.randn(5, 8))
    dense_fwd = 2 * 16 * 32 * 5
    assert flops.forward == pytest.approx(2 * 8 * 16 * 5 + dense_fwd * 0.25)
    assert flops.backward == pytest.approx(2 * 8 * 16 * 5 + dense_fwd * 0.25 + dense_fwd * 0.5)


@pytest.mark.parametrize("kwargs,param", [
    ({"sparsity": 1.0}, "sparsity"), ({"sparsity": -0.1}, "sparsity"), ({"sparsity": float("nan")}, "sparsity"),
    ({"sparsity": "0.5"}, "sparsity"), ({"sparsity": True}, "sparsity"),
    ({"activation_sparsity": 1.5}, "activation_sparsity"), ({"topk_period": 0}, "topk_period"),
    ({"warmup_steps": -1}, "warmup_steps"), ({"dense_first_layer": "yes"}, "dense_first_layer"),
    ({"layers": ["1"]}, "layers"), ({"layers": ["nope"]}, "layers"), ({"layers": []}, "layers"),
    ({"layers": ["3"]}, "layers"),
])
def test_bad_arguments_name_the_parameter(kwargs, param):
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 8), nn.Conv2d(2, 4, 3, groups=2),
                          nn.Linear(8, 2))
    kwargs = {"sparsity": 0.5, **kwargs}
    with pytest.raises(InvalidParameterError, match=f"'{param}' parameter of apply_structured_swat"):
        apply_structured_swat(model, **kwargs)
    assert type(model[2]) is nn.Linear  # nothing converted


def test_bad_models_and_layers():
    with pytest.raises(InvalidParameterError, match="'model' parameter of apply_structured_swat must be an instance"):
        apply_structured_swat(torch.randn(3), 0.5)
    with pytest.raises(InvalidParameterError, match="'model' parameter .* nothing to convert.*kept dense"):
        apply_structured_swat(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), 0.5)
    model = apply_structured_swat(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)), 0.5)
    with pytest.raises(InvalidParameterError, match="converted already"):
        apply_structured_swat(model, 0.5)
    with pytest.raises(InvalidParameterError, match="'groups' parameter of StructuredSWATConv2d"):
        StructuredSWATConv2d(4, 4, 3, groups=2)
    with pytest.raises(InvalidParameterError, match="'sparsity' parameter of StructuredSWATLinear"):
        StructuredSWATLinear(4, 4, sparsity=1.0)
    with pytest.raises(InvalidParameterError, match="'x' parameter of SWATLinear must be a floating tensor of shape"):
        StructuredSWATLinear(4, 4)(torch.randn(2, 5))
    with pytest.raises(InvalidParameterError, match="'density' parameter of top_channels"):
        top_channels(torch.rand(4), 0.0)
    with pytest.raises(InvalidParameterError, match="'scores' parameter of top_channels"):
        top_channels(torch.rand(2, 2), 0.5)


class ThirdPartyNet(nn.Module):
    """A small user model: conv/BN/ReLU blocks, a depthwise conv (left dense), an MLP head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.MaxPool2d(2), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 32), nn.ReLU(), nn.Linear(32, 3))

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


def test_third_party_model_trains_round_trips_and_exports():
    torch.manual_seed(5)
    model = apply_structured_swat(ThirdPartyNet(), 0.5)
    assert {n: type(m).__name__ for n, m in swat_layers(model)} == {
        "body.0": "StructuredSWATConv2d", "body.7": "StructuredSWATConv2d", "head.1": "StructuredSWATLinear"}
    skipped = {r["layer"]: r["reason"] for r in swat_conversion_report(model)["skipped"]}
    assert "first layer" in skipped["stem.0"] and "head" in skipped["head.3"]
    assert "grouped convolution" in skipped["body.3"]
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 3, (32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    # state_dict round trip into a freshly converted model: same outputs, same kept channels
    model.eval()
    fresh = apply_structured_swat(ThirdPartyNet(), 0.5).eval()
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x), model(x))
    assert fresh.body[0].kept_output_channels().tolist() == model.body[0].kept_output_channels().tolist()
    # export: plain layers, zero rows, the same eval outputs
    expected = model(x)
    pruned = export_pruned(model)
    assert not swat_layers(pruned) and type(pruned.body[0]) is nn.Conv2d and type(pruned.head[1]) is nn.Linear
    kept = pruned.body[0].weight.detach().flatten(1).abs().sum(1) > 0
    assert int(kept.sum()) == 8  # half of 16 filters
    torch.testing.assert_close(pruned(x), expected)


def test_per_layer_settings_by_two_calls():
    """The recipe of the card: the first layer's activation kept whole (raw pixels), the rest
    at the full sparsity. The second call converts what the first left and records both."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    apply_structured_swat(model, 0.75, layers=["1"], activation_sparsity=0.0)
    apply_structured_swat(model, 0.75)  # "1" is converted already (and is the first layer): "3", head dense
    assert {n: (m.sparsity, m.activation_sparsity) for n, m in swat_layers(model)} == {
        "1": (0.75, 0.0), "3": (0.75, 0.75)}
    model(torch.randn(8, 6, 6)).sum().backward()
    assert model[1].last_stats == {"weight_density": 0.25, "activation_density": 1.0}
    assert model[3].last_stats == {"weight_density": 0.25, "activation_density": 0.25}
