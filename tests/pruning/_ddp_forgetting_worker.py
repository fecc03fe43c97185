"""Worker for test_forgetting_ddp.py: a ForgettingTracker fed by 2 gloo processes.

Every rank passes its contiguous slice of each global batch (slices of different sizes, and an
empty one for a batch of one example); ``update`` all-gathers them. Then rank 1 passes an index out
of range while rank 0 passes a valid one: both must raise the same error (checked after the
gather, so neither rank is left waiting in a collective). Rank r writes ``OUT/rank{r}.json``:
the tracker's state_dict, its scores and the error messages.

Usage: torchrun --nproc_per_node=2 _ddp_forgetting_worker.py OUT
"""

import json
import sys

import numpy as np
import torch
import torch.distributed as dist

from leanscale.core.distributed import shutdown
from leanscale.core.errors import InvalidParameterError
from leanscale.pruning.forgetting import ForgettingTracker

N_EXAMPLES = 23
BATCH_SIZES = [9, 1, 8, 5, 23, 2, 17, 23, 11, 23]  # 1: rank 0's slice is empty


def global_batches():
    """The same ``(indices, correct)`` global batches on every rank and in the test."""
    rng = np.random.default_rng(7)
    batches = []
    for size in BATCH_SIZES:
        idx = rng.permutation(N_EXAMPLES)[:size]  # (size,) distinct examples
        correct = rng.random(size) < 0.6  # (size,) a noisy learner
        batches.append((idx, correct))
    return batches


def main(out):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tracker = ForgettingTracker(N_EXAMPLES)
    for step, (idx, correct) in enumerate(global_batches()):
        start, stop = rank * len(idx) // world, (rank + 1) * len(idx) // world
        local_idx, local_correct = idx[start:stop], correct[start:stop]
        if step % 2:  # tensors on odd steps, numpy arrays on even ones
            local_idx, local_correct = torch.from_numpy(local_idx), torch.from_numpy(local_correct)
        tracker.update(local_idx, local_correct)
    errors = []
    try:
        tracker.update([N_EXAMPLES + rank - 1], [True])  # rank 0: a valid index, rank 1: out of range
    except InvalidParameterError as exc:
        errors.append(str(exc))
    result = {
        "world_size": world,
        "state": tracker.state_dict(),
        "scores": tracker.scores(allow_unseen=True).tolist(),
        "errors": errors,
    }
    with open(f"{out}/rank{rank}.json", "w") as fh:
        json.dump(result, fh)
    del tracker
    shutdown()  # gc.collect, barrier, destroy_process_group


if __name__ == "__main__":
    main(sys.argv[1])
