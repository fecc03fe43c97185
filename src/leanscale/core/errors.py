"""Exceptions raised by leanscale.

Every error a user can cause derives from :class:`LeanscaleError`; the CLI catches it and prints
its message without a traceback. Each also derives from the matching builtin (``ValueError``,
``FileNotFoundError``, ...) so ``except ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = [
    "LeanscaleError",
    "InvalidParameterError",
    "NotFittedError",
    "DataNotFoundError",
    "DataFormatError",
    "MissingDependencyError",
]


class LeanscaleError(Exception):
    """Base class of the errors leanscale raises on bad input or a missing resource."""


class InvalidParameterError(LeanscaleError, ValueError):
    """A parameter has the wrong type, range or shape. The message names the parameter."""


class NotFittedError(LeanscaleError, AttributeError):
    """An estimator was used before ``fit``."""


class DataNotFoundError(LeanscaleError, FileNotFoundError):
    """A data set is not where it was looked for. The message says how to install it."""


class DataFormatError(LeanscaleError, ValueError):
    """A data file exists but is corrupt, truncated or not in the expected format."""


class MissingDependencyError(LeanscaleError, ImportError):
    """An optional dependency is not installed. The message names the extra to install."""
