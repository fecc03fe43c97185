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
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from leanscale.core.errors import InvalidParameterError
from leanscale.core.io import atomic_torch_save
from leanscale.core.surgery import replace_module_classes
from leanscale.core.validation import Interval, check_param

__all__ = ["SparseLinear", "load_pruned", "save_pruned", "to_sparse_kernels", "weight_sparsity"]

# CSR tensors are "beta" in PyTorch and warn on creation; the behaviour we use (creation,
# csr @ dense, to_dense) is stable and tested here.
_CSR_WARNING = "Sparse CSR tensor support is in beta state"


def _to_csr(w: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_CSR_WARNING)
        return w.detach().to_sparse_csr()


def weight_sparsity(module: nn.Module) -> float:
    """Fraction of exact zeros in ``module.weight``."""
    w = module.weight
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
    def from_dense(cls, module: nn.Linear) -> SparseLinear:
        if type(module) is not nn.Linear:
            raise InvalidParameterError(
                f"The 'module' parameter of SparseLinear.from_dense must be a torch.nn.Linear. "
                f"Got {type(module).__name__} instead."
            )
        return cls(_to_csr(module.weight), module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
    """Replace, in place, every ``nn.Linear`` with at least ``min_sparsity`` zeros in its weight
    by a :class:`SparseLinear`. Returns ``model``; layers below the threshold stay dense."""
    owner = "to_sparse_kernels"
    check_param("min_sparsity", min_sparsity, [Interval(float, 0, 1, closed="both")], owner=owner)
    _check_plain(model, owner)

    def policy(module: nn.Module, index: int) -> nn.Module | None:
        return SparseLinear.from_dense(module) if weight_sparsity(module) >= min_sparsity else None

    replace_module_classes(model, {nn.Linear: policy})
    return model


def save_pruned(model: nn.Module, path: str | os.PathLike, min_sparsity: float = 0.5) -> Path:
    """Save ``model.state_dict()`` with every weight of at least ``min_sparsity`` zeros as CSR.

    Returns the path. Load with :func:`load_pruned` into a model of the same architecture.
    """
    owner = "save_pruned"
    check_param("min_sparsity", min_sparsity, [Interval(float, 0, 1, closed="both")], owner=owner)
    _check_plain(model, owner)
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
    return atomic_torch_save({"leanscale_pruned": 1, "state": state}, path)


def _dense_from(entry: dict) -> torch.Tensor:
    shape = entry["shape"]
    rows = shape[0]
    cols = math.prod(shape[1:])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_CSR_WARNING)
        csr = torch.sparse_csr_tensor(entry["crow"].long(), entry["col"].long(), entry["values"], (rows, cols),
                                      check_invariants=True)  # a corrupt file raises instead of crashing
    return csr.to_dense().reshape(shape)


def load_pruned(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a :func:`save_pruned` checkpoint into ``model`` (dense tensors) and return it."""
    blob = torch.load(path, weights_only=False)
    if not (isinstance(blob, dict) and blob.get("leanscale_pruned") == 1):
        raise InvalidParameterError(
            f"The 'path' parameter of load_pruned must be a file written by save_pruned. Got {str(path)!r}, which is not."
        )
    state = {k: (_dense_from(v) if isinstance(v, dict) else v) for k, v in blob["state"].items()}
    model.load_state_dict(state)
    return model
