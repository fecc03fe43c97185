"""Reference models shared by the techniques: a nanoGPT-like Transformer, BatchNorm classifiers, a
softmax regression (L-BFGS) for features, and encoders (MiniLM-L6 text embeddings, a small conv
image encoder, batch-wise embedding of any function)."""

from leanscale.core.deprecation import moved_attributes
from leanscale.models.cnn import BNCNN, MLPClassifier
from leanscale.models.encoders import (
    TEXT_EMBEDDING_DIM,
    ConvEncoder,
    StaticTextEncoder,
    embed_images,
    embed_texts,
    embed_with,
    static_text_encoder,
)
from leanscale.models.linear import SoftmaxRegression
from leanscale.models.transformer import (
    GPT,
    MLP,
    Block,
    CausalSelfAttention,
    ChinchillaFlops,
    GPTConfig,
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
    "flops_per_token",
    "BNCNN",
    "MLPClassifier",
    "SoftmaxRegression",
    "TEXT_EMBEDDING_DIM",
    "ConvEncoder",
    "embed_texts",
    "embed_with",
    "embed_images",
    "StaticTextEncoder",
    "static_text_encoder",
]



# chinchilla_flops is exported by leanscale.scaling only (#14: one home per public name)
__getattr__ = moved_attributes(__name__, {"chinchilla_flops": "leanscale.scaling:chinchilla_flops"})
