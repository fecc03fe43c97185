"""Tests of SoftmaxRegression against a Newton-method reference and the optimality conditions."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch

import leanscale.models.linear as linear_module
from leanscale.core.errors import InvalidParameterError, NotFittedError
from leanscale.models.linear import ConvergenceWarning, SoftmaxRegression


def test_doctests():
    result = doctest.testmod(linear_module)
    assert result.attempted > 0 and result.failed == 0


def _binary_newton(X: np.ndarray, y: np.ndarray, C: float) -> tuple[np.ndarray, float]:
    """Binary logistic regression minimising sum_i logloss + ||w||^2 / (4 C) (intercept free) by
    Newton's method; the 2-class softmax model with penalty ||W||^2 / (2 C) reduces to it."""
    n, d = X.shape
    Z = np.hstack([X, np.ones((n, 1))])  # (n, d + 1), last column = intercept
    reg = np.full(d + 1, 1.0 / (2.0 * C))
    reg[-1] = 0.0  # the intercept is not penalised
    theta = np.zeros(d + 1)
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-Z @ theta))
        grad = Z.T @ (p - y) + reg * theta
        hess = (Z * (p * (1 - p))[:, None]).T @ Z + np.diag(reg)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-13:
            break
    return theta[:-1], float(theta[-1])


@pytest.mark.parametrize("C", [0.05, 1.0, 20.0])
def test_binary_matches_newton_reference(C):
    rng = np.random.default_rng(1)
    n = 300
    y = rng.integers(0, 2, n)
    X = rng.normal(size=(n, 3)) + np.outer(2 * y - 1, [0.8, -0.4, 0.0])  # overlapping blobs
    w, c = _binary_newton(X, y.astype(float), C)
    clf = SoftmaxRegression(C=C, tol=1e-9, max_iter=500).fit(X, y)
    assert clf.converged_
    np.testing.assert_allclose(clf.coef_[1] - clf.coef_[0], w, atol=1e-6)
    np.testing.assert_allclose(clf.coef_[1], -clf.coef_[0], atol=1e-7)  # minimum-norm split
    np.testing.assert_allclose(clf.intercept_, [-c / 2, c / 2], atol=1e-6)
    p_ref = 1.0 / (1.0 + np.exp(-(X @ w + c)))
    np.testing.assert_allclose(clf.predict_proba(X)[:, 1], p_ref, atol=1e-7)
    np.testing.assert_array_equal(clf.predict(X), (p_ref > 0.5).astype(int))


def test_multiclass_gradient_vanishes_at_the_solution():
    rng = np.random.default_rng(2)
    n, d, k, C = 400, 5, 4, 0.7
    y = rng.integers(0, k, n)
    X = rng.normal(size=(n, d)) + rng.normal(size=(k, d))[y]
    clf = SoftmaxRegression(C=C, tol=1e-8, max_iter=500).fit(X, y)
    P = clf.predict_proba(X)  # (n, k)
    np.testing.assert_allclose(P.sum(axis=1), 1.0, atol=1e-12)
    Y = np.eye(k)[y]
    # Gradient of sum_i CE + ||W||^2 / (2C), recomputed here in numpy.
    grad_w = (P - Y).T @ X + clf.coef_ / C  # (k, d)
    grad_b = (P - Y).sum(axis=0)  # (k,)
    assert np.abs(grad_w).max() / n < 1e-7 and np.abs(grad_b).max() / n < 1e-7
    np.testing.assert_allclose(clf.coef_.sum(axis=0), 0.0, atol=1e-6)  # rows of W sum to 0
    assert abs(clf.intercept_.sum()) < 1e-12
    # A stronger penalty shrinks the weights.
    strong = SoftmaxRegression(C=C / 100).fit(X, y)
    assert np.linalg.norm(strong.coef_) < 0.5 * np.linalg.norm(clf.coef_)


def test_labels_of_any_type_and_class_order():
    X = np.array([[0.0], [0.1], [1.0], [1.1], [2.0], [2.1]])
    y = np.array(["z", "z", "b", "b", "m", "m"])
    clf = SoftmaxRegression(C=100.0).fit(X, y)
    assert clf.classes_.tolist() == ["b", "m", "z"]
    np.testing.assert_array_equal(clf.predict(X), y)
    assert clf.score(X, y) == 1.0
    proba = clf.predict_proba(X)
    assert proba.shape == (6, 3) and proba.dtype == np.float64
    assert np.argmax(proba[0]) == 2  # column order follows classes_


def test_float32_and_torch_inputs_give_the_float64_result():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(60, 2)).astype(np.float32)
    y = (X[:, 0] > 0).astype(int)
    a = SoftmaxRegression().fit(X, y)
    b = SoftmaxRegression().fit(torch.from_numpy(X), torch.from_numpy(y))
    np.testing.assert_array_equal(a.coef_, b.coef_)
    assert a.coef_.dtype == np.float64
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(torch.from_numpy(X)))


def test_convergence_warning_when_max_iter_is_too_small():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(100, 4))
    y = (X @ [1.0, -2.0, 0.5, 0.0] > 0).astype(int)
    with pytest.warns(ConvergenceWarning, match="max_iter=1"):
        clf = SoftmaxRegression(C=100.0, max_iter=1).fit(X, y)
    assert not clf.converged_ and clf.n_iter_ == 1


def test_bad_inputs():
    X = np.zeros((4, 2))
    with pytest.raises(InvalidParameterError, match="'X', 'y'.*same length.*X=4, y=3"):
        SoftmaxRegression().fit(X, [0, 1, 0])
    with pytest.raises(InvalidParameterError, match="'y'.*at least 2 distinct labels. Got 1"):
        SoftmaxRegression().fit(X, [1, 1, 1, 1])
    bad = X.copy()
    bad[2, 1] = np.nan
    with pytest.raises(InvalidParameterError, match="'X'.*finite.*nan"):
        SoftmaxRegression().fit(bad, [0, 1, 0, 1])
    with pytest.raises(InvalidParameterError, match="'X'.*2-d"):
        SoftmaxRegression().fit(np.zeros(4), [0, 1, 0, 1])
    with pytest.raises(InvalidParameterError, match="'y'.*1-d"):
        SoftmaxRegression().fit(X, np.zeros((4, 1)))
    with pytest.raises(InvalidParameterError, match="'C' parameter of SoftmaxRegression.*Got 0"):
        SoftmaxRegression(C=0).fit(X, [0, 1, 0, 1])
    with pytest.raises(InvalidParameterError, match="'max_iter'"):
        SoftmaxRegression(max_iter=0).fit(X, [0, 1, 0, 1])
    with pytest.raises(NotFittedError, match="call fit first"):
        SoftmaxRegression().predict_proba(X)
    clf = SoftmaxRegression().fit(X + np.arange(4)[:, None], [0, 1, 0, 1])
    with pytest.raises(InvalidParameterError, match="2 features.*Got 3"):
        clf.predict(np.zeros((2, 3)))
    with pytest.raises(InvalidParameterError, match="'parameter' parameter of SoftmaxRegression.set_params must be "
                                                    "one of 'C', 'max_iter', 'tol', 'warm_start'. Got 'c'"):
        clf.set_params(c=2.0)


def test_warm_start_reaches_the_same_minimum_in_fewer_iterations():
    rng = np.random.default_rng(5)
    n, d, k = 600, 6, 3
    y = rng.integers(0, k, n)
    X = rng.normal(size=(n, d)) + 2.0 * rng.normal(size=(k, d))[y]
    first = y[:400] != 2  # the first fit has not seen class 2
    cold = SoftmaxRegression(C=5.0, tol=1e-8, max_iter=500).fit(X, y)
    warm = SoftmaxRegression(C=5.0, tol=1e-8, max_iter=500, warm_start=True)
    warm.fit(X[:400][first], y[:400][first])
    assert warm.classes_.tolist() == [0, 1]
    warm.fit(X, y)
    np.testing.assert_array_equal(warm.classes_, [0, 1, 2])
    np.testing.assert_allclose(warm.coef_, cold.coef_, atol=1e-5)
    np.testing.assert_allclose(warm.predict_proba(X), cold.predict_proba(X), atol=1e-5)
    again = warm.n_iter_
    warm.fit(X, y)  # already at the minimum
    assert warm.n_iter_ < again and warm.n_iter_ <= 2
    assert "warm_start=True" in repr(warm)


# ------------------------------------------------------------------ bad input (issue #13)
@pytest.mark.parametrize(("y", "match"), [
    (np.array([0.0, 1.0] * 4 + [np.nan, 1.0]), "a label for every example. Got .*nan.* at index 8"),
    (np.array([0, 1] * 4 + [None, 1], dtype=object), "a label for every example. Got None at index 8"),
])
def test_missing_labels_are_refused_not_learned_as_a_class(y, match):
    X = np.random.default_rng(0).normal(size=(10, 3))
    with pytest.raises(InvalidParameterError, match=match):
        SoftmaxRegression().fit(X, y)


def test_predict_before_fit_is_not_fitted():
    with pytest.raises(NotFittedError, match="call fit first"):
        SoftmaxRegression().predict(np.zeros((2, 3)))
