"""Every public name has one home (#14): no name is exported by two packages.

A public name is one in the ``__all__`` of a package ``leanscale.<pkg>/__init__.py``. Two checks:

- **by name**: a name in the ``__all__`` of two packages fails, whether both are the same object
  (a re-export: two import paths for one thing, and two method cards to keep current) or two
  different objects (``from leanscale.a import X`` and ``from leanscale.b import X`` would be
  different things under one name -- rename one of them, e.g. ``PruningConfig``/``ScalingConfig``);
- **by identity**: one function or class exported under two different names by two packages (an
  alias) fails too. Plain values (numbers, strings, tuples) are left out of this check: equal
  constants may be the same interned object without being one thing.

Names that break the rule today are listed in ``KNOWN`` (name -> the packages exporting it): the
test fails on any new one, and on a listed one that is gone, so the list only shrinks.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections import defaultdict

import pytest

PACKAGES = ("core", "data", "models", "report", "train", "large_batch", "pruning", "scaling", "sparse", "cascade",
            "cli")

# name -> the packages exporting it; to be removed by #14
KNOWN: dict[str, set[str]] = {}


def _exports() -> dict[str, dict[str, object]]:
    """package -> {public name: object} for every package that exists."""
    out = {}
    for pkg in PACKAGES:
        if importlib.util.find_spec(f"leanscale.{pkg}") is None:  # e.g. train/ before it is written
            continue
        module = importlib.import_module(f"leanscale.{pkg}")
        names = getattr(module, "__all__", ())
        missing = [n for n in names if not hasattr(module, n)]
        assert not missing, f"leanscale.{pkg}.__all__ lists names it does not define: {missing}"
        out[pkg] = {name: getattr(module, name) for name in names}
    return out


def _same_name(exports) -> dict[str, set[str]]:
    homes = defaultdict(set)
    for pkg, names in exports.items():
        for name in names:
            homes[name].add(pkg)
    return {name: pkgs for name, pkgs in homes.items() if len(pkgs) > 1}


def _same_object(exports) -> dict[str, set[tuple[str, str]]]:
    """Functions/classes exported under two different names by two packages (qualified name -> where)."""
    where = defaultdict(set)
    for pkg, names in exports.items():
        for name, obj in names.items():
            if inspect.isclass(obj) or inspect.isroutine(obj) or inspect.ismodule(obj):
                where[id(obj)].add((pkg, name))
    out = {}
    for places in where.values():
        if len({p for p, _ in places}) > 1 and len({n for _, n in places}) > 1:
            out[" / ".join(sorted(f"{p}.{n}" for p, n in places))] = places
    return out


@pytest.fixture(scope="module")
def exports():
    return _exports()


def test_the_scan_sees_the_packages(exports):
    assert {"large_batch", "pruning", "scaling", "sparse", "cascade", "models"} <= set(exports)
    assert "DataPruner" in exports["pruning"] and "LargeBatchRecipe" in exports["large_batch"]


def test_the_checks_catch_what_they_should():
    class A:
        pass

    class B:
        pass

    fake = {"x": {"A": A, "f": len, "N": 1}, "y": {"A": B, "g": len, "M": 1}}
    assert _same_name(fake) == {"A": {"x", "y"}}  # two different classes under one name: refused too
    assert list(_same_object(fake)) == ["x.f / y.g"]  # an alias; the equal constants are not


def test_no_public_name_is_exported_by_two_packages(exports):
    found = _same_name(exports)
    new = {name: sorted(pkgs) for name, pkgs in found.items() if KNOWN.get(name) != pkgs}
    assert not new, f"exported by more than one package (give each public name one home): {new}"
    gone = sorted(set(KNOWN) - set(found))
    assert not gone, f"fixed: remove these from KNOWN: {gone}"


def test_no_object_is_exported_under_two_names(exports):
    assert _same_object(exports) == {}
