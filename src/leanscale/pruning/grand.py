"""GraNd: the norm of each example's loss gradient, computed with ``torch.func`` per-sample gradients.

Paul, Ganguli & Dziugaite 2021, "Deep Learning on a Data Diet: Finding Important Examples Early in
Training", arXiv 2107.07075. The *gradient normed* score of ``(x, y)`` is::

    GraNd(x, y) = E_w || grad_w loss(f(w, x), y) ||_2

the L2 norm of the gradient of the example's loss with respect to all trainable weights of a
network ``w`` trained for a few epochs, averaged over networks from different initialisations.
It bounds how much the example can change the loss of the others in one step; examples with a
small norm can be pruned. (The paper found EL2N, :func:`~leanscale.pruning.scores.el2n_scores`,
about as good and cheaper after a few epochs; GraNd is also meaningful at initialisation.)

**How.** One ``vmap`` over a ``grad`` of a ``functional_call`` gives the per-example gradients
of a chunk of ``batch_size`` examples in one vectorised pass (no Python loop over examples)::

    per_example = vmap(grad(loss_of_one_example), in_dims=(None, 0, 0))
    grads = per_example(params, x_chunk, y_chunk)  # {name: (b, *param.shape)}

Memory: the chunk's gradients take ``batch_size * n_params`` floats (256 x 66k parameters of
``BNCNN(width=32)``: 68 MB in float32); lower ``batch_size`` for big models.

**Eval mode.** The model is scored in eval mode: BatchNorm normalises with its running statistics
(passed to ``functional_call`` with the other buffers) and dropout is off, so each example's
gradient depends on that example alone -- which is what a per-example score means, and what
``vmap`` needs (train-mode BatchNorm mixes the batch). Each submodule's mode is restored after.
Models whose forward cannot run under ``vmap`` (data-dependent Python control flow, ``.item()``,
in-place writes into captured tensors) raise an :class:`InvalidParameterError` that quotes torch's
message.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from leanscale.core.errors import InvalidParameterError
from leanscale.core.validation import Interval, check_param
from leanscale.pruning.scores import (
    _check_device,
    _check_logits,
    _EvalMode,
    _iter_batches,
    _model_device_dtype,
    _prepare_input,
)
from leanscale.train.user_data import as_logits

__all__ = ["grand_scores"]

_OWNER = "grand_scores"


def _check_models(model: Any) -> list[nn.Module]:
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    if not models or not all(isinstance(m, nn.Module) for m in models):
        got = type(model).__name__ if not isinstance(model, (list, tuple)) else [type(m).__name__ for m in models]
        raise InvalidParameterError(
            f"The 'model' parameter of {_OWNER} must be an nn.Module or a non-empty list of them. Got {got}."
        )
    for i, m in enumerate(models):
        if not any(p.requires_grad for p in m.parameters()):
            raise InvalidParameterError(
                f"The 'model' parameter of {_OWNER} must have parameters that require grad (model {i} has "
                "none): GraNd is the norm of the gradient with respect to them."
            )
    return models


def _check_default_targets(y: torch.Tensor, n_classes: int) -> None:
    """Cross-entropy targets: integer class indices in ``[0, n_classes)``."""
    if y.ndim != 1 or y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
        raise InvalidParameterError(
            f"The 'data' parameter of {_OWNER} must hold labels y as a 1-d array of integer class indices "
            f"for the default cross-entropy loss. Got shape {tuple(y.shape)} and dtype {y.dtype}."
        )
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        bad = int(torch.nonzero((y < 0) | (y >= n_classes))[0, 0])
        raise InvalidParameterError(
            f"The 'data' parameter of {_OWNER} must hold labels in [0, {n_classes}) (the model has "
            f"{n_classes} outputs). Got {int(y[bad])} at position {bad} of a batch."
        )


class _PerExampleGradNorm:
    """``(x, y) -> (b,)`` float64 gradient norms of one model (in eval mode, on its device)."""

    def __init__(self, model: nn.Module, loss_fn: Callable | None):
        self.model, self.loss_fn = model, loss_fn if loss_fn is not None else F.cross_entropy
        self.default_loss = loss_fn is None
        self.device, self.dtype = _model_device_dtype(model)
        named = dict(model.named_parameters())
        self.params = {k: p.detach() for k, p in named.items() if p.requires_grad}  # differentiated
        self.frozen = {k: p.detach() for k, p in named.items() if not p.requires_grad}
        self.buffers = {k: b.detach() for k, b in model.named_buffers()}  # BatchNorm running stats
        self.n_classes: int | None = None

        def loss_one(params: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            # x: (...) one example, y: () its target; the model sees a batch of one
            out = functional_call(self.model, (params, self.frozen, self.buffers), (x.unsqueeze(0),))
            logits = as_logits(out)  # (1, k)
            return self.loss_fn(logits, y.unsqueeze(0))  # scalar

        self.per_example = vmap(grad(loss_one), in_dims=(None, 0, 0))

    def __call__(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        x = _prepare_input(xb, self.device, self.dtype)  # (b, ...)
        y = yb.to(self.device)  # (b,) or (b, ...)
        if self.default_loss:
            if self.n_classes is None:  # one forward of one example tells k
                with torch.no_grad():
                    self.n_classes = _check_logits(as_logits(self.model(x[:1])), 1, _OWNER).shape[1]
            _check_default_targets(y, self.n_classes)
            y = y.long()  # cross-entropy wants int64 class indices (numpy labels are often int32)
        try:
            with warnings.catch_warnings():  # vmap over attention's backward: a speed note, not for the user
                warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet")
                grads = self.per_example(self.params, x, y)  # {name: (b, *param.shape)}
        except (RuntimeError, NotImplementedError, ValueError, TypeError) as exc:
            if isinstance(exc, InvalidParameterError):
                raise
            raise InvalidParameterError(
                f"The 'model' parameter of {_OWNER} must run under torch.func.vmap (per-example "
                "gradients of functional_call, in eval mode), with a loss_fn(logits (1, k), target (1,)) "
                "returning a scalar. Common causes: data-dependent Python control flow or .item() in "
                f"forward, in-place writes into tensors the forward did not create. torch said: {exc}"
            ) from exc
        sq = torch.zeros(len(x), dtype=torch.float64, device=self.device)  # (b,) squared norms
        for g in grads.values():
            sq += g.reshape(len(x), -1).double().pow(2).sum(dim=1)
        return sq.sqrt()


def grand_scores(
    model: nn.Module | list[nn.Module],
    data: Any,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 256,
    device: Any = None,
) -> np.ndarray:
    """GraNd scores: the L2 norm of each example's loss gradient w.r.t. all trainable parameters.

    Args:
        model: A module mapping ``x`` to logits ``(b, k)``, or a list of them (networks from
            several seeds): the score is then the mean over the models of the norms. Each is
            evaluated in eval mode (BatchNorm with running statistics); its parameters, gradients
            and every submodule's mode are left as they were.
        data: A pair ``(x, y)`` of arrays/tensors ``(n, ...)``, ``(n,)`` (cut into chunks of
            ``batch_size``), or an iterable of ``(x, y)`` batches (a DataLoader, used as it
            comes; it is read once even with several models).
        loss_fn: ``loss_fn(logits, target) -> scalar`` for ONE example, called with ``logits``
            ``(1, k)`` and ``target`` ``(1, ...)``. Default: cross-entropy (``y`` then holds class
            indices in ``[0, k)``).
        batch_size: Examples per vectorised chunk; memory grows as ``batch_size * n_params``.
        device: Where to compute; each model is moved there for the call and moved back after.
            Default: each model's own device.

    Returns:
        ``(n,)`` float64 gradient norms (computed in the model's dtype, summed in float64).
        Higher = harder / more influential.

    Raises:
        InvalidParameterError: bad ``model``, ``data``, labels, ``batch_size``, ``device`` or
            ``loss_fn``; a model whose forward cannot run under ``torch.func.vmap``.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 2)
        >>> x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
        >>> grand_scores(model, (x, y)).shape
        (5,)
    """
    models = _check_models(model)
    check_param("loss_fn", loss_fn, [None, callable], owner=_OWNER)
    check_param("batch_size", batch_size, [Interval(int, 1, None)], owner=_OWNER)
    dev = _check_device(device, _OWNER)
    out: list[torch.Tensor] = []
    with _EvalMode(models, dev):
        # built inside: the parameter tensors must be the ones on the compute device
        scorers = [_PerExampleGradNorm(m, loss_fn) for m in models]
        for xb, yb in _iter_batches(data, int(batch_size), owner=_OWNER, need_labels=True):
            total = sum(s(xb, yb).cpu() for s in scorers)  # (b,)
            out.append(total / len(scorers))
    if not out:
        raise InvalidParameterError(f"The 'data' parameter of {_OWNER} must hold at least one example. Got none.")
    return torch.cat(out).numpy()  # (n,)
