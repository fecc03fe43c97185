import numpy as np
import pytest

from leanscale.core.errors import InvalidParameterError
from leanscale.scaling import EPOCH_2024, fit_envelope, fit_isoflop
from tests.scaling.conftest import chinchilla_like_runs


def test_isoflop_recovers_the_laws_exponent():
    # Sizes within 4x of each budget's optimum, as a sweep samples them: there the valley is
    # close to a parabola in log N (over 2+ decades its asymmetry biases the vertex).
    n, d, loss, c = [], [], [], []
    for budget in (6e18, 1e19, 3e19, 6e19, 1e20, 3e20, 6e20, 1e21, 3e21):
        n_true, _ = EPOCH_2024.compute_optimal(budget)
        for size in np.geomspace(n_true / 4, n_true * 4, 9):
            n.append(size), d.append(budget / (6 * size)), c.append(budget)
    n, d, c = map(np.array, (n, d, c))
    loss = EPOCH_2024.predict(n, d)
    fit = fit_isoflop(n, d, loss, budget_flops=c, n_resamples=0)
    a_true, b_true = EPOCH_2024.exponents_
    assert fit.a == pytest.approx(a_true, abs=0.01)
    assert fit.a + fit.b == pytest.approx(1.0, abs=1e-9)  # D_opt = C / (6 N_opt)
    # Each vertex is near the law's exact optimum for that budget.
    n_true, _ = EPOCH_2024.compute_optimal(fit.budgets)
    np.testing.assert_allclose(np.log(fit.n_opt), np.log(n_true), atol=0.15)


def test_isoflop_groups_by_flops_and_gives_intervals():
    n, d, loss, _ = chinchilla_like_runs(noise=0.005, seed=3, per_budget=15)
    fit = fit_isoflop(n, d, loss, n_resamples=300, seed=0)  # budgets from 6ND grouping
    assert len(fit.budgets) == 9
    lo, hi = fit.intervals["a"]
    assert lo < fit.a < hi
    assert lo < EPOCH_2024.exponents_[0] + 0.03 and hi > EPOCH_2024.exponents_[0] - 0.03


def test_isoflop_errors_name_the_problem():
    with pytest.raises(InvalidParameterError, match="at least 2 IsoFLOP budgets.*2 distinct model sizes"):
        fit_isoflop([1e8, 2e8, 1e8, 2e8], [1e9, 5e8, 2e9, 1e9], [3, 3.1, 2.9, 3.0])


def test_envelope_recovers_the_exponent():
    ids, n, d, l = [], [], [], []
    for i, size in enumerate(np.geomspace(1e8, 1e10, 25)):
        for tokens in np.geomspace(1e8, 3e11, 80):
            ids.append(f"r{i}"), n.append(size), d.append(tokens), l.append(EPOCH_2024.predict(size, tokens))
    fit = fit_envelope(ids, n, d, l, n_resamples=100)
    assert fit.a == pytest.approx(EPOCH_2024.exponents_[0], abs=0.05)
    assert fit.a + fit.b == pytest.approx(1.0, abs=1e-9)
    assert "a" in fit.intervals


def test_envelope_bad_input():
    with pytest.raises(InvalidParameterError, match="at least 2 model sizes"):
        fit_envelope(["a", "a"], [1e8, 1e8], [1e9, 2e9], [3.0, 2.9])
    with pytest.raises(InvalidParameterError, match="constant within a run"):
        fit_envelope(["a", "a", "b", "b"], [1e8, 2e8, 3e8, 3e8], [1, 2, 1, 2], [3, 2, 3, 2])
