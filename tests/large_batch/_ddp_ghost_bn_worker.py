"""Worker for test_ghost_bn_ddp.py: train a Ghost-BN CNN for a few steps under DDP (gloo).

Each rank takes its contiguous half of every global batch; rank r saves its parameters to
``OUT/rank{r}.pt``. Usage: torchrun --nproc_per_node=2 _ddp_ghost_bn_worker.py OUT
"""

import gc
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from leanscale.large_batch.ghost_bn import apply_ghost_batchnorm
from leanscale.models.cnn import BNCNN

GLOBAL_BATCH, GHOST, STEPS = 32, 8, 3


def data(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, 1, 12, 12, generator=g), torch.randint(0, 10, (GLOBAL_BATCH,), generator=g)


def main(out):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = apply_ghost_batchnorm(BNCNN(width=4), GHOST)
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    local = GLOBAL_BATCH // world
    for step in range(STEPS):
        x, y = data(step)
        x, y = x[rank * local:(rank + 1) * local], y[rank * local:(rank + 1) * local]
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        opt.step()
    torch.save({k: v.detach().clone() for k, v in model.named_parameters()}, f"{out}/rank{rank}.pt")
    del ddp, opt
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
