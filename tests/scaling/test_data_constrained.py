"""Data-constrained scaling (Muennighoff et al. 2023, arXiv 2305.16264), checked against the paper.

References used below:
- Appendix A (the derivation of D'): the worked example U = 1, R_D = 4, R_D* = 3 -> D' = 3.21, and
  R_D = 100 -> D' = 3.99 (the plateau U (1 + R_D*) = 4); the fitted R_D* = 15.387756, R_N* = 5.309743.
- Figure 1 (right), as computed by the authors' code (repository huggingface/datablations, README
  "Parametric Fit"): L(6.34e9 params, 242e9 tokens, 25e9 unique) = 2.2256440889984477 and
  L(8.67e9, 178e9, 25e9) = 2.2269634075087867; their grid search for the budget of the latter
  gives "227B tokens, 9.1 epochs, 6.8B parameters".
- The abstract: up to 4 epochs of repeated data change the loss negligibly; section 3.1: returns
  diminish sharply beyond R_D* (~16 epochs).
"""

import math
import warnings

import numpy as np
import pytest

from leanscale.core.errors import InvalidParameterError
from leanscale.scaling import (
    EPOCH_2024,
    MUENNIGHOFF_2023,
    R_D_STAR,
    R_N_STAR,
    ScalingWarning,
    data_constrained_loss,
    effective_data,
    effective_params,
    plan,
    plan_data_constrained,
)


def test_fitted_constants_are_the_papers():
    assert (R_D_STAR, R_N_STAR) == (15.387756, 5.309743)
    # Appendix A's rounded law: 521 / N'^0.35 + 1488 / D'^0.35 + 1.87
    law = MUENNIGHOFF_2023
    assert (round(law.A_), round(law.B_), round(law.E_, 2), round(law.alpha_, 2)) == (521, 1488, 1.87, 0.35)


def test_appendix_a_worked_example():
    # delta = 0.25 -> R_D* = (1 - delta) / delta = 3; 5 epochs of one token (R_D = 4): D' = 3.21.
    assert effective_data(1.0, 5.0, r_star=3.0) == pytest.approx(1 + 3 * (1 - math.exp(-4 / 3)))
    assert round(effective_data(1.0, 5.0, r_star=3.0), 2) == 3.21
    assert 3.99 <= effective_data(1.0, 101.0, r_star=3.0) < 4.0  # R_D = 100: "3.99", never above 4
    assert effective_data(1.0, 1e9, r_star=3.0) == pytest.approx(4.0)


def test_effective_data_limits():
    u = 1e10
    assert effective_data(u, u) == u  # one epoch: no decay
    assert effective_data(u, 0.3 * u) == pytest.approx(0.3 * u)  # part of one epoch: D' = D
    assert effective_data(u, 1e6 * u) == pytest.approx(u * (1 + R_D_STAR))  # the plateau
    assert effective_data(u, 3 * u, r_star=math.inf) == pytest.approx(3 * u)  # no decay at all
    # small R_D: repeats are almost as good as new data, D' ~ D (first order in R_D / R_D*)
    assert effective_data(u, 1.01 * u) == pytest.approx(1.01 * u, rel=1e-5)
    d = np.array([1.0, 2.0, 4.0, 16.0]) * u
    assert np.all(np.diff(effective_data(u, d)) > 0) and np.all(effective_data(u, d) <= d)


def test_effective_params_limits():
    u = 25e9
    n_u = MUENNIGHOFF_2023.optimal_params(u)  # U_N: compute-optimal size for the unique data
    assert effective_params(0.5 * n_u, u) == pytest.approx(0.5 * n_u)  # no excess parameters
    assert effective_params(1e6 * n_u, u) == pytest.approx(n_u * (1 + R_N_STAR))  # plateau
    # Appendix A's simplification: U_N = 0.051 U_D for the paper's law
    assert n_u / u == pytest.approx(0.051, abs=0.0005)


def test_figure_1_losses_match_the_authors_code():
    a = data_constrained_loss(MUENNIGHOFF_2023, 6.34e9, 242e9, 25e9)
    b = data_constrained_loss(MUENNIGHOFF_2023, 8.67e9, 178e9, 25e9)
    assert a == pytest.approx(2.2256440889984477, rel=1e-12)
    assert b == pytest.approx(2.2269634075087867, rel=1e-12)
    assert a < b  # "fewer parameters, more epochs" is the better use of the same compute


def test_optimal_allocation_matches_the_papers_grid_search_and_brute_force():
    c, u = 6 * 8.67e9 * 178e9, 25e9
    p = plan_data_constrained("muennighoff", flops=c, unique_tokens=u)
    # the authors' README: 227B tokens, 9.1 epochs, 6.8B parameters
    assert p.n_params == pytest.approx(6.8e9, rel=0.01)
    assert p.n_tokens == pytest.approx(227e9, rel=0.01)
    assert p.epochs == pytest.approx(9.1, abs=0.05)
    assert 6 * p.n_params * p.n_tokens == pytest.approx(c)
    # brute force: 200,001 sizes over 3 decades around it
    n = np.geomspace(p.n_params / 30, p.n_params * 30, 200_001)
    loss = data_constrained_loss(MUENNIGHOFF_2023, n, c / (6 * n), u)
    assert p.predicted_loss <= loss.min() + 1e-12
    assert p.n_params == pytest.approx(n[np.argmin(loss)], rel=1e-3)
    assert p.predicted_loss == pytest.approx(data_constrained_loss(MUENNIGHOFF_2023, p.n_params, p.n_tokens, u))
    # penalty against the same budget with unlimited unique data
    assert p.unlimited_loss == pytest.approx(MUENNIGHOFF_2023.predict(*MUENNIGHOFF_2023.compute_optimal(c)))
    assert p.loss_penalty == pytest.approx(p.predicted_loss - p.unlimited_loss) and p.loss_penalty > 0
    assert p.effective_tokens == pytest.approx(effective_data(u, p.n_tokens))
    assert p.warnings == []  # 9 epochs: inside 1 + R_D*


def test_four_epochs_nearly_as_good_as_unique_data():
    # The abstract: up to 4 epochs change the loss negligibly; beyond ~16 returns vanish.
    law, u = MUENNIGHOFF_2023, 1e10
    assert effective_data(u, 4 * u) / (4 * u) > 0.93  # 3.73 U of 4 U

    def penalty(epochs):
        d = epochs * u
        n = law.optimal_params(d)
        return data_constrained_loss(law, n, d, u) / law.predict(n, d) - 1.0

    assert penalty(1) == 0.0
    assert 0 < penalty(4) < 0.015  # 1.1% higher loss than with 4x the unique data
    assert penalty(16) > 3 * penalty(4) and penalty(40) > 0.07
    assert effective_data(u, 40 * u) / (40 * u) < 0.4  # most of 40 epochs is wasted


def test_infinite_decay_constants_give_the_single_epoch_law():
    n, d, u = 3e9, 2e11, 1e10
    assert data_constrained_loss(EPOCH_2024, n, d, u, r_d_star=math.inf, r_n_star=math.inf) == pytest.approx(
        EPOCH_2024.predict(n, d), rel=1e-12)
    assert data_constrained_loss(EPOCH_2024, n, d, u) > EPOCH_2024.predict(n, d)


def test_enough_unique_data_gives_the_unconstrained_plan():
    base = plan("epoch", flops=1e22)
    p = plan_data_constrained("epoch", flops=1e22, unique_tokens=2 * base.n_tokens)
    assert p.n_params == pytest.approx(base.n_params) and p.n_tokens == pytest.approx(base.n_tokens)
    assert p.epochs == pytest.approx(0.5) and p.loss_penalty == 0.0 and p.warnings == []
    assert p.predicted_loss == pytest.approx(base.predicted_loss)


def test_less_unique_data_costs_more_loss_and_more_epochs():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ScalingWarning)  # 1e10 unique tokens: ~30 epochs, warned
        plans = [plan_data_constrained("epoch", flops=1e22, unique_tokens=u) for u in (1e11, 3e10, 1e10)]
    assert [p.epochs for p in plans] == sorted(p.epochs for p in plans)
    assert plans[0].loss_penalty < plans[1].loss_penalty < plans[2].loss_penalty
    # with data scarce, compute goes to epochs faster than to parameters (R_D* > R_N*, section 5)
    assert plans[2].n_params < plans[0].n_params


def test_warns_beyond_the_epochs_where_returns_vanish():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = plan_data_constrained("epoch", flops=1e24, unique_tokens=1e11)
    assert p.epochs > 1 + R_D_STAR
    assert [str(w.message) for w in caught] == p.warnings and all(w.category is ScalingWarning for w in caught)
    assert "beyond 1 + R_D* = 16.4" in p.warnings[0] and "returns of repetition vanish" in p.warnings[0]
    # ... and the excess parameters that go with it (beyond 1 + R_N*)
    assert "beyond 1 + R_N* = 6.31" in p.warnings[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = plan_data_constrained("epoch", flops=1e22, unique_tokens=1e11)  # ~3 epochs: nothing to say
    assert q.warnings == [] and 1 < q.epochs < 5


@pytest.mark.parametrize("bad", [-1e9, 0.0, float("nan"), float("inf"), "1e9", True, None])
def test_bad_unique_tokens(bad):
    with pytest.raises(InvalidParameterError, match="'unique_tokens' parameter of plan_data_constrained"):
        plan_data_constrained("epoch", flops=1e22, unique_tokens=bad)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(flops=-1.0, unique_tokens=1e10), "'flops'.*\\(0, inf\\).*-1.0"),
        (dict(flops=float("nan"), unique_tokens=1e10), "'flops'.*nan"),
        (dict(flops=1e22, unique_tokens=1e10, r_d_star=0.0), "'r_d_star'"),
        (dict(flops=1e22, unique_tokens=1e10, r_n_star=-2.0), "'r_n_star'"),
        (dict(flops=1e22, unique_tokens=1e10, gpu="h1000"), "'gpu'.*Did you mean 'h100'"),
        (dict(flops=1e14, unique_tokens=1e6), "below the smallest model.*Pass extrapolate=True"),
    ],
)
def test_plan_bad_input(kwargs, match):
    with pytest.raises(InvalidParameterError, match=match):
        plan_data_constrained("epoch", **kwargs)


def test_absurdly_few_unique_tokens_are_refused_not_planned():
    # one unique token for 1e22 FLOPs: the loss keeps falling to the edge of the search, no plan
    with pytest.raises(InvalidParameterError, match="'unique_tokens'.*too small for a budget of 1e\\+22.*Got 1.0"):
        plan_data_constrained("epoch", flops=1e22, unique_tokens=1.0, extrapolate=True)
    with pytest.raises(InvalidParameterError, match="'unique_tokens'.*overflows or underflows.*1e-300"):
        plan_data_constrained("epoch", flops=1e22, unique_tokens=1e-300, extrapolate=True)


def test_functions_bad_input():
    with pytest.raises(InvalidParameterError, match="'unique_tokens' parameter of effective_data"):
        effective_data(-5.0, 1e9)
    with pytest.raises(InvalidParameterError, match="'n_tokens' parameter of effective_data"):
        effective_data(1e9, float("inf"))
    with pytest.raises(InvalidParameterError, match="'n_params' parameter of data_constrained_loss"):
        data_constrained_loss("muennighoff", [1e9, -1.0], 1e10, 1e9)
    with pytest.raises(InvalidParameterError, match="'law'.*Did you mean 'epoch'"):
        plan_data_constrained("epochs", flops=1e22, unique_tokens=1e10)
