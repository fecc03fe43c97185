"""The one learning-rate schedule, against closed forms, in both reading conventions."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from leanscale.core.errors import InvalidParameterError
from leanscale.train import cosine_factor, lr_factor
from leanscale.train.optim import param_groups


@given(st.integers(1, 500), st.data())
def test_cosine_after_warmup_matches_the_closed_form(n_steps, data):
    warmup = data.draw(st.integers(0, n_steps - 1))
    step = data.draw(st.integers(0, n_steps))
    floor = data.draw(st.floats(0, 0.5))
    got = lr_factor(step, n_steps, warmup_steps=warmup, floor=floor)
    if step < warmup:
        assert got == pytest.approx(step / warmup)
    else:
        p = (step - warmup) / max(1, n_steps - warmup)
        assert got == pytest.approx(floor + (1 - floor) * (1 + math.cos(math.pi * p)) / 2)
    assert min(floor, 0.0) - 1e-12 <= got <= 1 + 1e-12


def test_end_of_step_reading_reaches_the_floor_exactly_on_the_last_step():
    n, warmup = 50, 5
    lrs = [lr_factor(s + 1, n, warmup_steps=warmup, floor=0.1) for s in range(n)]
    assert lrs[0] == pytest.approx(1 / warmup) and lrs[warmup - 1] == 1.0
    assert lrs[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(lrs[warmup - 1:], lrs[warmup:]))


def test_step_decay_and_constant():
    assert [lr_factor(s, 10, decay="step", milestones=(3, 6), gamma=0.5) for s in (0, 3, 6, 9)] == [1, 0.5, 0.25, 0.25]
    assert lr_factor(7, 10, decay="none") == 1.0
    assert cosine_factor(2.0) == 0.0 and cosine_factor(-1.0) == 1.0  # progress clipped to [0, 1]


def test_unknown_decay_is_refused_with_the_valid_names():
    with pytest.raises(InvalidParameterError, match=r"'decay' parameter of lr_factor.*'cosine'.*Did you mean 'cosine'"):
        lr_factor(0, 10, decay="cosin")


def test_param_groups_decay_only_matrices_and_skip_frozen():
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)
    decay, other = param_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [(4, 3)] and decay["weight_decay"] == 0.1
    assert len(other["params"]) == 4 and other["weight_decay"] == 0.0  # 2 biases + LayerNorm's 2
