"""One training step of a dense model and of its SWAT conversion, measured side by side: per
converted layer the training FLOPs (cost-ledger rules) and the bytes it holds for backward
(saved-tensor hooks), plus whole-model totals. Used by ``leanscale sparse report`` and the tour.

:func:`swat_conversion_report` says what :func:`~leanscale.sparse.apply_swat` converted, what it
left dense and why, and (given an input) which converted layers' inputs something else still
holds densely for backward, so that their compact storage saves nothing."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from leanscale.core.errors import InvalidParameterError
from leanscale.core.flops import track_flops
from leanscale.sparse.memory import track_saved_tensors
from leanscale.sparse.swat import _RECORD, SWATMultiheadAttention, swat_layers
from leanscale.sparse.swat_structured import StructuredSWATConv2d, StructuredSWATLinear

__all__ = ["swat_conversion_report", "swat_report"]


def _first_tensor(out: Any) -> torch.Tensor:
    """The model's main output: the tensor itself, or the first tensor of a tuple, list, dict or
    Hugging Face ``ModelOutput`` (logits, last hidden state)."""
    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()
    for v in values:
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.requires_grad:
            return v
    raise InvalidParameterError(
        f"The model given to swat_report must return a tensor (or a tuple / dict / ModelOutput holding one that "
        f"needs a gradient). Got {type(out).__name__}.")


def _step(model: nn.Module, x: torch.Tensor):
    """FLOPs and saved bytes of one training step on ``x``; parameters and buffers are restored."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    with track_flops(model, warn=False) as flops, torch.enable_grad(), track_saved_tensors(model) as saved:
        out = _first_tensor(model(x))
    out.float().pow(2).mean().backward()  # any scalar: the backward pass runs through every layer
    model.zero_grad(set_to_none=True)
    model.load_state_dict(state)
    return flops, saved


def swat_report(dense: nn.Module, swat: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Compare ``dense`` with ``swat`` (the same architecture after :func:`apply_swat`) on batch ``x``.

    Returns a dict with ``layers`` (one row per SWAT layer), ``total`` (whole-model FLOPs and
    saved bytes, dense and SWAT), ``conversion`` (:func:`swat_conversion_report` on ``x``,
    without its text) and ``text`` (a printable table).
    """
    names = [n for n, _ in swat_layers(swat)]
    if not names:
        raise InvalidParameterError("The 'swat' parameter of swat_report has no SWAT layer: call apply_swat first.")
    f_dense, s_dense = _step(dense, x)
    f_swat, s_swat = _step(swat, x)
    conversion = swat_conversion_report(swat, x)
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
        # module classes without a FLOP rule (e.g. a third-party norm): their FLOPs are not counted
        "flops_not_counted": sorted(set(f_dense.unsupported) | set(f_swat.unsupported)),
    }
    wide = max(22, 2 + max(len(r["layer"]) for r in rows))
    kind = max(12, 1 + max(len(r["kind"]) for r in rows))
    lines = [f"one training step, batch {x.shape[0]}",
             (f"{'layer':<{wide}}{'kind':<{kind}}{'W sparse':>9}{'A sparse':>9}{'MFLOP dense':>13}{'MFLOP SWAT':>12}"
              f"{'kB held dense':>15}{'kB held SWAT':>14}")]
    for r in rows:
        a = "-" if r["activation_sparsity"] is None else f"{r['activation_sparsity']:.0%}"
        lines.append(f"{r['layer']:<{wide}}{r['kind']:<{kind}}{r['weight_sparsity']:>9.0%}{a:>9}"
                     f"{r['train_flops_dense'] / 1e6:>13.2f}{r['train_flops_swat'] / 1e6:>12.2f}"
                     f"{r['held_bytes_dense'] / 1e3:>15.1f}{r['held_bytes_swat'] / 1e3:>14.1f}")

    def pct(a, b):
        return f"{100 * (1 - b / a):.0f}% less" if a else "-"

    lines.append(f"whole model: training FLOPs {total['train_flops_dense'] / 1e6:.1f} -> "
                 f"{total['train_flops_swat'] / 1e6:.1f} M ({pct(total['train_flops_dense'], total['train_flops_swat'])}); "
                 f"saved for backward {total['saved_bytes_dense'] / 1e6:.2f} -> {total['saved_bytes_swat'] / 1e6:.2f} MB "
                 f"({pct(total['saved_bytes_dense'], total['saved_bytes_swat'])}); held by the converted layers "
                 f"{pct(total['held_bytes_converted_dense'], total['held_bytes_converted_swat'])}")
    if total["flops_not_counted"]:
        lines.append(f"  FLOPs not counted (no rule in leanscale.core.flops): {', '.join(total['flops_not_counted'])}")
    lines += conversion["text"].splitlines()[1:]  # kept dense / not covered, without the headline
    return {"layers": rows, "total": total, "conversion": {k: v for k, v in conversion.items() if k != "text"},
            "text": "\n".join(lines)}


def _call(model: nn.Module, inputs: Any):
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _coverage(model: nn.Module, inputs: Any) -> list[dict[str, Any]]:
    """One training-mode forward on ``inputs`` (no backward; parameters, buffers, SWAT thresholds,
    training flags and the RNG restored): per SWAT layer, the bytes of its input and who else
    saved that input densely for backward."""
    layers = swat_layers(model)
    root = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    state = {k: v.clone() for k, v in root.state_dict().items()}
    private = {n: (m._w_threshold, m._a_threshold, m._thresholds_for, dict(m.last_stats)) for n, m in layers}
    flags = {n: m.training for n, m in root.named_modules()}
    seen: dict[str, torch.Tensor] = {}  # the inputs, kept alive until the savers are read

    def grab(name):
        def hook(module, args):
            if args and isinstance(args[0], torch.Tensor):
                seen.setdefault(name, args[0])
        return hook

    handles = [m.register_forward_pre_hook(grab(n)) for n, m in layers]
    rows = []
    try:
        root.train()
        cuda = sorted({p.device.index or 0 for p in root.parameters() if p.device.type == "cuda"})
        with torch.random.fork_rng(devices=cuda), torch.enable_grad():
            with track_saved_tensors(root) as saved:
                out = _call(root, inputs)
            del out
        for name, m in layers:
            x = seen.get(name)
            savers = saved.savers_of(x) if x is not None else []
            row = {"layer": name, "ran": x is not None, "input_bytes": 0 if x is None else x.untyped_storage().nbytes(),
                   "held_densely_by": [{"module": mod or "(model)", "made_by": op} for mod, op in savers]}
            if isinstance(m, SWATMultiheadAttention) and x is not None:
                # weights only: the attention saves dense inputs itself (often as contiguous copies,
                # which share no storage with x); what it holds is measured on the module
                row["weights_only_held_bytes"] = saved.held_by_module.get(name, 0)
                if not any(s["module"] == name for s in row["held_densely_by"]):
                    row["held_densely_by"].append({"module": name, "made_by": "F.multi_head_attention_forward"})
            rows.append(row)
    finally:
        for h in handles:
            h.remove()
        seen.clear()
        root.load_state_dict(state)
        for n, m in root.named_modules():
            m.training = flags[n]
        for n, m in layers:
            m._w_threshold, m._a_threshold, m._thresholds_for, m.last_stats = private[n]
    return rows


# What a converted nn.MultiheadAttention does not do (its row's "activations").
_WEIGHTS_ONLY = ("weights only: the top-K weights of in_proj_weight (q, k, v blocks each) and out_proj.weight are "
                 "used in the forward and the input gradient, the weight gradient stays dense; the activations are "
                 "NOT sparsified or stored compactly, because F.multi_head_attention_forward computes the projections "
                 "itself and saves its dense inputs (query, key, value and the attention output) for their weight "
                 "gradients; it also keeps the masked weights (a copy, 4 * embed_dim**2 values) for the input "
                 "gradient")


def swat_conversion_report(model: nn.Module, inputs: Any = None) -> dict[str, Any]:
    """What :func:`~leanscale.sparse.apply_swat` did to ``model``, layer by layer, with reasons.

    Args:
        model: A model converted by ``apply_swat`` (DDP-wrapped or not).
        inputs: Optional example input: a tensor (``model(inputs)``), a tuple of positional
            arguments or a dict of keyword arguments (e.g. a tokenizer's output). With it, one
            training-mode forward (no backward; weights, buffers, SWAT state and the RNG are
            restored) measures with saved-tensor hooks whether each converted layer's input is
            also saved densely for backward by another operation -- then SWAT's compact copy
            saves nothing for that layer (e.g. a ``tanh`` or ``sigmoid`` output, which their own
            backward needs, or a ReLU when ``compact_relu=False``).

    Returns:
        A dict: ``converted`` (rows ``layer``, ``type``, ``sparsity``, ``activations``: "compact
        top-K", or for a converted ``nn.MultiheadAttention`` why only its weights are sparse),
        ``skipped`` (rows
        ``layer``, ``type``, ``reason``: first layer or head kept dense, not named in
        ``layers``, an unsupported type such as ``nn.MultiheadAttention`` with separate q/k/v
        weights, an embedding), ``functional_relu`` (True when the ReLUs called as functions in the
        forward keep a bit mask, ``compact_relu=True``), ``settings`` (``apply_swat``'s
        arguments), ``not_covered`` (with ``inputs``: the converted layers whose input stays
        held densely, with the bytes and by which module and operation; ``None`` without
        ``inputs``), ``coverage`` (with ``inputs``: every converted layer's row) and ``text``.

    Raises:
        InvalidParameterError: ``model`` is not a module or has no SWAT layer.
    """
    layers = swat_layers(model)
    if not layers:
        raise InvalidParameterError(
            "The 'model' parameter of swat_conversion_report has no SWAT layer: call apply_swat first.")
    root = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    record = getattr(root, _RECORD, None) or {"reasons": {}, "settings": {}, "functional_relu": False}
    modules = dict(root.named_modules())
    def saved(m: nn.Module) -> str:
        if isinstance(m, SWATMultiheadAttention):
            return _WEIGHTS_ONLY
        if isinstance(m, (StructuredSWATLinear, StructuredSWATConv2d)):
            return "kept input channels x[:, I] (structured)"
        return "compact top-K"

    converted = [{"layer": n, "type": type(m).__name__, "sparsity": m.sparsity, "activations": saved(m)}
                 for n, m in layers]
    skipped = [{"layer": n, "type": type(modules[n]).__name__, "reason": why}
               for n, why in record["reasons"].items() if n in modules and n not in {c["layer"] for c in converted}]
    coverage = not_covered = None
    if inputs is not None:
        coverage = _coverage(model, inputs)
        not_covered = [r for r in coverage if r["held_densely_by"]]
    lines = [f"SWAT conversion: {len(converted)} layer(s) converted, {len(skipped)} with weights left dense"]
    lines += [f"  kept dense: {r['layer']} ({r['type']}): {r['reason']}" for r in skipped]
    lines += [f"  {r['layer']} ({r['type']}): {r['activations']}" for r in converted
              if r["activations"] != "compact top-K"]
    lines.append("  functional ReLUs (F.relu, torch.relu, x.relu_()): "
                 + ("compact, 1 bit per element" if record["functional_relu"] else
                    "NOT compact (compact_relu=False): a ReLU output feeding a SWAT layer stays held densely"))
    weights_only = {r["layer"] for r in converted if r["activations"] != "compact top-K"}
    if not_covered:
        for r in not_covered:
            by = ", ".join(f"{s['module']} ({s['made_by']})" for s in r["held_densely_by"][:3])
            if r["layer"] in weights_only:
                lines.append(f"  not covered: {r['layer']} sparsifies weights only; it holds "
                             f"{r.get('weights_only_held_bytes', 0) / 1e3:.1f} kB of dense activations for backward "
                             f"(its input is saved by {by})")
            else:
                lines.append(f"  not covered: the input of {r['layer']} ({r['input_bytes'] / 1e3:.1f} kB) is also "
                             f"saved densely for backward by {by}: its compact copy saves nothing")
    elif coverage is not None:
        lines.append("  every converted layer's input is held for backward only in compact form")
    return {"converted": converted, "skipped": skipped, "functional_relu": bool(record["functional_relu"]),
            "settings": dict(record["settings"]), "not_covered": not_covered, "coverage": coverage,
            "text": "\n".join(lines)}
