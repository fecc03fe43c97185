"""``package.module:name`` flags (``--model``, ``--objects``): import the object, call a factory.

Two forms: ``package.module:name`` (imported with the current folder importable, as ``python`` run
from there would: no ``PYTHONPATH=.`` needed) and ``path/to/file.py:name`` (the file is loaded by
its path; its folder becomes importable so it can import its neighbours).
:func:`build_model` calls a factory and checks that it returned a ``torch.nn.Module``.

The user's own code is trusted (it is imported and run: see SECURITY.md); what is checked here is
that the flag names something importable and, for factories, a callable that takes no arguments
-- checked from its signature *before* it is called, so ``os:system`` never runs.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path
from typing import Any

from leanscale.core.errors import InvalidParameterError

__all__ = ["build_model", "call_without_arguments", "import_object"]


def _is_file_spec(module_part: str) -> bool:
    return module_part.endswith(".py") or "/" in module_part or os.sep in module_part


def _load_file(path_text: str, spec: str, flag: str, owner: str, kind: str):
    path = Path(path_text).expanduser()
    if not path.is_file():
        what = "a folder" if path.is_dir() else "no such file"
        raise InvalidParameterError(
            f"The {flag!r} parameter of {owner} must name an existing Python file in 'path/to/file.py:{kind}'. "
            f"Got {spec!r}: {path_text!r} is {what}.")
    resolved = path.resolve()
    # one module per file (a name of its own: two `model.py` files in two folders do not collide); loaded
    # afresh each time, so an edited file is seen
    name = f"_leanscale_user_{resolved.stem}_{hashlib.sha1(str(resolved).encode()).hexdigest()[:10]}"
    module_spec = importlib.util.spec_from_file_location(name, resolved)
    if module_spec is None or module_spec.loader is None:
        raise InvalidParameterError(f"The {flag!r} parameter of {owner} must name a Python file. Got {spec!r}.")
    module = importlib.util.module_from_spec(module_spec)
    folder = str(resolved.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)  # the file imports its neighbours as `python file.py` would
    sys.modules[name] = module  # dataclasses, typing and torch look the module up by name
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as exc:
        sys.modules.pop(name, None)
        raise InvalidParameterError(
            f"The {flag!r} parameter of {owner} names {str(path)!r}, which is not valid Python: {exc}.") from None
    except ImportError as exc:
        sys.modules.pop(name, None)
        raise InvalidParameterError(
            f"The {flag!r} parameter of {owner} names {str(path)!r}, whose imports failed: {exc}.") from exc
    return module


def import_object(spec: str, flag: str, owner: str, kind: str = "object") -> Any:
    """The object ``spec`` (``'package.module:name'`` or ``'path/to/file.py:name'``) names; a clear
    error naming ``flag`` (``kind``: what the flag wants, "object" or "callable", for the message).

    The current folder is importable (it is put first on ``sys.path`` if it is not there)."""
    form = "name" if kind == "object" else kind
    if not isinstance(spec, str):
        raise InvalidParameterError(
            f"The {flag!r} parameter of {owner} must look like 'package.module:{form}' or 'path/to/file.py:{form}'. "
            f"Got {type(spec).__name__} instead.")
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr or not attr.replace("_", "a").replace(".", "a").isalnum():
        raise InvalidParameterError(
            f"The {flag!r} parameter of {owner} must look like 'package.module:{form}' or 'path/to/file.py:{form}'. "
            f"Got {spec!r} instead.")
    if _is_file_spec(module_name):
        module = _load_file(module_name, spec, flag, owner, form)
    else:
        cwd = os.getcwd()
        if cwd not in sys.path and "" not in sys.path:
            sys.path.insert(0, cwd)  # `leanscale` run from the module's folder finds it, as `python -m` would
        importlib.invalidate_caches()
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise InvalidParameterError(
                f"The {flag!r} parameter of {owner} must name an importable {kind}. Got {spec!r}: {exc} (looked in "
                f"the current folder {cwd!r} and the installed packages; a file can be named by its path, "
                f"'path/to/file.py:{form}').") from exc
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj
    except AttributeError as exc:
        raise InvalidParameterError(
            f"The {flag!r} parameter of {owner} must name an importable {kind}. Got {spec!r}: {exc}.") from exc


def build_model(spec: str, flag: str, owner: str) -> Any:
    """Call the factory ``spec`` names with no arguments; it must return a ``torch.nn.Module``."""
    from torch import nn

    factory = import_object(spec, flag, owner, kind="callable")
    expected = (f"The {flag!r} parameter of {owner} must name a callable that takes no arguments and returns a "
                f"torch.nn.Module.")
    model = call_without_arguments(factory, spec, expected)
    if not isinstance(model, nn.Module):
        raise InvalidParameterError(
            f"The {flag!r} parameter of {owner} must return a torch.nn.Module. Got {type(model).__name__} from {spec!r}.")
    return model


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


# ------------------------------------------------------------------------------ --data (one helper)

DATA_HELP = ("a built-in data set ({builtins}), or your own: .npz (x, y), .csv / .tsv / .jsonl / .parquet (a label "
             "column and feature columns, or --text-column), an image folder (one sub-folder per class) or a Hugging "
             "Face datasets folder (save_to_disk)")


def add_data_arguments(parser, *, builtins: tuple[str, ...], default: str | None, text: bool = False,
                       images: bool = True) -> None:
    """``--data`` and the column flags of :func:`leanscale.data.load_dataset` (the same for every command)."""
    parser.add_argument("--data", default=default, metavar="NAME|PATH",
                        help=DATA_HELP.format(builtins=", ".join(builtins)) + (f" ({default})" if default else ""))
    parser.add_argument("--label-column", default=None,
                        help="label column (tables; default 'label') or array (.npz; default 'y'); strings allowed")
    parser.add_argument("--feature-columns", default=None, metavar="A,B,...",
                        help="feature columns of a table (default: every column but the label), or the input "
                        "array of an .npz (default 'x')")
    if text:
        parser.add_argument("--text-column", default=None,
                            help="text column of a table: the texts are embedded with MiniLM (needs [encoders])")
    if images:
        parser.add_argument("--image-size", default=None, metavar="N|H,W",
                            help="resize the images of an image folder to this (default: they must all have one size)")


def is_builtin_data(value: str, builtins: tuple[str, ...]) -> bool:
    return isinstance(value, str) and value.lower() in builtins


def load_user_data(args, owner: str, builtins: tuple[str, ...], *, text_column: str | None = None):
    """``args.data`` (a path, not a built-in name) through :func:`leanscale.data.load_dataset`."""
    from leanscale.data import load_dataset

    value = args.data
    path = Path(str(value)).expanduser()
    if not path.exists():
        raise InvalidParameterError(
            f"The '--data' parameter of {owner} must be one of {', '.join(map(repr, builtins))} or an existing file "
            f"or folder. Got {value!r}: no such file or folder.")
    features = getattr(args, "feature_columns", None)
    x = None
    if features:
        names = [c.strip() for c in str(features).split(",") if c.strip()]
        x = names[0] if path.suffix.lower() == ".npz" and len(names) == 1 else names
    size = getattr(args, "image_size", None)
    if size is not None:
        try:
            parts = [int(t) for t in str(size).split(",")]
            size = parts[0] if len(parts) == 1 else tuple(parts)
        except ValueError:
            raise InvalidParameterError(
                f"The '--image-size' parameter of {owner} must be N or H,W (integers). Got {size!r}.") from None
    text = text_column if text_column is not None else getattr(args, "text_column", None)
    try:
        return load_dataset(path, x=x, y=getattr(args, "label_column", None), text=text, image_size=size)
    except InvalidParameterError as exc:  # the API's parameter names -> this command's flags
        message = str(exc)
        for param, flag in _DATA_FLAGS.items():
            head = f"The {param!r} parameter of load_dataset"
            if message.startswith(head):
                raise InvalidParameterError(f"The {flag!r} parameter of {owner}{message[len(head):]}") from None
        raise


_DATA_FLAGS = {"path": "--data", "x": "--feature-columns", "y": "--label-column", "text": "--text-column",
               "image_size": "--image-size"}


def stratified_subset(y, n: int | None, seed: int = 0):
    """Row indices of a stratified subset of ``n`` rows (all rows when ``n`` is None or too large)."""
    import numpy as np

    from leanscale.data._sampling import stratified_indices

    total = len(y)
    if n is None or n >= total:
        return np.arange(total, dtype=np.int64)
    return np.sort(stratified_indices(np.asarray(y), n, seed)).astype(np.int64)
