"""Parameter groups with and without weight decay, the usual split of every loop here."""

from __future__ import annotations

from torch import nn

__all__ = ["param_groups"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two optimizer groups: weight decay on parameters of rank >= 2 (linear and conv weights,
    embeddings), none on the rest (biases, norm scales and shifts). Frozen parameters are left
    out; an empty group is dropped.

    Example:
        >>> groups = param_groups(nn.Linear(3, 2), 0.1)
        >>> [(len(g["params"]), g["weight_decay"]) for g in groups]
        [(1, 0.1), (1, 0.0)]
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": other, "weight_decay": 0.0}) if g["params"]]
