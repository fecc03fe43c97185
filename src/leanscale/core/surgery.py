"""Module surgery: the one place where leanscale swaps layers of a model.

Modelled on MosaicML composer's ``replace_module_classes`` (``composer/utils/module_surgery.py``).
Ghost BatchNorm (BatchNorm -> GhostBatchNorm), SWAT (Linear/Conv -> sparse layers) and
mixture-of-experts (MLP -> MoE) all go through :func:`replace_module_classes`.

Differences from composer, on purpose:

* classes match **exactly** (``type(m) is cls``, not ``isinstance``), so applying a policy twice
  is a no-op when the replacement has another class, and a subclass is never rewritten by a
  policy written for its parent;
* every replacement is **built first** and swapped in only when all were built (and the optimizer
  updates planned), so an exception half-way leaves the model and the optimizers untouched;
* optimizer parameters are replaced **in place** (same param group, same position) when the old
  and new parameters match by position and shape; only the others are removed or appended.

Example:
    >>> import torch.nn as nn
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> replace_module_classes(model, {nn.ReLU: lambda module, index: nn.GELU()})
    {<class 'torch.nn.modules.activation.ReLU'>: 1}
    >>> count_modules(model, nn.GELU), count_modules(model, nn.ReLU)
    (1, 0)
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn

from leanscale.core.errors import InvalidParameterError

__all__ = ["ReplacementPolicy", "replace_module_classes", "count_modules"]

ReplacementPolicy = Callable[[nn.Module, int], "nn.Module | None"]
"""``policy(module, index) -> replacement or None``; ``index`` counts the modules of that class
met so far (in ``named_modules`` order, from ``indices[cls]`` or 0). ``None`` keeps the module."""


def _check_model(model, owner: str) -> None:
    if not isinstance(model, nn.Module):
        raise InvalidParameterError(
            f"The 'model' parameter of {owner} must be an instance of torch.nn.Module. "
            f"Got {type(model).__name__} instead."
        )
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise InvalidParameterError(
            f"The 'model' parameter of {owner} is wrapped in {type(model).__name__}: do the surgery "
            f"on model.module, then wrap it again."
        )


def count_modules(model: nn.Module, cls: type | tuple[type, ...]) -> int:
    """Number of distinct submodules of ``model`` (itself included) that are instances of ``cls``.

    This uses ``isinstance``: use it to check what a model contains, e.g. that no
    ``nn.BatchNorm2d`` is left after Ghost BatchNorm surgery.
    """
    _check_model(model, "count_modules")
    if not (isinstance(cls, type) or (isinstance(cls, tuple) and cls and all(isinstance(c, type) for c in cls))):
        raise InvalidParameterError(
            f"The 'cls' parameter of count_modules must be a class or a tuple of classes (e.g. nn.BatchNorm2d). "
            f"Got {cls!r} instead."
        )
    return sum(1 for m in model.modules() if isinstance(m, cls))


def _infer_device(module: nn.Module) -> torch.device | None:
    t = next(itertools.chain(module.parameters(), module.buffers()), None)
    return None if t is None else t.device


@dataclass
class _Swap:
    old: nn.Module
    new: nn.Module
    places: list[tuple[nn.Module, str]]  # (parent, attribute name), several if the module is shared


def _unique(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _plan_optimizer(
    opt: torch.optim.Optimizer, swaps: list[_Swap], still_used: set[int]
) -> tuple[list[tuple[int, int, torch.Tensor]], list[tuple[int, torch.Tensor]], list[torch.Tensor]]:
    """What to do to ``opt``: (slot replacements, appends, removed parameters).

    ``still_used`` holds the ids of the parameters the model keeps after the swap (a weight tied
    to a module that stays is not removed). Raises before anything changes when the new
    parameters have no obvious home.
    """
    where = {id(p): (g, i) for g, group in enumerate(opt.param_groups) for i, p in enumerate(group["params"])}
    replace, append, removed = [], [], []
    for swap in swaps:
        old_params = [p for p in _unique(swap.old.parameters()) if id(p) not in still_used]
        new_params = [p for p in _unique(swap.new.parameters()) if id(p) not in where]
        in_opt = [p for p in old_params if id(p) in where]
        # Position/shape matching (composer's approach): the k-th old parameter the optimizer
        # holds hands its slot (group, position) to the k-th new parameter while shapes agree.
        n_matched = 0
        for old_p, new_p in zip(in_opt, new_params):
            if old_p.shape != new_p.shape:
                break
            replace.append((*where[id(old_p)], new_p))
            n_matched += 1
        removed.extend(in_opt)
        leftover_new = new_params[n_matched:]
        if leftover_new:
            if in_opt:
                group = where[id(in_opt[0])][0]
            elif old_params:
                group = None  # the old module's parameters were not optimized: leave the new ones out too
            elif len(opt.param_groups) == 1:
                group = 0
            else:
                raise InvalidParameterError(
                    f"replace_module_classes cannot tell which of the optimizer's "
                    f"{len(opt.param_groups)} param groups should get the parameters of the new "
                    f"{type(swap.new).__name__} (the replaced {type(swap.old).__name__} had none). "
                    f"Add them yourself with optimizer.add_param_group."
                )
            if group is not None:
                append.extend((group, p) for p in leftover_new)
    return replace, append, removed


def _apply_optimizer_plan(opt: torch.optim.Optimizer, plan) -> None:
    replace, append, removed = plan
    for g, i, new_p in replace:  # positions refer to the lists before any change
        opt.param_groups[g]["params"][i] = new_p
    removed_ids = {id(p) for p in removed}
    for group in opt.param_groups:  # old tensors whose slot went to no new tensor
        group["params"] = [p for p in group["params"] if id(p) not in removed_ids]
    for g, new_p in append:
        opt.param_groups[g]["params"].append(new_p)
    for p in removed:  # stale state (momentum, Adam moments) of the removed tensors
        opt.state.pop(p, None)


def _params_kept(model: nn.Module, replaced: set[int]) -> set[int]:
    """Ids of the parameters of ``model`` outside the subtrees that will be replaced."""
    kept, seen = set(), set()

    def walk(module: nn.Module) -> None:
        kept.update(id(p) for p in module.parameters(recurse=False))
        for child in module.children():
            if id(child) not in replaced and id(child) not in seen:
                seen.add(id(child))
                walk(child)

    walk(model)
    return kept


def replace_module_classes(
    model: nn.Module,
    policies: Mapping[type, ReplacementPolicy],
    optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
    indices: dict[type, int] | None = None,
) -> dict[type, int]:
    """Replace, in place, the submodules of ``model`` whose class is a key of ``policies``.

    The model is walked in ``named_modules`` order. Each submodule whose class is exactly a key
    of ``policies`` is passed with its index to the policy, which returns a replacement module
    or ``None`` (keep it). A replaced module's children are not visited; a kept one's are. A module
    shared by several parents is offered once and replaced everywhere. The root ``model`` itself
    is never replaced. A replacement whose tensors are on another device than those of the module
    it replaces is moved to that device.

    Args:
        model: The model to modify, not wrapped in DistributedDataParallel.
        policies: Module class -> ``policy(module, index)``.
        optimizers: Optimizer(s) already holding the model's parameters. The old module's
            parameters are replaced by the new module's in their param groups: position by
            position while shapes match (the slot, hence the group and its hyperparameters, is
            kept); the remaining old ones are removed and the remaining new ones appended to the
            group of the old module's first parameter. The optimizer state of every removed
            parameter is dropped. Without optimizers, build the optimizer after the surgery.
        indices: Class -> index of its next instance. Updated in place, so successive calls can
            keep numbering (composer's behaviour); default: every class starts at 0.

    Returns:
        Class -> number of modules replaced (0 for a class with none), in the order of ``policies``.

    Raises:
        InvalidParameterError: ``model`` is not an ``nn.Module`` (or is wrapped in DDP), a policy
            key is not a module class, a policy is not callable or returns something other than a
            module or ``None``, or the optimizers cannot take the new parameters. Exceptions
            raised by a policy propagate. In every case the model is left unchanged.

    Example:
        >>> import torch, torch.nn as nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> policy = lambda bn, i: nn.LayerNorm(bn.num_features)
        >>> replace_module_classes(model, {nn.BatchNorm1d: policy}, optimizers=opt)
        {<class 'torch.nn.modules.batchnorm.BatchNorm1d'>: 1}
        >>> model[1].weight is opt.param_groups[0]["params"][2]
        True
        >>> replace_module_classes(model, {nn.BatchNorm1d: policy})  # idempotent
        {<class 'torch.nn.modules.batchnorm.BatchNorm1d'>: 0}
    """
    _check_model(model, "replace_module_classes")
    if not isinstance(policies, Mapping):
        raise InvalidParameterError(
            f"The 'policies' parameter of replace_module_classes must be a mapping from module "
            f"class to policy. Got {type(policies).__name__} instead."
        )
    for cls, policy in policies.items():
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise InvalidParameterError(
                f"The keys of the 'policies' parameter of replace_module_classes must be subclasses "
                f"of torch.nn.Module. Got {cls!r}."
            )
        if not callable(policy) or isinstance(policy, nn.Module):
            hint = " (a module instance; pass a function that builds one)" if callable(policy) else ""
            raise InvalidParameterError(
                f"The policy for {cls.__name__} in replace_module_classes must be callable "
                f"(module, index) -> module or None. Got {type(policy).__name__}{hint}."
            )
    if optimizers is None:
        opts: list[torch.optim.Optimizer] = []
    elif isinstance(optimizers, torch.optim.Optimizer):
        opts = [optimizers]
    else:
        opts = list(optimizers)
        for opt in opts:
            if not isinstance(opt, torch.optim.Optimizer):
                raise InvalidParameterError(
                    f"The 'optimizers' parameter of replace_module_classes must be an optimizer or a "
                    f"sequence of optimizers. Got an element of type {type(opt).__name__}."
                )
    counters = {cls: 0 for cls in policies}
    if indices is not None:
        counters.update({cls: indices.get(cls, 0) for cls in policies})

    # 1) Build every replacement; touch nothing of the model yet.
    swaps: dict[int, _Swap] = {}  # id(old module) -> swap
    decided: dict[int, nn.Module | None] = {}  # id(module) -> replacement (None: kept)
    visited: set[int] = set()

    def visit(parent: nn.Module) -> None:
        for name, child in list(parent._modules.items()):  # not named_children: it hides repeats
            if child is None:
                continue
            key = id(child)
            if key in swaps:  # shared module already replaced: replace it here too
                swaps[key].places.append((parent, name))
                continue
            cls = type(child)
            if cls in policies and key not in decided:
                index = counters[cls]
                counters[cls] += 1
                new = policies[cls](child, index)
                if new is not None and not isinstance(new, nn.Module):
                    raise InvalidParameterError(
                        f"The policy for {cls.__name__} in replace_module_classes must return a "
                        f"torch.nn.Module or None. Got {type(new).__name__}."
                    )
                decided[key] = None if new is child else new
                if decided[key] is not None:
                    device = _infer_device(child)
                    if device is not None and _infer_device(new) not in (None, device):
                        new.to(device)  # in place: the new module's Parameter objects are kept
                    swaps[key] = _Swap(child, new, [(parent, name)])
                    continue
            if key not in visited:
                visited.add(key)
                visit(child)

    visit(model)
    if opts and swaps:
        still_used = _params_kept(model, set(swaps))
        still_used |= {id(p) for swap in swaps.values() for p in swap.new.parameters()}
        plans = [_plan_optimizer(opt, list(swaps.values()), still_used) for opt in opts]
    else:
        plans = []

    # 2) Everything is built and planned: swap.
    for swap in swaps.values():
        for parent, name in swap.places:
            setattr(parent, name, swap.new)
    for opt, plan in zip(opts, plans):
        _apply_optimizer_plan(opt, plan)
    if indices is not None:
        indices.update(counters)

    replaced = {cls: 0 for cls in policies}
    for swap in swaps.values():
        replaced[type(swap.old)] += 1
    return replaced
