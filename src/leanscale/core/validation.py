"""Declared parameter constraints and generated error messages (scikit-learn's style).

A function or estimator declares its constraints once::

    _parameter_constraints = {
        "huber_delta": [Interval(float, 0, None, closed="neither")],
        "method": [Options({"fast", "reference"})],
    }

and :func:`check_param` / :func:`check_params` (estimators: ``Estimator._validate_params`` of
:mod:`leanscale.core.estimator`) produce messages such as::

    The 'huber_delta' parameter of fit_parametric must be a float in the range (0, inf). Got -1.0 instead.

Unknown names list the valid ones and the closest match. Nothing here uses ``assert``.

Functions check their arguments with :func:`check_param` calls at their top, in the order of the
signature, followed by the checks that relate several arguments (there is no decorator: #14
removed the unused ``validate_params``, which could check neither those nor renamed arguments).
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from leanscale.core.errors import InvalidParameterError, NotFittedError

__all__ = [
    "Interval",
    "Options",
    "InstanceOf",
    "check_param",
    "check_params",
    "check_array",
    "check_consistent_length",
    "check_is_fitted",
    "check_labels",
    "check_items",
    "check_texts",
    "unknown_name_error",
    "closest_name",
]


class Interval:
    """A numeric range. ``kind`` is ``int``, ``float`` (accepts ints too) or ``"real"``.

    ``closed`` is one of ``"both"``, ``"left"``, ``"right"``, ``"neither"``; ``None`` bounds are
    infinite. Booleans are never accepted as numbers, and NaN is never in range.
    """

    def __init__(self, kind, left, right, *, closed: str = "both"):
        if kind not in (int, float, "real"):
            raise TypeError(f"Interval kind must be int, float or 'real', got {kind!r}")
        if closed not in ("both", "left", "right", "neither"):
            raise TypeError(f"Interval closed must be both/left/right/neither, got {closed!r}")
        self.kind, self.left, self.right, self.closed = kind, left, right, closed

    def _type_ok(self, value) -> bool:
        if isinstance(value, (bool, np.bool_)):
            return False
        if self.kind is int:
            return isinstance(value, numbers.Integral)
        return isinstance(value, numbers.Real)

    def is_satisfied_by(self, value) -> bool:
        if not self._type_ok(value):
            return False
        v = float(value)
        if math.isnan(v):
            return False
        left_ok = (
            self.left is None
            or (v >= self.left if self.closed in ("both", "left") else v > self.left)
        )
        right_ok = (
            self.right is None
            or (v <= self.right if self.closed in ("both", "right") else v < self.right)
        )
        return left_ok and right_ok

    def __str__(self) -> str:
        name = {int: "an int", float: "a float", "real": "a real number"}[self.kind]
        lo = "-inf" if self.left is None else self.left
        hi = "inf" if self.right is None else self.right
        lb = "[" if self.closed in ("both", "left") and self.left is not None else "("
        rb = "]" if self.closed in ("both", "right") and self.right is not None else ")"
        return f"{name} in the range {lb}{lo}, {hi}{rb}"


class Options:
    """One of a fixed set of values (usually strings)."""

    def __init__(self, options: Iterable):
        self.options = tuple(options)

    def is_satisfied_by(self, value) -> bool:
        try:
            return value in self.options
        except TypeError:
            return False

    def __str__(self) -> str:
        return "one of " + ", ".join(repr(o) for o in sorted(self.options, key=str))


class InstanceOf:
    """An instance of a type (or tuple of types); ``None`` as a type means ``None`` is allowed."""

    def __init__(self, *types, description: str | None = None):
        self.types = tuple(type(None) if t is None else t for t in types)
        self.description = description

    def is_satisfied_by(self, value) -> bool:
        return isinstance(value, self.types)

    def __str__(self) -> str:
        if self.description:
            return self.description
        names = ["None" if t is type(None) else t.__name__ for t in self.types]
        return "an instance of " + " or ".join(names)


def _as_constraint(c):
    if c is None:
        return InstanceOf(None, description="None")
    if isinstance(c, (Interval, Options, InstanceOf)):
        return c
    if isinstance(c, type):
        return InstanceOf(c)
    raise TypeError(f"unsupported constraint {c!r}")


def _describe(constraints: Sequence) -> str:
    parts = [str(_as_constraint(c)) if c is not callable else "a callable" for c in constraints]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " or " + parts[-1]


def check_param(name: str, value: Any, constraints: Sequence, owner: str | None = None) -> Any:
    """Raise :class:`InvalidParameterError` unless ``value`` satisfies one of ``constraints``."""
    for c in constraints:
        if c is callable:
            if callable(value):
                return value
            continue
        if _as_constraint(c).is_satisfied_by(value):
            return value
    where = f" of {owner}" if owner else ""
    raise InvalidParameterError(
        f"The {name!r} parameter{where} must be {_describe(constraints)}. Got {value!r} instead."
    )


def check_params(params: dict, constraints: dict, owner: str | None = None) -> None:
    """Check every parameter of ``params`` that has a declared constraint."""
    for key, value in params.items():
        if key in constraints:
            check_param(key, value, constraints[key], owner)


def closest_name(value: str, valid: Iterable[str]) -> str | None:
    """The valid name closest to ``value`` (difflib), or None when nothing is close."""
    match = difflib.get_close_matches(str(value), [str(v) for v in valid], n=1, cutoff=0.5)
    return match[0] if match else None


def unknown_name_error(name: str, value: Any, valid: Iterable[str], owner: str | None = None):
    """An :class:`InvalidParameterError` for an unknown name, listing the valid ones."""
    valid = sorted(str(v) for v in valid)
    hint = closest_name(value, valid)
    where = f" of {owner}" if owner else ""
    msg = f"The {name!r} parameter{where} must be one of {', '.join(map(repr, valid))}. Got {value!r} instead."
    if hint is not None:
        msg += f" Did you mean {hint!r}?"
    return InvalidParameterError(msg)


def check_array(
    name: str,
    value: Any,
    *,
    ndim: int | None = 1,
    positive: bool = False,
    nonnegative: bool = False,
    finite: bool = True,
    min_len: int = 0,
    dtype=np.float64,
    owner: str | None = None,
) -> np.ndarray:
    """Convert ``value`` to an array and check its shape and values; the error names ``name``."""
    where = f" of {owner}" if owner else ""
    try:
        arr = np.asarray(value, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError(
            f"The {name!r} parameter{where} must be array-like of numbers. Got {type(value).__name__} "
            f"that could not be converted ({exc})."
        ) from None
    if ndim is not None and arr.ndim != ndim:
        raise InvalidParameterError(
            f"The {name!r} parameter{where} must be a {ndim}-d array. Got an array of shape {arr.shape}."
        )
    if arr.ndim >= 1 and arr.shape[0] < min_len:
        raise InvalidParameterError(
            f"The {name!r} parameter{where} must have at least {min_len} values. Got {arr.shape[0]}."
        )
    if finite and arr.size and not np.all(np.isfinite(arr)):
        bad = int(np.flatnonzero(~np.isfinite(arr.ravel()))[0])
        raise InvalidParameterError(
            f"The {name!r} parameter{where} must contain only finite values. Got {arr.ravel()[bad].item()!r} "
            f"at flat index {bad}."
        )
    if positive and arr.size and not np.all(arr > 0):
        bad = int(np.flatnonzero(~(arr.ravel() > 0))[0])
        raise InvalidParameterError(
            f"The {name!r} parameter{where} must contain only positive values. Got {arr.ravel()[bad].item()!r} "
            f"at flat index {bad}."
        )
    if nonnegative and arr.size and not np.all(arr >= 0):
        bad = int(np.flatnonzero(~(arr.ravel() >= 0))[0])
        raise InvalidParameterError(
            f"The {name!r} parameter{where} must contain only non-negative values. Got "
            f"{arr.ravel()[bad].item()!r} at flat index {bad}."
        )
    return arr


def check_consistent_length(owner: str | None = None, **arrays) -> int:
    """All arrays have the same first dimension; the error lists each name with its length."""
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) > 1:
        where = f" of {owner}" if owner else ""
        desc = ", ".join(f"{k}={n}" for k, n in lengths.items())
        raise InvalidParameterError(
            f"The parameters {', '.join(map(repr, lengths))}{where} must have the same length. Got {desc}."
        )
    return next(iter(lengths.values())) if lengths else 0


def check_is_fitted(estimator: Any, attributes: Sequence[str]) -> None:
    """Raise :class:`NotFittedError` ("call fit first") if any learned attribute is missing."""
    if not all(hasattr(estimator, a) for a in attributes):
        raise NotFittedError(
            f"This {type(estimator).__name__} instance is not fitted yet: call fit first."
        )


def check_labels(name: str, value: Any, *, owner: str | None = None) -> np.ndarray:
    """``value`` (array-like or tensor) as a 1-d numpy array of labels; the error names ``name``."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, without importing torch
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    where = f" of {owner}" if owner else ""
    if arr.ndim != 1:
        raise InvalidParameterError(
            f"The {name!r} parameter{where} must be a 1-d array of labels. Got an array of shape {arr.shape}."
        )
    if arr.dtype.kind in "fc" and not np.isfinite(arr).all():  # a missing label, never a class
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise InvalidParameterError(
            f"The {name!r} parameter{where} must hold a label for every example. Got {arr[bad]!r} at index {bad}."
        )
    return arr


def check_items(
    name: str,
    value: Any,
    item_type: type | tuple[type, ...],
    *,
    what: str,
    noun: str,
    owner: str | None = None,
    min_len: int = 1,
    reusable: bool = False,
) -> list:
    """``value`` as a list of at least ``min_len`` items, each an ``item_type``; the error names ``name``.

    Any iterable but a single ``str``/``bytes`` is accepted; with ``reusable=True`` only a
    :class:`~collections.abc.Sequence` (for a value that is kept and read again, which a one-off
    iterator such as a generator cannot be). ``what`` describes the items in the messages
    (``"strings (a list of str, one per item)"``), ``noun`` counts them (``"texts"``).
    """
    where = f" of {owner}" if owner else ""
    iterable = isinstance(value, Sequence) if reusable else hasattr(value, "__iter__")
    if isinstance(value, (str, bytes)) or not iterable:
        raise InvalidParameterError(
            f"The {name!r} parameter{where} must be a sequence of {what}. Got {type(value).__name__} instead."
        )
    items = list(value)
    if len(items) < min_len:
        if min_len == 1:
            raise InvalidParameterError(f"The {name!r} parameter{where} must not be empty. Got 0 {noun}.")
        raise InvalidParameterError(
            f"The {name!r} parameter{where} must hold at least {min_len} {noun}. Got {len(items)}."
        )
    for i, item in enumerate(items):
        if not isinstance(item, item_type):
            raise InvalidParameterError(
                f"The {name!r} parameter{where} must be a sequence of {what}. "
                f"Got {type(item).__name__} {item!r} at index {i}."
            )
    return items


def check_texts(name: str, value: Any, *, owner: str | None = None, min_len: int = 1) -> list[str]:
    """``value`` as a list of str (one per example or request); the error names ``name``.

    Any iterable but a single ``str``/``bytes`` is accepted; ``min_len=0`` allows an empty list.
    """
    return check_items(name, value, str, what="strings (a list of str, one per item)", noun="texts", owner=owner,
                       min_len=min_len)
