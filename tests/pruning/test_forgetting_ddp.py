"""ForgettingTracker under torchrun (2 gloo processes): each rank feeds its half of every global
batch and both ranks end with the tracker one process builds from the whole global batches."""

import json
from pathlib import Path

import numpy as np
import pytest

from leanscale.pruning.forgetting import ForgettingTracker
from tests.distributed import run_torchrun
from tests.pruning._ddp_forgetting_worker import N_EXAMPLES, global_batches

WORKER = Path(__file__).with_name("_ddp_forgetting_worker.py")


@pytest.mark.distributed
def test_ddp_tracker_equals_single_process_tracker(tmp_path):
    run_torchrun(WORKER, tmp_path, nproc=2)
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["world_size"] == 2

    single = ForgettingTracker(N_EXAMPLES)
    for idx, correct in global_batches():
        single.update(idx, correct)
    assert single.counts_.max() >= 2 and not single.ever_correct_.all()  # forgetting and never learned occur
    for run in (rank0, rank1):
        assert run["state"] == single.state_dict()
        np.testing.assert_array_equal(run["scores"], single.scores(allow_unseen=True))

    # the bad index of rank 1 was reported on both ranks, nothing recorded
    for run in (rank0, rank1):
        assert len(run["errors"]) == 1
        assert f"must be in [0, {N_EXAMPLES})" in run["errors"][0]
        assert f"Got {N_EXAMPLES} at position 1 of the batch gathered from all ranks" in run["errors"][0]
