"""Per-example difficulty scores from predicted probabilities: EL2N and uncertainty.

**EL2N** -- Paul, Ganguli & Dziugaite 2021, "Deep Learning on a Data Diet: Finding Important
Examples Early in Training", arXiv 2107.07075. The *error L2 norm* of an example ``(x, y)`` is::

    EL2N(x, y) = E_w || p(w, x) - onehot(y) ||_2

the distance between the softmax output of a network ``w`` trained for only a few epochs and the
one-hot label, averaged over networks trained from different initialisations (the expectation
over ``w``). The paper averages over 10 seeds at epoch 20 of 200 on CIFAR-10 and prunes half the
data set at no accuracy cost by keeping the highest scores. :func:`el2n_scores` takes one
``(n, k)`` probability matrix or a list of them (one per seed) and averages the per-seed *norms*
(not the norm of the averaged probabilities, which would be smaller for examples the seeds
disagree on).

**Uncertainty** (:func:`uncertainty_scores`) needs no labels: the classic active-learning
acquisition functions margin, entropy and least confidence (Settles 2009, "Active Learning
Literature Survey"). :func:`collect_probs` turns a model and data into the probability matrix.

Every score is one float64 number per example, higher = harder / more informative.

Example:
    >>> import numpy as np
    >>> probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    >>> el2n_scores(probs, [0, 1]).round(4)  # sqrt(0.3^2 + 0.2^2 + 0.1^2), sqrt(0.1^2 + 0.7^2 + 0.6^2)
    array([0.3742, 0.9274])
    >>> uncertainty_scores(probs, kind="margin").round(4)  # 1 - (top1 - top2)
    array([0.5, 0.7])
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from leanscale.core.errors import InvalidParameterError
from leanscale.core.validation import (
    Interval,
    check_array,
    check_consistent_length,
    check_param,
    unknown_name_error,
)
from leanscale.pruning._train import check_finite
from leanscale.train.user_data import as_logits

__all__ = ["UNCERTAINTY_KINDS", "collect_probs", "el2n_scores", "uncertainty_scores"]

UNCERTAINTY_KINDS = ("margin", "entropy", "least_confidence")
ROW_SUM_TOL = 1e-3  # |sum_j p_ij - 1| allowed: float32 / float16 softmax rows are off by ~1e-7 / ~1e-4


def _to_numpy(value: Any) -> Any:
    """A torch tensor as a numpy array (CPU, bfloat16/half widened); anything else unchanged."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64):
            t = t.double()
        return t.numpy()
    return value


def _check_probs(name: str, value: Any, owner: str) -> np.ndarray:
    """``(n, k)`` float64 probabilities: finite, non-negative, rows summing to 1."""
    probs = check_array(name, _to_numpy(value), ndim=2, nonnegative=True, owner=owner)  # (n, k)
    if probs.shape[1] == 0:
        raise InvalidParameterError(
            f"The {name!r} parameter of {owner} must have at least one class (column). Got shape {probs.shape}."
        )
    sums = probs.sum(axis=1)  # (n,)
    bad = np.flatnonzero(np.abs(sums - 1.0) > ROW_SUM_TOL)
    if len(bad):
        raise InvalidParameterError(
            f"The {name!r} parameter of {owner} must hold probabilities: every row must sum to 1 "
            f"(tolerance {ROW_SUM_TOL}). Got row {int(bad[0])} summing to {float(sums[bad[0]])!r} "
            f"({len(bad)} bad rows); pass softmax outputs, not logits."
        )
    return probs


def _is_seed_list(probs: Any) -> bool:
    """A list/tuple of ``(n, k)`` matrices (not one matrix written as a list of rows)."""
    if not isinstance(probs, (list, tuple)):
        return False
    if not probs:
        return True
    first = probs[0]
    if isinstance(first, (torch.Tensor, np.ndarray)):
        return first.ndim != 1
    try:
        return np.ndim(first) != 1
    except ValueError:  # a ragged nested list: report it element by element
        return True


def _check_probs_list(probs: Any, owner: str) -> list[np.ndarray]:
    """One ``(n, k)`` matrix, or a list/tuple of them with equal shapes (several seeds)."""
    if _is_seed_list(probs):
        if len(probs) == 0:
            raise InvalidParameterError(
                f"The 'probs' parameter of {owner} must be an (n, k) array or a non-empty list of them. "
                "Got an empty list."
            )
        mats = [_check_probs(f"probs[{i}]", p, owner) for i, p in enumerate(probs)]
        shapes = [m.shape for m in mats]
        if len(set(shapes)) > 1:
            raise InvalidParameterError(
                f"The 'probs' parameter of {owner} must be a list of arrays of the same shape (one per "
                f"seed). Got shapes {shapes}."
            )
        return mats
    return [_check_probs("probs", probs, owner)]


def _check_labels(labels: Any, n_classes: int, owner: str) -> np.ndarray:
    """``(n,)`` int64 class indices in ``[0, n_classes)``."""
    arr = check_array("labels", _to_numpy(labels), ndim=1, dtype=None, finite=False, owner=owner)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise InvalidParameterError(
            f"The 'labels' parameter of {owner} must be integer class indices. Got dtype {arr.dtype}."
        )
    if arr.size and (arr.min() < 0 or arr.max() >= n_classes):
        bad = int(np.flatnonzero((arr < 0) | (arr >= n_classes))[0])
        raise InvalidParameterError(
            f"The 'labels' parameter of {owner} must be class indices in [0, {n_classes}) (probs has "
            f"{n_classes} columns). Got {arr[bad].item()!r} at index {bad}."
        )
    return arr.astype(np.int64)


def el2n_scores(probs: Any, labels: Any) -> np.ndarray:
    """EL2N scores ``||p(x) - onehot(y)||_2`` (Paul et al. 2021), averaged over seeds.

    Args:
        probs: Predicted probabilities ``(n, k)`` (array or tensor; rows non-negative, summing to
            1), or a list/tuple of such matrices, one per seed / trained network.
        labels: True classes ``(n,)``, integers in ``[0, k)``.

    Returns:
        ``(n,)`` float64 in ``[0, sqrt(2)]``; with several matrices, the mean over them of the
        per-matrix norms. Higher = harder.

    Raises:
        InvalidParameterError: ``probs`` is not 2-d, not finite, negative, or its rows do not sum
            to 1; the matrices of a list differ in shape; ``labels`` are not integers in
            ``[0, k)`` or not as many as the rows of ``probs``.
    """
    owner = "el2n_scores"
    mats = _check_probs_list(probs, owner)
    n, k = mats[0].shape
    y = _check_labels(labels, k, owner)
    check_consistent_length(owner, probs=mats[0], labels=y)
    rows = np.arange(n)
    total = np.zeros(n)  # (n,) sum over seeds of the norms
    for p in mats:
        err = p.copy()  # (n, k)
        err[rows, y] -= 1.0  # p - onehot(y)
        total += np.linalg.norm(err, axis=1)
    return total / len(mats)


def uncertainty_scores(probs: Any, kind: str = "margin") -> np.ndarray:
    """Label-free uncertainty of each prediction; higher = more uncertain.

    Args:
        probs: Predicted probabilities ``(n, k)`` (rows non-negative, summing to 1).
        kind: ``"margin"``: ``1 - (p_top1 - p_top2)`` (``p_top2 = 0`` when ``k = 1``), in
            ``[0, 1]``; ``"entropy"``: ``-sum_j p_j log p_j`` in nats (``0 log 0 = 0``), in
            ``[0, log k]``; ``"least_confidence"``: ``1 - max_j p_j``, in ``[0, 1 - 1/k]``.

    Returns:
        ``(n,)`` float64.

    Raises:
        InvalidParameterError: unknown ``kind``; ``probs`` not a valid probability matrix.
    """
    owner = "uncertainty_scores"
    if kind not in UNCERTAINTY_KINDS:
        raise unknown_name_error("kind", kind, UNCERTAINTY_KINDS, owner=owner)
    p = _check_probs("probs", probs, owner)  # (n, k)
    if kind == "entropy":
        safe = np.where(p > 0, p, 1.0)  # log(1) = 0 makes the 0 log 0 terms vanish
        return -(p * np.log(safe)).sum(axis=1)
    if kind == "least_confidence":
        return 1.0 - p.max(axis=1)
    if p.shape[1] == 1:
        return np.zeros(p.shape[0])
    top2 = np.partition(p, -2, axis=1)[:, -2:]  # (n, 2): second largest, largest
    return 1.0 - (top2[:, 1] - top2[:, 0])


# --------------------------------------------------------------------------- model + data -> batches


def _is_array(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, np.ndarray))


def _as_tensor(value: Any, name: str, owner: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    try:
        return torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InvalidParameterError(
            f"The {name!r} parameter of {owner} must be a numeric array or tensor. Got "
            f"{type(value).__name__} that could not be converted ({exc})."
        ) from None


def _check_device(device: Any, owner: str) -> torch.device | None:
    if device is None:
        return None
    try:
        return torch.device(device)
    except (TypeError, RuntimeError) as exc:
        raise InvalidParameterError(
            f"The 'device' parameter of {owner} must be None, a torch.device or a device string such as "
            f"'cpu' or 'cuda:0'. Got {device!r} ({exc})."
        ) from None


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype | None]:
    """The device of the model's first parameter or buffer (CPU without any) and its float dtype."""
    tensors = [*model.parameters(), *model.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    dtype = next((t.dtype for t in tensors if t.is_floating_point()), None)
    return device, dtype


def _iter_batches(
    data: Any, batch_size: int, *, owner: str, need_labels: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield ``(x, y)`` tensor batches from the ``data`` forms the scoring functions accept.

    ``data`` is a tensor/array ``x`` (cut into ``batch_size`` rows), a tuple or list whose first
    element is a tensor/array: ``(x, y, ...)`` (cut the same way; a list of exactly two
    equal-length tensor batches is therefore read as ``(x, y)``: pass a DataLoader instead), or any
    other iterable of batches ``x`` or ``(x, y, ...)`` (used as they come; ``y`` None when absent).
    """
    if _is_array(data) or (isinstance(data, (tuple, list)) and data and _is_array(data[0])):
        if _is_array(data):
            parts = [_as_tensor(data, "data", owner)]
        else:
            parts = [_as_tensor(v, f"data[{i}]", owner) for i, v in enumerate(data)]
        if any(p.ndim == 0 for p in parts):
            raise InvalidParameterError(
                f"The 'data' parameter of {owner} must hold arrays with one row per example. Got shapes "
                f"{[tuple(p.shape) for p in parts]}."
            )
        if len(parts) > 1:
            check_consistent_length(owner, **{"x" if i == 0 else "y" if i == 1 else f"data[{i}]": p
                                               for i, p in enumerate(parts)})
        x, y = parts[0], (parts[1] if len(parts) > 1 else None)
        check_finite(x, "data", owner)
        if need_labels and y is None:
            raise InvalidParameterError(
                f"The 'data' parameter of {owner} must be a pair (x, y) or an iterable of (x, y) batches: "
                f"labels are needed. Got a single array of shape {tuple(x.shape)}."
            )
        for start in range(0, x.shape[0], batch_size):
            yield x[start:start + batch_size], (None if y is None else y[start:start + batch_size])
        return
    try:
        batches = iter(data)
    except TypeError:
        raise InvalidParameterError(
            f"The 'data' parameter of {owner} must be a tensor x, a pair (x, y) or an iterable of batches "
            f"(a DataLoader). Got {type(data).__name__}."
        ) from None
    for i, batch in enumerate(batches):
        if _is_array(batch):
            xb, yb = _as_tensor(batch, "data", owner), None
        elif isinstance(batch, (tuple, list)) and batch:
            xb = _as_tensor(batch[0], "data", owner)
            yb = _as_tensor(batch[1], "data", owner) if len(batch) > 1 else None
        else:
            raise InvalidParameterError(
                f"The 'data' parameter of {owner} must yield batches x or (x, y, ...). Got "
                f"{type(batch).__name__} for batch {i}."
            )
        if xb.is_floating_point() and not bool(torch.isfinite(xb).all()):
            raise InvalidParameterError(
                f"The 'data' parameter of {owner} must contain only finite values. Got a NaN or infinity in "
                f"batch {i}."
            )
        if need_labels and yb is None:
            raise InvalidParameterError(
                f"The 'data' parameter of {owner} must yield (x, y) batches: labels are needed. Batch {i} "
                "has no labels."
            )
        if yb is not None and (xb.ndim == 0 or yb.ndim == 0 or len(xb) != len(yb)):
            raise InvalidParameterError(
                f"The 'data' parameter of {owner} must yield batches whose x and y have the same length. "
                f"Batch {i} has shapes {tuple(xb.shape)} and {tuple(yb.shape)}."
            )
        yield xb, yb


def _prepare_input(x: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    """Move a batch to ``device``; floating inputs take the model's float dtype (integer ids stay)."""
    if x.is_floating_point() and dtype is not None and x.dtype != dtype:
        x = x.to(dtype)
    return x.to(device)


class _EvalMode:
    """Context manager: put modules in eval mode (and optionally on ``device``), then restore
    every submodule's own ``training`` flag and the original device."""

    def __init__(self, models: list[nn.Module], device: torch.device | None):
        self.models, self.device = models, device
        self._modes: list[list[tuple[nn.Module, bool]]] = []
        self._devices: list[torch.device] = []

    def __enter__(self) -> None:
        for m in self.models:
            self._modes.append([(sub, sub.training) for sub in m.modules()])
            self._devices.append(_model_device_dtype(m)[0])
            m.eval()
            if self.device is not None and self._devices[-1] != self.device:
                m.to(self.device)

    def __exit__(self, *exc) -> None:
        for m, modes, original in zip(self.models, self._modes, self._devices):
            if self.device is not None and original != self.device:
                m.to(original)
            for sub, training in modes:
                sub.training = training


def _check_logits(logits: Any, n_rows: int, owner: str) -> torch.Tensor:
    """The model's output must be a ``(b, k)`` tensor of logits."""
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != n_rows:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise InvalidParameterError(
            f"The 'model' parameter of {owner} must map a batch of {n_rows} examples to logits of shape "
            f"({n_rows}, n_classes). Got {got}."
        )
    return logits


def collect_probs(model: nn.Module, data: Any, *, batch_size: int = 1024, device: Any = None) -> np.ndarray:
    """Softmax probabilities of ``model`` on every example, in eval mode, without gradients.

    Args:
        model: Maps a batch ``x`` to logits ``(b, k)``. It is put in eval mode (BatchNorm uses
            its running statistics, dropout is off) and every submodule's mode is restored after.
        data: A tensor/array ``x`` ``(n, ...)``, a pair ``(x, y)`` (``y`` is ignored), or an
            iterable of batches ``x`` or ``(x, ...)`` such as a DataLoader (used as it comes).
            Floating inputs are cast to the model's float dtype; integer inputs (token ids) stay.
        batch_size: Rows per forward pass when ``data`` holds whole arrays.
        device: Where to compute; the model is moved there for the call and moved back after.
            Default: the model's device.

    Returns:
        ``(n, k)`` float64 probabilities (the softmax is taken in float64).

    Raises:
        InvalidParameterError: bad ``batch_size``, ``device`` or ``data``; the model's output is
            not ``(b, k)``.
    """
    owner = "collect_probs"
    check_param("model", model, [nn.Module], owner=owner)
    check_param("batch_size", batch_size, [Interval(int, 1, None)], owner=owner)
    dev = _check_device(device, owner)
    model_device, dtype = _model_device_dtype(model)
    dev = model_device if dev is None else dev
    out: list[torch.Tensor] = []
    with _EvalMode([model], dev), torch.no_grad():
        for xb, _ in _iter_batches(data, int(batch_size), owner=owner, need_labels=False):
            try:
                raw = as_logits(model(_prepare_input(xb, dev, dtype)))
            except (RuntimeError, TypeError, ValueError, IndexError) as exc:  # e.g. a batch of the wrong width
                raise InvalidParameterError(
                    f"The 'data' parameter of {owner} must fit the model: a batch of shape {tuple(xb.shape)} "
                    f"failed in its forward ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})."
                ) from exc
            logits = _check_logits(raw, len(xb), owner)  # (b, k)
            out.append(torch.softmax(logits.double(), dim=1).cpu())
    if not out:
        raise InvalidParameterError(f"The 'data' parameter of {owner} must hold at least one example. Got none.")
    return torch.cat(out).numpy()  # (n, k)
