"""leanscale inside a Hugging Face Trainer: surgery before the optimizer, the noise scale over
gradient accumulation, the MoE losses in the training loss. Tiny models, a few CPU steps."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transformers import Trainer, TrainingArguments  # noqa: E402

from leanscale.core.errors import InvalidParameterError  # noqa: E402
from leanscale.integrations.hf import LeanscaleTrainerCallback, MoETrainer  # noqa: E402
from leanscale.large_batch.ghost_bn import GhostBatchNorm1d  # noqa: E402


class Net(nn.Module):
    """A classifier with the Trainer's calling convention: keyword inputs, a dict with the loss."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x, labels=None):
        logits = self.body(x)
        return {"loss": F.cross_entropy(logits, labels) if labels is not None else None, "logits": logits}


def _data(n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, gradient_accumulation_steps=2,
                max_grad_norm=0.0, max_steps=6, learning_rate=0.05, report_to=[], save_strategy="no",
                logging_steps=1, use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0)
    return TrainingArguments(**{**base, **kw})


def test_ghost_batchnorm_surgery_and_noise_scale_in_the_trainer(tmp_path):
    torch.manual_seed(0)
    model = Net()
    callback = LeanscaleTrainerCallback(ghost_batch_size=4, noise_scale=True)
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_data(), callbacks=[callback])
    assert isinstance(model.body[1], GhostBatchNorm1d)  # converted at the end of __init__
    trainer.train()
    gns = callback.noise_scale_
    assert gns.n_updates == 6  # one measurement per optimizer step
    assert math.isfinite(gns.grad_sq_norm) and gns.grad_sq_norm > 0
    logged = [h["noise_scale/b_simple"] for h in trainer.state.log_history if "noise_scale/b_simple" in h]
    assert len(logged) >= 5 and logged[-1] == pytest.approx(gns.b_simple)
    assert callback.surgery_ == ["ghost batchnorm (4)"]


@pytest.mark.parametrize("kw, match", [
    (dict(gradient_accumulation_steps=1), "gradient_accumulation_steps=1"),
    (dict(max_grad_norm=1.0), "max_grad_norm=0"),
])
def test_noise_scale_refuses_settings_it_cannot_measure_in(tmp_path, kw, match):
    trainer = Trainer(model=Net(), args=_args(tmp_path, **kw), train_dataset=_data(),
                      callbacks=[LeanscaleTrainerCallback(noise_scale=True)])
    with pytest.raises(InvalidParameterError, match=match):
        trainer.train()


def test_bad_options_name_the_parameter():
    with pytest.raises(InvalidParameterError, match="'moe' parameter of LeanscaleTrainerCallback.*'n_experts'"):
        LeanscaleTrainerCallback(moe={"top_k": 2})
    with pytest.raises(InvalidParameterError, match="'ghost_batch_size' parameter"):
        LeanscaleTrainerCallback(ghost_batch_size=0)


class TinyLM(nn.Module):
    """leanscale's GPT behind the Trainer's convention (input_ids, labels) -> {"loss", "logits"}."""

    def __init__(self):
        super().__init__()
        from leanscale.models.transformer import GPT, GPTConfig

        self.gpt = GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.0))

    def forward(self, input_ids, labels=None):
        logits, loss = self.gpt(input_ids, labels)
        return {"loss": loss, "logits": logits}


def test_moe_surgery_and_the_aux_loss_in_the_training_loss(tmp_path):
    from leanscale.sparse import moe_aux_loss, moe_layers

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 32, (64, 9), generator=g)
    data = [{"input_ids": r[:-1], "labels": r[1:]} for r in ids]
    model = TinyLM()
    callback = LeanscaleTrainerCallback(moe={"n_experts": 4, "every": 1})
    trainer = MoETrainer(model=model, args=_args(tmp_path, max_steps=3, gradient_accumulation_steps=1),
                         train_dataset=data, callbacks=[callback], aux_loss_weight=2.0)
    assert len(moe_layers(model)) == 2  # converted before the optimizer exists
    trainer.train()
    batch = {"input_ids": ids[:4, :-1], "labels": ids[:4, 1:]}
    model.train()
    with torch.no_grad():
        total = trainer.compute_loss(model, batch).item()
        plain = model(**batch)["loss"].item()  # the same forward again: the same routing
        aux = moe_aux_loss(model).item()
    assert total == pytest.approx(plain + 2.0 * aux, rel=1e-6) and aux > 0


def test_infobatch_trainer_skips_well_learned_examples_and_reweights(tmp_path):
    from leanscale.integrations.hf import InfoBatchTrainer
    from leanscale.pruning import InfoBatch

    torch.manual_seed(0)
    data = _data(n=96)
    ib = InfoBatch(96, epochs=4, prune_ratio=0.5, seed=0)
    trainer = InfoBatchTrainer(model=Net(), args=_args(tmp_path, max_steps=-1, num_train_epochs=4,
                                                        gradient_accumulation_steps=1, max_grad_norm=1.0),
                               train_dataset=data, info_batch=ib)
    trainer.train()
    per_epoch = [h["n_kept"] for h in ib.history_]
    assert per_epoch[0] == 96 and all(k < 96 for k in per_epoch[1:3])  # pruned while the ratio is active
    assert 0 < ib.fraction_skipped_ < 0.5
    full = 4 * 96 // 8
    assert trainer.state.global_step == sum(-(-k // 8) for k in per_epoch) < full  # fewer steps than 4 full epochs
    assert (ib.losses_ < 10).all()  # every example's loss was recorded at least once


def test_infobatch_trainer_checks_its_sampler_covers_the_data(tmp_path):
    from leanscale.integrations.hf import InfoBatchTrainer
    from leanscale.pruning import InfoBatch

    with pytest.raises(InvalidParameterError, match="n_examples=50 for a train_dataset of 96"):
        InfoBatchTrainer(model=Net(), args=_args(tmp_path), train_dataset=_data(n=96),
                         info_batch=InfoBatch(50, epochs=2))
