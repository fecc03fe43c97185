"""Expert-parallel MoE. Two gloo processes, E=4 (2 experts each), compared with one process:
dropless outputs and every gradient (experts scaled by 1/W, router averaged) equal the whole-batch
MoE; a finite capacity drops per rank exactly what a one-process MoE on that rank's tokens drops;
DDP training with the experts ignored stays in step with one process (losses, gathered weights).
One process: a world of 1 equals MoE, the helpers, and bad input (no process group, E not
divisible by W on a fake 2-rank group, wrong types)."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from leanscale.core.errors import InvalidParameterError
from leanscale.core.flops import count_flops
from leanscale.sparse import (
    ExpertParallelMoE,
    MoE,
    apply_expert_parallel,
    average_replicated_grads,
    expert_parameter_names,
    gather_experts,
    gathered_state_dict,
    moe_aux_loss,
    moe_layers,
    shard_experts,
)
from tests.distributed import run_torchrun
from tests.sparse._ep_moe_worker import (
    STEPS,
    gpt,
    gpt_data,
    half,
    layer,
    layer_data,
    layer_loss,
)

WORKER = Path(__file__).with_name("_ep_moe_worker.py")
W = 2


# ----------------------------------------------------------------------------- 2 processes


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep_moe")
    run_torchrun(WORKER, out, nproc=W, timeout=120)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(W)]


@pytest.mark.distributed
def test_dropless_outputs_and_gradients_equal_one_process(ranks):
    full = layer()
    x, target = layer_data()
    x = x.clone().requires_grad_()
    out = full(x)
    layer_loss(out, target).backward()  # the global mean loss
    torch.testing.assert_close(torch.cat([r["layer"]["output"] for r in ranks]), out.output.detach(),
                               rtol=0, atol=1e-5)
    assert [r["layer"]["first_expert"] for r in ranks] == [0, 2]
    for rank, res in enumerate(ranks):
        layer_res = res["layer"]
        local = slice(layer_res["first_expert"], layer_res["first_expert"] + layer_res["n_local"])
        assert set(layer_res["grads"]) == {"router.weight", "w_fc", "w_proj", "b_fc", "b_proj"}
        for name, grad in layer_res["grads"].items():
            ref = full.get_parameter(name).grad
            ref = ref if name == "router.weight" else ref[local]
            assert ref.abs().max() > 5e-4, name  # a factor W off would show
            torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-7, msg=f"rank {rank} {name}")
        # The input gradient is that of the local mean loss (W times the global one), as under DDP.
        torch.testing.assert_close(layer_res["x_grad"], W * half(x.grad, rank, W), rtol=1e-4, atol=1e-7)
        assert layer_res["ignored"] == ["w_fc", "w_proj", "b_fc", "b_proj"]


@pytest.mark.distributed
def test_capacity_is_per_rank(ranks):
    full = layer(capacity_factor=1.0, load_balancing_coef=0.01)
    x, _ = layer_data()
    dropped = []
    for rank, res in enumerate(ranks):
        cap = res["capacity"]
        xl = half(x, rank, W)
        ref = full(xl)  # one process on this rank's tokens only
        torch.testing.assert_close(cap["output"], ref.output.detach(), rtol=0, atol=1e-5)
        assert torch.equal(cap["load"], ref.load)
        assert cap["dropped"] == ref.dropped_fraction
        dropped.append(cap["dropped"])
        torch.testing.assert_close(cap["lb"], ref.load_balancing_loss.detach())
        torch.testing.assert_close(cap["z"], ref.z_loss.detach())
        flops = count_flops(full, xl)
        assert cap["flops"] == (flops.forward, flops.backward)
        # gather_experts rebuilds the layer it was sharded from.
        for name, value in full.state_dict().items():
            assert torch.equal(cap["gathered"][name], value), name
    assert dropped == [4 / 24, 3 / 24]  # tokens were dropped on both ranks
    # A capacity over the whole batch would drop other assignments: the per-rank rule matters.
    whole = full(x)
    assert whole.dropped_fraction == 3 / 48
    assert not torch.allclose(torch.cat([r["capacity"]["output"] for r in ranks]), whole.output.detach())


@pytest.mark.distributed
def test_direct_construction_equals_sharding_a_seeded_moe(ranks):
    for res in ranks:
        direct, sharded = res["init"]["direct"], res["init"]["sharded"]
        assert set(direct) == set(sharded) == {"router.weight", "w_fc", "w_proj", "b_fc", "b_proj"}
        for name in direct:
            assert torch.equal(direct[name], sharded[name]), name
    a, b = (r["init"]["direct"] for r in ranks)
    assert torch.equal(a["router.weight"], b["router.weight"])  # replicated
    assert not torch.equal(a["w_fc"], b["w_fc"])  # different experts on the two ranks


@pytest.mark.distributed
def test_ddp_training_stays_in_step_with_one_process(ranks):
    model = gpt()
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for step in range(STEPS):
        x, y = gpt_data(step)
        opt.zero_grad()
        _, loss = model(x, y)
        total = loss + moe_aux_loss(model)
        total.backward()
        opt.step()
        losses.append(total.item())
    for res in ranks:
        assert res["train"]["losses"] == pytest.approx(losses, rel=1e-6)
        state = res["train"]["state"]
        assert set(state) == set(model.state_dict())
        for name, value in model.state_dict().items():
            torch.testing.assert_close(state[name], value, rtol=1e-4, atol=1e-6, msg=name)
            if name.endswith(("w_fc", "router.weight")):
                assert not torch.equal(state[name], start[name]), name  # it trained


@pytest.mark.distributed
def test_bad_input_under_two_ranks(ranks):
    for res in ranks:
        msg = res["errors"]["n_experts"]
        assert "'n_experts'" in msg and "divisible" in msg and "Got 3" in msg
        assert "wrapped in DistributedDataParallel" in res["errors"]["ddp"]


# ----------------------------------------------------------------------------- 1 process


@pytest.fixture
def world_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_needs_a_process_group():
    assert not dist.is_initialized()
    with pytest.raises(InvalidParameterError, match="'group'.*init_process_group"):
        ExpertParallelMoE(8, 16, 4)
    with pytest.raises(InvalidParameterError, match="'group'.*no process group initialised"):
        shard_experts(MoE(8, 16, 4))


def test_n_experts_must_divide_by_world_size():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=2)
    try:
        with pytest.raises(InvalidParameterError, match="'n_experts'.*divisible.*2.*Got 3 instead"):
            ExpertParallelMoE(8, 16, 3)
        with pytest.raises(InvalidParameterError, match="'n_experts'.*Got 5 instead"):
            shard_experts(MoE(8, 16, 5))
        ep = ExpertParallelMoE(8, 16, 4, top_k=2)
        assert (ep.rank, ep.n_local_experts, ep.first_expert) == (1, 2, 2)
        assert tuple(ep.w_fc.shape) == (2, 8, 16) and tuple(ep.router.weight.shape) == (4, 8)
    finally:
        dist.destroy_process_group()


def test_bad_arguments(world_of_one):
    with pytest.raises(InvalidParameterError, match="'group'.*ProcessGroup"):
        ExpertParallelMoE(8, 16, 4, group="world")
    with pytest.raises(InvalidParameterError, match="'top_k' parameter of ExpertParallelMoE"):
        ExpertParallelMoE(8, 16, 4, top_k=5)
    with pytest.raises(InvalidParameterError, match="'moe'.*MoE"):
        shard_experts(torch.nn.Linear(8, 8))
    ep = shard_experts(MoE(8, 16, 4))
    with pytest.raises(InvalidParameterError, match="'moe'.*not already"):
        shard_experts(ep)
    with pytest.raises(InvalidParameterError, match="'ep_moe'.*ExpertParallelMoE"):
        gather_experts(MoE(8, 16, 4))
    with pytest.raises(InvalidParameterError, match="'x'.*ExpertParallelMoE.forward"):
        ep(torch.randn(3, 7))
    with pytest.raises(InvalidParameterError, match="must contain MoEMLP"):
        apply_expert_parallel(torch.nn.Linear(8, 8))


def test_world_of_one_equals_moe(world_of_one):
    torch.manual_seed(0)
    full = MoE(8, 16, 4, top_k=2, capacity_factor=1.0, bias=True)
    ep = shard_experts(full)
    assert ep.n_local_experts == 4 and "world_size=1" in repr(ep)
    x = torch.randn(3, 5, 8)
    a, b = full(x), ep(x)
    torch.testing.assert_close(b.output, a.output, rtol=0, atol=1e-6)
    assert b.dropped_fraction == a.dropped_fraction > 0
    (a.output.square().mean() + a.load_balancing_loss + a.z_loss).backward()
    (b.output.square().mean() + b.load_balancing_loss + b.z_loss).backward()
    average_replicated_grads(ep)  # the mean over one rank: unchanged
    for name, p in ep.named_parameters():
        torch.testing.assert_close(p.grad, full.get_parameter(name).grad, msg=name)
    back = gather_experts(ep)
    assert type(back) is MoE and back.capacity_factor == 1.0
    for name, value in full.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name


def test_apply_expert_parallel_on_a_gpt(world_of_one):
    model = gpt()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    apply_expert_parallel(model)
    names = expert_parameter_names(model)
    assert all(isinstance(m.moe, ExpertParallelMoE) for _, m in moe_layers(model))
    assert "transformer.h.0.mlp.moe.w_fc" in names and len(names) == 4  # 2 layers, no biases
    assert set(model._ddp_params_and_buffers_to_ignore) == set(names)
    state = gathered_state_dict(model)
    assert set(state) == set(reference)
    for name, value in reference.items():
        assert torch.equal(state[name], value), name
    x, y = gpt_data(0)
    _, loss = model(x, y)
    assert torch.isfinite(loss)
