import doctest
import io
import math

import numpy as np
import pytest
import torch
from torch import nn

import leanscale.large_batch.lamb as lamb_module
from leanscale.core.errors import InvalidParameterError
from leanscale.large_batch.lamb import LAMB
from leanscale.large_batch.lars import lars_param_groups


# ------------------------------------------------------------------------------ reference (numpy)
def lamb_reference(w0, grads, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                   bias_correction=True, trust_clip_max=None, adapt=True):
    """You et al. 2019, Algorithm 2 (phi = identity, optionally clipped), in float64."""
    beta1, beta2 = betas
    w = np.array(w0, dtype=np.float64)
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    trajectory = []
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g, dtype=np.float64)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat = m / (1 - beta1**t) if bias_correction else m
        v_hat = v / (1 - beta2**t) if bias_correction else v
        r = m_hat / (np.sqrt(v_hat) + eps) + weight_decay * w
        ratio = 1.0
        if adapt:
            w_norm, r_norm = np.linalg.norm(w), np.linalg.norm(r)
            ratio = w_norm / r_norm if w_norm > 0 and r_norm > 0 else 1.0
            if trust_clip_max is not None:
                ratio = min(ratio, trust_clip_max)
        w = w - lr * ratio * r
        trajectory.append(w.copy())
    return trajectory


CASES = {
    "defaults": {},
    "large_lr_no_decay": {"lr": 0.05, "weight_decay": 0.0},
    "betas": {"lr": 0.01, "betas": (0.5, 0.9), "weight_decay": 0.1},
    "no_bias_correction": {"lr": 0.01, "bias_correction": False},
    "trust_clip_max": {"lr": 0.01, "trust_clip_max": 2.0},  # active: ||w|| / ||r|| > 2 here
    "adaptation_off": {"lr": 0.01, "weight_decay": 0.05, "adapt": False},
    "big_eps": {"lr": 0.01, "eps": 0.1},
}


def _case_data():
    """A large-norm matrix and a small-norm vector; gradients of very different scales."""
    rng = np.random.default_rng(2)
    shapes = [(4, 3), (6,)]
    inits = [rng.normal(size=shapes[0]) * 5, rng.normal(size=shapes[1]) * 0.1]
    grads = [[rng.normal(size=s) * scale for _ in range(6)] for s, scale in zip(shapes, (2.0, 1e-3))]
    return inits, grads


@pytest.mark.parametrize("name", list(CASES))
def test_steps_match_reference_formula(name):
    kwargs = dict(CASES[name])
    adapt = kwargs.pop("adapt", True)
    inits, grads = _case_data()
    params = [nn.Parameter(torch.tensor(w, dtype=torch.float64)) for w in inits]
    opt = LAMB([{"params": params, "lamb_adaptation": adapt}], **kwargs)
    got = [[] for _ in params]
    for step in range(6):
        for i, p in enumerate(params):
            p.grad = torch.tensor(grads[i][step], dtype=torch.float64)
        opt.step()
        for i, p in enumerate(params):
            got[i].append(p.detach().numpy().copy())
    for i in range(len(params)):
        expected = lamb_reference(inits[i], grads[i], adapt=adapt, **kwargs)
        np.testing.assert_allclose(np.array(got[i]), np.array(expected), rtol=1e-12, atol=1e-14)


def test_trust_clip_max_case_really_clips():
    (w, _), (g, _) = _case_data()
    r = g[0] / np.abs(g[0]) + 0.01 * w  # first step: m_hat / sqrt(v_hat) = sign(g)
    assert np.linalg.norm(w) / np.linalg.norm(r) > 2.0  # so trust_clip_max=2.0 is active in CASES


def test_first_step_by_hand():
    p = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))  # ||w|| = 5
    opt = LAMB([p], lr=0.01, weight_decay=0.1)
    p.grad = torch.tensor([2.0, -2.0], dtype=torch.float64)
    opt.step()
    # m_hat = g, v_hat = g^2 -> m_hat / sqrt(v_hat) = [1, -1]; r = [1, -1] + 0.1 * [3, 4] = [1.3, -0.6]
    ratio = 5.0 / math.sqrt(1.3**2 + 0.6**2)
    np.testing.assert_allclose(p.detach().numpy(), [3 - 0.01 * ratio * 1.3, 4 + 0.01 * ratio * 0.6], rtol=1e-6)


# ------------------------------------------------------------------------------ bias correction
def test_bias_correction_first_two_steps_by_hand():
    beta1, beta2, lr = 0.9, 0.999, 0.1
    g1, g2 = 2.0, -1.0
    p = nn.Parameter(torch.tensor([0.5], dtype=torch.float64))
    opt = LAMB([{"params": [p], "lamb_adaptation": False}], lr=lr, weight_decay=0.0, eps=1e-12)
    p.grad = torch.tensor([g1], dtype=torch.float64)
    opt.step()
    assert p.item() == pytest.approx(0.5 - lr * 1.0, rel=1e-9)  # m_hat / sqrt(v_hat) = g / |g|
    p.grad = torch.tensor([g2], dtype=torch.float64)
    opt.step()
    m_hat = (beta1 * (1 - beta1) * g1 + (1 - beta1) * g2) / (1 - beta1**2)  # = (0.09*2 - 0.1) / 0.19
    v_hat = (beta2 * (1 - beta2) * g1**2 + (1 - beta2) * g2**2) / (1 - beta2**2)
    assert p.item() == pytest.approx(0.4 - lr * m_hat / math.sqrt(v_hat), rel=1e-9)


def test_without_bias_correction_the_first_step_is_scaled_by_the_moment_decays():
    p = nn.Parameter(torch.tensor([0.5], dtype=torch.float64))
    opt = LAMB([{"params": [p], "lamb_adaptation": False}], lr=0.1, weight_decay=0.0, eps=1e-12, bias_correction=False)
    p.grad = torch.tensor([2.0], dtype=torch.float64)
    opt.step()
    # m = 0.1 g, v = 0.001 g^2 -> m / sqrt(v) = 0.1 / sqrt(0.001) = sqrt(10)
    assert p.item() == pytest.approx(0.5 - 0.1 * math.sqrt(10.0), rel=1e-9)


def test_trust_ratio_cancels_the_bias_correction_scale_on_the_first_step():
    results = []
    for bias_correction in (True, False):
        p = nn.Parameter(torch.tensor([[1.0, -2.0], [3.0, 0.5]], dtype=torch.float64))
        opt = LAMB([p], lr=0.01, weight_decay=0.0, eps=1e-12, bias_correction=bias_correction)
        p.grad = torch.tensor([[0.3, -0.1], [0.2, 0.7]], dtype=torch.float64)
        opt.step()
        results.append(p.detach().clone())
    torch.testing.assert_close(results[0], results[1], rtol=1e-9, atol=0)  # eps only


# --------------------------------------------------------------------------------- trust ratio
def test_every_adapted_tensor_moves_by_lr_times_its_norm():
    gen = torch.Generator().manual_seed(4)
    a = nn.Parameter(100 * torch.randn(5, 5, generator=gen, dtype=torch.float64))
    b = nn.Parameter(0.01 * torch.randn(7, generator=gen, dtype=torch.float64))
    before = [a.detach().clone(), b.detach().clone()]
    opt = LAMB([a, b], lr=0.02, weight_decay=0.0)
    for _ in range(3):
        a.grad = 1e3 * torch.randn(5, 5, generator=gen, dtype=torch.float64)
        b.grad = 1e-3 * torch.randn(7, generator=gen, dtype=torch.float64)
        w = [a.detach().clone(), b.detach().clone()]
        opt.step()
        for p, w0 in zip((a, b), w):
            rel_change = torch.linalg.vector_norm(p.detach() - w0) / torch.linalg.vector_norm(w0)
            assert rel_change.item() == pytest.approx(0.02, rel=1e-9)
    assert not torch.equal(a.detach(), before[0]) and not torch.equal(b.detach(), before[1])


def test_trust_clip_max_bounds_the_ratio():
    p = nn.Parameter(torch.tensor([30.0, 40.0], dtype=torch.float64))  # ||w|| = 50, ||r|| = sqrt(2)
    opt = LAMB([p], lr=0.01, weight_decay=0.0, eps=1e-12, trust_clip_max=1.0)
    p.grad = torch.tensor([1.0, -1.0], dtype=torch.float64)
    opt.step()
    np.testing.assert_allclose(p.detach().numpy(), [30.0 - 0.01, 40.0 + 0.01], rtol=1e-12)


def test_zero_norm_parameter_takes_a_plain_adam_step():
    p = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = LAMB([p], lr=0.1, weight_decay=0.5, eps=1e-12)
    p.grad = torch.tensor([3.0, -0.5], dtype=torch.float64)
    opt.step()
    np.testing.assert_allclose(p.detach().numpy(), [-0.1, 0.1], rtol=1e-9)


def test_zero_gradient():
    # no decay: r = 0 -> ratio 1 and no move
    p = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    opt = LAMB([p], lr=0.1, weight_decay=0.0)
    p.grad = torch.zeros(2, dtype=torch.float64)
    opt.step()
    assert torch.equal(p.detach(), torch.tensor([3.0, 4.0], dtype=torch.float64))
    # with decay: r = lambda w -> ratio = 1 / lambda -> w - lr * w
    q = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    opt = LAMB([q], lr=0.1, weight_decay=0.3)
    q.grad = torch.zeros(2, dtype=torch.float64)
    opt.step()
    np.testing.assert_allclose(q.detach().numpy(), [2.7, 3.6], rtol=1e-12)


def test_adaptation_off_equals_torch_adamw():
    gen = torch.Generator().manual_seed(6)
    w0 = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    grads = [torch.randn(3, 4, generator=gen, dtype=torch.float64) for _ in range(5)]
    a, b = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    kw = {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1}
    ours = LAMB([{"params": [a], "lamb_adaptation": False}], **kw)
    ref = torch.optim.AdamW([b], **kw)
    for g in grads:
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-13, atol=1e-13)


def test_step_leaves_grad_untouched_and_skips_params_without_grad():
    p, q = nn.Parameter(torch.tensor([3.0, 4.0])), nn.Parameter(torch.tensor([1.0, 1.0]))
    opt = LAMB([p, q])
    g = torch.tensor([0.6, 0.8])
    p.grad = g.clone()
    opt.step()
    assert torch.equal(p.grad, g) and opt.state[p]["step"] == 1
    assert torch.equal(q.detach(), torch.tensor([1.0, 1.0])) and len(opt.state[q]) == 0


# ---------------------------------------------------------------------------- state, closure
def _make(params):
    return LAMB(params, lr=0.01, betas=(0.8, 0.95), weight_decay=0.05, trust_clip_max=10.0)


def test_state_dict_round_trip_gives_the_identical_next_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 1)).double()
    twin = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 1)).double()
    opt = _make(lars_param_groups(model, 0.05, optimizer="lamb"))
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)

    def loss_of(m):
        return nn.functional.mse_loss(m(x), y)

    for _ in range(3):
        opt.zero_grad()
        loss_of(model).backward()
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    twin.load_state_dict(model.state_dict())
    opt2 = _make(lars_param_groups(twin, 999.0, optimizer="lamb"))  # group settings from the checkpoint
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    assert opt2.param_groups[0]["weight_decay"] == 0.05 and opt2.param_groups[1]["lamb_adaptation"] is False
    for m, o in ((model, opt), (twin, opt2)):
        o.zero_grad()
        loss_of(m).backward()
        o.step()
    assert all(opt2.state[p]["step"] == 4 for p in twin.parameters())
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_closure_is_evaluated_with_grad_and_its_loss_returned():
    w = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    w_manual = nn.Parameter(w.detach().clone())
    target = torch.tensor([0.0, 5.0], dtype=torch.float64)

    def closure():
        opt.zero_grad()
        loss = ((w - target) ** 2).sum()
        loss.backward()
        return loss

    opt = LAMB([w], lr=0.1)
    with torch.no_grad():
        loss = opt.step(closure)
    assert loss.item() == pytest.approx(10.0)
    opt_manual = LAMB([w_manual], lr=0.1)
    ((w_manual - target) ** 2).sum().backward()
    opt_manual.step()
    assert torch.equal(w.detach(), w_manual.detach())
    assert opt.step() is None


# ------------------------------------------------------------------------------- end to end
def test_lamb_reduces_the_loss_of_a_tiny_regression():
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = x @ torch.randn(8, 1) + 0.01 * torch.randn(256, 1)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = LAMB(lars_param_groups(model, 0.01, optimizer="lamb"), lr=0.05)
    first = nn.functional.mse_loss(model(x), y).item()
    for _ in range(40):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
    assert math.isfinite(loss.item()) and loss.item() < 0.1 * first  # 0.023 here


# ------------------------------------------------------------------------------- bad inputs
def _p():
    return [nn.Parameter(torch.ones(2))]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lr": -1e-3}, r"'lr' parameter of LAMB must be a float in the range \[0, inf\). Got -0.001"),
        ({"lr": float("inf")}, r"'lr'"),
        ({"betas": (1.0, 0.999)}, r"'betas\[0\]' parameter of LAMB must be a float in the range \[0, 1\). Got 1.0"),
        ({"betas": (0.9, -0.1)}, r"'betas\[1\]'"),
        ({"betas": (0.9,)}, r"'betas' parameter of LAMB must be a pair"),
        ({"betas": 0.9}, r"'betas' parameter of LAMB must be a pair \(beta1, beta2\). Got 0.9"),
        ({"eps": 0.0}, r"'eps'"),
        ({"weight_decay": -0.01}, r"'weight_decay'"),
        ({"bias_correction": 1}, r"'bias_correction' parameter of LAMB must be an instance of bool"),
        ({"trust_clip_max": 0.0}, r"'trust_clip_max' parameter of LAMB must be None or a float"),
    ],
)
def test_bad_constructor_arguments_name_the_parameter(kwargs, match):
    with pytest.raises(InvalidParameterError, match=match):
        LAMB(_p(), **kwargs)


@pytest.mark.parametrize(
    "group,match",
    [
        ({"lr": -1.0}, r"'lr' parameter of LAMB \(param group 1\)"),
        ({"betas": (0.9, 1.5)}, r"'betas\[1\]' parameter of LAMB \(param group 1\)"),
        ({"lamb_adaptation": None}, r"'lamb_adaptation' parameter of LAMB \(param group 1\)"),
        ({"lars_adaptation": False}, r"param group 1 of LAMB must set 'lamb_adaptation'.*optimizer='lamb'"),
    ],
)
def test_bad_param_group_overrides_name_the_key_and_group(group, match):
    with pytest.raises(InvalidParameterError, match=match):
        LAMB([{"params": _p()}, {"params": _p(), **group}])
    opt = LAMB(_p())
    with pytest.raises(InvalidParameterError, match=match):
        opt.add_param_group({"params": _p(), **group})


def test_sparse_gradient_is_refused_with_a_clear_message():
    emb = nn.Embedding(5, 3, sparse=True)
    opt = LAMB(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(InvalidParameterError, match=r"'params' parameter of LAMB .* sparse gradient"):
        opt.step()


def test_doctests():
    result = doctest.testmod(lamb_module, raise_on_error=False)
    assert result.attempted >= 4 and result.failed == 0
