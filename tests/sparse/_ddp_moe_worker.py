"""Worker for test_moe_ddp.py: train a small MoE GPT for a few steps under DDP (gloo).

Each rank takes its contiguous half of every global batch; rank r saves its parameters to
``OUT/{tag}-rank{r}.pt``. Usage: torchrun --nproc_per_node=2 _ddp_moe_worker.py OUT
"""

import gc
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from leanscale.models import GPT, GPTConfig
from leanscale.sparse import apply_moe, moe_aux_loss

GLOBAL_BATCH, SEQ, VOCAB, STEPS = 8, 16, 64, 3


def data(step):
    g = torch.Generator().manual_seed(200 + step)
    idx = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
    return idx[:, :-1], idx[:, 1:]


def exact():
    """Dropless routing is per token and the z-loss a mean over tokens: with the balancing loss
    off, 2 ranks on half batches equal one process on the whole batch."""
    torch.manual_seed(0)
    return apply_moe(GPT(GPTConfig(VOCAB, SEQ, n_layer=2, n_head=2, n_embd=16)), 4, every=1,
                     capacity_factor=None, load_balancing_coef=0.0)


def balanced():
    torch.manual_seed(0)
    return apply_moe(GPT(GPTConfig(VOCAB, SEQ, n_layer=2, n_head=2, n_embd=16)), 4, top_k=2, capacity_factor=1.0)


def train(model, rank, world):
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    local = GLOBAL_BATCH // world
    for step in range(STEPS):
        x, y = data(step)
        x, y = x[rank * local:(rank + 1) * local], y[rank * local:(rank + 1) * local]
        opt.zero_grad()
        _, loss = ddp(x, y)
        (loss + moe_aux_loss(model)).backward()
        opt.step()
    del ddp, opt
    gc.collect()


def main(out):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for tag, build in (("exact", exact), ("balanced", balanced)):
        model = build()
        train(model, rank, world)
        torch.save({k: v.detach().clone() for k, v in model.named_parameters()}, f"{out}/{tag}-rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
