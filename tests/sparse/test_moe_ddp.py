"""MoE under DDP (2 gloo processes): replicas stay identical (top-2 with capacity and the
balancing loss), and dropless routing without the balancing loss equals one process."""

from pathlib import Path

import pytest
import torch

from leanscale.sparse import moe_aux_loss
from tests.distributed import run_torchrun
from tests.sparse._ddp_moe_worker import STEPS, data, exact

WORKER = Path(__file__).with_name("_ddp_moe_worker.py")


@pytest.mark.distributed
def test_ddp_moe(tmp_path):
    run_torchrun(WORKER, tmp_path, nproc=2)
    for tag in ("exact", "balanced"):
        rank0, rank1 = (torch.load(tmp_path / f"{tag}-rank{r}.pt", weights_only=True) for r in (0, 1))
        for name in rank0:
            assert torch.equal(rank0[name], rank1[name]), (tag, name)

    model = exact()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    for step in range(STEPS):
        x, y = data(step)
        opt.zero_grad()
        _, loss = model(x, y)
        (loss + moe_aux_loss(model)).backward()
        opt.step()
    rank0 = torch.load(tmp_path / "exact-rank0.pt", weights_only=True)
    for name, p in model.named_parameters():
        if "router" in name or "w_fc" in name:
            assert not torch.equal(p.detach(), start[name]), name  # the experts and the router trained
        torch.testing.assert_close(rank0[name], p.detach(), rtol=1e-4, atol=1e-5, msg=name)
