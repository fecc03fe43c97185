"""Training-loop integrations: leanscale's techniques inside a Hugging Face ``Trainer`` or a
PyTorch Lightning ``Trainer``, as the ecosystem expects (callbacks).

- :mod:`leanscale.integrations.hf` -- ``LeanscaleTrainerCallback`` and ``MoETrainer``
  (``pip install 'leanscale[hf]'``);
- :mod:`leanscale.integrations.lightning` -- ``LeanscaleLightningCallback``
  (``pip install 'leanscale[lightning]'``).

Both do the same things at the same points of training: model surgery (Ghost BatchNorm, SWAT,
mixture of experts) before the optimizer is built, and gradient-noise-scale measurement over the
micro-batches of gradient accumulation, logged as ``noise_scale/b_simple``. Nothing is imported
until a submodule is: importing this package needs neither library.
"""

__all__: list[str] = []
