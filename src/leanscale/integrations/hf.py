"""leanscale in a Hugging Face ``Trainer``: a ``TrainerCallback`` and a ``Trainer`` with the MoE loss.

Example (a model of one's own, built from a config; no weights needed)::

    from transformers import Trainer, TrainingArguments
    from leanscale.integrations.hf import LeanscaleTrainerCallback, MoETrainer

    callback = LeanscaleTrainerCallback(moe={"n_experts": 8, "top_k": 2}, noise_scale=True)
    args = TrainingArguments("out", gradient_accumulation_steps=4, max_grad_norm=0.0, ...)
    trainer = MoETrainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    callback.noise_scale_.b_simple      # the gradient noise scale, also in the logs

Where each piece plugs in (the Trainer's own hook points):

- ``on_init_end`` (end of ``Trainer.__init__``, before the optimizer is built in ``train()``):
  Ghost BatchNorm, MoE and SWAT surgery on the model, in place;
- ``on_substep_end`` (after each micro-batch's backward but the last) and
  ``on_pre_optimizer_step`` (after the last one): the noise-scale measurement of
  :class:`~leanscale.large_batch.GradientNoiseScale` over the micro-batches of gradient
  accumulation. It needs ``gradient_accumulation_steps >= 2`` and ``max_grad_norm=0``: the
  Trainer clips before ``on_pre_optimizer_step``, which would corrupt the last micro-batch's
  gradient (clip in your model's optimizer wrapper instead, or measure on a separate run);
- ``on_log``: ``noise_scale/b_simple`` added to the logs;
- :class:`InfoBatchTrainer`: InfoBatch's sampler as the Trainer's, per-example losses weighted
  and recorded in ``compute_loss``; under ``torchrun`` every rank trains on its shard of the same
  pruned epoch and the losses of all ranks reach every rank's InfoBatch;
- :class:`MoETrainer`: ``compute_loss`` plus ``aux_loss_weight * moe_aux_loss(model)`` (the
  load-balancing and router z-losses of every converted layer).
"""

from __future__ import annotations

from typing import Any

import torch

from leanscale.core.errors import InvalidParameterError, MissingDependencyError
from leanscale.integrations._infobatch import (
    align_shard,
    check_info_batch,
    weighted_loss,
)
from leanscale.integrations._surgery import apply_surgery, init_options

try:
    from transformers import Trainer, TrainerCallback
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError(
        "leanscale.integrations.hf needs Hugging Face transformers and accelerate: "
        "pip install 'leanscale[hf]'"
    ) from exc

__all__ = ["InfoBatchTrainer", "LeanscaleTrainerCallback", "MoETrainer"]

_OWNER = "LeanscaleTrainerCallback"


class LeanscaleTrainerCallback(TrainerCallback):
    """Model surgery and noise-scale logging inside a Hugging Face ``Trainer``.

    Args:
        ghost_batch_size: Replace BatchNorm layers by Ghost BatchNorm with this ghost batch.
        swat: SWAT sparsity (float) or a dict of :func:`~leanscale.sparse.apply_swat` arguments.
        moe: A dict of :func:`~leanscale.sparse.apply_moe` arguments with ``n_experts``.
        noise_scale: Measure the gradient noise scale over the micro-batches of gradient
            accumulation (see the module docstring for the two requirements).
        noise_scale_beta: The estimator's moving-average decay.

    After training: ``surgery_`` lists what was converted; ``noise_scale_`` is the
    :class:`~leanscale.large_batch.GradientNoiseScale` (None without ``noise_scale``).
    """

    def __init__(self, *, ghost_batch_size: int | None = None, swat: float | dict | None = None,
                 moe: dict | None = None, noise_scale: bool = False, noise_scale_beta: float = 0.99):
        init_options(self, _OWNER, ghost_batch_size, swat, moe, noise_scale, noise_scale_beta)
        self._micro = None

    def on_init_end(self, args, state, control, model=None, **kwargs: Any):
        if model is not None and not self.surgery_:
            self.surgery_ = apply_surgery(model, self.ghost_batch_size, self.swat, self.moe)

    def on_train_begin(self, args, state, control, **kwargs: Any):
        if self.noise_scale_ is None:
            return
        if args.gradient_accumulation_steps < 2:
            raise InvalidParameterError(
                f"The 'noise_scale' parameter of {_OWNER} needs gradient accumulation: the noise scale compares the "
                f"micro-batches' gradients with their sum. Got gradient_accumulation_steps="
                f"{args.gradient_accumulation_steps}; use >= 2 (the same batch: divide the per-device batch)."
            )
        if args.max_grad_norm and args.max_grad_norm > 0:
            raise InvalidParameterError(
                f"The 'noise_scale' parameter of {_OWNER} needs max_grad_norm=0: the Trainer clips the gradient "
                f"before on_pre_optimizer_step, so the last micro-batch's gradient could not be told apart. Got "
                f"max_grad_norm={args.max_grad_norm}."
            )
        self._micro = args.per_device_train_batch_size

    def on_substep_end(self, args, state, control, model=None, **kwargs: Any):
        if self.noise_scale_ is not None and model is not None:
            self.noise_scale_.accumulate(model)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs: Any):
        if self.noise_scale_ is not None and model is not None:
            self.noise_scale_.step(model, self._micro, step=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs: Any):
        gns = self.noise_scale_
        if logs is not None and gns is not None and gns.n_updates:
            logs["noise_scale/b_simple"] = gns.b_simple  # for the loggers called after this callback
            if state.log_history:  # the Trainer stored its copy of the logs before calling on_log
                state.log_history[-1]["noise_scale/b_simple"] = gns.b_simple


class MoETrainer(Trainer):
    """A ``Trainer`` whose training loss adds ``aux_loss_weight * moe_aux_loss(model)``: the
    load-balancing and router z-losses of every MoE layer (:func:`~leanscale.sparse.moe_aux_loss`;
    their own coefficients are set at conversion). Evaluation losses stay the model's."""

    def __init__(self, *args: Any, aux_loss_weight: float = 1.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.aux_loss_weight = aux_loss_weight

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs: Any):
        from leanscale.sparse import moe_aux_loss

        out = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        if not model.training:
            return out
        loss, outputs = out if return_outputs else (out, None)
        loss = loss + self.aux_loss_weight * moe_aux_loss(self.accelerator.unwrap_model(model))
        return (loss, outputs) if return_outputs else loss


class _Indexed(torch.utils.data.Dataset):
    """The user's dataset with each example's position added as ``"index"``."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = self.dataset[i]
        if not isinstance(item, dict):
            raise InvalidParameterError(
                f"The 'train_dataset' parameter of InfoBatchTrainer must give dict examples (the Trainer's "
                f"convention). Got {type(item).__name__} for example {i}."
            )
        return {**item, "index": i}


def _per_example_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(b,)`` losses: cross-entropy of ``(b, k)`` logits, or the mean over the labelled tokens
    (label != -100) of ``(b, T, V)`` logits against ``(b, T)`` labels (already shifted)."""
    import torch.nn.functional as F

    if logits.ndim == 2:
        return F.cross_entropy(logits, labels, reduction="none")
    tokens = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="none", ignore_index=-100)
    tokens = tokens.view(labels.shape)  # (b, T)
    counted = (labels != -100).sum(1).clamp_min(1)
    return tokens.sum(1) / counted


class InfoBatchTrainer(Trainer):
    """A ``Trainer`` that prunes well-learned examples on the fly with
    :class:`~leanscale.pruning.InfoBatch` (Qin et al. 2024): its sampler skips part of the
    low-loss examples each epoch and the kept ones' losses are rescaled, so the expected gradient
    is unchanged.

    Args:
        info_batch: An ``InfoBatch(len(train_dataset), epochs=num_train_epochs, ...)``.
        loss_fn: ``loss_fn(logits, labels) -> (b,)`` per-example losses; the default is the
            cross-entropy of ``(b, k)`` logits, or the mean over labelled tokens of ``(b, T, V)``
            logits (labels already aligned with the logits, -100 ignored).

    The model's output needs ``logits``; the examples are dicts with ``labels``. Epochs with
    pruning have fewer steps: the Trainer plans its LR schedule from the first (full) epoch, so a
    step-based schedule ends early -- prefer a schedule of ``num_train_epochs`` with a constant or
    slowly decaying LR, as the InfoBatch paper does. The returned loss is a mean over the batch:
    the Trainer divides it by ``gradient_accumulation_steps`` whatever the model's signature.

    Several processes (``torchrun``, DDP): InfoBatch shards each epoch itself (every rank draws
    the same plan and takes positions ``rank, rank + world, ...``), so accelerate's own batch
    sharding is turned off for the training loader, and ``InfoBatch.update`` all-gathers the
    per-example losses of every rank: the loss tables, and so the next epochs' plans, stay the
    same on every rank. An InfoBatch built before the process group started (rank 0 of 1) is
    given the Trainer's rank and world size.
    """

    loss_is_scaled_for_ga = False  # compute_loss returns a batch mean: the Trainer divides by GA

    def __init__(self, *args: Any, info_batch: Any, loss_fn: Any = None, **kwargs: Any):
        check_info_batch(info_batch, "InfoBatchTrainer")
        if "train_dataset" in kwargs and kwargs["train_dataset"] is not None:
            n = len(kwargs["train_dataset"])
            if n != info_batch.n_examples:
                raise InvalidParameterError(
                    f"The 'info_batch' parameter of InfoBatchTrainer must cover the training set: n_examples="
                    f"{info_batch.n_examples} for a train_dataset of {n} examples."
                )
            kwargs["train_dataset"] = _Indexed(kwargs["train_dataset"])
        self.info_batch = info_batch
        self.loss_fn = loss_fn if loss_fn is not None else _per_example_cross_entropy
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # compute_loss never passes num_items_in_batch on
        align_shard(info_batch, self.args.process_index, self.args.world_size, "InfoBatchTrainer")

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        if self.info_batch.epoch is None:
            self.info_batch.set_epoch(0)
        return self.info_batch

    def get_train_dataloader(self) -> Any:
        loader = super().get_train_dataloader()
        # Under several processes accelerate wraps the batch sampler in a BatchSamplerShard that
        # deals whole batches out to the ranks; InfoBatch already yields this rank's shard, so the
        # wrapper becomes a pass-through (as transformers does for its rank-aware samplers), with
        # the last, possibly short, batch kept as it is (every rank's shard has the same size).
        shard = getattr(loader, "batch_sampler", None)
        inner = getattr(shard, "batch_sampler", None)
        if shard is not None and getattr(inner, "sampler", None) is self.info_batch and \
                hasattr(shard, "num_processes"):
            shard.num_processes, shard.process_index, shard.even_batches = 1, 0, False
        return loader

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None and "index" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "index"]

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs: Any):
        inputs = dict(inputs)
        index = inputs.pop("index", None)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) or hasattr(outputs, "keys") else outputs[0]
        losses = self.loss_fn(logits, labels)  # (b,)
        if model.training and index is not None:
            loss = weighted_loss(self.info_batch, losses, index,
                                 where="The 'loss_fn' parameter of InfoBatchTrainer must return")
        else:
            loss = losses.mean()
        return (loss, outputs) if return_outputs else loss
