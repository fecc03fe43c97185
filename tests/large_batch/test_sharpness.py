import doctest
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leanscale.core.errors import InvalidParameterError
from leanscale.large_batch.sharpness import SharpnessResult, sharpness

# the module itself: `leanscale.large_batch.sharpness` as an attribute is the function
sharpness_module = importlib.import_module("leanscale.large_batch.sharpness")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class Quadratic(nn.Module):
    """A "model" whose loss is f(w) = 0.5 * sum_i h_i w_i^2 + c, whatever the data."""

    def __init__(self, w, h, c=0.5):
        super().__init__()
        self.w = nn.Parameter(torch.as_tensor(w, dtype=torch.float64).clone())
        self.register_buffer("h", torch.as_tensor(h, dtype=torch.float64).clone())
        self.c = c

    def forward(self, x):
        f = 0.5 * (self.h * self.w**2).sum() + self.c
        return f.expand(x.shape[0])


def mean_output(out, y):
    return out.mean()


def quadratic_closed_form(w, h, c, eps):
    """max over the box of a convex diagonal quadratic: the corner away from 0 in each coordinate."""
    w, h = torch.as_tensor(w, dtype=torch.float64), torch.as_tensor(h, dtype=torch.float64)
    r = eps * (w.abs() + 1)
    f0 = float(0.5 * (h * w**2).sum() + c)
    fmax = float(0.5 * (h * (w.abs() + r) ** 2).sum() + c)
    return f0, fmax, 100 * (fmax - f0) / (1 + f0)


DATA = (torch.zeros(8, 1), torch.zeros(8))
W = [1.5, -0.7, 2.0, -1.2, 0.3]
H = [1.0, 3.0, 0.5, 2.0, 4.0]


def test_quadratic_reaches_closed_form():
    eps = 0.05
    f0, fmax, phi = quadratic_closed_form(W, H, 0.5, eps)
    res = sharpness(Quadratic(W, H), mean_output, DATA, eps=eps, steps=10)
    assert isinstance(res, SharpnessResult)
    assert res.loss == pytest.approx(f0, rel=1e-12)
    assert res.max_loss == pytest.approx(fmax, rel=1e-10)
    assert res.sharpness == pytest.approx(phi, rel=1e-9)
    assert res.n_params == 5 and res.n_samples == 8 and len(res.losses) == 11
    assert res.losses[0] == pytest.approx(f0) and res.step_size == pytest.approx(0.25)
    # losses rise monotonically to the corner, then stay there
    assert all(b >= a - 1e-12 for a, b in zip(res.losses, res.losses[1:]))


def test_normalized_method_reaches_closed_form_with_large_steps():
    eps = 0.05
    _, fmax, phi = quadratic_closed_form(W, H, 0.5, eps)
    res = sharpness(Quadratic(W, H), mean_output, DATA, eps=eps, steps=10, method="normalized", step_size=1.0)
    assert res.max_loss == pytest.approx(fmax, rel=1e-10)
    assert res.sharpness == pytest.approx(phi, rel=1e-9)


def test_random_start_finds_corner_when_gradient_is_zero():
    w = [0.0, 1.0, 0.0, -2.0]
    h = [2.0, 1.0, 3.0, 0.5]
    eps = 0.02
    f0, fmax, phi = quadratic_closed_form(w, h, 0.5, eps)
    centred = sharpness(Quadratic(w, h), mean_output, DATA, eps=eps)
    # at w_i = 0 the gradient is 0, so sign ascent from the centre never moves these coordinates
    assert centred.max_loss < fmax - 1e-6
    res = sharpness(Quadratic(w, h), mean_output, DATA, eps=eps, random_start=True, generator=0)
    assert res.loss == pytest.approx(f0)
    assert res.max_loss == pytest.approx(fmax, rel=1e-10)
    assert res.sharpness == pytest.approx(phi, rel=1e-9)


def test_sharper_quadratic_scores_higher():
    w = [0.1 * v for v in W]  # near the minimum, where f(x) is small and the 1 + f(x) denominator ~ 1
    flat = sharpness(Quadratic(w, H, c=0.0), mean_output, DATA, eps=1e-3)
    sharp = sharpness(Quadratic(w, [4 * h for h in H], c=0.0), mean_output, DATA, eps=1e-3)
    assert sharp.sharpness > 3 * flat.sharpness > 0
    assert sharp.sharpness == pytest.approx(quadratic_closed_form(w, [4 * h for h in H], 0.0, 1e-3)[2], rel=1e-9)
    # at the same curvature, the metric's 1 + f(x) normalization makes a higher loss level score lower
    lifted = sharpness(Quadratic(w, H, c=10.0), mean_output, DATA, eps=1e-3)
    assert lifted.sharpness < flat.sharpness


def test_linear_loss_is_maximized_exactly_in_one_step():
    torch.manual_seed(0)
    model = nn.Linear(4, 1).double()
    with torch.no_grad():
        model.bias.fill_(3.0)
    x = torch.randn(32, 4, dtype=torch.float64)
    y = torch.zeros(32, dtype=torch.float64)
    eps = 1e-2
    # f(W, b) = W . mean(x) + b: gradient (mean(x), 1), max over the box = f + sum_i r_i |g_i|
    g = torch.cat([x.mean(0), torch.ones(1, dtype=torch.float64)])
    theta = torch.cat([model.weight.detach().flatten(), model.bias.detach()])
    f0 = float(theta @ g)
    fmax = f0 + float((eps * (theta.abs() + 1) * g.abs()).sum())
    for steps in (1, 3):
        res = sharpness(model, mean_output, (x, y), eps=eps, steps=steps, batch_size=10)
        assert res.loss == pytest.approx(f0, rel=1e-12)
        assert res.max_loss == pytest.approx(fmax, rel=1e-12)
        assert res.sharpness == pytest.approx(100 * (fmax - f0) / (1 + f0), rel=1e-10)


def _mixed_state_model():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3)
    )
    model.train()
    model[1].eval()  # a mixed mode, to check it is restored per module
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    model[4].bias.requires_grad_(False)
    model[0].weight.grad = torch.full_like(model[0].weight, 7.0)
    return model


def _snapshot(model):
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "modes": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "ids": [id(p) for p in model.parameters()] + [id(b) for b in model.buffers()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
    }


def _assert_same(model, snap):
    after = _snapshot(model)
    assert after["state"].keys() == snap["state"].keys()
    for k, v in snap["state"].items():
        assert torch.equal(after["state"][k], v), k
    assert after["modes"] == snap["modes"]
    assert after["requires_grad"] == snap["requires_grad"]
    assert after["ids"] == snap["ids"]
    for a, b in zip(after["grads"], snap["grads"]):
        assert (a is None and b is None) or torch.equal(a, b)


def test_model_state_restored_exactly():
    model = _mixed_state_model()
    snap = _snapshot(model)
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    res = sharpness(model, F.cross_entropy, (x, y), eps=1e-2, steps=4, batch_size=16)
    assert res.max_loss > res.loss and res.sharpness > 0
    # the frozen bias is not perturbed: n = 5*8+8 + 8+8 + 8*3 (weight only)
    assert res.n_params == 48 + 16 + 24
    _assert_same(model, snap)
    # f was the eval-mode loss (running statistics, no dropout)
    model.eval()
    with torch.no_grad():
        expected = F.cross_entropy(model(x), y).item()
    assert res.loss == pytest.approx(expected, rel=1e-6)


def test_model_state_restored_after_exception():
    model = _mixed_state_model()
    snap = _snapshot(model)
    calls = {"n": 0}

    def failing_loss(out, y):
        calls["n"] += 1
        if calls["n"] == 4:  # after the weights were perturbed
            raise RuntimeError("boom")
        return F.cross_entropy(out, y)

    x, y = torch.randn(20, 5), torch.randint(0, 3, (20,))
    with pytest.raises(RuntimeError, match="boom"):
        sharpness(model, failing_loss, (x, y), eps=0.1, steps=5)
    assert calls["n"] == 4
    _assert_same(model, snap)


def test_deterministic_with_seed_and_global_rng_untouched():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    x, y = torch.randn(30, 4), torch.randint(0, 2, (30,))
    rng = torch.get_rng_state()
    a = sharpness(model, F.cross_entropy, (x, y), eps=0.05, random_start=True, generator=7)
    b = sharpness(model, F.cross_entropy, (x, y), eps=0.05, random_start=True, generator=torch.Generator().manual_seed(7))
    c = sharpness(model, F.cross_entropy, (x, y), eps=0.05, random_start=True, generator=8)
    assert torch.equal(torch.get_rng_state(), rng)
    assert a == b
    assert a.losses[0] != c.losses[0]
    assert a.loss == c.loss
    assert a.max_loss >= a.loss and c.max_loss >= c.loss


def test_iterable_of_batches_equals_tensors_and_max_samples():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    x, y = torch.randn(50, 3, dtype=torch.float64), torch.randint(0, 2, (50,))
    from_tensors = sharpness(model, F.cross_entropy, (x, y), eps=0.01, max_samples=30, batch_size=7)
    loader = ((x[i : i + 8], y[i : i + 8]) for i in range(0, 50, 8))  # a one-shot generator
    from_iterable = sharpness(model, F.cross_entropy, loader, eps=0.01, max_samples=30)
    assert from_tensors.n_samples == from_iterable.n_samples == 30
    assert from_iterable.loss == pytest.approx(from_tensors.loss, rel=1e-12)
    assert from_iterable.max_loss == pytest.approx(from_tensors.max_loss, rel=1e-10)
    assert from_iterable.losses == pytest.approx(from_tensors.losses, rel=1e-10)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"eps": 0.0}, r"'eps' parameter of sharpness must be a float in the range \(0, inf\)\. Got 0\.0"),
        ({"eps": -1e-3}, r"'eps' parameter .* Got -0\.001 instead"),
        ({"steps": 0}, r"'steps' parameter of sharpness must be an int in the range \[1, inf\)\. Got 0"),
        ({"method": "lbfgs"}, r"'method' parameter of sharpness must be one of 'normalized', 'sign'\. Got 'lbfgs'"),
        ({"max_samples": 0}, r"'max_samples' parameter"),
        ({"step_size": -1.0}, r"'step_size' parameter"),
    ],
)
def test_bad_parameters(kwargs, match):
    with pytest.raises(InvalidParameterError, match=match):
        sharpness(Quadratic(W, H), mean_output, DATA, **kwargs)


def test_bad_data_and_models():
    model = Quadratic(W, H)
    with pytest.raises(InvalidParameterError, match=r"'data' parameter of sharpness must hold at least one example"):
        sharpness(model, mean_output, (torch.zeros(0, 1), torch.zeros(0)))
    with pytest.raises(InvalidParameterError, match=r"'data' parameter .* at least one example"):
        sharpness(model, mean_output, [])
    with pytest.raises(InvalidParameterError, match=r"'data' parameter .* same first dimension"):
        sharpness(model, mean_output, (torch.zeros(3, 1), torch.zeros(4)))
    with pytest.raises(InvalidParameterError, match=r"'data' parameter .* Got Tensor"):
        sharpness(model, mean_output, torch.zeros(3, 1))
    frozen = Quadratic(W, H).requires_grad_(False)
    with pytest.raises(InvalidParameterError, match=r"'model' parameter .* requires_grad=True"):
        sharpness(frozen, mean_output, DATA)
    with pytest.raises(InvalidParameterError, match=r"'loss_fn' parameter .* scalar tensor .* shape \(8,\)"):
        sharpness(model, lambda out, y: out, DATA)
    with pytest.raises(InvalidParameterError, match=r"'model' parameter .* greater than -1 .* -2\.0"):
        sharpness(Quadratic([0.0], [1.0], c=-2.0), mean_output, DATA)
    assert torch.equal(model.w.detach(), torch.tensor(W, dtype=torch.float64))


def test_doctests():
    assert doctest.testmod(sharpness_module, raise_on_error=False).failed == 0
