"""InfoBatch under torchrun (2 gloo processes): the ranks' shards split the single-process epoch,
and the all-gathered loss table is the same on both ranks and equal to one process fed the whole
global batches."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from leanscale.pruning.infobatch import InfoBatch
from tests.distributed import run_torchrun
from tests.pruning._ddp_infobatch_worker import (
    LOCAL_BATCH,
    N_EXAMPLES,
    NUM_EPOCHS,
    SEED,
    scripted_losses,
)

WORKER = Path(__file__).with_name("_ddp_infobatch_worker.py")
WORLD = 2


def _single_process_reference(drop_last: bool) -> dict:
    """One process, world 1, fed each global batch = rank 0's batch then rank 1's batch."""
    ib = InfoBatch(N_EXAMPLES, epochs=NUM_EPOCHS, prune_ratio=0.5, seed=SEED)
    orders, weights = [], []
    for epoch in range(NUM_EPOCHS):
        order = ib.epoch_indices(epoch).numpy()  # (n_kept,)
        orders.append(order)
        weights.append(ib.weights(np.arange(N_EXAMPLES)).numpy())  # (n,)
        if drop_last:
            total = (order.size // WORLD) * WORLD
            padded = order[:total]
        else:
            total = math.ceil(order.size / WORLD) * WORLD
            padded = np.concatenate([order, order[: total - order.size]])
        shards = [padded[r::WORLD] for r in range(WORLD)]
        for start in range(0, shards[0].size, LOCAL_BATCH):
            batch = np.concatenate([s[start:start + LOCAL_BATCH] for s in shards])
            ib.update(batch, scripted_losses(batch, epoch))
    return {"orders": orders, "weights": weights, "losses": ib.losses_, "history": ib.history_}


@pytest.mark.distributed
def test_infobatch_shards_and_gathered_losses_match_one_process(tmp_path):
    run_torchrun(WORKER, tmp_path, nproc=WORLD)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]

    for mode in ("padded", "drop_last"):
        runs = [r[mode] for r in ranks]
        ref = _single_process_reference(drop_last=mode == "drop_last")
        assert [run["rank"] for run in runs] == [0, 1] and runs[0]["world_size"] == WORLD
        pruned_epochs = 0
        for epoch in range(NUM_EPOCHS):
            order = ref["orders"][epoch]
            s0, s1 = (np.array(run["shards"][epoch]) for run in runs)
            assert s0.size == s1.size  # every rank runs the same number of steps
            interleaved = np.empty(s0.size + s1.size, dtype=np.int64)
            interleaved[0::2], interleaved[1::2] = s0, s1
            if mode == "padded":
                n_pad = interleaved.size - order.size
                assert 0 <= n_pad < WORLD
                # union = the single-process epoch; the only shared examples are the padding
                np.testing.assert_array_equal(interleaved[: order.size], order)
                np.testing.assert_array_equal(interleaved[order.size:], order[:n_pad])
                assert set(s0) | set(s1) == set(order.tolist())
                assert len(set(s0) & set(s1)) == n_pad
            else:
                np.testing.assert_array_equal(interleaved, order[: interleaved.size])
                assert not set(s0) & set(s1)
                assert order.size - interleaved.size < WORLD
            pruned_epochs += order.size < N_EXAMPLES
            # the weights each rank used are those of the single-process plan
            for run, shard in zip(runs, (s0, s1)):
                np.testing.assert_array_equal(np.array(run["weights"][epoch]), ref["weights"][epoch][shard])
            assert runs[0]["history"][epoch] == runs[1]["history"][epoch]
        assert pruned_epochs >= 3  # the test exercises pruning, not only full epochs
        # the loss tables: identical on both ranks and equal to the single process
        np.testing.assert_array_equal(np.array(runs[0]["losses"]), np.array(runs[1]["losses"]))
        np.testing.assert_array_equal(np.array(runs[0]["losses"]), ref["losses"])
        assert runs[0]["history"] == json.loads(json.dumps(ref["history"]))

    # uneven batches (3 and 5 examples) are gathered whole, on both ranks
    expected = {i: float(v) for i, v in zip(range(3), scripted_losses(np.arange(3), 0))}
    expected.update({i: float(v) for i, v in zip(range(10, 15), scripted_losses(np.arange(10, 15), 0))})
    for r in ranks:
        got = {i: v for i, v in enumerate(r["uneven_losses"]) if v is not None}
        assert got == expected

