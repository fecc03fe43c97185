"""Ghost BatchNorm under DDP: each rank splits its own local batch, so 2 ranks with local batch
16 and ghost 8 train exactly like one process with batch 32 and ghost 8 (same ghost batches)."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from leanscale.large_batch.ghost_bn import apply_ghost_batchnorm
from leanscale.models.cnn import BNCNN
from tests.distributed import run_torchrun
from tests.large_batch._ddp_ghost_bn_worker import GHOST, STEPS, data

WORKER = Path(__file__).with_name("_ddp_ghost_bn_worker.py")


@pytest.mark.distributed
def test_ddp_ghost_batchnorm_matches_single_process(tmp_path):
    run_torchrun(WORKER, tmp_path, nproc=2)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name  # DDP kept the replicas identical

    torch.manual_seed(0)
    model = apply_ghost_batchnorm(BNCNN(width=4), GHOST)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(STEPS):
        x, y = data(step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(rank0[name], p.detach(), rtol=1e-4, atol=1e-5, msg=name)
