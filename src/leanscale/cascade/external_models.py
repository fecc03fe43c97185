"""Saving a :class:`~leanscale.cascade.stages.ModelStage`'s model without user code and without pickle.

Private to :mod:`leanscale.cascade` (``cascade`` imports it for ``Cascade.save``/``Cascade.load``).

* **scikit-learn** estimators and transformers (a ``Pipeline`` of ``TfidfVectorizer`` +
  ``LogisticRegression``, a ``RandomForestClassifier``, ...) are written with ``skops.io.dumps``
  (``pip install 'leanscale[cascade]'``) to a ``.skops`` file. Loading reads the bytes once,
  lists the types skops does not trust by default (``skops.io.get_untrusted_types``) and passes
  them to ``skops.io.loads(trusted=...)`` only when every one is a *class* of scikit-learn,
  ``numpy`` or ``scipy.sparse`` (:func:`allowed_type`); anything else (a user class, a function
  such as ``os.system``) is refused with the file and the types named. skops never unpickles.
* **torch modules** are exported with ``torch.export`` (the batch dimension dynamic,
  ``torch.export.Dim``) at save time, and the exported graph is written as *our own* JSON: a
  list of ATen operations from an allow-list (:data:`ALLOWED_ATEN_OPS`) whose arguments are
  literals or earlier nodes, plus the weights as safetensors. Loading rebuilds a small
  interpreter module (:class:`ExportedGraph`) that calls only allow-listed ops: no user module,
  no pickle, no ``eval``.

Why not ``torch.export.save``/``torch.export.load`` (``.pt2``) as the file? Its loader is not
safe on an untrusted file (torch 2.13, read in ``torch/export/pt2_archive/_package.py`` and
``torch/_export/serde/serialize.py``): weights and constants marked ``use_pickle`` in the
archive's own config are read with ``torch.load(weights_only=False)`` or ``pickle.loads``,
``deserialize_torch_artifact`` falls back to ``weights_only=False`` when the safe load fails,
symbolic-shape expressions go through ``sympy.sympify`` (which evaluates strings), and a graph
node's target may name any ``torch.*`` attribute (``torch.load``, ``torch.hub.load``, ...), which
runs when the program runs. A file someone else wrote could run code; ours cannot.

Limits of the torch path: the module must take one tensor (the batch, first dimension) and return
one tensor of logits ``(batch, n_classes)``; it must be exportable by ``torch.export`` with a
dynamic batch dimension (no data-dependent Python control flow) and use only allow-listed ops
(linear and convolution layers, normalisations, the usual activations, shape and reduction ops,
attention). Anything else is saved by name (``"external"``) with a warning saying why.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import math
import operator
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leanscale.cascade._shared import INSTALL_CASCADE
from leanscale.core.errors import (
    DataFormatError,
    DataNotFoundError,
    MissingDependencyError,
)
from leanscale.core.io import atomic_write_bytes, check_file_size, inside_folder

SKOPS_KIND = "skops"
TORCH_KIND = "torch.graph"
KINDS = (SKOPS_KIND, TORCH_KIND)
EXTERNAL_VERSION = 1  # the "format_version" of a saved sklearn/torch model entry
MAX_SKOPS_BYTES = 1 << 30  # a .skops file, and the bytes its members declare, at most 1 GiB
MAX_GRAPH_NODES = 100_000
MAX_RANK = 16


class NotSavable(Exception):
    """The model cannot be saved as data; ``str(exc)`` says why (the stage is then saved by name)."""


# --------------------------------------------------------------------------------------- files


def write_file_addressed(folder: Path, prefix: str, data: bytes, suffix: str) -> tuple[str, str]:
    """Write ``data`` to ``folder/<prefix><sha256[:16]><suffix>``; return ``(name, sha256)``."""
    digest = hashlib.sha256(data).hexdigest()
    name = f"{prefix}{digest[:16]}{suffix}"
    atomic_write_bytes(Path(folder) / name, data)
    return name, digest


def read_file_checked(folder: Path, name: Any, sha256: Any, *, what: str, max_bytes: int) -> bytes:
    """The bytes of ``folder/name``: inside ``folder``, at most ``max_bytes``, with the recorded sha256."""
    if not isinstance(sha256, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise DataFormatError(f"The {what} {name!r} has a malformed sha256 {sha256!r:.80} in its JSON.")
    path = inside_folder(folder, name, what=what)
    if not path.is_file():
        raise DataNotFoundError(f"The {what} {str(path)!r} does not exist.")
    check_file_size(path, max_bytes, what=what)
    with open(path, "rb") as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise DataFormatError(f"The {what} {str(path)!r} is larger than {max_bytes:,} bytes.")
    got = hashlib.sha256(data).hexdigest()
    if got != sha256.lower():
        raise DataFormatError(
            f"The {what} {str(path)!r} does not match the hash recorded when it was saved (sha256 {got[:16]}... "
            f"instead of {sha256[:16]}...): it was changed or belongs to another save.")
    return data


# ------------------------------------------------------------------------------- scikit-learn


def _skops_io():
    try:
        import skops.io as sio
    except ImportError as exc:
        raise MissingDependencyError(
            f"Saving and loading scikit-learn stages needs skops, which is not installed. Install it with: "
            f"{INSTALL_CASCADE}") from exc
    return sio


_ALLOWED_ROOTS = ("sklearn.", "numpy.", "scipy.sparse.")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")


def allowed_type(name: Any) -> bool:
    """Whether the type ``name`` (as ``skops.io.get_untrusted_types`` lists it) may be loaded:
    a class (not a function) defined under ``sklearn``, ``numpy`` or ``scipy.sparse``."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or not name.startswith(_ALLOWED_ROOTS):
        return False
    parts = name.split(".")
    if any(p.startswith(("test", "conftest", "_pytest")) for p in parts):  # never import test code by name
        return False
    for cut in range(len(parts) - 1, 0, -1):  # the longest importable module prefix
        module_name = ".".join(parts[:cut])
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return isinstance(obj, type)
    return False


def sklearn_dumps(model: Any) -> bytes:
    """``skops.io.dumps(model)``, checked to load back under :func:`allowed_type`.

    Raises:
        MissingDependencyError: skops is not installed.
        NotSavable: skops cannot write the object, or it holds types outside the allow-list
            (a user class, a function).
    """
    sio = _skops_io()
    try:
        data = sio.dumps(model)
        untrusted = sio.get_untrusted_types(data=data)
    except Exception as exc:  # skops refuses what it cannot represent
        raise NotSavable(f"skops cannot save {type(model).__name__} ({type(exc).__name__}: {exc})") from None
    bad = [t for t in untrusted if not allowed_type(t)]
    if bad:
        raise NotSavable(
            f"it holds types outside scikit-learn/numpy/scipy ({', '.join(bad[:5])}), which a file cannot be "
            "trusted to rebuild")
    return data


def _check_zip(data: bytes, where: str) -> None:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
            if len(infos) > 100_000:
                raise DataFormatError(f"The {where} holds {len(infos):,} members; at most 100,000 are read.")
            total = sum(i.file_size for i in infos)
    except zipfile.BadZipFile as exc:
        raise DataFormatError(f"The {where} is not a skops file ({exc}).") from None
    if total > MAX_SKOPS_BYTES:
        raise DataFormatError(f"The {where} declares {total:,} bytes of content; at most {MAX_SKOPS_BYTES:,} are read.")


def sklearn_loads(data: bytes, where: str) -> Any:
    """The object of a ``.skops`` file's bytes, loaded with ``trusted=`` its untrusted types only
    when all are allowed (:func:`allowed_type`); otherwise a :class:`DataFormatError` naming
    ``where`` and the refused types."""
    sio = _skops_io()
    _check_zip(data, where)
    try:
        untrusted = sio.get_untrusted_types(data=data)
    except Exception as exc:
        raise DataFormatError(f"The {where} is not a valid skops file ({type(exc).__name__}: {exc}).") from None
    bad = [t for t in untrusted if not allowed_type(t)]
    if bad:
        raise DataFormatError(
            f"The {where} holds types that are not trusted: {', '.join(map(repr, bad[:10]))}. Only classes of "
            "scikit-learn, numpy and scipy.sparse are loaded from a file (a type or function named there could run "
            "code). If you wrote the file yourself, load it with skops.io.load and pass the model in objects=.")
    try:
        return sio.loads(data, trusted=list(untrusted))
    except Exception as exc:
        raise DataFormatError(f"The {where} could not be loaded ({type(exc).__name__}: {exc}).") from None


# ------------------------------------------------------------------------------------- torch

#: The ATen operator packets an exported graph may call: arithmetic on tensors, with no I/O, no
#: global state and no allocation sized by the file alone (``*_like`` only).
ALLOWED_ATEN_OPS = frozenset("""
    linear addmm mm bmm matmul einsum baddbmm t permute transpose view reshape unsqueeze squeeze flatten
    unflatten expand expand_as contiguous clone alias detach cat stack split split_with_sizes chunk slice select
    narrow index_select embedding conv1d conv2d conv3d convolution max_pool1d max_pool2d avg_pool1d avg_pool2d
    adaptive_avg_pool1d adaptive_avg_pool2d adaptive_max_pool2d relu relu_ gelu silu tanh sigmoid softmax
    log_softmax _softmax _log_softmax hardtanh hardswish hardsigmoid leaky_relu elu selu celu mish softplus
    logsigmoid glu layer_norm native_layer_norm group_norm native_group_norm batch_norm rms_norm
    _native_batch_norm_legit_no_training instance_norm dropout feature_dropout alpha_dropout add sub rsub mul div
    neg abs exp log log1p expm1 sqrt rsqrt pow square reciprocal sign erf clamp clamp_min clamp_max minimum
    maximum where eq ne gt ge lt le logical_and logical_or logical_not bitwise_not masked_fill mean sum prod amax
    amin max min argmax argmin logsumexp var std norm linalg_vector_norm cumsum tril triu zeros_like ones_like
    full_like to _to_copy type_as scaled_dot_product_attention sym_size sym_numel floor ceil round trunc
    lift_fresh_copy _assert_tensor_metadata
""".split())
_OPERATOR_OPS = {"operator.getitem": operator.getitem, "operator.add": operator.add, "operator.sub": operator.sub,
                 "operator.mul": operator.mul, "operator.floordiv": operator.floordiv, "operator.neg": operator.neg}
_DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")
_MEMORY_FORMATS = ("contiguous_format", "preserve_format")


def _torch():
    return torch


def _op_name(target: Any) -> str:
    torch = _torch()
    if isinstance(target, torch._ops.OpOverload):
        name = str(target)  # "aten.linear.default"
        ns, packet, _ = name.split(".")
        if ns != "aten" or packet not in ALLOWED_ATEN_OPS:
            raise NotSavable(f"its exported graph calls {name}, which is not on leanscale's op allow-list")
        return name
    for name, fn in _OPERATOR_OPS.items():
        if target is fn:
            return name
    raise NotSavable(f"its exported graph calls {getattr(target, '__name__', target)!r}, which is not an ATen op")


def _resolve_op(name: Any, where: str):
    torch = _torch()
    if isinstance(name, str) and name in _OPERATOR_OPS:
        return _OPERATOR_OPS[name]
    parts = name.split(".") if isinstance(name, str) else []
    if len(parts) != 3 or parts[0] != "aten" or parts[1] not in ALLOWED_ATEN_OPS \
            or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", parts[2]):
        raise DataFormatError(f"The {where} calls {name!r:.100}, which is not an allowed ATen op.")
    packet = getattr(torch.ops.aten, parts[1], None)
    if packet is None or parts[2] not in packet.overloads():
        raise DataFormatError(f"The {where} calls {name!r:.100}, which this torch does not have.")
    return getattr(packet, parts[2])


def _encode(v: Any) -> Any:
    torch = _torch()
    if isinstance(v, torch.fx.Node):
        return {"node": v.name}
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else {"float": repr(v)}
    if isinstance(v, (list, tuple)):
        return [_encode(x) for x in v]
    if isinstance(v, torch.dtype):
        name = str(v).removeprefix("torch.")
        if name not in _DTYPES:
            raise NotSavable(f"its exported graph uses the dtype {v}")
        return {"dtype": name}
    if isinstance(v, torch.memory_format):
        name = str(v).removeprefix("torch.")
        if name not in _MEMORY_FORMATS:
            raise NotSavable(f"its exported graph uses the memory format {v}")
        return {"memory_format": name}
    if isinstance(v, torch.layout) and v == torch.strided:
        return {"layout": "strided"}
    if isinstance(v, torch.device) and v.type == "cpu":
        return {"device": "cpu"}
    raise NotSavable(f"its exported graph has an argument of type {type(v).__name__} ({v!r:.60})")


def _decode(v: Any, env: Mapping[str, Any], where: str, depth: int = 0) -> Any:
    torch = _torch()
    if depth > 8:
        raise DataFormatError(f"The {where} nests arguments more than 8 deep.")
    if v is None or isinstance(v, (bool, int, str)) or (isinstance(v, float) and math.isfinite(v)):
        return v
    if isinstance(v, list):
        return [_decode(x, env, where, depth + 1) for x in v]
    if isinstance(v, dict) and len(v) == 1:
        (key, value), = v.items()
        if key == "node" and isinstance(value, str) and value in env:
            return env[value]
        if key == "float" and value in ("inf", "-inf", "nan"):
            return float(value)
        if key == "dtype" and value in _DTYPES:
            return getattr(torch, value)
        if key == "memory_format" and value in _MEMORY_FORMATS:
            return getattr(torch, value)
        if key == "layout" and value == "strided":
            return torch.strided
        if key == "device" and value == "cpu":
            return torch.device("cpu")
    raise DataFormatError(f"The {where} has an invalid argument {v!r:.100} (an unknown or later node, or an "
                          "unknown kind of value).")


class ExportedGraph(torch.nn.Module):
    """A torch module rebuilt from a saved graph: runs the allow-listed ATen ops of ``spec`` on
    its tensors (see the module docstring). ``spec`` and the tensors are checked when it is built."""

    def __init__(self, spec: dict, tensors: dict, where: str = "saved graph"):
        super().__init__()
        self.spec = spec
        self._tensors = tensors
        self._input_dtype = _decode({"dtype": spec["input"]["dtype"]}, {}, where)
        self._plan = []
        env_names = set(spec["placeholders"]) | {spec["input"]["name"]}
        for node in spec["nodes"]:
            fn = _resolve_op(node["op"], where)
            args = _decode(node["args"], {n: None for n in env_names}, where)  # references are checked here
            kwargs = node["kwargs"]
            if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
                raise DataFormatError(f"The {where} has node {node['name']!r} with invalid kwargs.")
            _decode(list(kwargs.values()), {n: None for n in env_names}, where)
            self._plan.append((node["name"], fn, node["args"], kwargs))
            env_names.add(node["name"])
        if spec["output"] not in env_names:
            raise DataFormatError(f"The {where} returns {spec['output']!r:.80}, which no node computes.")
        del args

    def forward(self, x):
        torch = _torch()
        env: dict[str, Any] = dict(self._tensors)
        env[self.spec["input"]["name"]] = x.to(self._input_dtype) if isinstance(x, torch.Tensor) else x
        where = "saved graph"
        for name, fn, args, kwargs in self._plan:
            env[name] = fn(*_decode(args, env, where), **{k: _decode(v, env, where) for k, v in kwargs.items()})
        return env[self.spec["output"]]


def _modes_eval(module):
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    return modes


def torch_export(module: Any, example: Any) -> tuple[dict, dict[str, np.ndarray]]:
    """``(spec, arrays)`` of a torch module, exported with a dynamic batch dimension on the
    example input (a tensor whose first dimension is the batch). The graph is run on the example
    and must give the module's output.

    Raises:
        NotSavable: no example input, the module cannot be exported, or its graph uses something
            outside the allow-list.
    """
    torch = _torch()
    if isinstance(module, ExportedGraph):
        return module.spec, {k: _to_numpy(t) for k, t in module._tensors.items()}
    if not isinstance(example, torch.Tensor) or example.ndim < 1 or example.ndim > MAX_RANK:
        raise NotSavable("it never received a tensor input (run the cascade's fit first; the model must take one "
                         "tensor whose first dimension is the batch)")
    if example.shape[0] < 2:
        example = torch.cat([example, example])
    try:
        device = next(iter(module.parameters())).device
    except StopIteration:
        device = torch.device("cpu")
    example = example.to(device)
    modes = _modes_eval(module)
    try:
        batch = torch.export.Dim("batch", min=1)
        ep = torch.export.export(module, (example,), dynamic_shapes=({0: batch},), strict=False)
        with torch.no_grad():
            expected = module(example)
    except Exception as exc:
        raise NotSavable(f"torch.export could not export it with a dynamic batch dimension "
                         f"({type(exc).__name__}: {str(exc)[:300]})") from None
    finally:
        for m, training in modes:
            m.training = training
    state = {**ep.state_dict, **ep.constants}
    placeholders: dict[str, dict] = {}
    arrays: dict[str, np.ndarray] = {}
    user_input = None
    kinds = {spec.arg.name: spec for spec in ep.graph_signature.input_specs}
    for out in ep.graph_signature.output_specs:
        if out.kind.name != "USER_OUTPUT":
            raise NotSavable(f"its exported graph has a {out.kind.name} output (it changes its own state)")
    nodes = []
    output = None
    for node in ep.graph.nodes:
        if node.op == "placeholder":
            spec = kinds[node.name]
            kind = spec.kind.name
            if kind == "USER_INPUT":
                if user_input is not None:
                    raise NotSavable("it takes more than one input")
                user_input = node.name
            elif kind in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR"):
                t = state.get(spec.target)
                if not isinstance(t, torch.Tensor):
                    raise NotSavable(f"its state {spec.target!r} is not a tensor")
                arrays[node.name] = _to_numpy(t)
                placeholders[node.name] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
            else:
                raise NotSavable(f"its exported graph has a {kind} input")
        elif node.op == "call_function":
            nodes.append({"name": node.name, "op": _op_name(node.target), "args": _encode(list(node.args)),
                          "kwargs": {k: _encode(v) for k, v in node.kwargs.items()}})
        elif node.op == "output":
            outs = node.args[0]
            if not (isinstance(outs, (list, tuple)) and len(outs) == 1 and isinstance(outs[0], torch.fx.Node)):
                raise NotSavable("it must return one tensor (the logits)")
            output = outs[0].name
        else:
            raise NotSavable(f"its exported graph has a {node.op} node")
    if user_input is None or output is None:
        raise NotSavable("its exported graph takes no input or returns nothing")
    in_dtype = str(example.dtype).removeprefix("torch.")
    if in_dtype not in _DTYPES:
        raise NotSavable(f"its input has dtype {example.dtype}")
    spec = {"input": {"name": user_input, "dtype": in_dtype, "shape": [None, *example.shape[1:]]},
            "placeholders": placeholders, "nodes": nodes, "output": output}
    graph = ExportedGraph(spec, {k: torch.from_numpy(np.array(a)).to(_placeholder_dtype(v)).to(device)
                                 for (k, a), v in zip(arrays.items(), placeholders.values())})
    with torch.no_grad():
        got = graph(example)
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape or not torch.allclose(
            got.float(), expected.float(), rtol=1e-4, atol=1e-5, equal_nan=True):
        raise NotSavable("its exported graph does not reproduce the module's output on the example input")
    return spec, arrays


def _placeholder_dtype(entry: dict):
    return getattr(_torch(), entry["dtype"])


def _to_numpy(t) -> np.ndarray:
    torch = _torch()
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: stored as float32, cast back at load
        t = t.float()
    return t.numpy()


def torch_from_saved(spec: Any, arrays: Mapping[str, np.ndarray], where: str) -> ExportedGraph:
    """An :class:`ExportedGraph` from a saved ``spec`` (untrusted JSON) and its arrays, after
    checking every field; the shapes and dtypes of the arrays must be the declared ones."""
    torch = _torch()

    def bad(field: str, expected: str, got: Any) -> DataFormatError:
        return DataFormatError(f"The {where} is invalid: {field} must be {expected}. Got {got!r:.100}.")

    if not isinstance(spec, dict) or set(spec) != {"input", "placeholders", "nodes", "output"}:
        raise bad("the graph", "an object with the keys input, placeholders, nodes, output", spec)
    inp = spec["input"]
    if not isinstance(inp, dict) or set(inp) != {"name", "dtype", "shape"} or not isinstance(inp["name"], str) \
            or inp["dtype"] not in _DTYPES:
        raise bad("'input'", "an object with a name, a dtype and a shape", inp)
    shape = inp["shape"]
    if not isinstance(shape, list) or not 1 <= len(shape) <= MAX_RANK or shape[0] is not None \
            or not all(type(s) is int and 0 < s <= 1 << 24 for s in shape[1:]):
        raise bad("'input'['shape']", "[null, positive ints...] (null: the batch)", shape)
    ph = spec["placeholders"]
    if not isinstance(ph, dict) or set(ph) != set(arrays):
        raise bad("'placeholders'", f"an object naming exactly the arrays in the file {sorted(arrays)[:10]}",
                  sorted(ph) if isinstance(ph, dict) else ph)
    tensors = {}
    for name, entry in ph.items():
        if not isinstance(entry, dict) or set(entry) != {"shape", "dtype"} or entry["dtype"] not in _DTYPES:
            raise bad(f"'placeholders'[{name!r}]", "an object with a shape and a dtype", entry)
        arr = np.asarray(arrays[name])
        if list(arr.shape) != entry["shape"]:
            raise bad(f"'placeholders'[{name!r}]['shape']", f"the shape of its array {list(arr.shape)}",
                      entry["shape"])
        tensors[name] = torch.from_numpy(np.array(arr)).to(getattr(torch, entry["dtype"]))
    nodes = spec["nodes"]
    if not isinstance(nodes, list) or not 1 <= len(nodes) <= MAX_GRAPH_NODES:
        raise bad("'nodes'", f"a list of 1 to {MAX_GRAPH_NODES:,} nodes", type(nodes).__name__)
    seen = set(ph) | {inp["name"]}
    for j, node in enumerate(nodes):
        if not isinstance(node, dict) or set(node) != {"name", "op", "args", "kwargs"} \
                or not isinstance(node["name"], str) or node["name"] in seen or not isinstance(node["args"], list):
            raise bad(f"'nodes'[{j}]", "an object with a new name, an op, args (a list) and kwargs", node)
        seen.add(node["name"])
    if not isinstance(spec["output"], str):
        raise bad("'output'", "a node name", spec["output"])
    return ExportedGraph(spec, tensors, where)


def probe(model: Any, spec: dict, n_classes: int, where: str) -> None:
    """Run a loaded graph on zeros for batches of 1 and 3: it must give ``(batch, n_classes)``."""
    torch = _torch()
    shape = spec["input"]["shape"][1:]
    for n in (1, 3):
        x = torch.zeros((n, *shape), dtype=getattr(torch, spec["input"]["dtype"]))
        try:
            with torch.no_grad():
                out = model(x)
        except Exception as exc:
            raise DataFormatError(f"The {where} does not run ({type(exc).__name__}: {str(exc)[:300]}).") from None
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (n, n_classes):
            raise DataFormatError(
                f"The {where} returns {tuple(getattr(out, 'shape', ()))} for a batch of {n}; expected ({n}, "
                f"{n_classes}) logits.")
