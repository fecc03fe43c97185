"""Worker for test_critical_batch.py: ``train_classifier`` with a batch-size schedule under DDP (gloo).

Every rank trains its slice (global batch / world) of each phase's batches; rank 0 writes the history,
the steps and the final weights to ``OUT/rank0.json``. :func:`ddp_case` is also what the test runs in
one process.

Usage: torchrun --nproc_per_node=2 _ddp_batch_warmup_worker.py OUT
"""

import gc
import json
import sys

import torch
from torch import nn

from leanscale.large_batch import BatchSizeSchedule
from leanscale.large_batch.train import TrainConfig, train_classifier


def ddp_case():
    """A 3-class problem on 6 features, an MLP without batch statistics (so DDP's averaged gradient is
    the one-process gradient), batch 16 -> 32 -> 64 at 96 and 192 of 320 examples, LR drop at 50%."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (384,), generator=g)
    x = torch.randn(384, 6, generator=g) + torch.nn.functional.one_hot(y, 6).float() * 2
    data = (x[:320], y[:320], x[320:], y[320:])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    cfg = TrainConfig(model="mlp", batch_size=16, lr=0.2, epochs=1.0, milestones=(0.5,), eval_every_epochs=0.3)
    result = train_classifier(cfg, data=data, model=model, keep_model=True,
                              batch_schedule=BatchSizeSchedule((16, 32, 64), (96, 192), lr_rule="linear"))
    return result, result.model


def main(out):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    result, model = ddp_case()
    if dist.get_rank() == 0:
        with open(f"{out}/rank0.json", "w") as f:
            json.dump({"world": dist.get_world_size(), "steps": result.steps, "examples": result.examples,
                       "history": [[h["step"], h["batch_size"], h["train_loss"], h["test_loss"]]
                                   for h in result.history],
                       "weights": [p.detach().reshape(-1).tolist() for p in model.parameters()]}, f)
    del model, result
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
