"""Shared reading of ``data`` arguments: a pair ``(x, y)`` of tensors or an iterable of batches."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from leanscale.core.errors import InvalidParameterError


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
