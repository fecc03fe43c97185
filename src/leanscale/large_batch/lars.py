"""LARS: SGD with momentum and a layer-wise trust ratio.

You, Gitman & Ginsburg 2017, "Large Batch Training of Convolutional Networks", arXiv 1708.03888
(Algorithm 1). The ratio ``||w|| / ||grad||`` varies by orders of magnitude between layers, so
one global learning rate large enough for an 8k-32k batch makes some layers diverge early. LARS
gives every parameter tensor (every "layer") its own local LR proportional to that ratio.

Update rule, per parameter tensor ``w`` with gradient ``g``, global LR ``lr`` (``eta`` is
``trust_coefficient``, ``beta`` is ``weight_decay``, ``m`` is ``momentum``)::

    local_lr = eta * ||w|| / (||g|| + beta * ||w|| + eps)     if ||w|| > 0 and ||g|| > 0, else 1
    d        = local_lr * (g + beta * w)
    v        = m * v + (1 - dampening) * d                    (first step: v = d)
    w        = w - lr * v                                     (nesterov: w - lr * (d + m * v))

As in ``torch.optim.SGD`` (and timm's ``Lars``), ``lr`` multiplies the buffer rather than the
increment inside it (the paper writes ``v = m v + lr * local_lr * (g + beta w)``); the two agree
while ``lr`` is constant and differ only in how an LR schedule acts on the momentum.

``trust_clip=True`` is timm's (and NVIDIA apex ``LARC``'s "clip" mode) variant:
``local_lr = min(local_lr / lr, 1)``, so the effective per-layer LR ``lr * local_lr`` becomes
``min(eta * ||w|| / (...), lr)``: the trust ratio can only *lower* the global LR, never raise it.

A param group with ``lars_adaptation=False`` takes plain SGD steps (momentum, dampening,
Nesterov and weight decay, no ratio). :func:`lars_param_groups` puts biases and
BatchNorm/LayerNorm weights in such a group without weight decay -- the common practice
(Goyal et al. 2017, arXiv 1706.02677, do not decay BatchNorm's gamma and beta; SimCLR's LARS, the
TensorFlow LAMB used for BERT and timm, whose groups without weight decay skip the ratio, leave
biases and norm weights out of both).

Suggested settings: ``trust_coefficient=0.001`` (the paper's), ``momentum=0.9``, the global LR
scaled with the batch like SGD's (linear or square-root rule, see
:func:`leanscale.large_batch.schedules.scale_lr`) with a few epochs of warmup. Because the local
LR is ~1e-3 * ||w||/||g||, the global LR is much larger than an SGD one: SimCLR (Chen et al.
2020, arXiv 2002.05709) uses ``lr = 0.3 * batch / 256`` (4.8 at batch 4096), weight decay 1e-6
and 10 epochs of warmup.

When it hurts:

* At ordinary batch sizes it buys nothing over tuned SGD with momentum, and even at large batches
  Nado et al. 2021 ("A Large Batch Optimizer Reality Check", arXiv 2102.06356) matched LARS with
  well-tuned Nesterov momentum: treat it as one more knob, not a guarantee.
* A parameter that is exactly zero (zero-initialised layers, zero-init residual BatchNorm gammas)
  gets ``local_lr = 1``, i.e. the full global LR, which under LARS is large: put such parameters
  in the ``lars_adaptation=False`` group (1-D ones already are with :func:`lars_param_groups`).
* Applying the ratio to biases and norm weights (tiny norms) slows them to a crawl.

Cost: two norms per parameter tensor per step, computed on the device (no host sync).

Example:
    >>> p = torch.nn.Parameter(torch.tensor([3.0, 4.0]))    # ||w|| = 5
    >>> opt = LARS([p], lr=1.0, momentum=0.9)
    >>> p.grad = torch.tensor([0.6, 0.8])                   # ||g|| = 1
    >>> opt.step()                                          # local_lr = 0.001 * 5 / 1 = 0.005
    >>> p.detach()                                          # w - 1.0 * 0.005 * g
    tensor([2.9970, 3.9960])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from leanscale.core.errors import InvalidParameterError
from leanscale.core.validation import (
    Interval,
    check_param,
    check_params,
    unknown_name_error,
)

__all__ = ["LARS", "lars_param_groups"]

_POSITIVE = Interval(float, 0, math.inf, closed="neither")  # finite and > 0
_NONNEGATIVE = Interval(float, 0, math.inf, closed="left")  # finite and >= 0

# Declared once; checked for the constructor arguments and for every param group's overrides.
_parameter_constraints: dict[str, list] = {
    "lr": [_POSITIVE],
    "momentum": [Interval(float, 0, 1, closed="left")],
    "dampening": [Interval(float, 0, 1, closed="both")],
    "weight_decay": [_NONNEGATIVE],
    "nesterov": [bool],
    "trust_coefficient": [_POSITIVE],
    "eps": [_POSITIVE],
    "trust_clip": [bool],
    "lars_adaptation": [bool],
}

# Keys that select the trust ratio, per optimizer (used by lars_param_groups and to catch a
# group built for the other optimizer, whose key would otherwise be silently ignored).
_ADAPTATION_KEYS = {"lars": "lars_adaptation", "lamb": "lamb_adaptation"}


def _norm(t: torch.Tensor) -> torch.Tensor:
    """L2 norm of a whole tensor as a 0-d tensor (no host sync). fp16/bf16 are summed in fp32:
    the sum of squares of a large fp16 tensor overflows past 65504."""
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return torch.linalg.vector_norm(t)


def _check_dense(p: torch.Tensor, owner: str, group_index: int) -> None:
    if p.grad.is_sparse:
        raise InvalidParameterError(
            f"The 'params' parameter of {owner} must hold parameters with dense gradients. Got a sparse "
            f"gradient for a parameter of shape {tuple(p.shape)} in param group {group_index}; the trust "
            f"ratio needs the full gradient norm (use nn.Embedding(sparse=False), or torch.optim.SparseAdam "
            f"for that parameter)."
        )
    if torch.is_complex(p):
        raise InvalidParameterError(
            f"The 'params' parameter of {owner} must hold real floating-point parameters. Got a complex "
            f"parameter of dtype {p.dtype} in param group {group_index} (use torch.view_as_real)."
        )


def _check_group_keys(param_group: dict, constraints: dict, own_key: str, owner: str, index: int) -> None:
    """Check a param group's overrides; reject the *other* optimizer's adaptation key."""
    where = f"{owner} (param group {index})"
    for key in _ADAPTATION_KEYS.values():
        if key != own_key and key in param_group:
            raise InvalidParameterError(
                f"The param group {index} of {owner} must set {own_key!r} to switch the trust ratio. Got "
                f"{key!r} instead, which {owner} would ignore (groups built for the other optimizer? "
                f"use lars_param_groups(model, weight_decay, optimizer={owner.lower()!r}))."
            )
    check_params({k: v for k, v in param_group.items() if k != "params"}, constraints, owner=where)


def check_params_argument(params: Any, owner: str) -> list:
    """``params`` (parameters or param-group dicts) as a list; an error naming 'params' unless it
    is a non-empty iterable of tensors or of dicts (a model instead of ``model.parameters()``, a
    string, or an empty list are refused)."""
    if isinstance(params, nn.Module):
        raise InvalidParameterError(
            f"The 'params' parameter of {owner} must be an iterable of parameters or param-group dicts. Got "
            f"a model ({type(params).__name__}): pass model.parameters() or lars_param_groups(model, ...)."
        )
    if isinstance(params, torch.Tensor):
        return [params]
    if isinstance(params, (str, bytes, dict)) or not hasattr(params, "__iter__"):
        raise InvalidParameterError(
            f"The 'params' parameter of {owner} must be an iterable of parameters or param-group dicts. "
            f"Got {type(params).__name__} instead."
        )
    items = list(params)
    if not items:
        raise InvalidParameterError(
            f"The 'params' parameter of {owner} must hold at least one parameter. Got an empty iterable "
            f"(a model without parameters, or all of them filtered out)."
        )
    for i, item in enumerate(items):
        if not isinstance(item, (torch.Tensor, dict)):
            raise InvalidParameterError(
                f"The 'params' parameter of {owner} must hold tensors or param-group dicts. Got "
                f"{type(item).__name__} at index {i}."
            )
        if isinstance(item, dict):
            if "params" not in item:
                raise InvalidParameterError(
                    f"The param group {i} of {owner} must have a 'params' key (its tensors). Got the keys "
                    f"{sorted(map(str, item))}."
                )
            group = item["params"]
            tensors = [group] if isinstance(group, torch.Tensor) else (
                None if isinstance(group, (str, bytes, dict)) or not hasattr(group, "__iter__") else list(group))
            if tensors is None or not all(isinstance(t, torch.Tensor) for t in tensors):
                raise InvalidParameterError(
                    f"The 'params' of param group {i} of {owner} must be a tensor or an iterable of tensors. "
                    f"Got {type(group).__name__}"
                    + ("" if tensors is None else " holding " + ", ".join(sorted({type(t).__name__ for t in tensors})))
                    + "."
                )
            items[i] = {**item, "params": tensors}
    return items


class _TrustRatioOptimizer(torch.optim.Optimizer):
    """What LARS and LAMB share around their update rules: old pickles, and the closure."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # pickles from before a key existed
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    @staticmethod
    def _closure_loss(closure: Callable[[], torch.Tensor] | None) -> torch.Tensor | None:
        """The loss ``closure`` returns (evaluated with gradients on), or None without one."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def _with_grad(self, group: dict[str, Any], index: int):
        """The parameters of param group ``index`` that have a gradient (dense and real, checked)."""
        for p in group["params"]:
            if p.grad is not None:
                _check_dense(p, type(self).__name__, index)
                yield p


def _check_nesterov(nesterov: bool, momentum: float, dampening: float, owner: str) -> None:
    if nesterov and (momentum <= 0 or dampening != 0):
        raise InvalidParameterError(
            f"The 'nesterov' parameter of {owner} requires momentum > 0 and dampening = 0. "
            f"Got nesterov=True with momentum={momentum!r} and dampening={dampening!r} instead."
        )


class LARS(_TrustRatioOptimizer):
    """SGD with momentum and a layer-wise trust ratio (You, Gitman & Ginsburg 2017, arXiv 1708.03888).

    The update rule and suggested settings are in the module docstring.

    Args:
        params: Parameters or param groups. A group may override any argument below and set
            ``lars_adaptation`` (default True); ``False`` gives plain SGD for that group.
        lr: Global learning rate (> 0).
        momentum: Momentum factor in [0, 1).
        dampening: Dampening of the momentum in [0, 1] (as ``torch.optim.SGD``).
        weight_decay: L2 penalty coefficient (>= 0); enters the gradient and the trust ratio.
        nesterov: Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
        trust_coefficient: The paper's ``eta`` (> 0): how far one step may move a layer
            relative to its norm.
        eps: Added to the denominator of the trust ratio (> 0).
        trust_clip: Clip the local LR to ``min(local_lr / lr, 1)`` (timm / apex LARC variant).

    Raises:
        InvalidParameterError: An argument or a group override is out of range (the message
            names it), ``nesterov`` without momentum or with dampening, a group with LAMB's
            ``lamb_adaptation`` key, and, in :meth:`step`, sparse or complex gradients.
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.9,
        dampening: float = 0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        # The paper's eta: the local LR is ~1e-3 * ||w||/||g|| of the global one.
        trust_coefficient: float = 0.001,
        # Guards ||g|| + beta ||w|| = 0 in fp arithmetic; negligible against real norms.
        eps: float = 1e-8,
        trust_clip: bool = False,
    ):
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "trust_coefficient": trust_coefficient,
            "eps": eps,
            "trust_clip": trust_clip,
            "lars_adaptation": True,
        }
        check_params(defaults, _parameter_constraints, owner="LARS")
        _check_nesterov(nesterov, momentum, dampening, "LARS")
        super().__init__(check_params_argument(params, "LARS"), defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (validated: overrides must satisfy the constructor's constraints)."""
        if isinstance(param_group, dict):
            index = len(self.param_groups)
            _check_group_keys(param_group, _parameter_constraints, "lars_adaptation", "LARS", index)
            merged = {**self.defaults, **param_group}
            _check_nesterov(merged["nesterov"], merged["momentum"], merged["dampening"], f"LARS (param group {index})")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One LARS step; ``closure`` (optional) re-evaluates the model and returns the loss."""
        loss = self._closure_loss(closure)
        for index, group in enumerate(self.param_groups):
            lr = group["lr"]
            momentum = group["momentum"]
            dampening = group["dampening"]
            weight_decay = group["weight_decay"]
            for p in self._with_grad(group, index):
                grad = p.grad
                # d = g + beta * w  (a new tensor: p.grad is left untouched)
                d = grad.add(p, alpha=weight_decay) if weight_decay != 0 else grad
                if group["lars_adaptation"]:
                    w_norm, g_norm = _norm(p), _norm(grad)
                    ratio = group["trust_coefficient"] * w_norm / (g_norm + weight_decay * w_norm + group["eps"])
                    # 1 where either norm is 0: a zero layer has no scale to be relative to.
                    ratio = torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
                    if group["trust_clip"] and lr > 0:  # lr may be 0 from a scheduler: nothing to clip
                        ratio = torch.clamp(ratio / lr, max=1.0)
                    d = d.mul(ratio.to(d.dtype))

                if momentum != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = torch.clone(d).detach()
                        state["momentum_buffer"] = buf
                    else:
                        buf.mul_(momentum).add_(d, alpha=1 - dampening)
                    d = d.add(buf, alpha=momentum) if group["nesterov"] else buf
                p.add_(d, alpha=-lr)
        return loss


def lars_param_groups(model: nn.Module, weight_decay: float, optimizer: str = "lars") -> list[dict[str, Any]]:
    """Param groups for LARS or LAMB: no weight decay and no trust ratio on 1-D parameters.

    Biases and BatchNorm/LayerNorm weights and biases (every parameter with ``ndim <= 1``) go in a
    group with ``weight_decay=0`` and the trust ratio off; every other trainable parameter in a
    group with ``weight_decay`` and the ratio on. This is the common practice for large-batch
    training (Goyal et al. 2017, arXiv 1706.02677, do not decay BatchNorm's gamma and beta;
    SimCLR's LARS and the TensorFlow LAMB used for BERT exclude biases and norm weights from decay
    and adaptation alike): their norms are tiny or stay near their initial value (zeros, ones), so
    the ratio would freeze them or, at zero, hand them the full global LR. Parameters with
    ``requires_grad=False`` are left out (as timm does); empty groups are dropped.

    Args:
        model: The module whose ``parameters()`` are grouped.
        weight_decay: Decay of the adapted group (>= 0).
        optimizer: ``"lars"`` (sets ``lars_adaptation``) or ``"lamb"`` (``lamb_adaptation``): the
            key the optimizer reads, since each rejects the other's.

    Returns:
        A list of param-group dicts for :class:`LARS` or :class:`~leanscale.large_batch.lamb.LAMB`:
        first the adapted group (rank >= 2 weights), then the 1-D group.

    Raises:
        InvalidParameterError: ``weight_decay`` negative, unknown ``optimizer``, or a model with
            no trainable parameters.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
        >>> groups = lars_param_groups(model, weight_decay=5e-4)
        >>> [(len(g["params"]), g["weight_decay"], g["lars_adaptation"]) for g in groups]
        [(2, 0.0005, True), (4, 0.0, False)]
        >>> opt = LARS(groups, lr=0.1)
    """
    owner = "lars_param_groups"
    check_param("model", model, [nn.Module], owner=owner)
    check_param("weight_decay", weight_decay, [_NONNEGATIVE], owner=owner)
    if not isinstance(optimizer, str) or optimizer not in _ADAPTATION_KEYS:
        raise unknown_name_error("optimizer", optimizer, _ADAPTATION_KEYS, owner=owner)
    key = _ADAPTATION_KEYS[optimizer]
    adapted, plain = [], []
    for p in model.parameters():
        if p.requires_grad:
            (plain if p.ndim <= 1 else adapted).append(p)
    if not adapted and not plain:
        raise InvalidParameterError(
            f"The 'model' parameter of {owner} must have trainable parameters. Got a "
            f"{type(model).__name__} with none (all frozen or no parameters)."
        )
    groups = [
        {"params": adapted, "weight_decay": weight_decay, key: True},
        {"params": plain, "weight_decay": 0.0, key: False},
    ]
    return [g for g in groups if g["params"]]
