"""Bytes that autograd keeps for the backward pass, measured with saved-tensor hooks.

Every tensor an operation saves for backward passes through
``torch.autograd.graph.saved_tensors_hooks``; :func:`track_saved_tensors` counts their storage
bytes, once per storage (a ReLU output that the next layer also saves is counted once, as it is
held once), and leaves out the model's parameters and buffers (they are resident anyway: saving
them costs nothing). Each byte is attributed to the innermost module running when it was saved.

This is what SWAT's compact activations save, measured rather than estimated::

    with track_saved_tensors(model) as saved:
        loss = F.cross_entropy(model(x), y)
    saved.total_bytes, saved.by_module["features.3"]
    loss.backward()
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from leanscale.core.errors import InvalidParameterError

__all__ = ["SavedTensors", "track_saved_tensors"]


@dataclass
class SavedTensors:
    """What :func:`track_saved_tensors` measured.

    Attributes:
        total_bytes: Bytes of the distinct storages saved for backward (parameters excluded).
        by_module: Qualified module name -> bytes first saved while that module ran (``""``: the
            root, or code outside any module).
        held_by_module: Qualified module name -> bytes of the distinct storages that module
            saved, whoever saved them first (a ReLU output that the next layer also saves counts
            for both): what each layer holds for its own backward.
        n_tensors: Saved tensors seen (shared storages counted each time here).
        savers: Storage -> ``(module, made_by)`` of each save of it: the module running and the
            autograd node that produced the saved tensor (``"ReluBackward0"``; ``"leaf"`` for
            a tensor without one). Read it with :meth:`savers_of`.
    """

    total_bytes: int = 0
    by_module: dict[str, int] = field(default_factory=dict)
    held_by_module: dict[str, int] = field(default_factory=dict)
    n_tensors: int = 0
    savers: dict[tuple[str, int], list[tuple[str, str]]] = field(default_factory=dict, repr=False)

    def savers_of(self, t: torch.Tensor) -> list[tuple[str, str]]:
        """``(module, made_by)`` of every save, inside the block, of a tensor sharing ``t``'s
        storage (``[]``: nothing holds it densely for backward). Ask while ``t`` is alive: a
        freed storage's address can be reused."""
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            return []
        return list(self.savers.get(_storage_key(t), []))

    def bytes_of(self, prefixes: list[str] | tuple[str, ...]) -> int:
        """Bytes attributed to the named modules and their submodules."""
        return sum(b for name, b in self.by_module.items()
                   if any(name == p or name.startswith(p + ".") for p in prefixes))


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


@contextlib.contextmanager
def track_saved_tensors(model: nn.Module) -> Iterator[SavedTensors]:
    """Count the bytes saved for backward by the forward passes run inside the block.

    Args:
        model: The model whose parameters and buffers are excluded and whose modules the bytes
            are attributed to (a DDP wrapper is looked through).

    Example:
        >>> lin = nn.Linear(100, 10)
        >>> with track_saved_tensors(lin) as saved:
        ...     _ = lin(torch.randn(8, 100))
        >>> saved.total_bytes  # the input, 8 x 100 float32; the weight is a parameter
        3200
    """
    if not isinstance(model, nn.Module):
        raise InvalidParameterError(
            f"The 'model' parameter of track_saved_tensors must be an instance of torch.nn.Module. "
            f"Got {type(model).__name__} instead."
        )
    root = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    resident = {_storage_key(t) for t in list(root.parameters()) + list(root.buffers())}
    seen: set[tuple[str, int]] = set()
    held: set[tuple[str, tuple[str, int]]] = set()
    result = SavedTensors()
    stack: list[str] = [""]
    handles = []

    def pack(t: torch.Tensor):
        result.n_tensors += 1
        if t.layout == torch.strided:  # sparse/other layouts: count their values as plain tensors
            key, name = _storage_key(t), stack[-1]
            if key not in resident:
                nbytes = t.untyped_storage().nbytes()
                if key not in seen:
                    seen.add(key)
                    result.total_bytes += nbytes
                    result.by_module[name] = result.by_module.get(name, 0) + nbytes
                made_by = type(t.grad_fn).__name__ if t.grad_fn is not None else "leaf"
                result.savers.setdefault(key, []).append((name, made_by))
                if (name, key) not in held:
                    held.add((name, key))
                    result.held_by_module[name] = result.held_by_module.get(name, 0) + nbytes
        return t

    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def pre_hook(name: str):
        def hook(module, args):
            stack.append(name)
        return hook

    def post_hook(module, args, output):
        stack.pop()

    try:
        for name, module in root.named_modules():
            if name:
                handles.append(module.register_forward_pre_hook(pre_hook(name)))
                handles.append(module.register_forward_hook(post_hook))
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield result
    finally:
        for h in handles:
            h.remove()
