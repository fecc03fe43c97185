"""Expert parallelism for the mixture-of-experts layer: each process holds ``E / W`` experts and
tokens travel to their experts with ``all_to_all`` (GShard, Lepikhin et al. 2020, arXiv
2006.16668; Switch Transformers, Fedus et al. 2021, arXiv 2101.03961, section 2.1 and appendix).

With ``W`` processes in the group and ``E`` experts (``E % W == 0``), group rank ``r`` holds experts
``[r * E / W, (r + 1) * E / W)``; the router is replicated. One forward on rank ``r``, for its
``N`` local tokens:

1. **Routing** exactly as :class:`~leanscale.sparse.moe.MoE` (same code): router, top-k, gates,
   load-balancing loss and z-loss from the local tokens, capacity dropping, the kept assignments
   sorted by expert -- hence grouped by destination rank.
2. **Counts**: the ``E`` per-expert counts of kept assignments are exchanged with one
   ``all_to_all_single`` (rank ``r`` sends rank ``d`` the counts of ``d``'s experts), so every
   rank knows how many rows it receives from each rank for each of its experts.
3. **Dispatch**: the token rows go to the ranks of their experts with an autograd-aware
   ``all_to_all_single`` (its backward is the reverse ``all_to_all``); the received rows,
   source-rank-major, are regrouped by expert with one permutation.
4. **Experts**: each local expert runs its two matmuls on its contiguous slice (the same loop
   as :class:`MoE`).
5. **Combine**: the outputs go back with the reverse ``all_to_all``, arrive in the order the
   rows were sent, and are multiplied by their gates and scatter-added with ``index_add_``
   exactly as in :class:`MoE`.

**Capacity is per rank** (Switch's per-device capacity): each rank computes
``ceil(capacity_factor * N_local * top_k / E)`` from its own token count and drops its own
assignments beyond it (first choices before second choices, then token order), *before*
sending. An expert therefore processes at most ``W`` times that, and a rank drops exactly what a
single-process :class:`MoE` with the same weights would drop on that rank's tokens alone.
``capacity_factor=None`` is dropless (the exchanged sizes vary from step to step; gloo and
``all_to_all_single`` take uneven splits). ``load`` and ``dropped_fraction`` in the returned
:class:`~leanscale.sparse.moe.MoEOutput` are those of the local tokens.

**Gradients and DDP.** Train with data parallelism over the same group: every rank gets its own
slice of the batch and computes the mean loss of its tokens, ``L_r``. The replicated
parameters (router, attention, embeddings, ...) are averaged across ranks by DDP (or by
:func:`average_replicated_grads`), which gives the gradient of the global mean loss
``L = mean_r L_r`` (equal local batch sizes). The experts are different on every rank and must
**not** be averaged: :func:`apply_expert_parallel` / :func:`ddp_ignore_experts` register them
with DDP's ignore list (``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model``,
read when DDP is constructed, so mark before wrapping). An expert, though, receives tokens from
every rank, so the gradient that arrives through the reverse ``all_to_all`` is
``sum_r dL_r/dW_expert = W * dL/dW_expert``. The layer multiplies the expert parameters'
gradients by ``1 / W`` (an identity in the forward pass) so that after backward every
parameter, replicated or expert, holds the gradient of the global mean loss -- the gradient one
process computes on the whole batch. The gradient reaching the layer's *input* is that of the
local loss, as for any DDP model. The load-balancing loss is a product of two local means, so
(as with plain DDP) only the z-loss and the main loss average to their whole-batch values.

Every call is collective: all ranks of the group must construct, call ``forward`` and
``backward`` the same number of times, in the same order (with the same ``requires_grad``
on the input). The counts exchange costs one host synchronisation per forward, like the
``tolist()`` in :class:`MoE`.

Example (under ``torchrun --nproc_per_node=2``, gloo)::

    dist.init_process_group("gloo")
    model = apply_expert_parallel(apply_moe(GPT(config), n_experts=4, capacity_factor=None))
    ddp = DistributedDataParallel(model)           # experts are on DDP's ignore list
    opt = torch.optim.AdamW(ddp.parameters(), lr=3e-4)
    _, loss = ddp(x_local, y_local)                # this rank's slice of the batch
    (loss + moe_aux_loss(model)).backward(); opt.step()
    state = gathered_state_dict(model)             # full experts, loadable without parallelism
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from leanscale.core.errors import InvalidParameterError
from leanscale.core.validation import Interval, check_param
from leanscale.models.transformer import INIT_STD
from leanscale.sparse.moe import (
    _MOE_CONSTRAINTS,
    MoE,
    MoEOutput,
    _check_moe_params,
    _root,
    moe_layers,
)

__all__ = [
    "ExpertParallelMoE",
    "apply_expert_parallel",
    "average_replicated_grads",
    "ddp_ignore_experts",
    "expert_parameter_names",
    "gather_experts",
    "gathered_state_dict",
    "shard_experts",
]

EXPERT_PARAMS = ("w_fc", "w_proj", "b_fc", "b_proj")
_MOE_SIGNATURE = inspect.signature(MoE.__init__)  # ExpertParallelMoE binds its arguments with it


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` on dim 0 with uneven splits; backward: the reverse exchange.

    (``torch.distributed.nn.functional.all_to_all_single`` does the same but is deprecated and
    warns in torch 2.13.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_sizes: list[int], in_sizes: list[int], group: Any) -> torch.Tensor:
        ctx.out_sizes, ctx.in_sizes, ctx.group = out_sizes, in_sizes, group
        out = x.new_empty((sum(out_sizes), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_sizes, in_sizes, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        back = _AllToAll.apply(grad.contiguous(), ctx.in_sizes, ctx.out_sizes, ctx.group)
        return back, None, None, None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def _group_info(group: Any, owner: str) -> tuple[int, int]:
    """(world size, this process's rank) of ``group`` (None: the default group)."""
    if group is not None and not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise InvalidParameterError(
            f"The 'group' parameter of {owner} must be a torch.distributed.ProcessGroup or None (the "
            f"default group). Got {type(group).__name__} instead."
        )
    if not (dist.is_available() and dist.is_initialized()):
        raise InvalidParameterError(
            f"The 'group' parameter of {owner} needs an initialised torch.distributed process group "
            f"(expert parallelism exchanges tokens between processes): call "
            f"torch.distributed.init_process_group first, e.g. under torchrun. Got group={group!r} "
            f"with no process group initialised."
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise InvalidParameterError(
            f"The 'group' parameter of {owner} must be a process group this process belongs to. "
            f"Got a group without global rank {dist.get_rank()}."
        )
    return dist.get_world_size(group), rank


def _src(group: Any) -> int:
    """Global rank of the group's rank 0."""
    return 0 if group is None else dist.get_global_rank(group, 0)


class ExpertParallelMoE(MoE):
    """:class:`~leanscale.sparse.moe.MoE` with its experts sharded over the ranks of ``group``;
    see the module docstring for the algorithm, the per-rank capacity and the gradients.

    Takes the arguments of :class:`MoE`, plus ``group`` (a process group; ``None``: the default
    one). ``n_experts`` is the global number ``E``; this rank holds ``n_local_experts = E / W``
    experts, the global experts ``first_expert ... first_expert + n_local_experts - 1``, in
    ``w_fc`` (E/W, C, H), ``w_proj`` (E/W, H, C), ``b_fc`` (E/W, H), ``b_proj`` (E/W, C); the
    router (E, C) is replicated. It is a subclass of :class:`MoE`, so :class:`MoEMLP` can hold
    it and the cost ledger counts it with MoE's rule (router and kept assignments of this
    rank's tokens).

    Construction is collective (the router is broadcast from the group's rank 0). To start from
    an existing layer, e.g. to compare with one process, use :func:`shard_experts`.

    Raises:
        InvalidParameterError: a bad :class:`MoE` argument; no process group initialised or a
            bad ``group``; ``n_experts`` not divisible by the group's size.
    """

    def __init__(
        self,
        *args: Any,
        group: Any = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ):
        # MoE's arguments, bound as MoE binds them (the signature shown is __signature__ below).
        try:
            bound = _MOE_SIGNATURE.bind(self, *args, **kwargs)
        except TypeError as err:  # as Python words it for an ordinary signature, naming the class
            raise TypeError(f"ExpertParallelMoE() {err}") from None
        bound.apply_defaults()
        moe_args = {name: bound.arguments[name] for name in _MOE_CONSTRAINTS}
        owner = "ExpertParallelMoE"
        _refuse_form(bound.arguments["activation"], bound.arguments["gated"], owner)
        _check_moe_params(moe_args, owner=owner)
        if moe_args["n_shared_experts"]:
            raise InvalidParameterError(
                f"The 'n_shared_experts' parameter of {owner} must be 0: shared experts are not supported "
                f"with expert parallelism yet (train this model with plain DDP). Got {moe_args['n_shared_experts']}."
            )
        n_embd, hidden, n_experts, bias = (moe_args[k] for k in ("n_embd", "hidden", "n_experts", "bias"))
        hidden //= moe_args["granularity"]  # the width of one expert
        world, rank = _group_info(group, owner)
        if n_experts % world:
            raise InvalidParameterError(
                f"The 'n_experts' parameter of {owner} must be divisible by the number of processes "
                f"in the group, {world} (each holds n_experts / {world} experts). Got {n_experts} instead."
            )
        # MoE's constructor on the meta device: its checks and attributes, no memory for all E
        # experts. The real (local) parameters are made below.
        super().__init__(**moe_args, device="meta", dtype=dtype)
        self.group = group
        self.world_size, self.rank = world, rank
        self.n_local_experts = n_experts // world
        self.first_expert = rank * self.n_local_experts
        factory = {"device": device, "dtype": dtype}
        n_local = self.n_local_experts
        self.router = nn.Linear(n_embd, n_experts, bias=False, **factory)
        if self.expert_bias is not None:  # replicated, like the router (moe_update_bias all-reduces the counts)
            self.expert_bias = torch.zeros(n_experts, device=device, dtype=torch.float32)
        self.w_fc = nn.Parameter(torch.empty(n_local, n_embd, hidden, **factory))
        self.w_proj = nn.Parameter(torch.empty(n_local, hidden, n_embd, **factory))
        if bias:
            self.b_fc = nn.Parameter(torch.empty(n_local, hidden, **factory))
            self.b_proj = nn.Parameter(torch.empty(n_local, n_embd, **factory))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = INIT_STD, proj_std: float | None = None) -> None:
        """As :meth:`MoE.reset_parameters`, drawing the full ``(E, ...)`` tensors and keeping this
        rank's slice (then broadcasting the router from the group's rank 0). With the same seed
        on every rank the layer thus equals :func:`shard_experts` of an ``MoE`` built with that
        seed, and the experts differ across ranks (drawing only the local slice would give every
        rank the same experts). Collective; costs the full tensors transiently."""
        check_param("std", std, [Interval("real", 0, None)], owner="ExpertParallelMoE.reset_parameters")
        check_param("proj_std", proj_std, [Interval("real", 0, None), None],
                    owner="ExpertParallelMoE.reset_parameters")
        if self.w_fc.is_meta:  # inside MoE.__init__ (before the local parameters exist), or on meta
            return
        nn.init.normal_(self.router.weight, mean=0.0, std=std)
        local = slice(self.first_expert, self.first_expert + self.n_local_experts)
        for name, s in (("w_fc", std), ("w_proj", std if proj_std is None else proj_std)):
            param = getattr(self, name)
            full = param.new_empty((self.n_experts, *param.shape[1:]))
            nn.init.normal_(full, mean=0.0, std=s)
            param.copy_(full[local])
        if self.b_fc is not None:
            nn.init.zeros_(self.b_fc)
            nn.init.zeros_(self.b_proj)
        dist.broadcast(self.router.weight.data, src=_src(self.group), group=self.group)

    def forward(self, x: torch.Tensor) -> MoEOutput:
        xf = self._check_input(x, "ExpertParallelMoE.forward")  # (N, C) local tokens
        W, El = self.world_size, self.n_local_experts
        plan = self._plan(xf, x.shape[-2] if x.ndim >= 3 else None)  # kept assignments grouped by expert

        # Counts: send_counts[d * El + e] rows for expert e of rank d; recv_counts[s * El + e]
        # rows from rank s for local expert e.
        send_counts = plan.kept_counts.contiguous()  # (E,) int64
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send_sizes = send_counts.view(W, El).sum(1).tolist()  # rows to each rank
        recv_sizes = recv_counts.view(W, El).sum(1).tolist()  # rows from each rank
        expert_sizes = recv_counts.view(W, El).sum(0).tolist()  # rows for each local expert
        n_kept = sum(send_sizes)

        # Dispatch; regroup the received rows (source-major) expert-major.
        xin = xf.index_select(0, plan.kept_tokens)  # (M, C)
        xr = _AllToAll.apply(xin, recv_sizes, send_sizes, self.group)  # (R, C)
        perm = None
        if W > 1 and El > 1:
            label = torch.repeat_interleave(torch.arange(W * El, device=xf.device), recv_counts)  # s*El+e
            perm = torch.argsort((label % El) * W + label // El, stable=True)  # (R,)
            xr = xr.index_select(0, perm)

        # Local experts on contiguous slices; the expert gradients scaled by 1/W (module docstring).
        params = [getattr(self, n) for n in EXPERT_PARAMS]
        if W > 1:
            params = [None if p is None else _ScaleGrad.apply(p, 1.0 / W) for p in params]
        y = torch.cat([self._expert(e, xe, params) for e, xe in enumerate(torch.split(xr, expert_sizes))])
        # y: (R, C) expert-major
        if perm is not None:
            inverse = torch.empty_like(perm)
            inverse[perm] = torch.arange(perm.numel(), device=perm.device)
            y = y.index_select(0, inverse)  # back to source-major

        # Combine: the rows return in the order they were sent, i.e. plan.kept_tokens' order.
        y = _AllToAll.apply(y, send_sizes, recv_sizes, self.group)  # (M, C)
        return self._combine(y, plan, x, n_kept)

    def extra_repr(self) -> str:
        last = self.first_expert + self.n_local_experts - 1
        return (
            f"{super().extra_repr()}, world_size={self.world_size}, rank={self.rank}, "
            f"local_experts={self.first_expert}..{last}"
        )


# ExpertParallelMoE takes MoE's arguments plus ``group``: its signature, for help() and IDEs.
ExpertParallelMoE.__init__.__signature__ = _MOE_SIGNATURE.replace(parameters=[
    *(p for p in _MOE_SIGNATURE.parameters.values() if p.name not in ("device", "dtype")),
    inspect.Parameter("group", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="Any"),
    *(p for p in _MOE_SIGNATURE.parameters.values() if p.name in ("device", "dtype")),
])


def _refuse_form(activation: Any, gated: Any, owner: str) -> None:
    """Expert parallelism shards GELU, non-gated experts only (so far): refuse the others rather
    than silently drop their gate or activation."""
    if gated or activation is not None:
        raise InvalidParameterError(
            f"{owner} supports only GELU, non-gated experts (MoE(activation=None, gated=False)), "
            f"such as apply_moe makes for leanscale's GPT. Got gated={bool(gated)}, "
            f"activation={type(activation).__name__ if activation is not None else None} instead: "
            f"train this model with plain DDP (every expert replicated)."
        )


def _moe_kwargs(moe: MoE) -> dict[str, Any]:
    return {
        "n_embd": moe.n_embd, "hidden": moe.hidden * moe.granularity, "n_experts": moe.n_experts,
        "top_k": moe.top_k, "capacity_factor": moe.capacity_factor, "jitter": moe.jitter,
        "load_balancing_coef": moe.load_balancing_coef, "z_loss_coef": moe.z_loss_coef,
        "bias": moe.b_fc is not None, "dropout": moe.dropout.p, "bias_update_rate": moe.bias_update_rate,
        "gate": moe.gate, "balance_loss": moe.balance_loss, "n_shared_experts": moe.n_shared_experts,
        "granularity": moe.granularity,
    }


def shard_experts(moe: MoE, group: Any = None) -> ExpertParallelMoE:
    """An :class:`ExpertParallelMoE` with ``moe``'s configuration and weights that keeps only this
    rank's experts (``moe`` is left as it is). ``moe`` should be the same on every rank (same
    seed, or loaded from the same checkpoint); its router is broadcast from the group's rank 0
    all the same. Collective.

    Raises:
        InvalidParameterError: ``moe`` is not a (non-parallel) :class:`MoE`; see
            :class:`ExpertParallelMoE` for the group and divisibility errors.
    """
    if not isinstance(moe, MoE) or isinstance(moe, ExpertParallelMoE):
        raise InvalidParameterError(
            f"The 'moe' parameter of shard_experts must be a leanscale.sparse.MoE (not already "
            f"expert-parallel). Got {type(moe).__name__} instead."
        )
    _refuse_form(moe.activation, moe.gated, "shard_experts")
    ref = moe.w_fc
    ep = ExpertParallelMoE(**_moe_kwargs(moe), group=group, device="meta", dtype=ref.dtype)
    ep = ep.to_empty(device=ref.device)
    local = slice(ep.first_expert, ep.first_expert + ep.n_local_experts)
    with torch.no_grad():
        ep.router.weight.copy_(moe.router.weight)
        if moe.expert_bias is not None:
            ep.expert_bias.copy_(moe.expert_bias)
        for name in EXPERT_PARAMS:
            if getattr(moe, name) is not None:
                getattr(ep, name).copy_(getattr(moe, name)[local])
        dist.broadcast(ep.router.weight.data, src=_src(group), group=group)
    ep.train(moe.training)
    return ep


def _check_ep(ep: Any, name: str, owner: str) -> None:
    if not isinstance(ep, ExpertParallelMoE):
        raise InvalidParameterError(
            f"The '{name}' parameter of {owner} must be an ExpertParallelMoE. Got {type(ep).__name__} instead."
        )


@torch.no_grad()
def _gather(ep: ExpertParallelMoE, name: str) -> torch.Tensor:
    local = getattr(ep, name).detach().contiguous()
    parts = [torch.empty_like(local) for _ in range(ep.world_size)]
    dist.all_gather(parts, local, group=ep.group)
    return torch.cat(parts)


def gather_experts(ep_moe: ExpertParallelMoE) -> MoE:
    """A full :class:`MoE` with all ``E`` experts gathered from the ranks (``all_gather``), this
    rank's router, and the same configuration and train/eval mode, on every rank; e.g. to save,
    evaluate on one process, or compare with a single-process run. Collective."""
    _check_ep(ep_moe, "ep_moe", "gather_experts")
    ref = ep_moe.w_fc
    full = MoE(**_moe_kwargs(ep_moe), device="meta", dtype=ref.dtype).to_empty(device=ref.device)
    with torch.no_grad():
        full.router.weight.copy_(ep_moe.router.weight)
        if ep_moe.expert_bias is not None:
            full.expert_bias.copy_(ep_moe.expert_bias)
        for name in EXPERT_PARAMS:
            if getattr(ep_moe, name) is not None:
                getattr(full, name).copy_(_gather(ep_moe, name))
    full.train(ep_moe.training)
    return full


def _ep_modules(model: nn.Module) -> list[tuple[str, ExpertParallelMoE]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ExpertParallelMoE)]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Fully qualified names (as in ``model.named_parameters()``) of the local expert parameters
    of every :class:`ExpertParallelMoE` in ``model`` (DDP-wrapped or not: names of the inner
    module)."""
    root = _root(model, "expert_parameter_names")
    return [
        _join(prefix, name)
        for prefix, m in _ep_modules(root)
        for name in EXPERT_PARAMS
        if getattr(m, name) is not None
    ]


def ddp_ignore_experts(model: nn.Module) -> nn.Module:
    """Put the expert parameters of ``model`` on DDP's ignore list (added to any names already
    there), so that ``DistributedDataParallel(model)`` neither broadcasts them from rank 0 at
    construction nor averages their gradients. Call before wrapping. Returns ``model``."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise InvalidParameterError(
            "The 'model' parameter of ddp_ignore_experts must not be wrapped in DistributedDataParallel "
            "yet (DDP reads its ignore list when it is constructed). Got a DistributedDataParallel."
        )
    root = _root(model, "ddp_ignore_experts")
    names = set(getattr(root, "_ddp_params_and_buffers_to_ignore", ())) | set(expert_parameter_names(root))
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(root, sorted(names))
    return model


def apply_expert_parallel(model: nn.Module, group: Any = None) -> nn.Module:
    """Shard the experts of every :class:`~leanscale.sparse.moe.MoEMLP` of ``model`` over
    ``group`` (:func:`shard_experts`, in place) and put them on DDP's ignore list
    (:func:`ddp_ignore_experts`). Call on every rank with the same model (same seed), after
    :func:`~leanscale.sparse.apply_moe`, before wrapping in DDP and before building the
    optimizer. Returns ``model``.

    Raises:
        InvalidParameterError: ``model`` is DDP-wrapped or has no MoE layer; see
            :class:`ExpertParallelMoE` for the group and divisibility errors.
    """
    owner = "apply_expert_parallel"
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise InvalidParameterError(
            f"The 'model' parameter of {owner} must not be wrapped in DistributedDataParallel yet "
            f"(shard first, then wrap). Got a DistributedDataParallel."
        )
    root = _root(model, owner)
    layers = moe_layers(root)
    if not layers:
        raise InvalidParameterError(
            f"The 'model' parameter of {owner} must contain MoEMLP layers (see apply_moe). "
            f"Got a {type(root).__name__} without any."
        )
    for _, layer in layers:
        if not isinstance(layer.moe, ExpertParallelMoE):
            layer.moe = shard_experts(layer.moe, group)
    return ddp_ignore_experts(model)


@torch.no_grad()
def average_replicated_grads(model: nn.Module, group: Any = None) -> None:
    """Average across ``group`` the gradients of every parameter of ``model`` that is not a local
    expert parameter (one ``all_reduce`` of a flat buffer; a missing gradient counts as zero) --
    what DDP does, for training without DDP. Expert gradients are left alone: they are already
    those of the global mean loss (module docstring). Collective."""
    root = _root(model, "average_replicated_grads")
    world, _ = _group_info(group, "average_replicated_grads")
    experts = {id(getattr(m, n)) for _, m in _ep_modules(root) for n in EXPERT_PARAMS if getattr(m, n) is not None}
    params = [p for p in root.parameters() if p.requires_grad and id(p) not in experts]
    if not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat, group=group)
    flat /= world
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def gathered_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with the expert tensors of every :class:`ExpertParallelMoE`
    replaced by the gathered full ``(E, ...)`` tensors: the state dict of the same model without
    expert parallelism (loadable into it, e.g. to save a checkpoint). Collective."""
    root = _root(model, "gathered_state_dict")
    state = root.state_dict()
    for prefix, m in _ep_modules(root):
        for name in EXPERT_PARAMS:
            if getattr(m, name) is not None:
                state[_join(prefix, name)] = _gather(m, name)
    return state
