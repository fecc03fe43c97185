"""One learning-rate schedule for every training loop: linear warmup, then step, cosine or none.

:func:`lr_factor` is the multiplier of the peak learning rate at optimizer step ``step``
(0-based) of ``n_steps``. Every loop of leanscale uses it (the large-batch classifier, the
pruning scoring model, the IsoFLOP sweep's language models, SimCLR) and so do the technique
schedules built on it; before, the same cosine was written six times with three different
conventions.

Two conventions for *when* the factor is read, both in use and both written with this function:

- **at the start of the step** (``lr_factor(step, ...)``): the first step uses
  ``warmup_start`` (Goyal et al. 2017, arXiv 1706.02677, Sec. 2.2; ``transformers``' linear
  warmup); the large-batch recipe and the pruning scoring model use it.
- **at the end of the step** (``lr_factor(step + 1, ...)``): the first step already uses
  ``1 / warmup_steps`` of the peak and the last step ends exactly at ``floor``; Chinchilla's runs
  (Hoffmann et al. 2022) decay to 10% over exactly the training length. The sweep and SimCLR use it.

Example:
    >>> [round(lr_factor(s, 8, warmup_steps=2), 3) for s in range(8)]
    [0.0, 0.5, 1.0, 0.933, 0.75, 0.5, 0.25, 0.067]
    >>> [round(lr_factor(s + 1, 10, warmup_steps=2, floor=0.1), 3) for s in (0, 1, 9)]
    [0.5, 1.0, 0.1]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["cosine_factor", "lr_factor"]

DECAYS = ("step", "cosine", "none")


def cosine_factor(progress: float, floor: float = 0.0) -> float:
    """``floor + (1 - floor) * (1 + cos(pi * p)) / 2`` with ``p`` clipped to [0, 1]: 1 at the start
    of the decay, ``floor`` at its end (Loshchilov & Hutter 2017, arXiv 1608.03983, no restarts)."""
    p = min(1.0, max(0.0, progress))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p))


def lr_factor(
    step: int,
    n_steps: int,
    *,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
    decay: str = "cosine",
    floor: float = 0.0,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
) -> float:
    """Multiplier of the peak learning rate at step ``step`` of ``n_steps``.

    Args:
        step: optimizer steps taken (0-based index of the step about to run, or ``step + 1`` for
            the end-of-step convention, see the module docstring).
        n_steps: planned steps; the cosine reaches ``floor`` at ``step == n_steps``.
        warmup_steps: linear warmup ``warmup_start + (1 - warmup_start) * step / warmup_steps``
            for ``step < warmup_steps``; 0: none.
        warmup_start: the factor at step 0 (Goyal et al.: ``base_batch_size / batch_size``).
        decay: after warmup, ``"cosine"`` (from 1 to ``floor`` over ``n_steps - warmup_steps``),
            ``"step"`` (``gamma ** (milestones <= step)``; milestones count steps from the start,
            warmup included) or ``"none"`` (constant).
        floor: the cosine's final factor (Chinchilla: 0.1).
        milestones: step counts where ``decay="step"`` multiplies by ``gamma``.
        gamma: factor per milestone.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return warmup_start + (1.0 - warmup_start) * step / warmup_steps
    if decay == "cosine":
        return cosine_factor((step - warmup_steps) / max(1, n_steps - warmup_steps), floor)
    if decay == "step":
        return gamma ** sum(step >= m for m in milestones)
    if decay == "none":
        return 1.0
    from leanscale.core.validation import unknown_name_error

    raise unknown_name_error("decay", decay, DECAYS, owner="lr_factor")
