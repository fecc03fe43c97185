"""Structured SWAT (``apply_structured_swat``): whole channels by SWAT's top-K rule, computed with
smaller dense matmuls. Checked against brute force: a dense layer whose non-kept output channels
are zeroed (forward, input gradient) and whose weight gradient sees the activation with the
non-kept input channels zeroed; the kept channels against a sort of the norms; the masked
``apply_swat(structured=True)`` as a second reference; bad input; a small third-party-like model
(conversion, training, state_dict round trip, export). ``selection="sampled"``: the layer against
the same masked dense layer built from the channels it chose, the chosen channels against the
rule replayed under the same seed, the sampling frequencies against the rule's closed form, every
channel chosen over a few steps (and top-K's dead filters on a BatchNorm CNN; on an MLP, dropped
rows whose ReLU is open keep learning and rotate back in), determinism."""

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
from leanscale.sparse.swat_structured import _channel_scores, _sampled_channels

pytestmark = pytest.mark.usefixtures("one_thread")


def brute_top(scores: torch.Tensor, density: float) -> list[int]:
    """The K = max(1, round(density * n)) largest scores' indices, by a full sort, ascending."""
    n = scores.numel()
    k = max(1, min(n, round(density * n)))
    order = sorted(range(n), key=lambda i: -float(scores[i]))
    return sorted(order[:k])


def masked_reference(layer: nn.Module, x: torch.Tensor, g: torch.Tensor, w_sparsity: float, a_sparsity: float,
                     rows: list[int] | None = None, cols: list[int] | None = None):
    """Output, dL/dx, dL/dW, dL/db of the masked dense layer, all by brute force (float64); kept
    rows / input channels by a full sort of the norms unless given."""
    w = layer.weight.detach().double()
    b = None if layer.bias is None else layer.bias.detach().double()
    x = x.detach().double()
    is_conv = w.dim() == 4
    if rows is None:
        rows = brute_top(torch.tensor([float(w[i].pow(2).sum()) for i in range(w.shape[0])]), 1 - w_sparsity)
    cdim = 1 if is_conv else x.dim() - 1
    xs = x.movedim(cdim, 0)
    if cols is None:
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
    ({"layers": ["3"]}, "layers"), ({"selection": "random"}, "selection"), ({"selection": None}, "selection"),
    ({"explore": 0.5}, "explore"),  # with the default selection="topk"
    ({"selection": "sampled", "explore": 0.0}, "explore"), ({"selection": "sampled", "explore": 1.5}, "explore"),
    ({"selection": "sampled", "explore": "0.5"}, "explore"), ({"selection": "sampled", "explore": True}, "explore"),
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


# --- selection="sampled"

def test_sampled_rule_keeps_the_top_and_draws_the_rest_uniformly():
    """K - R top channels in every draw; each other channel with probability R / (n - K + R)."""
    torch.manual_seed(7)
    n, draws = 20, 2000
    scores = torch.rand(n)
    for density, explore in ((0.4, 0.5), (0.4, 1.0), (0.25, 0.2)):
        k = round(density * n)
        r = round(explore * k)
        top = brute_top(scores, (k - r) / n) if k > r else []
        counts = torch.zeros(n)
        for _ in range(draws):
            idx = _sampled_channels(scores, density, explore)
            assert idx.tolist() == sorted(set(idx.tolist())) and idx.numel() == k  # K distinct, ascending
            assert set(top) <= set(idx.tolist())
            counts[idx] += 1
        rest = sorted(set(range(n)) - set(top))
        assert (counts[top] == draws).all()
        p = r / len(rest)
        freq = counts[rest] / draws
        sd = (p * (1 - p) / draws) ** 0.5
        assert (freq - p).abs().max() < 5 * sd, (density, explore, freq, p)
        assert freq.min() > 0  # every channel chosen
    assert _sampled_channels(scores, 1.0, 0.5).tolist() == list(range(n))  # K == n: all, no draw


@pytest.mark.parametrize("conv", [False, True])
def test_sampled_layer_equals_the_masked_dense_layer_with_its_channels(conv):
    """The layer computes the masked dense layer's output and gradients for the channels it
    chose: the top-K output channels of the weights (as with "topk") and the input channels the
    rule draws, replayed here under the same seed."""
    torch.manual_seed(8)
    if conv:
        dense = nn.Conv2d(8, 12, 3, padding=1)
        x = torch.randn(4, 8, 7, 7)
    else:
        dense = nn.Linear(24, 20)
        x = torch.randn(6, 5, 24)
    g = torch.randn_like(dense(x))
    layer = (StructuredSWATConv2d if conv else StructuredSWATLinear).from_dense(
        copy.deepcopy(dense), sparsity=0.5, activation_sparsity=0.5, selection="sampled", explore=0.5)
    torch.manual_seed(123)
    y, gx, gw, gb = run_layer(layer, x, g)
    out_idx, in_idx = layer.last_channels
    w_top = brute_top(dense.weight.detach().flatten(1).pow(2).sum(1), 0.5)
    assert out_idx.tolist() == w_top
    torch.manual_seed(123)  # replay the rule
    assert in_idx.tolist() == _sampled_channels(_channel_scores(x, 1 if conv else 2), 0.5, 0.5).tolist()
    xs = x.movedim(1 if conv else 2, 0).flatten(1).pow(2).sum(1)
    assert in_idx.tolist() != brute_top(xs, 0.5)  # a random share: not the plain top-K (for this seed)
    ref = masked_reference(dense, x, g, 0.5, 0.5, rows=out_idx.tolist(), cols=in_idx.tolist())
    for got, want in zip((y, gx, gw, gb), ref[:4]):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert "selection='sampled', explore=0.5" in repr(layer)


def columns_that_learned(selection: str, steps: int = 40) -> tuple[torch.Tensor, list]:
    """Train a small MLP whose first 3 input features have 3x the scale of the other 9 (the
    bright pixels of an image) at 75% structured sparsity; which weight columns of the first
    layer ever got a gradient, and the final weights."""
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    apply_structured_swat(model, 0.75, dense_first_layer=False, selection=selection,
                          explore=None if selection == "topk" else 0.5)
    scale = torch.tensor([3.0] * 3 + [1.0] * 9)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    learned = torch.zeros(12, dtype=torch.bool)
    for _ in range(steps):
        x, y = torch.randn(16, 12) * scale, torch.randint(0, 4, (16,))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        learned |= model[0].weight.grad.abs().sum(0) > 0
        opt.step()
    return learned, [p.detach().clone() for p in model.parameters()]


def test_sampled_every_input_column_learns_where_topk_starves_them():
    """The MLP's failure on raw pixels: with "topk" the 3 large features win every batch and the
    other 9 weight columns never get a gradient; with "sampled" every column does within 40
    steps (each of the 11 non-top columns with probability 2/11 per step)."""
    learned, _ = columns_that_learned("topk")
    assert learned.tolist() == [True] * 3 + [False] * 9
    learned, _ = columns_that_learned("sampled")
    assert learned.all()


def test_sampled_is_deterministic_under_a_seed():
    a, b = columns_that_learned("sampled", steps=4)[1], columns_that_learned("sampled", steps=4)[1]
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    scores = torch.arange(64.0)
    draws = {}
    for seed in (10, 10, 11):
        torch.manual_seed(seed)
        draws.setdefault(seed, []).append(_sampled_channels(scores, 0.25, 0.5).tolist())
    assert draws[10][0] == draws[10][1] != draws[11][0]


def bn_cnn() -> nn.Module:
    def block(i, o):
        return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]
    return nn.Sequential(*block(1, 8), *block(8, 16), *block(16, 16), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 4))


def test_sampled_settings_are_recorded_and_validated_per_layer():
    model = apply_structured_swat(bn_cnn(), 0.5, selection="sampled")
    assert {(m.selection, m.explore) for _, m in swat_layers(model)} == {("sampled", 0.5)}
    assert swat_conversion_report(model)["settings"]["selection"] == "sampled"
    model = apply_structured_swat(bn_cnn(), 0.5)
    assert {(m.selection, m.explore) for _, m in swat_layers(model)} == {("topk", 0.0)}
    with pytest.raises(InvalidParameterError, match="'selection' parameter of StructuredSWATConv2d"):
        StructuredSWATConv2d(4, 4, 3, selection="top")
    with pytest.raises(InvalidParameterError, match="'explore' parameter of StructuredSWATLinear must be None"):
        StructuredSWATLinear(4, 4, explore=0.3)


# --- selection="unbiased"

@pytest.mark.parametrize("conv", [False, True])
def test_unbiased_weight_gradient_is_the_dense_one_in_expectation(conv):
    """Exact, not Monte Carlo: with n = 6 input channels, K = 4, R = 2 (top 2 always), each of
    the C(4, 2) = 6 draws of the rest is equally likely; the layer's weight gradient for a draw
    equals the masked reference (its channels, drawn columns scaled by 4 / 2), and the average
    over the 6 draws is the dense layer's weight gradient."""
    import itertools

    torch.manual_seed(11)
    dense = nn.Conv2d(6, 5, 3, padding=1) if conv else nn.Linear(6, 5)
    x = torch.randn(4, 6, 5, 5) if conv else torch.randn(7, 6)
    g = torch.randn_like(dense(x))
    xd = x.clone().requires_grad_()
    dense(xd).backward(g)
    dense_gw = dense.weight.grad.double()
    layer = (StructuredSWATConv2d if conv else StructuredSWATLinear).from_dense(
        copy.deepcopy(dense), sparsity=0.0, activation_sparsity=1 / 3, selection="unbiased", explore=0.5)
    xs = x.movedim(1, 0).flatten(1).pow(2).sum(1)
    top = brute_top(xs, 2 / 6)
    rest = sorted(set(range(6)) - set(top))
    seen, total = set(), torch.zeros_like(dense_gw)
    for seed in range(60):  # the layer's own draws cover all 6 subsets; check each against brute force
        torch.manual_seed(seed)
        layer.weight.grad = None
        _, _, gw, _ = run_layer(layer, x, g)
        cols = layer.last_channels[1].tolist()
        drawn = tuple(sorted(set(cols) - set(top)))
        assert set(top) <= set(cols) and len(drawn) == 2
        ref = masked_reference(dense, x, g, 0.0, 1 / 3, rows=list(range(5)), cols=cols)[2]
        ref[:, list(drawn)] *= len(rest) / 2
        torch.testing.assert_close(gw.double(), ref, rtol=1e-5, atol=1e-5)
        if drawn not in seen:
            seen.add(drawn)
            total += gw.double()
    assert seen == set(itertools.combinations(rest, 2))
    torch.testing.assert_close(total / len(seen), dense_gw, rtol=1e-5, atol=1e-5)


def test_topk_on_a_bn_cnn_trains_exactly_its_narrow_subnetwork():
    """The diagnosis behind the card's narrow baseline: under BatchNorm + ReLU a dropped filter's
    output is a constant, BatchNorm maps it to beta = 0 and the ReLU's gradient there is 0, so the
    dropped filters get exactly zero gradient and never return. Structured SWAT (first converted
    conv's input whole) then trains the same numbers as the dense net cut to the kept filters at
    step 1, checked over SGD-momentum steps against that net built by hand."""
    torch.manual_seed(5)
    full = bn_cnn()
    convs = [0, 3, 6]  # the three convs of bn_cnn: 1 -> 8 (dense), 8 -> 16, 16 -> 16
    keep = [torch.arange(8)] + [torch.tensor(brute_top(full[i].weight.detach().flatten(1).norm(dim=1), 0.25))
                                for i in convs[1:]]
    narrow = nn.Sequential(*[m for i, o in ((1, 8), (8, 4), (4, 4)) for m in
                             (nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU())],
                           nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))
    with torch.no_grad():
        prev = torch.arange(1)
        for i, k in zip(convs, keep):
            narrow[i].weight.copy_(full[i].weight[k][:, prev])
            prev = k
        narrow[-1].weight.copy_(full[-1].weight[:, prev])
        narrow[-1].bias.copy_(full[-1].bias)
    start = copy.deepcopy(full)
    apply_structured_swat(full, 0.75, layers=["3"], activation_sparsity=0.0)
    apply_structured_swat(full, 0.75)
    assert isinstance(full[6], StructuredSWATConv2d) and full[6].activation_sparsity == 0.75
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (full, narrow)]
    for step in range(4):
        x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 4, (16,))
        outs = []
        for model, opt in zip((full, narrow), opts):
            opt.zero_grad()
            out = model(x)
            F.cross_entropy(out, y).backward()
            opt.step()
            outs.append(out)
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
    for i, k in zip(convs[1:], keep[1:]):
        assert full[i].last_channels[0].tolist() == k.tolist()  # the same filters every step
        dropped = sorted(set(range(16)) - set(k.tolist()))
        assert torch.equal(full[i].weight[dropped], start[i].weight[dropped])  # never moved
        assert torch.equal(full[i + 1].bias[dropped], torch.zeros(len(dropped)))  # beta stays 0
    prev = torch.arange(8)
    for i, k in zip(convs[1:], keep[1:]):
        torch.testing.assert_close(full[i].weight[k][:, prev], narrow[i].weight, rtol=1e-4, atol=1e-6)
        prev = k


def test_topk_on_an_mlp_keeps_training_dropped_rows_whose_relu_is_open():
    """The MLP counterpart of the test above (the card's narrow-MLP baseline): without BatchNorm a
    dropped row outputs its bias. Where the bias is negative the ReLU closes and the row gets
    exactly zero gradient (dead, as every dropped filter of the BatchNorm CNN); where it is
    positive the ReLU passes the gradient, the row keeps learning (dW is dense over the output rows)
    and can rise into the top-K: the kept rows change during training and more than K rows get
    used, so structured SWAT on an MLP is not a fixed narrow net (on the wide MLP at 80%, 332 and
    344 of the 1024 rows were ever kept, 205 at a time)."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    apply_structured_swat(mlp, 0.75, layers=["0"], activation_sparsity=0.0)  # the card's MLP recipe
    apply_structured_swat(mlp, 0.75)
    teacher = torch.randn(12, 4)  # a learnable task: labels from a fixed linear teacher

    def batch():
        x = torch.randn(32, 12)
        return x, (x @ teacher).argmax(1)

    x, y = batch()
    F.cross_entropy(mlp(x), y).backward()
    for i in (0, 2):
        kept = mlp[i].last_channels[0].tolist()
        assert kept == brute_top(mlp[i].weight.detach().norm(dim=1), 0.25)
        dropped = sorted(set(range(32)) - set(kept))
        closed = [r for r in dropped if mlp[i].bias[r] < 0]
        open_ = [r for r in dropped if mlp[i].bias[r] > 0]
        assert closed and open_
        assert torch.equal(mlp[i].weight.grad[closed], torch.zeros(len(closed), mlp[i].in_features))
        assert torch.equal(mlp[i].bias.grad[closed], torch.zeros(len(closed)))
        assert (mlp[i].weight.grad[open_].abs().sum(1) > 0).all()
        assert (mlp[i].bias.grad[open_] != 0).all()
    opt = torch.optim.SGD(mlp.parameters(), lr=0.1, momentum=0.9)
    ever = {i: set(mlp[i].last_channels[0].tolist()) for i in (0, 2)}
    changes = dict.fromkeys(ever, 0)
    for _ in range(40):
        before = {i: mlp[i].last_channels[0].tolist() for i in ever}
        opt.step()
        opt.zero_grad()
        x, y = batch()
        F.cross_entropy(mlp(x), y).backward()
        for i in ever:
            now = mlp[i].last_channels[0].tolist()
            changes[i] += now != before[i]
            ever[i].update(now)
    assert all(changes[i] > 0 and len(ever[i]) > 8 for i in ever), (changes, ever)  # K = 8 of 32
