import warnings

import pytest

from leanscale.core.errors import InvalidParameterError
from leanscale.scaling import (
    CHINCHILLA_2022,
    EPOCH_2024,
    ScalingWarning,
    gpu_hours,
    plan,
    training_flops,
)
from leanscale.scaling.flops import GPU_PEAK_FLOPS

# Hoffmann et al. 2022, table 3: (parameters, FLOPs, tokens) of compute-optimal models.
TABLE_3 = [
    (400e6, 1.92e19, 8.0e9),
    (1e9, 1.21e20, 20.2e9),
    (10e9, 1.23e22, 205.1e9),
    (67e9, 5.76e23, 1.5e12),
    (175e9, 3.85e24, 3.7e12),
    (280e9, 9.90e24, 5.9e12),
    (520e9, 3.43e25, 11.0e12),
    (1e12, 1.27e26, 21.2e12),
    (10e12, 1.30e28, 216.2e12),
]


@pytest.mark.parametrize("n, flops, tokens", TABLE_3)
def test_6nd_matches_table_3(n, flops, tokens):
    assert training_flops(n, tokens) == pytest.approx(flops, rel=0.05)


def test_epoch_law_reproduces_about_20_tokens_per_parameter_of_table_3():
    # Epoch's refit is consistent with Chinchilla's ~20 tokens/parameter rule (Table 3's ratio).
    for n, flops, tokens in TABLE_3[:6]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            p = plan(EPOCH_2024, flops=flops)
        assert p.tokens_per_param == pytest.approx(tokens / n, rel=0.35)
        # Beyond 10x the largest model behind the law (16B) the plan says it extrapolates.
        far = p.n_params > 10 * 1.6e10
        assert bool(p.warnings) == far and len(caught) == len(p.warnings)
        if far:
            assert "beyond the largest run" in p.warnings[0] and "1.6e+10" in p.warnings[0]
    # The published Approach-3 law is the outlier that Epoch corrected (far more tokens per parameter).
    assert plan(CHINCHILLA_2022, flops=5.76e23).tokens_per_param > 60


def test_plan_modes_are_consistent():
    p = plan("epoch", flops=1e22)
    assert p.optimal and p.flops == pytest.approx(1e22)
    q = plan("epoch", n_params=p.n_params)
    assert q.n_tokens == pytest.approx(p.n_tokens, rel=1e-9)
    r = plan("epoch", n_tokens=p.n_tokens)
    assert r.n_params == pytest.approx(p.n_params, rel=1e-9)
    s = plan("epoch", flops=1e22, n_params=p.n_params * 4)
    assert not s.optimal and s.predicted_loss > s.compute_optimal_loss
    assert s.n_tokens == pytest.approx(1e22 / (6 * p.n_params * 4))


def test_gpu_hours():
    hours = gpu_hours(1e21, "a100", 0.5)
    assert hours == pytest.approx(1e21 / (312e12 * 0.5) / 3600)
    p = plan("epoch", flops=1e21, gpu="h100", mfu=0.4)
    assert p.gpu_hours == pytest.approx(1e21 / (GPU_PEAK_FLOPS["h100"] * 0.4) / 3600)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(), "one or two of 'flops', 'n_params', 'n_tokens'.*none"),
        (dict(flops=1e20, n_params=1e9, n_tokens=1e9), "one or two.*n_params"),
        (dict(flops=-5.0), "'flops' parameter of plan must be a real number in the range \\(0, inf\\).*-5.0"),
        (dict(flops=1e12), "below the smallest model.*7e\\+07.*Got 1e\\+12"),
        (dict(flops=1e20, gpu="h1000"), "'gpu'.*Did you mean 'h100'"),
        (dict(flops=1e20, gpu="h100", mfu=1.5), "'mfu'.*\\(0, 1\\].*1.5"),
    ],
)
def test_plan_bad_input(kwargs, match):
    with pytest.raises(InvalidParameterError, match=match):
        plan("epoch", **kwargs)


def test_extrapolation_is_allowed_when_asked():
    with pytest.warns(ScalingWarning, match="below the smallest run"):
        p = plan("epoch", flops=1e12, extrapolate=True)
    assert "below the smallest run" in p.warnings[0]
    assert p.n_params < 7e7
