"""The narrow dense baseline of ``benchmarks/sparse/structured.py`` on the wide MLP (issue 17):
``dense-w:N`` on ``wide`` builds the MLP 784-N-N-10, and the training FLOPs the benchmark reports
(the cost ledger) match the closed forms, for it and for structured SWAT at 80% with the first
layer's activation whole, the setting it is compared with (the widths in the method card are
chosen by these numbers: N = 512 costs what structured 80% costs)."""

import pytest
import torch

from benchmarks.sparse.structured import BATCH, build, parse_variant, training_flops

pytestmark = pytest.mark.usefixtures("one_thread")


def dense_mlp_training_flops(hidden: int, batch: int = BATCH) -> int:
    """784-h-h-10, forward 2 * MACs per sample, weight gradient the same, input gradient the same
    except for the first layer (the pixels need none): 2B (2 * 784 h + 3 h^2 + 3 * 10 h)."""
    return 2 * batch * (2 * 784 * hidden + 3 * hidden * hidden + 30 * hidden)


def structured_a0_first_flops(sparsity: float, hidden: int = 1024, batch: int = BATCH) -> int:
    """Structured SWAT on 784-h-h-10, both hidden layers converted (K = round((1 - s) h) output rows
    in the forward and input gradient), the first layer's input whole for its weight gradient, the
    second's reduced to K of h channels; weight gradients dense over the output rows; head dense."""
    k = round((1 - sparsity) * hidden)
    first = 784 * k + 784 * hidden  # forward (K rows) + weight gradient (all rows, all 784 pixels)
    second = 3 * k * hidden  # forward + input gradient (K rows) + weight gradient (K input channels)
    return 2 * batch * (first + second + 3 * 10 * hidden)


@pytest.mark.parametrize("hidden", [205, 512, 1024])
def test_dense_w_on_the_wide_mlp_is_the_mlp_of_that_width(hidden):
    label, kind, width, _ = parse_variant(f"dense-w:{hidden}")
    assert (label, kind) == (f"dense, width {hidden}", "dense-w")
    net = build("wide", kind, width, seed=3)
    shapes = [tuple(m.weight.shape) for m in net if isinstance(m, torch.nn.Linear)]
    assert shapes == [(hidden, 784), (hidden, hidden), (10, hidden)]
    n_params = sum(p.numel() for p in net.parameters())
    assert n_params == 784 * hidden + hidden + hidden * hidden + hidden + 10 * hidden + 10
    x = torch.randn(BATCH, 1, 28, 28)
    assert training_flops(net, x) == dense_mlp_training_flops(hidden)
    assert net(x).shape == (BATCH, 10)
    # the seed fixes the initialisation, as for every other setting of the benchmark
    again = build("wide", kind, width, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), again.parameters()))


def test_dense_width_512_costs_what_structured_80_with_the_first_activation_whole_costs():
    x = torch.randn(BATCH, 1, 28, 28)
    dense = training_flops(build("wide", "dense", 0.0), x)
    structured = training_flops(build("wide", "structured-a0-first", 0.8), x)
    assert dense == dense_mlp_training_flops(1024)
    assert structured == structured_a0_first_flops(0.8)
    assert structured / dense == pytest.approx(0.3396, abs=1e-4)  # the card's 0.34
    narrow = training_flops(build("wide", "dense-w", 512.0), x)
    assert abs(narrow / structured - 1) < 0.015  # 0.336 vs 0.340 of the dense step


@pytest.mark.parametrize(("model", "item"), [("lenet", "dense-w:100"), ("wide", "narrow:0.8"),
                                              ("wide", "narrow-sliced:0.8")])
def test_a_baseline_on_a_model_it_does_not_fit_is_refused(model, item):
    _, kind, value, _ = parse_variant(item)
    with pytest.raises(SystemExit, match=kind):
        build(model, kind, value)


@pytest.mark.parametrize("item", ["dense-w:0", "dense-w:51.5"])
def test_a_width_that_is_not_a_whole_number_of_units_is_refused(item):
    with pytest.raises(SystemExit, match="dense-w needs a whole number"):
        parse_variant(item)
