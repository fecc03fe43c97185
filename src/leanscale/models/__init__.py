"""Reference models shared by the techniques: a nanoGPT-like Transformer, BatchNorm classifiers and a
softmax regression (L-BFGS) for features."""

from leanscale.models.cnn import BNCNN, MLPClassifier
from leanscale.models.linear import SoftmaxRegression
from leanscale.models.transformer import (
    GPT,
    MLP,
    Block,
    CausalSelfAttention,
    ChinchillaFlops,
    GPTConfig,
    chinchilla_flops,
    chinchilla_forward_flops,
    flops_per_token,
)

__all__ = [
    "GPTConfig",
    "GPT",
    "Block",
    "CausalSelfAttention",
    "MLP",
    "ChinchillaFlops",
    "chinchilla_forward_flops",
    "chinchilla_flops",
    "flops_per_token",
    "BNCNN",
    "MLPClassifier",
    "SoftmaxRegression",
]
