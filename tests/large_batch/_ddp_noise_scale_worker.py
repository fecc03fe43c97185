"""Worker for test_noise_scale_ddp.py: DDP training with GradientNoiseScale.attach_ddp (gloo).

Three DDP replicas of the same MLP train on the same data, rank r taking the r-th contiguous
slice of every global batch: one with the noise-scale hook (automatic updates, small buckets so
the hook sees several, an inner counting hook), one with the hook and explicit ``step_ddp``, one
plain. Rank r writes ``OUT/rank{r}.json``: both histories, how far the hooked gradients are from
the plain ones at every step, the bucket indices the inner hook saw, the final weights and the
errors of the bad-use checks.

Usage: torchrun --nproc_per_node=2 _ddp_noise_scale_worker.py OUT
"""

import copy
import gc
import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from leanscale.core.errors import InvalidParameterError
from leanscale.large_batch.noise_scale import GradientNoiseScale

GLOBAL_BATCH, STEPS, LR = 32, 4, 0.2
BUCKET_CAP_MB = 0.002  # ~2 KB buckets: the 1.4k-parameter (5.5 KB) MLP is split over several


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))


def data(step):
    g = torch.Generator().manual_seed(200 + step)
    return torch.randn(GLOBAL_BATCH, 6, generator=g), torch.randint(0, 3, (GLOBAL_BATCH,), generator=g)


def main(out):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local = GLOBAL_BATCH // world
    base = build_model()
    models = {name: copy.deepcopy(base) for name in ("auto", "manual", "plain")}
    ddps = {name: DDP(m, bucket_cap_mb=BUCKET_CAP_MB) for name, m in models.items()}
    opts = {name: torch.optim.SGD(d.parameters(), lr=LR) for name, d in ddps.items()}

    seen_buckets = []

    def counting_hook(state, bucket):  # an inner hook: the default averaging, recording the bucket order
        seen_buckets.append(bucket.index())
        return allreduce_hook(state, bucket)

    errors = {}
    gns_auto = GradientNoiseScale(beta=0.9).attach_ddp(ddps["auto"], local, hook=counting_hook)
    gns_manual = GradientNoiseScale(beta=0.9).attach_ddp(ddps["manual"])
    try:
        gns_auto.attach_ddp(ddps["auto"], local)
    except InvalidParameterError as exc:
        errors["attach_twice"] = str(exc)
    # a world of one process per group: local and averaged gradients would coincide
    groups = [dist.new_group([r]) for r in range(world)]
    single = DDP(copy.deepcopy(base), process_group=groups[rank])
    try:
        GradientNoiseScale().attach_ddp(single, local)
    except InvalidParameterError as exc:
        errors["world_of_one"] = str(exc)

    grad_diffs = []
    for step in range(STEPS):
        x, y = data(step)
        x, y = x[rank * local:(rank + 1) * local], y[rank * local:(rank + 1) * local]  # (local, 6), (local,)
        for name, ddp in ddps.items():
            opts[name].zero_grad()
            F.cross_entropy(ddp(x), y).backward()
        plain = [p.grad for p in models["plain"].parameters()]
        grad_diffs.append({
            name: max(float((p.grad - q).abs().max()) for p, q in zip(models[name].parameters(), plain))
            for name in ("auto", "manual")
        })
        if step == 0:
            try:
                gns_manual.step_ddp()  # attached without a batch size and none given
            except InvalidParameterError as exc:
                errors["step_ddp_without_batch"] = str(exc)
        gns_manual.step_ddp(local, step=step)
        for opt in opts.values():
            opt.step()

    result = {
        "world_size": world,
        "local_batch": local,
        "history_auto": gns_auto.history,
        "history_manual": gns_manual.history,
        "b_simple_auto": gns_auto.b_simple,
        "grad_diffs": grad_diffs,
        "buckets": seen_buckets,
        "errors": errors,
        "weights": {k: v.detach().tolist() for k, v in models["auto"].named_parameters()},
    }
    with open(f"{out}/rank{rank}.json", "w") as fh:
        json.dump(result, fh)
    del ddps, opts, single, models, gns_auto, gns_manual
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
