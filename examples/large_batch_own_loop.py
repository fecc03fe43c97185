"""Large-batch training in your own PyTorch loop, with leanscale's pieces as drop-ins.

A plain loop over Fashion-MNIST (any (x, y) tensors work the same way):

1. ``LargeBatchRecipe`` turns the small-batch settings into large-batch ones;
2. ``recipe.apply`` swaps BatchNorm for Ghost BatchNorm, ``recipe.scheduler`` gives the warmup
   and the adapted LR drops;
3. ``GradientNoiseScale`` measures B_simple during training from the micro-batches of gradient
   accumulation, and ``advise()`` says what batch and LR the measurement suggests.

Runs in one process, or under ``torchrun --nproc_per_node=2 examples/large_batch_own_loop.py``
(each rank takes its slice of every batch; the noise scale then uses local vs all-reduced
gradients instead of micro-batches).

Usage: python examples/large_batch_own_loop.py [--batch 1024] [--n-train 12000] [--epochs 1]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from leanscale.core.distributed import init_from_env, rank_and_world, shutdown
from leanscale.data.fashion_mnist import fashion_mnist_tensors
from leanscale.large_batch import (
    GradientNoiseScale,
    LargeBatchRecipe,
    accumulate_running_stats,
)
from leanscale.train.classifier import evaluate
from leanscale.models import BNCNN


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--n-train", type=int, default=12000)
    ap.add_argument("--epochs", type=float, default=1.0, help="small-batch epochs")
    ap.add_argument("--micro", type=int, default=256, help="micro-batch of gradient accumulation (1 process)")
    args = ap.parse_args()

    started = init_from_env()
    rank, world = rank_and_world()
    train = fashion_mnist_tensors("train", n=args.n_train)
    test = fashion_mnist_tensors("test", n=2000)

    # 1. The small-batch run we know works: batch 128, LR 0.1, LR / 10 at 50% and 75%.
    recipe = LargeBatchRecipe(batch_size=args.batch, base_batch_size=128, base_lr=0.1, base_epochs=args.epochs,
                              base_milestones=(0.5 * args.epochs, 0.75 * args.epochs), warmup_epochs=0.5 * args.epochs)
    plan = recipe.plan()
    if rank == 0:
        print(recipe.describe())

    # 2. Model, optimizer, Ghost BatchNorm, schedule.
    torch.manual_seed(0)
    model = BNCNN(width=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=plan.lr, momentum=0.9, weight_decay=5e-4)
    recipe.apply(model, optimizer)
    steps_per_epoch = len(train.y) // args.batch
    scheduler = recipe.scheduler(optimizer, steps_per_epoch)
    total_steps = int(plan.epochs * steps_per_epoch)

    # 3. The noise scale: accumulation micro-batches (1 process) or local vs global gradients (DDP).
    gns = GradientNoiseScale(beta=0.9)
    net = model
    local = args.batch // world
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model)
        gns.attach_ddp(net, local_batch_size=local)
    micro = min(args.micro, local)

    gen = torch.Generator().manual_seed(0)
    perm, pos = torch.randperm(len(train.y), generator=gen), 0
    for step in range(total_steps):
        if pos + args.batch > len(perm):
            perm, pos = torch.randperm(len(train.y), generator=gen), 0
        idx = perm[pos:pos + args.batch][rank * local:(rank + 1) * local]
        pos += args.batch
        optimizer.zero_grad()
        if world > 1:
            F.cross_entropy(net(train.x[idx]), train.y[idx]).backward()  # the hook records both norms
        else:
            with accumulate_running_stats(model):  # one BatchNorm running-stats update per step
                for part in idx.split(micro):
                    (F.cross_entropy(model(train.x[part]), train.y[part]) * len(part) / local).backward()
                    gns.accumulate(model)  # this micro-batch's gradient
            gns.step(model, micro)  # small = micro-batches, big = their mean
        optimizer.step()
        scheduler.step()

    accuracy, _ = evaluate(model, test.x, test.y)
    if rank == 0:
        print(f"test accuracy {accuracy:.4f} after {total_steps} steps of {args.batch}")
        if gns.n_updates:
            print(gns.advise(base_lr=0.1, base_batch_size=128))
    if started:
        del net, optimizer  # the torchrun exit rule: no DDP objects alive at shutdown
        shutdown()


if __name__ == "__main__":
    main()
