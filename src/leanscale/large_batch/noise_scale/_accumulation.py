"""Mode 2 of the noise scale, gradient accumulation: the squared norm of each micro-batch's gradient,
read from the change of ``.grad`` between two calls (see :meth:`GradientNoiseScale.accumulate
<leanscale.large_batch.noise_scale.GradientNoiseScale.accumulate>` and ``step``).

Only the bookkeeping lives here; the checks of the user's arguments, the warnings and the update
of the moving averages stay in :class:`~leanscale.large_batch.noise_scale.GradientNoiseScale`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from leanscale.core.errors import InvalidParameterError
from leanscale.core.validation import check_param

_OWNER = "GradientNoiseScale"


class MicroBatchNorms:
    """The micro-batches of one training step: their gradients' squared norms, from ``.grad`` deltas.

    Attributes:
        params: The trainable parameters of the model in this step (None before the first record).
        prev: ``.grad`` of each parameter at the previous :meth:`record` (None: zeros so far).
        squares: Each recorded micro-batch's ``|d_i|^2``, 0-d float64 tensors on the gradient's
            device (read at the end of the step, one host sync).
    """

    def __init__(self) -> None:
        self.params: list[torch.Tensor] | None = None
        self.prev: list[torch.Tensor | None] | None = None
        self.squares: list[torch.Tensor] = []

    def check_params(self, model: nn.Module) -> list[torch.Tensor]:
        """``model``'s trainable parameters, which must be those of the step so far."""
        check_param("model", model, [nn.Module], owner=f"{_OWNER}.accumulate")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise InvalidParameterError(
                f"The 'model' parameter of {_OWNER}.accumulate must have parameters with requires_grad=True. "
                f"Got a model with none."
            )
        if self.params is None or self.prev is None:
            self.params = params
        elif len(params) != len(self.params) or any(a is not b for a, b in zip(params, self.params)):
            raise InvalidParameterError(
                f"The 'model' parameter of {_OWNER}.accumulate must be the same model within one step "
                f"(call step() before switching models). Got a model with different parameters."
            )
        return params

    def record(self, model: nn.Module) -> None:
        """Record the squared norm of the change of ``.grad`` since the previous call."""
        params = self.check_params(model)
        if self.prev is None:
            self.prev = [None] * len(params)
        total = None
        for i, p in enumerate(params):
            g, prev = p.grad, self.prev[i]
            if g is None:
                continue  # no gradient yet: this micro-batch left it at zero
            g = g.detach()
            d = g if prev is None else g - prev  # this micro-batch's (scaled) gradient, p's shape
            sq = torch.linalg.vector_norm(d, dtype=torch.float64).square()  # 0-d, on g's device
            total = sq if total is None else total + sq.to(total.device)
            if prev is None:
                self.prev[i] = g.clone()
            else:
                prev.copy_(g)
        self.squares.append(torch.zeros((), dtype=torch.float64) if total is None else total)

    def has_pending(self, params: list[torch.Tensor]) -> bool:
        """Whether ``.grad`` changed since the last :meth:`record` (an unrecorded micro-batch)."""
        prev = self.prev or [None] * len(params)
        for p, q in zip(params, prev):
            if p.grad is None:
                continue
            if q is None:
                if bool(p.grad.detach().ne(0).any()):
                    return True
            elif not torch.equal(p.grad.detach(), q):
                return True
        return False

    def measurement(
        self, params: list[torch.Tensor], sizes: Sequence[int], grad_scale: float
    ) -> tuple[list[float], float, float, int]:
        """The two-batch measurement of the step (at least 2 micro-batches recorded, one size each).

        Returns:
            ``(small_sq_norms, batch_small, big_sq_norm, batch_big)``: each micro-batch's
            ``|G_small,i|^2``, their harmonic-mean size, ``|G_big|^2`` of the final ``.grad`` and
            the step's examples (see :meth:`GradientNoiseScale.step` for the formulas).
        """
        squares = self.squares
        total = sum(sizes)
        device = squares[0].device
        d_sq = torch.stack([s.to(device) for s in squares]).cpu().tolist()  # (k,) one host sync
        small = [sq / (grad_scale * n / total) ** 2 for sq, n in zip(d_sq, sizes)]
        big_sq = sum(torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float64).square().to(device)
                     for p in params if p.grad is not None)  # |D|^2, 0-d on device
        big = float(big_sq) / grad_scale**2
        b_small = len(sizes) / sum(1.0 / n for n in sizes)  # harmonic mean, < total for k >= 2
        return small, b_small, big, total

    def reset(self) -> None:
        # the next step starts from zero gradients (after zero_grad); its snapshot is allocated anew
        self.squares, self.prev, self.params = [], None, None
