"""Inference after SWAT: sparse kernels where they pay off, and compact checkpoints.

:func:`~leanscale.sparse.swat.export_pruned` turns a SWAT-trained model into plain layers with
zeros. Zeros alone save nothing on a CPU: a dense matrix product multiplies them too. This module
offers the two things that do save:

* :func:`to_sparse_kernels` swaps ``nn.Linear`` layers whose weight is sparse enough for
  :class:`SparseLinear` (CSR weight, ``torch.mm(csr, dense)``). Measured on our 2-core CPU
  (``benchmarks/sparse/inference.py``): CSR beats dense from ~90% sparsity for batches of 128 and
  only from ~95-99% for single examples; at 50-80% it is 1.5-15x *slower*. Hence the default
  ``min_sparsity=0.9``. Convolutions stay dense: PyTorch has no sparse convolution kernel for the
  CPU, so a pruned conv runs at dense speed (the structured SWAT variant, which removes whole
  filters, is the one whose savings a dense kernel can use after slicing).
* :func:`save_pruned` / :func:`load_pruned`: a checkpoint that stores every mostly-zero weight as
  CSR (values + int32 column indices + row pointers: 8 bytes per kept weight), written atomically.
* :func:`save_swat_checkpoint` / :func:`load_swat_checkpoint`: a SWAT model still in training
  form together with the SWAT settings that made it, so an export can rebuild exactly that model
  (and refuse other settings, which would keep other weights).

Both are single torch files (``torch.save`` format, readable with ``torch.load(weights_only=True)``),
written atomically (temporary file + rename). Their marker key is their format version
(``"leanscale_pruned": 1``, ``"leanscale_swat": 1``; :data:`PRUNED_FORMAT_VERSION`,
:data:`SWAT_FORMAT_VERSION`), checked by :func:`leanscale.core.persistence.check_format_version`:
a file of a newer leanscale is refused with "upgrade" instead of misread. (They stay torch files
rather than :mod:`leanscale.core.persistence` folders: users open them with ``torch.load``, and
the CSR records and settings are nested structures a flat arrays file would have to flatten.)

Files are untrusted: every load uses ``torch.load(weights_only=True)`` (:func:`read_torch_file`)
and checks names, shapes and CSR structure before expanding anything.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from leanscale.core.errors import DataFormatError, InvalidParameterError
from leanscale.core.io import atomic_torch_save, read_torch_file
from leanscale.core.persistence import check_format_version
from leanscale.core.surgery import replace_module_classes
from leanscale.core.validation import Interval, check_param

__all__ = [
    "PRUNED_FORMAT_VERSION",
    "SWAT_FORMAT_VERSION",
    "SWAT_SETTINGS",
    "SparseLinear",
    "check_swat_layers",
    "load_pruned",
    "load_swat_checkpoint",
    "read_torch_file",
    "save_pruned",
    "save_swat_checkpoint",
    "swat_layer_settings",
    "to_sparse_kernels",
    "weight_sparsity",
]

# Format versions of the two checkpoints, stored as the value of their marker key. Readers accept
# 1..current and refuse newer ones. (The marker is the version field: a second key would make a new
# file unreadable by load_swat_checkpoint of earlier releases, which checks the key set exactly.)
PRUNED_FORMAT_VERSION = 1
SWAT_FORMAT_VERSION = 1
_PRUNED_KEY = "leanscale_pruned"
_SWAT_KEY = "leanscale_swat"

# CSR tensors are "beta" in PyTorch and warn on creation; the behaviour we use (creation,
# csr @ dense, to_dense) is stable and tested here.
_CSR_WARNING = "Sparse CSR tensor support is in beta state"


def _to_csr(w: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_CSR_WARNING)
        return w.detach().to_sparse_csr()


def weight_sparsity(module: nn.Module) -> float:
    """Fraction of exact zeros in ``module.weight``."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.numel() == 0:
        raise InvalidParameterError(
            f"The 'module' parameter of weight_sparsity must have a non-empty 'weight' tensor. Got "
            f"{type(module).__name__}{' without one' if not isinstance(w, torch.Tensor) else ' with an empty one'}."
        )
    return float((w == 0).sum()) / w.numel()


class SparseLinear(nn.Module):
    """Inference-only ``nn.Linear`` with a CSR weight: ``y = x W^T + b``, input ``(..., in)``.

    The weight is a buffer (no gradient). Build it with :meth:`from_dense`.
    """

    def __init__(self, weight_csr: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight_csr.shape
        self.register_buffer("weight_csr", weight_csr)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_dense(cls, module: nn.Module) -> SparseLinear:
        """From an ``nn.Linear`` or a Hugging Face ``Conv1D`` (whose ``(in, out)`` weight is
        stored transposed, as the ``(out, in)`` CSR matrix)."""
        from leanscale.sparse.swat import _is_hf_conv1d

        if _is_hf_conv1d(module):
            return cls(_to_csr(module.weight.t()), module.bias)  # (in, out) -> (out, in)
        if type(module) is not nn.Linear:
            raise InvalidParameterError(
                f"The 'module' parameter of SparseLinear.from_dense must be a torch.nn.Linear or a "
                f"transformers.pytorch_utils.Conv1D. Got {type(module).__name__} instead."
            )
        return cls(_to_csr(module.weight), module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.in_features \
                or x.dtype != self.weight_csr.dtype:
            got = f"a {x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise InvalidParameterError(
                f"The 'x' parameter of SparseLinear must be a {self.weight_csr.dtype} tensor of shape "
                f"(..., in_features={self.in_features}). Got {got}."
            )
        x2 = x.reshape(-1, self.in_features)  # (N, in)
        y = torch.mm(self.weight_csr, x2.t()).t()  # (out, in) @ (in, N) -> (N, out)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        nnz = self.weight_csr.values().numel()
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"sparsity={1 - nnz / (self.in_features * self.out_features):.3f}")


def _check_plain(model: nn.Module, owner: str) -> None:
    if not isinstance(model, nn.Module):
        raise InvalidParameterError(
            f"The 'model' parameter of {owner} must be an instance of torch.nn.Module. Got {type(model).__name__} instead."
        )
    from leanscale.sparse.swat import swat_layers

    if swat_layers(model):
        raise InvalidParameterError(
            f"The 'model' parameter of {owner} still has SWAT layers: call leanscale.sparse.export_pruned(model) "
            f"first (it hard-prunes them into plain layers)."
        )


def to_sparse_kernels(model: nn.Module, min_sparsity: float = 0.9) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` (and Hugging Face ``Conv1D``, GPT-2's projections)
    with at least ``min_sparsity`` zeros in its weight by a :class:`SparseLinear`. Returns
    ``model``; layers below the threshold stay dense. ``nn.MultiheadAttention`` stays dense: it
    reads its weights directly (a pruned one runs at dense speed)."""
    owner = "to_sparse_kernels"
    check_param("min_sparsity", min_sparsity, [Interval(float, 0, 1, closed="both")], owner=owner)
    _check_plain(model, owner)

    def policy(module: nn.Module, index: int) -> nn.Module | None:
        return SparseLinear.from_dense(module) if weight_sparsity(module) >= min_sparsity else None

    from leanscale.sparse.swat import _is_hf_conv1d

    conv1d = {type(m) for m in model.modules() if _is_hf_conv1d(m)}
    replace_module_classes(model, {nn.Linear: policy, **{cls: policy for cls in conv1d}})
    return model


def save_pruned(model: nn.Module, path: str | os.PathLike, min_sparsity: float = 0.5) -> Path:
    """Save ``model.state_dict()`` with every weight of at least ``min_sparsity`` zeros as CSR.

    Returns the path. Load with :func:`load_pruned` into a model of the same architecture.
    """
    owner = "save_pruned"
    check_param("min_sparsity", min_sparsity, [Interval(float, 0, 1, closed="both")], owner=owner)
    _check_plain(model, owner)
    path = _check_path(path, owner)
    if path.is_dir():
        raise InvalidParameterError(f"The 'path' parameter of {owner} must be a file path. Got the folder {str(path)!r}.")
    state = {}
    for key, t in model.state_dict().items():
        if t.is_floating_point() and t.dim() >= 2 and t.layout == torch.strided and \
                float((t == 0).sum()) / t.numel() >= min_sparsity:
            csr = _to_csr(t.reshape(t.shape[0], -1))  # (rows, cols): conv kernels flattened per filter
            # int32 indices: 8 bytes per kept weight instead of 12 (int64); fine below 2**31 entries
            state[key] = {"values": csr.values(), "col": csr.col_indices().to(torch.int32),
                          "crow": csr.crow_indices().to(torch.int32), "shape": tuple(t.shape)}
        else:
            state[key] = t
    return atomic_torch_save({_PRUNED_KEY: PRUNED_FORMAT_VERSION, "state": state}, path)


def _check_path(path: Any, owner: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidParameterError(
            f"The 'path' parameter of {owner} must be a path (str or os.PathLike). Got {type(path).__name__} instead."
        )
    return Path(path)


def _shape_of(value: Any, key: str, where: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list, torch.Size)) or not 2 <= len(value) <= 8 or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in value):
        raise DataFormatError(
            f"The entry {key!r} of {where} must have a 'shape' of 2 to 8 non-negative ints. Got {value!r}."
        )
    return tuple(value)


def _dense_from(entry: dict, key: str, expected: torch.Tensor, where: str) -> torch.Tensor:
    """The dense tensor of a CSR entry, after checking every field against ``expected`` (the
    model's tensor of that name) -- sizes are checked before anything is allocated."""
    fields = {"values", "col", "crow", "shape"}
    if set(entry) != fields:
        raise DataFormatError(
            f"The entry {key!r} of {where} must be a CSR record with keys {sorted(fields)}. Got keys {sorted(map(str, entry))}."
        )
    shape = _shape_of(entry["shape"], key, where)
    if shape != tuple(expected.shape):
        raise DataFormatError(
            f"The entry {key!r} of {where} must have the model's shape {tuple(expected.shape)}. Got shape {shape}: "
            f"the file was saved from another architecture, or it is damaged."
        )
    values, col, crow = entry["values"], entry["col"], entry["crow"]
    rows, cols = shape[0], math.prod(shape[1:])
    ok = (isinstance(values, torch.Tensor) and values.dim() == 1 and values.is_floating_point()
          and isinstance(col, torch.Tensor) and col.dim() == 1 and col.dtype in (torch.int32, torch.int64)
          and isinstance(crow, torch.Tensor) and crow.dim() == 1 and crow.dtype in (torch.int32, torch.int64)
          and values.layout == col.layout == crow.layout == torch.strided)
    if not ok:
        raise DataFormatError(
            f"The entry {key!r} of {where} must hold 1-d tensors: float 'values', int32/int64 'col' and 'crow'. "
            f"Got {type(values).__name__}, {type(col).__name__}, {type(crow).__name__} of the wrong kind."
        )
    if crow.numel() != rows + 1 or col.numel() != values.numel() or values.numel() > rows * cols:
        raise DataFormatError(
            f"The entry {key!r} of {where} is not a valid CSR matrix of shape ({rows}, {cols}): got {crow.numel()} "
            f"row pointers (expected {rows + 1}), {col.numel()} column indices and {values.numel()} values."
        )
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_CSR_WARNING)
            csr = torch.sparse_csr_tensor(crow.long(), col.long(), values, (rows, cols),
                                          check_invariants=True)  # a corrupt file raises instead of crashing
            return csr.to_dense().reshape(shape)
    except RuntimeError as exc:
        raise DataFormatError(
            f"The entry {key!r} of {where} is not a valid CSR matrix: {str(exc).splitlines()[0][:200]}."
        ) from None


def load_pruned(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a :func:`save_pruned` checkpoint into ``model`` (dense tensors) and return it.

    The file is read with ``torch.load(weights_only=True)``: nothing in it can run code. Every
    entry is checked against ``model`` (names, shapes, CSR structure) before it is expanded.

    Raises:
        InvalidParameterError: ``model`` is not a module, or the file is not a save_pruned file.
        DataNotFoundError: the file does not exist.
        DataFormatError: the file is damaged, crafted, was saved from another architecture, or by
            a newer leanscale (format version above :data:`PRUNED_FORMAT_VERSION`).
    """
    owner = "load_pruned"
    if not isinstance(model, nn.Module):
        raise InvalidParameterError(
            f"The 'model' parameter of {owner} must be an instance of torch.nn.Module. Got {type(model).__name__} instead."
        )
    path = _check_path(path, owner)
    blob = read_torch_file(path, what="pruned checkpoint")
    if not (isinstance(blob, dict) and _PRUNED_KEY in blob):
        raise InvalidParameterError(
            f"The 'path' parameter of {owner} must be a file written by save_pruned. Got {str(path)!r}, which is not."
        )
    check_format_version(blob, what=f"pruned checkpoint {str(path)!r}", current=PRUNED_FORMAT_VERSION, key=_PRUNED_KEY,
                         default=None)
    where = f"the pruned checkpoint {str(path)!r}"
    saved = blob.get("state")
    if not isinstance(saved, dict) or not all(isinstance(k, str) for k in saved):
        raise DataFormatError(f"The pruned checkpoint {str(path)!r} must hold a 'state' dict with str keys. It does not.")
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    if missing or unexpected:
        raise DataFormatError(
            f"The pruned checkpoint {str(path)!r} does not fit the model ({type(model).__name__}): missing "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''}. It was saved from another architecture."
        )
    state = {}
    for key, value in saved.items():
        expected = own[key]
        if isinstance(value, dict):
            state[key] = _dense_from(value, key, expected, where)
        elif isinstance(value, torch.Tensor) and value.layout == torch.strided:
            if tuple(value.shape) != tuple(expected.shape):
                raise DataFormatError(
                    f"The entry {key!r} of {where} must have the model's shape {tuple(expected.shape)}. Got "
                    f"{tuple(value.shape)}: the file was saved from another architecture, or it is damaged."
                )
            state[key] = value
        else:
            raise DataFormatError(
                f"The entry {key!r} of {where} must be a dense tensor or a CSR record. Got {type(value).__name__}."
            )
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # e.g. a dtype that cannot be copied
        raise DataFormatError(f"The pruned checkpoint {str(path)!r} does not load into the model: {exc}") from None
    return model


# ----------------------------------------------------------------------------- SWAT checkpoints

# apply_swat's settings that a SWAT checkpoint records (all but compact_relu, which changes no weight).
SWAT_SETTINGS = ("sparsity", "distribution", "activation_sparsity", "topk_period", "structured",
                 "warmup_steps", "dense_first_layer", "dense_last_layer")
_LAYER_FIELDS = ("sparsity", "activation_sparsity", "topk_period", "structured", "warmup_steps")


def swat_layer_settings(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per SWAT layer of ``model``: its sparsity, activation sparsity, top-K period, structured
    flag and warm-up steps -- what decides the weights :func:`export_pruned` keeps."""
    from leanscale.sparse.swat import swat_layers

    return {name: {f: _plain(getattr(m, f)) for f in _LAYER_FIELDS} for name, m in swat_layers(model)}


def _plain(value: Any) -> Any:
    """numpy / torch scalars as Python ones: a checkpoint must load with weights_only=True."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def _check_plain_data(value: Any, where: str, depth: int = 0) -> None:
    if depth > 20:
        raise InvalidParameterError(f"The {where} is nested too deeply.")
    if value is None or type(value) in (bool, int, float, str):
        return
    if type(value) in (list, tuple):
        for v in value:
            _check_plain_data(v, where, depth + 1)
        return
    if type(value) is dict and all(type(k) is str for k in value):
        for v in value.values():
            _check_plain_data(v, where, depth + 1)
        return
    raise InvalidParameterError(
        f"The {where} must hold only plain data (None, bool, int, float, str, lists and dicts with str keys). "
        f"Got {type(value).__name__}."
    )


def save_swat_checkpoint(model: nn.Module, path: str | os.PathLike, settings: dict[str, Any] | None = None,
                         extra: dict[str, Any] | None = None) -> Path:
    """Save a SWAT model still in training form, with the settings that made it, atomically.

    ``leanscale sparse export`` (or your code, via :func:`load_swat_checkpoint`) rebuilds the
    same SWAT model from them; exporting with other settings would keep other weights and
    silently break the model. ``settings`` are :func:`~leanscale.sparse.apply_swat`'s arguments
    (see :data:`SWAT_SETTINGS`); every SWAT layer's own settings are recorded from ``model``.
    ``extra`` is plain data (numbers, strings, lists, dicts) stored alongside.
    """
    owner = "save_swat_checkpoint"
    if not isinstance(model, nn.Module):
        raise InvalidParameterError(
            f"The 'model' parameter of {owner} must be an instance of torch.nn.Module. Got {type(model).__name__} instead."
        )
    layers = swat_layer_settings(model)
    if not layers:
        raise InvalidParameterError(f"The 'model' parameter of {owner} has no SWAT layer: call apply_swat first.")
    path = _check_path(path, owner)
    check_param("settings", settings, [None, dict], owner=owner)
    settings = _check_settings({k: _plain(v) for k, v in (settings or {}).items()}, owner, "'settings' parameter",
                               InvalidParameterError)
    check_param("extra", extra, [None, dict], owner=owner)
    _check_plain_data(extra, f"'extra' parameter of {owner}")
    root = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    blob = {_SWAT_KEY: SWAT_FORMAT_VERSION, "settings": settings, "layers": layers, "extra": dict(extra or {}),
            "state_dict": root.state_dict()}
    return atomic_torch_save(blob, path)


def _check_settings(settings: Any, owner: str, where: str, error: type) -> dict[str, Any]:
    from leanscale.sparse.swat import _APPLY_CONSTRAINTS

    if not isinstance(settings, dict):
        raise error(f"The {where} of {owner} must be a dict of apply_swat settings. Got {type(settings).__name__}.")
    unknown = sorted(set(map(str, settings)) - set(SWAT_SETTINGS))
    if unknown:
        raise error(f"The {where} of {owner} must hold only {', '.join(SWAT_SETTINGS)}. Got {unknown}.")
    for key, value in settings.items():
        try:
            check_param(key, value, _APPLY_CONSTRAINTS[key], owner=owner)
        except InvalidParameterError as exc:
            raise error(f"The {where} of {owner} has a bad {key!r}: {exc}") from None
    return settings


def load_swat_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a SWAT checkpoint: ``{"state_dict", "settings", "layers", "extra"}``.

    A file from :func:`save_swat_checkpoint` gives its recorded settings; a plain ``state_dict``
    (``torch.save(model.state_dict())``) gives ``settings``, ``layers`` and ``extra`` None: its
    SWAT settings are unknown and cannot be checked. Read with ``weights_only=True``.

    Raises:
        DataNotFoundError / DataFormatError: the file is missing, damaged, crafted, its recorded
            settings are malformed, or it was written by a newer leanscale (format version above
            :data:`SWAT_FORMAT_VERSION`); the message names the file.
    """
    from leanscale.sparse.swat import _LAYER_CONSTRAINTS

    owner = "load_swat_checkpoint"
    path = _check_path(path, owner)
    blob = read_torch_file(path, what="SWAT checkpoint")
    where = f"SWAT checkpoint {str(path)!r}"
    if not isinstance(blob, dict):
        raise DataFormatError(f"The {where} must hold a state_dict (a dict of tensors). Got a {type(blob).__name__}.")
    if _SWAT_KEY not in blob or not all(isinstance(k, str) for k in blob):
        if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in blob.items()):
            raise DataFormatError(
                f"The {where} must hold a state_dict (str keys, tensor values) or a file written by "
                f"save_swat_checkpoint. Got other content."
            )
        if not blob:
            raise DataFormatError(f"The {where} holds an empty state_dict: there is nothing to export.")
        return {"state_dict": blob, "settings": None, "layers": None, "extra": None}
    version = check_format_version(blob, what=where, current=SWAT_FORMAT_VERSION, key=_SWAT_KEY, default=None)
    if set(blob) != {_SWAT_KEY, "settings", "layers", "extra", "state_dict"}:
        raise DataFormatError(
            f"The {where} must be a version-{version} file of save_swat_checkpoint with keys extra, layers, "
            f"leanscale_swat, settings, state_dict. Got keys {sorted(map(str, blob))}."
        )
    state = blob["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                           for k, v in state.items()):
        raise DataFormatError(f"The {where} must hold a non-empty 'state_dict' of str keys and tensors. It does not.")
    settings = _check_settings(blob["settings"], owner, f"'settings' recorded in the {where}", DataFormatError)
    layers = blob["layers"]
    if not isinstance(layers, dict) or not layers:
        raise DataFormatError(f"The {where} must record its SWAT 'layers' (a non-empty dict). Got {layers!r:.80}.")
    for name, cfg in layers.items():
        if not isinstance(name, str) or not isinstance(cfg, dict) or set(cfg) != set(_LAYER_FIELDS):
            raise DataFormatError(
                f"The {where} must record, per SWAT layer, a dict with keys {', '.join(_LAYER_FIELDS)}. "
                f"Got {name!r}: {cfg!r:.120}."
            )
        for key, value in cfg.items():
            try:
                check_param(key, value, _LAYER_CONSTRAINTS[key], owner=owner)
            except InvalidParameterError:
                raise DataFormatError(f"The {where} records a bad {key!r} for layer {name!r}: {value!r:.80}.") from None
    extra = blob["extra"]
    if not isinstance(extra, dict):
        raise DataFormatError(f"The {where} must hold an 'extra' dict. Got {type(extra).__name__}.")
    return {"state_dict": state, "settings": settings, "layers": layers, "extra": extra}


def check_swat_layers(model: nn.Module, recorded: dict[str, dict[str, Any]], *, source: str) -> None:
    """Raise :class:`InvalidParameterError` unless ``model``'s SWAT layers are exactly the
    ``recorded`` ones with the same settings (``source`` names the file in the message)."""
    now = swat_layer_settings(model)
    if set(now) != set(recorded):
        extra_now, extra_rec = sorted(set(now) - set(recorded)), sorted(set(recorded) - set(now))
        raise InvalidParameterError(
            f"The SWAT layers of the model do not match the training run recorded in {source}: converted now "
            f"but dense in training {extra_now[:5]}, converted in training but not now {extra_rec[:5]} "
            f"(check --sparse-first-layer / dense_first_layer and the model)."
        )
    for name, cfg in recorded.items():
        for key in ("sparsity", "structured", "warmup_steps"):  # what decides the exported weights
            a, b = now[name][key], cfg[key]
            if (abs(a - b) > 1e-9) if isinstance(a, float) else (a != b):
                raise InvalidParameterError(
                    f"The SWAT settings do not match the training run recorded in {source}: layer {name!r} has "
                    f"{key}={a!r} now but {key}={b!r} in training. Exporting with other settings keeps other "
                    f"weights and breaks the model."
                )
