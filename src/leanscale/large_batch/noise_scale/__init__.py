"""The gradient noise scale B_simple and the batch size and learning rate it suggests.

McCandlish, Kaplan, Amodei & the OpenAI Dota Team 2018, "An Empirical Model of Large-Batch
Training", arXiv 1812.06162.

**The quantity.** Let ``G`` be the true gradient of the loss and ``Sigma`` the covariance of the
per-example gradients. A batch of ``B`` i.i.d. examples gives a gradient ``G_B`` with (their eq. A.1)::

    E |G_B|^2 = |G|^2 + tr(Sigma) / B

The *simple noise scale* ``B_simple = tr(Sigma) / |G|^2`` is the batch size at which the noise
and the signal in ``G_B`` have equal size. It approximates the noise scale
``B_noise = tr(H Sigma) / (G^T H G)`` (``H`` the Hessian) -- exactly when ``H`` is a multiple of
the identity -- and ``B_noise`` predicts the *critical batch size*: training to a given loss takes
``S = S_min (1 + B_noise / B)`` optimizer steps and ``E = E_min (1 + B / B_noise)`` examples
(their eqs. 2.11-2.12), so below ``B_noise`` doubling the batch nearly halves the steps and above
it extra examples buy few steps.

**The estimators** (Appendix A). From squared norms measured at two batch sizes
``B_small < B_big``, the unbiased estimates are::

    |G|^2     ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

(:func:`two_batch_estimates`). Their *ratio* is biased (and very noisy), so, as the paper advises,
:class:`GradientNoiseScale` smooths the numerator and the denominator separately with an
exponential moving average, bias-corrected like Adam's moments so the first values are not pulled
towards 0, and only then divides.

**Three ways to measure.**

1. Offline, :func:`measure_noise_scale`: ``n_batches`` small batches of the data, one gradient
   each (no optimizer step); ``G_small`` is each of them, ``G_big`` their mean (the gradient of
   their union). The model is left exactly as it was (weights, ``.grad``, BatchNorm buffers, modes).
2. During ordinary training with gradient accumulation, :meth:`GradientNoiseScale.accumulate`
   after each micro-batch's ``backward()`` and :meth:`GradientNoiseScale.step` after the last:
   small = each micro-batch's gradient (the difference of ``.grad`` between two calls), big = the
   accumulated gradient. ``.grad`` is only read, so the optimizer sees exactly the same gradient.
3. Under DDP, :meth:`GradientNoiseScale.attach_ddp`: a communication hook records each bucket's
   local squared norm before the all-reduce and the averaged one after. small = the rank's local
   gradient (batch ``B_local``; ``|G_small|^2`` is the mean over ranks of the local squared norms,
   one extra all-reduce of a float64 scalar per step), big = the averaged gradient (batch
   ``world_size * B_local``), which is what every rank steps with anyway: no extra backward pass,
   and training is unchanged (the hook returns the averaged bucket as the default one does).

In all three modes the unbiasedness only needs ``E |G_b|^2 = |G|^2 + tr(Sigma)/b`` for each batch,
so it does not matter that the big batch contains the small ones.

**Caveats.**

* ``B_simple`` equals ``B_noise`` only when the Hessian is well conditioned (close to a multiple
  of the identity); otherwise it can be off by a large factor. The paper found it a useful
  predictor of the measured critical batch, but treat it as an order-of-magnitude guide.
* The noise scale grows during training (``|G|`` shrinks faster than the noise), often by an order
  of magnitude: a measurement early in training underestimates the useful batch later on. Measure
  at the stage you plan for, or track it online (modes 2 and 3) and grow the batch.
* The i.i.d. model assumes examples are independent within a batch. BatchNorm in train mode
  couples them; the estimate is then that of the BatchNorm'd training gradient at these batch
  sizes, usually close but not exact. Ghost BatchNorm with a ghost batch <= the small batch keeps
  the small batches independent.
* Per-example clipping or other per-batch non-linear processing of gradients is not modelled.

**Layout.** ``estimators.py`` (the two-batch estimates, no state), ``tracker.py``
(:class:`GradientNoiseScale`: the moving averages, with the micro-batch bookkeeping of mode 2 in
``_accumulation.py`` and the DDP hook of mode 3 in ``_ddp.py``), ``offline.py`` (mode 1,
:func:`measure_noise_scale`) and ``advice.py`` (:func:`advise`). Import the public names from here.

Example:
    >>> import torch
    >>> gns = GradientNoiseScale(beta=0.9)
    >>> _ = gns.update([2.2, 1.8], 8, 1.25, 64)  # |G_small|^2 at B=8 (two batches), |G_big|^2 at B=64
    >>> round(gns.grad_sq_norm, 4), round(gns.trace_sigma, 4), round(gns.b_simple, 2)
    (1.1429, 6.8571, 6.0)
    >>> advice = advise(400.0, base_lr=0.1, base_batch_size=128)
    >>> advice.batch_size, round(advice.lr, 3), advice.steps_factor, round(advice.examples_factor, 2)
    (512, 0.232, 1.78125, 2.28)
"""

from leanscale.large_batch.noise_scale.advice import BatchAdvice, advise
from leanscale.large_batch.noise_scale.estimators import (
    NoiseEstimates,
    two_batch_estimates,
)
from leanscale.large_batch.noise_scale.offline import (
    NoiseScaleResult,
    measure_noise_scale,
)
from leanscale.large_batch.noise_scale.tracker import GradientNoiseScale

__all__ = [
    "BatchAdvice",
    "GradientNoiseScale",
    "NoiseEstimates",
    "NoiseScaleResult",
    "advise",
    "measure_noise_scale",
    "two_batch_estimates",
]
