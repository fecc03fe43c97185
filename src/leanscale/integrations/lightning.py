"""leanscale in a PyTorch Lightning ``Trainer``: one ``Callback``.

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
"""

from __future__ import annotations

from typing import Any

import torch

from leanscale.core.errors import InvalidParameterError, MissingDependencyError
from leanscale.integrations._surgery import apply_surgery, init_options

try:
    from lightning.pytorch import Callback
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError(
        "leanscale.integrations.lightning needs PyTorch Lightning: pip install 'leanscale[lightning]'"
    ) from exc

__all__ = ["LeanscaleLightningCallback"]

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
