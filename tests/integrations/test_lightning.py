"""leanscale inside a PyTorch Lightning Trainer: surgery in setup, the noise scale over
accumulate_grad_batches, logged. A tiny model, a few CPU steps."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning.pytorch as pl  # noqa: E402  (a dev dependency: no skip)
from leanscale.core.errors import InvalidParameterError
from leanscale.integrations.lightning import LeanscaleLightningCallback
from leanscale.large_batch.ghost_bn import GhostBatchNorm1d


class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
        self.optimizer_params = None

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.body(x), y)

    def configure_optimizers(self):
        self.optimizer_params = [p for p in self.parameters()]
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _loader(n=128):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, num_workers=0)


def _fit(module, callback, **kw):
    trainer = pl.Trainer(max_steps=4, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                         **kw, callbacks=[callback])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers and logging intervals
        trainer.fit(module, _loader())
    return trainer


def test_ghost_batchnorm_before_the_optimizer_and_the_noise_scale_logged():
    torch.manual_seed(0)
    module = Module()
    callback = LeanscaleLightningCallback(ghost_batch_size=4, noise_scale=True)
    trainer = _fit(module, callback)
    assert isinstance(module.body[1], GhostBatchNorm1d) and callback.surgery_ == ["ghost batchnorm (4)"]
    assert module.body[1].weight is module.optimizer_params[2]  # the optimizer saw the converted model
    gns = callback.noise_scale_
    assert gns.n_updates == 4  # one measurement per optimizer step (2 micro-batches each)
    assert math.isfinite(gns.grad_sq_norm) and gns.grad_sq_norm > 0
    assert float(trainer.callback_metrics["noise_scale/b_simple"]) == pytest.approx(gns.b_simple, rel=1e-5)


def test_noise_scale_needs_gradient_accumulation():
    with pytest.raises(InvalidParameterError, match="accumulate_grad_batches=1"):
        trainer = pl.Trainer(max_steps=2, accumulate_grad_batches=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                             callbacks=[LeanscaleLightningCallback(noise_scale=True)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(Module(), _loader())
