"""Structured SWAT: SWAT's top-K rule on whole channels, computed with *smaller* dense matmuls.

Unstructured SWAT (:mod:`leanscale.sparse.swat`) zeroes single weights and activations; a dense
CPU kernel then multiplies the zeros anyway, so a SWAT step is slower than a dense one on CPU.
Here the same rule picks whole channels, and the work is done on the kept channels only
(``x`` the input, ``W`` the weight with output channels as rows, ``g = dL/dy``):

* forward:  ``y[:, O] = x * W[O]``, ``y[:, not O] = bias``   (``O``: the top-K output channels
  of ``W`` by L2 norm of their rows / filters)
* backward: ``dL/dx = g[:, O] * W[O]``                        (the same kept channels)
            ``dL/dW[:, I] = g^T * x[:, I]``, ``dL/dW[:, not I] = 0``   (``I``: the top-K input
  channels of the activation by L2 norm over the batch (and space); **every output row gets a
  gradient**, dropped ones included, so a dropped channel keeps learning and can come back, as
  pruned weights do in SWAT; the input columns outside ``I`` get none this step)
            ``dL/db = sum(g)``                                   (dense)

**Input-channel choice** (``selection``): ``"topk"`` (the default, SWAT's rule) takes the ``K``
input channels with the largest norms. The same channels then win every batch (the bright
pixels of an image, the channels with the largest BatchNorm scale), and the weight columns of
the others never get a gradient. ``"sampled"`` keeps the top ``K - R`` by norm and draws the
other ``R = round(explore * K)`` uniformly at random from the remaining channels, fresh at every
training step: each channel outside the top ``K - R`` is chosen with probability
``R / (n - K + R)`` per step, so every weight column keeps learning, at the cost of the top-K
(one ``rand`` of ``n`` keys more). ``"unbiased"`` draws the same way and multiplies the drawn
channels' weight-gradient columns by ``(n - K + R) / R`` = 1 / P(drawn): the weight gradient is
then the dense one in expectation (with more variance). The draws use torch's global random
generator (``torch.manual_seed`` makes them repeatable; under DDP seed every rank alike).
The output channels of the forward stay the top-K of the weights in every mode: drawing them at
random too was tried and fails on a BatchNorm CNN (18% on Fashion-MNIST): a dropped filter's
constant output has zero variance, BatchNorm's backward multiplies its gradient by
``1 / sqrt(eps)`` (316), and the dropped filters' weights grew to norms of ~5e4.

**Conv -> BatchNorm -> ReLU stacks: the forward is a fixed narrow net.** A dropped filter's
output is a constant, BatchNorm maps it to its shift (0 at initialisation) and the ReLU's
gradient there is 0: the dropped filters get exactly zero gradient, never return, and training
is the same computation as training the dense net cut to the filters kept at step 1 (tested).
Such a net built narrow and dense from the start is as accurate and faster (the method card's
"narrow baseline"): on these models shrink the net instead.

With ``selection="topk"`` this is exactly the math of ``apply_swat(..., structured=True)`` (a masked dense layer whose
non-kept rows are zero, and whose weight gradient uses the activation with non-kept channels
zeroed); only the computation differs: ``index_select`` the kept rows / channels, one smaller
dense ``matmul`` / ``conv2d``, ``index_add_`` back into the full-size output / weight gradient.
At sparsity ``s`` the forward and the input gradient do ``1 - s`` of the dense FLOPs and the
weight gradient ``1 - activation_sparsity``; on a CPU that is real time saved, minus the gathers
and scatters (memory traffic of the input and output, not FLOPs). Only the kept input channels
``x[:, I]`` are saved for backward.

Converted: exact ``nn.Linear`` and ``nn.Conv2d`` with ``groups=1`` (a grouped or depthwise
convolution stays dense: its channels are tied to groups). The layers are subclasses of
:class:`~leanscale.sparse.swat.SWATLinear` / :class:`~leanscale.sparse.swat.SWATConv2d`, so
:func:`~leanscale.sparse.swat.export_pruned`, :func:`~leanscale.sparse.swat.swat_summary`,
:func:`~leanscale.sparse.swat.set_swat_sparsity`, the conversion report and the cost ledger's FLOP
rule work on them unchanged; the ``state_dict`` is the SWAT layer's (the dense layer's keys plus
``swat_step``).

Use::

    model = apply_structured_swat(model, sparsity=0.5)   # first layer and head stay dense
    ... train as usual ...
    pruned = export_pruned(model)                         # plain nn layers, zero rows in W
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from leanscale.core.errors import InvalidParameterError
from leanscale.core.surgery import replace_module_classes
from leanscale.core.validation import Interval, Options, check_param
from leanscale.sparse.swat import (
    _LAYER_CONSTRAINTS,
    SWATConv2d,
    SWATLinear,
    _head_name,
    _Op,
    _record_conversion,
    _SWATMixin,
)

__all__ = ["StructuredSWATConv2d", "StructuredSWATLinear", "apply_structured_swat", "top_channels"]

SELECTIONS = ("topk", "sampled", "unbiased")
DEFAULT_EXPLORE = 0.5  # the share of K drawn at random by selection="sampled" / "unbiased"


def top_channels(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Indices of the ``K = max(1, round(density * n))`` largest ``scores``, in increasing order.

    ``scores`` is a 1-d tensor (one score per channel, e.g. an L2 norm); sorted indices keep the
    gathers and scatters in memory order. All ``n`` indices when ``K == n``.

    Example:
        >>> top_channels(torch.tensor([0.1, 3.0, 2.0, 0.5]), 0.5)
        tensor([1, 2])
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1 or scores.numel() == 0:
        got = f"shape {tuple(scores.shape)}" if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise InvalidParameterError(
            f"The 'scores' parameter of top_channels must be a non-empty 1-d tensor. Got {got} instead.")
    check_param("density", density, [Interval(float, 0, 1, closed="right")], owner="top_channels")
    n = scores.numel()
    k = max(1, min(n, round(density * n)))
    if k == n:
        return torch.arange(n, device=scores.device)
    return scores.detach().topk(k, sorted=False).indices.sort().values


def _sampled_channels(scores: torch.Tensor, density: float, explore: float, with_scale: bool = False):
    """``selection="sampled"``: the top ``K - R`` of ``scores`` plus ``R = round(explore * K)``
    channels drawn uniformly without replacement from the rest (``K`` as in :func:`top_channels`),
    in increasing order. One ``rand`` of ``n`` keys from torch's global generator: the top
    channels' keys are set above 1, the ``K`` largest keys win.

    With ``with_scale`` also returns the inverse inclusion probability of each chosen channel
    (``(k,)``: 1 for the top ones, ``(n - K + R) / R`` for the drawn ones; None when ``K == n``):
    the weights that make the weight gradient an unbiased estimate of the dense one."""
    n = scores.numel()
    k = max(1, min(n, round(density * n)))
    if k == n:
        idx = torch.arange(n, device=scores.device)
        return (idx, None) if with_scale else idx
    r = min(k, round(explore * k))
    k_top = k - r
    keys = torch.rand(n, device=scores.device)  # the random ones: uniform among the rest
    if k_top > 0:
        keys[scores.detach().topk(k_top, sorted=False).indices] = 2.0  # always kept
    idx = keys.topk(k, sorted=False).indices.sort().values
    if not with_scale:
        return idx
    drawn = keys[idx] < 2.0
    scale = torch.where(drawn, (n - k_top) / max(r, 1), 1.0).to(scores.dtype)
    return idx, scale


def _channel_scores(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Squared L2 norm of each slice of ``t`` along ``dim``: shape ``(t.shape[dim],)``, in the
    same order as the L2 norm (what the top-K rule ranks by). Along a non-leading dimension (the
    channels of an activation) a square and a sum are ~5x cheaper on CPU than
    ``torch.linalg.vector_norm``; a weight's rows (``dim=0``) are contiguous, and there the norm is
    the cheaper one."""
    t = t.detach()
    if dim == 0:
        return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1).square()
    dims = [d for d in range(t.dim()) if d != dim]
    return t.square().sum(dims)


def _put(full: torch.Tensor, dim: int, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Add ``src`` into the slices ``idx`` of ``full`` along ``dim`` (``full`` is zero or a bias
    there): ``index_add_``, which on CPU is 2-3x faster than ``index_copy_`` across the columns
    of a matrix (a (1024, 1024) weight gradient from 512 columns: 0.55 vs 1.6 ms, 1 thread;
    ``scatter_`` with a materialised index 1.1 ms), a third of the matmul it saves."""
    return full.index_add_(dim, idx, src)


def _reduced_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_idx: torch.Tensor | None,
                     op: _Op) -> tuple[torch.Tensor, torch.Tensor]:
    """``op(x, W * row_mask, bias)`` computed on the kept output channels only; also returns the
    kept weight rows ``W[out_idx]`` (the whole weight when ``out_idx`` is None: all kept)."""
    if out_idx is None:
        return op(x, weight, bias), weight
    w_k = weight.index_select(0, out_idx)  # (k_out, in) or (k_out, C_in, kh, kw)
    y_k = op(x, w_k, None)  # (..., k_out) or (B, k_out, H', W'), without the bias (added below)
    cdim = y_k.dim() - 1 if op.kind == "linear" else 1
    shape = list(y_k.shape)
    shape[cdim] = weight.shape[0]
    if bias is None:
        out = y_k.new_zeros(shape)
    else:
        view = [1] * len(shape)
        view[cdim] = -1
        out = bias.view(view).expand(shape).contiguous()  # every channel starts at its bias
    _put(out, cdim, out_idx, y_k)  # kept channels: + x * W[out_idx]
    return out, w_k


class _StructuredSWATFunction(torch.autograd.Function):
    """Forward and backward on the kept channels only (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, out_idx, in_idx, op: _Op, in_scale=None):
        out, w_k = _reduced_forward(x, weight, bias, out_idx, op)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        cdim = x.dim() - 1 if op.kind == "linear" else 1
        ctx.op, ctx.x_shape, ctx.w_shape = op, x.shape, weight.shape
        x_k = None
        if need_w:
            x_k = x if in_idx is None else x.index_select(cdim, in_idx)  # the kept input channels only
        ctx.save_for_backward(w_k if need_x else None, x_k, out_idx, in_idx, in_scale)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        w_k, x_k, out_idx, in_idx, in_scale = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        op = ctx.op
        grad_x = grad_w = grad_b = None
        if op.kind == "linear":
            g2 = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
            if need_x:
                g_k = g2 if out_idx is None else g2.index_select(1, out_idx)  # (N, k_out)
                grad_x = (g_k @ w_k).view(ctx.x_shape)  # (N, k_out) @ (k_out, in) -> (..., in)
            if need_w:
                gw = g2.t() @ x_k.reshape(-1, x_k.shape[-1])  # (out, N) @ (N, k_in) -> (out, k_in)
                if in_scale is not None:  # "unbiased": drawn columns weighted by 1 / P(drawn)
                    gw.mul_(in_scale)
                grad_w = gw if in_idx is None else _put(gw.new_zeros(ctx.w_shape), 1, in_idx, gw)
            if need_b:
                grad_b = g2.sum(0)
            return grad_x, grad_w, grad_b, None, None, None, None
        stride, padding, dilation = list(op.stride), list(op.padding), list(op.dilation)
        if need_x:
            g_k = grad_out if out_idx is None else grad_out.index_select(1, out_idx)  # (B, k_out, H', W')
            grad_x = torch.nn.grad.conv2d_input(ctx.x_shape, w_k, g_k, op.stride, op.padding, op.dilation, 1)
        if need_w:
            w_shape = list(ctx.w_shape)
            w_shape[1] = x_k.shape[1]  # (out, k_in, kh, kw): a zero-stride view lends the shape only
            _, gw, _ = torch.ops.aten.convolution_backward(
                grad_out, x_k, grad_out.new_zeros(()).expand(w_shape), None, stride, padding, dilation, False,
                [0, 0], 1, [False, True, False])
            if in_scale is not None:
                gw.mul_(in_scale.view(1, -1, 1, 1))
            grad_w = gw if in_idx is None else _put(gw.new_zeros(ctx.w_shape), 1, in_idx, gw)
        if need_b:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None, None


_SELECTION_CONSTRAINTS = {
    "selection": [Options(SELECTIONS)],
    "explore": [Interval(float, 0, 1, closed="right"), None],
}


def _check_layer_args(owner: str, sparsity, activation_sparsity, topk_period, warmup_steps, selection="topk",
                      explore=None) -> float:
    """Check the layer arguments; returns the ``explore`` share to use (0.0 for ``"topk"``)."""
    for name, value in (("sparsity", sparsity), ("activation_sparsity", activation_sparsity),
                        ("topk_period", topk_period), ("warmup_steps", warmup_steps)):
        check_param(name, value, _LAYER_CONSTRAINTS[name], owner=owner)
    return _check_selection(owner, selection, explore)


def _check_selection(owner: str, selection, explore) -> float:
    check_param("selection", selection, _SELECTION_CONSTRAINTS["selection"], owner=owner)
    check_param("explore", explore, _SELECTION_CONSTRAINTS["explore"], owner=owner)
    if selection == "topk":
        if explore is not None:
            raise InvalidParameterError(
                f"The 'explore' parameter of {owner} must be None with selection='topk' (it is the random share "
                f"of selection='sampled'). Got {explore!r} instead.")
        return 0.0
    return DEFAULT_EXPLORE if explore is None else float(explore)


class _StructuredMixin:
    """The forward shared by :class:`StructuredSWATLinear` and :class:`StructuredSWATConv2d`.

    Kept output channels (top-K of the weights) are recomputed every ``topk_period`` training
    steps (and whenever the sparsity changes), kept input channels of the activation at every
    training step (top-K of the batch's channel norms, or the ``"sampled"`` mix of top-K and
    random channels). In evaluation the forward uses the top-K output channels of the current
    weights, computed the same reduced way.

    Attributes (besides the SWAT layer's): ``selection`` (``"topk"`` or ``"sampled"``: how the
    input channels of the weight gradient are chosen), ``explore`` (the random share of ``K``
    for ``"sampled"``, 0.0 for ``"topk"``),
    ``last_channels`` (``(out_idx, in_idx)`` of the last training forward; None where all
    channels were kept).
    """

    def _init_structured(self, selection: str = "topk", explore: float = 0.0) -> None:
        self.selection = selection
        self.explore = explore
        self._out_idx: torch.Tensor | None = None
        self._out_idx_for: float | None = None  # the weight sparsity it was computed at
        self.last_channels: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)

    def _choose(self, scores: torch.Tensor, density: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The training-time input-channel choice: top-K, or top-K mixed with random channels;
        and the weight-gradient scale of each chosen channel ("unbiased"; else None)."""
        if self.selection == "topk":
            return top_channels(scores, density), None
        idx, scale = _sampled_channels(scores, density, self.explore, with_scale=True)
        return idx, scale if self.selection == "unbiased" else None

    def _load_from_state_dict(self, *args, **kwargs):
        self._out_idx = None  # new weights: pick the kept channels again at the next step
        super()._load_from_state_dict(*args, **kwargs)

    def kept_output_channels(self) -> torch.Tensor:
        """Indices of the top-K output channels of the current weights at the current sparsity."""
        return top_channels(_channel_scores(self.weight, 0), 1.0 - self.current_sparsity()[0])

    def weight_mask(self) -> torch.Tensor:
        """The kept output channels as a mask of W's shape (bool): whole rows / filters."""
        keep = torch.zeros(self.weight.shape[0], dtype=torch.bool, device=self.weight.device)
        keep[self.kept_output_channels()] = True
        return keep.view(-1, *[1] * (self.weight.dim() - 1)).expand_as(self.weight)

    def _swat_forward(self, x: torch.Tensor, op: _Op) -> torch.Tensor:
        training = self.training and torch.is_grad_enabled()
        w_sparsity, a_sparsity = self.current_sparsity()
        if not training:
            if w_sparsity == 0:
                return op(x, self.weight, self.bias)
            return _reduced_forward(x, self.weight, self.bias, self.kept_output_channels(), op)[0]
        if w_sparsity == 0 and a_sparsity == 0:
            self.swat_step += 1
            self.last_stats = {"weight_density": 1.0, "activation_density": 1.0}
            return op(x, self.weight, self.bias)
        due = int(self.swat_step) % self.topk_period == 0
        if due or self._out_idx is None or self._out_idx_for != w_sparsity:
            self._out_idx = None if w_sparsity == 0 else self.kept_output_channels()
            self._out_idx_for = w_sparsity
        out_idx = self._out_idx
        cdim = x.dim() - 1 if op.kind == "linear" else 1
        in_idx, in_scale = self._choose(_channel_scores(x, cdim), 1.0 - a_sparsity) if a_sparsity > 0 else (None, None)
        if in_idx is not None and in_idx.numel() == x.shape[cdim]:
            in_idx = in_scale = None
        if out_idx is not None and out_idx.numel() == self.weight.shape[0]:
            out_idx = None
        out = _StructuredSWATFunction.apply(x, self.weight, self.bias, out_idx, in_idx, op, in_scale)
        self.last_channels = (out_idx, in_idx)
        self.swat_step += 1
        n_out, n_in = self.weight.shape[0], x.shape[cdim]
        self.last_stats = {"weight_density": 1.0 if out_idx is None else out_idx.numel() / n_out,
                           "activation_density": 1.0 if in_idx is None else in_idx.numel() / n_in}
        return out

    def extra_repr(self) -> str:
        extra = f", explore={self.explore}" if self.selection != "topk" else ""
        return f"{super().extra_repr()}, selection={self.selection!r}{extra}"


class StructuredSWATLinear(_StructuredMixin, SWATLinear):
    """``nn.Linear`` trained with structured SWAT (see the module docstring): the top-K rows of
    the weight by L2 norm in the forward, the top-K input features (L2 norm over the batch) for
    the weight gradient, each computed with a smaller dense matmul. Input ``(..., in_features)``.

    ``from_dense(linear, sparsity=..., ...)`` converts one layer and reuses its Parameters.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, sparsity: float = 0.5,
                 activation_sparsity: float | None = None, topk_period: int = 1, warmup_steps: int = 0,
                 selection: str = "topk", explore: float | None = None, device=None, dtype=None):
        explore = _check_layer_args("StructuredSWATLinear", sparsity, activation_sparsity, topk_period,
                                    warmup_steps, selection, explore)
        super().__init__(in_features, out_features, bias, sparsity=sparsity, activation_sparsity=activation_sparsity,
                         topk_period=topk_period, structured=True, warmup_steps=warmup_steps, device=device,
                         dtype=dtype)
        self._init_structured(selection, explore)


class StructuredSWATConv2d(_StructuredMixin, SWATConv2d):
    """``nn.Conv2d`` (``groups=1``) trained with structured SWAT (see the module docstring): the
    top-K filters by L2 norm in the forward, the top-K input channels (L2 norm over batch and
    space) for the weight gradient, each computed with a smaller dense convolution.
    Input ``(B, C_in, H, W)``. ``from_dense(conv, sparsity=..., ...)`` reuses its Parameters.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, *, sparsity: float = 0.5, activation_sparsity: float | None = None,
                 topk_period: int = 1, warmup_steps: int = 0, selection: str = "topk", explore: float | None = None,
                 device=None, dtype=None):
        if groups != 1:
            raise InvalidParameterError(
                f"The 'groups' parameter of StructuredSWATConv2d must be 1 (a grouped or depthwise convolution ties "
                f"its channels to groups; leave it dense). Got {groups!r} instead.")
        explore = _check_layer_args("StructuredSWATConv2d", sparsity, activation_sparsity, topk_period,
                                    warmup_steps, selection, explore)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         sparsity=sparsity, activation_sparsity=activation_sparsity, topk_period=topk_period,
                         structured=True, warmup_steps=warmup_steps, device=device, dtype=dtype)
        self._init_structured(selection, explore)


_STRUCTURED = {nn.Linear: StructuredSWATLinear, nn.Conv2d: StructuredSWATConv2d}

_APPLY_CONSTRAINTS = {
    "sparsity": _LAYER_CONSTRAINTS["sparsity"],
    "activation_sparsity": _LAYER_CONSTRAINTS["activation_sparsity"],
    "topk_period": _LAYER_CONSTRAINTS["topk_period"],
    "warmup_steps": _LAYER_CONSTRAINTS["warmup_steps"],
    "dense_first_layer": [bool],
    "dense_last_layer": [bool],
    **_SELECTION_CONSTRAINTS,
}


def _why_not(module: nn.Module) -> str | None:
    """Why structured SWAT leaves this Linear / Conv2d dense, or None if it converts it."""
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return f"grouped convolution (groups={module.groups}): structured SWAT converts groups=1 only"
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r}: SWAT's backward is a zero-padded convolution"
    if isinstance(module, nn.Conv2d) and module.padding == "same" and \
            any((d * (k - 1)) % 2 for d, k in zip(module.dilation, module.kernel_size)):
        return "asymmetric padding='same'"
    return None


def apply_structured_swat(
    model: nn.Module,
    sparsity: float = 0.5,
    *,
    activation_sparsity: float | None = None,
    topk_period: int = 1,
    warmup_steps: int = 0,
    dense_first_layer: bool = True,
    dense_last_layer: bool = True,
    layers: Iterable[str] | None = None,
    optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
    selection: str = "topk",
    explore: float | None = None,
) -> nn.Module:
    """Convert ``model``'s ``nn.Linear`` and ``nn.Conv2d`` (``groups=1``) layers to structured
    SWAT layers, in place: whole channels chosen by SWAT's top-K rule, computed with smaller
    dense matmuls so that fewer FLOPs are less time on a CPU.

    Args:
        model: The model (not wrapped in DDP: convert first, then wrap).
        sparsity: Fraction of each converted layer's output channels (weight rows / filters)
            dropped from the forward and the input gradient, in [0, 1).
        activation_sparsity: Fraction of each converted layer's input channels left out of the
            weight gradient (default: ``sparsity``), in [0, 1).
        topk_period: Recompute the kept output channels every this many training steps (the
            input channels are picked at every step).
        warmup_steps: Ramp both sparsities linearly from 0 over this many training steps.
        dense_first_layer: Leave the first ``nn.Linear`` / ``nn.Conv2d`` (registration order) dense.
            Layers converted by an earlier call count: converting the first layer with its own
            settings first (``layers=[name]``) and then the rest with a second call works. That
            is the recipe for MLPs on raw pixels: ``activation_sparsity=0`` for the first layer
            (top-K by norm picks the constant background pixels of standardised images, and
            its weight gradient then misses the informative ones), full sparsity elsewhere. On
            a conv-BatchNorm-ReLU CNN (first conv dense) the same for the first converted conv:
            deeper in a stack the dropped filters' channels are exactly 0, and top-K of those
            inputs at the same sparsity loses nothing.
        dense_last_layer: Leave the output head dense (``get_output_embeddings()`` when the
            model has one, else the last convertible layer): dropping a classifier's output
            channels would drop classes.
        layers: Qualified names of the modules to convert (default: every convertible one,
            first layer and head excepted as set above).
        optimizers: Not changed (the new layers reuse the Parameters); accepted for symmetry.
        selection: How the input channels of the weight gradient are chosen: ``"topk"``
            (SWAT's rule: the ``K`` largest norms of the batch) or ``"sampled"`` (the top
            ``K - R`` by norm plus ``R = round(explore * K)`` drawn uniformly at random from the
            other channels, fresh at every step, so every weight column keeps learning; see the
            module docstring); ``"unbiased"`` also weights the drawn channels' gradient columns
            by 1 / P(drawn), so the weight gradient is the dense one in expectation. The
            forward's output channels are the top-K of the weights in every case. On
            Fashion-MNIST neither beat keeping the first layer's input whole (see the card).
        explore: The random share of ``K`` for ``selection="sampled"``, in (0, 1] (default
            0.5; 1.0 draws all ``K`` at random). Must be None with ``"topk"``.

    Returns:
        ``model`` itself. ``swat_conversion_report(model)`` lists what was converted and why the
        rest stayed dense.

    Raises:
        InvalidParameterError: a bad argument, a named layer that is not an exact ``nn.Linear`` /
            ``nn.Conv2d`` with ``groups=1``, or nothing to convert.
    """
    owner = "apply_structured_swat"
    if not isinstance(model, nn.Module):
        raise InvalidParameterError(
            f"The 'model' parameter of {owner} must be an instance of torch.nn.Module. Got {type(model).__name__} instead.")
    params = {"sparsity": sparsity, "activation_sparsity": activation_sparsity, "topk_period": topk_period,
              "warmup_steps": warmup_steps, "dense_first_layer": dense_first_layer,
              "dense_last_layer": dense_last_layer}
    for name, value in params.items():
        check_param(name, value, _APPLY_CONSTRAINTS[name], owner=owner)
    explore = _check_selection(owner, selection, explore)
    params.update(selection=selection, explore=None if selection == "topk" else explore)
    named = dict(model.named_modules())
    candidates = [(n, m) for n, m in named.items() if n and type(m) in _STRUCTURED]
    kept: dict[str, str] = {}
    if layers is not None:
        if isinstance(layers, str):
            layers = [layers]
        layers = list(layers) if hasattr(layers, "__iter__") else layers
        if not isinstance(layers, list) or not layers or not all(isinstance(n, str) for n in layers):
            raise InvalidParameterError(
                f"The 'layers' parameter of {owner} must be None or a non-empty list of submodule names (str). "
                f"Got {layers!r:.100} instead.")
        targets = []
        for name in layers:
            if name not in named or name == "":
                raise InvalidParameterError(
                    f"The 'layers' parameter of {owner} must name submodules of the model. Got {name!r}, which is "
                    f"not one (e.g. {', '.join(repr(n) for n in list(named)[1:4])}).")
            module = named[name]
            why = _why_not(module) if type(module) in _STRUCTURED else "not an exact torch.nn.Linear or torch.nn.Conv2d"
            if why is not None:
                raise InvalidParameterError(
                    f"The 'layers' parameter of {owner} must name torch.nn.Linear or torch.nn.Conv2d (groups=1) "
                    f"layers. Got {name!r} ({type(module).__name__}): {why}.")
            targets.append((name, module))
    else:
        # first layer and head among all Linear / Conv2d layers, converted ones included (a second
        # call after a first one with layers=... keeps the same first layer and head dense)
        layered = [(n, m) for n, m in named.items() if n and (type(m) in _STRUCTURED or isinstance(m, _SWATMixin))]
        if layered:
            head = _head_name(model, layered) if dense_last_layer else None
            if head is not None and type(named[head]) in _STRUCTURED:
                kept[head] = "output head kept dense (dense_last_layer=True)"
            first = layered[0][0]
            if dense_first_layer and first != head and type(named[first]) in _STRUCTURED:
                kept[first] = "first layer kept dense (dense_first_layer=True)"
        for n, m in candidates:
            why = _why_not(m)
            if why is not None and n not in kept:
                kept[n] = why
        targets = [(n, m) for n, m in candidates if n not in kept]
    if not targets:
        already = sum(isinstance(m, _SWATMixin) for m in model.modules())
        why = (f"its {already} SWAT layer(s) are converted already" if already else
               "it has no torch.nn.Linear or torch.nn.Conv2d (groups=1) layer" +
               (f" besides those kept dense ({'; '.join(f'{k}: {v}' for k, v in kept.items())})" if kept else ""))
        raise InvalidParameterError(f"The 'model' parameter of {owner} has nothing to convert: {why}.")
    wanted = {id(m) for _, m in targets}
    kw = {"sparsity": float(sparsity), "topk_period": topk_period, "warmup_steps": warmup_steps,
          "activation_sparsity": float(sparsity if activation_sparsity is None else activation_sparsity),
          "selection": selection, "explore": None if selection == "topk" else explore}

    def policy(module: nn.Module, index: int) -> nn.Module | None:
        if id(module) not in wanted:
            return None
        return _STRUCTURED[type(module)].from_dense(module, **kw)

    replace_module_classes(model, {cls: policy for cls in _STRUCTURED}, optimizers=optimizers)
    _record_conversion(model, kept, {**params, "structured": True, "structure": "channel", "compact_relu": False},
                       layers is not None)
    return model
