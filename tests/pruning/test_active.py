"""Tests of the pool-based active learner."""

from __future__ import annotations

import doctest
import json

import numpy as np
import pytest
import torch

import leanscale.pruning.active as active_module
from leanscale.core.errors import InvalidParameterError, NotFittedError
from leanscale.models.linear import SoftmaxRegression
from leanscale.pruning.active import STRATEGIES, ActiveLearner


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_doctests():
    result = doctest.testmod(active_module)
    assert result.attempted > 0 and result.failed == 0


def _line_problem(seed: int, n: int = 1000):
    """Uniform points in [-1, 1]^2, labelled by a slanted line (noise-free, narrow margin)."""
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1, 1, size=(n, 2))
    y = (X[:, 0] + 0.3 * X[:, 1] > 0.2).astype(np.int64)
    return X, y


def _fixed_boundary(X_labeled, y_labeled):
    """A train_fn whose model ignores the labels: p(class 1) = sigmoid(4 x_0), boundary x_0 = 0."""

    def predict_proba(X):
        p1 = 1.0 / (1.0 + np.exp(-4.0 * np.asarray(X)[:, 0]))
        return np.stack([1.0 - p1, p1], axis=1)

    return predict_proba


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_queries_never_repeat_or_include_labelled_examples(strategy):
    X, y = _line_problem(0, n=300)
    learner = ActiveLearner(SoftmaxRegression(C=10.0), strategy=strategy, batch_size=7, initial_size=11,
                            diversity_pool=3)
    learner.run(X, y, budget=60)
    idx = learner.labeled_indices_
    assert idx.dtype == np.int64 and idx.size == 60 and np.unique(idx).size == 60
    np.testing.assert_array_equal(learner.labels_, y[idx])
    assert [h["n_labels"] for h in learner.history_] == [11, 18, 25, 32, 39, 46, 53, 60]
    nxt = learner.query(X)
    assert nxt.size == 7 and np.unique(nxt).size == 7
    assert not np.isin(nxt, idx).any()
    np.testing.assert_array_equal(learner.query(X), nxt)  # deterministic, nothing marked labelled


def test_margin_picks_the_examples_closest_to_the_decision_boundary():
    X, _ = _line_problem(1, n=400)
    learner = ActiveLearner(_fixed_boundary, strategy="margin", batch_size=10, initial_size=5)
    learner.teach([0, 1, 2, 3], [0, 1, 0, 1])
    picked = learner.query(X)
    candidates = np.setdiff1d(np.arange(400), [0, 1, 2, 3])
    closest = candidates[np.argsort(np.abs(X[candidates, 0]))[:10]]
    np.testing.assert_array_equal(picked, closest)  # most uncertain first
    # entropy and least confidence rank a binary problem the same way
    for strategy in ("entropy", "least_confidence"):
        other = ActiveLearner(_fixed_boundary, strategy=strategy, batch_size=10).teach([0, 1, 2, 3], [0, 1, 0, 1])
        np.testing.assert_array_equal(other.query(X), closest)


def test_margin_with_softmax_regression_queries_at_its_own_boundary():
    X, y = _line_problem(2, n=500)
    model = SoftmaxRegression(C=10.0)
    learner = ActiveLearner(model, batch_size=5, initial_size=40, seed=3)
    learner.teach(learner.query(X), y[learner.query(X)])
    picked = learner.query(X)
    # the model was refitted on the 40 labels; its smallest |logit difference| are the picks
    logits = model.decision_function(X)
    gap = np.abs(logits[:, 1] - logits[:, 0])
    gap[learner.labeled_indices_] = np.inf
    np.testing.assert_array_equal(np.sort(picked), np.sort(np.argsort(gap)[:5]))


def _blobs(seed: int, n_blobs: int = 5, per_blob: int = 20):
    rng = np.random.default_rng(seed)
    centres = 10.0 * np.stack([np.cos(np.arange(n_blobs)), np.sin(np.arange(n_blobs))], axis=1)
    blob = np.repeat(np.arange(n_blobs), per_blob)
    X = centres[blob] + 0.3 * rng.normal(size=(blob.size, 2))
    perm = rng.permutation(blob.size)
    return X[perm], blob[perm], centres


def test_diversity_picks_one_example_per_cluster():
    X, blob, centres = _blobs(4)

    def near_blob0_uncertain(X_labeled, y_labeled):
        """Uncertainty decreases with the distance to blob 0: pure margin picks all from blob 0."""

        def predict_proba(Z):
            p1 = 0.5 + 0.5 * np.tanh(0.05 * np.linalg.norm(np.asarray(Z) - centres[0], axis=1))
            return np.stack([1.0 - p1, p1], axis=1)

        return predict_proba

    seen = np.flatnonzero(blob == 4)[:2]  # two labelled examples (two classes, so the model is fitted)
    margin = ActiveLearner(near_blob0_uncertain, strategy="margin", batch_size=5).teach(seen, [0, 1])
    assert set(blob[margin.query(X)]) == {0}
    diverse = ActiveLearner(near_blob0_uncertain, strategy="diversity", batch_size=5, diversity_pool=20)
    diverse.teach(seen, [0, 1])
    picked = diverse.query(X)
    assert picked.size == 5 and np.unique(picked).size == 5 and not np.isin(picked, seen).any()
    assert sorted(blob[picked].tolist()) == [0, 1, 2, 3, 4]
    # each pick is the member of its blob nearest the blob's centre (the k-means centroid)
    for i in picked:
        members = np.setdiff1d(np.flatnonzero(blob == blob[i]), seen)
        centroid = X[members].mean(axis=0)
        assert i == members[np.argmin(np.linalg.norm(X[members] - centroid, axis=1))]
    np.testing.assert_array_equal(diverse.query(X), picked)  # deterministic


def _labels_to_reach(history, target, budget):
    return next((h["n_labels"] for h in history if h["accuracy"] >= target), budget + 10)


def test_margin_needs_fewer_labels_than_random_on_a_narrow_margin_problem():
    # Noise-free linear boundary: random sampling locates it to ~1/n, margin sampling bisects it.
    # Over 4 seeds margin needed 3-5x fewer labels than random to reach 99.5% accuracy (measured
    # on 20 seeds); the test asks for 2x on the mean.
    budget, needed = 300, {"random": [], "margin": []}
    for seed in range(4):
        X, y = _line_problem(seed)
        X_eval, y_eval = _line_problem(100 + seed)
        for strategy, counts in needed.items():
            learner = ActiveLearner(SoftmaxRegression(C=1e3), strategy=strategy, batch_size=10,
                                    initial_size=10, seed=seed)
            learner.run(X, y, budget=budget, X_eval=X_eval, y_eval=y_eval)
            counts.append(_labels_to_reach(learner.history_, 0.995, budget))
    assert 2 * np.mean(needed["margin"]) <= np.mean(needed["random"]), needed


def test_train_fn_with_a_torch_network_and_a_class_absent_at_first():
    rng = np.random.default_rng(5)
    centres = np.array([[0.0, 4.0], [4.0, 0.0], [-4.0, -4.0]])
    y = rng.integers(0, 3, 600)
    X = torch.tensor(centres[y] + rng.normal(size=(600, 2)), dtype=torch.float32)
    calls = []

    def train_fn(X_labeled, y_labeled):
        """A fixed 3-output softmax layer trained by full-batch gradient descent."""
        assert isinstance(X_labeled, torch.Tensor)
        calls.append(np.unique(y_labeled).tolist())
        torch.manual_seed(0)
        net = torch.nn.Linear(2, 3)
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        target = torch.as_tensor(y_labeled)
        for _ in range(100):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(X_labeled), target).backward()
            opt.step()
        return lambda Z: torch.softmax(net(Z), dim=1).detach()

    first = np.concatenate([np.flatnonzero(y == 0)[:5], np.flatnonzero(y == 1)[:5]])  # no class 2
    learner = ActiveLearner(train_fn, batch_size=20, seed=1).teach(first, y[first])
    learner.run(X, lambda idx: y[idx], budget=70, X_eval=X, y_eval=y)
    assert calls[0] == [0, 1] and calls[-1] == [0, 1, 2]
    np.testing.assert_array_equal(learner.classes_, [0, 1, 2])  # columns = the network's outputs
    assert learner.history_[0]["n_classes_seen"] == 2
    assert learner.history_[-1]["accuracy"] > 0.95
    np.testing.assert_array_equal(learner.predict(X), learner.classes_[np.argmax(
        learner._fitted[1](X).numpy(), axis=1)])


def test_unseen_class_counts_as_an_error_in_accuracy():
    X = np.array([[0.0], [0.1], [1.0], [1.1], [5.0], [5.1]])
    y = np.array([10, 10, 20, 20, 30, 30])
    learner = ActiveLearner(SoftmaxRegression(C=100.0), strategy="margin", initial_size=4, batch_size=2)
    learner.teach([0, 1, 2, 3], y[:4])
    learner.run(X, y, budget=4, X_eval=X, y_eval=y)  # budget already spent: one fit, no query
    np.testing.assert_array_equal(learner.classes_, [10, 20])
    assert learner.history_ == [{"round": 0, "n_labels": 4, "n_classes_seen": 2, "accuracy": 4 / 6}]


def test_one_class_labelled_falls_back_to_random_and_predicts_that_class():
    X, _ = _line_problem(6, n=50)
    y = np.zeros(50, dtype=np.int64)
    learner = ActiveLearner(SoftmaxRegression(), strategy="margin", batch_size=5, initial_size=5)
    learner.run(X, y, budget=15, X_eval=X[:10], y_eval=np.r_[np.zeros(7), np.ones(3)].astype(int))
    assert [h["accuracy"] for h in learner.history_] == [0.7, 0.7, 0.7]
    assert np.unique(learner.labeled_indices_).size == 15


def test_budget_larger_than_the_pool_stops_at_the_pool_size():
    X, y = _line_problem(7, n=37)
    learner = ActiveLearner(SoftmaxRegression(), strategy="diversity", batch_size=10, initial_size=8)
    learner.run(X, y, budget=1000)
    assert np.array_equal(np.sort(learner.labeled_indices_), np.arange(37))
    assert [h["n_labels"] for h in learner.history_] == [8, 18, 28, 37]
    assert learner.query(X).size == 0


@pytest.mark.parametrize("strategy", ["random", "diversity"])
def test_resume_from_state_dict_continues_identically(strategy):
    X, y = _line_problem(8, n=400)
    X_eval, y_eval = _line_problem(108, n=200)

    def make():
        return ActiveLearner(SoftmaxRegression(C=50.0), strategy=strategy, batch_size=6, initial_size=10,
                             seed=2, diversity_pool=4)

    full = make().run(X, y, budget=46, X_eval=X_eval, y_eval=y_eval)

    saved = {}

    class Interrupted(Exception):
        pass

    def save_then_stop(learner):
        saved["state"] = json.loads(json.dumps(learner.state_dict()))  # through JSON, as on disk
        if learner.history_[-1]["n_labels"] == 22:
            raise Interrupted

    with pytest.raises(Interrupted):
        make().run(X, y, budget=46, X_eval=X_eval, y_eval=y_eval, on_round=save_then_stop)
    resumed = make().load_state_dict(saved["state"])
    assert resumed.labeled_indices_.size == 22
    resumed.run(X, y, budget=46, X_eval=X_eval, y_eval=y_eval)
    np.testing.assert_array_equal(resumed.labeled_indices_, full.labeled_indices_)
    np.testing.assert_array_equal(resumed.labels_, full.labels_)
    assert resumed.history_ == full.history_


def test_bad_inputs():
    X, y = _line_problem(9, n=50)
    with pytest.raises(InvalidParameterError, match="'strategy'.*Got 'margn'.*Did you mean 'margin'"):
        ActiveLearner(SoftmaxRegression(), strategy="margn").query(X)
    with pytest.raises(InvalidParameterError, match="'batch_size' parameter of ActiveLearner.*Got 0"):
        ActiveLearner(SoftmaxRegression(), batch_size=0).run(X, y, budget=10)
    with pytest.raises(InvalidParameterError, match="'initial_size'"):
        ActiveLearner(SoftmaxRegression(), initial_size=-1).query(X)
    with pytest.raises(InvalidParameterError, match="'oracle'.*one label per pool example \\(50\\). Got 49"):
        ActiveLearner(SoftmaxRegression()).run(X, y[:49], budget=10)
    with pytest.raises(InvalidParameterError, match="'oracle'.*returned 1 labels for 10 indices"):
        ActiveLearner(SoftmaxRegression(), initial_size=10).run(X, lambda idx: y[idx][:1], budget=10)
    with pytest.raises(InvalidParameterError, match="'budget'"):
        ActiveLearner(SoftmaxRegression()).run(X, y, budget=0)
    with pytest.raises(InvalidParameterError, match="'X_eval' and 'y_eval'.*together"):
        ActiveLearner(SoftmaxRegression()).run(X, y, budget=10, X_eval=X)
    with pytest.raises(InvalidParameterError, match="'X_eval', 'y_eval'.*same length"):
        ActiveLearner(SoftmaxRegression()).run(X, y, budget=10, X_eval=X, y_eval=y[:3])
    with pytest.raises(InvalidParameterError, match="instance, not the class SoftmaxRegression"):
        ActiveLearner(SoftmaxRegression).query(X)
    with pytest.raises(InvalidParameterError, match="'model'.*fit\\(X, y\\).*Got int"):
        ActiveLearner(3).query(X)
    with pytest.raises(InvalidParameterError, match="must return a predict_proba callable"):
        ActiveLearner(lambda a, b: 0.5, initial_size=4).teach([0, 1], [0, 1]).query(X)
    learner = ActiveLearner(SoftmaxRegression()).teach([3, 4], [0, 1])
    with pytest.raises(InvalidParameterError, match="must not contain labelled examples.*e.g. 4"):
        learner.teach([4, 5], [1, 0])
    with pytest.raises(InvalidParameterError, match="must not repeat an index. Got 7"):
        learner.teach([7, 7], [1, 1])
    with pytest.raises(InvalidParameterError, match="'indices', 'y'.*same length"):
        learner.teach([7, 8], [1])
    with pytest.raises(InvalidParameterError, match="integer pool positions"):
        learner.teach([7.5], [1])
    learner.query(X)  # the pool size is now known
    with pytest.raises(InvalidParameterError, match=r"positions in the pool \[0, 50\). Got 50"):
        learner.teach([50], [1])
    with pytest.raises(InvalidParameterError, match="must be the pool the labels refer to, with 50"):
        learner.query(X[:40])
    with pytest.raises(InvalidParameterError, match="'n' parameter of ActiveLearner.query"):
        learner.query(X, n=0)
    with pytest.raises(InvalidParameterError, match="'state'.*keys"):
        learner.load_state_dict({"history": []})
    with pytest.raises(NotFittedError, match="call run or query first"):
        ActiveLearner(SoftmaxRegression()).predict(X)
    with pytest.raises(InvalidParameterError, match="numeric for strategy='diversity'"):
        words = [f"w{i}" for i in range(30)]
        ActiveLearner(lambda a, b: (lambda Z: np.full((len(Z), 2), 0.5)), strategy="diversity",
                      batch_size=2).teach([0, 1], [0, 1]).query(words)
