"""One release of grace: renamed keywords and moved names warn, point at the caller, then work."""

import doctest
import warnings

import pytest

from leanscale.core import deprecation
from leanscale.core.deprecation import moved_attributes, renamed_argument
from leanscale.core.errors import InvalidParameterError


def test_doctests():
    assert doctest.testmod(deprecation).failed == 0


def _f(x=1, *, old=None):
    return renamed_argument("_f", "old", "x", old, x, 1)


def test_renamed_argument_warns_at_the_callers_line_and_refuses_both():
    with pytest.warns(FutureWarning, match="'old' parameter was renamed to 'x'") as rec:
        assert _f(old=5) == 5
    assert rec[0].filename == __file__
    with pytest.raises(InvalidParameterError, match="pass only 'x'. Got both old=5 and x=2"):
        _f(2, old=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _f(3) == 3  # the new name: no warning


def test_moved_attributes_returns_the_new_object_and_refuses_unknown_names():
    getattr_ = moved_attributes("old.mod", {"join": "os.path:join"})
    import os.path

    with pytest.warns(FutureWarning, match="old.mod.join moved to os.path.join"):
        assert getattr_("join") is os.path.join
    with pytest.raises(AttributeError, match="'old.mod' has no attribute 'nope'"):
        getattr_("nope")
