"""Shared set-up of the data tests: an isolated cache, and a marker naming the installed data set a
test reads. ``make test`` installs the data first (``make data``), so a missing data set fails the
test with the install instructions; it is never skipped."""

from __future__ import annotations

import functools

import pytest

from leanscale.core.errors import DataNotFoundError
from leanscale.data.paths import CACHE_ENV, DATA_ROOT_ENV, resolve_path


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "requires_data(name): the test reads installed data set `name` (make data installs it)"
    )


@functools.cache
def _installed(name: str) -> bool:
    try:
        resolve_path(name)
    except DataNotFoundError:
        return False
    return True


def pytest_runtest_setup(item):
    for marker in item.iter_markers(name="requires_data"):
        name = marker.args[0]
        if not _installed(name):
            pytest.fail(f"data set {name!r} is not installed; run `make data` (make test does)")


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    """Every test writes its cache to a fresh folder and ignores a user's LEANSCALE_DATA_ROOT."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
