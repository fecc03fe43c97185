"""Data pruning with your own model and your own training loop.

1. A short scoring run of YOUR loop feeds a ``ForgettingTracker`` each step; after it,
   ``collect_probs`` + ``el2n_scores`` score every example (Paul et al. 2021).
2. ``select`` keeps a class-balanced fraction (``strategy="auto"``: Sorscher's rule).
3. The final model trains on the kept examples only, with ``InfoBatch`` skipping part of the
   well-learned ones each epoch (unbiased: the rest are reweighted).

Runs in one process, or under ``torchrun --nproc_per_node=2 examples/pruning_own_loop.py``: DDP
trains, the tracker and InfoBatch all-gather their per-example state, every rank selects the same
subset.

Usage: python examples/pruning_own_loop.py [--n-train 6000] [--keep 0.5] [--epochs 3]
"""

from __future__ import annotations

import argparse
import gc

import torch
import torch.nn.functional as F
from torch import nn

from leanscale.core.distributed import init_from_env, rank_and_world, shutdown
from leanscale.data.fashion_mnist import fashion_mnist_tensors
from leanscale.pruning import ForgettingTracker, InfoBatch, collect_probs, el2n_scores, select


class SmallCNN(nn.Module):
    """Your model: anything that maps a batch to logits."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 16, 14, 14)
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 32, 7, 7)
            nn.Flatten(), nn.Linear(32 * 7 * 7, 10),
        )

    def forward(self, x):
        return self.net(x)


def wrap(model):
    _, world = rank_and_world()
    return nn.parallel.DistributedDataParallel(model) if world > 1 else model


def train(x, y, epochs, seed, *, tracker=None, infobatch=None, batch=128, lr=0.05):
    """Your loop. Each rank takes its slice of every global batch (the same permutation everywhere)."""
    rank, world = rank_and_world()
    torch.manual_seed(seed)
    model = SmallCNN()
    ddp = wrap(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        if infobatch is not None:
            # InfoBatch already shards over ranks: this rank's indices of the (pruned) epoch.
            order = infobatch.epoch_indices(epoch)
            batches = [order[i:i + batch // world] for i in range(0, len(order), batch // world)]
        else:
            order = torch.randperm(len(y), generator=gen)
            batches = [order[i:i + batch][rank::world] for i in range(0, len(order) - batch + 1, batch)]
        for idx in batches:
            logits = ddp(x[idx])
            losses = F.cross_entropy(logits, y[idx], reduction="none")  # (b,)
            weights = infobatch.weights(idx) if infobatch is not None else torch.ones_like(losses)
            opt.zero_grad()
            (losses * weights).mean().backward()
            opt.step()
            if tracker is not None:
                tracker.update(idx, logits.argmax(1) == y[idx])  # all-gathered under DDP
            if infobatch is not None:
                infobatch.update(idx, losses.detach())
    del ddp, opt
    gc.collect()
    return model


def accuracy(model, x, y):
    return float((collect_probs(model, x).argmax(1) == y.numpy()).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-train", type=int, default=6000)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--score-epochs", type=int, default=2)
    args = ap.parse_args()
    started = init_from_env()
    rank, _ = rank_and_world()

    train_set = fashion_mnist_tensors("train", n=args.n_train)
    test = fashion_mnist_tensors("test", n=args.n_test)
    x, y = train_set.x, train_set.y

    # 1. Score: a short run of your loop; forgetting events during it, EL2N after it.
    tracker = ForgettingTracker(len(y))
    early = train(x, y, args.score_epochs, seed=1, tracker=tracker)
    el2n = el2n_scores(collect_probs(early, x), y.numpy())

    # 2. Select: class-balanced; "auto" keeps easy examples when less than 40% of the data is kept.
    kept = select(el2n, args.keep, strategy="auto", labels=y.numpy())
    kept_t = torch.as_tensor(kept)

    # 3. Train on the kept examples, with InfoBatch on top; and on all data for comparison.
    ib = InfoBatch(len(kept), epochs=args.epochs, prune_ratio=0.5, delta=0.875, seed=0)
    pruned = train(x[kept_t], y[kept_t], args.epochs, seed=2, infobatch=ib)
    full = train(x, y, args.epochs, seed=2)
    if rank == 0:
        print(f"scored {len(y)} examples: EL2N median {float(torch.as_tensor(el2n).median()):.3f}, "
              f"{int((tracker.counts_ > 0).sum())} examples forgotten at least once")
        print(f"kept {len(kept)} of {len(y)} ({args.keep:.0%}); InfoBatch skipped "
              f"{ib.fraction_skipped_:.1%} of the remaining example-epochs")
        print(f"test accuracy: all data {accuracy(full, test.x, test.y):.4f}, "
              f"pruned + InfoBatch {accuracy(pruned, test.x, test.y):.4f}")
    if started:
        shutdown()


if __name__ == "__main__":
    main()
