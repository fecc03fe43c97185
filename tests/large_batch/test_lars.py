import doctest
import io
import math

import numpy as np
import pytest
import torch
from torch import nn

import leanscale.large_batch.lars as lars_module
from leanscale.core.errors import InvalidParameterError
from leanscale.large_batch.lars import LARS, lars_param_groups


# ------------------------------------------------------------------------------ reference (numpy)
def lars_reference(w0, grads, lr, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False,
                   trust_coefficient=1e-3, eps=1e-8, trust_clip=False, adapt=True):
    """You et al. 2017, Algorithm 1 (LR outside the buffer, as torch.optim.SGD), in float64."""
    w = np.array(w0, dtype=np.float64)
    v = None
    trajectory = []
    for g in grads:
        g = np.asarray(g, dtype=np.float64)
        w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
        local_lr = 1.0
        if adapt and w_norm > 0 and g_norm > 0:
            local_lr = trust_coefficient * w_norm / (g_norm + weight_decay * w_norm + eps)
        if adapt and trust_clip:
            local_lr = min(local_lr / lr, 1.0)
        d = local_lr * (g + weight_decay * w)
        if momentum:
            v = d.copy() if v is None else momentum * v + (1 - dampening) * d
            d = d + momentum * v if nesterov else v
        w = w - lr * d
        trajectory.append(w.copy())
    return trajectory


def _run(shapes, grads_per_param, **kwargs):
    """Drive LARS with float64 params through given gradients; the params' trajectories."""
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in shapes]
    init = [p.detach().numpy().copy() for p in params]
    adapt = kwargs.pop("adapt", True)
    opt = LARS([{"params": params, "lars_adaptation": adapt}], **kwargs)
    out = [[] for _ in params]
    for step_grads in zip(*grads_per_param):
        for p, g in zip(params, step_grads):
            p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        for i, p in enumerate(params):
            out[i].append(p.detach().numpy().copy())
    return init, out


CASES = {
    "momentum": {"lr": 0.5},
    "weight_decay": {"lr": 0.5, "weight_decay": 1e-2},
    "no_momentum": {"lr": 2.0, "momentum": 0.0, "weight_decay": 5e-4},
    "nesterov": {"lr": 0.5, "nesterov": True, "weight_decay": 1e-3},
    "dampening": {"lr": 0.5, "momentum": 0.8, "dampening": 0.3},
    "trust_coefficient": {"lr": 0.1, "trust_coefficient": 0.05, "weight_decay": 1e-2},
    "trust_clip": {"lr": 0.02, "trust_coefficient": 0.01, "trust_clip": True},  # clip active on some layers
    "adaptation_off": {"lr": 0.05, "weight_decay": 1e-2, "nesterov": True, "adapt": False},
}


@pytest.mark.parametrize("name", list(CASES))
def test_steps_match_reference_formula(name):
    kwargs = dict(CASES[name])
    rng = np.random.default_rng(1)
    shapes = [(4, 3), (5,)]
    # gradients of very different scales per tensor: the ratio must be per tensor, not global
    grads = [[rng.normal(size=s) * scale for _ in range(5)] for s, scale in zip(shapes, (3.0, 0.01))]
    init, got = _run(shapes, grads, **kwargs)
    ref_kwargs = {k: v for k, v in kwargs.items() if k != "adapt"}
    for i in range(len(shapes)):
        expected = lars_reference(init[i], grads[i], adapt=kwargs.get("adapt", True), **ref_kwargs)
        np.testing.assert_allclose(np.array(got[i]), np.array(expected), rtol=1e-12, atol=1e-14)


def test_two_steps_by_hand():
    p = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))  # ||w|| = 5
    opt = LARS([p], lr=1.0, momentum=0.9)
    g = torch.tensor([0.6, 0.8], dtype=torch.float64)  # ||g|| = 1
    p.grad = g.clone()
    opt.step()
    # local_lr = 0.001 * 5 / 1 = 0.005; v = d = [0.003, 0.004]
    np.testing.assert_allclose(p.detach().numpy(), [2.997, 3.996], rtol=1e-9)
    p.grad = g.clone()
    opt.step()
    # ||w|| = 4.995 -> d = 0.004995 * g = [0.002997, 0.003996]; v = 0.9 * [0.003, 0.004] + d
    np.testing.assert_allclose(p.detach().numpy(), [2.997 - 0.005697, 3.996 - 0.007596], rtol=1e-9)


def test_weight_decay_enters_ratio_and_direction_by_hand():
    p = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    opt = LARS([p], lr=1.0, momentum=0.0, weight_decay=0.1)
    p.grad = torch.tensor([0.6, 0.8], dtype=torch.float64)
    opt.step()
    # local_lr = 0.001 * 5 / (1 + 0.1 * 5) = 1/300; d = (g + 0.1 w) / 300 = [0.9, 1.2] / 300
    np.testing.assert_allclose(p.detach().numpy(), [3 - 0.003, 4 - 0.004], rtol=1e-9)


def test_zero_norm_parameter_gets_the_global_lr():
    p = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = LARS([p], lr=0.1, momentum=0.0, weight_decay=0.5)
    p.grad = torch.tensor([1.0, 2.0], dtype=torch.float64)
    opt.step()
    np.testing.assert_allclose(p.detach().numpy(), [-0.1, -0.2], rtol=1e-12)


def test_zero_gradient_leaves_only_weight_decay():
    p = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    opt = LARS([p], lr=0.5, momentum=0.0, weight_decay=0.1)
    p.grad = torch.zeros(2, dtype=torch.float64)
    opt.step()
    # ratio 1: w - 0.5 * 0.1 * w
    np.testing.assert_allclose(p.detach().numpy(), [2.85, 3.8], rtol=1e-12)
    opt_no_wd = LARS([p], lr=0.5, momentum=0.0)
    before = p.detach().clone()
    opt_no_wd.step()
    assert torch.equal(p.detach(), before)


def test_update_norm_is_trust_coefficient_times_weight_norm_per_layer():
    gen = torch.Generator().manual_seed(3)
    a = nn.Parameter(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    b = nn.Parameter(10 * torch.randn(8, generator=gen, dtype=torch.float64))
    before = [a.detach().clone(), b.detach().clone()]
    opt = LARS([a, b], lr=2.0, momentum=0.0, trust_coefficient=0.01)
    a.grad = 1e4 * torch.randn(6, 6, generator=gen, dtype=torch.float64)
    b.grad = 1e-4 * torch.randn(8, generator=gen, dtype=torch.float64)
    opt.step()
    for p, w0 in zip((a, b), before):
        # ||lr * eta * ||w|| / ||g|| * g|| = lr * eta * ||w||, whatever the gradient's scale
        assert torch.linalg.vector_norm(p.detach() - w0).item() == pytest.approx(
            2.0 * 0.01 * torch.linalg.vector_norm(w0).item(), rel=1e-4  # eps / ||g_b|| ~ 3e-5
        )


def test_gradient_scale_does_not_change_the_step():
    steps = []
    for scale in (1.0, 1e3):
        p = nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64))
        opt = LARS([p], lr=1.0, momentum=0.0)
        p.grad = scale * torch.tensor([[0.1, 0.2], [-0.3, 0.4]], dtype=torch.float64)
        opt.step()
        steps.append(p.detach().clone())
    torch.testing.assert_close(steps[0], steps[1], rtol=1e-7, atol=0)


@pytest.mark.parametrize("lr,expected_step", [(0.1, 0.1), (10.0, 5.0)])
def test_trust_clip_caps_the_layer_lr_at_the_global_lr(lr, expected_step):
    # local lr without clipping: eta ||w|| / ||g|| = 1 * 5 / 1 = 5 -> effective min(lr * 5 / lr, lr)
    p = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    opt = LARS([p], lr=lr, momentum=0.0, trust_coefficient=1.0, trust_clip=True)
    g = torch.tensor([0.6, 0.8], dtype=torch.float64)
    p.grad = g
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([3.0, 4.0], dtype=torch.float64) - expected_step * g)


def test_trust_clip_with_lr_set_to_zero_by_a_scheduler_is_finite():
    p = nn.Parameter(torch.tensor([3.0, 4.0]))
    opt = LARS([p], lr=0.1, trust_clip=True)
    opt.param_groups[0]["lr"] = 0.0
    p.grad = torch.tensor([0.6, 0.8])
    opt.step()
    assert torch.equal(p.detach(), torch.tensor([3.0, 4.0]))
    assert torch.isfinite(opt.state[p]["momentum_buffer"]).all()


@pytest.mark.parametrize("nesterov,dampening", [(False, 0.0), (False, 0.2), (True, 0.0)])
def test_adaptation_off_equals_torch_sgd(nesterov, dampening):
    gen = torch.Generator().manual_seed(5)
    w0 = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    grads = [torch.randn(3, 4, generator=gen, dtype=torch.float64) for _ in range(4)]
    a, b = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    kw = {"lr": 0.3, "momentum": 0.9, "dampening": dampening, "weight_decay": 1e-2, "nesterov": nesterov}
    ours = LARS([{"params": [a], "lars_adaptation": False}], **kw)
    ref = torch.optim.SGD([b], **kw)
    for g in grads:
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-14, atol=1e-14)


def test_step_leaves_grad_untouched_and_skips_params_without_grad():
    p, q = nn.Parameter(torch.tensor([3.0, 4.0])), nn.Parameter(torch.tensor([1.0, 1.0]))
    opt = LARS([p, q], lr=1.0, weight_decay=0.1)
    g = torch.tensor([0.6, 0.8])
    p.grad = g.clone()
    opt.step()
    assert torch.equal(p.grad, g)
    assert torch.equal(q.detach(), torch.tensor([1.0, 1.0])) and len(opt.state[q]) == 0


def test_bfloat16_parameters_follow_the_reference():
    w0, g = np.array([3.0, 4.0, -1.0]), np.array([0.5, -0.25, 1.0])
    p = nn.Parameter(torch.tensor(w0, dtype=torch.bfloat16))
    opt = LARS([p], lr=20.0, momentum=0.0, weight_decay=1e-2)
    p.grad = torch.tensor(g, dtype=torch.bfloat16)
    opt.step()
    expected = lars_reference(w0, [g], lr=20.0, momentum=0.0, weight_decay=1e-2)[0]
    np.testing.assert_allclose(p.detach().double().numpy(), expected, rtol=1e-2)


# ---------------------------------------------------------------------------- state, closure
def _make(params):
    return LARS(params, lr=0.5, momentum=0.9, weight_decay=1e-3, nesterov=True)


def test_state_dict_round_trip_gives_the_identical_next_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 1)).double()
    twin = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 1)).double()
    opt = _make(lars_param_groups(model, 1e-3))
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
    opt2 = _make(lars_param_groups(twin, 999.0))  # group settings come from the checkpoint
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    assert opt2.param_groups[0]["weight_decay"] == 1e-3 and opt2.param_groups[1]["lars_adaptation"] is False
    for m, o in ((model, opt), (twin, opt2)):
        o.zero_grad()
        loss_of(m).backward()
        o.step()
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

    opt = LARS([w], lr=1.0, momentum=0.0)
    with torch.no_grad():  # step must enable grad for the closure itself
        loss = opt.step(closure)
    assert loss.item() == pytest.approx(1.0 + 9.0)
    opt_manual = LARS([w_manual], lr=1.0, momentum=0.0)
    ((w_manual - target) ** 2).sum().backward()
    opt_manual.step()
    assert torch.equal(w.detach(), w_manual.detach())
    assert opt.step() is None


# ------------------------------------------------------------------------------- end to end
def test_lars_reduces_the_loss_of_a_tiny_regression():
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = x @ torch.randn(8, 1) + 0.01 * torch.randn(256, 1)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = LARS(lars_param_groups(model, 1e-4), lr=5.0, momentum=0.9, trust_coefficient=0.01)
    opt.param_groups[1]["lr"] = 0.05  # the non-adapted group (biases) takes plain SGD steps
    first = nn.functional.mse_loss(model(x), y).item()
    for _ in range(40):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
    assert math.isfinite(loss.item()) and loss.item() < 0.05 * first  # 0.007 here


# ------------------------------------------------------------------------- lars_param_groups
def test_param_groups_put_biases_and_norm_weights_in_the_plain_group():
    conv, bn, lin, ln = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Linear(2, 2), nn.LayerNorm(2)
    frozen = nn.Linear(2, 2)
    frozen.requires_grad_(False)
    model = nn.ModuleList([conv, bn, lin, ln, frozen])
    adapted, plain = lars_param_groups(model, weight_decay=5e-4)
    assert {id(p) for p in adapted["params"]} == {id(conv.weight), id(lin.weight)}
    assert {id(p) for p in plain["params"]} == {id(q) for q in (conv.bias, bn.weight, bn.bias, lin.bias, ln.weight, ln.bias)}
    assert (adapted["weight_decay"], adapted["lars_adaptation"]) == (5e-4, True)
    assert (plain["weight_decay"], plain["lars_adaptation"]) == (0.0, False)
    lamb_groups = lars_param_groups(model, weight_decay=0.01, optimizer="lamb")
    assert [g["lamb_adaptation"] for g in lamb_groups] == [True, False]
    assert all("lars_adaptation" not in g for g in lamb_groups)


def test_param_groups_drive_lars_plain_sgd_on_batchnorm():
    bn_model = nn.Sequential(nn.Linear(3, 2, bias=False), nn.BatchNorm1d(2))
    opt = LARS(lars_param_groups(bn_model, weight_decay=0.1), lr=0.5, momentum=0.0)
    bn, lin = bn_model[1], bn_model[0]
    w_lin, w_bn = lin.weight.detach().clone(), bn.weight.detach().clone()  # BN gamma starts at ones
    lin.weight.grad = torch.full((2, 3), 0.1)
    bn.weight.grad = torch.tensor([0.2, -0.4])
    opt.step()
    torch.testing.assert_close(bn.weight.detach(), w_bn - 0.5 * torch.tensor([0.2, -0.4]))  # no ratio, no decay
    g_norm, w_norm = torch.linalg.vector_norm(lin.weight.grad), torch.linalg.vector_norm(w_lin)
    local = 1e-3 * w_norm / (g_norm + 0.1 * w_norm + 1e-8)
    torch.testing.assert_close(lin.weight.detach(), w_lin - 0.5 * local * (lin.weight.grad + 0.1 * w_lin))


def test_param_groups_only_1d_group_when_no_matrices():
    groups = lars_param_groups(nn.LayerNorm(4), weight_decay=0.1)
    assert len(groups) == 1 and groups[0]["lars_adaptation"] is False


# ------------------------------------------------------------------------------- bad inputs
def _p():
    return [nn.Parameter(torch.ones(2))]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lr": 0.0}, r"'lr' parameter of LARS must be a float in the range \(0, inf\). Got 0.0"),
        ({"lr": -0.1}, r"'lr'"),
        ({"lr": float("nan")}, r"'lr'"),
        ({"lr": True}, r"'lr'"),
        ({"lr": 0.1, "momentum": 1.0}, r"'momentum' parameter of LARS must be a float in the range \[0, 1\)"),
        ({"lr": 0.1, "momentum": -0.5}, r"'momentum'"),
        ({"lr": 0.1, "dampening": 1.5}, r"'dampening'"),
        ({"lr": 0.1, "weight_decay": -1e-4}, r"'weight_decay' parameter of LARS .* Got -0.0001"),
        ({"lr": 0.1, "trust_coefficient": 0.0}, r"'trust_coefficient'"),
        ({"lr": 0.1, "eps": 0.0}, r"'eps'"),
        ({"lr": 0.1, "nesterov": "yes"}, r"'nesterov' parameter of LARS must be an instance of bool"),
        ({"lr": 0.1, "trust_clip": 1}, r"'trust_clip'"),
        ({"lr": 0.1, "momentum": 0.0, "nesterov": True}, r"'nesterov' parameter of LARS requires momentum > 0"),
        ({"lr": 0.1, "dampening": 0.1, "nesterov": True}, r"'nesterov' .* dampening=0.1"),
    ],
)
def test_bad_constructor_arguments_name_the_parameter(kwargs, match):
    with pytest.raises(InvalidParameterError, match=match):
        LARS(_p(), **kwargs)


@pytest.mark.parametrize(
    "group,match",
    [
        ({"lr": -1.0}, r"'lr' parameter of LARS \(param group 1\)"),
        ({"lars_adaptation": "no"}, r"'lars_adaptation' parameter of LARS \(param group 1\)"),
        ({"momentum": 0.0, "nesterov": True}, r"'nesterov' parameter of LARS \(param group 1\)"),
        ({"lamb_adaptation": False}, r"param group 1 of LARS must set 'lars_adaptation'.*'lamb_adaptation'"),
    ],
)
def test_bad_param_group_overrides_name_the_key_and_group(group, match):
    with pytest.raises(InvalidParameterError, match=match):
        LARS([{"params": _p()}, {"params": _p(), **group}], lr=0.1)
    opt = LARS(_p(), lr=0.1)
    with pytest.raises(InvalidParameterError, match=match):
        opt.add_param_group({"params": _p(), **group})


def test_sparse_gradient_is_refused_with_a_clear_message():
    emb = nn.Embedding(5, 3, sparse=True)
    opt = LARS(emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(InvalidParameterError, match=r"'params' parameter of LARS .* sparse gradient .* shape \(5, 3\)"):
        opt.step()


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((nn.Linear(2, 2), -0.1), {}, r"'weight_decay' parameter of lars_param_groups"),
        ((nn.Linear(2, 2), 0.1), {"optimizer": "lrs"}, r"'optimizer' .* 'lamb', 'lars'. Got 'lrs'.* Did you mean 'lars'"),
        ((nn.Linear(2, 2).requires_grad_(False), 0.1), {}, r"'model' parameter of lars_param_groups must have trainable"),
        (([nn.Parameter(torch.ones(2))], 0.1), {}, r"'model' parameter of lars_param_groups must be an instance of Module"),
    ],
)
def test_lars_param_groups_bad_inputs(args, kwargs, match):
    with pytest.raises(InvalidParameterError, match=match):
        lars_param_groups(*args, **kwargs)


def test_doctests():
    result = doctest.testmod(lars_module, raise_on_error=False)
    assert result.attempted >= 8 and result.failed == 0
