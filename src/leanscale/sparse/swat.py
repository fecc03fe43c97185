"""SWAT: sparse weight activation training (Raihan & Aamodt, NeurIPS 2020, arXiv 2001.01969).

A SWAT layer computes, for every training step (``x`` the input, ``W`` the weight, ``y`` the
output, ``g = dL/dy``):

* forward:  ``y = x * topk(W)``             (only the largest-magnitude weights are used)
* backward: ``dL/dx = g * topk(W)``         (the same sparse weights)
            ``dL/dW = g^T * topk(x)``       (DENSE in W: pruned weights keep learning and can
                                             grow back; only the activation is sparse)

where ``topk(t)`` zeroes all but the ``K = (1 - sparsity) * numel`` entries of largest
magnitude, and ``*`` is the layer's operation (matrix product or convolution). The input ``x``
is needed only for ``dL/dW``, so SWAT keeps just ``topk(x)`` for backward, **stored compactly**:
its non-zero values plus a 1-bit-per-element mask (:func:`pack_topk`). At 80% activation
sparsity a float32 activation costs ``0.2 * 4 + 1/8 = 0.925`` bytes per element instead of 4
(-77%); storing int64 indices instead would cost ``0.2 * 12 = 2.4`` (-40%).

The top-K thresholds (one magnitude per layer for the weights, one for the activations) are
recomputed every ``topk_period`` training steps and reused in between, as in the paper's code
(Sec. 4.3: the top-K order of the weights changes slowly). Reused activation thresholds make the
activation sparsity approximate between refreshes; the measured densities are kept on the layer.

Converted: ``nn.Linear`` (:class:`SWATLinear`), ``nn.Conv2d`` (:class:`SWATConv2d`), Hugging Face
GPT-2's ``Conv1D`` (:class:`SWATConv1D`, the ``(in, out)`` weight layout kept) and the fused
projections of ``nn.MultiheadAttention`` (:class:`SWATMultiheadAttention`: sparse weights only --
the attention saves its dense inputs itself, so there is no compact activation).

What stays dense: biases, normalisation layers, the first layer by default (cheap in a CNN, and
the raw input is not a learned representation), the output head by default (small and sensitive),
and every layer in evaluation mode except that the forward still uses the top-K weights (the
model *is* sparse). :func:`~leanscale.sparse.report.swat_conversion_report` lists what was
converted and why the rest was not.

Use :func:`apply_swat` (the functional form; :class:`SWAT` only wraps it)::

    model = apply_swat(model, sparsity=0.8, distribution="erk")   # SWAT-ERK, 80% sparse
    ... train as usual (DDP works: convert first, then wrap) ...
    pruned = export_pruned(model)                                  # plain nn layers, zeros in W
"""

from __future__ import annotations

import inspect
import math
import threading
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from leanscale.core.errors import InvalidParameterError
from leanscale.core.flops import mha_flops, register_flop_rule
from leanscale.core.surgery import replace_module_classes
from leanscale.core.validation import Interval, Options, check_param, unknown_name_error

__all__ = [
    "SUPPORTED_LAYERS",
    "SWAT",
    "CompactReLU",
    "SWATConv1D",
    "SWATConv2d",
    "SWATLinear",
    "SWATMultiheadAttention",
    "apply_swat",
    "erk_densities",
    "export_pruned",
    "mha_flops",
    "pack_bits",
    "pack_topk",
    "set_swat_sparsity",
    "swat_layers",
    "swat_summary",
    "topk_threshold",
    "unpack_bits",
    "unpack_topk",
]

DISTRIBUTIONS = ("uniform", "erk")

# 1 << 0 ... 1 << 7: the bit of each of 8 consecutive mask elements inside one byte.
_SHIFTS = torch.arange(8, dtype=torch.uint8)


# ----------------------------------------------------------------------------- top-K primitives


# Activation thresholds of tensors larger than this are estimated from a strided sample of this
# many entries: kthvalue over a (128, 8, 28, 28) activation takes 13 ms on our CPU, over the sample
# 1.5 ms, and the realised density stays within ~1% of the target (it is measured and recorded).
ACTIVATION_SAMPLE = 65536


def topk_threshold(t: torch.Tensor, density: float, max_sample: int | None = None) -> torch.Tensor:
    """Magnitude of the K-th largest ``|t|``, ``K = max(1, round(density * t.numel()))``.

    ``|t| >= threshold`` keeps the top-K entries (more only on exact ties). Returns a 0-d tensor
    on ``t``'s device; 0 when ``density >= 1`` (keep everything). ``kthvalue`` is O(n), no sort.
    With ``max_sample``, a tensor with more entries is subsampled with a stride first (an
    estimate: the kept fraction is close to ``density``, not exact).

    Example:
        >>> topk_threshold(torch.tensor([0.1, -3.0, 2.0, 0.5]), 0.5)
        tensor(2.)
    """
    if not isinstance(t, torch.Tensor):
        raise InvalidParameterError(f"The 't' parameter of topk_threshold must be a tensor. Got {type(t).__name__} instead.")
    check_param("density", density, [Interval(float, 0, None)], owner="topk_threshold")
    flat = t.detach().abs().reshape(-1)
    if max_sample is not None and flat.numel() > max_sample:
        flat = flat[:: flat.numel() // max_sample]
    n = flat.numel()
    k = max(1, min(n, round(density * n)))
    if k >= n:
        return flat.new_zeros(())
    return torch.kthvalue(flat, n - k + 1).values  # the (n-k+1)-th smallest = the k-th largest


def _keep(t: torch.Tensor, threshold: torch.Tensor, density: float | None = None) -> torch.Tensor:
    """Boolean mask of the kept entries: at or above the threshold, and non-zero (a zero
    contributes nothing, so it is never worth storing).

    With ``density``, exact ties at the threshold that would keep more than 10% above the
    target count ``K = round(density * numel)`` are broken: the mask becomes the exact top-K
    (``torch.topk``). Standardised images are the case: every background pixel has the same
    magnitude, and a threshold landing on it would keep them all.
    """
    a = t.abs()
    mask = (a >= threshold) & (a > 0)
    if density is not None and threshold > 0:
        k = round(density * t.numel())
        if int(mask.sum()) > 1.1 * k + 8 and int((a == threshold).sum()) > 0.1 * k:
            flat = torch.zeros(t.numel(), dtype=torch.bool, device=t.device)
            flat[a.reshape(-1).topk(k, sorted=False).indices] = True
            mask = flat.view_as(t) & (a > 0)
    return mask


def pack_topk(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` where ``mask`` holds, compactly: ``(values, bits)``.

    ``values`` are the kept entries in row-major order, shape ``(nnz,)``; ``bits`` is the mask
    with 8 elements per byte, shape ``(ceil(numel / 8),)``, dtype uint8. Together they take
    ``4 * nnz + numel / 8`` bytes for float32 instead of ``4 * numel``.
    """
    return torch.masked_select(x, mask), pack_bits(mask)  # (nnz,), (ceil(numel / 8),)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as bits, 8 per byte: shape ``(ceil(numel / 8),)``, dtype uint8."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = flat.view(-1, 8).to(torch.uint8)  # (numel / 8, 8) of 0/1
    return (bits << _SHIFTS.to(bits.device)).sum(dim=1, dtype=torch.uint8)  # (numel / 8,)


def unpack_bits(bits: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the boolean tensor of ``shape``."""
    n = math.prod(shape)
    return ((bits.unsqueeze(1) >> _SHIFTS.to(bits.device)) & 1).reshape(-1)[:n].view(shape).bool()


def unpack_topk(values: torch.Tensor, bits: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_topk`: the dense tensor of ``shape`` with zeros where dropped.

    Example:
        >>> x = torch.tensor([[0.0, 2.0, -1.0], [4.0, 0.5, 0.0]])
        >>> values, bits = pack_topk(x, x.abs() >= 1)
        >>> unpack_topk(values, bits, x.shape)
        tensor([[ 0.,  2., -1.],
                [ 4.,  0.,  0.]])
    """
    mask = unpack_bits(bits, shape)
    out = values.new_zeros(shape)
    out.masked_scatter_(mask, values)  # row-major order, as masked_select wrote them
    return out


def _channel_norms(t: torch.Tensor, dim: int) -> torch.Tensor:
    """L2 norm of each slice of ``t`` along ``dim`` (the channel): shape ``(t.shape[dim],)``."""
    return t.detach().transpose(0, dim).reshape(t.shape[dim], -1).norm(dim=1)


# ----------------------------------------------------------------------------- autograd function


@dataclass(frozen=True)
class _Op:
    """The layer's operation: ``kind`` "linear" or "conv2d", with the convolution's arguments."""

    kind: str
    stride: tuple[int, ...] = (1, 1)
    padding: tuple[int, ...] = (0, 0)
    dilation: tuple[int, ...] = (1, 1)
    groups: int = 1

    def __call__(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "linear":
            return F.linear(x, w, b)
        if self.kind == "conv1d":  # Hugging Face Conv1D: w is (in, out); computed as transformers does
            x2 = x.reshape(-1, x.shape[-1])  # (N, in)
            y = torch.addmm(b, x2, w) if b is not None else x2 @ w  # (N, out)
            return y.view(*x.shape[:-1], w.shape[1])
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)


class _SWATFunction(torch.autograd.Function):
    """Forward with ``W * w_mask``; save ``topk(x)`` compactly; dense weight gradient.

    For backward it saves the weight Parameter itself (no copy: it is resident anyway) and the
    weight mask as bits, so the sparse weights cost ``numel / 8`` bytes until backward. The
    activation is packed with the threshold ``a_threshold`` (unstructured) or reduced to the kept
    channels ``a_channels`` (structured); exactly one of the two is given.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, w_mask, a_threshold, a_channels, op: _Op, channel_dim: int, stats: dict,
                a_density: float | None = None):
        out = op(x, weight * w_mask, bias)  # the top-K weights only
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.op, ctx.channel_dim, ctx.has_bias = op, channel_dim, bias is not None
        ctx.x_shape, ctx.w_shape = x.shape, weight.shape
        ctx.structured = a_channels is not None
        w_saved = (weight, pack_bits(w_mask)) if need_x else (None, None)
        if need_w:  # the weight gradient needs topk(x): store it compactly
            if ctx.structured:
                x_kept = x.index_select(channel_dim, a_channels)  # (..., k, ...): the kept channels
                ctx.save_for_backward(*w_saved, x_kept, a_channels)
                stats["activation_density"] = a_channels.numel() / x.shape[channel_dim]
            else:
                values, bits = pack_topk(x, _keep(x, a_threshold, a_density))
                ctx.save_for_backward(*w_saved, values, bits)
                stats["activation_density"] = values.numel() / max(1, x.numel())
        else:
            ctx.save_for_backward(*w_saved, None, None)
            stats["activation_density"] = None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        weight, w_bits, a, b = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        w_s = weight * unpack_bits(w_bits, ctx.w_shape) if need_x else None
        x_s = None
        if need_w:
            if ctx.structured:
                x_s = a.new_zeros(ctx.x_shape)
                x_s.index_copy_(ctx.channel_dim, b, a)
            else:
                x_s = unpack_topk(a, b, ctx.x_shape)
        grad_x = grad_w = grad_b = None
        op = ctx.op
        if op.kind == "linear":
            out_features = grad_out.shape[-1]
            if need_x:
                grad_x = grad_out @ w_s  # (..., out) @ (out, in) -> (..., in)
            g2 = grad_out.reshape(-1, out_features)  # (N, out)
            if need_w:
                grad_w = g2.t() @ x_s.reshape(-1, x_s.shape[-1])  # (out, N) @ (N, in) -> (out, in)
            if need_b:
                grad_b = g2.sum(0)
        elif op.kind == "conv1d":  # the weight is (in, out)
            out_features = grad_out.shape[-1]
            if need_x:
                grad_x = grad_out @ w_s.t()  # (..., out) @ (out, in) -> (..., in)
            g2 = grad_out.reshape(-1, out_features)  # (N, out)
            if need_w:
                grad_w = x_s.reshape(-1, x_s.shape[-1]).t() @ g2  # (in, N) @ (N, out) -> (in, out)
            if need_b:
                grad_b = g2.sum(0)
        elif need_w:
            # One call: the input gradient through the sparse weights, the weight gradient from
            # the sparse activation, the bias gradient from grad_out. Without an input gradient the
            # weight only lends its shape (a zero-stride view, no memory).
            w_arg = w_s if w_s is not None else grad_out.new_zeros(()).expand(ctx.w_shape)
            grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad_out, x_s, w_arg, [ctx.w_shape[0]] if ctx.has_bias else None,
                list(op.stride), list(op.padding), list(op.dilation), False, [0, 0], op.groups,
                [need_x, True, need_b],
            )
        else:
            if need_x:
                grad_x = torch.nn.grad.conv2d_input(ctx.x_shape, w_s, grad_out, op.stride, op.padding,
                                                    op.dilation, op.groups)
            if need_b:
                grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None


class _CompactReLUFunction(torch.autograd.Function):
    """ReLU that keeps 1 bit per element for backward instead of its output (32x less)."""

    @staticmethod
    def forward(ctx, x):
        out = x.clamp_min(0)
        ctx.shape = x.shape
        ctx.save_for_backward(pack_bits(out > 0))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (bits,) = ctx.saved_tensors
        return grad_out * unpack_bits(bits, ctx.shape)  # the same mask as ReLU's (gradient 0 at 0)


class CompactReLU(nn.Module):
    """``nn.ReLU`` whose backward keeps a bit mask, not the output: exactly the same values and
    gradients. Why SWAT needs it: ``nn.ReLU`` saves its output for backward, and that output is
    usually the next layer's input -- the very tensor SWAT stores compactly. As long as the ReLU
    holds it densely, SWAT's compact copy saves nothing (it even adds its own bytes).
    ``inplace`` is accepted for compatibility and ignored (the output is a new tensor)."""

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _CompactReLUFunction.apply(x)
        return F.relu(x)


class _CompactReLUInplaceFunction(torch.autograd.Function):
    """In-place ReLU (``x.relu_()``, ``F.relu(x, inplace=True)``) keeping 1 bit per element."""

    @staticmethod
    def forward(ctx, x):
        x.clamp_min_(0)
        ctx.mark_dirty(x)
        ctx.shape = x.shape
        ctx.save_for_backward(pack_bits(x > 0))
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (bits,) = ctx.saved_tensors
        return grad_out * unpack_bits(bits, ctx.shape)


# The ReLU calls a model's forward can make: out of place, and in place (F.relu(x, inplace=True)
# dispatches to torch.relu_ or arrives as F.relu with inplace=True).
_RELU_FUNCS = (F.relu, torch.relu, torch.Tensor.relu)
_RELU_INPLACE_FUNCS = (torch.relu_, torch.Tensor.relu_, F.relu_)


def _compact_relu_call(func, args, kwargs):
    """``func(*args, **kwargs)`` with a compact backward when it is a ReLU on a tensor that needs a
    gradient; ``NotImplemented`` otherwise (the caller runs ``func`` itself)."""
    inplace_func = func in _RELU_INPLACE_FUNCS
    if not inplace_func and func not in _RELU_FUNCS:
        return NotImplemented
    x = args[0] if args else kwargs.get("input")
    if type(x) is not torch.Tensor or not x.requires_grad or not x.is_floating_point() or not torch.is_grad_enabled():
        return NotImplemented
    if _inside_checkpoint():
        return NotImplemented
    inplace = inplace_func or bool(kwargs.get("inplace", args[1] if len(args) > 1 else False))
    return _CompactReLUInplaceFunction.apply(x) if inplace else _CompactReLUFunction.apply(x)


def _inside_checkpoint() -> bool:
    """True inside a non-reentrant ``torch.utils.checkpoint`` region. Nothing is kept for backward
    there (it is recomputed, outside the model's forward, with a plain ReLU), and checkpoint
    refuses a recomputation that saves other tensors than the first pass: so no compact ReLU."""
    try:
        top = torch._C._autograd._top_saved_tensors_default_hooks(True)
    except (AttributeError, RuntimeError):  # a private API: without it, assume no checkpoint
        return False
    return bool(top) and "_checkpoint_hook" in getattr(top[0], "__qualname__", "")


class _FunctionalReLUMode(torch.overrides.TorchFunctionMode):
    """While active, every ReLU called as a function (``F.relu``, ``torch.relu``, ``x.relu()``,
    ``x.relu_()``, ``F.relu(x, inplace=True)``) keeps a bit mask for backward instead of its
    output: what :class:`CompactReLU` does for ``nn.ReLU`` modules, for the calls inside a forward."""

    def __init__(self):
        super().__init__()
        self.hits = 0  # ReLU calls made compact

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = _compact_relu_call(func, args, kwargs)
        if out is NotImplemented:
            return func(*args, **kwargs)
        self.hits += 1
        return out


class _FunctionalReLUHook:
    """Forward pre-hook and hook of the root model: :class:`_FunctionalReLUMode` is active during
    the model's forward when gradients are on. A module-level class (not a closure) so that the
    model stays deep-copyable and picklable; the stack of entered modes is per thread
    (``nn.DataParallel`` runs replicas sharing the hook in threads). :func:`export_pruned`
    removes it.

    The mode costs a Python call per torch operation (~20% of a tiny MLP's SWAT step, ~1% of a
    CNN's). A forward with gradients that made no functional ReLU call (a model built from
    ``nn.ReLU`` modules, already :class:`CompactReLU`) switches it off for the next
    ``REPROBE - 1`` such forwards; then it probes again."""

    REPROBE = 100

    def __init__(self):
        self._local = threading.local()
        self.skip = 0  # forwards with gradients to run without the mode

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()

    def _stack(self) -> list:
        if not hasattr(self._local, "modes"):
            self._local.modes = []
        return self._local.modes

    def pre(self, module, args):
        mode = None
        if torch.is_grad_enabled():
            if self.skip > 0:
                self.skip -= 1
            else:
                mode = _FunctionalReLUMode()
                mode.__enter__()
        self._stack().append(mode)

    def post(self, module, args, output):
        stack = self._stack()
        mode = stack.pop() if stack else None
        if mode is not None:
            mode.__exit__(None, None, None)
            if mode.hits == 0:
                self.skip = self.REPROBE - 1


def _install_functional_relu(model: nn.Module) -> bool:
    """Make the functional ReLU calls of ``model``'s forward compact; False if already done."""
    if any(isinstance(getattr(h, "__self__", None), _FunctionalReLUHook) for h in model._forward_pre_hooks.values()):
        return False
    hook = _FunctionalReLUHook()
    model.register_forward_pre_hook(hook.pre)
    model.register_forward_hook(hook.post, always_call=True)
    return True


def _remove_functional_relu(model: nn.Module) -> None:
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key in [k for k, h in hooks.items() if isinstance(getattr(h, "__self__", None), _FunctionalReLUHook)]:
            del hooks[key]
            model._forward_hooks_always_called.pop(key, None)


# ----------------------------------------------------------------------------- layers


def _no_fused_fast_path(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook of every SWAT layer; does nothing. Its presence matters: PyTorch's fused
    ``nn.TransformerEncoderLayer`` fast path (evaluation without gradients) reads ``linear1``,
    ``linear2`` and ``self_attn``'s raw weights instead of calling the layers, and is skipped when
    a submodule has hooks. Without it a converted encoder layer would run the dense weights."""
    return None


_LAYER_CONSTRAINTS = {
    "sparsity": [Interval(float, 0, 1, closed="left")],
    "activation_sparsity": [Interval(float, 0, 1, closed="left"), None],
    "topk_period": [Interval(int, 1, None)],
    "structured": [bool],
    "warmup_steps": [Interval(int, 0, None)],
}


class _SWATMixin:
    """The state and the forward shared by :class:`SWATLinear` and :class:`SWATConv2d`.

    Attributes (besides the dense layer's):
        sparsity: Target weight sparsity of this layer (after warm-up).
        activation_sparsity: Target sparsity of the activation stored for backward.
        topk_period: Recompute the thresholds every this many training steps.
        structured: Keep whole channels: output channels (filters / rows) of the weight by L2
            norm, input channels (feature columns) of the activation by L2 norm over the batch.
        warmup_steps: Ramp both sparsities linearly from 0 over this many training steps.
        swat_step: Training forward calls so far (a persistent buffer: checkpoints resume the
            warm-up; a dense checkpoint loads with ``strict=False``).
        last_stats: Measured densities of the last training forward (``weight_density``,
            ``activation_density``): the cost ledger's FLOP rule reads them.
    """

    _channel_dim: int  # the input's channel dimension: -1 (linear), 1 (conv)
    _weight_out_dim: int = 0  # the weight's output-channel dimension: 0, or 1 for GPT-2's (in, out) Conv1D

    def _init_swat(self, sparsity, activation_sparsity, topk_period, structured, warmup_steps, owner):
        check_param("sparsity", sparsity, _LAYER_CONSTRAINTS["sparsity"], owner=owner)
        check_param("activation_sparsity", activation_sparsity, _LAYER_CONSTRAINTS["activation_sparsity"], owner=owner)
        check_param("topk_period", topk_period, _LAYER_CONSTRAINTS["topk_period"], owner=owner)
        check_param("structured", structured, _LAYER_CONSTRAINTS["structured"], owner=owner)
        check_param("warmup_steps", warmup_steps, _LAYER_CONSTRAINTS["warmup_steps"], owner=owner)
        self.sparsity = float(sparsity)
        self.activation_sparsity = float(sparsity if activation_sparsity is None else activation_sparsity)
        self.topk_period = topk_period
        self.structured = structured
        self.warmup_steps = warmup_steps
        self.register_buffer("swat_step", torch.zeros((), dtype=torch.long, device=self.weight.device))
        # A forward hook keeps fused kernels that read the raw weights away: nn.TransformerEncoderLayer's
        # fast path (evaluation without gradients) is skipped for a layer with hooks in it.
        self.register_forward_pre_hook(_no_fused_fast_path)
        self._w_threshold: torch.Tensor | None = None  # recomputed after a load: not persistent
        self._a_threshold: torch.Tensor | None = None
        self._thresholds_for: tuple[float, float] | None = None  # the sparsities they were computed at
        self.last_stats: dict[str, float | None] = {"weight_density": None, "activation_density": None}

    # --- sparsities and masks

    def current_sparsity(self) -> tuple[float, float]:
        """``(weight, activation)`` sparsity at the current step (after the warm-up ramp)."""
        ramp = 1.0 if self.warmup_steps == 0 else min(1.0, (int(self.swat_step) + 1) / self.warmup_steps)
        return self.sparsity * ramp, self.activation_sparsity * ramp

    def _weight_score(self) -> torch.Tensor:
        # Unstructured: every weight's magnitude; structured: each output channel's L2 norm.
        return _channel_norms(self.weight, self._weight_out_dim) if self.structured else self.weight.detach()

    def _weight_mask_from(self, threshold: torch.Tensor) -> torch.Tensor:
        if threshold.item() == 0 and not self.structured:
            return torch.ones_like(self.weight, dtype=torch.bool)
        if self.structured:
            keep = _channel_norms(self.weight, self._weight_out_dim) >= threshold  # (out,)
            shape = [1] * self.weight.dim()
            shape[self._weight_out_dim] = -1
            return keep.view(shape).expand_as(self.weight)
        return self.weight.detach().abs() >= threshold

    def weight_mask(self) -> torch.Tensor:
        """The exact top-K mask of the current weights at the current sparsity (bool, W's shape)."""
        w_sparsity = self.current_sparsity()[0]
        return self._weight_mask_from(topk_threshold(self._weight_score(), 1.0 - w_sparsity))

    def _refresh(self, x: torch.Tensor, sparsities: tuple[float, float]) -> None:
        w_sparsity, a_sparsity = sparsities
        self._w_threshold = topk_threshold(self._weight_score(), 1.0 - w_sparsity)
        if self.structured:
            self._a_threshold = topk_threshold(_channel_norms(x, self._channel_dim % x.dim()), 1.0 - a_sparsity)
        else:
            self._a_threshold = topk_threshold(x, 1.0 - a_sparsity, ACTIVATION_SAMPLE)
        self._thresholds_for = sparsities

    # --- forward

    def _swat_forward(self, x: torch.Tensor, op: _Op) -> torch.Tensor:
        training = self.training and torch.is_grad_enabled()
        sparsities = self.current_sparsity()
        if not training:
            if sparsities[0] == 0:
                return op(x, self.weight, self.bias)
            return op(x, self.weight * self.weight_mask(), self.bias)
        if sparsities == (0.0, 0.0):  # exactly the dense layer (also during a warm-up's first step)
            self.swat_step += 1
            self.last_stats = {"weight_density": 1.0, "activation_density": 1.0}
            return op(x, self.weight, self.bias)
        due = int(self.swat_step) % self.topk_period == 0
        if due or self._w_threshold is None or self._thresholds_for != sparsities:
            self._refresh(x, sparsities)
        w_mask = self._weight_mask_from(self._w_threshold)
        a_channels = None
        if self.structured:
            cdim = self._channel_dim % x.dim()
            a_channels = torch.nonzero(_channel_norms(x, cdim) >= self._a_threshold).flatten()
            if a_channels.numel() == 0:  # a stale threshold above every channel: keep the largest
                a_channels = _channel_norms(x, cdim).argmax().view(1)
        stats: dict[str, Any] = {}
        out = _SWATFunction.apply(x, self.weight, self.bias, w_mask, self._a_threshold, a_channels, op,
                                  self._channel_dim % x.dim(), stats, 1.0 - sparsities[1])
        self.swat_step += 1
        self.last_stats = {"weight_density": float(w_mask.float().mean()),
                           "activation_density": stats.get("activation_density")}
        return out

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, sparsity={self.sparsity}, activation_sparsity={self.activation_sparsity}, "
                f"topk_period={self.topk_period}, structured={self.structured}, warmup_steps={self.warmup_steps}")


class SWATLinear(_SWATMixin, nn.Linear):
    """``nn.Linear`` trained with SWAT (see the module docstring). Input ``(..., in_features)``.

    Build it with :meth:`from_dense` to reuse a trained layer's Parameters (an optimizer built
    before keeps working), or like ``nn.Linear`` plus the SWAT arguments.
    """

    _channel_dim = -1

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, sparsity: float = 0.8,
                 activation_sparsity: float | None = None, topk_period: int = 1, structured: bool = False,
                 warmup_steps: int = 0, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_swat(sparsity, activation_sparsity, topk_period, structured, warmup_steps, "SWATLinear")

    @classmethod
    def from_dense(cls, module: nn.Linear, **swat_kwargs: Any) -> SWATLinear:
        """A SWAT layer sharing ``module``'s weight and bias Parameters."""
        _check_supported(module, "module", "SWATLinear.from_dense", (nn.Linear,))
        new = cls(module.in_features, module.out_features, module.bias is not None, device="meta", **swat_kwargs)
        new.weight, new.bias = module.weight, module.bias
        new.swat_step = torch.zeros((), dtype=torch.long, device=module.weight.device)
        new.train(module.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.in_features \
                or not x.is_floating_point():
            _bad_input(x, f"(..., in_features={self.in_features})", "SWATLinear")
        return self._swat_forward(x, _Op("linear"))


class SWATConv2d(_SWATMixin, nn.Conv2d):
    """``nn.Conv2d`` trained with SWAT (see the module docstring). Input ``(B, C_in, H, W)``.

    Padding mode ``"zeros"`` only; ``padding="same"`` only where it is symmetric.
    """

    _channel_dim = 1

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, *, sparsity: float = 0.8, activation_sparsity: float | None = None,
                 topk_period: int = 1, structured: bool = False, warmup_steps: int = 0, device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         device=device, dtype=dtype)
        _check_conv(self, "SWATConv2d")
        self._init_swat(sparsity, activation_sparsity, topk_period, structured, warmup_steps, "SWATConv2d")
        self._op = _Op("conv2d", tuple(self.stride), _int_padding(self), tuple(self.dilation), self.groups)

    @classmethod
    def from_dense(cls, module: nn.Conv2d, **swat_kwargs: Any) -> SWATConv2d:
        """A SWAT layer sharing ``module``'s weight and bias Parameters."""
        _check_supported(module, "module", "SWATConv2d.from_dense", (nn.Conv2d,))
        _check_conv(module, "SWATConv2d.from_dense")
        new = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                  module.dilation, module.groups, module.bias is not None, device="meta", **swat_kwargs)
        new.weight, new.bias = module.weight, module.bias
        new.swat_step = torch.zeros((), dtype=torch.long, device=module.weight.device)
        new.train(module.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels \
                or not x.is_floating_point():
            _bad_input(x, f"(B, in_channels={self.in_channels}, H, W)", "SWATConv2d")
        return self._swat_forward(x, self._op)


def _is_hf_conv1d(module: Any) -> bool:
    """``module`` is exactly Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2's
    projections), recognised without importing transformers."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__ == "transformers.pytorch_utils"


class SWATConv1D(_SWATMixin, nn.Module):
    """Hugging Face GPT-2's ``Conv1D`` trained with SWAT: ``y = x @ topk(W) + b`` with the
    weight stored as ``(in, out) = (nx, nf)``, exactly like ``transformers.pytorch_utils.Conv1D``.

    The layout is kept on purpose: the ``state_dict`` keys and shapes are Conv1D's (plus the
    ``swat_step`` counter), so ``save_pretrained`` / ``from_pretrained``, ``load_state_dict`` of a
    GPT-2 checkpoint and :func:`~leanscale.sparse.export.save_pruned` / ``load_pruned`` after
    :func:`export_pruned` see the tensors they expect, and :meth:`from_dense` reuses the
    Conv1D's Parameters (an optimizer built before keeps working; a transposed ``nn.Linear`` would
    need new Parameters and state-dict hooks). Output channels are the weight's dimension 1 (the
    ``structured`` variant keeps whole columns). Input ``(..., nx)``.
    """

    _channel_dim = -1
    _weight_out_dim = 1

    def __init__(self, nf: int, nx: int, bias: bool = True, *, sparsity: float = 0.8,
                 activation_sparsity: float | None = None, topk_period: int = 1, structured: bool = False,
                 warmup_steps: int = 0, device=None, dtype=None):
        super().__init__()
        for name, value in (("nf", nf), ("nx", nx)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidParameterError(
                    f"The '{name}' parameter of SWATConv1D must be a positive int. Got {value!r} instead.")
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.empty(nx, nf, device=device, dtype=dtype))  # (in, out), as Conv1D
        self.bias = nn.Parameter(torch.zeros(nf, device=device, dtype=dtype)) if bias else None
        if self.weight.device.type != "meta":
            nn.init.normal_(self.weight, std=0.02)  # Conv1D's initialisation
        self._init_swat(sparsity, activation_sparsity, topk_period, structured, warmup_steps, "SWATConv1D")

    @property
    def in_features(self) -> int:
        return self.nx

    @property
    def out_features(self) -> int:
        return self.nf

    @classmethod
    def from_dense(cls, module: nn.Module, **swat_kwargs: Any) -> SWATConv1D:
        """A SWAT layer sharing the Conv1D ``module``'s weight and bias Parameters."""
        if not _is_hf_conv1d(module):
            raise InvalidParameterError(
                f"The 'module' parameter of SWATConv1D.from_dense must be a transformers.pytorch_utils.Conv1D. "
                f"Got {type(module).__module__}.{type(module).__name__} instead.")
        nx, nf = module.weight.shape
        new = cls(nf, nx, module.bias is not None, device="meta", **swat_kwargs)
        new.weight, new.bias = module.weight, module.bias
        new.swat_step = torch.zeros((), dtype=torch.long, device=module.weight.device)
        new.train(module.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.nx or not x.is_floating_point():
            _bad_input(x, f"(..., nx={self.nx})", "SWATConv1D")
        return self._swat_forward(x, _Op("conv1d"))

    def extra_repr(self) -> str:
        return (f"nf={self.nf}, nx={self.nx}, sparsity={self.sparsity}, "
                f"activation_sparsity={self.activation_sparsity}, topk_period={self.topk_period}, "
                f"structured={self.structured}, warmup_steps={self.warmup_steps}")


class _MaskedWeight(torch.autograd.Function):
    """``w * mask`` forward; the gradient passes to ``w`` unmasked (SWAT's weight gradient is dense
    in W: pruned weights keep learning and can grow back)."""

    @staticmethod
    def forward(ctx, w, mask):
        return w * mask

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class SWATMultiheadAttention(_SWATMixin, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with SWAT's sparse weights -- **weights only**.

    The forward uses the top-K weights of the fused ``in_proj_weight`` (the query, key and value
    blocks, ``(E, E)`` each, get their own top-K, as three separate projections would) and of
    ``out_proj.weight``; the input gradient goes through the same sparse weights, and the weight
    gradient is dense in W (pruned weights keep learning). What does **not** apply is SWAT's
    sparse activation: ``F.multi_head_attention_forward`` computes the projections itself and
    saves its dense inputs (query / key / value, and the attention output feeding ``out_proj``)
    for their weight gradients, so the weight gradient here is ``g^T x`` with the dense ``x``,
    i.e. SWAT with ``activation_sparsity=0``, and nothing is stored compactly.
    ``activation_sparsity`` is kept for the settings but unused; ``last_stats`` records
    ``activation_density`` ``None``. The masked weights are ordinary tensors inside the attention,
    so for the input gradient it holds a copy of them (``4 * embed_dim**2`` values) that the dense
    attention, whose weights are Parameters, does not.

    The ``state_dict`` is the module's own (``in_proj_weight``, ``in_proj_bias``, ``out_proj.*``,
    plus ``swat_step``). Only the fused form converts: separate ``q/k/v_proj_weight`` (``kdim`` or
    ``vdim`` different from ``embed_dim``) stay dense. The forward is always PyTorch's reference
    path (``F.multi_head_attention_forward``); the fused inference kernel reads the raw weights.
    """

    _channel_dim = -1

    @property
    def weight(self) -> torch.Tensor:
        """The fused in-projection ``(3 E, E)``: the tensor ``apply_swat`` sizes ERK with and
        :func:`swat_summary` describes."""
        return self.in_proj_weight

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, batch_first: bool = False, *,
                 sparsity: float = 0.8, activation_sparsity: float | None = None, topk_period: int = 1,
                 structured: bool = False, warmup_steps: int = 0, device=None, dtype=None):
        nn.MultiheadAttention.__init__(self, embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn,
                                       batch_first=batch_first, device=device, dtype=dtype)
        self._init_swat(sparsity, activation_sparsity, topk_period, structured, warmup_steps,
                        "SWATMultiheadAttention")

    @classmethod
    def from_dense(cls, module: nn.MultiheadAttention, **swat_kwargs: Any) -> SWATMultiheadAttention:
        """A SWAT attention sharing ``module``'s Parameters and its ``out_proj`` module."""
        _check_supported(module, "module", "SWATMultiheadAttention.from_dense", (nn.MultiheadAttention,))
        new = cls(module.embed_dim, module.num_heads, module.dropout, module.in_proj_bias is not None,
                  module.bias_k is not None, module.add_zero_attn, module.batch_first, device="meta", **swat_kwargs)
        new.in_proj_weight, new.in_proj_bias = module.in_proj_weight, module.in_proj_bias
        new.bias_k, new.bias_v = module.bias_k, module.bias_v
        new.out_proj = module.out_proj
        new.swat_step = torch.zeros((), dtype=torch.long, device=module.in_proj_weight.device)
        new.train(module.training)
        return new

    # --- masks: q, k, v blocks of in_proj_weight and out_proj.weight, each its own top-K

    def _blocks(self) -> list[torch.Tensor]:
        e = self.embed_dim
        w = self.in_proj_weight.detach()
        return [w[:e], w[e:2 * e], w[2 * e:], self.out_proj.weight.detach()]  # (E, E) each

    def _block_scores(self) -> list[torch.Tensor]:
        return [_channel_norms(b, 0) if self.structured else b for b in self._blocks()]

    def _thresholds(self, w_sparsity: float) -> torch.Tensor:
        return torch.stack([topk_threshold(s, 1.0 - w_sparsity) for s in self._block_scores()])  # (4,)

    def _masks_from(self, thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(in_proj mask (3E, E), out_proj mask (E, E))``, bool."""
        masks = []
        for block, score, t in zip(self._blocks(), self._block_scores(), thresholds):
            keep = score.abs() >= t  # every entry when t is 0
            masks.append(keep.view(-1, 1).expand_as(block) if self.structured else keep)
        return torch.cat(masks[:3]), masks[3]

    def _weight_mask_from(self, threshold: torch.Tensor) -> torch.Tensor:
        return self._masks_from(threshold)[0]

    def weight_mask(self) -> torch.Tensor:
        """The exact top-K mask of ``in_proj_weight`` (q, k, v blocks each) at the current sparsity."""
        return self.weight_masks()[0]

    def weight_masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact top-K masks of ``in_proj_weight`` and ``out_proj.weight`` now."""
        return self._masks_from(self._thresholds(self.current_sparsity()[0]))

    def _refresh(self, x: torch.Tensor, sparsities: tuple[float, float]) -> None:
        self._w_threshold = self._thresholds(sparsities[0])
        self._a_threshold = None  # no activation is stored compactly
        self._thresholds_for = sparsities

    # --- forward: nn.MultiheadAttention's reference path with the masked weights

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor) or t.dim() not in (2, 3) or t.shape[-1] != self.embed_dim \
                    or not t.is_floating_point() or t.is_nested:
                _bad_input(t, f"(L, E={self.embed_dim}), (L, B, E) or, batch_first, (B, L, E) [{name}]",
                           "SWATMultiheadAttention")
        training = self.training and torch.is_grad_enabled()
        sparsities = self.current_sparsity()
        if sparsities[0] == 0:
            w_in, w_out = self.in_proj_weight, self.out_proj.weight
            density = 1.0
        else:
            if training:
                due = int(self.swat_step) % self.topk_period == 0
                if due or self._w_threshold is None or self._thresholds_for != sparsities:
                    self._refresh(query, sparsities)
                in_mask, out_mask = self._masks_from(self._w_threshold)
            else:
                in_mask, out_mask = self.weight_masks()
            w_in = _MaskedWeight.apply(self.in_proj_weight, in_mask)
            w_out = _MaskedWeight.apply(self.out_proj.weight, out_mask)
            density = float((in_mask.sum() + out_mask.sum()) / (in_mask.numel() + out_mask.numel()))
        if training:
            self.swat_step += 1
            self.last_stats = {"weight_density": density, "activation_density": None}
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        batched = query.dim() == 3
        if self.batch_first and batched:  # keep the "is" relations: one fused projection for self-attention
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (t.transpose(1, 0) for t in (query, key))
                    value = key
            else:
                query, key, value = (t.transpose(1, 0) for t in (query, key, value))
        out, weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, w_in, self.in_proj_bias, self.bias_k, self.bias_v,
            self.add_zero_attn, self.dropout, w_out, self.out_proj.bias, training=self.training,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=average_attn_weights, is_causal=is_causal)
        if self.batch_first and batched:
            out = out.transpose(1, 0)
        return out, weights

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}, "
                f"sparsity={self.sparsity}, topk_period={self.topk_period}, structured={self.structured}, "
                f"warmup_steps={self.warmup_steps}, weights only (activations dense)")


def _bad_input(x: Any, shape: str, owner: str) -> None:
    got = (f"a {x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__)
    raise InvalidParameterError(f"The 'x' parameter of {owner} must be a floating tensor of shape {shape}. Got {got}.")


SUPPORTED_LAYERS: dict[type, type] = {nn.Linear: SWATLinear, nn.Conv2d: SWATConv2d,
                                       nn.MultiheadAttention: SWATMultiheadAttention}
"""Dense class -> its SWAT class. Exactly these classes are converted (not their subclasses), and
also Hugging Face's ``transformers.pytorch_utils.Conv1D`` -> :class:`SWATConv1D` (recognised by
name, transformers is not imported). ``nn.MultiheadAttention`` only in its fused form
(``kdim == vdim == embed_dim``), and weights only (see :class:`SWATMultiheadAttention`)."""


def _swat_class(module: Any) -> type | None:
    """The SWAT class that converts ``module``, or None."""
    cls = SUPPORTED_LAYERS.get(type(module))
    if cls is SWATMultiheadAttention and not module._qkv_same_embed_dim:
        return None
    if cls is None and _is_hf_conv1d(module):
        return SWATConv1D
    return cls


def _supported_names() -> str:
    return ("torch.nn.Linear, torch.nn.Conv2d, torch.nn.MultiheadAttention (fused in_proj_weight) and Hugging Face "
            "transformers.pytorch_utils.Conv1D")


def _check_supported(module: Any, name: str, owner: str, classes: tuple[type, ...] | None = None) -> None:
    ok = _swat_class(module) is not None if classes is None else type(module) in classes
    if ok and isinstance(module, nn.MultiheadAttention) and not module._qkv_same_embed_dim:
        ok = False
    if not ok:
        shown = _supported_names() if classes is None else ", ".join("torch.nn." + c.__name__ for c in classes)
        extra = (" with separate q/k/v projection weights (kdim or vdim differs from embed_dim); only the fused "
                 "in_proj_weight converts" if isinstance(module, nn.MultiheadAttention) else "")
        raise InvalidParameterError(
            f"The '{name}' parameter of {owner} must be a layer SWAT can convert "
            f"({shown}; supported by SWAT: {_supported_names()}). "
            f"Got {type(module).__module__}.{type(module).__name__}{extra} instead."
        )


def _check_conv(module: nn.Conv2d, owner: str) -> None:
    if module.padding_mode != "zeros":
        raise InvalidParameterError(
            f"The 'padding_mode' of the convolution given to {owner} must be 'zeros' (SWAT's backward is "
            f"a zero-padded convolution). Got {module.padding_mode!r} instead."
        )
    if isinstance(module.padding, str) and module.padding == "same":
        total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        if any(t % 2 for t in total):
            raise InvalidParameterError(
                f"The 'padding' of the convolution given to {owner} must be symmetric: padding='same' with "
                f"kernel_size={module.kernel_size} and dilation={module.dilation} pads unevenly. Pass explicit "
                f"integer padding instead."
            )


def _int_padding(module: nn.Conv2d) -> tuple[int, int]:
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return (0, 0)
        return tuple(d * (k - 1) // 2 for d, k in zip(module.dilation, module.kernel_size))  # "same"
    return tuple(module.padding)


# ----------------------------------------------------------------------------- the cost ledger


def _swat_flops(module: _SWATMixin, inputs: tuple, output: torch.Tensor) -> tuple[float, float]:
    """SWAT's training FLOPs as the paper counts them (Sec. 5.1): the forward and the input
    gradient scale with the weight density, the weight gradient with the activation density.
    Without a training forward (evaluation, no_grad) the forward still uses the sparse weights."""
    x = inputs[0]
    if isinstance(module, nn.Conv2d):
        macs_per_output = (module.in_channels // module.groups) * math.prod(module.kernel_size)
    else:
        macs_per_output = module.in_features
    dense = 2 * macs_per_output * output.numel()
    training = module.training and torch.is_grad_enabled()
    if training:
        w_density = module.last_stats["weight_density"]
    else:
        w_density = 1.0 if module.current_sparsity()[0] == 0 else float(module.weight_mask().float().mean())
    fwd = dense * w_density
    bwd = 0.0
    if torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.requires_grad:
        bwd += dense * w_density  # dL/dx through the sparse weights
    if torch.is_grad_enabled() and module.weight.requires_grad:
        a_density = module.last_stats["activation_density"] if training else 1.0
        bwd += dense * (1.0 if a_density is None else a_density)  # dL/dW from the sparse activation
    return fwd, bwd


register_flop_rule(SWATLinear, _swat_flops)
register_flop_rule(SWATConv2d, _swat_flops)
register_flop_rule(SWATConv1D, _swat_flops)


def _swat_mha_flops(module: SWATMultiheadAttention, inputs: tuple, output: Any) -> tuple[float, float]:
    training = module.training and torch.is_grad_enabled()
    if training and module.last_stats["weight_density"] is not None:
        density = module.last_stats["weight_density"]
    elif module.current_sparsity()[0] == 0:
        density = 1.0
    else:
        a, b = module.weight_masks()
        density = float((a.sum() + b.sum()) / (a.numel() + b.numel()))
    return mha_flops(module, inputs, output, density)


register_flop_rule(SWATMultiheadAttention, _swat_mha_flops)


# ----------------------------------------------------------------------------- ERK


def erk_densities(shapes: dict[str, tuple[int, ...]], density: float) -> dict[str, float]:
    """Per-layer densities of the Erdős–Rényi-Kernel distribution (Evci et al. 2020, RigL).

    Layer ``l`` gets density ``eps * sum(shape_l) / prod(shape_l)`` (fan-in + fan-out + kernel
    dims over the parameter count: small layers stay denser), with ``eps`` chosen so that the
    layers together keep ``density`` of their weights. A layer whose density would exceed 1 is
    made dense and ``eps`` solved again for the others (RigL's loop).

    Example:
        >>> d = erk_densities({"big": (512, 512), "small": (10, 512)}, 0.2)
        >>> round(d["big"], 3), round(d["small"], 3)
        (0.184, 1.0)
    """
    check_param("density", density, [Interval(float, 0, 1, closed="right")], owner="erk_densities")
    if not isinstance(shapes, dict) or not shapes:
        raise InvalidParameterError(
            f"The 'shapes' parameter of erk_densities must be a non-empty dict of layer name -> weight shape. "
            f"Got {shapes!r:.100} instead."
        )
    for name, shape in shapes.items():
        if not isinstance(shape, (tuple, list, torch.Size)) or not shape or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape):
            raise InvalidParameterError(
                f"The 'shapes' parameter of erk_densities must map each layer to a shape of positive ints. "
                f"Got {name!r}: {shape!r:.60}."
            )
    numel = {name: math.prod(s) for name, s in shapes.items()}
    raw = {name: sum(s) / numel[name] for name, s in shapes.items()}
    dense: set[str] = set()
    while True:
        # kept weights must total density * N: the dense layers keep all of theirs, the others eps * raw * n
        rhs = density * sum(numel.values()) - sum(numel[n] for n in dense)
        divisor = sum(raw[n] * numel[n] for n in shapes if n not in dense)
        if divisor == 0:
            return {n: 1.0 for n in shapes}
        eps = rhs / divisor
        worst = max((n for n in shapes if n not in dense), key=lambda n: raw[n])
        if eps * raw[worst] <= 1.0:
            return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}
        dense.add(worst)


# ----------------------------------------------------------------------------- surgery


_APPLY_CONSTRAINTS = {
    "sparsity": [Interval(float, 0, 1, closed="left")],
    "distribution": [Options(set(DISTRIBUTIONS))],
    "activation_sparsity": [Interval(float, 0, 1, closed="left"), None],
    "dense_first_layer": [bool],
    "dense_last_layer": [bool],
    "topk_period": [Interval(int, 1, None)],
    "structured": [bool],
    "warmup_steps": [Interval(int, 0, None)],
    "compact_relu": [bool],
}


def _convertible(model: nn.Module, layers: Iterable[str] | None, owner: str) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs to convert: every supported layer, or exactly the named ones."""
    named = dict(model.named_modules())
    if layers is None:
        return [(n, m) for n, m in named.items() if _swat_class(m) is not None and n != ""]
    if isinstance(layers, str):
        layers = [layers]
    elif not hasattr(layers, "__iter__"):
        raise InvalidParameterError(
            f"The 'layers' parameter of {owner} must be None or a list of submodule names (str). "
            f"Got {type(layers).__name__} instead."
        )
    layers = list(layers)
    if not layers or not all(isinstance(n, str) for n in layers):
        raise InvalidParameterError(
            f"The 'layers' parameter of {owner} must be None or a non-empty list of submodule names (str). "
            f"Got {layers!r:.100} instead."
        )
    out = []
    for name in layers:
        if name not in named or name == "":
            raise InvalidParameterError(
                f"The 'layers' parameter of {owner} must name submodules of the model. Got {name!r}, which is "
                f"not one (e.g. {', '.join(repr(n) for n in list(named)[1:4])})."
            )
        _check_supported(named[name], f"layers ({name!r})", owner)
        out.append((name, named[name]))
    return out


def apply_swat(
    model: nn.Module,
    sparsity: float = 0.8,
    *,
    distribution: str = "uniform",
    activation_sparsity: float | None = None,
    dense_first_layer: bool = True,
    dense_last_layer: bool = True,
    topk_period: int = 1,
    structured: bool = False,
    warmup_steps: int = 0,
    compact_relu: bool = True,
    layers: Iterable[str] | None = None,
    optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
) -> nn.Module:
    """Convert ``model``'s ``nn.Linear``, ``nn.Conv2d``, Hugging Face ``Conv1D`` (GPT-2) and
    ``nn.MultiheadAttention`` (fused form; weights only, see :class:`SWATMultiheadAttention`)
    layers to SWAT layers, in place.

    Args:
        model: The model (not wrapped in DDP: convert first, then wrap).
        sparsity: Fraction of the converted layers' weights zeroed in the forward pass, in [0, 1).
        distribution: ``"uniform"`` (SWAT-U: every layer at ``sparsity``) or ``"erk"`` (SWAT-ERK:
            :func:`erk_densities` over the converted layers, same total weight count as uniform).
        activation_sparsity: Sparsity of the activations stored for backward (default:
            ``sparsity``). Uniform over the layers with either distribution (our choice: ERK is
            defined for parameter tensors).
        dense_first_layer: Leave the first convertible layer (registration order) dense.
        dense_last_layer: Leave the output head dense: the layer ``model.get_output_embeddings()``
            returns when the model has one (Hugging Face's ``lm_head``), else the last convertible
            layer in registration order (a classifier). Heads are small and sensitive to pruning.
        topk_period: Recompute the top-K thresholds every this many training steps (1: every
            step, exact; the paper found hundreds fine for the weights).
        structured: Keep whole channels (output channels of W, input channels of the activation)
            instead of single entries; the kept work is dense and smaller.
        warmup_steps: Ramp the sparsity linearly from 0 to its target over this many steps.
        compact_relu: Also replace every ``nn.ReLU`` by :class:`CompactReLU` (same values and
            gradients, 1 bit per element kept for backward), so that the dense ReLU output that
            feeds a SWAT layer is not held until backward next to SWAT's compact copy; and make
            the ReLUs called as functions in the forward (``F.relu``, ``torch.relu``,
            ``x.relu()``, ``x.relu_()``) compact the same way (a torch function mode active
            during ``model``'s forward while gradients are on).
        layers: Qualified names of the modules to convert (default: every supported one).
        optimizers: Not changed (the SWAT layers reuse the Parameters); accepted for symmetry.

    Returns:
        ``model`` itself. What was converted and what was left dense, with the reason, is in
        :func:`swat_conversion_report` (``leanscale.sparse.report``); a ``UserWarning`` names
        the layers with weights that SWAT cannot convert (e.g. ``nn.MultiheadAttention`` with
        separate q/k/v weights, a subclass of ``nn.Linear``).

    Raises:
        InvalidParameterError: a bad argument, a named layer SWAT cannot convert (the supported
            classes are listed), or nothing to convert.
    """
    owner = "apply_swat"
    params = {"sparsity": sparsity, "distribution": distribution, "activation_sparsity": activation_sparsity,
              "dense_first_layer": dense_first_layer, "dense_last_layer": dense_last_layer,
              "topk_period": topk_period, "structured": structured, "warmup_steps": warmup_steps,
              "compact_relu": compact_relu}
    for name, value in params.items():
        check_param(name, value, _APPLY_CONSTRAINTS[name], owner=owner)
    if not isinstance(model, nn.Module):
        raise InvalidParameterError(
            f"The 'model' parameter of {owner} must be an instance of torch.nn.Module. Got {type(model).__name__} instead."
        )
    targets = _convertible(model, layers, owner)
    kept: dict[str, str] = {}  # name -> why it stays dense by design
    if layers is None and targets:
        head = _head_name(model, targets) if dense_last_layer else None
        if head is not None:
            kept[head] = "output head kept dense (dense_last_layer=True)"
        if dense_first_layer:
            kept[targets[0][0]] = ("first layer kept dense (dense_first_layer=True)" if targets[0][0] != head else
                                   "first layer and output head kept dense (dense_first_layer=True, "
                                   "dense_last_layer=True)")
        targets = [(n, m) for n, m in targets if n not in kept]
    if not targets:
        already = sum(isinstance(m, _SWATMixin) for m in model.modules())
        flags = [f for f, on in (("the first, kept dense (dense_first_layer=True)",
                                  dense_first_layer and any("first" in w for w in kept.values())),
                                 ("the output head, kept dense (dense_last_layer=True)",
                                  dense_last_layer and any("head" in w for w in kept.values()))) if on]
        why = (f"its {already} SWAT layer(s) are converted already" if already else
               f"it has no {_supported_names()} layer" + (" besides " + " and ".join(flags)
                                                           if flags and layers is None and kept else ""))
        parents = {f"{p}.{c}" if p else c: pm for p, pm in model.named_modules() for c, _ in pm.named_children()}
        cannot = [f"{n!r} ({type(m).__name__})" for n, m in model.named_modules()
                  if n and not isinstance(m, _SWATMixin)
                  and (_skip_reason(n, m, parents.get(n)) or "").startswith("unsupported")]
        if cannot and not already:
            why += (f"; {len(cannot)} layer(s) with weights are of types SWAT cannot convert: "
                    f"{', '.join(cannot[:4])}{', ...' if len(cannot) > 4 else ''}")
        raise InvalidParameterError(f"The 'model' parameter of {owner} has nothing to convert: {why}.")
    if distribution == "erk":
        densities = erk_densities({n: tuple(m.weight.shape) for n, m in targets}, 1.0 - sparsity)
        per_layer = {n: max(0.0, 1.0 - d) for n, d in densities.items()}
    else:
        per_layer = {n: float(sparsity) for n, _ in targets}
    wanted = {id(m): n for n, m in targets}
    kw = {"activation_sparsity": float(sparsity if activation_sparsity is None else activation_sparsity),
          "topk_period": topk_period, "structured": structured, "warmup_steps": warmup_steps}

    def policy(module: nn.Module, index: int) -> nn.Module | None:
        name = wanted.get(id(module))
        if name is None:
            return None
        return _swat_class(module).from_dense(module, sparsity=per_layer[name], **kw)

    policies: dict[type, Any] = {type(m): policy for _, m in targets}
    if compact_relu:
        policies[nn.ReLU] = lambda module, index: CompactReLU(module.inplace)
    replace_module_classes(model, policies, optimizers=optimizers)
    if compact_relu:
        _install_functional_relu(model)
    _no_nested_tensor_fast_path(model)
    _record_conversion(model, kept, params, layers is not None)
    return model


def _head_name(model: nn.Module, candidates: list[tuple[str, nn.Module]]) -> str | None:
    """The output head among the convertible ``candidates``: ``get_output_embeddings()`` (Hugging
    Face) when the model has one, else the last candidate in registration order. None when the
    model names a head SWAT would not convert anyway."""
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            head = get()
        except Exception:  # noqa: BLE001 -- a model's own method; fall back to registration order
            head = None
        if isinstance(head, nn.Module):
            return next((n for n, m in candidates if m is head), None)
    return candidates[-1][0]


# Attribute of the model holding what apply_swat did (read by swat_conversion_report).
_RECORD = "_swat_conversion"


def _skip_reason(name: str, module: nn.Module, parent: nn.Module | None) -> str | None:
    """Why SWAT cannot convert ``module`` (one that holds a weight matrix), or None if it has none."""
    if _swat_class(module) is not None or isinstance(module, _SWATMixin):
        return None
    if isinstance(module, nn.MultiheadAttention):
        return ("unsupported: nn.MultiheadAttention with separate q_proj_weight/k_proj_weight/v_proj_weight (kdim or "
                "vdim differs from embed_dim); SWAT converts only the fused in_proj_weight form")
    if isinstance(parent, SWATMultiheadAttention) and isinstance(module, nn.Linear):
        return None  # sparsified by its SWATMultiheadAttention, which reads out_proj.weight
    if isinstance(parent, nn.MultiheadAttention) and isinstance(module, nn.Linear):
        return ("part of its nn.MultiheadAttention, which reads out_proj.weight directly (the Linear's forward is "
                "never called): sparsified together with the attention when the attention is converted")
    for dense in SUPPORTED_LAYERS:
        if isinstance(module, dense) and type(module) is not dense:
            return (f"unsupported type: a subclass of torch.nn.{dense.__name__} ({type(module).__name__}); SWAT "
                    f"converts exact classes only, as a subclass may compute something else")
    if isinstance(module, nn.Embedding):
        return "not a SWAT target: an embedding is a table lookup, there is no matrix product to sparsify"
    if any(p.dim() >= 2 for p in module.parameters(recurse=False)):
        return f"unsupported type {type(module).__module__}.{type(module).__name__} (SWAT converts {_supported_names()})"
    return None


def _record_conversion(model: nn.Module, kept: dict[str, str], params: dict[str, Any], named: bool) -> None:
    """Store on ``model`` which layers are SWAT and why the others with weights stay dense; warn
    about the ones SWAT cannot convert."""
    previous = getattr(model, _RECORD, None) or {}
    reasons = dict(previous.get("reasons", {}))
    modules = dict(model.named_modules())
    parents = {}
    for pname, parent in modules.items():
        for cname, child in parent.named_children():
            parents[f"{pname}.{cname}" if pname else cname] = parent
    skipped, unsupported = {}, []
    for name, module in modules.items():
        if name == "" or isinstance(module, _SWATMixin):
            continue
        if name in kept:
            why = kept[name]
        elif _swat_class(module) is not None:
            why = reasons.get(name, "not named in 'layers'" if named else "kept dense")
        else:
            why = _skip_reason(name, module, parents.get(name))
            if why is None:
                continue
            if why.startswith("unsupported") and name not in reasons:
                unsupported.append((name, type(module).__name__))
        skipped[name] = why
    setattr(model, _RECORD, {"reasons": skipped, "settings": {**previous.get("settings", {}), **params},
                             "functional_relu": params["compact_relu"] or previous.get("functional_relu", False)})
    if unsupported:
        shown = ", ".join(f"{n!r} ({t})" for n, t in unsupported[:5])
        warnings.warn(
            f"apply_swat left {len(unsupported)} layer(s) with weights dense because SWAT cannot convert them "
            f"({shown}{', ...' if len(unsupported) > 5 else ''}). leanscale.sparse.swat_conversion_report(model) "
            f"lists every converted and skipped layer with the reason.", UserWarning, stacklevel=3)


def swat_layers(model: nn.Module) -> list[tuple[str, _SWATMixin]]:
    """``(name, layer)`` of every SWAT layer of ``model`` (DDP-wrapped or not)."""
    if not isinstance(model, nn.Module):
        raise InvalidParameterError(
            f"The 'model' parameter of leanscale.sparse must be an instance of torch.nn.Module. "
            f"Got {type(model).__name__} instead."
        )
    root = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return [(n, m) for n, m in root.named_modules() if isinstance(m, _SWATMixin)]


def set_swat_sparsity(model: nn.Module, sparsity: float, activation_sparsity: float | None = None) -> nn.Module:
    """Change the target sparsity of every SWAT layer (uniform), e.g. for your own schedule."""
    check_param("sparsity", sparsity, _APPLY_CONSTRAINTS["sparsity"], owner="set_swat_sparsity")
    check_param("activation_sparsity", activation_sparsity, _APPLY_CONSTRAINTS["activation_sparsity"],
                owner="set_swat_sparsity")
    found = swat_layers(model)
    if not found:
        raise InvalidParameterError("The 'model' parameter of set_swat_sparsity has no SWAT layer: call apply_swat first.")
    for _, m in found:
        m.sparsity = float(sparsity)
        m.activation_sparsity = float(sparsity if activation_sparsity is None else activation_sparsity)
    return model


def swat_summary(model: nn.Module) -> list[dict[str, Any]]:
    """One row per SWAT layer: name, kind, weight shape, target sparsities, the exact weight
    sparsity now, and the activation density measured at the last training step."""
    rows = []
    for name, m in swat_layers(model):
        rows.append({
            "layer": name,
            "kind": type(m).__name__,
            "weight_shape": tuple(m.weight.shape),
            "sparsity": m.sparsity,
            "activation_sparsity": m.activation_sparsity,
            "weight_sparsity_now": 1.0 - float(m.weight_mask().float().mean()),
            "last_activation_density": m.last_stats.get("activation_density"),
            "structured": m.structured,
        })
    return rows


# Attribute of an nn.TransformerEncoder whose nested-tensor fast path apply_swat switched off:
# its previous use_nested_tensor, restored by export_pruned.
_NESTED = "_swat_use_nested_tensor"


def _no_nested_tensor_fast_path(model: nn.Module) -> None:
    """Switch off the nested-tensor fast path of every ``nn.TransformerEncoder`` holding SWAT
    layers. That path (evaluation without gradients, with a padding mask) hands the layers nested
    tensors, which only PyTorch's fused kernels -- reading the raw, dense weights -- accept. The
    outputs at non-padded positions are the same; padded positions then hold computed values
    instead of zeros, as with ``enable_nested_tensor=False``."""
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder) and getattr(m, "use_nested_tensor", False) \
                and any(isinstance(c, _SWATMixin) for c in m.modules()):
            setattr(m, _NESTED, m.use_nested_tensor)
            m.use_nested_tensor = False


def _restore_nested_tensor_fast_path(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder) and hasattr(m, _NESTED):
            m.use_nested_tensor = getattr(m, _NESTED)
            delattr(m, _NESTED)


def export_pruned(model: nn.Module) -> nn.Module:
    """Hard-prune a SWAT-trained model for inference, in place: every SWAT layer becomes the
    plain layer it came from (``nn.Linear``, ``nn.Conv2d``, Hugging Face ``Conv1D`` with its
    ``(in, out)`` weight, ``nn.MultiheadAttention`` with its fused ``in_proj_weight`` and
    ``out_proj``), with the weights outside its top-K set to zero: the same ``state_dict`` keys and
    shapes as the original model (without ``swat_step``), so ``load_state_dict``,
    ``save_pretrained`` / ``from_pretrained`` and :func:`~leanscale.sparse.export.save_pruned`
    work as for the dense model. The result needs no leanscale to load; see
    :mod:`leanscale.sparse.export` for sparse kernels and compact files."""

    def param(t: torch.Tensor | None, mask: torch.Tensor | None = None) -> nn.Parameter | None:
        if t is None:
            return None
        return nn.Parameter(t.detach() * mask if mask is not None else t.detach().clone(), requires_grad=t.requires_grad)

    def policy(module: nn.Module, index: int) -> nn.Module:
        if isinstance(module, SWATMultiheadAttention):
            in_mask, out_mask = module.weight_masks()
            new = nn.MultiheadAttention(module.embed_dim, module.num_heads, module.dropout,
                                        module.in_proj_bias is not None, module.bias_k is not None,
                                        module.add_zero_attn, batch_first=module.batch_first, device="meta")
            new.in_proj_weight, new.in_proj_bias = param(module.in_proj_weight, in_mask), param(module.in_proj_bias)
            new.bias_k, new.bias_v = param(module.bias_k), param(module.bias_v)
            old = module.out_proj
            new.out_proj = type(old)(old.in_features, old.out_features, old.bias is not None, device="meta")
            new.out_proj.weight, new.out_proj.bias = param(old.weight, out_mask), param(old.bias)
            new.out_proj.train(old.training)
        else:
            mask = module.weight_mask()
            if isinstance(module, SWATConv1D):
                # the model came with transformers (checked below)
                from transformers.pytorch_utils import Conv1D

                new = Conv1D(module.nf, 1)  # a (1, nf) weight allocated, replaced below
            elif isinstance(module, SWATLinear):
                new = nn.Linear(module.in_features, module.out_features, module.bias is not None, device="meta")
            else:
                new = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                                module.padding, module.dilation, module.groups, module.bias is not None,
                                device="meta")
            if isinstance(module, SWATConv1D) and module.bias is None:
                new.bias = None
            new.weight, new.bias = param(module.weight, mask), param(module.bias)
            if isinstance(module, SWATConv1D):
                new.nx = module.nx
        new.train(module.training)
        return new

    if not swat_layers(model):
        raise InvalidParameterError("The 'model' parameter of export_pruned has no SWAT layer to export.")
    swat_classes = {type(m) for _, m in swat_layers(model)}
    if SWATConv1D in swat_classes:
        try:
            import transformers.pytorch_utils  # noqa: F401
        except ImportError:
            raise InvalidParameterError(
                "The 'model' parameter of export_pruned has SWATConv1D layers, which export to Hugging Face's "
                "Conv1D: install transformers (pip install 'leanscale[hf]').") from None
    replace_module_classes(model, {**{cls: policy for cls in swat_classes},
                                   CompactReLU: lambda module, index: nn.ReLU(module.inplace)})
    _remove_functional_relu(model)
    _restore_nested_tensor_fast_path(model)
    if hasattr(model, _RECORD):
        delattr(model, _RECORD)
    return model


class SWAT:
    """Class form of :func:`apply_swat` (composer style): holds the settings, ``apply(model)``."""

    def __init__(self, sparsity: float = 0.8, **kwargs: Any):
        valid = [p for p in inspect.signature(apply_swat).parameters if p not in ("model", "sparsity", "optimizers")]
        for key in kwargs:
            if key not in valid:
                raise unknown_name_error("keyword argument", key, valid, owner="SWAT")
        check_param("sparsity", sparsity, _APPLY_CONSTRAINTS["sparsity"], owner="SWAT")
        self.sparsity, self.kwargs = sparsity, kwargs

    def apply(self, model: nn.Module, optimizers=None) -> nn.Module:
        return apply_swat(model, self.sparsity, optimizers=optimizers, **self.kwargs)

    def __repr__(self) -> str:
        args = ", ".join([f"sparsity={self.sparsity}"] + [f"{k}={v!r}" for k, v in self.kwargs.items()])
        return f"SWAT({args})"
