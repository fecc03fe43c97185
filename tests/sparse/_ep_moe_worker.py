"""Worker for test_moe_expert_parallel.py: expert parallelism over 2 gloo processes, E=4.

Each rank takes its contiguous half of every batch and saves ``OUT/rank{r}.pt`` with:
``layer`` (dropless, top-2, biases: output, grads after averaging the router's), ``capacity``
(capacity_factor=1.0: output, load, dropped fraction, losses, FLOPs), ``init`` (the layer built
directly vs sharded from a seeded MoE), ``train`` (a MoE GPT under DDP for a few SGD steps:
global losses and the gathered state dict), ``errors`` (messages of bad input).
Usage: torchrun --nproc_per_node=2 _ep_moe_worker.py OUT
"""

import gc
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from leanscale.core.errors import InvalidParameterError
from leanscale.core.flops import count_flops
from leanscale.models import GPT, GPTConfig
from leanscale.sparse import (
    ExpertParallelMoE,
    MoE,
    apply_expert_parallel,
    apply_moe,
    average_replicated_grads,
    expert_parameter_names,
    gather_experts,
    gathered_state_dict,
    moe_aux_loss,
    shard_experts,
)

C, H, E = 8, 16, 4
GLOBAL_BATCH, SEQ, VOCAB, STEPS = 8, 16, 64, 3


def layer(capacity_factor=None, load_balancing_coef=0.0):
    """The single-process MoE every rank starts from (top-2, biases made non-zero)."""
    torch.manual_seed(0)
    moe = MoE(C, H, E, top_k=2, capacity_factor=capacity_factor, load_balancing_coef=load_balancing_coef, bias=True)
    with torch.no_grad():
        moe.b_fc.normal_(0.0, 0.1)
        moe.b_proj.normal_(0.0, 0.1)
    return moe


def layer_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 6, C, generator=g), torch.randn(4, 6, C, generator=g)  # x, target


def layer_loss(out, target):
    """Mean over the tokens given (local tokens on a rank, all of them on one process)."""
    return ((out.output - target) ** 2).mean() + out.z_loss


def gpt():
    torch.manual_seed(0)
    return apply_moe(GPT(GPTConfig(VOCAB, SEQ, n_layer=2, n_head=2, n_embd=16)), E, every=1, top_k=2,
                     capacity_factor=None, load_balancing_coef=0.0)


def gpt_data(step):
    g = torch.Generator().manual_seed(200 + step)
    idx = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
    return idx[:, :-1], idx[:, 1:]


def half(t, rank, world):
    n = t.shape[0] // world
    return t[rank * n:(rank + 1) * n]


def run_layer(rank, world):
    x, target = layer_data()
    ep = shard_experts(layer())
    xl = half(x, rank, world).clone().requires_grad_()
    out = ep(xl)
    layer_loss(out, half(target, rank, world)).backward()
    average_replicated_grads(ep)
    grads = {n: p.grad.clone() for n, p in ep.named_parameters()}
    return {"output": out.output.detach(), "x_grad": xl.grad, "grads": grads, "first_expert": ep.first_expert,
            "n_local": ep.n_local_experts, "ignored": expert_parameter_names(ep)}


def run_capacity(rank, world):
    x, _ = layer_data()
    full = layer(capacity_factor=1.0, load_balancing_coef=0.01)
    ep = shard_experts(full)
    xl = half(x, rank, world)
    out = ep(xl)
    flops = count_flops(ep, xl)
    return {"output": out.output.detach(), "load": out.load, "dropped": out.dropped_fraction,
            "lb": out.load_balancing_loss.detach(), "z": out.z_loss.detach(),
            "flops": (flops.forward, flops.backward), "gathered": gather_experts(ep).state_dict()}


def run_init():
    torch.manual_seed(3)
    direct = ExpertParallelMoE(C, H, E, top_k=2, bias=True)
    torch.manual_seed(3)
    sharded = shard_experts(MoE(C, H, E, top_k=2, bias=True))
    return {"direct": direct.state_dict(), "sharded": sharded.state_dict()}


def run_train(rank, world):
    model = apply_expert_parallel(gpt())
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    losses = []
    for step in range(STEPS):
        x, y = gpt_data(step)
        opt.zero_grad()
        _, loss = ddp(half(x, rank, world), half(y, rank, world))
        total = loss + moe_aux_loss(model)
        total.backward()
        opt.step()
        mean = total.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / world)
    state = gathered_state_dict(model)
    del ddp, opt
    gc.collect()
    return {"losses": losses, "state": state}


def run_errors():
    messages = {}
    try:
        ExpertParallelMoE(C, H, 3)
    except InvalidParameterError as err:
        messages["n_experts"] = str(err)
    try:
        apply_expert_parallel(DDP(gpt()))
    except InvalidParameterError as err:
        messages["ddp"] = str(err)
    gc.collect()
    return messages


def main(out):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {
        "layer": run_layer(rank, world),
        "capacity": run_capacity(rank, world),
        "init": run_init(),
        "train": run_train(rank, world),
        "errors": run_errors(),
    }
    torch.save(result, f"{out}/rank{rank}.pt")
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
