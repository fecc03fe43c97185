"""leanscale in a PyTorch Lightning ``Trainer``: callbacks.

Example::

    import lightning.pytorch as pl
    from leanscale.integrations.lightning import LeanscaleLightningCallback

    callback = LeanscaleLightningCallback(ghost_batch_size=32, noise_scale=True)
    pl.Trainer(max_epochs=3, accumulate_grad_batches=4, callbacks=[callback]).fit(module, loader)
    callback.noise_scale_.b_simple

Where each piece plugs in:

- ``setup`` (before ``configure_optimizers``): Ghost BatchNorm, MoE and SWAT surgery on the
  LightningModule, in place;
- ``on_train_batch_start`` records the micro-batch size, ``on_after_backward`` each micro-batch's
  gradient, ``on_before_optimizer_step`` (before Lightning clips) ends the measurement of
  :class:`~leanscale.large_batch.GradientNoiseScale` over the ``accumulate_grad_batches``
  micro-batches and logs ``noise_scale/b_simple``.
- The MoE losses belong in your ``training_step``: ``loss = loss + moe_aux_loss(self)``
  (:func:`~leanscale.sparse.moe_aux_loss`); a callback cannot change the loss Lightning
  backpropagates.

InfoBatch (:class:`~leanscale.pruning.InfoBatch`, dynamic data pruning) takes three pieces,
because a callback can neither choose the examples nor change the loss: the InfoBatch is the
sampler of your training ``DataLoader`` (the dataset returns each example's index too), your
``training_step`` returns :func:`infobatch_loss` of the per-example losses, and
:class:`InfoBatchLightningCallback` does the rest::

    ib = InfoBatch(len(train_set), epochs=10, prune_ratio=0.5)

    class Module(pl.LightningModule):
        def training_step(self, batch, batch_idx):
            x, y, idx = batch
            losses = F.cross_entropy(self(x), y, reduction="none")  # (b,)
            return infobatch_loss(ib, losses, idx)

    loader = DataLoader(train_set, batch_size=64, sampler=ib)
    trainer = pl.Trainer(max_epochs=10, callbacks=[InfoBatchLightningCallback(ib)],
                         use_distributed_sampler=False)  # only matters under DDP
    trainer.fit(Module(), loader)

Lightning calls ``ib.set_epoch(epoch)`` itself at each epoch start (as for a
``DistributedSampler``). Under DDP pass ``use_distributed_sampler=False``: InfoBatch shards
each epoch itself, while Lightning's wrapper would fix the epoch length at the first (full)
epoch and pad the pruned ones back to it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from leanscale.core.errors import InvalidParameterError, MissingDependencyError
from leanscale.integrations._infobatch import (
    align_shard,
    check_info_batch,
    weighted_loss,
)
from leanscale.integrations._surgery import apply_surgery, init_options

try:
    from lightning.pytorch import Callback
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError(
        "leanscale.integrations.lightning needs PyTorch Lightning: pip install 'leanscale[lightning]'"
    ) from exc

__all__ = ["InfoBatchLightningCallback", "LeanscaleLightningCallback", "infobatch_loss"]

_OWNER = "LeanscaleLightningCallback"


def _batch_size(batch: Any) -> int:
    """Examples in a batch: the first dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        if isinstance(item, torch.Tensor) and item.ndim:
            return int(item.shape[0])
    raise InvalidParameterError(
        f"The 'noise_scale' parameter of {_OWNER} needs the micro-batch size: a batch must be a tensor or a "
        f"tuple/list/dict holding one. Got {type(batch).__name__}."
    )


class LeanscaleLightningCallback(Callback):
    """Model surgery and noise-scale logging inside a PyTorch Lightning ``Trainer``.

    Args:
        ghost_batch_size: Replace BatchNorm layers by Ghost BatchNorm with this ghost batch.
        swat: SWAT sparsity (float) or a dict of :func:`~leanscale.sparse.apply_swat` arguments.
        moe: A dict of :func:`~leanscale.sparse.apply_moe` arguments with ``n_experts``.
        noise_scale: Measure the gradient noise scale over the micro-batches of gradient
            accumulation (``accumulate_grad_batches >= 2``).
        noise_scale_beta: The estimator's moving-average decay.

    After training: ``surgery_`` lists what was converted; ``noise_scale_`` is the
    :class:`~leanscale.large_batch.GradientNoiseScale` (None without ``noise_scale``).
    """

    def __init__(self, *, ghost_batch_size: int | None = None, swat: float | dict | None = None,
                 moe: dict | None = None, noise_scale: bool = False, noise_scale_beta: float = 0.99):
        init_options(self, _OWNER, ghost_batch_size, swat, moe, noise_scale, noise_scale_beta)
        self._sizes: list[int] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and not self.surgery_:
            self.surgery_ = apply_surgery(pl_module, self.ghost_batch_size, self.swat, self.moe)

    def on_train_start(self, trainer, pl_module) -> None:
        if self.noise_scale_ is not None and trainer.accumulate_grad_batches < 2:
            raise InvalidParameterError(
                f"The 'noise_scale' parameter of {_OWNER} needs gradient accumulation: the noise scale compares the "
                f"micro-batches' gradients with their sum. Got accumulate_grad_batches="
                f"{trainer.accumulate_grad_batches}; use >= 2."
            )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self.noise_scale_ is not None:
            self._sizes.append(_batch_size(batch))

    def on_after_backward(self, trainer, pl_module) -> None:
        if self.noise_scale_ is not None:
            self.noise_scale_.accumulate(pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        gns = self.noise_scale_
        if gns is None or not self._sizes:
            return
        gns.step(pl_module, self._sizes, step=trainer.global_step)
        self._sizes = []
        if gns.n_updates:
            pl_module.log("noise_scale/b_simple", gns.b_simple, on_step=True, prog_bar=False)


def infobatch_loss(info_batch: Any, losses: torch.Tensor, indices: Any) -> torch.Tensor:
    """The training loss of a batch under InfoBatch, to return from ``training_step``.

    Records the unweighted ``losses`` with ``info_batch.update`` and returns their mean weighted by
    ``info_batch.weights(indices)`` (``1 / (1 - prune_ratio)`` for the kept well-learned examples,
    1 for the others), so the expected gradient of a pruned epoch is the full epoch's.

    Args:
        info_batch: The :class:`~leanscale.pruning.InfoBatch` that is the loader's sampler.
        losses: ``(b,)`` per-example losses (``reduction="none"``), still attached to the graph.
        indices: ``(b,)`` the dataset indices of the batch's examples.

    Returns:
        A scalar tensor: ``(losses * weights).mean()``.

    Under DDP ``info_batch.update`` all-gathers the losses of every rank (a collective): call
    this once in every training step of every rank.
    """
    check_info_batch(info_batch, "infobatch_loss")
    return weighted_loss(info_batch, losses, indices)


def _uses_sampler(loader: Any, sampler: Any) -> bool:
    return getattr(loader, "sampler", None) is sampler or \
        getattr(getattr(loader, "batch_sampler", None), "sampler", None) is sampler


def _wraps_sampler(loader: Any, sampler: Any) -> bool:
    """Lightning's DistributedSamplerWrapper around ``sampler`` (``use_distributed_sampler=True``)."""
    for candidate in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        inner = getattr(getattr(candidate, "dataset", None), "_sampler", None)
        if inner is sampler:
            return True
    return False


class InfoBatchLightningCallback(Callback):
    """InfoBatch (dynamic data pruning, Qin et al. 2024) in a PyTorch Lightning ``Trainer``.

    The InfoBatch must be the sampler of the training ``DataLoader`` and ``training_step`` must
    return :func:`infobatch_loss` (see the module docstring). The callback:

    - ``setup``: gives the InfoBatch the trainer's rank and world size when it was built before
      the process group (rank 0 of 1), checks ``max_epochs <= info_batch.epochs`` and plans
      epoch 0 (Lightning asks the loader's length before its first ``set_epoch``);
    - ``on_train_start``: checks that the training loader draws from the InfoBatch itself (not
      wrapped by Lightning's distributed sampler: pass ``use_distributed_sampler=False``);
    - ``on_train_epoch_start``: logs ``infobatch/kept_fraction`` (examples in this epoch / n);
    - ``on_train_epoch_end``: after the first epoch, checks that losses were recorded;
    - ``state_dict`` / ``load_state_dict``: the InfoBatch's state goes in the checkpoint, so a
      resumed run continues the same plans.

    Args:
        info_batch: The :class:`~leanscale.pruning.InfoBatch` of the run.
    """

    def __init__(self, info_batch: Any):
        check_info_batch(info_batch, "InfoBatchLightningCallback")
        self.info_batch = info_batch

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        ib = self.info_batch
        align_shard(ib, trainer.global_rank, trainer.world_size, "InfoBatchLightningCallback")
        max_epochs = trainer.max_epochs
        if max_epochs is None or max_epochs < 0 or max_epochs > ib.epochs:
            raise InvalidParameterError(
                f"The 'info_batch' parameter of InfoBatchLightningCallback plans epochs={ib.epochs}, but the Trainer "
                f"runs max_epochs={max_epochs}. Give the Trainer max_epochs <= {ib.epochs} (the annealing epochs "
                "are the last of the InfoBatch's)."
            )
        if ib.epoch is None:
            ib.set_epoch(0)

    def on_train_start(self, trainer, pl_module) -> None:
        loaders = trainer.train_dataloader
        flat = list(loaders.values()) if isinstance(loaders, dict) else \
            list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]
        if any(_uses_sampler(dl, self.info_batch) for dl in flat):
            return
        if any(_wraps_sampler(dl, self.info_batch) for dl in flat):
            raise InvalidParameterError(
                "The 'info_batch' parameter of InfoBatchLightningCallback is the training sampler, but Lightning "
                "wrapped it in its distributed sampler, which fixes every epoch's length at the first (full) "
                "epoch's. InfoBatch shards the epochs itself: pass use_distributed_sampler=False to the Trainer."
            )
        raise InvalidParameterError(
            "The 'info_batch' parameter of InfoBatchLightningCallback must be the sampler of the training "
            "DataLoader: DataLoader(train_set, batch_size=..., sampler=info_batch), the dataset returning each "
            "example's index. The training loader has another sampler."
        )

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        ib = self.info_batch
        if ib.history_ and ib.epoch is not None:
            record = next((h for h in ib.history_ if h["epoch"] == ib.epoch), None)
            if record is not None:
                pl_module.log("infobatch/kept_fraction", record["n_kept"] / ib.n_examples, on_step=False,
                              on_epoch=True)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 0 and np.isnan(self.info_batch.losses_).all():
            raise InvalidParameterError(
                "InfoBatchLightningCallback found no loss recorded after the first epoch: training_step must return "
                "infobatch_loss(info_batch, losses, indices) with the per-example losses (reduction='none') and "
                "the dataset indices of the batch (or call info_batch.update itself)."
            )

    def state_dict(self) -> dict[str, Any]:
        return self.info_batch.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.info_batch.load_state_dict(state_dict)
