"""Worker for test_swat_ddp.py: train SWAT models for a few steps under DDP (gloo).

Each rank takes its contiguous half of every global batch and saves its parameters to
``OUT/{tag}-rank{r}.pt``. Usage: torchrun --nproc_per_node=2 _ddp_swat_worker.py OUT
"""

import gc
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from leanscale.models.cnn import BNCNN, MLPClassifier
from leanscale.sparse import apply_swat

GLOBAL_BATCH, STEPS = 32, 4


def data(step, image=False):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(GLOBAL_BATCH, 1, 12, 12, generator=g) if image else torch.randn(GLOBAL_BATCH, 24, generator=g)
    return x, torch.randint(0, 5, (GLOBAL_BATCH,), generator=g)


def mlp():
    """No BatchNorm (its statistics are per rank) and dense activations: the DDP run must equal
    one process on the global batch exactly (the weight top-K is the same on every rank)."""
    torch.manual_seed(0)
    return apply_swat(MLPClassifier(24, 32, 5, batchnorm=False), 0.8, activation_sparsity=0.0,
                      dense_first_layer=False)


def cnn():
    torch.manual_seed(0)
    return apply_swat(BNCNN(n_classes=5, width=4), 0.8, distribution="erk", topk_period=2)


def train(model, image, rank, world):
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    local = GLOBAL_BATCH // world
    for step in range(STEPS):
        x, y = data(step, image)
        x, y = x[rank * local:(rank + 1) * local], y[rank * local:(rank + 1) * local]
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        opt.step()
    del ddp, opt
    gc.collect()


def main(out):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for tag, build, image in (("mlp", mlp, False), ("cnn", cnn, True)):
        model = build()
        train(model, image, rank, world)
        torch.save({k: v.detach().clone() for k, v in model.named_parameters()}, f"{out}/{tag}-rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
