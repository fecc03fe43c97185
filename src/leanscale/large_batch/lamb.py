"""LAMB: Adam with a layer-wise trust ratio.

You, Li, Reddi, Hseu, Kumar, Bhojanapalli, Song, Demmel, Keutzer & Hsieh 2019/2020, "Large Batch
Optimization for Deep Learning: Training BERT in 76 minutes", arXiv 1904.00962 (Algorithm 2).
LARS's per-layer normalisation applied to the Adam direction: each parameter tensor moves by
``lr`` times its own norm, whatever the scale of its gradient, which kept BERT pre-training
stable at batches of 32k-64k.

Update rule, per parameter tensor ``w`` with gradient ``g`` at step ``t`` (``lambda`` is
``weight_decay``)::

    m     = beta1 * m + (1 - beta1) * g
    v     = beta2 * v + (1 - beta2) * g**2
    m_hat = m / (1 - beta1**t),   v_hat = v / (1 - beta2**t)    (bias_correction=False: m, v)
    r     = m_hat / (sqrt(v_hat) + eps) + lambda * w
    ratio = ||w|| / ||r||         if ||w|| > 0 and ||r|| > 0, else 1
    w     = w - lr * ratio * r

The paper's scaling function ``phi`` is the identity here, or ``min(., trust_clip_max)`` when
``trust_clip_max`` is set (the paper allows clipping ``phi(z) = min(max(z, gamma_l), gamma_u)``).
A param group with ``lamb_adaptation=False`` drops the ratio: ``w - lr * r`` is exactly AdamW
(decoupled weight decay). :func:`leanscale.large_batch.lars.lars_param_groups` with
``optimizer="lamb"`` puts biases and norm weights in such a group without weight decay.

Unlike timm's ``Lamb``, the ratio is applied to every adapted group, with or without weight decay
(timm skips it where ``weight_decay == 0`` unless ``always_adapt``), and there is no built-in
global gradient clipping (NVIDIA's LAMB clips the global gradient norm at 1.0 first; use
:func:`leanscale.large_batch.schedules.clip_gradients` before :meth:`LAMB.step` for that).

Suggested settings: the paper's ``betas=(0.9, 0.999)``, ``eps=1e-6``, ``weight_decay=0.01``,
an LR of ~1e-3..1e-2 scaled with the square root of the batch, with linear warmup (and decay).
Because every layer's step is ``lr * ||w||``, ``lr`` is a *relative* step size: 1e-2 changes each
weight matrix by about 1% per step.

When it hurts:

* At small batches it is AdamW with extra normalisation and rarely better; Nado et al. 2021
  ("A Large Batch Optimizer Reality Check", arXiv 2102.06356) matched LAMB's BERT results with a
  well-tuned Adam at the same batch.
* Parameters whose norm stays near zero (zero-initialised projections) get ``ratio = 1`` on the
  first step and then move by ``lr * ||w||``, i.e. slowly: a relative step cannot grow a
  parameter quickly from almost nothing.
* Applying the ratio to biases and norm weights ties their step to their (initial) norm; leave
  them out (``lamb_adaptation=False``).

Cost: two Adam moments per parameter plus two norms per parameter tensor per step (no host sync).

Example:
    >>> p = torch.nn.Parameter(torch.tensor([3.0, 4.0]))    # ||w|| = 5
    >>> opt = LAMB([p], lr=0.01, weight_decay=0.0)
    >>> p.grad = torch.tensor([2.0, -2.0])
    >>> opt.step()                  # first step: r = g / |g| = [1, -1], ratio = 5 / sqrt(2)
    >>> p.detach()                  # w - 0.01 * 5 / sqrt(2) * [1, -1]: moves by 0.01 * ||w||
    tensor([2.9646, 4.0354])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from leanscale.core.errors import InvalidParameterError
from leanscale.core.validation import InstanceOf, Interval, check_param, check_params
from leanscale.large_batch.lars import (
    _check_group_keys,
    _norm,
    _TrustRatioOptimizer,
    check_params_argument,
)

__all__ = ["LAMB"]

_POSITIVE = Interval(float, 0, math.inf, closed="neither")  # finite and > 0
_NONNEGATIVE = Interval(float, 0, math.inf, closed="left")  # finite and >= 0
_BETA = Interval(float, 0, 1, closed="left")

# Declared once; checked for the constructor arguments and for every param group's overrides.
# "betas" is a pair and is checked by _check_betas.
_parameter_constraints: dict[str, list] = {
    "lr": [_NONNEGATIVE],
    "eps": [_POSITIVE],
    "weight_decay": [_NONNEGATIVE],
    "bias_correction": [bool],
    "trust_clip_max": [None, _POSITIVE],
    "lamb_adaptation": [bool],
}


def _check_betas(betas: Any, owner: str) -> None:
    check_param("betas", betas, [InstanceOf(tuple, list, description="a pair (beta1, beta2)")], owner=owner)
    if len(betas) != 2:
        raise InvalidParameterError(
            f"The 'betas' parameter of {owner} must be a pair (beta1, beta2). Got {len(betas)} values: {betas!r}."
        )
    for i, beta in enumerate(betas):
        check_param(f"betas[{i}]", beta, [_BETA], owner=owner)


class LAMB(_TrustRatioOptimizer):
    """Adam with a layer-wise trust ratio (You et al. 2019, arXiv 1904.00962, Algorithm 2).

    The update rule and suggested settings are in the module docstring.

    Args:
        params: Parameters or param groups. A group may override any argument below and set
            ``lamb_adaptation`` (default True); ``False`` gives an AdamW step for that group.
        lr: Learning rate (>= 0); with the ratio on, the step of each tensor is ``lr * ||w||``.
        betas: Decay rates of the first and second moments, each in [0, 1).
        eps: Added to ``sqrt(v_hat)`` (> 0).
        weight_decay: Decoupled weight decay ``lambda`` (>= 0), added to the Adam direction
            before the trust ratio.
        bias_correction: Divide the moments by ``1 - beta**t`` (Adam's correction).
        trust_clip_max: Upper bound of the trust ratio (> 0), or None for no bound.

    Raises:
        InvalidParameterError: An argument or a group override is out of range (the message
            names it), a group with LARS's ``lars_adaptation`` key, and, in :meth:`step`, sparse
            or complex gradients.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        # The paper's setting; larger than Adam's 1e-8, which matters where v_hat is tiny.
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        bias_correction: bool = True,
        trust_clip_max: float | None = None,
    ):
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "bias_correction": bias_correction,
            "trust_clip_max": trust_clip_max,
            "lamb_adaptation": True,
        }
        check_params(defaults, _parameter_constraints, owner="LAMB")
        _check_betas(betas, "LAMB")
        super().__init__(check_params_argument(params, "LAMB"), defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (validated: overrides must satisfy the constructor's constraints)."""
        if isinstance(param_group, dict):
            index = len(self.param_groups)
            _check_group_keys(param_group, _parameter_constraints, "lamb_adaptation", "LAMB", index)
            if "betas" in param_group:
                _check_betas(param_group["betas"], f"LAMB (param group {index})")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One LAMB step; ``closure`` (optional) re-evaluates the model and returns the loss."""
        loss = self._closure_loss(closure)
        for index, group in enumerate(self.param_groups):
            beta1, beta2 = group["betas"]
            weight_decay = group["weight_decay"]
            for p in self._with_grad(group, index):
                grad = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0  # a Python int: checkpoints stay device-agnostic
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"]
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)  # m
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # v

                if group["bias_correction"]:
                    bc1, bc2 = 1 - beta1**t, 1 - beta2**t
                else:
                    bc1 = bc2 = 1.0
                # r = m_hat / (sqrt(v_hat) + eps) + lambda * w
                update = (exp_avg / bc1).div_((exp_avg_sq / bc2).sqrt_().add_(group["eps"]))
                if weight_decay != 0:
                    update.add_(p, alpha=weight_decay)

                if group["lamb_adaptation"]:
                    w_norm, r_norm = _norm(p), _norm(update)
                    ratio = torch.where((w_norm > 0) & (r_norm > 0), w_norm / r_norm, torch.ones_like(w_norm))
                    if group["trust_clip_max"] is not None:
                        ratio = torch.clamp(ratio, max=group["trust_clip_max"])
                    update.mul_(ratio.to(update.dtype))
                p.add_(update, alpha=-group["lr"])
        return loss
