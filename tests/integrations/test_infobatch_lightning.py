"""InfoBatch in a PyTorch Lightning Trainer: the InfoBatch as the loader's sampler, infobatch_loss
in training_step, InfoBatchLightningCallback. End to end on a tiny model against the same training
written as a plain loop, and under DDP (2 gloo processes; this file is also that worker:
``torchrun --nproc_per_node=2 test_infobatch_lightning.py OUT``)."""

from __future__ import annotations

import io
import json
import math
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl  # a dev dependency: no skip
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leanscale.core.errors import InvalidParameterError
from leanscale.integrations.lightning import InfoBatchLightningCallback, infobatch_loss
from leanscale.pruning import InfoBatch

pytestmark = pytest.mark.usefixtures("one_thread")

N, EPOCHS, BATCH = 100, 3, 8


def _dataset():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return torch.utils.data.TensorDataset(x, y, torch.arange(N))  # the index travels with the example


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


class Module(pl.LightningModule):
    def __init__(self, ib, record_loss=True):
        super().__init__()
        self.net = _net()
        self.ib = ib
        self.record_loss = record_loss
        self.seen: dict[int, list[int]] = {}
        self.weights: dict[int, list[float]] = {}
        self.start_losses: dict[int, list] = {}

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        if self.current_epoch not in self.seen:  # the loss table this epoch was planned from
            self.start_losses[self.current_epoch] = [None if math.isnan(v) else v for v in self.ib.losses_.tolist()]
        self.seen.setdefault(self.current_epoch, []).extend(idx.tolist())
        self.weights.setdefault(self.current_epoch, []).extend(self.ib.weights(idx).tolist())
        losses = F.cross_entropy(self.net(x), y, reduction="none")  # (b,)
        return infobatch_loss(self.ib, losses, idx) if self.record_loss else losses.mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


def _trainer(callback, **kw):
    base = {"max_epochs": EPOCHS, "accelerator": "cpu", "enable_progress_bar": False, "logger": False,
            "enable_checkpointing": False, "enable_model_summary": False}
    return pl.Trainer(**{**base, **kw}, callbacks=[callback])


def _fit(module, loader, callback, **kw):
    trainer = _trainer(callback, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers and logging intervals
        trainer.fit(module, loader)
    return trainer


def _manual_loop(ib):
    """The InfoBatch docstring's loop, same model, data, seed and optimizer."""
    net, ds = _net(), _dataset()
    opt = torch.optim.SGD(net.parameters(), lr=0.2)
    seen, weights = {}, {}
    for epoch in range(EPOCHS):
        for x, y, idx in torch.utils.data.DataLoader(ds, batch_size=BATCH, sampler=ib.sampler(epoch)):
            seen.setdefault(epoch, []).extend(idx.tolist())
            w = ib.weights(idx)
            weights.setdefault(epoch, []).extend(w.tolist())
            losses = F.cross_entropy(net(x), y, reduction="none")
            loss = (losses * w).mean()
            ib.update(idx, losses.detach())
            opt.zero_grad()
            loss.backward()
            opt.step()
    return seen, weights


def test_infobatch_in_lightning_equals_the_plain_loop():
    ib = InfoBatch(N, epochs=EPOCHS, prune_ratio=0.5, seed=0)
    module = Module(ib)
    loader = torch.utils.data.DataLoader(_dataset(), batch_size=BATCH, sampler=ib)
    trainer = _fit(module, loader, InfoBatchLightningCallback(ib))
    assert trainer.current_epoch == EPOCHS

    # examples per epoch = what the sampler planned: all, pruned, all again (the annealing epoch)
    kept = [h["n_kept"] for h in ib.history_]
    assert [h["epoch"] for h in ib.history_] == [0, 1, 2]
    assert kept[0] == N and kept[1] < N and kept[2] == N and not ib.history_[2]["pruning"]
    assert [len(module.seen[e]) for e in range(EPOCHS)] == kept
    assert len(set(module.seen[1])) == kept[1]  # each kept example once
    assert trainer.global_step == sum(-(-k // BATCH) for k in kept) < EPOCHS * -(-N // BATCH)
    # the kept well-learned examples were up-weighted by 1 / (1 - r)
    assert sorted(set(module.weights[1])) == [1.0, 2.0] and set(module.weights[2]) == {1.0}

    # the same training as a plain loop: the same plans, examples, weights and loss table
    ref = InfoBatch(N, epochs=EPOCHS, prune_ratio=0.5, seed=0)
    seen, weights = _manual_loop(ref)
    assert ib.history_ == ref.history_
    assert module.seen == seen and module.weights == weights
    np.testing.assert_allclose(ib.losses_, ref.losses_, rtol=1e-6, atol=1e-7)


def test_the_callback_checkpoints_the_infobatch_state():
    ib = InfoBatch(N, epochs=EPOCHS, prune_ratio=0.5, seed=0)
    ib.update(torch.arange(N), torch.linspace(0.1, 2.0, N))
    ib.set_epoch(1)
    buffer = io.BytesIO()
    torch.save(InfoBatchLightningCallback(ib).state_dict(), buffer)
    buffer.seek(0)
    other = InfoBatch(N, epochs=EPOCHS, prune_ratio=0.5, seed=0)
    InfoBatchLightningCallback(other).load_state_dict(torch.load(buffer, weights_only=True))
    np.testing.assert_array_equal(other.losses_, ib.losses_)
    np.testing.assert_array_equal(other.epoch_indices().numpy(), ib.epoch_indices().numpy())


def test_the_callback_refuses_a_loader_that_does_not_draw_from_the_infobatch():
    ib = InfoBatch(N, epochs=EPOCHS)
    loader = torch.utils.data.DataLoader(_dataset(), batch_size=BATCH, shuffle=True)
    with pytest.raises(InvalidParameterError, match="must be the sampler of the training DataLoader"):
        _fit(Module(ib), loader, InfoBatchLightningCallback(ib))


def test_the_callback_recognises_lightnings_distributed_wrapper():
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    from leanscale.integrations.lightning import _uses_sampler, _wraps_sampler

    ib = InfoBatch(N, epochs=EPOCHS).sampler(0)
    wrapped = torch.utils.data.DataLoader(_dataset(), batch_size=BATCH,
                                          sampler=DistributedSamplerWrapper(ib, num_replicas=2, rank=0, shuffle=False))
    assert _wraps_sampler(wrapped, ib) and not _uses_sampler(wrapped, ib)
    plain = torch.utils.data.DataLoader(_dataset(), batch_size=BATCH, sampler=ib)
    assert _uses_sampler(plain, ib) and not _wraps_sampler(plain, ib)


def test_the_callback_checks_epochs_shards_and_that_losses_are_recorded():
    ib = InfoBatch(N, epochs=EPOCHS)
    loader = torch.utils.data.DataLoader(_dataset(), batch_size=BATCH, sampler=ib)
    with pytest.raises(InvalidParameterError, match="plans epochs=3, but the Trainer runs max_epochs=4"):
        _fit(Module(ib), loader, InfoBatchLightningCallback(ib), max_epochs=4)
    with pytest.raises(InvalidParameterError, match="no loss recorded after the first epoch"):
        _fit(Module(ib, record_loss=False), loader, InfoBatchLightningCallback(ib), limit_train_batches=2)
    other = InfoBatch(N, epochs=EPOCHS, rank=1, world_size=2)
    with pytest.raises(InvalidParameterError, match="built for rank 1 of 2 processes.*rank 0 of 1"):
        _fit(Module(other), loader, InfoBatchLightningCallback(other))
    with pytest.raises(InvalidParameterError, match="'info_batch' parameter of InfoBatchLightningCallback must be"):
        InfoBatchLightningCallback(object())
    with pytest.raises(InvalidParameterError, match="'losses' parameter of infobatch_loss must be a 1-d tensor"):
        infobatch_loss(ib, torch.zeros(2, 3), torch.arange(2))


def worker(out: str) -> None:
    """Lightning DDP on 2 gloo processes: the InfoBatch built before the process group exists."""
    import gc

    import torch.distributed as dist

    ib = InfoBatch(N + 1, epochs=EPOCHS, prune_ratio=0.5, seed=0)  # 101 examples: padded shards
    assert (ib.rank, ib.world_size) == (0, 1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N + 1, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    ds = torch.utils.data.TensorDataset(x, y, torch.arange(N + 1))
    module = Module(ib)
    trainer = _trainer(InfoBatchLightningCallback(ib), strategy="ddp", devices=2, use_distributed_sampler=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, torch.utils.data.DataLoader(ds, batch_size=BATCH, sampler=ib))
    rank = dist.get_rank()
    with open(f"{out}/rank{rank}.json", "w") as fh:
        json.dump({"rank": ib.rank, "world_size": ib.world_size, "seen": module.seen,
                   "start_losses": module.start_losses, "losses": ib.losses_.tolist(), "history": ib.history_}, fh)
    del trainer, module  # the exit rule: no DDP model or optimizer alive at destroy_process_group
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.distributed
def test_infobatch_in_lightning_ddp_shards_one_pruned_epoch(tmp_path):
    from tests.distributed import run_torchrun

    run_torchrun(Path(__file__), tmp_path, nproc=2)
    runs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["rank"], r["world_size"]) for r in runs] == [(0, 2), (1, 2)]  # aligned by the callback
    assert runs[0]["losses"] == runs[1]["losses"] and runs[0]["history"] == runs[1]["history"]
    assert runs[0]["start_losses"] == runs[1]["start_losses"]
    n = N + 1
    kept = []
    for epoch in range(EPOCHS):
        ref = InfoBatch(n, epochs=EPOCHS, prune_ratio=0.5, seed=0, rank=0, world_size=1)
        state = ref.state_dict()
        start = runs[0]["start_losses"][str(epoch)]
        state["losses"] = torch.tensor([math.nan if v is None else v for v in start], dtype=torch.float64)
        order = ref.load_state_dict(state).epoch_indices(epoch).numpy()  # the single-process epoch
        total = math.ceil(order.size / 2) * 2
        padded = np.concatenate([order, order[: total - order.size]])
        s0, s1 = (r["seen"][str(epoch)] for r in runs)
        assert s0 == padded[0::2].tolist() and s1 == padded[1::2].tolist()  # each rank: its shard, once
        assert set(s0) | set(s1) == set(order.tolist())
        kept.append(order.size)
    assert kept[0] == n and kept[1] < n and kept[2] == n
    assert all(v is not None for v in runs[0]["losses"])


if __name__ == "__main__":
    worker(sys.argv[1])
