"""Worker for test_infobatch_ddp.py: InfoBatch under torchrun (gloo), scripted losses.

Every rank runs the same loop: each epoch, take this rank's shard, walk it in batches of
``LOCAL_BATCH``, record the scripted loss of each example with ``update`` (a collective). Two
samplers run side by side: padded (default) and ``drop_last=True``. A third checks that batches
of different sizes on the two ranks are gathered whole. Rank r writes ``OUT/rank{r}.json``.

Usage: torchrun --nproc_per_node=2 _ddp_infobatch_worker.py OUT
"""

import json
import sys

import numpy as np
import torch
import torch.distributed as dist

from leanscale.core.distributed import shutdown
from leanscale.pruning.infobatch import InfoBatch

N_EXAMPLES, NUM_EPOCHS, LOCAL_BATCH, SEED = 103, 6, 8, 3  # 103: odd, so padding/dropping happens


def scripted_losses(indices: np.ndarray, epoch: int) -> np.ndarray:
    """A per-example loss that falls with the epoch at an example-specific rate, float64 (b,)."""
    difficulty = ((indices * 7919) % 101) / 101.0
    return difficulty * np.exp(-0.3 * epoch) + 0.05 * ((indices + epoch) % 3)


def run_epochs(ib: InfoBatch) -> dict:
    shards, weights = [], []
    for epoch in range(NUM_EPOCHS):
        idx = ib.epoch_indices(epoch)  # (n_local,)
        assert list(ib.sampler(epoch)) == idx.tolist()  # the Sampler view yields the same shard
        shards.append(idx.tolist())
        weights.append(ib.weights(idx).tolist())
        for start in range(0, len(idx), LOCAL_BATCH):
            batch = idx[start:start + LOCAL_BATCH]
            ib.update(batch, torch.from_numpy(scripted_losses(batch.numpy(), epoch)))
    return {"shards": shards, "weights": weights, "losses": ib.losses_.tolist(), "history": ib.history_,
            "rank": ib.rank, "world_size": ib.world_size}


def main(out):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = {
        "padded": run_epochs(InfoBatch(N_EXAMPLES, epochs=NUM_EPOCHS, prune_ratio=0.5, seed=SEED)),
        "drop_last": run_epochs(InfoBatch(N_EXAMPLES, epochs=NUM_EPOCHS, prune_ratio=0.5, seed=SEED,
                                          drop_last=True)),
    }
    # Batches of different sizes: rank 0 records 3 examples, rank 1 records 5.
    uneven = InfoBatch(N_EXAMPLES, epochs=NUM_EPOCHS)
    mine = np.arange(3) if rank == 0 else np.arange(10, 15)
    uneven.update(mine, scripted_losses(mine, 0))
    result["uneven_losses"] = [None if np.isnan(v) else v for v in uneven.losses_.tolist()]
    with open(f"{out}/rank{rank}.json", "w") as fh:
        json.dump(result, fh)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
