"""FLOP counting: per-layer FLOP rules and the hooks that apply them.

:func:`count_flops` runs one forward pass with forward hooks and asks a per-class *FLOP rule* for
the forward and backward cost of each module call (:func:`track_flops` does the same for the calls
inside a ``with`` block). Rules live in a plain registry keyed by module class and found along the
MRO, so a subclass inherits its parent's rule unless it registers its own
(:func:`register_flop_rule`): the module that defines a layer registers its rule (SWAT, MoE and the
GPT attention layer add theirs). The totals feed :class:`leanscale.core.ledger.CostLedger`.

Conventions (the same as ``torch.utils.flop_counter.FlopCounterMode`` and as Appendix F of
Hoffmann et al. 2022, arXiv 2203.15556, and Kaplan et al. 2020, arXiv 2001.08361):

* one multiply-add (MAC) is **2 FLOPs**; bias additions are not counted (they are a ``1/fan_in``
  fraction of a layer's MACs);
* the backward pass of a matmul-like layer (Linear, Conv, attention) costs one forward's worth of
  FLOPs for the gradient with respect to its input **and** one for the gradient with respect to
  its weight, i.e. 2x forward. Each half is counted only when autograd will compute it: no input
  gradient for a layer applied directly to data (input does not require grad), no weight gradient
  for a frozen layer, no backward at all under ``torch.no_grad()``;
* only work done inside modules that have a rule is counted: functional calls outside modules
  (the loss, residual additions, activation functions) are not. For matmul-dominated models this
  is a fraction of a percent.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> c = count_flops(net, torch.randn(16, 8))
    >>> c.forward  # 2 * 16 * (8*4 + 4*2)
    1280
    >>> c.backward  # 2x forward, except the first layer's input gradient (data needs none)
    1536
    >>> c.total
    2816
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from leanscale.core.errors import InvalidParameterError
from leanscale.core.validation import check_param

__all__ = [
    "FlopRule",
    "register_flop_rule",
    "get_flop_rule",
    "FlopCount",
    "track_flops",
    "count_flops",
    "mha_flops",
    "NORM_STATS_FLOPS_PER_ELEMENT",
    "RMS_NORM_STATS_FLOPS_PER_ELEMENT",
    "NORM_BACKWARD_FACTOR",
]

FlopRule = Callable[[nn.Module, tuple, Any], "tuple[float, float]"]
"""``rule(module, inputs, output) -> (forward_flops, backward_flops)`` for ONE call of ``module``.

``inputs`` are the positional arguments of the call (the keyword values when there were none),
``output`` what it returned. The rule counts only the work the module does itself: the calls of
its submodules are hooked and counted by their own rules.
"""

_FLOP_RULES: dict[type, FlopRule] = {}


def register_flop_rule(module_cls: type, rule: FlopRule | None = None):
    """Register ``rule`` as the FLOP rule of ``module_cls`` and of its subclasses.

    A later registration for the same class replaces the earlier one. Without ``rule`` this is a
    decorator::

        @register_flop_rule(MyExpertLayer)
        def _my_expert_layer_flops(module, inputs, output):
            return forward_flops, backward_flops

    Raises:
        InvalidParameterError: ``module_cls`` is not a subclass of ``nn.Module`` or ``rule`` is
            not callable.
    """
    if not (isinstance(module_cls, type) and issubclass(module_cls, nn.Module)):
        raise InvalidParameterError(
            f"The 'module_cls' parameter of register_flop_rule must be a subclass of "
            f"torch.nn.Module. Got {module_cls!r} instead."
        )
    if rule is None:
        def decorator(func: FlopRule) -> FlopRule:
            register_flop_rule(module_cls, func)
            return func

        return decorator
    check_param("rule", rule, [callable], owner="register_flop_rule")
    _FLOP_RULES[module_cls] = rule
    return rule


def get_flop_rule(module: nn.Module | type) -> FlopRule | None:
    """The rule of the nearest class in ``module``'s MRO that has one, else a rule for a
    well-known third-party layer recognised by name (Hugging Face's ``*RMSNorm`` classes and
    GPT-2's ``Conv1D``), or ``None``."""
    cls = module if isinstance(module, type) else type(module)
    for klass in cls.__mro__:
        rule = _FLOP_RULES.get(klass)
        if rule is not None:
            return rule
    return _third_party_rule(cls)
    return None


# ----------------------------------------------------------------------------- built-in rules


def _needs_grad(t: Any) -> bool:
    """Autograd will compute a gradient for ``t`` (hooks run in the forward's grad mode)."""
    return torch.is_grad_enabled() and isinstance(t, torch.Tensor) and t.requires_grad


def _matmul_backward(module: nn.Module, x: Any, fwd: int) -> int:
    """Backward of a matmul-like layer: ``fwd`` for the input gradient, ``fwd`` for the weight's."""
    return fwd * int(_needs_grad(x)) + fwd * int(_needs_grad(getattr(module, "weight", None)))


def _linear_flops(module: nn.Linear, inputs: tuple, output: torch.Tensor) -> tuple[int, int]:
    # output: (..., out_features); each output element is a dot product of length in_features.
    fwd = 2 * module.in_features * output.numel()
    return fwd, _matmul_backward(module, inputs[0], fwd)


def _conv_flops(module: nn.modules.conv._ConvNd, inputs: tuple, output: torch.Tensor) -> tuple[int, int]:
    # output: (B, C_out, *spatial_out). Each output element is a dot product over one group's
    # input channels and the kernel window, whatever the stride, dilation or padding (padded
    # zeros are multiplied too, as cuDNN and FlopCounterMode count them).
    macs_per_output = (module.in_channels // module.groups) * math.prod(module.kernel_size)
    fwd = 2 * macs_per_output * output.numel()
    # Backward: the input gradient is a transposed convolution with the same MACs; the weight
    # gradient pairs each output gradient with its input window, again the same MACs.
    return fwd, _matmul_backward(module, inputs[0], fwd)


def _conv_transpose_flops(
    module: nn.modules.conv._ConvTransposeNd, inputs: tuple, output: torch.Tensor
) -> tuple[int, int]:
    # A transposed convolution scatters every INPUT element into one group's output channels
    # over the kernel window: input (B, C_in, *spatial_in).
    x = inputs[0]
    fwd = 2 * x.numel() * (module.out_channels // module.groups) * math.prod(module.kernel_size)
    return fwd, _matmul_backward(module, x, fwd)


def _embedding_flops(module: nn.Embedding, inputs: tuple, output: torch.Tensor) -> tuple[int, int]:
    # Forward: a row lookup (gather), 0 FLOPs. Backward: the weight gradient scatter-adds each
    # element of the output gradient into its row, 1 FLOP per output element (0 when frozen).
    # The indices need no gradient. (Chinchilla instead prices the lookup as a one-hot matmul.)
    return 0, output.numel() * int(_needs_grad(module.weight))


_RMSNorm = getattr(nn, "RMSNorm", None)  # torch >= 2.4

# Normalisation layers: a few FLOPs per element, per the operations a straightforward kernel runs.
# mean (1 add), centre (1 sub), square + sum for the variance (2), scale by 1/std (1):
NORM_STATS_FLOPS_PER_ELEMENT = 5
RMS_NORM_STATS_FLOPS_PER_ELEMENT = 3  # square (1), sum (1), scale by 1/rms (1)
NORM_EVAL_FLOPS_PER_ELEMENT = 2  # BatchNorm with running statistics: subtract mean (1), scale (1)
NORM_BACKWARD_FACTOR = 2  # backward ~ 2x forward: two reductions of the gradient + the elementwise chain rule


def _norm_flops(module: nn.Module, inputs: tuple, output: torch.Tensor) -> tuple[int, int]:
    x = inputs[0]
    if _RMSNorm is not None and isinstance(module, _RMSNorm):
        per_element = RMS_NORM_STATS_FLOPS_PER_ELEMENT
    elif (
        isinstance(module, nn.modules.batchnorm._BatchNorm)
        and not module.training
        and module.running_mean is not None
    ):
        per_element = NORM_EVAL_FLOPS_PER_ELEMENT
    else:
        per_element = NORM_STATS_FLOPS_PER_ELEMENT
    # Affine part: multiply by the weight (1), add the bias (1), when present.
    per_element += int(getattr(module, "weight", None) is not None)
    per_element += int(getattr(module, "bias", None) is not None)
    fwd = per_element * x.numel()
    needs = _needs_grad(x) or any(_needs_grad(p) for p in module.parameters(recurse=False))
    return fwd, NORM_BACKWARD_FACTOR * fwd * int(needs)


def _rms_norm_flops(module: nn.Module, inputs: tuple, output: torch.Tensor) -> tuple[int, int]:
    # an RMSNorm written by another library (LlamaRMSNorm, MistralRMSNorm, T5-style): as nn.RMSNorm
    x = inputs[0]
    fwd = (RMS_NORM_STATS_FLOPS_PER_ELEMENT + int(getattr(module, "weight", None) is not None)) * x.numel()
    needs = _needs_grad(x) or any(_needs_grad(p) for p in module.parameters(recurse=False))
    return fwd, NORM_BACKWARD_FACTOR * fwd * int(needs)


def _hf_conv1d_flops(module: nn.Module, inputs: tuple, output: torch.Tensor) -> tuple[int, int]:
    # transformers' GPT-2 Conv1D: x @ weight + bias with weight (in, out), i.e. a transposed Linear
    x = inputs[0]
    fwd = 2 * x.numel() * int(module.weight.shape[1])
    return fwd, _matmul_backward(module, x, fwd)


def _third_party_rule(cls: type) -> FlopRule | None:
    name, where = cls.__name__, getattr(cls, "__module__", "") or ""
    if name.endswith("RMSNorm"):
        return _rms_norm_flops
    if name == "Conv1D" and where.startswith("transformers."):
        return _hf_conv1d_flops
    return None


def mha_flops(module: nn.MultiheadAttention, inputs: tuple, output: Any,
              weight_density: float = 1.0) -> tuple[float, float]:
    """Training FLOPs of one ``nn.MultiheadAttention`` call (fused form): the q/k/v and output
    projections, with their forward and input gradient scaled by ``weight_density``, and the
    attention itself (``Q K^T`` and ``A V``, 2 * L * S * E multiply-adds each per batch element,
    backward 2x). The weight gradients use the dense inputs (the attention saves them)."""
    if len(inputs) < 3 or not all(isinstance(t, torch.Tensor) for t in inputs[:3]):
        return 0.0, 0.0
    q, k, v = inputs[:3]
    e = module.embed_dim
    if q.dim() == 3:
        b_dim = 0 if module.batch_first else 1
        batch, lq, lk = q.shape[b_dim], q.shape[1 - b_dim], k.shape[1 - b_dim]
    else:
        batch, lq, lk = 1, q.shape[0], k.shape[0]
    proj = 2 * e * e * batch * (2 * lq + 2 * lk)  # q and out projections: lq rows each, k and v: lk each
    attn = 2 * 2 * batch * lq * lk * e
    fwd = proj * weight_density + attn
    bwd = 0.0
    if torch.is_grad_enabled():
        if any(t.requires_grad for t in (q, k, v)):
            bwd += proj * weight_density + 2 * attn
        if module.in_proj_weight is not None and module.in_proj_weight.requires_grad:
            bwd += proj  # dense: the attention saves its dense inputs
    return fwd, bwd


for _cls in (nn.Linear,):
    register_flop_rule(_cls, _linear_flops)
register_flop_rule(nn.MultiheadAttention, lambda module, inputs, output: mha_flops(module, inputs, output))
for _cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_flop_rule(_cls, _conv_flops)
for _cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_flop_rule(_cls, _conv_transpose_flops)
register_flop_rule(nn.Embedding, _embedding_flops)
for _cls in (
    nn.LayerNorm, nn.GroupNorm,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
    *((_RMSNorm,) if _RMSNorm is not None else ()),
):
    register_flop_rule(_cls, _norm_flops)


# ----------------------------------------------------------------------------- counting


@dataclass
class FlopCount:
    """FLOPs of the module calls seen while counting.

    Attributes:
        forward: Forward FLOPs.
        backward: FLOPs of the backward pass that autograd would run for that forward.
        by_module: Qualified module name (``""`` for the root) -> ``(forward, backward)``.
        unsupported: Names of the module classes that were called, own parameters and have no
            rule; their work is missing from the count.
    """

    forward: float = 0
    backward: float = 0
    by_module: dict[str, tuple[float, float]] = field(default_factory=dict)
    unsupported: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        """Forward + backward: the FLOPs of one training step on this input."""
        return self.forward + self.backward


@contextlib.contextmanager
def track_flops(model: nn.Module, *, warn: bool = True) -> Iterator[FlopCount]:
    """Count the FLOPs of every forward call of ``model``'s modules inside the ``with`` block.

    Use it to count real training steps (data-dependent routing included) without an extra
    forward pass. The hooks are removed on exit, also on error. Modules that own parameters but
    have no rule are listed in ``unsupported`` and, with ``warn``, reported in one warning.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(4, 3)
        >>> with track_flops(net) as c:
        ...     _ = net(torch.randn(5, 4)); _ = net(torch.randn(5, 4))
        >>> c.forward
        240
    """
    if not isinstance(model, nn.Module):
        raise InvalidParameterError(
            f"The 'model' parameter of track_flops must be an instance of torch.nn.Module. "
            f"Got {type(model).__name__} instead."
        )
    count = FlopCount()
    handles = []

    def make_hook(name: str, rule: FlopRule | None):
        def hook(module, args, kwargs, output):
            if rule is None:
                cls_name = type(module).__name__
                if cls_name not in count.unsupported:
                    count.unsupported.append(cls_name)
                return
            fwd, bwd = rule(module, args if args else tuple(kwargs.values()), output)
            count.forward += fwd
            count.backward += bwd
            old_fwd, old_bwd = count.by_module.get(name, (0, 0))
            count.by_module[name] = (old_fwd + fwd, old_bwd + bwd)

        return hook

    try:
        for name, module in model.named_modules():  # a shared module is visited once
            rule = get_flop_rule(module)
            owns_params = next(module.parameters(recurse=False), None) is not None
            if rule is not None or owns_params:
                handles.append(module.register_forward_hook(make_hook(name, rule), with_kwargs=True))
        yield count
    finally:
        for handle in handles:
            handle.remove()
    if warn and count.unsupported:
        warnings.warn(
            f"count_flops: no FLOP rule for {', '.join(count.unsupported)}; their FLOPs are not "
            f"counted. Register one with leanscale.core.flops.register_flop_rule.",
            UserWarning,
            stacklevel=3,
        )


def count_flops(model: nn.Module, /, *args: Any, **kwargs: Any) -> FlopCount:
    """FLOPs of one forward (and of the matching backward) of ``model(*args, **kwargs)``.

    The forward runs with gradients enabled, so the backward count is that of a training step;
    use ``.forward`` for inference. Buffers (BatchNorm running statistics) are restored
    afterwards, so counting leaves the model as it was. See the module docstring for conventions.

    Returns:
        A :class:`FlopCount`.

    Raises:
        InvalidParameterError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise InvalidParameterError(
            f"The 'model' parameter of count_flops must be an instance of torch.nn.Module. "
            f"Got {type(model).__name__} instead."
        )
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with track_flops(model) as count, torch.enable_grad():
            model(*args, **kwargs)
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)
    return count
