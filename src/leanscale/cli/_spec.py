"""``package.module:name`` flags (``--model``, ``--objects``): import the object, call a factory.

The user's own code is trusted (it is imported and run: see SECURITY.md); what is checked here is
that the flag names something importable and, for factories, a callable that takes no arguments
-- checked from its signature *before* it is called, so ``os:system`` never runs.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from leanscale.core.errors import InvalidParameterError

__all__ = ["call_without_arguments", "import_object"]


def import_object(spec: str, flag: str, owner: str, kind: str = "object") -> Any:
    """The object ``spec`` (``'package.module:name'``) names; a clear error naming ``flag``
    (``kind``: what the flag wants, "object" or "callable", for the message)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        form = "name" if kind == "object" else kind
        raise InvalidParameterError(
            f"The {flag!r} parameter of {owner} must look like 'package.module:{form}'. Got {spec!r} instead.")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise InvalidParameterError(
            f"The {flag!r} parameter of {owner} must name an importable {kind}. Got {spec!r}: {exc}.") from exc


def call_without_arguments(factory: Any, spec: str, expected: str) -> Any:
    """``factory()``; ``expected`` (the start of the error message, naming the flag) when ``factory``
    is not a callable that takes no arguments (``os:system``, ``json:loads``, a string, ...)."""
    if not callable(factory):
        raise InvalidParameterError(f"{expected} Got {spec!r}, a {type(factory).__name__}.")
    try:
        inspect.signature(factory).bind()
    except TypeError as exc:  # required arguments
        raise InvalidParameterError(f"{expected} Got {spec!r}, which needs arguments: {exc}.") from None
    except ValueError:  # no signature (some builtins): calling it will tell
        pass
    try:
        return factory()
    except TypeError as exc:
        raise InvalidParameterError(f"{expected} Got {spec!r}; calling it with no arguments failed: {exc}.") from None
