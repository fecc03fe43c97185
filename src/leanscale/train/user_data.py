"""Reading a user's ``data`` arguments (a pair ``(x, y)`` of tensors or an iterable of batches) and
calling a user's model or loss with errors that name the parameter. Shared by every technique."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from leanscale.core.errors import InvalidParameterError, LeanscaleError

__all__ = ["as_logits", "check_finite_x", "check_loss_has_grad", "check_scalar_loss", "check_xy_pair", "describe", "is_xy_pair",
           "iter_xy_batches", "model_loss", "output_cross_entropy", "user_code"]

# What a user's model or loss raises on data it cannot take (wrong shape, dtype, label range).
# Out-of-memory errors are RuntimeErrors too, but they are not about the data: they pass through.
_USER_CODE_ERRORS = (RuntimeError, ValueError, IndexError, TypeError)


def as_logits(out: Any) -> Any:
    """The logits in a model's output: a tensor as it is, the ``logits`` of a Hugging Face
    ``ModelOutput`` (or of a dict), the first element of a tuple (``(logits, loss)`` models).
    Anything else comes back unchanged, for the caller's check to name.

    Example:
        >>> as_logits((torch.zeros(2, 3), torch.tensor(0.5))).shape
        torch.Size([2, 3])
    """
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)  # transformers' ModelOutput
    if logits is None and isinstance(out, dict):
        logits = out.get("logits")
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return out


def output_cross_entropy(out: Any, y: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy`` of a model's output (a tensor, an HF ``ModelOutput``, ``(logits, ...)``)
    and the class indices ``y``: the loss the command line uses with a user's ``--model``."""
    return torch.nn.functional.cross_entropy(as_logits(out), y)


def is_xy_pair(data: Any) -> bool:
    """True for ``(x, y)`` (tuple or list) of two tensors."""
    return (isinstance(data, (tuple, list)) and len(data) == 2
            and isinstance(data[0], torch.Tensor) and isinstance(data[1], torch.Tensor))


def check_xy_pair(x: torch.Tensor, y: torch.Tensor, owner: str) -> int:
    """The number of examples of ``(x, y)``; an error unless both have the same first dimension."""
    if x.ndim == 0 or y.ndim == 0 or x.shape[0] != y.shape[0]:
        raise InvalidParameterError(
            f"The 'data' parameter of {owner} must be a pair (x, y) with the same first dimension. "
            f"Got shapes {tuple(x.shape)} and {tuple(y.shape)} instead."
        )
    return int(x.shape[0])


def iter_xy_batches(data: Any, owner: str) -> Iterator[tuple[Any, Any, int]]:
    """``(x, y, n)`` for each batch of an iterable of ``(x, y, ...)`` batches (a DataLoader)."""
    if isinstance(data, (torch.Tensor, str, bytes, dict)) or not isinstance(data, Iterable):
        raise InvalidParameterError(
            f"The 'data' parameter of {owner} must be a pair (x, y) of tensors or an iterable of (x, y) "
            f"batches. Got {type(data).__name__} instead."
        )
    for batch in data:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise InvalidParameterError(
                f"The 'data' parameter of {owner} must yield (x, y) batches. Got a batch of type "
                f"{type(batch).__name__} instead."
            )
        x, y = batch[0], batch[1]
        yield x, y, int(x.shape[0]) if isinstance(x, torch.Tensor) and x.ndim > 0 else len(y)


def check_scalar_loss(loss: Any, owner: str) -> torch.Tensor:
    """``loss`` as a 0-d tensor; an error naming ``loss_fn`` unless it is a one-element tensor."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise InvalidParameterError(
            f"The 'loss_fn' parameter of {owner} must return a scalar tensor (the mean loss of the batch). "
            f"Got {type(loss).__name__}"
            + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else "")
            + " instead."
        )
    return loss.reshape(())


def describe(value: Any) -> str:
    """``tensor of shape (8, 4) and dtype torch.float32`` (or the type name) for error messages."""
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return type(value).__name__


def check_finite_x(x: Any, owner: str, where: str = "") -> None:
    """An error naming 'data' when a floating-point ``x`` holds NaN or inf (found before any work)."""
    if isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex()) and x.numel():
        finite = torch.isfinite(x.detach())
        if not bool(finite.all()):
            row = int((~finite).reshape(x.shape[0], -1).any(1).nonzero()[0, 0]) if x.ndim else 0
            raise InvalidParameterError(
                f"The 'data' parameter of {owner} must hold only finite inputs x. Got NaN or inf in "
                f"example {row}{where}: remove or impute those examples first."
            )


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) if hasattr(torch, "OutOfMemoryError") else False


@contextlib.contextmanager
def user_code(param: str, owner: str, context: str, hint: str):
    """Run the user's model or loss: its shape/dtype/label errors become an
    :class:`InvalidParameterError` naming ``param`` (the original exception chained; an
    out-of-memory error and leanscale's own errors pass unchanged)."""
    try:
        yield
    except LeanscaleError:
        raise
    except _USER_CODE_ERRORS as exc:
        if _is_oom(exc):
            raise
        raise InvalidParameterError(
            f"The {param!r} parameter of {owner} failed on {context}: {type(exc).__name__}: {exc}. {hint}"
        ) from exc


def model_loss(model: Any, loss_fn: Any, x: Any, y: Any, owner: str) -> torch.Tensor:
    """``loss_fn(model(x), y)`` as a 0-d tensor that depends on the model's parameters.

    An error of the user's model or loss on this batch (a shape, dtype or label-range mismatch) is
    re-raised as :class:`InvalidParameterError` naming ``model``/``loss_fn`` and the batch's shapes,
    with the original exception chained (``LEANSCALE_DEBUG=1`` shows it in the CLI).
    """
    with user_code("model", owner, f"a batch of 'data' (x: {describe(x)})",
                   "Check that the data match the model's input."):
        out = model(x)
    with user_code("loss_fn", owner, f"the model's output ({describe(out)}) and the labels y ({describe(y)})",
                   "Check the labels (e.g. class indices in [0, n_classes) of an integer dtype for cross-entropy) "
                   "and the model's output size."):
        loss = loss_fn(out, y)
    return check_scalar_loss(loss, owner)


def check_loss_has_grad(loss: torch.Tensor, owner: str) -> None:
    """An error naming 'loss_fn' when the loss does not depend on any trainable parameter."""
    if not loss.requires_grad:
        raise InvalidParameterError(
            f"The 'loss_fn' parameter of {owner} must return a loss computed from the model's output "
            f"(one that depends on its trainable parameters). Got a tensor without a gradient (detached, "
            f"or computed under torch.no_grad())."
        )
