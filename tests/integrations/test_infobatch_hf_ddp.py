"""InfoBatchTrainer under torchrun (2 gloo processes): each rank trains on its shard of the same
pruned epoch (the single-process plan, positions rank, rank + 2, ...), the losses of both ranks
reach both InfoBatch objects, so their loss tables and plans stay identical.

This file is also the worker: ``torchrun --nproc_per_node=2 test_infobatch_hf_ddp.py OUT``. One
single-process test sits here too: the loss scaling under gradient accumulation that the ranks
rely on.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

N, EPOCHS, BATCH, SEED = 101, 4, 8, 3  # 101: odd, so the last position of each epoch is padded
WORLD = 2


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x, labels=None):
        return {"logits": self.body(x)}


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return [{"x": x[i], "labels": y[i]} for i in range(N)]


def worker(out: str) -> None:
    import gc

    import torch.distributed as dist
    from transformers import TrainingArguments

    from leanscale.integrations.hf import InfoBatchTrainer
    from leanscale.pruning import InfoBatch

    # Built before the Trainer exists (the usual script order): rank 0 of 1 until the Trainer aligns it.
    ib = InfoBatch(N, epochs=EPOCHS, prune_ratio=0.5, seed=SEED, rank=0, world_size=1)
    seen: list[list[int]] = [[] for _ in range(EPOCHS)]
    weights: list[list[float]] = [[] for _ in range(EPOCHS)]
    start_losses: dict[int, list] = {}

    class Recording(InfoBatchTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            if model.training:
                epoch = self.info_batch.epoch
                if epoch not in start_losses:  # the loss table the epoch was planned from
                    start_losses[epoch] = [None if math.isnan(v) else v for v in self.info_batch.losses_.tolist()]
                seen[epoch] += inputs["index"].tolist()
                weights[epoch] += self.info_batch.weights(inputs["index"]).tolist()
            return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)

    torch.manual_seed(0)
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=BATCH, num_train_epochs=EPOCHS,
                             learning_rate=0.1, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=True, ddp_backend="gloo", disable_tqdm=True, dataloader_num_workers=0,
                             seed=0)
    trainer = Recording(model=Net(), args=args, train_dataset=_data(), info_batch=ib)
    trainer.train()
    rank = dist.get_rank()
    result = {"rank": ib.rank, "world_size": ib.world_size, "seen": seen, "weights": weights,
              "start_losses": {str(k): v for k, v in start_losses.items()}, "losses": ib.losses_.tolist(),
              "history": ib.history_, "global_step": trainer.state.global_step}
    with open(f"{out}/rank{rank}.json", "w") as fh:
        json.dump(result, fh)
    del trainer  # the exit rule: no DDP model or optimizer alive at destroy_process_group
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def _single_process_plan(start_losses: list, epoch: int):
    """The world-1 InfoBatch's order and weights for ``epoch`` planned from ``start_losses``."""
    from leanscale.pruning import InfoBatch

    ref = InfoBatch(N, epochs=EPOCHS, prune_ratio=0.5, seed=SEED, rank=0, world_size=1)
    state = ref.state_dict()
    state["losses"] = torch.tensor([math.nan if v is None else v for v in start_losses], dtype=torch.float64)
    ref.load_state_dict(state)
    order = ref.epoch_indices(epoch).numpy()  # (n_kept,)
    return order, ref.weights(torch.arange(N)).numpy(), ref.history_[-1]


@pytest.mark.distributed
def test_infobatch_trainer_two_processes_share_one_pruned_epoch(tmp_path):
    from tests.distributed import run_torchrun

    run_torchrun(Path(__file__), tmp_path, nproc=WORLD)
    runs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert [(r["rank"], r["world_size"]) for r in runs] == [(0, 2), (1, 2)]  # aligned with the Trainer
    # every rank's InfoBatch holds the same state: the losses of both ranks reached both
    assert runs[0]["losses"] == runs[1]["losses"] and runs[0]["history"] == runs[1]["history"]
    assert all(v is not None and np.isfinite(v) for v in runs[0]["losses"])
    assert runs[0]["start_losses"] == runs[1]["start_losses"]
    kept = []
    for epoch in range(EPOCHS):
        order, weights, record = _single_process_plan(runs[0]["start_losses"][str(epoch)], epoch)
        assert runs[0]["history"][epoch] == json.loads(json.dumps(record))
        s0, s1 = (np.array(r["seen"][epoch]) for r in runs)
        total = math.ceil(order.size / WORLD) * WORLD
        padded = np.concatenate([order, order[: total - order.size]])
        # each rank walked exactly its shard of the single-process order, nothing twice
        np.testing.assert_array_equal(s0, padded[0::WORLD])
        np.testing.assert_array_equal(s1, padded[1::WORLD])
        assert set(s0.tolist()) | set(s1.tolist()) == set(order.tolist())
        assert len(set(s0.tolist()) & set(s1.tolist())) == total - order.size  # only the padding
        for run, shard in zip(runs, (s0, s1)):  # the weights applied are the plan's
            np.testing.assert_array_equal(np.array(run["weights"][epoch], dtype=np.float32),
                                          weights[shard].astype(np.float32))
        kept.append(order.size)
    assert kept[0] == N and all(k < N for k in kept[1:3]) and kept[3] == N  # pruned, then annealed
    steps = sum(math.ceil(math.ceil(k / WORLD) / BATCH) for k in kept)
    assert runs[0]["global_step"] == runs[1]["global_step"] == steps


def test_infobatch_trainer_scales_for_accumulation_with_a_kwargs_model(tmp_path):
    """A model whose forward takes **kwargs (every HF PreTrainedModel) makes the Trainer believe the
    loss is already scaled for gradient accumulation; InfoBatchTrainer's batch mean is not. One
    step of 2 micro-batches of 8 must be plain SGD on the mean loss of the 16 examples."""
    from transformers import TrainingArguments

    from leanscale.integrations.hf import InfoBatchTrainer
    from leanscale.pruning import InfoBatch

    class KwargsNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 3)

        def forward(self, x, labels=None, **kwargs):
            return {"logits": self.lin(x)}

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
    torch.manual_seed(0)
    net = KwargsNet()
    w0, b0 = net.lin.weight.detach().clone(), net.lin.bias.detach().clone()
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=8, gradient_accumulation_steps=2,
                             num_train_epochs=1, learning_rate=0.1, lr_scheduler_type="constant", optim="sgd",
                             max_grad_norm=0.0, weight_decay=0.0, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True, dataloader_num_workers=0)
    trainer = InfoBatchTrainer(model=net, args=args, train_dataset=[{"x": x[i], "labels": y[i]} for i in range(16)],
                               info_batch=InfoBatch(16, epochs=1))
    trainer.train()
    assert trainer.state.global_step == 1
    w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    F.cross_entropy(x @ w.T + b, y).backward()  # epoch 0 keeps every example with weight 1
    torch.testing.assert_close(net.lin.weight.detach(), w0 - 0.1 * w.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(net.lin.bias.detach(), b0 - 0.1 * b.grad, rtol=0, atol=1e-6)


if __name__ == "__main__":
    worker(sys.argv[1])
