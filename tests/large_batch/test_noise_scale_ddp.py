"""GradientNoiseScale under DDP (2 gloo processes): the hook measures the local (small) and the
averaged (big) gradient exactly as one process computes them from the two halves of each batch,
and DDP training is unchanged by it."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.distributed import run_torchrun
from tests.large_batch._ddp_noise_scale_worker import (
    GLOBAL_BATCH,
    LR,
    STEPS,
    build_model,
    data,
)

WORKER = Path(__file__).with_name("_ddp_noise_scale_worker.py")


def _flat_grad(model, x, y):
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    return torch.cat([g.reshape(-1) for g in grads])  # (n_params,)


@pytest.mark.distributed
def test_ddp_hook_measures_local_and_averaged_gradients(tmp_path):
    run_torchrun(WORKER, tmp_path, nproc=2)
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["world_size"] == 2 and rank0["local_batch"] == GLOBAL_BATCH // 2

    # Training is unchanged: the hooked replicas saw exactly DDP's default averaged gradient.
    for run in (rank0, rank1):
        for diffs in run["grad_diffs"]:
            assert diffs == {"auto": 0.0, "manual": 0.0}
    # The inner hook ran on every bucket, in order, and there were several buckets per step.
    # (DDP's first step uses one bucket; it rebuilds them afterwards by gradient arrival order.)
    iterations, current = [], None
    for index in rank0["buckets"]:
        if index == 0:
            current = []
            iterations.append(current)
        current.append(index)
    assert len(iterations) == STEPS
    assert all(it == list(range(len(it))) for it in iterations)
    assert max(len(it) for it in iterations) >= 2

    # Both ranks hold the same estimates (all-reduced), automatic and explicit modes agree.
    for key in ("history_auto", "history_manual"):
        assert len(rank0[key]) == STEPS
    assert rank0["history_auto"] == rank1["history_auto"]
    assert rank0["b_simple_auto"] == rank1["b_simple_auto"]
    assert [h["step"] for h in rank0["history_manual"]] == list(range(STEPS))
    for auto, manual in zip(rank0["history_auto"], rank0["history_manual"]):
        for k in ("small_sq_norm", "big_sq_norm", "batch_small", "batch_big", "b_simple"):
            assert auto[k] == manual[k], k

    # The same numbers from one process: small = mean over the two halves of |g_half|^2,
    # big = |mean of the halves|^2, B_small = 16, B_big = 32; then the same SGD step.
    model = build_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    half = GLOBAL_BATCH // 2
    for step, h in enumerate(rank0["history_auto"]):
        x, y = data(step)
        g0, g1 = _flat_grad(model, x[:half], y[:half]), _flat_grad(model, x[half:], y[half:])
        small = (g0.double().pow(2).sum() + g1.double().pow(2).sum()).item() / 2
        big = ((g0 + g1) / 2).double().pow(2).sum().item()
        assert (h["batch_small"], h["batch_big"]) == (half, GLOBAL_BATCH)
        assert h["small_sq_norm"] == pytest.approx(small, rel=1e-5)
        assert h["big_sq_norm"] == pytest.approx(big, rel=1e-5)
        assert math.isfinite(h["b_simple"])
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(torch.tensor(rank0["weights"][name]), p.detach(), rtol=1e-5, atol=1e-6)

    errors = rank0["errors"]
    assert "attached only once" in errors["attach_twice"]
    assert "at least 2 processes" in errors["world_of_one"] and "'ddp_model'" in errors["world_of_one"]
    assert "'local_batch_size'" in errors["step_ddp_without_batch"]
