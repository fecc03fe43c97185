import doctest
import importlib
from pathlib import Path

import pytest

from leanscale.core.errors import DataNotFoundError, InvalidParameterError, LeanscaleError
from leanscale.data import paths
from leanscale.data.paths import DATASETS, cache_dir, list_datasets, resolve_path


def _touch_files(folder: Path, info, suffix=""):
    folder.mkdir(parents=True, exist_ok=True)
    for stem in info.files:
        (folder / f"{stem}{suffix}").write_bytes(b"x")


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_registry_entries_are_complete(name):
    info = DATASETS[name]
    assert info.name == name and info.package and info.files and info.default_dirs
    assert name in list_datasets()


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_missing_root_names_data_set_paths_and_install_command(name, tmp_path):
    info = DATASETS[name]
    with pytest.raises(DataNotFoundError) as exc:
        resolve_path(name, tmp_path / "nowhere")
    msg = str(exc.value)
    assert name in msg and info.title in msg
    assert f"sudo apt-get install {info.package}" in msg
    assert str(tmp_path / "nowhere") in msg
    assert "--data-root" in msg
    assert isinstance(exc.value, FileNotFoundError) and isinstance(exc.value, LeanscaleError)


def test_fashion_mnist_missing_message_exact_command(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"sudo apt-get install dataset-fashion-mnist"):
        resolve_path("fashion-mnist", tmp_path)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_user_root_is_used(name, tmp_path):
    info = DATASETS[name]
    _touch_files(tmp_path, info, info.suffixes[0])
    assert resolve_path(name, tmp_path) == tmp_path


def test_user_root_subfolder_layouts(tmp_path):
    info = DATASETS["fashion-mnist"]
    _touch_files(tmp_path / "FashionMNIST" / "raw", info)  # torchvision layout, no .gz
    assert resolve_path("fashion-mnist", tmp_path) == tmp_path / "FashionMNIST" / "raw"
    _touch_files(tmp_path / "wn" / "dict", DATASETS["wordnet"])
    assert resolve_path("wordnet", tmp_path / "wn") == tmp_path / "wn" / "dict"


def test_partial_files_argument(tmp_path):
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"x")
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"x")
    files = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    assert resolve_path("fashion-mnist", tmp_path, files=files) == tmp_path
    with pytest.raises(DataNotFoundError, match="train-images-idx3-ubyte"):
        resolve_path("fashion-mnist", tmp_path)


def test_env_var_overrides_defaults(tmp_path, monkeypatch):
    info = DATASETS["wordnet"]
    _touch_files(tmp_path / "wordnet", info)
    monkeypatch.setenv(paths.DATA_ROOT_ENV, str(tmp_path))
    assert resolve_path("wordnet") == tmp_path / "wordnet"
    # an explicit root wins over the environment variable
    other = tmp_path / "other"
    _touch_files(other, info)
    assert resolve_path("wordnet", other) == other


def test_env_var_path_is_listed_when_missing(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.DATA_ROOT_ENV, str(tmp_path))
    monkeypatch.setattr(paths, "DATASETS", {
        "wordnet": paths.DataSetInfo(**{**DATASETS["wordnet"].__dict__,
                                        "default_dirs": (tmp_path / "system",)})
    })
    with pytest.raises(DataNotFoundError) as exc:
        resolve_path("wordnet")
    msg = str(exc.value)
    for p in (tmp_path / "wordnet", tmp_path, tmp_path / "system"):
        assert str(p) in msg
    assert "LEANSCALE_DATA_ROOT" in msg


@pytest.mark.requires_data("wordnet")
def test_env_var_falls_back_to_system_location(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.DATA_ROOT_ENV, str(tmp_path))
    assert resolve_path("wordnet") == DATASETS["wordnet"].default_dirs[0]


def test_unknown_data_set_lists_valid_names():
    with pytest.raises(InvalidParameterError, match=r"'fashion-mnist'.*Did you mean 'fashion-mnist'"):
        resolve_path("fashion_mnist")


def test_cache_dir_env_and_default(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv(paths.CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "leanscale"


@pytest.mark.parametrize(
    "module",
    ["leanscale.data.paths", "leanscale.data.fashion_mnist", "leanscale.data.wordnet",
     "leanscale.data.text", "leanscale.data._sampling"],
)
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_import_is_lazy():
    import subprocess
    import sys

    code = "import sys, leanscale.data; print('tokenizers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"]  # the optional dependency is imported only when used
