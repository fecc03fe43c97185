"""FLOP rules for well-known third-party layers recognised by name (#15): Hugging Face's ``*RMSNorm``
classes count as ``nn.RMSNorm`` does, GPT-2's ``Conv1D`` as the ``nn.Linear`` it is the transpose of."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from leanscale.core.flops import count_flops, get_flop_rule, register_flop_rule

transformers = pytest.importorskip("transformers", reason="needs transformers (leanscale[hf])")


def test_hf_rmsnorm_counts_as_torch_rmsnorm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = torch.randn(3, 5, 16, requires_grad=True)
    ours, ref = LlamaRMSNorm(16), nn.RMSNorm(16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "no FLOP rule" warning any more
        got = count_flops(ours, x)
    want = count_flops(ref, x)
    assert (got.forward, got.backward) == (want.forward, want.backward) and got.forward == 4 * x.numel()


def test_gpt2_conv1d_counts_as_the_linear_it_transposes():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(24, 16)  # nf=24 outputs, nx=16 inputs: weight (16, 24)
    lin = nn.Linear(16, 24)
    x = torch.randn(2, 7, 16)
    got, want = count_flops(conv, x), count_flops(lin, x)
    assert got.forward == want.forward == 2 * 16 * 24 * 2 * 7
    assert got.backward == want.backward  # weight gradient only: x needs none
    frozen = Conv1D(24, 16).requires_grad_(False)
    assert count_flops(frozen, x).backward == 0


def test_a_registered_rule_wins_over_the_name_rule():
    class MyRMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.weight

    assert get_flop_rule(MyRMSNorm) is not None  # recognised by its name
    register_flop_rule(MyRMSNorm, lambda m, inputs, out: (7, 0))
    assert count_flops(MyRMSNorm(), torch.randn(2, 4)).forward == 7
