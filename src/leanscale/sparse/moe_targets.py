"""Which feed-forward blocks :func:`~leanscale.sparse.moe.apply_moe` converts, and how.

``apply_moe(model, E, target="auto")`` finds the feed-forward blocks of the forms below (in
``named_modules`` order, never inside a block already found) and replaces each by an MoE layer
whose experts have the block's own form and activation:

========================  =====================================================================
family                    recognised by
========================  =====================================================================
``"leanscale"``           :class:`leanscale.models.transformer.MLP` (GELU experts, as before)
``"gated"``               ``gate_proj``, ``up_proj``, ``down_proj`` (``nn.Linear``) and ``act_fn``:
                          Llama, Mistral, Qwen2... ``down(act(gate(x)) * up(x))``; gated experts
``"gpt2"``                ``c_fc``, ``c_proj`` (Hugging Face ``Conv1D`` or ``nn.Linear``), ``act``,
                          optional ``dropout``: ``dropout(c_proj(act(c_fc(x))))``
``"bert"``                a layer with ``intermediate`` (``dense`` + ``intermediate_act_fn``) and
                          ``output`` (``dense`` + ``LayerNorm``): BERT, RoBERTa... The FFN
                          straddles two modules: ``intermediate`` becomes the MoE (it returns the
                          FFN output) and ``output.dense`` an ``nn.Identity``, so ``output`` still
                          applies its dropout, the residual and its LayerNorm, as before.
``"torch-encoder-layer"`` ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` (exact
                          classes): the layer becomes a :class:`MoETransformerEncoderLayer` /
                          :class:`MoETransformerDecoderLayer` whose ``_ff_block`` calls the MoE
                          (experts: ``linear2(dropout(activation(linear1(x))))``); the fused
                          inference fast path, which reads ``linear1`` directly, is turned off.
``"sequential"``          only when designated with ``target=``: ``nn.Sequential(Linear(C, H),
                          <parameter-free modules: activation, dropout>, Linear(H, C))``
========================  =====================================================================

Every block is checked before anything is changed: the expert formula with the block's weights
must reproduce the block on a random input (eval mode), or ``apply_moe`` refuses it, naming it.
So a module that merely looks like one of these forms but computes something else is never
silently converted.

Saved Hugging Face models: ``apply_moe`` records its settings in ``model.config.leanscale_moe``,
which ``save_pretrained`` writes into ``config.json``; :func:`moe_from_pretrained` rebuilds the
architecture from the config, converts it again and loads the safetensors weights.
``from_pretrained`` alone cannot: it builds the dense architecture from the config.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from leanscale.core.errors import (
    DataFormatError,
    DataNotFoundError,
    InvalidParameterError,
)
from leanscale.core.surgery import replace_module_classes
from leanscale.models.transformer import MLP

__all__ = [
    "MoETransformerDecoderLayer",
    "MoETransformerEncoderLayer",
    "find_ffn_blocks",
    "moe_from_pretrained",
]

FAMILIES = ("leanscale", "gated", "gpt2", "bert", "torch-encoder-layer", "sequential")

SEARCHED = (
    "leanscale.models.transformer.MLP; gated MLPs with gate_proj/up_proj/down_proj (nn.Linear) and "
    "act_fn (Llama, Mistral, Qwen2...); GPT-2 MLPs with c_fc/c_proj (Conv1D or nn.Linear) and act; "
    "BERT-style layers with intermediate (dense, intermediate_act_fn) and output (dense, LayerNorm); "
    "nn.TransformerEncoderLayer / nn.TransformerDecoderLayer"
)


class FFNBlock(NamedTuple):
    """A feed-forward block found in a model: its qualified name, family and module."""

    name: str
    family: str
    module: nn.Module


class _Spec(NamedTuple):
    """What a block computes, read from its weights: ``(act(x Wg) * (x Wf)) Wp`` or ``act(x Wf) Wp``."""

    n_embd: int
    hidden: int
    w_fc: torch.Tensor  # (C, H)
    w_proj: torch.Tensor  # (H, C)
    b_fc: torch.Tensor | None
    b_proj: torch.Tensor | None
    w_gate: torch.Tensor | None  # (C, H)
    b_gate: torch.Tensor | None
    activation: nn.Module | Callable[[torch.Tensor], torch.Tensor]
    dropout: float


# ----------------------------------------------------------------------------- recognition


def _is_conv1d(m: Any) -> bool:
    """Hugging Face's ``Conv1D`` (a linear layer with its weight stored (in, out)), by duck type:
    leanscale does not import transformers."""
    return (
        type(m).__name__ == "Conv1D" and isinstance(m, nn.Module) and hasattr(m, "nf")
        and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.ndim == 2
    )


def _in_out(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A linear layer's weight in (in, out) layout, and its bias."""
    w = layer.weight if _is_conv1d(layer) else layer.weight.t()
    return w, layer.bias


def _linear_like(m: Any) -> bool:
    return type(m) is nn.Linear or _is_conv1d(m)


def _family(m: nn.Module, designated: bool) -> str | None:
    if type(m) is MLP:
        return "leanscale"
    if type(m) in (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer):
        return "torch-encoder-layer"
    if all(type(getattr(m, a, None)) is nn.Linear for a in ("gate_proj", "up_proj", "down_proj")) and callable(
        getattr(m, "act_fn", None)
    ):
        return "gated"
    if _linear_like(getattr(m, "c_fc", None)) and _linear_like(getattr(m, "c_proj", None)) and callable(
        getattr(m, "act", None)
    ):
        return "gpt2"
    inter, out = getattr(m, "intermediate", None), getattr(m, "output", None)
    if (
        isinstance(inter, nn.Module) and isinstance(out, nn.Module)
        and type(getattr(inter, "dense", None)) is nn.Linear and callable(getattr(inter, "intermediate_act_fn", None))
        and type(getattr(out, "dense", None)) is nn.Linear and isinstance(getattr(out, "LayerNorm", None), nn.Module)
    ):
        return "bert"
    if designated and type(m) is nn.Sequential and len(m) >= 3:
        first, last, middle = m[0], m[-1], list(m)[1:-1]
        if (
            type(first) is nn.Linear and type(last) is nn.Linear
            and first.out_features == last.in_features and first.in_features == last.out_features
            and all(next(mid.parameters(), None) is None for mid in middle)
        ):
            return "sequential"
    return None


def _converted(m: nn.Module) -> bool:
    from leanscale.sparse.moe import MoEMLP

    return isinstance(m, (MoEMLP, MoETransformerEncoderLayer, MoETransformerDecoderLayer))


def _blocks(root: nn.Module, select: Callable[[str, nn.Module], bool] | None, owner: str) -> list[FFNBlock]:
    """The blocks to convert, in ``named_modules`` order; ``select`` (designated mode) picks the
    modules, each of which must be of a recognised form."""
    found: list[FFNBlock] = []
    skip: list[str] = []
    for name, m in root.named_modules():
        if not name or any(name.startswith(p + ".") for p in skip):
            continue
        if _converted(m):
            skip.append(name)
            continue
        if select is None:
            family = _family(m, designated=False)
        else:
            try:
                chosen = bool(select(name, m))
            except Exception as err:
                raise InvalidParameterError(
                    f"The 'target' parameter of {owner} raised {type(err).__name__}: {err} on module "
                    f"{name!r} ({type(m).__name__}); a predicate must take (name, module) and return a bool."
                ) from err
            if not chosen:
                continue
            family = _family(m, designated=True)
            if family is None:
                hint = ""
                if callable(getattr(m, "intermediate_act_fn", None)):
                    hint = (" It is half of a BERT-style feed-forward block (the other half, with the "
                            "residual and LayerNorm, is the layer's 'output'): designate the layer "
                            "that holds both 'intermediate' and 'output'.")
                raise InvalidParameterError(
                    f"The 'target' parameter of {owner} selected {name!r} ({type(m).__module__}."
                    f"{type(m).__qualname__}), which is not a feed-forward block of a form apply_moe "
                    f"can convert ({SEARCHED}; or nn.Sequential(Linear(C, H), activation[, dropout], "
                    f"Linear(H, C))).{hint}"
                )
        if family is not None:
            found.append(FFNBlock(name, family, m))
            skip.append(name)
    return found


def _selector(target: Any, owner: str) -> Callable[[str, nn.Module], bool] | None:
    if isinstance(target, str) and target == "auto":
        return None
    if isinstance(target, type) and issubclass(target, nn.Module):
        return lambda name, m: isinstance(m, target)
    if callable(target) and not isinstance(target, type):
        return target
    raise InvalidParameterError(
        f"The 'target' parameter of {owner} must be 'auto', an nn.Module subclass or a predicate "
        f"(name, module) -> bool. Got {target!r} instead."
    )


def find_ffn_blocks(model: nn.Module, target: Any = "auto") -> list[tuple[str, str]]:
    """``(name, family)`` of every feed-forward block :func:`~leanscale.sparse.moe.apply_moe`
    would convert with ``every=1`` and this ``target`` (families: see this module's docstring).

    Raises:
        InvalidParameterError: ``model`` is not a module, a bad ``target``, or a designated module
            of a form apply_moe cannot convert.
    """
    from leanscale.sparse.moe import _root

    owner = "find_ffn_blocks"
    root = _root(model, owner)
    return [(b.name, b.family) for b in _blocks(root, _selector(target, owner), owner)]


# ----------------------------------------------------------------------------- reading a block


def _spec(block: FFNBlock) -> _Spec:
    m, family = block.module, block.family
    if family == "gated":
        w_gate, b_gate = _in_out(m.gate_proj)
        w_fc, b_fc = _in_out(m.up_proj)
        w_proj, b_proj = _in_out(m.down_proj)
        act, p = m.act_fn, 0.0
    elif family == "gpt2":
        (w_fc, b_fc), (w_proj, b_proj), w_gate, b_gate = _in_out(m.c_fc), _in_out(m.c_proj), None, None
        drop = getattr(m, "dropout", None)
        act, p = m.act, (drop.p if isinstance(drop, nn.Dropout) else 0.0)
    elif family == "bert":
        (w_fc, b_fc), (w_proj, b_proj), w_gate, b_gate = _in_out(m.intermediate.dense), _in_out(m.output.dense), None, None
        act, p = m.intermediate.intermediate_act_fn, 0.0  # output keeps its own dropout
    elif family == "torch-encoder-layer":
        (w_fc, b_fc), (w_proj, b_proj), w_gate, b_gate = _in_out(m.linear1), _in_out(m.linear2), None, None
        act_fn = m.activation
        if not isinstance(act_fn, nn.Module):
            from leanscale.sparse.moe import _FunctionActivation

            act_fn = _FunctionActivation(act_fn)
        act, p = nn.Sequential(act_fn, m.dropout), 0.0  # linear2(dropout(activation(linear1(x))))
    elif family == "sequential":
        (w_fc, b_fc), (w_proj, b_proj), w_gate, b_gate = _in_out(m[0]), _in_out(m[-1]), None, None
        act, p = nn.Sequential(*list(m)[1:-1]), 0.0
    else:  # pragma: no cover - "leanscale" goes through MoEMLP.from_dense
        raise AssertionError(family)
    C, H = w_fc.shape
    if tuple(w_proj.shape) != (H, C) or (w_gate is not None and tuple(w_gate.shape) != (C, H)):
        raise InvalidParameterError(
            f"The 'model' parameter of apply_moe has a {family} block {block.name!r} whose weights do "
            f"not chain (in, hidden) -> (hidden, in): got {tuple(w_fc.shape)} and {tuple(w_proj.shape)}."
        )
    return _Spec(C, H, w_fc, w_proj, b_fc, b_proj, w_gate, b_gate, act, p)


def _formula(spec: _Spec, x: torch.Tensor) -> torch.Tensor:
    """What one expert copied from ``spec`` computes (the expression of ``MoE._expert``)."""
    h = x @ spec.w_fc
    if spec.b_fc is not None:
        h = h + spec.b_fc
    if spec.w_gate is not None:
        g = x @ spec.w_gate
        if spec.b_gate is not None:
            g = g + spec.b_gate
        h = spec.activation(g) * h
    else:
        h = spec.activation(h)
    y = h @ spec.w_proj
    return y if spec.b_proj is None else y + spec.b_proj


@torch.no_grad()
def _verify(block: FFNBlock, spec: _Spec) -> None:
    """Refuse a block whose output the expert formula does not reproduce (eval mode, a random
    input from a private generator: the global RNG is left alone)."""
    m, w = block.module, spec.w_fc
    if w.is_meta:
        return
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2, 3, spec.n_embd, generator=gen).to(device=w.device, dtype=w.dtype)
    modes = [(mod, mod.training) for mod in m.modules()]
    act_modes = [(mod, mod.training) for mod in spec.activation.modules()] if isinstance(spec.activation, nn.Module) else []
    try:
        for mod, _ in modes + act_modes:
            mod.training = False
        if block.family == "bert":
            r = torch.randn(2, 3, spec.n_embd, generator=gen).to(device=w.device, dtype=w.dtype)
            want = m.output(m.intermediate(x), r)
            dense = m.output.dense
            m.output.dense = nn.Identity()
            try:
                got = m.output(_formula(spec, x), r)
            finally:
                m.output.dense = dense
        else:
            want = m._ff_block(x) if block.family == "torch-encoder-layer" else m(x)
            got = _formula(spec, x)
    finally:
        for mod, mode in modes + act_modes:
            mod.training = mode
    tol = 1e-4 if w.dtype in (torch.float32, torch.float64) else 2e-2
    scale = max(1.0, float(want.abs().max()))
    if not isinstance(want, torch.Tensor) or want.shape != got.shape or not torch.allclose(
        want.float(), got.float(), rtol=tol, atol=tol * scale
    ):
        raise InvalidParameterError(
            f"The 'model' parameter of apply_moe has a block {block.name!r} ({type(m).__qualname__}) that "
            f"looks like a {block.family!r} feed-forward block but does not compute what that form "
            f"computes (checked on a random input): it is not converted. Use target= to exclude it."
        )


# ----------------------------------------------------------------------------- the replacements


class _MoELayerMixin:
    """``_ff_block`` through the MoE ``ffn``; built from an existing layer (sharing its modules)."""

    def _take_over(self, layer: nn.Module, ffn: nn.Module) -> None:
        nn.Module.__init__(self)
        state = {k: (v.copy() if isinstance(v, dict) else v) for k, v in vars(layer).items()}
        self.__dict__.update(state)
        for name in ("linear1", "linear2", "dropout"):  # dropout lives on inside the experts
            del self._modules[name]
        self.ffn = ffn
        # The fused inference path (torch._transformer_encoder_layer_fwd) reads linear1/linear2
        # directly; 0 here sends every call through _sa_block / _ff_block.
        self.activation_relu_or_gelu = 0

    def _ff_block(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout3(self.ffn(x)) if isinstance(self, nn.TransformerDecoderLayer) else self.dropout2(self.ffn(x))


class MoETransformerEncoderLayer(_MoELayerMixin, nn.TransformerEncoderLayer):
    """An ``nn.TransformerEncoderLayer`` whose feed-forward block is a
    :class:`~leanscale.sparse.moe.MoEMLP` (``ffn``); made by :func:`~leanscale.sparse.moe.apply_moe`.

    ``MoETransformerEncoderLayer(layer, ffn)`` takes over ``layer``'s attention, norms and
    settings (the same modules) and drops its ``linear1`` / ``linear2`` / ``dropout`` (the
    dropout is inside the experts' activation). Same forward signature.
    """

    def __init__(self, layer: nn.TransformerEncoderLayer, ffn: nn.Module):
        self._take_over(layer, ffn)


class MoETransformerDecoderLayer(_MoELayerMixin, nn.TransformerDecoderLayer):
    """As :class:`MoETransformerEncoderLayer`, for ``nn.TransformerDecoderLayer``."""

    def __init__(self, layer: nn.TransformerDecoderLayer, ffn: nn.Module):
        self._take_over(layer, ffn)


def _build(spec: _Spec, n_experts: int, init: str, moe_kwargs: dict[str, Any], training: bool) -> nn.Module:
    from leanscale.sparse.moe import MoEMLP

    bias = any(b is not None for b in (spec.b_fc, spec.b_proj, spec.b_gate))
    new = MoEMLP(
        spec.n_embd, spec.hidden, n_experts, bias=bias, dropout=spec.dropout, activation=spec.activation,
        gated=spec.w_gate is not None, device=spec.w_fc.device, dtype=spec.w_fc.dtype, **moe_kwargs,
    )
    if init == "copy":
        new.moe.load_expert_weights(spec.w_fc, spec.w_proj, spec.b_fc, spec.b_proj, spec.w_gate, spec.b_gate)
    new.train(training)
    return new


def plan_replacements(
    blocks: list[FFNBlock],
    n_experts: int,
    init: str,
    moe_kwargs: dict[str, Any],
    proj_std: float | None,
) -> dict[int, nn.Module]:
    """id(module to replace) -> its replacement, for every block; nothing in the model changes."""
    from leanscale.models.transformer import INIT_STD
    from leanscale.sparse.moe import MoEMLP

    out: dict[int, nn.Module] = {}
    for block in blocks:
        m = block.module
        if block.family == "leanscale":
            extra = {} if proj_std is None else {"proj_std": proj_std}
            out[id(m)] = MoEMLP.from_dense(m, n_experts, init=init, **extra, **moe_kwargs)
            continue
        spec = _spec(block)
        _verify(block, spec)
        ffn = _build(spec, n_experts, init, moe_kwargs, m.training)
        if init == "random" and proj_std is not None:
            ffn.moe.reset_parameters(INIT_STD, proj_std)
        if block.family == "bert":
            out[id(m.intermediate)] = ffn
            out[id(m.output.dense)] = nn.Identity()
        elif block.family == "torch-encoder-layer":
            cls = MoETransformerEncoderLayer if type(m) is nn.TransformerEncoderLayer else MoETransformerDecoderLayer
            out[id(m)] = cls(m, ffn)
        else:
            out[id(m)] = ffn
    return out


def replace_blocks(root: nn.Module, blocks: list[FFNBlock], replacements: dict[int, nn.Module], optimizers: Any) -> None:
    """Put the replacements in, through the shared surgery helper (optimizers updated)."""
    targets = {}
    for _, m in root.named_modules():
        if id(m) in replacements:
            targets[type(m)] = lambda module, index: replacements.get(id(module))
    replace_module_classes(root, targets, optimizers=optimizers)
    # nn.TransformerEncoder's nested-tensor fast path reads layers[0].linear1: off where converted.
    for m in root.modules():
        if isinstance(m, nn.TransformerEncoder) and any(isinstance(x, MoETransformerEncoderLayer) for x in m.layers):
            m.use_nested_tensor = False


# ----------------------------------------------------------------------------- Hugging Face round trip


def record_settings(root: nn.Module, settings: dict[str, Any]) -> None:
    """Append ``settings`` to ``root.config.leanscale_moe`` when ``root`` has a Hugging Face style
    config (one that ``save_pretrained`` writes as JSON)."""
    config = getattr(root, "config", None)
    if config is None or not hasattr(config, "to_dict") or not hasattr(config, "save_pretrained"):
        return
    records = list(getattr(config, "leanscale_moe", None) or [])
    records.append(settings)
    config.leanscale_moe = records


def _safetensors_files(path: Path) -> list[Path]:
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            return [path / name for name in sorted(set(weight_map.values()))]
        except (ValueError, KeyError, TypeError) as err:
            raise DataFormatError(f"{index} is not a safetensors index (a 'weight_map' of file names): {err}") from None
    raise DataNotFoundError(
        f"The 'path' parameter of moe_from_pretrained must be a folder written by save_pretrained with "
        f"safetensors weights (model.safetensors or model.safetensors.index.json). Got {str(path)!r}, "
        f"which has neither."
    )


def moe_from_pretrained(model_class: Any, path: str | Path, *, target: Any = None) -> nn.Module:
    """Load a Hugging Face model that was converted by :func:`~leanscale.sparse.moe.apply_moe`
    and saved with ``save_pretrained``: the architecture from ``config.json``, converted again
    with the settings recorded in ``config.leanscale_moe``, then the safetensors weights (read
    with ``safetensors``, no pickle). Returned in eval mode, as ``from_pretrained`` does.

    Args:
        model_class: A ``transformers`` model class (``LlamaForCausalLM``) or auto class
            (``AutoModelForCausalLM``).
        path: The folder ``save_pretrained`` wrote.
        target: Needed only when the conversion used a module class or a predicate as
            ``target`` (not recorded in JSON): pass the same one again.

    Raises:
        InvalidParameterError: a config without ``leanscale_moe`` (the model was not converted),
            a recorded non-"auto" target without ``target=``, or weights that do not fit the
            rebuilt model (missing expert tensors, unexpected names).
        DataNotFoundError: no safetensors weights in ``path``.
    """
    from leanscale.sparse.moe import apply_moe

    owner = "moe_from_pretrained"
    try:
        from safetensors.torch import load_file
    except ImportError:  # pragma: no cover - transformers depends on safetensors
        from leanscale.core.errors import MissingDependencyError

        raise MissingDependencyError(
            "moe_from_pretrained reads Hugging Face safetensors weights: pip install 'leanscale[hf]'"
        ) from None
    path = Path(path)
    files = _safetensors_files(path)  # before anything is built: a wrong folder fails fast
    if not (path / "config.json").is_file():
        raise DataNotFoundError(
            f"The 'path' parameter of {owner} must be a folder written by save_pretrained, with a "
            f"config.json. Got {str(path)!r}, which has none."
        )
    if hasattr(model_class, "from_config"):  # auto classes
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)
        model = model_class.from_config(config)
    elif hasattr(model_class, "config_class") and hasattr(model_class, "_from_config"):
        config = model_class.config_class.from_pretrained(path)
        model = model_class._from_config(config)
    else:
        raise InvalidParameterError(
            f"The 'model_class' parameter of {owner} must be a transformers model class or auto class "
            f"(e.g. LlamaForCausalLM, AutoModelForCausalLM). Got {model_class!r} instead."
        )
    records = list(getattr(config, "leanscale_moe", None) or [])
    if not records:
        raise InvalidParameterError(
            f"The 'path' parameter of {owner} must hold a model converted by apply_moe: its config.json "
            f"has no 'leanscale_moe' settings. Got {str(path)!r}: load it with from_pretrained instead."
        )
    model.config.leanscale_moe = []  # apply_moe appends each record again
    for record in records:
        settings = dict(record)
        recorded = settings.pop("target")
        if recorded == "auto":
            settings["target"] = "auto"
        elif target is None:
            raise InvalidParameterError(
                f"The 'target' parameter of {owner} is required: the model was converted with "
                f"target={recorded!r}, which JSON cannot hold. Pass the same class or predicate again."
            )
        else:
            settings["target"] = target
        settings.pop("family_counts", None)
        settings["init"] = "random"  # the weights are loaded next
        apply_moe(model, settings.pop("n_experts"), **settings)
    model.config.leanscale_moe = records
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    result = model.load_state_dict(state, strict=False)
    loaded = {t.data_ptr() for k, t in model.state_dict().items() if k in state}
    own = model.state_dict()
    missing = [k for k in result.missing_keys if own[k].data_ptr() not in loaded]  # tied weights are fine
    if missing or result.unexpected_keys:
        raise InvalidParameterError(
            f"The weights in {str(path)!r} do not fit the model rebuilt by {owner}: missing "
            f"{missing[:5]}, unexpected {list(result.unexpected_keys)[:5]}."
        )
    model.eval()
    return model


def proj_std_for(root: nn.Module) -> float | None:
    """GPT's residual scaling for the random output projections of a leanscale GPT, else None."""
    from leanscale.models.transformer import GPT, INIT_STD

    if isinstance(root, GPT):
        return INIT_STD / math.sqrt(2 * root.config.n_layer)
    return None
