"""Training-loop integrations: leanscale's techniques inside a Hugging Face ``Trainer`` or a
PyTorch Lightning ``Trainer``, as the ecosystem expects (callbacks).

- :mod:`leanscale.integrations.hf` -- ``LeanscaleTrainerCallback``, ``MoETrainer`` and
  ``InfoBatchTrainer`` (``pip install 'leanscale[hf]'``);
- :mod:`leanscale.integrations.lightning` -- ``LeanscaleLightningCallback``, and
  ``InfoBatchLightningCallback`` with ``infobatch_loss`` (``pip install 'leanscale[lightning]'``).

Both do the same things at the same points of training: model surgery (Ghost BatchNorm, SWAT,
mixture of experts) before the optimizer is built, and gradient-noise-scale measurement over the
micro-batches of gradient accumulation, logged as ``noise_scale/b_simple``; InfoBatch data
pruning, in one process or under DDP (every rank trains on its shard of the same pruned epoch and
every rank's InfoBatch records the losses of all). Nothing is imported until a submodule is:
importing this package needs neither library.
"""

__all__: list[str] = []
