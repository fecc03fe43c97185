"""A small decoder-only Transformer (nanoGPT-like) and its analytic FLOP count.

The model follows Karpathy's nanoGPT (GPT-2 layout: learned position embeddings, pre-LayerNorm
blocks, GELU MLP, tied input/output embeddings). Its FLOP count follows Appendix F of
Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models" (Chinchilla),
arXiv 2203.15556, so the same function also prices the paper's own architectures.

The feed-forward layer is its own class, :class:`MLP`, with ``n_embd`` and ``hidden`` attributes:
the sparse-activation technique swaps it for a mixture-of-experts layer through
:func:`leanscale.core.surgery.replace_module_classes`.

Example:
    >>> import torch
    >>> config = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
    >>> model = GPT(config)
    >>> idx = torch.randint(0, 64, (3, 16))
    >>> logits, loss = model(idx, targets=idx)
    >>> tuple(logits.shape), loss.ndim
    ((3, 16, 64), 0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from leanscale.core.errors import InvalidParameterError
from leanscale.core.flops import register_flop_rule
from leanscale.core.validation import Interval, check_param

__all__ = [
    "GPTConfig",
    "CausalSelfAttention",
    "MLP",
    "Block",
    "GPT",
    "ChinchillaFlops",
    "chinchilla_forward_flops",
    "chinchilla_flops",
    "flops_per_token",
]

# Standard deviation of the normal initialisation of every weight matrix and embedding (GPT-2).
INIT_STD = 0.02


@dataclass
class GPTConfig:
    """Shape of a :class:`GPT`. Sizes are counts; ``dropout`` is a probability."""

    vocab_size: int  # number of token ids; logits have this many columns
    block_size: int  # longest sequence the model accepts (size of the position embedding)
    n_layer: int  # number of Transformer blocks
    n_head: int  # attention heads per block; head size is n_embd // n_head
    n_embd: int  # model width d_model
    dropout: float = 0.0  # dropout on embeddings, attention weights and residual branches
    bias: bool = False  # biases in Linear and LayerNorm (GPT-2: True; False is a bit better and faster)
    tie_weights: bool = True  # lm_head.weight is wte.weight (GPT-2 does this)
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * n_embd (GPT-2 and Chinchilla: 4)

    _parameter_constraints = {
        "vocab_size": [Interval(int, 1, None)],
        "block_size": [Interval(int, 1, None)],
        "n_layer": [Interval(int, 1, None)],
        "n_head": [Interval(int, 1, None)],
        "n_embd": [Interval(int, 1, None)],
        "dropout": [Interval(float, 0, 1, closed="left")],
        "bias": [bool],
        "tie_weights": [bool],
        "mlp_ratio": [Interval(int, 1, None)],
    }

    def __post_init__(self) -> None:
        for name, constraints in self._parameter_constraints.items():
            check_param(name, getattr(self, name), constraints, owner="GPTConfig")
        if self.n_embd % self.n_head != 0:
            raise InvalidParameterError(
                f"The 'n_embd' parameter of GPTConfig must be divisible by n_head={self.n_head}. "
                f"Got {self.n_embd} instead."
            )

    @property
    def head_size(self) -> int:
        """Width of one attention head (Chinchilla's "key size")."""
        return self.n_embd // self.n_head

    @property
    def hidden(self) -> int:
        """Hidden width of the MLP (Chinchilla's ``ffw_size``)."""
        return self.mlp_ratio * self.n_embd


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused Q, K, V projection.

    The projections ``c_attn`` and ``c_proj`` are ``nn.Linear`` modules (the cost ledger counts
    them as Linear layers); the ledger's rule for this class counts only the two attention
    matmuls, Q K^T and A V.
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = False):
        super().__init__()
        if n_embd % n_head != 0:
            raise InvalidParameterError(
                f"The 'n_embd' parameter of CausalSelfAttention must be divisible by n_head={n_head}. "
                f"Got {n_embd} instead."
            )
        self.n_embd = n_embd
        self.n_head = n_head
        self.dropout = dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)  # x -> (q, k, v), all heads at once
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)  # concatenated heads -> residual stream
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape  # batch, sequence length, n_embd
        hs = C // self.n_head  # head size
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))



@register_flop_rule(CausalSelfAttention)  # the layer registers its own rule (core imports no model)
def _causal_self_attention_flops(module: nn.Module, inputs: tuple, output: torch.Tensor) -> tuple[int, int]:
    # x: (B, T, C). Q K^T: (B, nh, T, hs) @ (B, nh, hs, T) -> B*nh*T*T*hs MACs = B*T*T*C MACs;
    # A V: (B, nh, T, T) @ (B, nh, T, hs) -> B*T*T*C MACs. Full T x T attention is counted, as
    # FlopCounterMode and Chinchilla do, although a causal kernel can skip half of it; softmax is
    # not counted. The c_attn / c_proj projections are Linear modules, counted by their rule.
    x = inputs[0]
    B, T, C = x.shape
    fwd = 2 * 2 * B * T * T * C
    # Backward: gradients of both matmuls w.r.t. both operands = 2x forward (a flash-attention
    # kernel also recomputes Q K^T, one more matmul; that is not counted). Hooks run in the
    # forward's grad mode: a gradient is computed when grad is on and x or the weights need one.
    needs = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.c_attn.parameters()))
    return fwd, 2 * fwd * int(needs)


class MLP(nn.Module):
    """Position-wise feed-forward layer: Linear -> GELU -> Linear.

    Args:
        n_embd: Input and output width.
        hidden: Hidden width (usually ``4 * n_embd``).
        dropout: Dropout on the output.
        bias: Whether the Linear layers have biases.
    """

    def __init__(self, n_embd: int, hidden: int, dropout: float = 0.0, bias: bool = False):
        super().__init__()
        self.n_embd = n_embd
        self.hidden = hidden
        self.c_fc = nn.Linear(n_embd, hidden, bias=bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(hidden, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, n_embd) -> (B, T, hidden) -> (B, T, n_embd)
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config.n_embd, config.n_head, config.dropout, config.bias)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config.n_embd, config.hidden, config.dropout, config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))  # (B, T, C)
        x = x + self.mlp(self.ln_2(x))  # (B, T, C)
        return x


class GPT(nn.Module):
    """Decoder-only language model.

    ``forward(idx, targets=None)`` returns ``(logits, loss)``: logits of shape
    ``(B, T, vocab_size)`` for every position, and the mean next-token cross-entropy when
    ``targets`` (``(B, T)`` token ids, ``-1`` = ignore) is given, else ``None``.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise InvalidParameterError(
                f"The 'config' parameter of GPT must be an instance of GPTConfig. "
                f"Got {type(config).__name__} instead."
            )
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embedding
                wpe=nn.Embedding(config.block_size, config.n_embd),  # learned position embedding
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer), one attention and one MLP
        # projection per layer add to the residual stream, so its variance stays O(1) with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=INIT_STD / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)

    def n_params(self, non_embedding: bool = False) -> int:
        """Number of parameters, a tied weight counted once.

        Args:
            non_embedding: Leave out the token embedding (``wte``, which with tied weights is
                also the output head) and the position embedding (``wpe``), as Kaplan et al. 2020
                do for scaling laws. With ``tie_weights=False`` the separate output head
                ``lm_head`` is still counted: it is a matmul paid for on every token.
        """
        n = sum(p.numel() for p in self.parameters())  # .parameters() yields a shared tensor once
        if non_embedding:
            n -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return n

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if idx.ndim != 2:
            raise InvalidParameterError(
                f"The 'idx' parameter of GPT.forward must be a 2-d tensor (batch, time). "
                f"Got shape {tuple(idx.shape)}."
            )
        B, T = idx.shape
        if T > self.config.block_size:
            raise InvalidParameterError(
                f"The 'idx' parameter of GPT.forward must have at most block_size="
                f"{self.config.block_size} positions. Got {T}."
            )
        if idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise InvalidParameterError(
                f"The 'idx' parameter of GPT.forward must hold integer token ids. Got dtype {idx.dtype}."
            )
        if idx.device.type == "cpu" and idx.numel():  # on an accelerator this would sync every step
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise InvalidParameterError(
                    f"The 'idx' parameter of GPT.forward must hold token ids in [0, vocab_size="
                    f"{self.config.vocab_size}). Got {lo if lo < 0 else hi}."
                )
        if targets is not None and (not isinstance(targets, torch.Tensor) or targets.shape != idx.shape):
            raise InvalidParameterError(
                f"The 'targets' parameter of GPT.forward must have the shape of idx {tuple(idx.shape)}. Got "
                + (f"shape {tuple(targets.shape)}." if isinstance(targets, torch.Tensor) else f"{type(targets).__name__}.")
            )
        pos = torch.arange(T, dtype=torch.long, device=idx.device)  # (T,)
        tok_emb = self.transformer.wte(idx)  # (B, T, C)
        pos_emb = self.transformer.wpe(pos)  # (T, C), broadcast over the batch
        x = self.transformer.drop(tok_emb + pos_emb)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)  # (B, T, C)
        x = self.transformer.ln_f(x)  # (B, T, C)
        logits = self.lm_head(x)  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1
            )
        return logits, loss


class ChinchillaFlops(NamedTuple):
    """Forward FLOPs of ONE sequence, term by term (Hoffmann et al. 2022, Appendix F).

    The per-layer terms (``attention_*`` and ``dense``) are for one layer; ``forward`` multiplies
    them by ``n_layers``. One multiply-add counts as 2 FLOPs.
    """

    n_layers: int
    embeddings: float  # 2 * seq * vocab * d: the lookup priced as a one-hot matmul
    attention_qkv: float  # 2 * 3 * seq * d * (kv_size * n_heads)
    attention_logits: float  # 2 * seq * seq * (kv_size * n_heads): Q K^T
    attention_softmax: float  # 3 * n_heads * seq * seq
    attention_values: float  # 2 * seq * seq * (kv_size * n_heads): softmax(.) V
    attention_out: float  # 2 * seq * (kv_size * n_heads) * d: output projection
    dense: float  # 2 * seq * (d * ffw + ffw * d)
    logits: float  # 2 * seq * d * vocab: final projection onto the vocabulary

    @property
    def attention(self) -> float:
        """All attention terms of one layer."""
        return (
            self.attention_qkv
            + self.attention_logits
            + self.attention_softmax
            + self.attention_values
            + self.attention_out
        )

    @property
    def forward(self) -> float:
        """embeddings + n_layers * (attention + dense) + logits, for one sequence."""
        return self.embeddings + self.n_layers * (self.attention + self.dense) + self.logits


def chinchilla_forward_flops(
    n_layers: int,
    d_model: int,
    ffw_size: int,
    n_heads: int,
    kv_size: int,
    vocab_size: int,
    seq_len: int,
) -> ChinchillaFlops:
    """Forward FLOPs of one sequence of ``seq_len`` tokens, term by term (Appendix F).

    The count is for full (not causally halved) attention, ignores normalisations, biases,
    residual additions and nonlinearities, and prices the embedding lookup as a matmul, exactly
    as the paper does.
    """
    for name, value in dict(
        n_layers=n_layers, d_model=d_model, ffw_size=ffw_size, n_heads=n_heads,
        kv_size=kv_size, vocab_size=vocab_size, seq_len=seq_len,
    ).items():
        check_param(name, value, [Interval(int, 1, None)], owner="chinchilla_forward_flops")
    s, d, a = seq_len, d_model, kv_size * n_heads  # a: total width of the attention heads
    return ChinchillaFlops(
        n_layers=n_layers,
        embeddings=2.0 * s * vocab_size * d,
        attention_qkv=2.0 * 3 * s * d * a,
        attention_logits=2.0 * s * s * a,
        attention_softmax=3.0 * n_heads * s * s,
        attention_values=2.0 * s * s * a,
        attention_out=2.0 * s * a * d,
        dense=2.0 * s * (d * ffw_size + ffw_size * d),
        logits=2.0 * s * d * vocab_size,
    )


def chinchilla_flops(
    n_layers: int,
    d_model: int,
    ffw_size: int,
    n_heads: int,
    kv_size: int,
    vocab_size: int,
    seq_len: int,
    n_tokens: float,
) -> float:
    """Total training FLOPs (forward + backward) for ``n_tokens`` tokens, Appendix F.

    Backward is counted as twice the forward, so the total is 3x the forward FLOPs per token
    times ``n_tokens``. Public as :func:`leanscale.scaling.chinchilla_flops` (the compute ``C`` of
    a scaling law); it lives here, next to the per-layer rules it sums.

    Example:
        Chinchilla itself (70B parameters, 1.4T tokens) is within a few percent of ``6 N D``:

        >>> c = chinchilla_flops(80, 8192, 32768, 64, 128, 32000, 2048, 1.4e12)
        >>> round(c / (6 * 70e9 * 1.4e12), 2)
        0.97
    """
    check_param("n_tokens", n_tokens, [Interval("real", 0, None)], owner="chinchilla_flops")
    fwd = chinchilla_forward_flops(
        n_layers, d_model, ffw_size, n_heads, kv_size, vocab_size, seq_len
    ).forward
    return 3.0 * fwd / seq_len * n_tokens


def flops_per_token(config: GPTConfig, seq_len: int | None = None, backward: bool = True) -> float:
    """Chinchilla (Appendix F) FLOPs per token of a :class:`GPT` with this config.

    Args:
        config: The model's shape; key size is ``n_embd // n_head``, ffw size is ``config.hidden``.
        seq_len: Sequence length (default ``config.block_size``); attention grows with it.
        backward: Include the backward pass (2x forward), i.e. training cost; else inference.

    Differences from what the model really executes (and what ``count_flops`` reports): the
    formula prices the token embedding as a one-hot matmul (the real lookup is a gather, 0 FLOPs),
    counts softmax (3 FLOPs per attention weight) and full rather than causal attention, and
    ignores the position embedding, LayerNorms, GELU, residual additions and biases.
    """
    if not isinstance(config, GPTConfig):
        raise InvalidParameterError(
            f"The 'config' parameter of flops_per_token must be an instance of GPTConfig. "
            f"Got {type(config).__name__} instead."
        )
    seq_len = config.block_size if seq_len is None else seq_len
    check_param("seq_len", seq_len, [Interval(int, 1, None)], owner="flops_per_token")
    fwd = chinchilla_forward_flops(
        config.n_layer, config.n_embd, config.hidden, config.n_head, config.head_size,
        config.vocab_size, seq_len,
    ).forward / seq_len
    return 3.0 * fwd if backward else fwd
