"""One base for leanscale's estimators: scikit-learn's parameter contract, written once.

A subclass stores every ``__init__`` argument unchanged under the same name (no validation in
``__init__``: scikit-learn's rule, so ``clone``/``set_params`` work) and declares what each one
may be in ``_parameter_constraints``; ``fit`` (or whatever starts the work) calls
:meth:`Estimator._validate_params` first. Then

- :meth:`get_params` / :meth:`set_params` come from the ``__init__`` signature (an unknown name
  in ``set_params`` is refused with the valid ones listed and the closest one suggested);
- ``repr`` shows the parameters that differ from their defaults, as scikit-learn does;
- renamed parameters keep working for one release: ``_renamed = {"old": "new"}`` makes
  ``set_params(old=...)`` set ``new`` with a ``FutureWarning`` (the constructor takes the old
  name through :func:`leanscale.core.deprecation.renamed_argument`).

Example:
    >>> class Scaler(Estimator):
    ...     _parameter_constraints = {"factor": [Interval(float, 0, None, closed="neither")]}
    ...     def __init__(self, factor: float = 1.0, seed: int = 0):
    ...         self.factor = factor
    ...         self.seed = seed
    >>> Scaler(factor=2.0)
    Scaler(factor=2.0)
    >>> Scaler().set_params(seed=3).get_params()
    {'factor': 1.0, 'seed': 3}
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, ClassVar

from leanscale.core.validation import check_param, unknown_name_error

__all__ = ["Estimator"]

class Estimator:
    """Signature-derived ``get_params``/``set_params``/``repr`` and ``_validate_params``."""

    #: parameter name -> list of constraints (types, :class:`Interval`, :class:`Options`, None, callable)
    _parameter_constraints: ClassVar[dict[str, list]] = {}
    #: old parameter name -> new name (accepted by ``set_params`` with a FutureWarning)
    _renamed: ClassVar[dict[str, str]] = {}

    @classmethod
    def _get_param_names(cls) -> list[str]:
        """The ``__init__`` parameters, in order (``self``, ``*args``, ``**kwargs`` and the
        renamed old names left out)."""
        sig = inspect.signature(cls.__init__)
        return [p.name for p in sig.parameters.values()
                if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                and p.name not in cls._renamed]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor parameters (``deep`` is accepted for scikit-learn compatibility)."""
        return {name: getattr(self, name) for name in self._get_param_names()}

    def set_params(self, **params: Any):
        """Set constructor parameters and return ``self``; an unknown name lists the valid ones."""
        from leanscale.core.errors import InvalidParameterError

        valid = self._get_param_names()
        owner = f"{type(self).__name__}.set_params"
        for old, new in self._renamed.items():
            if old in params and new in params:
                raise InvalidParameterError(
                    f"The {old!r} parameter of {owner} was renamed to {new!r}; pass only {new!r}. Got both "
                    f"{old}={params[old]!r} and {new}={params[new]!r}."
                )
        for key in params:  # all or nothing: an unknown name changes no parameter
            if self._renamed.get(key, key) not in valid:
                raise unknown_name_error("parameter", key, valid, owner=owner)
        for key, value in params.items():
            if key in self._renamed:
                new = self._renamed[key]
                warnings.warn(
                    f"{type(self).__name__}: the {key!r} parameter was renamed to {new!r} and will be "
                    f"removed in the next release.", FutureWarning, stacklevel=2,
                )
                key = new
            if key not in valid:
                raise unknown_name_error("parameter", key, valid, owner=owner)
            setattr(self, key, value)
        return self

    def _validate_params(self) -> None:
        """Check every parameter with a declared constraint (error names the parameter and class)."""
        owner = type(self).__name__
        for name, constraints in self._parameter_constraints.items():
            check_param(name, getattr(self, name), constraints, owner=owner)

    def __repr__(self) -> str:
        sig = inspect.signature(type(self).__init__)
        changed = []
        for name, value in self.get_params().items():
            default = sig.parameters[name].default
            same = value is default or (
                type(value) is type(default) and _safe_equal(value, default))
            if not same:
                changed.append(f"{name}={value!r}")
        return f"{type(self).__name__}({', '.join(changed)})"


def _safe_equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # arrays, tensors: ambiguous truth value -> treat as changed
        return False

