"""Benchmark results ship with the package: where they are found (leanscale.core.registry.results_root)
and a real wheel, built and installed into a temporary folder, that shows the checkout's headlines.

The wheel is built from a copy of the files the build needs, in a temporary folder, so the checkout
gets no build/ or *.egg-info from this test.
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from leanscale.core import registry
from leanscale.core.errors import InvalidParameterError

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# what `pip wheel .` reads: metadata, the build hook, the package and the results it ships
BUILD_INPUTS = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "src", "benchmarks/results")
_JUNK = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "_results")


# ------------------------------------------------------------------ finding the results


def test_a_checkout_reads_benchmarks_results():
    assert not (ROOT / "src" / "leanscale" / "_results").exists(), "a build wrote into the checkout"
    assert registry.results_root() == RESULTS
    assert registry.results_dir("pruning") == RESULTS / "pruning"
    assert registry.get_technique("sparse").results == RESULTS / "sparse"


def test_the_shipped_copy_wins_when_the_package_has_one(tmp_path, monkeypatch):
    shipped = tmp_path / "leanscale" / "_results"
    (shipped / "scaling").mkdir(parents=True)
    monkeypatch.setattr(registry, "_SHIPPED_RESULTS", shipped)
    assert registry.results_root() == shipped
    assert registry.results_dir("moe") == shipped / "moe"  # any benchmark folder, not only techniques
    assert registry.get_technique("scaling").results == shipped / "scaling"


def test_without_any_results_the_missing_shipped_folder_is_returned(tmp_path, monkeypatch):
    missing = tmp_path / "leanscale" / "_results"
    monkeypatch.setattr(registry, "_SHIPPED_RESULTS", missing)
    monkeypatch.setattr(registry, "_CHECKOUT_RESULTS", tmp_path / "no-checkout" / "benchmarks" / "results")
    assert registry.results_root() == missing and not missing.exists()


def test_a_folder_beside_an_installed_package_is_not_taken_for_a_checkout(tmp_path, monkeypatch):
    # site-packages/leanscale -> site-packages/../benchmarks/results must not be read: no src/, no pyproject
    site = tmp_path / "lib" / "site-packages" / "leanscale"
    site.mkdir(parents=True)
    (tmp_path / "lib" / "benchmarks" / "results").mkdir(parents=True)
    monkeypatch.setattr(registry, "_PACKAGE", site)
    monkeypatch.setattr(registry, "_SHIPPED_RESULTS", site / "_results")
    monkeypatch.setattr(registry, "_CHECKOUT", site.parent.parent)
    monkeypatch.setattr(registry, "_CHECKOUT_RESULTS", site.parent.parent / "benchmarks" / "results")
    assert registry.results_root() == site / "_results"


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../pruning", "a\\b", None, 3])
def test_results_dir_wants_one_folder_name(name):
    with pytest.raises(InvalidParameterError, match="The 'name' parameter of results_dir must be one folder name"):
        registry.results_dir(name)


# ------------------------------------------------------------------ a real wheel


def _expected_shipped() -> set[str]:
    return {f"leanscale/_results/{p.relative_to(RESULTS).as_posix()}"
            for p in RESULTS.glob("*/*") if p.is_file() and p.suffix in (".json", ".csv")}


def _copy_build_inputs(tree: Path, inputs) -> Path:
    """Copy ``inputs`` (paths relative to the checkout) to ``tree``: the build runs there, not here."""
    for rel in inputs:
        src = ROOT / rel
        if src.is_dir():
            shutil.copytree(src, tree / rel, ignore=_JUNK)
        else:
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, tree / rel)
    return tree


def _run(cmd, cwd, env=None):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, f"{cmd[:5]} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """Build a wheel from a copy of the checkout and ``pip install --target`` it; yields (wheel, site)."""
    tmp = tmp_path_factory.mktemp("wheel")
    tree = _copy_build_inputs(tmp / "tree", BUILD_INPUTS)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1", "PIP_NO_CACHE_DIR": "1"}
    env.pop("PYTHONPATH", None)
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist")], tree, env)
    [wheel] = (tmp / "dist").glob("leanscale-*.whl")
    site = tmp / "site"
    _run([*pip, "install", "--no-deps", "--no-compile", "-q", "--target", str(site), str(wheel)], tmp, env)
    return wheel, site


def test_the_wheel_ships_the_summaries_and_nothing_bigger(installed):
    wheel, _ = installed
    with zipfile.ZipFile(wheel) as zf:
        shipped = {n for n in zf.namelist() if n.startswith("leanscale/_results/")}
        size = sum(zf.getinfo(n).file_size for n in shipped)
    assert shipped == _expected_shipped()
    assert "leanscale/_results/pruning/fraction_kept_fashion-mnist-mlp.json" in shipped
    assert "leanscale/_results/moe/equal_compute.json" in shipped  # the sparse chapter reads it
    assert size < 2_000_000, f"{size / 1e6:.1f} MB of results in the wheel"


def test_installed_wheel_shows_the_checkouts_headlines(installed, tmp_path):
    _, site = installed
    elsewhere = tmp_path / "elsewhere"  # not the checkout: nothing relative to it can be found
    elsewhere.mkdir()
    report = tmp_path / "where.json"
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(site)!r})\n"
        "import leanscale\n"
        "from leanscale.cli.main import main\n"
        "from leanscale.core.registry import list_techniques, results_root\n"
        "rc = main(['ls', '--markdown'])\n"
        f"open({str(report)!r}, 'w').write(json.dumps({{'rc': rc, 'file': leanscale.__file__, "
        "'root': str(results_root()), 'results': {t.name: str(t.results) for t in list_techniques()}}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = _run([sys.executable, "-c", code], elsewhere, env)
    where = json.loads(report.read_text())
    assert where["rc"] == 0
    assert Path(where["file"]).resolve().is_relative_to(site.resolve()), where["file"]
    assert Path(where["root"]) == site / "leanscale" / "_results"
    for t in registry.list_techniques("available"):
        assert Path(where["results"][t.name]).is_relative_to(site), t.name

    assert "benchmarks not run yet" not in out.stdout
    assert out.stdout.strip() == registry.markdown_table().strip()  # the same headline numbers, to the digit
    for t in registry.list_techniques("available"):
        row = next(line for line in out.stdout.splitlines() if line.startswith(f"| `{t.name}`"))
        headline = row.rstrip(" |").rsplit("|", 1)[1].strip()
        assert headline and headline != "—" and any(c.isdigit() for c in headline), (t.name, headline)


def test_a_build_without_results_fails_loudly(tmp_path):
    """A wheel without results would say 'benchmarks not run yet' everywhere: the build refuses."""
    tree = _copy_build_inputs(tmp_path / "tree", [r for r in BUILD_INPUTS if r != "benchmarks/results"])
    code = f"from setuptools import build_meta as b; b.build_wheel({str(tmp_path / 'dist')!r})"
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True, timeout=240)
    assert out.returncode != 0
    assert "no benchmark summaries" in out.stderr + out.stdout
    assert not list(tmp_path.rglob("*.whl"))
