"""SWAT under DDP (2 gloo processes): replicas stay identical, and with dense activations the
run equals one process on the global batch (the weight top-K is the same on every rank)."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.distributed import run_torchrun
from tests.sparse._ddp_swat_worker import STEPS, data, mlp

WORKER = Path(__file__).with_name("_ddp_swat_worker.py")


@pytest.mark.distributed
def test_ddp_swat(tmp_path):
    run_torchrun(WORKER, tmp_path, nproc=2)
    for tag in ("mlp", "cnn"):
        rank0, rank1 = (torch.load(tmp_path / f"{tag}-rank{r}.pt", weights_only=True) for r in (0, 1))
        for name in rank0:
            assert torch.equal(rank0[name], rank1[name]), (tag, name)

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    for step in range(STEPS):
        x, y = data(step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    rank0 = torch.load(tmp_path / "mlp-rank0.pt", weights_only=True)
    for name, p in model.named_parameters():
        assert not torch.equal(p.detach(), start[name])  # it trained
        torch.testing.assert_close(rank0[name], p.detach(), rtol=1e-4, atol=1e-5, msg=name)
