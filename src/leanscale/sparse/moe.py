"""Mixture-of-experts feed-forward layer (Switch Transformer, GShard), a drop-in for the GPT MLP
and for the feed-forward blocks of Hugging Face and torch transformers (see
:mod:`leanscale.sparse.moe_targets` for the forms :func:`apply_moe` recognises).

A mixture-of-experts (MoE) layer holds ``E`` expert MLPs and a router; every token is processed
by only ``top_k`` of them, so parameters grow ``E``-fold while the FLOPs per token stay those of
``top_k`` dense MLPs (plus the router). References:

* Shazeer et al. 2017, "Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts
  Layer", arXiv 1701.06538 -- the gated MoE layer and its balancing losses;
* Lepikhin et al. 2020, "GShard", arXiv 2006.16668 -- top-2 routing with renormalised gates,
  expert capacity, second choices dispatched after all first choices;
* Fedus et al. 2021, "Switch Transformers", arXiv 2101.03961 -- top-1 routing, the capacity
  factor, the load-balancing loss (eq. 4), router in float32, multiplicative jitter;
* Zoph et al. 2022, "ST-MoE", arXiv 2202.08906 -- the router z-loss (eq. 5);
* Komatsuzaki et al. 2022, "Sparse Upcycling", arXiv 2212.05055 -- experts initialised as copies
  of a trained dense MLP (``init="copy"``);
* Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts", arXiv
  2408.15664, and DeepSeek-V3, arXiv 2412.19437 sec. 2.1.2 -- the selection bias
  (``bias_update_rate``), MaxVio, sigmoid gates, the sequence-wise balancing loss; Dai et al.
  2024, "DeepSeekMoE", arXiv 2401.06066 -- shared and fine-grained experts;
* Qiu et al. 2025, "Demons in the Detail" (Qwen), arXiv 2501.11873 -- the global-batch
  balancing loss.

For ``N`` tokens of width ``C``, ``E`` experts of hidden width ``H`` and ``k = top_k``:

1. **Router** (float32, also under autocast): ``logits = x W_r^T`` (N, E), scores
   ``p = softmax(logits)`` (``gate="sigmoid"``: ``p = sigmoid(logits)``, DeepSeek-V3).
   In training, with ``jitter > 0``, the router input is first multiplied by noise drawn
   uniformly from ``[1 - jitter, 1 + jitter]`` (Switch; the experts see the clean input).
2. **Top-k**: each token picks the ``k`` experts of highest ``p + b``, ``b`` the per-expert
   selection bias (``expert_bias``; zero and absent unless ``bias_update_rate > 0``). Gates use
   the **unbiased** scores: top-1 the chosen expert's score (Switch); top-k with ``k >= 2``
   renormalises the ``k`` scores to sum to 1 (GShard; DeepSeek-V3 for sigmoid scores).
   Aux-loss-free balancing (Wang et al. 2024): after each optimizer step
   :func:`moe_update_bias` sets ``b_i += bias_update_rate * sign(mean_j c_j - c_i)`` with ``c``
   the assignments per expert of the step's training forwards (summed over the ranks under
   torch.distributed), so an overloaded expert is chosen less and an idle one more, without a
   gradient. ``moe_update_bias(model, rate=r)`` uses ``r`` instead of ``bias_update_rate`` for
   that update (a schedule; DeepSeek-V3 sets it to 0 for the last part of training).
3. **Capacity**: expert ``i`` processes at most ``ceil(capacity_factor * N * k / E)``
   assignments. Priority: **all first choices before any second choice** (then all second
   choices before any third, ...), and within one choice rank **by token position** (the order
   of the flattened ``(..., C)`` input). Assignments beyond capacity are dropped: they contribute
   0, and the residual connection around the layer carries the token unchanged.
   ``capacity_factor=None`` is dropless.
4. **Experts**: ``y_i = act(x W_fc[i] + b_fc[i]) W_proj[i] + b_proj[i]`` with ``act`` GELU by
   default (or the ``activation`` given); gated experts (``gated=True``, Llama-style SwiGLU)
   compute ``y_i = (act(x W_gate[i] + b_gate[i]) * (x W_fc[i] + b_fc[i])) W_proj[i] + b_proj[i]``.
   Output: ``sum over kept assignments of gate * y_expert(token)``, plus, with
   ``n_shared_experts > 0``, the shared experts (ungated, on every token; DeepSeekMoE).
   ``granularity=m`` makes each expert ``hidden / m`` wide (fine-grained experts: with ``m``
   times the experts and ``top_k`` the active FLOPs stay the same).
5. **Auxiliary losses**, to be added to the training loss (:func:`moe_aux_loss`):
   load balancing (Switch eq. 4, ``N`` there is the number of experts)
   ``load_balancing_coef * E * sum_i f_i P_i`` with ``f_i`` the fraction of the ``N * k``
   assignments routed to expert ``i`` **before** capacity dropping and ``P_i`` the mean router
   probability of expert ``i``; and the z-loss ``z_loss_coef * mean(logsumexp(logits)^2)``.
   ``balance_loss="sequence"`` computes ``f_i`` and ``P_i`` per sequence (the second-to-last
   axis of the input) and averages the losses (DeepSeek-V3 eq. 17-20); ``"global"`` counts
   ``f_i`` over the tokens of all ranks (one ``all_reduce``; Qwen's global-batch loss), and inside
   :func:`moe_global_batch` also over the step's gradient-accumulation micro-batches so far. For
   sigmoid scores ``P_i`` averages the scores normalised to sum to 1 per token.
   Counting ``f_i`` after dropping (as some implementations do) hides the overload the loss is
   meant to penalise: an expert that received 90% of the tokens but kept only its capacity looks
   barely overloaded.

Dispatch is sort-based, with no loop over tokens: the ``N * k`` assignments are listed in
priority order, stably sorted by expert, numbered within their expert with a cumulative count,
filtered by capacity, and each expert runs two matmuls on its contiguous slice; the gated outputs
are scatter-added back with ``index_add_``.

Example:
    >>> import torch
    >>> moe = MoE(n_embd=16, hidden=32, n_experts=4, top_k=2)
    >>> out = moe(torch.randn(2, 10, 16))
    >>> tuple(out.output.shape), tuple(out.load.shape), round(float(out.load.sum()), 6)
    ((2, 10, 16), (4,), 1.0)

    Convert every second MLP of a GPT (Switch's layout) and add the auxiliary losses:

    >>> from leanscale.models import GPT, GPTConfig
    >>> model = apply_moe(GPT(GPTConfig(64, 16, n_layer=2, n_head=2, n_embd=16)), n_experts=4)
    >>> [type(block.mlp).__name__ for block in model.transformer.h]
    ['MLP', 'MoEMLP']
    >>> idx = torch.randint(0, 64, (2, 16))
    >>> logits, loss = model(idx, targets=idx)
    >>> (loss + moe_aux_loss(model)).backward()
    >>> [row["name"] for row in moe_stats(model)]
    ['transformer.h.1.mlp']
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from leanscale.core.errors import InvalidParameterError
from leanscale.core.flops import register_flop_rule
from leanscale.core.validation import Interval, Options, check_param, unknown_name_error
from leanscale.models.transformer import INIT_STD, MLP

__all__ = [
    "MoE",
    "MoEMLP",
    "MoEOutput",
    "apply_moe",
    "moe_aux_loss",
    "moe_global_batch",
    "moe_layers",
    "moe_stats",
    "moe_update_bias",
]

INITS = ("random", "copy")
SHARED_PARAMS = ("shared_fc", "shared_proj", "shared_gate", "shared_b_fc", "shared_b_proj", "shared_b_gate")
GATES = ("softmax", "sigmoid")
BALANCE_LOSSES = ("batch", "sequence", "global")

# capacity_factor * N * k / E is rounded to this many decimals before ceil(), so that a product
# that is an integer on paper (1.1 * 4000 / 4 = 1100) but not in floating point
# (1100.0000000000002) does not get one extra slot.
_CAPACITY_DECIMALS = 6

_MOE_CONSTRAINTS = {
    "n_embd": [Interval(int, 1, None)],
    "hidden": [Interval(int, 1, None)],
    "n_experts": [Interval(int, 1, None)],
    "top_k": [Interval(int, 1, None)],
    "capacity_factor": [Interval("real", 0, None, closed="neither"), None],
    "jitter": [Interval("real", 0, 1, closed="left")],
    "load_balancing_coef": [Interval("real", 0, None)],
    "z_loss_coef": [Interval("real", 0, None)],
    "bias": [bool],
    "dropout": [Interval("real", 0, 1, closed="left")],
    "bias_update_rate": [Interval("real", 0, None)],
    "gate": [Options(GATES)],
    "balance_loss": [Options(BALANCE_LOSSES)],
    "n_shared_experts": [Interval(int, 0, None)],
    "granularity": [Interval(int, 1, None)],
}



class _FunctionActivation(nn.Module):
    """A plain function (``F.relu``, ``torch.tanh``...) as a module, so that an expert activation
    is always a module (shown by ``print(model)``, copied by ``copy.deepcopy``)."""

    def __init__(self, fn: Any):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__qualname__", repr(self.fn))


def _check_form(activation: Any, gated: Any, owner: str) -> nn.Module | None:
    """The activation as a module (``None``: GELU, exactly the historical ``F.gelu``)."""
    check_param("gated", gated, [bool], owner=owner)
    if activation is None or isinstance(activation, nn.Module):
        return activation
    if callable(activation):
        return _FunctionActivation(activation)
    raise InvalidParameterError(
        f"The 'activation' parameter of {owner} must be None (GELU), an nn.Module or a callable "
        f"tensor -> tensor. Got {type(activation).__name__} instead."
    )

# Dispatch choice, measured on this project's 2-core CPU (OMP_NUM_THREADS=1, torch 2.13, float32)
# for E=8, N=4096, C=128, H=512, top-1, capacity_factor=1.25 (median of 7 runs):
#   loop over experts, torch.split by counts, one matmul pair each: forward 15.6 ms, fwd+bwd 46 ms
#   padded torch.bmm over (E, capacity, C):                          forward 27.6 ms, fwd+bwd 70 ms
# The loop does no padded work (capacity_factor 1.25 pads 25%), needs no scatter into a padded
# buffer, and handles dropless routing without padding to the largest expert. We keep the loop.


class MoEOutput(NamedTuple):
    """What :meth:`MoE.forward` returns.

    Attributes:
        output: The layer's output, same shape as its input.
        load_balancing_loss: 0-d float32, ``coef * E * sum_i f_i P_i`` (already scaled by its coef).
        z_loss: 0-d float32, ``coef * mean(logsumexp(logits)^2)`` (already scaled by its coef).
        load: ``(E,)`` float32, ``f_i``: fraction of the ``N * top_k`` routing assignments sent
            to expert ``i``, counted before capacity dropping (sums to 1).
        dropped_fraction: Dropped assignments / all assignments (a Python float; 0 when dropless).
    """

    output: torch.Tensor
    load_balancing_loss: torch.Tensor
    z_loss: torch.Tensor
    load: torch.Tensor
    dropped_fraction: float


class _Plan(NamedTuple):
    """The routing of one forward (:meth:`MoE._plan`): the ``M`` kept assignments, grouped by
    expert (ascending) and in priority order within an expert."""

    kept_tokens: torch.Tensor  # (M,) token index of each kept assignment
    kept_gates: torch.Tensor  # (M,) float32 gate of each kept assignment
    kept_counts: torch.Tensor  # (E,) int64 kept assignments per expert (sums to M)
    load_balancing_loss: torch.Tensor  # 0-d, scaled by its coef
    z_loss: torch.Tensor  # 0-d, scaled by its coef
    load: torch.Tensor  # (E,) f_i before dropping, detached


def _world(group: Any) -> int:
    """Processes in ``group`` (1 without an initialised torch.distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _max_vio(counts: torch.Tensor) -> float | None:
    """MaxVio (Wang et al. 2024): ``max_i c_i / mean(c) - 1`` of the assignments per expert;
    0 is perfect balance, ``E - 1`` everything on one expert. ``None`` when nothing is counted."""
    total = float(counts.sum())
    if total <= 0:
        return None
    return float(counts.max()) * counts.numel() / total - 1.0


def _check_rate(rate: Any, owner: str) -> float:
    """``rate`` of :func:`moe_update_bias` / :meth:`MoE.update_bias` as a float: a finite real >= 0."""
    ok = isinstance(rate, numbers.Real) and not isinstance(rate, bool) and math.isfinite(rate) and rate >= 0
    if not ok:
        raise InvalidParameterError(
            f"The 'rate' parameter of {owner} must be a finite real number >= 0 (the bias step u of this "
            f"update; None: each layer's bias_update_rate). Got {rate!r} instead."
        )
    return float(rate)


def _check_moe_params(params: dict[str, Any], owner: str) -> None:
    for name, value in params.items():
        check_param(name, value, _MOE_CONSTRAINTS[name], owner=owner)
        if isinstance(value, float) and math.isinf(value):  # Interval(..., None) admits inf
            raise InvalidParameterError(
                f"The {name!r} parameter of {owner} must be finite"
                + (" (None means dropless: no capacity)" if name == "capacity_factor" else "") + f". Got {value!r} instead."
            )
    if "top_k" in params and "n_experts" in params and params["top_k"] > params["n_experts"]:
        raise InvalidParameterError(
            f"The 'top_k' parameter of {owner} must be at most n_experts={params['n_experts']} "
            f"(each token picks top_k distinct experts). Got {params['top_k']} instead."
        )
    granularity = params.get("granularity", 1)
    if "hidden" in params and granularity > 1 and params["hidden"] % granularity:
        raise InvalidParameterError(
            f"The 'granularity' parameter of {owner} must divide hidden={params['hidden']} (each expert "
            f"gets hidden / granularity units). Got {granularity} instead."
        )


class MoE(nn.Module):
    """Mixture-of-experts feed-forward layer; see the module docstring for the algorithm.

    Args:
        n_embd: Input and output width ``C``.
        hidden: Hidden width ``H`` of each expert.
        n_experts: Number of experts ``E``.
        top_k: Experts per token (1: Switch, 2: GShard).
        capacity_factor: Capacity of each expert as a multiple of its even share
            ``N * top_k / E`` of the assignments; ``None``: dropless (no capacity).
        jitter: Multiplicative noise on the router input in training, uniform in
            ``[1 - jitter, 1 + jitter]`` (Switch used 0.01); 0 disables it.
        load_balancing_coef: Weight of the load-balancing loss (Switch: 0.01).
        z_loss_coef: Weight of the router z-loss (ST-MoE: 1e-3).
        bias: Give the experts biases.
        dropout: Dropout on the output (as :class:`~leanscale.models.transformer.MLP`).
        activation: The experts' activation: ``None`` (GELU), an ``nn.Module`` or a function
            (kept as a module). :func:`apply_moe` passes the converted model's own.
        gated: Gated (GLU) experts, as Llama's MLP: ``(act(x W_gate) * (x W_fc)) W_proj``.
        bias_update_rate: Aux-loss-free balancing: the step ``u`` of the selection bias
            (Wang et al.: 1e-3); 0 (default) disables it. Call :func:`moe_update_bias` after
            every optimizer step. Usually with ``load_balancing_coef=0``.
        gate: ``"softmax"`` (Switch) or ``"sigmoid"`` (DeepSeek-V3) scores.
        balance_loss: ``"batch"`` (Switch, this micro-batch), ``"sequence"`` (per sequence,
            DeepSeek-V3) or ``"global"`` (``f_i`` over all ranks' tokens, Qwen; and over the
            gradient-accumulation micro-batches of a step inside :func:`moe_global_batch`).
        n_shared_experts: Always-active experts, each ``hidden / granularity`` wide (DeepSeekMoE).
        granularity: Each expert ``hidden / granularity`` wide (fine-grained experts); must
            divide ``hidden``.
        device, dtype: Where and in which dtype to create the parameters.

    Parameters: ``router.weight`` (E, C); ``w_fc`` (E, C, H); ``w_proj`` (E, H, C); with
    ``bias``, ``b_fc`` (E, H) and ``b_proj`` (E, C); when ``gated``, ``w_gate`` (E, C, H) (and
    ``b_gate`` (E, H) with ``bias``); with shared experts ``shared_fc`` (C, S), ``shared_proj``
    (S, C) (``S = n_shared_experts * H``, and ``shared_gate``, ``shared_b_*`` as above). ``H`` is
    ``hidden / granularity``. Buffer: ``expert_bias`` (E,) float32 when ``bias_update_rate > 0``
    (in the state dict; keep it float32: ``model.half()`` would round the small steps away).
    Initialisation: normal with std 0.02 (GPT-2), biases zero; see :meth:`reset_parameters`.
    """

    def __init__(
        self,
        n_embd: int,
        hidden: int,
        n_experts: int,
        top_k: int = 1,
        capacity_factor: float | None = 1.25,
        jitter: float = 0.0,
        load_balancing_coef: float = 0.01,
        z_loss_coef: float = 1e-3,
        bias: bool = False,
        dropout: float = 0.0,
        activation: nn.Module | Any | None = None,
        gated: bool = False,
        *,
        bias_update_rate: float = 0.0,
        gate: str = "softmax",
        balance_loss: str = "batch",
        n_shared_experts: int = 0,
        granularity: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        activation = _check_form(activation, gated, "MoE")
        _check_moe_params(
            {
                "n_embd": n_embd, "hidden": hidden, "n_experts": n_experts, "top_k": top_k,
                "capacity_factor": capacity_factor, "jitter": jitter, "load_balancing_coef": load_balancing_coef,
                "z_loss_coef": z_loss_coef, "bias": bias, "dropout": dropout,
                "bias_update_rate": bias_update_rate, "gate": gate, "balance_loss": balance_loss,
                "n_shared_experts": n_shared_experts, "granularity": granularity,
            },
            owner="MoE",
        )
        self.granularity = granularity
        hidden = hidden // granularity  # the width of one (fine-grained) expert
        self.n_embd, self.hidden, self.n_experts, self.top_k = n_embd, hidden, n_experts, top_k
        self.capacity_factor = None if capacity_factor is None else float(capacity_factor)
        self.jitter = float(jitter)
        self.load_balancing_coef = float(load_balancing_coef)
        self.z_loss_coef = float(z_loss_coef)
        self.bias_update_rate = float(bias_update_rate)
        self.gate, self.balance_loss, self.n_shared_experts = gate, balance_loss, n_shared_experts
        factory = {"device": device, "dtype": dtype}
        self.router = nn.Linear(n_embd, n_experts, bias=False, **factory)  # x -> expert logits
        self.w_fc = nn.Parameter(torch.empty(n_experts, n_embd, hidden, **factory))  # (E, C, H)
        self.w_proj = nn.Parameter(torch.empty(n_experts, hidden, n_embd, **factory))  # (E, H, C)
        if bias:
            self.b_fc = nn.Parameter(torch.empty(n_experts, hidden, **factory))  # (E, H)
            self.b_proj = nn.Parameter(torch.empty(n_experts, n_embd, **factory))  # (E, C)
        else:
            self.register_parameter("b_fc", None)
            self.register_parameter("b_proj", None)
        self.gated = gated
        if gated:  # the gate projection of a gated (GLU) expert, registered after the others
            self.w_gate = nn.Parameter(torch.empty(n_experts, n_embd, hidden, **factory))  # (E, C, H)
            if bias:
                self.b_gate = nn.Parameter(torch.empty(n_experts, hidden, **factory))  # (E, H)
            else:
                self.register_parameter("b_gate", None)
        else:
            self.register_parameter("w_gate", None)
            self.register_parameter("b_gate", None)
        if n_shared_experts:  # always-active experts, fused into one MLP of width n_shared * hidden
            S = n_shared_experts * hidden
            self.shared_fc = nn.Parameter(torch.empty(n_embd, S, **factory))  # (C, S)
            self.shared_proj = nn.Parameter(torch.empty(S, n_embd, **factory))  # (S, C)
            self.shared_gate = nn.Parameter(torch.empty(n_embd, S, **factory)) if gated else None  # (C, S)
            self.shared_b_fc = nn.Parameter(torch.empty(S, **factory)) if bias else None  # (S,)
            self.shared_b_proj = nn.Parameter(torch.empty(n_embd, **factory)) if bias else None  # (C,)
            self.shared_b_gate = nn.Parameter(torch.empty(S, **factory)) if bias and gated else None  # (S,)
        else:
            for name in SHARED_PARAMS:
                self.register_parameter(name, None)
        # Auxiliary-loss-free balancing: the per-expert bias added to the scores for the top-k
        # selection only; float32, saved in the state dict; None when bias_update_rate == 0.
        if self.bias_update_rate > 0:
            self.register_buffer("expert_bias", torch.zeros(n_experts, device=device, dtype=torch.float32))
        else:
            self.register_buffer("expert_bias", None)
        self.activation = activation  # None: F.gelu
        self.dropout = nn.Dropout(dropout)
        # (n_tokens, n_kept_assignments) of the last forward, read by the FLOP rule.
        self.last_counts: tuple[int, int] | None = None
        # Assignments per expert (before dropping) over the training forwards since the last
        # moe_update_bias / moe_stats(reset=True); plain tensors, not buffers (DDP would
        # broadcast rank 0's over the others'), created on the first training forward.
        self.pending_counts: torch.Tensor | None = None
        self.stats_counts: torch.Tensor | None = None
        # balance_loss="global" inside moe_global_batch(): the assignments per expert (all ranks)
        # of the step's training forwards so far; None outside the block.
        self.global_counts: torch.Tensor | None = None
        self.accumulate_global = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = INIT_STD, proj_std: float | None = None) -> None:
        """Initialise every expert independently: normal weights (std ``std``; the output
        projections ``proj_std``, default ``std``), zero biases; the router normal with ``std``.

        GPT scales its residual projections to ``0.02 / sqrt(2 * n_layer)``: pass that as
        ``proj_std`` to match (:func:`apply_moe` does it for a :class:`~leanscale.models.GPT`).
        """
        check_param("std", std, [Interval("real", 0, None)], owner="MoE.reset_parameters")
        check_param("proj_std", proj_std, [Interval("real", 0, None), None], owner="MoE.reset_parameters")
        nn.init.normal_(self.router.weight, mean=0.0, std=std)
        nn.init.normal_(self.w_fc, mean=0.0, std=std)
        nn.init.normal_(self.w_proj, mean=0.0, std=std if proj_std is None else proj_std)
        if self.b_fc is not None:
            nn.init.zeros_(self.b_fc)
            nn.init.zeros_(self.b_proj)
        if self.w_gate is not None:  # drawn last: non-gated layers draw exactly as before
            nn.init.normal_(self.w_gate, mean=0.0, std=std)
            if self.b_gate is not None:
                nn.init.zeros_(self.b_gate)
        if getattr(self, "shared_fc", None) is not None:  # drawn after all the routed experts
            nn.init.normal_(self.shared_fc, mean=0.0, std=std)
            nn.init.normal_(self.shared_proj, mean=0.0, std=std if proj_std is None else proj_std)
            if self.shared_gate is not None:
                nn.init.normal_(self.shared_gate, mean=0.0, std=std)
            for b in (self.shared_b_fc, self.shared_b_proj, self.shared_b_gate):
                if b is not None:
                    nn.init.zeros_(b)

    @torch.no_grad()
    def load_expert_weights(
        self,
        w_fc: torch.Tensor,
        w_proj: torch.Tensor,
        b_fc: torch.Tensor | None = None,
        b_proj: torch.Tensor | None = None,
        w_gate: torch.Tensor | None = None,
        b_gate: torch.Tensor | None = None,
    ) -> MoE:
        """Copy one dense feed-forward block into every expert (sparse upcycling); the router is
        left as it is. Weights in (in, out) layout: ``w_fc`` / ``w_gate`` (C, H), ``w_proj``
        (H, C) (an ``nn.Linear`` weight transposed). A bias given as ``None`` where the experts
        have biases is copied as zeros (the same function). Returns ``self``.

        Raises:
            InvalidParameterError: a shape that does not match, a bias or gate the experts
                cannot hold.
        """
        owner = "MoE.load_expert_weights"
        self._refuse_fine_grained_copy(owner)
        C, H = self.n_embd, self.hidden
        given = {"w_fc": (w_fc, (C, H)), "w_proj": (w_proj, (H, C)), "b_fc": (b_fc, (H,)),
                 "b_proj": (b_proj, (C,)), "w_gate": (w_gate, (C, H)), "b_gate": (b_gate, (H,))}
        for name, (t, shape) in given.items():
            if t is None:
                if name == "w_gate" and self.gated:
                    raise InvalidParameterError(f"The 'w_gate' parameter of {owner} is required: the experts are gated.")
                continue
            if getattr(self, name) is None:
                raise InvalidParameterError(
                    f"The {name!r} parameter of {owner} must be None: the experts have no {name} "
                    f"(bias={self.b_fc is not None}, gated={self.gated}). Got a tensor instead."
                )
            if tuple(t.shape) != shape:
                raise InvalidParameterError(
                    f"The {name!r} parameter of {owner} must have shape {shape} (n_embd={C}, "
                    f"hidden={H}). Got {tuple(t.shape)} instead."
                )
        for name in ("w_fc", "w_proj", "b_fc", "b_proj", "w_gate", "b_gate"):
            param = getattr(self, name)
            if param is not None:
                src = given[name][0]
                param.copy_(torch.zeros_like(param[0]) if src is None else src.detach().unsqueeze(0).expand_as(param))
        return self

    @torch.no_grad()
    def load_dense(self, mlp: MLP) -> MoE:
        """Copy a dense :class:`~leanscale.models.transformer.MLP` into every expert (sparse
        upcycling). The router is left as it is. Returns ``self``.

        Raises:
            InvalidParameterError: ``mlp`` is not an ``MLP``, or its sizes or biases do not
                match this layer's (the message names the mismatched weight).
        """
        _check_mlp(mlp, "mlp", "MoE.load_dense")
        self._refuse_fine_grained_copy("MoE.load_dense")
        expected = {
            "c_fc.weight": (self.hidden, self.n_embd),
            "c_proj.weight": (self.n_embd, self.hidden),
        }
        for name, shape in expected.items():
            got = tuple(mlp.get_parameter(name).shape)
            if got != shape:
                raise InvalidParameterError(
                    f"The 'mlp' parameter of MoE.load_dense must have {name} of shape {shape} "
                    f"(n_embd={self.n_embd}, hidden={self.hidden}). Got {got} instead."
                )
        has_bias = mlp.c_fc.bias is not None
        if has_bias != (self.b_fc is not None):
            raise InvalidParameterError(
                f"The 'mlp' parameter of MoE.load_dense must have bias={self.b_fc is not None} like the "
                f"experts. Got an MLP with bias={has_bias} instead."
            )
        self.w_fc.copy_(mlp.c_fc.weight.t().unsqueeze(0).expand_as(self.w_fc))  # (H, C) -> (E, C, H)
        self.w_proj.copy_(mlp.c_proj.weight.t().unsqueeze(0).expand_as(self.w_proj))  # (C, H) -> (E, H, C)
        if has_bias:
            self.b_fc.copy_(mlp.c_fc.bias.unsqueeze(0).expand_as(self.b_fc))
            self.b_proj.copy_(mlp.c_proj.bias.unsqueeze(0).expand_as(self.b_proj))
        return self

    def _refuse_fine_grained_copy(self, owner: str) -> None:
        if self.granularity > 1:
            raise InvalidParameterError(
                f"{owner} copies a dense block into every expert, which needs granularity=1 (experts as wide "
                f"as the block). Got granularity={self.granularity}: use init='random' for fine-grained experts."
            )

    def capacity(self, n_tokens: int) -> int | None:
        """Assignments each expert keeps for a batch of ``n_tokens`` tokens (``None``: dropless)."""
        if self.capacity_factor is None:
            return None
        share = self.capacity_factor * n_tokens * self.top_k / self.n_experts
        return max(1, math.ceil(round(share, _CAPACITY_DECIMALS)))

    def _route(self, xf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits and scores (softmax probabilities, or sigmoid affinities with
        ``gate="sigmoid"``), both float32 (N, E), even under autocast."""
        with torch.autocast(device_type=xf.device.type, enabled=False):
            xr = xf.float()
            if self.training and self.jitter > 0:
                noise = torch.empty_like(xr).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
                xr = xr * noise
            logits = F.linear(xr, self.router.weight.float())  # (N, E)
            return logits, (logits.sigmoid() if self.gate == "sigmoid" else logits.softmax(dim=-1))

    def _expert(self, e: int, xe: torch.Tensor, params: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
        """Expert ``e`` on its rows ``xe`` (n_e, C); ``params``: (w_fc, w_proj, b_fc, b_proj) to use
        instead of the layer's own (ExpertParallelMoE passes gradient-scaled views)."""
        w_fc, w_proj, b_fc, b_proj = (self.w_fc, self.w_proj, self.b_fc, self.b_proj) if params is None else params
        h = xe @ w_fc[e]  # (n_e, C) @ (C, H) -> (n_e, H)
        if b_fc is not None:
            h = h + b_fc[e]
        if self.gated:  # (act(x W_gate + b_gate) * (x W_fc + b_fc)) W_proj
            g = xe @ self.w_gate[e]
            if self.b_gate is not None:
                g = g + self.b_gate[e]
            h = self._act(g) * h
        else:
            h = self._act(h)
        y = h @ w_proj[e]  # (n_e, H) @ (H, C) -> (n_e, C)
        if b_proj is not None:
            y = y + b_proj[e]
        return y

    def _act(self, h: torch.Tensor) -> torch.Tensor:
        return F.gelu(h) if self.activation is None else self.activation(h)

    def _combine(self, y: torch.Tensor, plan: _Plan, x: torch.Tensor, n_kept: int) -> MoEOutput:
        """Gate the expert outputs ``y`` (M, C), in ``plan.kept_tokens``' order, and scatter-add
        them onto the tokens of ``x`` (..., C); dropped assignments add nothing."""
        C = self.n_embd
        N, k = x.shape[:-1].numel(), self.top_k  # tokens, experts per token
        y = y * plan.kept_gates.to(y.dtype).unsqueeze(1)  # (M, C) gated
        out = y.new_zeros(N, C).index_add_(0, plan.kept_tokens, y)  # (N, C); dropped: 0
        out = self.dropout(out).reshape(*x.shape[:-1], C)

        self.last_counts = (N, n_kept)
        dropped = 0.0 if k * N == 0 else (k * N - n_kept) / (k * N)
        return MoEOutput(out, plan.load_balancing_loss, plan.z_loss, plan.load, dropped)

    def _check_input(self, x: Any, owner: str) -> torch.Tensor:
        """``x`` flattened to (N, C); InvalidParameterError unless it is a (..., n_embd) tensor."""
        if not isinstance(x, torch.Tensor) or x.ndim < 1 or x.shape[-1] != self.n_embd or not x.is_floating_point():
            got = f"a {x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise InvalidParameterError(
                f"The 'x' parameter of {owner} must be a floating tensor of shape (..., n_embd={self.n_embd}). "
                f"Got {got} instead."
            )
        return x.reshape(-1, self.n_embd)

    def _plan(self, xf: torch.Tensor, seq_len: int | None = None) -> _Plan:
        """Route the N tokens of ``xf`` (N, C): top-k, gates, auxiliary losses, capacity.

        Steps 1-3 and 5 of the module docstring; shared with the expert-parallel layer
        (:mod:`leanscale.sparse.moe_parallel`), which calls it on each rank's local tokens.
        ``seq_len``: tokens per sequence (consecutive rows of ``xf``), for the sequence-wise
        balancing loss.
        """
        E, k = self.n_experts, self.top_k
        N = xf.shape[0]
        logits, probs = self._route(xf)  # (N, E) float32 each: scores s

        # Top-k choices and their gates. The expert bias (aux-loss-free balancing) moves the
        # selection only: the gates are the unbiased scores of the chosen experts.
        if self.expert_bias is None:
            top_p, top_e = probs.topk(k, dim=-1)  # (N, k), (N, k)
        else:
            top_e = (probs.detach() + self.expert_bias.float()).topk(k, dim=-1).indices  # (N, k)
            top_p = probs.gather(1, top_e)  # (N, k) unbiased scores
        normalise = k > 1  # GShard; sigmoid: DeepSeek-V3 (with k = 1 the gate would be a constant 1)
        gates = top_p / top_p.sum(dim=-1, keepdim=True) if normalise else top_p  # (N, k)

        # Assignments in priority order: choice-major (all first choices, then all second
        # choices, ...), token order within a choice. Flat index a = j * N + t.
        expert = top_e.t().reshape(-1)  # (kN,)
        token = torch.arange(N, device=xf.device).repeat(k)  # (kN,)
        gate = gates.t().reshape(-1)  # (kN,)

        # Load before dropping, and the auxiliary losses.
        counts = torch.bincount(expert, minlength=E)  # (E,) assignments per expert
        load = counts.float() / max(1, k * N)  # (E,) f_i, sums to 1
        if self.training:
            self._count(counts)
        lb_loss = self._balance_loss(probs, counts, top_e, seq_len)
        z = torch.logsumexp(logits, dim=-1)  # (N,)
        z_loss = self.z_loss_coef * (z.square().mean() if N else z.new_zeros(()))

        # Sort by expert (stable: keeps the priority order within an expert), number each
        # assignment within its expert, keep those under capacity.
        order = torch.argsort(expert, stable=True)  # (kN,)
        capacity = self.capacity(N)
        if capacity is None:
            kept = order
            kept_counts = counts
        else:
            starts = torch.cumsum(counts, dim=0) - counts  # (E,) first sorted slot of each expert
            position = torch.arange(k * N, device=xf.device) - starts[expert[order]]  # (kN,) rank in its expert
            kept = order[position < capacity]  # still grouped by expert, priority order inside
            kept_counts = counts.clamp(max=capacity)
        return _Plan(token[kept], gate[kept], kept_counts, lb_loss, z_loss, load.detach())

    @torch.no_grad()
    def _count(self, counts: torch.Tensor) -> None:
        """Add one training forward's assignments per expert to the pending (bias update) and
        statistics counts."""
        c = counts.to(torch.float64)
        self.pending_counts = c.clone() if self.pending_counts is None else self.pending_counts + c
        self.stats_counts = c.clone() if self.stats_counts is None else self.stats_counts + c

    def _balance_loss(
        self, probs: torch.Tensor, counts: torch.Tensor, top_e: torch.Tensor, seq_len: int | None
    ) -> torch.Tensor:
        """``coef * E * sum_i f_i P_i`` over the micro-batch (``"batch"``, Switch), per sequence then
        averaged (``"sequence"``, DeepSeek-V3 eq. 17-20) or with ``f_i`` over the global batch of
        all ranks (``"global"``, Qwen; in training mode only, so that an evaluation on one rank
        does not wait for the others). ``P_i``: mean of the scores normalised to sum to 1 per
        token (softmax: the probabilities)."""
        E, k = self.n_experts, self.top_k
        N = probs.shape[0]
        if self.load_balancing_coef == 0 or N == 0:
            return probs.new_zeros(()) if N == 0 else 0.0 * probs.sum()  # keeps the graph's device
        scores = probs / probs.sum(dim=-1, keepdim=True) if self.gate == "sigmoid" else probs  # (N, E)
        if self.balance_loss == "sequence" and seq_len and N % seq_len == 0:
            S = N // seq_len
            seq = torch.arange(N, device=probs.device).div(seq_len, rounding_mode="floor")  # (N,)
            flat = (seq.unsqueeze(1) * E + top_e).reshape(-1)  # (N k,) sequence-major expert ids
            f = torch.bincount(flat, minlength=S * E).view(S, E).float() / (k * seq_len)  # (S, E)
            P = scores.view(S, seq_len, E).mean(dim=1)  # (S, E)
            return self.load_balancing_coef * E * (f * P).sum(dim=1).mean()
        f = counts.float()
        if self.balance_loss == "global" and self.training:  # eval: no collective, no accumulation
            if _world(None) > 1:
                import torch.distributed as dist

                f = f.clone()
                dist.all_reduce(f)  # counts of every rank's micro-batch
            if self.accumulate_global:  # inside moe_global_batch: add this micro-batch to the step's counts
                f = f.detach().to(torch.float64)
                self.global_counts = f if self.global_counts is None else self.global_counts + f
                f = self.global_counts.float()
        f = f / f.sum().clamp(min=1)  # (E,)
        return self.load_balancing_coef * E * (f * scores.mean(dim=0)).sum()

    def _shared(self, xf: torch.Tensor) -> torch.Tensor:
        """The shared experts (always active, no gate) on all tokens ``xf`` (N, C) -> (N, C)."""
        h = xf @ self.shared_fc
        if self.shared_b_fc is not None:
            h = h + self.shared_b_fc
        if self.shared_gate is not None:
            g = xf @ self.shared_gate
            if self.shared_b_gate is not None:
                g = g + self.shared_b_gate
            h = self._act(g) * h
        else:
            h = self._act(h)
        y = h @ self.shared_proj
        return y if self.shared_b_proj is None else y + self.shared_b_proj

    def forward(self, x: torch.Tensor) -> MoEOutput:
        xf = self._check_input(x, "MoE.forward")  # (N, C)
        plan = self._plan(xf, x.shape[-2] if x.ndim >= 3 else None)
        sizes = plan.kept_counts.tolist()  # one host sync: the slice size of each expert

        # Experts on contiguous slices (see the timing note above _MOE_CONSTRAINTS for why a loop).
        xin = xf.index_select(0, plan.kept_tokens)  # (M, C)
        y = torch.cat([self._expert(e, xe) for e, xe in enumerate(torch.split(xin, sizes))])  # (M, C)
        out = self._combine(y, plan, x, sum(sizes))
        if self.shared_fc is None:
            return out
        shared = self.dropout(self._shared(xf)).reshape(x.shape)
        return out._replace(output=out.output + shared)

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor | None = None, *, rate: float | None = None) -> float | None:
        """One aux-loss-free balancing update (Wang et al. 2024, DeepSeek-V3 sec. 2.1.2):
        ``expert_bias += u * sign(mean(c) - c)`` with ``c`` the assignments per expert, by default
        the pending counts of the training forwards since the last update (which are then
        cleared), and ``u`` the layer's ``bias_update_rate`` or, when given, ``rate`` (for this
        update only: a schedule; the layer's own rate is left as it is). :func:`moe_update_bias`
        calls this for every layer, with the counts summed over the ranks. Returns the MaxVio of
        ``c`` (``None``, and no update, when there is nothing counted).

        Raises:
            InvalidParameterError: the layer has ``bias_update_rate=0``, ``counts`` is not a
                tensor of ``n_experts`` values, or ``rate`` is not a finite number >= 0.
        """
        owner = "MoE.update_bias"
        if self.expert_bias is None:
            raise InvalidParameterError(
                f"{owner} needs a layer built with bias_update_rate > 0 (aux-loss-free balancing). "
                f"Got bias_update_rate={self.bias_update_rate}."
            )
        u = self.bias_update_rate if rate is None else _check_rate(rate, owner)
        if counts is None:
            counts, self.pending_counts = self.pending_counts, None
        elif not isinstance(counts, torch.Tensor) or tuple(counts.shape) != (self.n_experts,):
            got = f"shape {tuple(counts.shape)}" if isinstance(counts, torch.Tensor) else type(counts).__name__
            raise InvalidParameterError(
                f"The 'counts' parameter of {owner} must be a tensor of shape ({self.n_experts},) "
                f"(assignments per expert). Got {got} instead."
            )
        if counts is None or float(counts.sum()) <= 0:
            return None
        c = counts.to(device=self.expert_bias.device, dtype=torch.float64)
        step = u * torch.sign(c.mean() - c)  # (E,) underloaded up, overloaded down
        self.expert_bias.add_(step.to(self.expert_bias.dtype))
        return _max_vio(c)

    def extra_repr(self) -> str:
        return (
            f"n_embd={self.n_embd}, hidden={self.hidden}, n_experts={self.n_experts}, top_k={self.top_k}, "
            f"capacity_factor={self.capacity_factor}, jitter={self.jitter}, bias={self.b_fc is not None}"
            + (", gated=True" if self.gated else "")
            + (f", bias_update_rate={self.bias_update_rate}" if self.bias_update_rate else "")
            + (f", gate={self.gate!r}" if self.gate != "softmax" else "")
            + (f", balance_loss={self.balance_loss!r}" if self.balance_loss != "batch" else "")
            + (f", n_shared_experts={self.n_shared_experts}" if self.n_shared_experts else "")
            + (f", granularity={self.granularity}" if self.granularity > 1 else "")
        )


def _check_mlp(module: Any, name: str, owner: str) -> None:
    if not isinstance(module, MLP):
        raise InvalidParameterError(
            f"The '{name}' parameter of {owner} must be a leanscale.models.transformer.MLP (the only "
            f"layer MoE converts). Got {type(module).__module__}.{type(module).__name__} instead."
        )


class MoEMLP(nn.Module):
    """Drop-in replacement of :class:`~leanscale.models.transformer.MLP` (or of any
    feed-forward block :func:`apply_moe` converts) by a :class:`MoE`.

    ``forward(x)`` returns only the output tensor, so ``Block`` works unchanged; the full
    :class:`MoEOutput` of the last call is kept in ``last_output`` (for :func:`moe_aux_loss` and
    :func:`moe_stats`; it holds the autograd graph of the losses until the next call). The
    constructor takes the arguments of :class:`MoE`.
    """

    def __init__(self, n_embd: int, hidden: int, n_experts: int, **moe_kwargs: Any):
        super().__init__()
        self.moe = MoE(n_embd, hidden, n_experts, **moe_kwargs)
        self.n_embd, self.hidden, self.n_experts = n_embd, hidden, n_experts
        self.last_output: MoEOutput | None = None

    @classmethod
    def from_dense(
        cls,
        mlp: MLP,
        n_experts: int,
        *,
        init: str = "random",
        proj_std: float | None = None,
        **moe_kwargs: Any,
    ) -> MoEMLP:
        """An MoE layer with ``mlp``'s widths, biases, dropout, device and dtype.

        Args:
            mlp: The dense :class:`~leanscale.models.transformer.MLP`.
            n_experts: Number of experts.
            init: ``"random"``: each expert initialised independently like GPT (normal, std
                0.02; output projections ``proj_std``). ``"copy"``: every expert is a copy of
                ``mlp`` (sparse upcycling); with ``n_experts=1`` (or ``top_k >= 2``) and
                ``capacity_factor=None`` the layer computes exactly what ``mlp`` did.
            proj_std: Std of the random output projections (default 0.02); ignored by "copy".
            **moe_kwargs: The other arguments of :class:`MoE` (``top_k``, ``capacity_factor``,
                ``jitter``, ``load_balancing_coef``, ``z_loss_coef``). ``n_embd``, ``hidden``,
                ``bias`` and ``dropout`` are read from ``mlp``; given here they must agree.
        """
        owner = "MoEMLP.from_dense"
        _check_mlp(mlp, "mlp", owner)
        check_param("init", init, [Options(INITS)], owner=owner)
        check_param("proj_std", proj_std, [Interval("real", 0, None), None], owner=owner)
        read = {
            "n_embd": mlp.n_embd,
            "hidden": mlp.hidden,
            "bias": mlp.c_fc.bias is not None,
            "dropout": mlp.dropout.p,
        }
        allowed = set(_MOE_CONSTRAINTS) - {"n_experts"}
        for key, value in moe_kwargs.items():
            if key not in allowed:
                raise unknown_name_error("moe_kwargs", key, allowed, owner=owner)
            if key in read and value != read[key]:
                raise InvalidParameterError(
                    f"The '{key}' parameter of {owner} must match the MLP's {key}={read[key]!r} (it is "
                    f"read from the MLP). Got {value!r} instead."
                )
        kwargs = {**moe_kwargs, **read}
        n_embd, hidden = kwargs.pop("n_embd"), kwargs.pop("hidden")
        weight = mlp.c_fc.weight
        new = cls(n_embd, hidden, n_experts, device=weight.device, dtype=weight.dtype, **kwargs)
        if init == "copy":
            new.moe.load_dense(mlp)
        else:
            new.moe.reset_parameters(INIT_STD, proj_std)
        new.train(mlp.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.moe(x)
        self.last_output = out
        return out.output

    def __getstate__(self) -> dict[str, Any]:
        # copy.deepcopy / pickle of a model after a forward: the last output is a non-leaf
        # tensor tied to an autograd graph, which cannot be deep-copied. Leave it out.
        state = super().__getstate__()
        state["last_output"] = None
        return state


# ----------------------------------------------------------------------------- the cost ledger


def _grad(t: Any) -> bool:
    return torch.is_grad_enabled() and isinstance(t, torch.Tensor) and t.requires_grad


def _moe_flops(module: MoE, inputs: tuple, output: Any) -> tuple[float, float]:
    """FLOPs of the ACTIVE experts only: the router ``2 C E`` per token, and per kept
    assignment two matmuls, ``2 * (C H + H C)`` (three for gated experts), plus the shared
    experts' on every token. Backward: per matmul, one forward's worth for
    the input gradient and one for the weight gradient when autograd computes them (the ledger's
    convention; 2x forward in training). Gating, softmax and the scatter-add are not counted."""
    if module.last_counts is None:
        return 0, 0
    n_tokens, n_kept = module.last_counts
    C, H, E = module.n_embd, module.hidden, module.n_experts
    x = inputs[0]
    router = 2 * C * E * n_tokens
    fc = proj = 2 * C * H * n_kept
    fwd = router + fc + proj
    bwd = router * (_grad(x) + _grad(module.router.weight))
    bwd += fc * (_grad(x) + _grad(module.w_fc))
    if module.w_gate is not None:  # gated experts: a third matmul, x W_gate
        fwd += fc
        bwd += fc * (_grad(x) + _grad(module.w_gate))
    bwd += proj * ((_grad(x) or _grad(module.w_fc)) + _grad(module.w_proj))
    if module.shared_fc is not None:  # shared experts: every token, a dense MLP of width S
        s_fc = s_proj = 2 * C * module.shared_fc.shape[1] * n_tokens
        fwd += s_fc + s_proj
        bwd += s_fc * (_grad(x) + _grad(module.shared_fc))
        if module.shared_gate is not None:
            fwd += s_fc
            bwd += s_fc * (_grad(x) + _grad(module.shared_gate))
        bwd += s_proj * ((_grad(x) or _grad(module.shared_fc)) + _grad(module.shared_proj))
    return fwd, bwd


def _moe_mlp_flops(module: MoEMLP, inputs: tuple, output: Any) -> tuple[float, float]:
    """0: the wrapper does no work itself; its :class:`MoE` is hooked and counted by its rule."""
    return 0, 0


register_flop_rule(MoE, _moe_flops)
register_flop_rule(MoEMLP, _moe_mlp_flops)


# ----------------------------------------------------------------------------- surgery


def _root(model: Any, owner: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise InvalidParameterError(
            f"The 'model' parameter of {owner} must be an instance of torch.nn.Module. "
            f"Got {type(model).__name__} instead."
        )
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def moe_layers(model: nn.Module) -> list[tuple[str, MoEMLP]]:
    """``(name, layer)`` of every :class:`MoEMLP` of ``model`` (DDP-wrapped or not), whatever
    the model (leanscale's GPT or a converted third-party model)."""
    root = _root(model, "moe_layers")
    return [(n, m) for n, m in root.named_modules() if isinstance(m, MoEMLP)]


def apply_moe(
    model: nn.Module,
    n_experts: int,
    *,
    target: Any = "auto",
    every: int = 2,
    top_k: int = 1,
    capacity_factor: float | None = 1.25,
    init: str = "random",
    optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
    **moe_kwargs: Any,
) -> nn.Module:
    """Replace ``model``'s feed-forward blocks by mixture-of-experts layers (:class:`MoEMLP`),
    in place, through :func:`~leanscale.core.surgery.replace_module_classes`.

    ``target="auto"`` finds the blocks it recognises: leanscale's
    :class:`~leanscale.models.transformer.MLP`, gated MLPs (``gate_proj`` / ``up_proj`` /
    ``down_proj``: Llama, Mistral, Qwen2...), GPT-2 MLPs (``c_fc`` / ``c_proj``), BERT-style layers
    (``intermediate`` + ``output``), ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``
    (details in :mod:`leanscale.sparse.moe_targets`). The experts keep the block's form (gated
    experts for a gated MLP) and its own activation module; each block is checked to compute
    what its form says before anything is changed. Block number ``i`` (0-based,
    ``named_modules`` order) is converted when ``i % every == every - 1``: ``every=1`` converts
    all of them, ``every=2`` the 2nd, 4th, ... (Switch's every-other layer).

    Args:
        model: The model (not wrapped in DDP: convert first, then wrap).
        n_experts: Experts per MoE layer.
        target: ``"auto"``, an ``nn.Module`` subclass (its instances are converted) or a
            predicate ``(name, module) -> bool`` (the modules it selects); a designated module
            must be of a recognised form, or ``nn.Sequential(Linear, activation[, dropout], Linear)``.
        every: Convert one block in ``every``.
        top_k, capacity_factor: See :class:`MoE`. ``top_k >= 2`` renormalises the chosen gates to
            sum to 1, so with ``init="copy"`` and ``capacity_factor=None`` the converted model
            computes what the dense one did.
        init: ``"random"`` (normal, std 0.02) or ``"copy"``: every expert a copy of the dense
            block (sparse upcycling, Komatsuzaki et al. 2022).
        optimizers: Optimizer(s) holding the model's parameters, updated by the surgery.
        **moe_kwargs: The other arguments of :class:`MoE` (``jitter``, ``load_balancing_coef``,
            ``z_loss_coef``) and ``proj_std``. For a :class:`~leanscale.models.GPT` without
            ``proj_std``, the random output projections get GPT's residual scaling
            ``0.02 / sqrt(2 * n_layer)``. Width, bias, dropout and activation come from the model.

    Returns:
        ``model`` itself. A Hugging Face model also gets the settings in
        ``model.config.leanscale_moe`` (for :func:`~leanscale.sparse.moe_targets.moe_from_pretrained`).

    Raises:
        InvalidParameterError: a bad argument (``n_experts < 1``, ``top_k`` outside
            ``[1, n_experts]``, ``capacity_factor <= 0``, ``every < 1``, a bad ``target``, ...),
            no feed-forward block to convert, or a block that does not compute what its form says.
    """
    from leanscale.sparse import moe_targets as mt

    owner = "apply_moe"
    _check_moe_params({"n_experts": n_experts, "top_k": top_k, "capacity_factor": capacity_factor}, owner)
    check_param("every", every, [Interval(int, 1, None)], owner=owner)
    check_param("init", init, [Options(INITS)], owner=owner)
    allowed = (set(_MOE_CONSTRAINTS) - {"n_embd", "hidden", "n_experts", "bias", "dropout"}) | {"proj_std"}
    for key in moe_kwargs:
        if key not in allowed:
            raise unknown_name_error("moe_kwargs", key, allowed, owner=owner)
    _check_moe_params({k: v for k, v in moe_kwargs.items() if k in _MOE_CONSTRAINTS}, owner)
    if init == "copy" and moe_kwargs.get("granularity", 1) > 1:
        raise InvalidParameterError(
            f"The 'init' parameter of {owner} must be 'random' with fine-grained experts (granularity="
            f"{moe_kwargs['granularity']}): 'copy' needs experts as wide as the dense block. Got 'copy' instead."
        )
    root = _root(model, owner)
    blocks = mt._blocks(root, mt._selector(target, owner), owner)
    if not blocks:
        already = len(moe_layers(root))
        why = f" ({already} MoEMLP layer(s) are converted already)" if already else ""
        if target == "auto":
            raise InvalidParameterError(
                f"The 'model' parameter of {owner} has no leanscale.models.transformer.MLP to convert "
                f"nor any other feed-forward block it recognises{why}. "
                f"Searched for: {mt.SEARCHED}. Pass target= a module class or a predicate "
                f"(name, module) -> bool to designate blocks of one of these forms (or "
                f"nn.Sequential(Linear, activation, Linear)). Got a {type(root).__name__}."
            )
        raise InvalidParameterError(
            f"The 'target' parameter of {owner} selected no module of the model{why}. Got {target!r}."
        )
    if len(blocks) < every:
        raise InvalidParameterError(
            f"The 'every' parameter of {owner} must be at most the number of MLP layers "
            f"({len(blocks)}) (the feed-forward blocks found), or nothing is converted. Got {every} instead."
        )
    kwargs = dict(moe_kwargs)
    proj_std = kwargs.pop("proj_std", mt.proj_std_for(root))
    check_param("proj_std", proj_std, [Interval("real", 0, None), None], owner=owner)
    chosen = [b for i, b in enumerate(blocks) if i % every == every - 1]
    replacements = mt.plan_replacements(
        chosen, n_experts, init, {"top_k": top_k, "capacity_factor": capacity_factor, **kwargs}, proj_std
    )
    mt.replace_blocks(root, chosen, replacements, optimizers)
    mt.record_settings(root, {
        "n_experts": n_experts,
        "target": target if target == "auto" else (
            f"class {target.__qualname__}" if isinstance(target, type) else "predicate"
        ),
        "every": every, "top_k": top_k, "capacity_factor": capacity_factor, "init": init, **moe_kwargs,
    })
    return model


def moe_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the load-balancing and z-losses of every :class:`MoEMLP`'s last forward (each
    already scaled by its coefficient): add it to the training loss. A 0-d zero tensor when no
    MoE layer has run."""
    layers = moe_layers(model)
    losses = [
        m.last_output.load_balancing_loss + m.last_output.z_loss
        for _, m in layers
        if m.last_output is not None
    ]
    if losses:
        return torch.stack(losses).sum()
    param = next(_root(model, "moe_aux_loss").parameters(), None)
    return torch.zeros((), device=None if param is None else param.device)


def moe_stats(model: nn.Module, *, reset: bool = False) -> list[dict[str, Any]]:
    """One row per :class:`MoEMLP`: ``name``; from its last forward, ``load`` (list of the ``E``
    fractions ``f_i``, before dropping), ``max_over_mean_load`` (1 is perfect balance, ``E`` is
    everything on one expert), ``max_vio`` (MaxVio, Wang et al. 2024: ``max_over_mean_load - 1``)
    and ``dropped_fraction``; accumulated over the training forwards since the last
    ``reset=True`` (this rank's tokens), ``max_vio_accumulated`` and ``n_assignments_accumulated``;
    and ``expert_bias`` (list, or ``None`` without aux-loss-free balancing). The per-forward
    values are ``None`` for a layer that has not run, the accumulated ones when nothing was
    counted.

    Args:
        model: The model (DDP-wrapped or not).
        reset: Clear the accumulated counts after reading them (e.g. once per logging window).
    """
    check_param("reset", reset, [bool], owner="moe_stats")
    rows = []
    for name, m in moe_layers(model):
        out, moe = m.last_output, m.moe
        acc = moe.stats_counts
        row = {
            "name": name, "load": None, "max_over_mean_load": None, "max_vio": None, "dropped_fraction": None,
            "max_vio_accumulated": None if acc is None else _max_vio(acc),
            "n_assignments_accumulated": 0 if acc is None else int(acc.sum()),
            "expert_bias": None if moe.expert_bias is None else moe.expert_bias.tolist(),
        }
        if reset:
            moe.stats_counts = None
        if out is not None:
            load = out.load.tolist()
            ratio = max(load) * len(load)  # mean of the fractions is 1 / E
            row.update(load=load, max_over_mean_load=ratio, max_vio=ratio - 1.0,
                       dropped_fraction=float(out.dropped_fraction))
            if sum(load) == 0:  # a forward on no tokens
                row.update(max_over_mean_load=None, max_vio=None)
        rows.append(row)
    return rows


@torch.no_grad()
def moe_update_bias(model: nn.Module, *, group: Any = None, rate: float | None = None) -> list[dict[str, Any]]:
    """The aux-loss-free balancing update of every :class:`MoEMLP` built with
    ``bias_update_rate > 0``: ``expert_bias += u * sign(mean load - load_i)``, the load being
    the assignments per expert counted over the training forwards since the last update (all
    micro-batches of a gradient-accumulation step), then cleared. ``u`` is each layer's
    ``bias_update_rate``, or ``rate`` for every layer when given: a schedule is
    ``moe_update_bias(model, rate=schedule(step))`` (DeepSeek-V3 keeps u = 1e-3 for most of
    training and sets it to 0 for the last 500B tokens). ``rate=0`` counts nothing into the bias:
    the counts are cleared and the bias stays. The layers' own ``bias_update_rate`` is unchanged.

    Call it once per optimizer step, after ``optimizer.step()`` (anywhere between the step's last
    forward and the next step's first forward is the same: the bias has no gradient, it only
    changes the next selection; e.g. inside an ``extra_loss`` callback). Under an initialised
    ``torch.distributed`` the counts are first summed over ``group`` (one ``all_reduce`` for all
    layers), so every rank applies the same update from the global batch's load and the biases
    stay identical; call it on every rank (collective).

    Args:
        model: The model (DDP-wrapped or not).
        group: The process group of the data-parallel ranks (``None``: the default group).
        rate: The bias step ``u`` of this update for every layer, a finite number >= 0 (the same
            on every rank); ``None``: each layer's ``bias_update_rate``.

    Returns:
        One row per updated layer: ``name`` and ``max_vio``, the MaxVio of the (global) load the
        update used (``None`` when the layer had no training forward since the last update).

    Raises:
        InvalidParameterError: ``model`` has no MoE layer with ``bias_update_rate > 0``, or
            ``rate`` is not a finite number >= 0 (checked before any collective).
    """
    owner = "moe_update_bias"
    if rate is not None:
        rate = _check_rate(rate, owner)
    layers = [(name, m.moe) for name, m in moe_layers(_root(model, owner)) if m.moe.expert_bias is not None]
    if not layers:
        raise InvalidParameterError(
            f"The 'model' parameter of {owner} must contain MoE layers built with bias_update_rate > 0 "
            f"(aux-loss-free balancing, e.g. apply_moe(model, 8, bias_update_rate=1e-3)). Got a "
            f"{type(_root(model, owner)).__name__} with {len(moe_layers(model))} MoE layer(s) and none of them."
        )
    counts = [
        torch.zeros(moe.n_experts, dtype=torch.float64, device=moe.expert_bias.device)
        if moe.pending_counts is None else moe.pending_counts.to(moe.expert_bias.device)
        for _, moe in layers
    ]
    flat = torch.cat(counts)  # (sum of E,)
    if _world(group) > 1:
        import torch.distributed as dist

        dist.all_reduce(flat, group=group)
    rows, offset = [], 0
    for name, moe in layers:
        c = flat[offset:offset + moe.n_experts]
        offset += moe.n_experts
        moe.pending_counts = None
        rows.append({"name": name, "max_vio": moe.update_bias(c, rate=rate)})
    return rows


class _GlobalBatch:
    """The context of :func:`moe_global_batch` (not reentrant)."""

    def __init__(self, layers: list[tuple[str, MoE]]):
        self.layers = layers

    def __enter__(self) -> _GlobalBatch:
        busy = [name for name, moe in self.layers if moe.accumulate_global]
        if busy:
            raise InvalidParameterError(
                f"The 'model' parameter of moe_global_batch is already inside a moe_global_batch block "
                f"(layers {busy}): one block per optimizer step, not nested. Got the same model again."
            )
        for _, moe in self.layers:
            moe.accumulate_global, moe.global_counts = True, None
        return self

    def __exit__(self, *exc: Any) -> None:
        for _, moe in self.layers:  # also on an exception: the next step starts from zero
            moe.accumulate_global, moe.global_counts = False, None

    def counts(self) -> list[dict[str, Any]]:
        """Per layer ``name`` and ``counts``: the assignments per expert (all ranks) accumulated
        so far in this block (a list of ``E`` floats; ``None`` before the first training forward)."""
        return [{"name": name, "counts": None if moe.global_counts is None else moe.global_counts.tolist()}
                for name, moe in self.layers]


def moe_global_batch(model: nn.Module) -> _GlobalBatch:
    """A context manager around the micro-batches of one optimizer step (gradient accumulation):
    inside it, every MoE layer with ``balance_loss="global"`` (Qwen, Qiu et al. 2025) counts the
    expert fractions ``f_i`` of its balancing loss over **the step's micro-batches so far**, not
    only the current one (and, as outside it, over all ranks under ``torch.distributed``).

    The loss of micro-batch ``j`` of a step is ``coef * E * sum_i f_i P_i`` with ``f_i`` from
    the assignments (before dropping) of micro-batches ``1..j`` of every rank and ``P_i`` this
    micro-batch's own mean scores: at the **last** micro-batch, ``f_i`` is exactly that of the
    concatenated global batch. (Earlier micro-batches cannot see the counts of later ones
    without keeping every micro-batch's graph alive: the memory accumulation exists to save.)
    :func:`~leanscale.train.fit` adds ``extra_loss`` after the last micro-batch only, so there
    the balancing loss uses the global batch's ``f_i`` exactly (with the last micro-batch's
    ``P_i``): ``fit(..., extra_loss=moe_aux_loss, accumulate_context=moe_global_batch)``. Leaving the block clears the counts (also on an
    exception), so each step starts from zero. Evaluation forwards (``model.eval()``) are not
    counted and use their own batch. With activation checkpointing a re-run forward would be
    counted twice.

    Example:
        >>> import torch
        >>> from leanscale.models import GPT, GPTConfig
        >>> model = apply_moe(GPT(GPTConfig(64, 16, n_layer=2, n_head=2, n_embd=16)), n_experts=4,
        ...                   balance_loss="global")
        >>> micro = torch.randint(0, 64, (4, 2, 16))  # 4 micro-batches of 2 sequences
        >>> with moe_global_batch(model) as block:
        ...     for x in micro:
        ...         _, loss = model(x, x)
        ...         ((loss + moe_aux_loss(model)) / len(micro)).backward()
        ...     print(sum(block.counts()[0]["counts"]))  # the step's 4 x 2 x 16 tokens, top-1
        128.0
        >>> block.counts()[0]["counts"] is None  # cleared when the block ends
        True

    Args:
        model: The model (DDP-wrapped or not) with at least one MoE layer built with
            ``balance_loss="global"``.

    Returns:
        The context manager; ``as block`` gives ``block.counts()``, the accumulated counts per layer.

    Raises:
        InvalidParameterError: ``model`` has no MoE layer with ``balance_loss="global"``, or the
            block is entered while the model is already inside one.
    """
    owner = "moe_global_batch"
    root = _root(model, owner)
    layers = [(name, m.moe) for name, m in moe_layers(root) if m.moe.balance_loss == "global"]
    if not layers:
        raise InvalidParameterError(
            f"The 'model' parameter of {owner} must contain MoE layers built with balance_loss='global' "
            f"(e.g. apply_moe(model, 8, balance_loss='global')). Got a {type(root).__name__} with "
            f"{len(moe_layers(root))} MoE layer(s) and none of them."
        )
    return _GlobalBatch(layers)
