"""Tests of the reference Transformer and of its Chinchilla (Appendix F) FLOP count."""

from __future__ import annotations

import doctest

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import leanscale.models.transformer as transformer_module
from leanscale.core.errors import InvalidParameterError
from leanscale.models import (
    GPT,
    MLP,
    GPTConfig,
    chinchilla_forward_flops,
    flops_per_token,
)
from leanscale.scaling import chinchilla_flops

TINY = dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)


def test_doctests():
    result = doctest.testmod(transformer_module)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(n_embd=30, n_head=4), "'n_embd' parameter of GPTConfig must be divisible by n_head=4"),
        (dict(vocab_size=0), "'vocab_size' parameter of GPTConfig must be an int in the range"),
        (dict(n_layer=2.0), "'n_layer' parameter"),
        (dict(dropout=1.0), "'dropout' parameter"),
        (dict(bias="yes"), "'bias' parameter"),
    ],
)
def test_config_rejects_bad_values(overrides, match):
    with pytest.raises(InvalidParameterError, match=match):
        GPTConfig(**{**TINY, **overrides})


@pytest.mark.parametrize("tie_weights", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_n_params_counts_every_tensor_once(tie_weights, bias):
    config = GPTConfig(**TINY, tie_weights=tie_weights, bias=bias)
    model = GPT(config)
    assert model.n_params() == sum(p.numel() for p in model.parameters())
    embeddings = (config.vocab_size + config.block_size) * config.n_embd
    assert model.n_params(non_embedding=True) == model.n_params() - embeddings
    if tie_weights:
        assert model.lm_head.weight is model.transformer.wte.weight
    else:
        # The untied head is counted, also without embeddings.
        assert model.n_params() == sum(p.numel() for p in model.parameters())
        assert model.lm_head.weight is not model.transformer.wte.weight
    if not bias:
        # Closed form without biases: per layer 4 d^2 (attention) + 2 * 4 d^2 (MLP) + 2 d (two
        # LayerNorm weights), plus the final LayerNorm weight; Kaplan's 12 * L * d^2 plus norms.
        d, L = config.n_embd, config.n_layer
        expected = L * (12 * d * d + 2 * d) + d + (0 if tie_weights else config.vocab_size * d)
        assert model.n_params(non_embedding=True) == expected


def test_forward_shapes_and_loss():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    idx = torch.randint(0, 50, (3, 10))
    logits, loss = model(idx)
    assert logits.shape == (3, 10, 50) and loss is None
    logits, loss = model(idx, targets=idx)
    # At initialisation the prediction is close to uniform: loss ~ ln(vocab_size).
    assert abs(loss.item() - torch.log(torch.tensor(50.0)).item()) < 0.5


def test_forward_rejects_long_or_flat_input():
    model = GPT(GPTConfig(**TINY))
    with pytest.raises(InvalidParameterError, match="at most block_size=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(InvalidParameterError, match="2-d tensor"):
        model(torch.zeros(16, dtype=torch.long))
    with pytest.raises(InvalidParameterError, match="GPTConfig"):
        GPT(TINY)


def test_attention_is_causal():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY)).eval()
    idx = torch.randint(0, 50, (1, 12))
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 50
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8])  # the past does not see the future
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_mlp_is_a_separate_class_with_sizes():
    config = GPTConfig(**TINY, mlp_ratio=3)
    model = GPT(config)
    mlps = [m for m in model.modules() if type(m) is MLP]
    assert len(mlps) == config.n_layer
    assert all(m.n_embd == 32 and m.hidden == 96 for m in mlps)


def test_gpt_trains_on_random_tokens(one_thread):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    idx = torch.randint(0, 50, (8, 16))  # one fixed batch: the model can memorise it
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        _, loss = model(idx[:, :-1], targets=idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert sum(losses[-5:]) < sum(losses[:5])


def test_chinchilla_70b_is_close_to_6ND():
    # Chinchilla (Hoffmann et al. 2022, Table 4 / A4): 80 layers, d_model 8192, 64 heads of
    # size 128, ffw 4 * d_model, SentencePiece vocabulary of 32k, sequences of 2048, 1.4T tokens.
    flops = chinchilla_flops(
        n_layers=80, d_model=8192, ffw_size=32768, n_heads=64, kv_size=128,
        vocab_size=32000, seq_len=2048, n_tokens=1.4e12,
    )
    ratio = flops / (6 * 70e9 * 1.4e12)
    assert abs(ratio - 1) < 0.05, ratio


def test_chinchilla_terms_by_hand():
    f = chinchilla_forward_flops(n_layers=2, d_model=4, ffw_size=16, n_heads=2, kv_size=2,
                                 vocab_size=10, seq_len=3)
    assert f.embeddings == 2 * 3 * 10 * 4
    assert f.attention_qkv == 2 * 3 * 3 * 4 * 4
    assert f.attention_logits == f.attention_values == 2 * 3 * 3 * 4
    assert f.attention_softmax == 3 * 2 * 3 * 3
    assert f.attention_out == 2 * 3 * 4 * 4
    assert f.dense == 2 * 3 * (4 * 16 * 2)
    assert f.logits == 2 * 3 * 4 * 10
    assert f.forward == f.embeddings + 2 * (f.attention + f.dense) + f.logits


def test_flops_per_token_is_chinchilla_per_token():
    config = GPTConfig(**TINY)
    per_token = flops_per_token(config)
    total = chinchilla_flops(2, 32, 128, 2, 16, 50, 16, n_tokens=1000)
    assert per_token * 1000 == pytest.approx(total)
    assert flops_per_token(config, backward=False) == pytest.approx(per_token / 3)
    # Longer sequences cost more per token (attention is quadratic).
    assert flops_per_token(config, seq_len=8) < per_token
    with pytest.raises(InvalidParameterError, match="'seq_len' parameter of flops_per_token"):
        flops_per_token(config, seq_len=0)
    with pytest.raises(InvalidParameterError, match="'n_tokens' parameter of chinchilla_flops"):
        chinchilla_flops(2, 32, 128, 2, 16, 50, 16, n_tokens=-1)


def test_matmul_flops_match_flop_counter_mode():
    """FlopCounterMode counts matmuls only: compare with the matmul terms of Appendix F exactly.

    Not compared: the embedding (Chinchilla prices it as a one-hot matmul, FlopCounterMode
    counts 0 for a lookup) and the softmax (FlopCounterMode does not count it). The attention
    runs on PyTorch's math backend so that its two matmuls are visible as ``bmm`` calls on a CPU.
    """
    torch.manual_seed(0)
    config = GPTConfig(**TINY)
    model = GPT(config)
    batch, seq = 3, 12
    idx = torch.randint(0, config.vocab_size, (batch, seq))
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as fwd_counter:
            logits, _ = model(idx)
        with FlopCounterMode(display=False) as bwd_counter:
            logits.sum().backward()
    f = chinchilla_forward_flops(config.n_layer, config.n_embd, config.hidden, config.n_head,
                                 config.head_size, config.vocab_size, seq)
    per_layer = f.attention_qkv + f.attention_logits + f.attention_values + f.attention_out + f.dense
    matmul_forward = batch * (config.n_layer * per_layer + f.logits)
    assert fwd_counter.get_total_flops() == matmul_forward
    # Every matmul input requires grad here (the first one is an embedding's output), so the
    # backward is exactly the 2x forward that Appendix F assumes.
    assert bwd_counter.get_total_flops() == 2 * matmul_forward


# ------------------------------------------------------------------ bad input (issue #13)
def _tiny_gpt() -> GPT:
    return GPT(GPTConfig(vocab_size=10, block_size=4, n_layer=1, n_head=1, n_embd=8))


@pytest.mark.parametrize(("idx", "targets", "match"), [
    (torch.full((1, 3), 10), None, "token ids in \\[0, vocab_size=10\\). Got 10"),
    (torch.full((1, 3), -1), None, "Got -1"),
    (torch.zeros(1, 3), None, "integer token ids. Got dtype torch.float32"),
    (torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long), "'targets' .* shape of idx \\(1, 3\\)"),
    (torch.zeros(1, 3, dtype=torch.long), [0, 1, 2], "'targets' .* Got list"),
])
def test_gpt_forward_refuses_bad_tokens(idx, targets, match):
    with pytest.raises(InvalidParameterError, match=match):
        _tiny_gpt()(idx, targets)


def test_gpt_forward_accepts_int32_tokens_and_ignore_index_targets():
    idx = torch.tensor([[1, 2, 9]], dtype=torch.int32)
    _, loss = _tiny_gpt()(idx, torch.tensor([[2, 9, -1]]))
    assert torch.isfinite(loss)


def test_chinchilla_flops_has_one_public_home():
    import leanscale.models
    import leanscale.scaling
    from leanscale.models.transformer import chinchilla_flops as implementation

    assert "chinchilla_flops" not in leanscale.models.__all__
    assert leanscale.scaling.chinchilla_flops is implementation  # exported by scaling, one object
    with pytest.warns(FutureWarning, match="moved to leanscale.scaling.chinchilla_flops"):
        old = leanscale.models.chinchilla_flops
    assert old is implementation
    with pytest.raises(AttributeError, match="no attribute 'chinchila_flops'"):
        leanscale.models.chinchila_flops  # noqa: B018
