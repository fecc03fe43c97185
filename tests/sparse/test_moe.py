"""Mixture of experts: upcycled copy == dense MLP, balancing loss by hand (f_i before dropping),
capacity priority (first choices before second, then token order), top-2 gates, gradients, the
sort-based dispatch against a per-token reference, surgery on a GPT, FLOPs of active experts only,
bad input."""

import copy
import doctest
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leanscale.core.errors import InvalidParameterError
from leanscale.core.flops import count_flops
from leanscale.models import GPT, MLP, GPTConfig
from leanscale.sparse import moe as moe_mod
from leanscale.sparse.moe import (
    MoE,
    MoEMLP,
    apply_moe,
    moe_aux_loss,
    moe_layers,
    moe_stats,
)


def test_doctests():
    assert doctest.testmod(moe_mod, raise_on_error=False).failed == 0


def value(t):
    """A 0-d tensor as a Python float (detached: float() of a grad-tracking tensor warns)."""
    return t.detach().item()


def expert_out(moe, e, x):
    """Expert ``e`` of ``moe`` applied to rows ``x`` (N, C), written out by hand."""
    h = x @ moe.w_fc[e]
    if moe.b_fc is not None:
        h = h + moe.b_fc[e]
    y = F.gelu(h) @ moe.w_proj[e]
    if moe.b_proj is not None:
        y = y + moe.b_proj[e]
    return y


def reference_moe(moe, x):
    """Naive per-token MoE: loop over choices, then tokens, counting each expert's capacity."""
    xf = x.reshape(-1, moe.n_embd)
    N, k, E = xf.shape[0], moe.top_k, moe.n_experts
    probs = torch.softmax(xf.float() @ moe.router.weight.float().t(), dim=-1)
    top_p, top_e = probs.topk(k, dim=-1)
    gates = top_p if k == 1 else top_p / top_p.sum(-1, keepdim=True)
    cap = math.inf if moe.capacity_factor is None else math.ceil(moe.capacity_factor * N * k / E)
    used = [0] * E
    rows = [torch.zeros(moe.n_embd) for _ in range(N)]
    dropped = 0
    for j in range(k):
        for t in range(N):
            e = int(top_e[t, j])
            if used[e] < cap:
                used[e] += 1
                rows[t] = rows[t] + gates[t, j] * expert_out(moe, e, xf[t : t + 1])[0]
            else:
                dropped += 1
    load = torch.bincount(top_e.reshape(-1), minlength=E).float() / (N * k)
    return torch.stack(rows).reshape(x.shape), load, dropped / (N * k)


def routed_moe(assignments, *, top_k=1, capacity_factor=None, second=None, n_experts=4, **kw):
    """An MoE with router weight = identity (n_embd = n_experts) and inputs whose routing is known:
    token t is 3 * e_{assignments[t]} (+ 2 * e_{second[t]} for a known second choice)."""
    torch.manual_seed(0)
    moe = MoE(n_experts, 8, n_experts, top_k=top_k, capacity_factor=capacity_factor, **kw)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(n_experts))
    x = 3.0 * F.one_hot(torch.tensor(assignments), n_experts).float()
    if second is not None:
        x = x + 2.0 * F.one_hot(torch.tensor(second), n_experts).float()
    return moe, x


# ------------------------------------------------------------------------- equivalence with the dense MLP


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("n_experts,top_k", [(1, 1), (4, 2)])
def test_copy_init_dropless_equals_dense_mlp(bias, n_experts, top_k):
    torch.manual_seed(1)
    mlp = MLP(12, 40, bias=bias)
    if bias:
        with torch.no_grad():
            mlp.c_fc.bias.normal_()
            mlp.c_proj.bias.normal_()
    layer = MoEMLP.from_dense(mlp, n_experts, init="copy", top_k=top_k, capacity_factor=None)
    x = torch.randn(3, 7, 12, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y_dense, y_moe = mlp(x), layer(x2)
    torch.testing.assert_close(y_moe, y_dense, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y_dense)
    y_dense.backward(g)
    y_moe.backward(g)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-6)
    assert layer.last_output.dropped_fraction == 0.0


# ------------------------------------------------------------------------- auxiliary losses


def test_balancing_and_z_loss_match_the_formulas_on_a_hand_made_routing():
    a = [0, 0, 0, 1, 2, 0, 1, 3]  # 4, 2, 1, 1 tokens per expert
    moe, x = routed_moe(a, load_balancing_coef=0.01, z_loss_coef=1e-3)
    out = moe(x)
    # logits of token t: 3 at its expert, 0 elsewhere
    p_hi, p_lo = math.exp(3) / (math.exp(3) + 3), 1 / (math.exp(3) + 3)
    counts = [4, 2, 1, 1]
    f = [c / 8 for c in counts]
    P = [(c * p_hi + (8 - c) * p_lo) / 8 for c in counts]
    expected = 0.01 * 4 * sum(fi * pi for fi, pi in zip(f, P))
    assert out.load.tolist() == f
    assert value(out.load_balancing_loss) == pytest.approx(expected, rel=1e-6)
    assert value(out.z_loss) == pytest.approx(1e-3 * math.log(math.exp(3) + 3) ** 2, rel=1e-6)
    assert out.load_balancing_loss.dtype == torch.float32 and out.load_balancing_loss.ndim == 0


def test_balancing_loss_is_coef_at_perfect_balance_and_for_uniform_probs():
    moe, x = routed_moe([0, 1, 2, 3, 3, 2, 1, 0], load_balancing_coef=0.05)
    assert value(moe(x).load_balancing_loss) == pytest.approx(0.05, rel=1e-6)
    with torch.no_grad():
        moe.router.weight.zero_()  # uniform probabilities: E * sum f_i / E = 1 whatever f is
    assert value(moe(torch.randn(16, 4)).load_balancing_loss) == pytest.approx(0.05, rel=1e-6)
    # top-2 at perfect balance: each token counts twice, f still sums to 1
    moe2, x2 = routed_moe([0, 1, 2, 3], second=[1, 2, 3, 0], top_k=2, load_balancing_coef=0.05)
    out = moe2(x2)
    assert out.load.tolist() == [0.25] * 4
    assert value(out.load_balancing_loss) == pytest.approx(0.05, rel=1e-6)


def test_load_fractions_are_counted_before_dropping():
    a = [0, 0, 0, 0, 0, 0, 1, 2]  # 6 of 8 tokens on expert 0
    moe, x = routed_moe(a, capacity_factor=1.0)  # capacity ceil(8 / 4) = 2
    assert moe.capacity(8) == 2
    out = moe(x)
    assert out.dropped_fraction == pytest.approx(4 / 8)
    p_hi, p_lo = math.exp(3) / (math.exp(3) + 3), 1 / (math.exp(3) + 3)
    P = [(c * p_hi + (8 - c) * p_lo) / 8 for c in (6, 1, 1, 0)]
    pre = [6 / 8, 1 / 8, 1 / 8, 0.0]
    post = [2 / 4, 1 / 4, 1 / 4, 0.0]  # fractions of the KEPT assignments: the bug
    loss_pre = 0.01 * 4 * sum(f * p for f, p in zip(pre, P))
    loss_post = 0.01 * 4 * sum(f * p for f, p in zip(post, P))
    assert out.load.tolist() == pre
    assert value(out.load_balancing_loss) == pytest.approx(loss_pre, rel=1e-6)
    assert abs(loss_pre - loss_post) > 0.1 * loss_pre
    moe.capacity_factor = None  # same losses without dropping
    assert value(moe(x).load_balancing_loss) == value(out.load_balancing_loss)


# ------------------------------------------------------------------------- capacity


def test_capacity_drops_later_tokens_of_an_overloaded_expert_top1():
    a = [0, 1, 0, 0, 2, 0, 3, 0]  # expert 0 gets tokens 0, 2, 3, 5, 7; capacity 2
    moe, x = routed_moe(a, capacity_factor=1.0)
    out = moe(x).output
    zero_rows = set(torch.nonzero((out == 0).all(dim=1)).flatten().tolist())
    assert zero_rows == {3, 5, 7}
    gate = math.exp(3) / (math.exp(3) + 3)
    for t in set(range(8)) - zero_rows:
        torch.testing.assert_close(out[t], gate * expert_out(moe, a[t], x[t : t + 1])[0])
    assert moe.last_counts == (8, 5)
    moe.capacity_factor = None  # dropless: nothing dropped
    res = moe(x)
    assert res.dropped_fraction == 0.0 and not (res.output == 0).all(dim=1).any()


def test_capacity_priority_all_first_choices_before_second_choices():
    first = [0, 0, 0, 0, 1, 1]
    second = [1, 1, 1, 2, 2, 2]
    moe, x = routed_moe(first, second=second, top_k=2, capacity_factor=1.0, n_experts=3)
    assert moe.capacity(6) == 4  # ceil(6 * 2 / 3)
    out = moe(x)
    # expert 1: first choices of tokens 4, 5 come first, then the second choices of tokens 0, 1, 2:
    # token 2's second choice is the 5th and is dropped (token order alone would drop token 5's first).
    assert out.dropped_fraction == pytest.approx(1 / 12)
    p1, p2 = math.exp(3), math.exp(2)
    g1, g2 = p1 / (p1 + p2), p2 / (p1 + p2)  # renormalised top-2 gates
    for t in range(6):
        expected = g1 * expert_out(moe, first[t], x[t : t + 1])[0]
        if t != 2:
            expected = expected + g2 * expert_out(moe, second[t], x[t : t + 1])[0]
        torch.testing.assert_close(out.output[t], expected)


def test_top2_gates_sum_to_one_and_both_experts_get_gradient():
    moe, x = routed_moe([1], second=[3], top_k=2)
    out = moe(x)
    p1, p2 = math.exp(3), math.exp(2)
    expected = (p1 * expert_out(moe, 1, x) + p2 * expert_out(moe, 3, x)) / (p1 + p2)
    torch.testing.assert_close(out.output, expected)
    out.output.sum().backward()
    used = moe.w_fc.grad.abs().sum(dim=(1, 2)) > 0
    assert used.tolist() == [False, True, False, True]


# ------------------------------------------------------------------------- gradients, dispatch


def test_gradients_reach_the_router_and_every_used_expert():
    torch.manual_seed(2)
    moe = MoE(8, 16, 4, capacity_factor=None)
    x = torch.randn(64, 8)
    out = moe(x)
    out.output.square().sum().backward()
    assert moe.router.weight.grad.abs().sum() > 0  # through the gates
    used = out.load > 0
    assert used.all()
    assert (moe.w_fc.grad.abs().sum(dim=(1, 2)) > 0).all()
    assert (moe.w_proj.grad.abs().sum(dim=(1, 2)) > 0).all()
    moe.zero_grad()
    (moe(x).load_balancing_loss + moe(x).z_loss).backward()  # the aux losses alone train the router
    assert moe.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("capacity_factor", [None, 1.0, 0.5])
@pytest.mark.parametrize("bias", [False, True])
def test_dispatch_matches_a_per_token_reference(top_k, capacity_factor, bias):
    torch.manual_seed(3)
    moe = MoE(6, 10, 4, top_k=top_k, capacity_factor=capacity_factor, bias=bias)
    with torch.no_grad():
        moe.router.weight.mul_(20)  # uneven routing, so that capacity drops something
        if bias:
            moe.b_fc.normal_()
            moe.b_proj.normal_()
    x = torch.randn(3, 13, 6, requires_grad=True)
    out = moe(x)
    ref, load, dropped = reference_moe(moe, x)
    torch.testing.assert_close(out.output, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.load, load)
    assert out.dropped_fraction == pytest.approx(dropped)
    if capacity_factor == 0.5:
        assert dropped > 0
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out.output, [x, moe.w_fc, moe.w_proj, moe.router.weight], g)
    grads_ref = torch.autograd.grad(ref, [x, moe.w_fc, moe.w_proj, moe.router.weight], g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_jitter_only_in_training_and_router_in_float32_under_autocast():
    torch.manual_seed(4)
    moe = MoE(8, 16, 4, jitter=0.5, capacity_factor=None)
    x = torch.randn(32, 8)
    torch.manual_seed(5)
    a = moe(x).output
    b = moe(x).output
    assert not torch.equal(a, b)  # noisy router in training
    moe.eval()
    torch.testing.assert_close(moe(x).output, moe(x).output, rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moe(x)
    assert out.output.dtype == torch.bfloat16
    assert out.load_balancing_loss.dtype == torch.float32 and out.z_loss.dtype == torch.float32
    torch.testing.assert_close(out.z_loss, moe(x).z_loss)  # the router ran in float32


def test_deepcopy_after_forward():
    layer = MoEMLP(8, 16, 2)
    layer(torch.randn(4, 8)).sum().backward()
    clone = copy.deepcopy(layer)
    assert clone.last_output is None and layer.last_output is not None
    torch.testing.assert_close(clone.moe.w_fc, layer.moe.w_fc)


# ------------------------------------------------------------------------- surgery on a GPT


def tiny_gpt(n_layer=4):
    torch.manual_seed(6)
    return GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=n_layer, n_head=2, n_embd=16))


def test_apply_moe_converts_every_second_block_and_trains():
    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert value(moe_aux_loss(model)) == 0.0
    apply_moe(model, n_experts=4, optimizers=opt)
    kinds = [type(b.mlp).__name__ for b in model.transformer.h]
    assert kinds == ["MLP", "MoEMLP", "MLP", "MoEMLP"]
    assert [n for n, _ in moe_layers(model)] == ["transformer.h.1.mlp", "transformer.h.3.mlp"]
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in in_opt for _, m in moe_layers(model) for p in m.parameters())
    # random init like GPT: residual projection std 0.02 / sqrt(2 * n_layer)
    w_proj = model.transformer.h[1].mlp.moe.w_proj
    assert 0.7 < value(w_proj.std()) / (0.02 / math.sqrt(8)) < 1.3
    idx = torch.randint(0, 32, (2, 8))
    logits, loss = model(idx, targets=idx)
    assert logits.shape == (2, 8, 32) and loss.ndim == 0
    aux = moe_aux_loss(model)
    assert aux.ndim == 0 and value(aux) > 0 and aux.requires_grad
    (loss + aux).backward()
    assert model.transformer.h[1].mlp.moe.router.weight.grad.abs().sum() > 0
    opt.step()
    rows = moe_stats(model)
    assert [r["name"] for r in rows] == ["transformer.h.1.mlp", "transformer.h.3.mlp"]
    for r in rows:
        assert sum(r["load"]) == pytest.approx(1.0)
        assert 1.0 <= r["max_over_mean_load"] <= 4.0
        assert 0.0 <= r["dropped_fraction"] < 1.0
    assert count_flops(model, idx).forward > 0  # every module has a rule: no warning


def test_apply_moe_every_one_converts_all_and_copy_keeps_the_function():
    model = tiny_gpt(n_layer=3)
    model.eval()
    idx = torch.randint(0, 32, (2, 8))
    before, _ = model(idx)
    apply_moe(model, n_experts=2, every=1, top_k=2, capacity_factor=None, init="copy")
    assert len(moe_layers(model)) == 3
    after, _ = model(idx)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    assert [r["dropped_fraction"] for r in moe_stats(model)] == [0.0, 0.0, 0.0]
    with pytest.raises(InvalidParameterError, match="3 MoEMLP layer"):
        apply_moe(model, n_experts=2)  # nothing left to convert


# ------------------------------------------------------------------------- FLOPs


def test_flops_count_active_experts_only():
    torch.manual_seed(7)
    C, H, E, N = 16, 64, 8, 40
    mlp = MLP(C, H)
    x = torch.randn(N, C)
    dense = count_flops(mlp, x)
    router = 2 * C * E * N
    layer = MoEMLP.from_dense(mlp, E, capacity_factor=None)
    sparse = count_flops(layer, x)
    assert sparse.forward == dense.forward + router
    assert sparse.backward == dense.backward + router  # x needs no grad: the router weight's only
    assert sparse.forward < 1.5 * dense.forward < E * dense.forward
    layer.moe.capacity_factor = 0.5  # dropped assignments cost nothing
    capped = count_flops(layer, x)
    kept = N - round(layer.last_output.dropped_fraction * N)
    assert kept < N
    assert capped.forward == router + kept * 2 * (2 * C * H)
    top2 = MoEMLP(C, H, E, top_k=2, capacity_factor=None)
    assert count_flops(top2, x).forward == 2 * dense.forward + router


# ------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"n_experts": 4, "top_k": 5}, "'top_k' parameter of MoE must be at most n_experts=4"),
        ({"n_experts": 4, "top_k": 0}, "'top_k' parameter of MoE must be an int in the range \\[1, inf\\)"),
        ({"n_experts": 0}, "'n_experts' parameter of MoE must be an int"),
        ({"n_experts": 4, "capacity_factor": 0}, "'capacity_factor' parameter of MoE must be .* or None. Got 0"),
        ({"n_experts": 4, "capacity_factor": -1.0}, "'capacity_factor' parameter"),
        ({"n_experts": 4, "jitter": 1.0}, "'jitter' parameter of MoE"),
        ({"n_experts": 4, "load_balancing_coef": -0.1}, "'load_balancing_coef' parameter"),
    ],
)
def test_moe_rejects_bad_parameters(kwargs, match):
    with pytest.raises(InvalidParameterError, match=match):
        MoE(8, 16, **kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"n_experts": 4, "top_k": 5}, "'top_k' parameter of apply_moe must be at most n_experts=4"),
        ({"n_experts": 4, "top_k": 0}, "'top_k' parameter of apply_moe"),
        ({"n_experts": 0}, "'n_experts' parameter of apply_moe"),
        ({"n_experts": 4, "capacity_factor": 0.0}, "'capacity_factor' parameter of apply_moe"),
        ({"n_experts": 4, "every": 0}, "'every' parameter of apply_moe must be an int in the range \\[1, inf\\)"),
        ({"n_experts": 4, "every": 5}, "'every' parameter of apply_moe must be at most the number of MLP layers \\(4\\)"),
        ({"n_experts": 4, "init": "warm"}, "'init' parameter of apply_moe must be one of 'copy', 'random'"),
        ({"n_experts": 4, "bogus": 1}, "'moe_kwargs' parameter of apply_moe .* Got 'bogus'"),
    ],
)
def test_apply_moe_rejects_bad_parameters_and_leaves_the_model(kwargs, match):
    model = tiny_gpt()
    with pytest.raises(InvalidParameterError, match=match):
        apply_moe(model, **kwargs)
    assert moe_layers(model) == []


def test_apply_moe_needs_an_mlp():
    with pytest.raises(InvalidParameterError, match="no leanscale.models.transformer.MLP to convert"):
        apply_moe(nn.Sequential(nn.Linear(4, 4)), n_experts=2)
    with pytest.raises(InvalidParameterError, match="'model' parameter of apply_moe must be an instance"):
        apply_moe("gpt", n_experts=2)


def test_from_dense_and_load_dense_check_the_mlp():
    with pytest.raises(InvalidParameterError, match="'mlp' parameter of MoEMLP.from_dense must be a "
                                                    "leanscale.models.transformer.MLP.*torch.nn.modules.linear.Linear"):
        MoEMLP.from_dense(nn.Linear(4, 4), 2)
    mlp = MLP(8, 32)
    with pytest.raises(InvalidParameterError, match="'hidden' parameter of MoEMLP.from_dense must match the MLP's hidden=32"):
        MoEMLP.from_dense(mlp, 2, hidden=16)
    with pytest.raises(InvalidParameterError, match="'init' parameter of MoEMLP.from_dense"):
        MoEMLP.from_dense(mlp, 2, init="upcycle")
    moe = MoE(8, 16, 2)
    with pytest.raises(InvalidParameterError, match=r"c_fc.weight of shape \(16, 8\).*Got \(32, 8\)"):
        moe.load_dense(mlp)
    with pytest.raises(InvalidParameterError, match="bias=False"):
        moe.load_dense(MLP(8, 16, bias=True))
    with pytest.raises(InvalidParameterError, match=r"'x' parameter of MoE.forward .*n_embd=8.*\(4, 5\)"):
        moe(torch.randn(4, 5))
