"""Aux-loss-free balancing under DDP (2 gloo processes, buffers not broadcast): the selection
biases stay identical across ranks and equal those of one process on the whole batch (the load
counts are summed over the ranks before each update); the same with the global-batch loss and
with expert parallelism; and the global-batch loss accumulated over gradient-accumulation
micro-batches (moe_global_batch), equal to one process accumulating both ranks' micro-batches."""

from pathlib import Path

import pytest
import torch

from tests.distributed import run_torchrun
from tests.sparse._ddp_moe_balance_worker import (
    GLOBAL_BATCH,
    MICRO,
    SETTINGS,
    STEPS,
    build,
    data,
    micro_batches,
    train,
    train_accum,
)

WORKER = Path(__file__).with_name("_ddp_moe_balance_worker.py")


@pytest.mark.distributed
def test_ddp_biases_identical_across_ranks_and_equal_to_one_process(tmp_path):
    run_torchrun(WORKER, tmp_path, nproc=2)
    for tag in SETTINGS:
        rank0, rank1 = (torch.load(tmp_path / f"{tag}-rank{r}.pt", weights_only=True) for r in (0, 1))
        biases = [k for k in rank0 if k.endswith("expert_bias")]
        assert len(biases) == 2  # both MoE layers
        for name in biases:
            assert torch.equal(rank0[name], rank1[name]), (tag, name)
        assert sum(rank0[name].abs().sum() for name in biases) > 0, tag  # the updates happened
        model = build(tag)
        if tag == "global_accum":  # one process: micro-batch j = both ranks' micro-batches j
            local, m = GLOBAL_BATCH // 2, GLOBAL_BATCH // 2 // MICRO
            rows = [torch.cat([torch.arange(r * local + j * m, r * local + (j + 1) * m) for r in (0, 1)])
                    for j in range(MICRO)]
            train_accum(model, [micro_batches(s, rows.__getitem__) for s in range(STEPS)])
        else:
            train(model, [data(s) for s in range(STEPS)])  # one process, whole batches
        single = model.state_dict()
        for name in biases:
            torch.testing.assert_close(rank0[name], single[name], rtol=0, atol=1e-6, msg=f"{tag} {name}")
        for name, value in single.items():
            torch.testing.assert_close(rank0[name], value, rtol=1e-4, atol=1e-5, msg=f"{tag} {name}")
