"""One training step of a dense model and of its SWAT conversion, measured side by side: per
converted layer the training FLOPs (cost-ledger rules) and the bytes it holds for backward
(saved-tensor hooks), plus whole-model totals. Used by ``leanscale sparse report`` and the tour."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from leanscale.core.errors import InvalidParameterError
from leanscale.core.flops import count_flops
from leanscale.sparse.memory import track_saved_tensors
from leanscale.sparse.swat import swat_layers

__all__ = ["swat_report"]


def _step(model: nn.Module, x: torch.Tensor):
    """FLOPs and saved bytes of one training step on ``x``; parameters and buffers are restored."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    flops = count_flops(model, x)
    with track_saved_tensors(model) as saved:
        out = model(x)
    out.float().pow(2).mean().backward()  # any scalar: the backward pass runs through every layer
    model.zero_grad(set_to_none=True)
    model.load_state_dict(state)
    return flops, saved


def swat_report(dense: nn.Module, swat: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Compare ``dense`` with ``swat`` (the same architecture after :func:`apply_swat`) on batch ``x``.

    Returns a dict with ``layers`` (one row per SWAT layer), ``total`` (whole-model FLOPs and
    saved bytes, dense and SWAT) and ``text`` (a printable table).
    """
    names = [n for n, _ in swat_layers(swat)]
    if not names:
        raise InvalidParameterError("The 'swat' parameter of swat_report has no SWAT layer: call apply_swat first.")
    f_dense, s_dense = _step(dense, x)
    f_swat, s_swat = _step(swat, x)
    modules = dict(swat.named_modules())
    rows = []
    for name in names:
        m = modules[name]
        fd, fs = sum(f_dense.by_module.get(name, (0, 0))), sum(f_swat.by_module.get(name, (0, 0)))
        hd, hs = s_dense.held_by_module.get(name, 0), s_swat.held_by_module.get(name, 0)
        rows.append({
            "layer": name, "kind": type(m).__name__, "weight_shape": tuple(m.weight.shape),
            "weight_sparsity": 1 - m.last_stats["weight_density"],
            "activation_sparsity": (None if m.last_stats["activation_density"] is None
                                    else 1 - m.last_stats["activation_density"]),
            "train_flops_dense": fd, "train_flops_swat": fs, "held_bytes_dense": hd, "held_bytes_swat": hs,
        })
    total = {
        "train_flops_dense": f_dense.total, "train_flops_swat": f_swat.total,
        "saved_bytes_dense": s_dense.total_bytes, "saved_bytes_swat": s_swat.total_bytes,
        "held_bytes_converted_dense": sum(r["held_bytes_dense"] for r in rows),
        "held_bytes_converted_swat": sum(r["held_bytes_swat"] for r in rows),
        "batch": int(x.shape[0]),
    }
    lines = [f"one training step, batch {x.shape[0]}",
             (f"{'layer':<22}{'kind':<12}{'W sparse':>9}{'A sparse':>9}{'MFLOP dense':>13}{'MFLOP SWAT':>12}"
              f"{'kB held dense':>15}{'kB held SWAT':>14}")]
    for r in rows:
        a = "-" if r["activation_sparsity"] is None else f"{r['activation_sparsity']:.0%}"
        lines.append(f"{r['layer']:<22}{r['kind']:<12}{r['weight_sparsity']:>9.0%}{a:>9}"
                     f"{r['train_flops_dense'] / 1e6:>13.2f}{r['train_flops_swat'] / 1e6:>12.2f}"
                     f"{r['held_bytes_dense'] / 1e3:>15.1f}{r['held_bytes_swat'] / 1e3:>14.1f}")

    def pct(a, b):
        return f"{100 * (1 - b / a):.0f}% less" if a else "-"

    lines.append(f"whole model: training FLOPs {total['train_flops_dense'] / 1e6:.1f} -> "
                 f"{total['train_flops_swat'] / 1e6:.1f} M ({pct(total['train_flops_dense'], total['train_flops_swat'])}); "
                 f"saved for backward {total['saved_bytes_dense'] / 1e6:.2f} -> {total['saved_bytes_swat'] / 1e6:.2f} MB "
                 f"({pct(total['saved_bytes_dense'], total['saved_bytes_swat'])}); held by the converted layers "
                 f"{pct(total['held_bytes_converted_dense'], total['held_bytes_converted_swat'])}")
    return {"layers": rows, "total": total, "text": "\n".join(lines)}
