"""Sharpness of a minimizer (Keskar et al. 2017, Metric 2.1).

Keskar, Mudigere, Nocedal, Smelyanskiy & Tang 2017, "On Large-Batch Training for Deep Learning:
Generalization Gap and Sharp Minima", arXiv 1609.04836, Sec. 2.2.2, measure how much the loss can
rise in a small box around the weights ``x``::

    phi(eps) = 100 * (max_{y in C_eps} f(x + y) - f(x)) / (1 + f(x))
    C_eps    = {z : |z_i| <= eps * (|x_i| + 1)}

(their ``A = I``, the full space; the box is relative to each weight's magnitude, so the number
is comparable across layers and networks). Large-batch minimizers score higher than small-batch
ones -- their explanation of the generalization gap. They used ``eps`` in ``{1e-3, 5e-4}`` and
solved the inner maximization with a few iterations of L-BFGS-B (SciPy's ``fmin_l_bfgs_b``, as
the authors' repository github.com/keskarnitish/large-batch-training says; 10 iterations in the
paper).

How we solve the inner max, and why differently: **projected gradient ascent** in the box,
on the device and in the model's dtype. In box coordinates ``u = z / r`` (``r_i = eps(|x_i|+1)``,
``u`` in ``[-1, 1]^n``) each step is

* ``method="sign"`` (default): ``u <- clip(u + a * sign(grad f), -1, 1)``. The sign of the
  gradient, scaled by ``r``, is the exact maximizer of the linearized loss over the box (steepest
  ascent for the box's L-infinity geometry), so a linear loss is maximized exactly in one step
  and a convex one, whose maximum is at a corner, in ``ceil(1/a)`` steps. It is the PGD attack of
  Madry et al. 2018 (arXiv 1706.06083) applied to weights.
* ``method="normalized"``: ``u <- clip(u + a * d / max|d|, -1, 1)`` with ``d = r * grad f``:
  plain gradient ascent in box coordinates, the largest coordinate moving ``a``. Better for an
  interior maximum (sign steps oscillate around it), slower to reach corners.

``a`` is ``step_size`` (default ``2.5 / steps``, Madry's choice: enough to cross the box). We keep
the largest loss seen (all iterates are feasible), so the result is a *lower bound* of the true
maximum -- as L-BFGS-B's is, which is also a local method. Why not L-BFGS-B: SciPy's works on one
float64 NumPy vector of all weights on the host, so each of its evaluations copies the model to and
from the CPU; the sign step needs no line search, no memory of past steps and no tuning against the
gradient's scale. The numbers are the same metric (same box, same normalization) but not
bit-comparable with the paper's.

The loss ``f`` is the mean of ``loss_fn`` over a fixed set of examples (``data``, truncated to
``max_samples``), with the model in **eval mode**: BatchNorm uses its running statistics and dropout
is off, so ``f`` is a deterministic function of the weights. In train mode BatchNorm would normalize
with each batch's statistics (``f`` would depend on how the data is batched) and update its running
statistics at every forward, and dropout would make the ascent chase noise. Only parameters are
perturbed (those with ``requires_grad=True``); buffers are not weights. Afterwards the model is
exactly as before -- weights (bit for bit, same Parameter objects), buffers, ``requires_grad``
flags, ``.grad`` tensors and each module's train/eval mode -- also when an exception is raised.

Cost: ``steps`` forward+backward passes and one forward pass over the data (one more with
``random_start``); memory: about five copies of the weights (the saved original, the box radii, the
perturbation, the gradient and the step direction). Under DDP pass the wrapped ``ddp.module``: each
rank then measures its own data.

Suggested settings: ``eps=1e-3`` or ``5e-4`` (the paper), ``steps=10``, a few thousand training
examples. Compare models only at equal ``eps``, ``steps`` and data. When it misleads: sharpness is
not invariant to reparametrization (Dinh et al. 2017, arXiv 1703.04933: rescaling the layers of a
ReLU network changes it without changing the function), and with BatchNorm the weights before a
BN layer are scale-invariant, so their box measures little.

Example:
    >>> import torch
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Linear(3, 1)
    >>> x, y = torch.randn(64, 3), torch.randn(64, 1)
    >>> res = sharpness(model, torch.nn.functional.mse_loss, (x, y), eps=1e-3, steps=5)
    >>> res.max_loss >= res.loss and res.sharpness >= 0
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from leanscale.core.errors import InvalidParameterError
from leanscale.core.validation import Interval, check_param, unknown_name_error
from leanscale.train.user_data import (
    check_finite_x,
    check_loss_has_grad,
    check_scalar_loss,
    check_xy_pair,
    is_xy_pair,
    iter_xy_batches,
    model_loss,
)

__all__ = ["SharpnessResult", "sharpness"]

_METHODS = ("sign", "normalized")
_OWNER = "sharpness"


@dataclass(frozen=True)
class SharpnessResult:
    """What :func:`sharpness` measured."""

    sharpness: float  # Keskar's phi, in percent: 100 * (max_loss - loss) / (1 + loss)
    loss: float  # f(x): mean loss at the weights as given
    max_loss: float  # largest f found in the box (a lower bound of the true maximum)
    eps: float
    steps: int
    method: str
    step_size: float  # ascent step, as a fraction of the box half-width
    random_start: bool
    n_samples: int  # examples f was averaged over
    n_params: int  # scalars perturbed (the dimension n of the box)
    losses: tuple[float, ...]  # f at the ascent iterates z_0 ... z_steps

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


# ----------------------------------------------------------------------------------------- data
def _prepare_batches(data, max_samples: int | None, batch_size: int) -> list[tuple[Any, Any, int]]:
    """``(x, y, n)`` batches holding at most ``max_samples`` examples, read once and kept."""
    limit = math.inf if max_samples is None else max_samples
    batches: list[tuple[Any, Any, int]] = []
    if is_xy_pair(data):
        x, y = data
        n = int(min(check_xy_pair(x, y, _OWNER), limit))
        check_finite_x(x[:n], _OWNER)
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            batches.append((x[start:stop], y[start:stop], stop - start))
    else:
        total = 0
        for x, y, n in iter_xy_batches(data, _OWNER):
            if total >= limit:
                break
            if total + n > limit:
                keep = int(limit - total)
                x, y, n = x[:keep], y[:keep], keep
            if n > 0:
                check_finite_x(x, _OWNER, where=f" of batch {len(batches)}")
                batches.append((x, y, n))
                total += n
    if not batches:
        raise InvalidParameterError(
            f"The 'data' parameter of {_OWNER} must hold at least one example. Got an empty data set."
        )
    return batches


def _to(value, device):
    return value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value


# -------------------------------------------------------------------------------- model state
class _SavedState:
    """Everything :func:`sharpness` may touch, to put back exactly."""

    def __init__(self, model: nn.Module):
        self.modes = [(m, m.training) for m in model.modules()]
        self.slots = []  # (dict, key, original tensor object) for every parameter and buffer slot
        self.values: dict[int, torch.Tensor] = {}  # id(tensor) -> clone of its data
        self.flags: dict[int, tuple[torch.Tensor, bool, Any]] = {}  # id(param) -> (param, requires_grad, grad)
        for module in model.modules():
            for store in (module._parameters, module._buffers):
                for key, tensor in store.items():
                    self.slots.append((store, key, tensor))
                    if tensor is not None and id(tensor) not in self.values:
                        self.values[id(tensor)] = tensor.detach().clone()
            for p in module._parameters.values():
                if p is not None:
                    self.flags[id(p)] = (p, p.requires_grad, p.grad)

    def original(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.values[id(tensor)]

    def restore(self) -> None:
        with torch.no_grad():
            for store, key, tensor in self.slots:
                store[key] = tensor
                if tensor is not None:
                    tensor.copy_(self.values[id(tensor)])
        for p, requires_grad, grad in self.flags.values():
            p.requires_grad_(requires_grad)
            p.grad = grad
        for module, training in self.modes:
            module.training = training


# ---------------------------------------------------------------------------------- the metric
def sharpness(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    data,
    eps: float = 1e-3,
    *,
    steps: int = 10,
    method: str = "sign",
    step_size: float | None = None,
    random_start: bool = False,
    max_samples: int | None = None,
    batch_size: int = 256,
    generator: torch.Generator | int | None = None,
) -> SharpnessResult:
    """Keskar et al.'s sharpness (Metric 2.1, ``A = I``) of ``model`` at its current weights.

    See the module docstring for the definition, the ascent and why it is not L-BFGS-B.

    Args:
        model: The network; its weights ``x`` are the parameters with ``requires_grad=True``.
        loss_fn: ``loss_fn(model(x_batch), y_batch)`` -> the scalar *mean* loss of the batch
            (e.g. ``F.cross_entropy``); batches are weighted by their size. The metric assumes a
            loss ``> -1`` (non-negative losses such as cross-entropy are fine).
        data: ``(x, y)`` tensors (split into chunks of ``batch_size``) or an iterable of ``(x, y)``
            batches, e.g. a ``DataLoader``. An iterable is read once and its batches are kept in
            memory (on their device), so every ascent step sees the same examples.
        eps: Box size (> 0); the paper uses ``1e-3`` and ``5e-4``.
        steps: Gradient-ascent steps (>= 1); each costs one forward and backward pass over the data.
        method: ``"sign"`` or ``"normalized"`` (see the module docstring).
        step_size: Step as a fraction of the box half-width (> 0); default ``2.5 / steps``.
        random_start: Start from a uniform random point of the box instead of its centre (helps when
            the gradient at ``x`` is zero, e.g. at a saddle or an exact symmetric minimum).
        max_samples: Use only the first ``max_samples`` examples (None: all). Shuffle ordered data
            first; a few thousand examples usually suffice.
        batch_size: Chunk size for tensor data (ignored for an iterable of batches).
        generator: ``torch.Generator`` or int seed for the random start (None: torch's global RNG).

    Returns:
        A :class:`SharpnessResult` (``sharpness`` in percent, the losses, the settings).

    Raises:
        InvalidParameterError: ``eps <= 0``, ``steps < 1``, an unknown ``method``, empty or malformed
            ``data``, a model without trainable parameters, a ``loss_fn`` that does not return a
            scalar, or a non-finite loss (or one ``<= -1``) at the given weights.
    """
    check_param("model", model, [nn.Module], owner=_OWNER)
    check_param("loss_fn", loss_fn, [callable], owner=_OWNER)
    check_param("eps", eps, [Interval(float, 0, math.inf, closed="neither")], owner=_OWNER)
    check_param("steps", steps, [Interval(int, 1, None)], owner=_OWNER)
    if not isinstance(method, str) or method not in _METHODS:
        raise unknown_name_error("method", method, _METHODS, owner=_OWNER)
    check_param("step_size", step_size, [None, Interval(float, 0, math.inf, closed="neither")], owner=_OWNER)
    check_param("random_start", random_start, [bool], owner=_OWNER)
    check_param("max_samples", max_samples, [None, Interval(int, 1, None)], owner=_OWNER)
    check_param("batch_size", batch_size, [Interval(int, 1, None)], owner=_OWNER)
    check_param("generator", generator, [None, torch.Generator, Interval(int, 0, None)], owner=_OWNER)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InvalidParameterError(
            f"The 'model' parameter of {_OWNER} must have at least one parameter with "
            f"requires_grad=True. Got a model with none."
        )
    batches = _prepare_batches(data, max_samples, batch_size)
    n_samples = sum(n for _, _, n in batches)
    alpha = 2.5 / steps if step_size is None else float(step_size)
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)

    saved = _SavedState(model)
    try:
        model.eval()
        x0 = [saved.original(p) for p in params]
        radius = [eps * (w.abs() + 1) for w in x0]  # r_i = eps (|x_i| + 1)

        def set_weights(z):
            with torch.no_grad():
                for p, w, zi in zip(params, x0, z):
                    p.copy_(w + zi)

        def evaluate(with_grad: bool, probe: bool = False):
            # probe: the first pass over the data, where an error of the model or the loss means the
            # data do not fit them (reported naming them); later errors pass through unchanged
            total = torch.zeros((), dtype=torch.float64)
            grads = [torch.zeros_like(p) for p in params] if with_grad else None
            context = torch.enable_grad() if with_grad else torch.no_grad()
            with context:
                for xb, yb, n in batches:
                    device = params[0].device
                    xb, yb = _to(xb, device), _to(yb, device)
                    loss = (model_loss(model, loss_fn, xb, yb, _OWNER) if probe
                            else check_scalar_loss(loss_fn(model(xb), yb), _OWNER))
                    if with_grad:
                        check_loss_has_grad(loss, _OWNER)
                    weight = n / n_samples
                    if with_grad:
                        gs = torch.autograd.grad(loss * weight, params, allow_unused=True)
                        for acc, g in zip(grads, gs):
                            if g is not None:
                                acc.add_(g)
                    total += loss.detach().double().cpu().reshape(()) * weight
            return float(total), grads

        # f(x) at the weights as given; without a random start it is also the first iterate.
        first = None
        if random_start:
            base_loss, _ = evaluate(with_grad=False, probe=True)
            z = [
                r * (2 * torch.rand(r.shape, generator=generator, dtype=r.dtype).to(r.device) - 1)
                for r in radius
            ]
        else:
            z = [torch.zeros_like(w) for w in x0]
            first = evaluate(with_grad=True, probe=True)
            base_loss = first[0]
        if not math.isfinite(base_loss) or base_loss <= -1:
            raise InvalidParameterError(
                f"The 'model' parameter of {_OWNER} must have a finite loss greater than -1 on data at "
                f"its weights (the metric divides by 1 + f(x)). Got f(x) = {base_loss!r} instead."
            )

        losses = []
        for t in range(steps):
            if t == 0 and first is not None:
                f, grads = first
            else:
                set_weights(z)
                f, grads = evaluate(with_grad=True)
            losses.append(f)
            if method == "sign":
                directions = [torch.nan_to_num(g).sign() for g in grads]
            else:
                scaled = [torch.nan_to_num(g) * r for g, r in zip(grads, radius)]
                largest = max(float(d.abs().max()) if d.numel() else 0.0 for d in scaled)
                directions = [d / largest if largest > 0 else torch.zeros_like(d) for d in scaled]
            with torch.no_grad():
                z = [
                    torch.maximum(torch.minimum(zi + alpha * r * d, r), -r)
                    for zi, r, d in zip(z, radius, directions)
                ]
        set_weights(z)
        final, _ = evaluate(with_grad=False)
        losses.append(final)
    finally:
        saved.restore()

    finite = [v for v in losses if not math.isnan(v)]
    max_loss = max([base_loss, *finite])
    return SharpnessResult(
        sharpness=100.0 * (max_loss - base_loss) / (1.0 + base_loss),
        loss=base_loss,
        max_loss=max_loss,
        eps=float(eps),
        steps=steps,
        method=method,
        step_size=alpha,
        random_start=random_start,
        n_samples=n_samples,
        n_params=sum(p.numel() for p in params),
        losses=tuple(losses),
    )

