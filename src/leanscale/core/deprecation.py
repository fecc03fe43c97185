"""One release of grace for renamed parameters and moved names (FutureWarning, then removal).

- :func:`renamed_argument`: a function or constructor that renamed a keyword accepts the old one
  with a warning, and refuses both at once;
- :func:`moved_attributes`: a module whose names moved elsewhere returns them from its module
  ``__getattr__`` with a warning naming the new home.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["moved_attributes", "renamed_argument"]


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # arrays, tensors: ambiguous truth value -> not the same
        return False


def renamed_argument(owner: str, old: str, new: str, old_value: Any, new_value: Any, default: Any,
                     *, stacklevel: int = 3) -> Any:
    """The value of a renamed argument during its one-release grace period.

    ``old_value`` is what the caller passed under the old name (None when absent). Passing the
    old name warns (``FutureWarning``, pointing ``stacklevel`` frames up: 3 is the caller of the
    function that calls this); passing both names (the new one not at its default) is refused.
    """
    from leanscale.core.errors import InvalidParameterError

    if old_value is None:
        return new_value
    if new_value is not default and not _same(new_value, default):
        raise InvalidParameterError(
            f"The {old!r} parameter of {owner} was renamed to {new!r}; pass only {new!r}. Got both "
            f"{old}={old_value!r} and {new}={new_value!r}."
        )
    warnings.warn(
        f"{owner}: the {old!r} parameter was renamed to {new!r} and will be removed in the next "
        f"release; pass {new}={old_value!r} instead.",
        FutureWarning, stacklevel=stacklevel,
    )
    return old_value


def moved_attributes(module: str, moved: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for names that moved: ``moved`` maps an old name to
    ``"new.module:new_name"``; getting it warns (``FutureWarning``) and returns the new object.

    Example:
        >>> __getattr__ = moved_attributes("old.place", {"sqrt": "math:sqrt"})
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as w:
        ...     warnings.simplefilter("always")
        ...     f = __getattr__("sqrt")
        >>> f(4.0), "moved to math.sqrt" in str(w[0].message)
        (2.0, True)
    """

    def __getattr__(name: str) -> Any:
        if name not in moved:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        target, new = moved[name].split(":")
        warnings.warn(f"{module}.{name} moved to {target}.{new}; the old name will be removed in the next "
                      "release.", FutureWarning, stacklevel=2)
        return getattr(importlib.import_module(target), new)

    return __getattr__
