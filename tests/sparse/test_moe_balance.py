"""MoE load balancing: the aux-loss-free selection bias (changes the selection, not the gates),
its sign update, MaxVio in moe_stats, balancing a skewed router, the state dict; the options
(sigmoid gate, sequence-wise and global balancing losses, shared experts, fine-grained experts)
against manual computations; bad parameters."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from leanscale.core.errors import InvalidParameterError
from leanscale.core.flops import count_flops
from leanscale.models import GPT, GPTConfig
from leanscale.sparse import (
    MoE,
    MoEMLP,
    apply_moe,
    moe_global_batch,
    moe_stats,
    moe_update_bias,
)


def expert_out(moe, e, x):
    """Expert ``e`` of ``moe`` (GELU, no biases) on rows ``x`` (n, C), by hand."""
    return F.gelu(x @ moe.w_fc[e]) @ moe.w_proj[e]


def manual_moe(moe, x, bias=None, sigmoid=False):
    """Dropless MoE by hand: scores, selection on ``scores + bias``, gates from the unbiased
    scores (renormalised for top_k >= 2)."""
    logits = x @ moe.router.weight.t()
    scores = logits.sigmoid() if sigmoid else logits.softmax(-1)
    sel = scores if bias is None else scores + bias
    chosen = sel.topk(moe.top_k, dim=-1).indices  # (N, k)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        g = scores[t, chosen[t]]
        if moe.top_k > 1:
            g = g / g.sum()
        for j, e in enumerate(chosen[t].tolist()):
            out[t] += g[j] * expert_out(moe, e, x[t : t + 1])[0]
    return out, chosen


def gpt(**kw):
    torch.manual_seed(0)
    return apply_moe(GPT(GPTConfig(64, 16, n_layer=2, n_head=2, n_embd=16)), 4, **kw)


# ------------------------------------------------------------------------- the selection bias


@pytest.mark.parametrize("top_k", [1, 2])
def test_bias_changes_the_selection_but_not_the_gate_values(top_k):
    torch.manual_seed(0)
    moe = MoE(8, 16, 4, top_k=top_k, capacity_factor=None, bias_update_rate=1e-3)
    x = torch.randn(32, 8)
    with torch.no_grad():
        moe.expert_bias.copy_(torch.tensor([0.5, -0.5, 0.0, 0.0]))  # push towards expert 0
    out = moe(x)
    ref, chosen = manual_moe(moe, x, moe.expert_bias)
    torch.testing.assert_close(out.output, ref, rtol=1e-5, atol=1e-6)
    unbiased, chosen0 = manual_moe(moe, x)
    assert not torch.equal(chosen, chosen0)  # the bias moved the selection ...
    assert (chosen == 0).sum() > (chosen0 == 0).sum()
    assert not torch.allclose(out.output, unbiased)
    # ... but the gates are the unbiased scores: adding the bias to them would give another output
    logits = x @ moe.router.weight.t()
    wrong = (logits.softmax(-1) + moe.expert_bias).gather(1, chosen)
    assert not torch.allclose(wrong, logits.softmax(-1).gather(1, chosen))
    counts = torch.bincount(chosen.reshape(-1), minlength=4).float()
    assert out.load.tolist() == (counts / counts.sum()).tolist()  # load counts the biased selection


def test_the_bias_gets_no_gradient_and_the_router_still_trains():
    torch.manual_seed(0)
    moe = MoE(8, 16, 4, top_k=2, capacity_factor=None, bias_update_rate=1e-3)
    moe(torch.randn(10, 8)).output.sum().backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
    assert not moe.expert_bias.requires_grad
    assert "expert_bias" not in dict(moe.named_parameters())


def test_sign_update_on_a_hand_made_load():
    moe = MoE(4, 8, 4, bias_update_rate=0.01)
    vio = moe.update_bias(torch.tensor([10.0, 0.0, 5.0, 5.0]))  # mean 5
    assert vio == pytest.approx(10 / 5 - 1)
    torch.testing.assert_close(moe.expert_bias, torch.tensor([-0.01, 0.01, 0.0, 0.0]))
    moe.update_bias(torch.tensor([1.0, 2.0, 3.0, 6.0]))  # mean 3
    torch.testing.assert_close(moe.expert_bias, torch.tensor([-0.0, 0.02, 0.0, -0.01]))
    assert moe.update_bias(torch.zeros(4)) is None  # nothing counted: no update
    torch.testing.assert_close(moe.expert_bias, torch.tensor([-0.0, 0.02, 0.0, -0.01]))


def test_moe_update_bias_uses_the_counts_of_the_training_forwards_since_the_last_update():
    model = gpt(capacity_factor=None, bias_update_rate=0.1)
    moe = model.transformer.h[1].mlp.moe
    idx = torch.randint(0, 64, (2, 16))
    counts = torch.zeros(4)
    for _ in range(2):  # two micro-batches of one step (gradient accumulation)
        model(idx, idx)
        counts += torch.tensor(model.transformer.h[1].mlp.last_output.load.tolist()) * 32
    model.eval()
    model(torch.randint(0, 64, (2, 16)))  # evaluation forwards are not counted
    rows = moe_update_bias(model)
    expected = 0.1 * torch.sign(counts.mean() - counts)
    torch.testing.assert_close(moe.expert_bias, expected)
    assert rows == [{"name": "transformer.h.1.mlp", "max_vio": pytest.approx(float(counts.max() / counts.mean() - 1))}]
    assert moe_update_bias(model)[0]["max_vio"] is None  # cleared: no forward since
    torch.testing.assert_close(moe.expert_bias, expected)


def _two_layers_with_counts(rate=0.1):
    """A GPT with an aux-loss-free MoE in both blocks, set biases and hand-set pending counts."""
    model = gpt(every=1, capacity_factor=None, bias_update_rate=rate)
    layers = [block.mlp.moe for block in model.transformer.h]
    counts = [torch.tensor([7.0, 1.0, 4.0, 0.0], dtype=torch.float64),  # mean 3
              torch.tensor([2.0, 2.0, 5.0, 3.0], dtype=torch.float64)]  # mean 3: expert 3 exactly at the mean
    with torch.no_grad():
        for i, (moe, c) in enumerate(zip(layers, counts, strict=True)):
            moe.expert_bias.copy_(torch.tensor([0.3, -0.1, 0.0, 0.2]) * (i + 1))
            moe.pending_counts = c.clone()
    return model, layers, counts


@pytest.mark.parametrize("rate", [0.025, 3, np.float32(0.5)])
def test_moe_update_bias_rate_replaces_every_layers_rate_for_this_update(rate):
    model, layers, counts = _two_layers_with_counts()
    before = [moe.expert_bias.clone() for moe in layers]
    rows = moe_update_bias(model, rate=rate)
    r = float(rate)
    for moe, b, c, row in zip(layers, before, counts, rows, strict=True):
        expected = b + torch.tensor([r * math.copysign(1, 3 - v) if v != 3 else 0.0 for v in c.tolist()])
        torch.testing.assert_close(moe.expert_bias, expected.float(), rtol=0, atol=1e-7)
        assert row["max_vio"] == pytest.approx(float(c.max()) / 3 - 1)
        assert moe.pending_counts is None  # cleared
        assert moe.bias_update_rate == 0.1  # the layer's own rate is unchanged ...
    for moe, c in zip(layers, counts, strict=True):
        moe.pending_counts = c.clone()
    after = [moe.expert_bias.clone() for moe in layers]
    moe_update_bias(model)  # ... and used again by the next update without rate
    for moe, b, c in zip(layers, after, counts, strict=True):
        torch.testing.assert_close(moe.expert_bias, b + 0.1 * torch.sign(c.mean() - c).float(), rtol=0, atol=1e-7)


def test_moe_update_bias_rate_zero_clears_the_counts_and_keeps_the_bias():
    model, layers, counts = _two_layers_with_counts()
    before = [moe.expert_bias.clone() for moe in layers]
    rows = moe_update_bias(model, rate=0)
    assert [row["max_vio"] for row in rows] == [pytest.approx(7 / 3 - 1), pytest.approx(5 / 3 - 1)]
    for moe, b in zip(layers, before, strict=True):
        assert torch.equal(moe.expert_bias, b)
        assert moe.pending_counts is None
    assert [row["max_vio"] for row in moe_update_bias(model)] == [None, None]  # nothing counted since
    # one layer directly: rate=0 is a no-op on the bias too
    moe = MoE(4, 8, 4, bias_update_rate=0.01)
    assert moe.update_bias(torch.tensor([10.0, 0.0, 5.0, 5.0]), rate=0.0) == pytest.approx(1.0)
    assert torch.equal(moe.expert_bias, torch.zeros(4))
    moe.update_bias(torch.tensor([10.0, 0.0, 5.0, 5.0]), rate=0.5)
    torch.testing.assert_close(moe.expert_bias, torch.tensor([-0.5, 0.5, 0.0, 0.0]))


@pytest.mark.parametrize("rate", [-1e-3, float("nan"), float("inf"), True, "1e-3", torch.tensor(1e-3)])
def test_moe_update_bias_bad_rates_are_refused_before_anything_changes(rate):
    model, layers, counts = _two_layers_with_counts()
    before = [moe.expert_bias.clone() for moe in layers]
    with pytest.raises(InvalidParameterError,
                       match=r"'rate' parameter of moe_update_bias must be a finite real number >= 0.*Got "):
        moe_update_bias(model, rate=rate)
    for moe, b, c in zip(layers, before, counts, strict=True):  # refused before any update or clearing
        assert torch.equal(moe.expert_bias, b) and torch.equal(moe.pending_counts, c)
    with pytest.raises(InvalidParameterError, match=r"'rate' parameter of MoE.update_bias must be a finite"):
        layers[0].update_bias(rate=rate)
    assert torch.equal(layers[0].expert_bias, before[0])


def test_balancing_reduces_max_vio_on_a_skewed_router():
    """A router that sends most tokens to expert 0 (MaxVio ~4.5 of at most 7): 100 updates at
    u = 0.01 bring the MaxVio of the last 20 batches below 0.2; without them it stays skewed."""
    def skewed(rate):
        torch.manual_seed(0)
        moe = MoE(8, 4, 8, top_k=1, capacity_factor=None, bias_update_rate=rate)
        with torch.no_grad():
            moe.router.weight.normal_(0, 0.3)
            moe.router.weight[0] += 0.5  # inputs are shifted by +0.5: expert 0's logit is larger
        return moe

    g = torch.Generator().manual_seed(1)
    free, fixed = skewed(0.01), skewed(0.0)
    late_free, late_fixed = torch.zeros(8), torch.zeros(8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: 10x faster than 2 threads on the shared cores
    try:
        for step in range(100):
            x = torch.randn(512, 8, generator=g) + 0.5
            load_free, load_fixed = free(x).load, fixed(x).load
            free.update_bias()
            if step == 0:
                assert torch.equal(load_free, load_fixed) and load_fixed.max() * 8 - 1 > 3  # same skewed start
            if step >= 80:
                late_free += load_free
                late_fixed += load_fixed
    finally:
        torch.set_num_threads(threads)
    assert late_fixed.max() * 8 / late_fixed.sum() - 1 > 3
    assert late_free.max() * 8 / late_free.sum() - 1 < 0.2
    assert free.expert_bias[0] < 0 and (free.expert_bias[1:] > free.expert_bias[0]).all()


def test_state_dict_round_trip_and_old_checkpoints():
    model = gpt(bias_update_rate=0.05)
    idx = torch.randint(0, 64, (2, 16))
    for _ in range(3):
        model(idx, idx)
        moe_update_bias(model)
    bias = model.transformer.h[1].mlp.moe.expert_bias.clone()
    assert bias.abs().sum() > 0
    state = model.state_dict()
    assert "transformer.h.1.mlp.moe.expert_bias" in state
    fresh = gpt(bias_update_rate=0.05)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.transformer.h[1].mlp.moe.expert_bias, bias)
    model.eval(), fresh.eval()
    torch.testing.assert_close(fresh(idx)[0], model(idx)[0])
    # without aux-loss-free balancing nothing is added: checkpoints of earlier versions load
    assert not any("expert_bias" in k for k in gpt().state_dict())


# ------------------------------------------------------------------------- MaxVio


def test_max_vio_in_moe_stats_per_batch_and_accumulated():
    torch.manual_seed(0)
    moe = MoEMLP(4, 8, 4, capacity_factor=None)
    with torch.no_grad():
        moe.moe.router.weight.copy_(torch.eye(4))
    a1, a2 = [0, 0, 0, 1, 2, 0, 1, 3], [1, 1, 2, 3]  # 4,2,1,1 then 0,2,1,1
    wrap = torch.nn.Sequential(moe)
    wrap(3.0 * F.one_hot(torch.tensor(a1), 4).float())
    row = moe_stats(wrap)[0]
    assert row["max_vio"] == pytest.approx(4 / 2 - 1) and row["max_over_mean_load"] == pytest.approx(2.0)
    wrap(3.0 * F.one_hot(torch.tensor(a2), 4).float())
    row = moe_stats(wrap, reset=True)[0]
    assert row["max_vio"] == pytest.approx(2 / 1 - 1)
    assert row["max_vio_accumulated"] == pytest.approx(4 / 3 - 1)  # 4,4,2,2 over 12 assignments
    assert row["n_assignments_accumulated"] == 12 and row["expert_bias"] is None
    row = moe_stats(wrap)[0]
    assert row["max_vio_accumulated"] is None and row["n_assignments_accumulated"] == 0
    assert row["max_vio"] == pytest.approx(1.0)  # the last forward's stays


# ------------------------------------------------------------------------- options


@pytest.mark.parametrize("top_k", [1, 2])
def test_sigmoid_gate_matches_manual(top_k):
    torch.manual_seed(0)
    moe = MoE(8, 16, 4, top_k=top_k, capacity_factor=None, gate="sigmoid", bias_update_rate=1e-3)
    with torch.no_grad():
        moe.expert_bias.copy_(torch.tensor([0.0, 0.1, -0.1, 0.0]))
    x = torch.randn(20, 8)
    ref, _ = manual_moe(moe, x, moe.expert_bias, sigmoid=True)
    torch.testing.assert_close(moe(x).output, ref, rtol=1e-5, atol=1e-6)


def test_sequence_and_global_balance_losses_match_manual():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)  # 3 sequences of 5 tokens
    losses = {}
    for kind in ("batch", "sequence", "global"):
        torch.manual_seed(1)
        moe = MoE(8, 16, 4, top_k=2, load_balancing_coef=0.1, balance_loss=kind)
        losses[kind] = moe(x).load_balancing_loss.item()
    probs = (x.reshape(-1, 8) @ moe.router.weight.t()).softmax(-1).reshape(3, 5, 4)
    chosen = probs.topk(2, dim=-1).indices  # (3, 5, 2)
    per_seq = []
    for s in range(3):
        f = torch.bincount(chosen[s].reshape(-1), minlength=4).float() / 10
        per_seq.append(0.1 * 4 * (f * probs[s].mean(0)).sum())
    assert losses["sequence"] == pytest.approx(torch.stack(per_seq).mean().item(), rel=1e-5)
    f = torch.bincount(chosen.reshape(-1), minlength=4).float() / 30
    assert losses["batch"] == pytest.approx((0.1 * 4 * (f * probs.reshape(-1, 4).mean(0)).sum()).item(), rel=1e-5)
    assert losses["global"] == pytest.approx(losses["batch"], rel=1e-6)  # one process: the batch is global
    assert losses["sequence"] != pytest.approx(losses["batch"], rel=1e-3)


def _global_loss_by_hand(moe, xs):
    """The balancing loss of each micro-batch ``x_j`` (n_j, C) inside moe_global_batch, in closed
    form: ``coef * E * sum_i F_i P_i`` with ``F`` the assignment counts (before dropping) of
    micro-batches 1..j normalised, ``P`` micro-batch j's mean softmax; the router weight differentiable."""
    counts, out = torch.zeros(moe.n_experts), []
    for x in xs:
        probs = (x @ moe.router.weight.t()).softmax(-1)  # (n_j, E)
        counts = counts + torch.bincount(probs.topk(moe.top_k, dim=-1).indices.reshape(-1), minlength=moe.n_experts)
        out.append(moe.load_balancing_coef * moe.n_experts * (counts / counts.sum() * probs.mean(0)).sum())
    return out


def test_global_batch_accumulates_f_over_micro_batches_in_closed_form():
    torch.manual_seed(0)
    model = torch.nn.Sequential(MoEMLP(8, 16, 6, top_k=2, capacity_factor=1.0, load_balancing_coef=0.1,
                                       balance_loss="global"))
    moe = model[0].moe
    xs = [torch.randn(n, 5, 8) for n in (2, 1, 3, 2)]  # K = 4 micro-batches of unequal size
    W = moe.router.weight
    with moe_global_batch(model) as block:
        losses = [moe(x).load_balancing_loss for x in xs]
        counts = block.counts()[0]["counts"]
    manual = _global_loss_by_hand(moe, [x.reshape(-1, 8) for x in xs])
    for j, (got, want) in enumerate(zip(losses, manual)):
        assert got.item() == pytest.approx(want.item(), rel=1e-5), j
        g_got, = torch.autograd.grad(got, W, retain_graph=True)
        g_want, = torch.autograd.grad(want, W, retain_graph=True)
        torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-8)
    # brute force: the last micro-batch's f is that of the concatenated global batch
    concat = torch.cat([x.reshape(-1, 8) for x in xs])  # (40, 8)
    f_global = moe(concat).load  # one forward on the whole batch, outside the block: (E,) before dropping
    assert counts == pytest.approx((f_global * 2 * 40).tolist())
    p_last = (xs[-1].reshape(-1, 8) @ W.t()).softmax(-1).mean(0)
    brute = 0.1 * 6 * (f_global * p_last).sum()
    assert losses[-1].item() == pytest.approx(brute.item(), rel=1e-5)
    torch.testing.assert_close(torch.autograd.grad(losses[-1], W)[0], torch.autograd.grad(brute, W)[0],
                               rtol=1e-4, atol=1e-8)
    # without the block each micro-batch is on its own: the last loss differs (the test can fail)
    alone = moe(xs[-1]).load_balancing_loss.item()
    assert alone != pytest.approx(losses[-1].item(), rel=1e-3)
    assert moe.global_counts is None and not moe.accumulate_global  # cleared on leaving


def test_global_batch_on_a_gpt_eval_not_counted_and_cleared_on_exception():
    model = gpt(every=1, balance_loss="global")
    x = torch.randint(0, 64, (3, 2, 16))
    with moe_global_batch(model) as block:
        for xb in x:
            model(xb, xb)
        model.eval()
        model(x[0], x[0])  # an evaluation forward inside the block: not counted
        model.train()
        rows = block.counts()
    assert [r["name"] for r in rows] == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
    assert all(sum(r["counts"]) == 3 * 2 * 16 for r in rows)  # top-1, 3 micro-batches of 32 tokens
    with pytest.raises(RuntimeError, match="boom"), moe_global_batch(model):
        model(x[0], x[0])
        raise RuntimeError("boom")
    assert all(m.moe.global_counts is None and not m.moe.accumulate_global for m in model.modules()
               if isinstance(m, MoEMLP))


def test_global_batch_bad_uses_are_refused():
    with pytest.raises(InvalidParameterError, match="'model' parameter of moe_global_batch.*balance_loss='global'"):
        moe_global_batch(gpt())
    with pytest.raises(InvalidParameterError, match="'model' parameter of moe_global_batch must be an instance"):
        moe_global_batch([gpt(balance_loss="global")])
    model = gpt(balance_loss="global")
    with moe_global_batch(model):
        with pytest.raises(InvalidParameterError, match="already inside a moe_global_batch block"):
            with moe_global_batch(model):
                pass
        assert model.transformer.h[1].mlp.moe.accumulate_global  # the outer block is still on


def test_shared_experts_add_a_dense_mlp_and_its_flops():
    torch.manual_seed(0)
    moe = MoE(8, 16, 4, capacity_factor=None, n_shared_experts=2)
    assert tuple(moe.shared_fc.shape) == (8, 32) and tuple(moe.shared_proj.shape) == (32, 8)
    x = torch.randn(2, 5, 8)
    routed, _ = manual_moe(moe, x.reshape(-1, 8))
    shared = F.gelu(x.reshape(-1, 8) @ moe.shared_fc) @ moe.shared_proj
    torch.testing.assert_close(moe(x).output.reshape(-1, 8), routed + shared, rtol=1e-5, atol=1e-6)
    plain = count_flops(MoE(8, 16, 4, capacity_factor=None), x).forward
    assert count_flops(moe, x).forward - plain == 10 * 2 * (2 * 8 * 32)  # 10 tokens, 2 matmuls


def test_fine_grained_experts_keep_the_active_flops():
    """8 experts top-1 vs 32 experts of a quarter width top-4: the same expert FLOPs per token."""
    x = torch.randn(4, 16, 16)
    coarse = MoE(16, 64, 8, top_k=1, capacity_factor=None)
    fine = MoE(16, 64, 32, top_k=4, capacity_factor=None, granularity=4)
    assert fine.hidden == 16 and tuple(fine.w_fc.shape) == (32, 16, 16)
    c, f = count_flops(coarse, x).forward, count_flops(fine, x).forward
    n = 64
    assert c - 2 * 16 * 8 * n == f - 2 * 16 * 32 * n == n * 2 * (2 * 16 * 64)  # experts equal, router aside
    model = gpt(granularity=4, top_k=2)
    assert model.transformer.h[1].mlp.moe.hidden == 16  # the GPT's 64-wide MLP in quarters


# ------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kw,name", [
    ({"bias_update_rate": -1e-3}, "bias_update_rate"),
    ({"bias_update_rate": "1e-3"}, "bias_update_rate"),
    ({"gate": "relu"}, "gate"),
    ({"balance_loss": "token"}, "balance_loss"),
    ({"n_shared_experts": -1}, "n_shared_experts"),
    ({"n_shared_experts": 1.5}, "n_shared_experts"),
    ({"granularity": 0}, "granularity"),
    ({"granularity": 3}, "granularity"),  # does not divide hidden=16
])
def test_bad_parameters_are_refused_by_name(kw, name):
    with pytest.raises(InvalidParameterError, match=f"'{name}' parameter of MoE"):
        MoE(8, 16, 4, **kw)
    where = "MoE must divide hidden=16" if kw == {"granularity": 3} else "apply_moe"  # known per block only
    with pytest.raises(InvalidParameterError, match=f"'{name}' parameter of {where}"):
        apply_moe(GPT(GPTConfig(64, 16, n_layer=2, n_head=2, n_embd=4)), 4, **kw)


def test_bad_uses_are_refused():
    with pytest.raises(InvalidParameterError, match="'model' parameter of moe_update_bias.*bias_update_rate > 0"):
        moe_update_bias(gpt())
    with pytest.raises(InvalidParameterError, match="'model' parameter of moe_update_bias"):
        moe_update_bias(torch.nn.Linear(2, 2))
    with pytest.raises(InvalidParameterError, match="MoE.update_bias needs a layer built with bias_update_rate > 0"):
        MoE(4, 8, 4).update_bias()
    with pytest.raises(InvalidParameterError, match=r"'counts' parameter of MoE.update_bias.*\(4,\).*\(3,\)"):
        MoE(4, 8, 4, bias_update_rate=0.1).update_bias(torch.ones(3))
    with pytest.raises(InvalidParameterError, match="'reset' parameter of moe_stats"):
        moe_stats(gpt(), reset=1)
    with pytest.raises(InvalidParameterError, match="'init' parameter of apply_moe must be 'random'"):
        gpt(granularity=2, init="copy")
    with pytest.raises(InvalidParameterError, match="granularity=1"):
        MoE(8, 16, 4, granularity=2).load_expert_weights(torch.zeros(8, 16), torch.zeros(16, 8))
    assert math.isfinite(MoE(8, 16, 4, granularity=16).hidden)  # 1 unit per expert is allowed
