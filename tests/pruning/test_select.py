"""select / resolve_strategy: which end is kept, class balance, Sorscher's auto rule, ties, errors."""

import doctest
import importlib

import numpy as np
import pytest
import torch

from leanscale.core.errors import InvalidParameterError
from leanscale.data._sampling import proportional_quotas
from leanscale.pruning.select import AUTO_MIN_PER_CLASS, resolve_strategy, select

# The package re-exports the function select, which shadows the module's attribute name.
select_mod = importlib.import_module("leanscale.pruning.select")


def test_doctests():
    assert doctest.testmod(select_mod, raise_on_error=False).failed == 0


def test_hard_keeps_the_highest_and_easy_the_lowest():
    rng = np.random.default_rng(0)
    scores = rng.permutation(100).astype(float)  # distinct scores
    hard = select(scores, 10, "hard")
    easy = select(scores, 10, "easy")
    np.testing.assert_array_equal(hard, np.sort(np.flatnonzero(scores >= 90)))
    np.testing.assert_array_equal(easy, np.sort(np.flatnonzero(scores < 10)))
    assert hard.dtype == np.int64 and np.all(np.diff(hard) > 0)
    # inf (e.g. never-learned forgetting scores) is the hardest
    scores[7] = np.inf
    assert 7 in select(scores, 1, "hard") and 7 not in select(scores, 99, "easy")


def test_random_ignores_scores_and_is_seeded():
    a = select(np.arange(50.0), 20, "random", seed=3)
    b = select(np.random.default_rng(1).normal(size=50), 20, "random", seed=3)
    c = select(np.arange(50.0), 20, "random", seed=4)
    np.testing.assert_array_equal(a, b)
    assert len(a) == 20 and len(np.unique(a)) == 20
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, select(np.arange(50.0), 20, "hard"))


@pytest.mark.parametrize("keep, n, expected", [
    (0.5, 7, 4),  # 3.5 rounds half up
    (0.7, 10, 7),  # 7.000000000000001
    (0.3, 10, 3),  # 3.0000000000000004
    (1.0, 9, 9),
    (1e-6, 9, 1),  # a fraction keeps at least one example
    (9, 9, 9),
    (1, 9, 1),
    (np.int64(4), 9, 4),
])
def test_keep_fraction_or_count(keep, n, expected):
    assert len(select(np.arange(float(n)), keep)) == expected


def test_class_balance_gives_exact_per_class_counts():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    scores = np.where(labels == 0, 10.0, 0.0) + np.random.default_rng(0).random(100)  # class 0 hardest
    kept = select(scores, 0.5, "hard", labels=labels)
    assert np.bincount(labels[kept], minlength=3).tolist() == [25, 15, 10]
    # within each class, the hardest of that class
    for c, q in zip(range(3), (25, 15, 10)):
        members = np.flatnonzero(labels == c)
        top = members[np.argsort(-scores[members])[:q]]
        np.testing.assert_array_equal(np.sort(kept[labels[kept] == c]), np.sort(top))
    # unbalanced: the hard end is all class 0
    unbalanced = select(scores, 0.5, "hard", labels=labels, class_balance=False)
    assert np.bincount(labels[unbalanced], minlength=3).tolist() == [50, 0, 0]
    # awkward counts follow proportional_quotas exactly (they sum to keep)
    for keep in (7, 13, 0.33, 99):
        kept = select(scores, keep, "easy", labels=labels)
        n_keep = len(kept)
        expected = proportional_quotas(np.array([50, 30, 20]), n_keep)
        assert np.bincount(labels[kept], minlength=3).tolist() == expected.tolist()
    # random is balanced too
    assert np.bincount(labels[select(scores, 10, "random", labels=labels)], minlength=3).tolist() == [5, 3, 2]


def test_class_balance_without_labels_is_no_balancing():
    scores = np.arange(20.0)
    np.testing.assert_array_equal(select(scores, 5, class_balance=True), np.arange(15, 20))


def test_labels_of_any_kind():
    scores = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    a = select(scores, 2, labels=np.array(["b", "b", "b", "a", "a", "a"]))
    b = select(torch.tensor(scores), 2, labels=torch.tensor([1, 1, 1, 0, 0, 0]))
    np.testing.assert_array_equal(a, [2, 5])
    np.testing.assert_array_equal(a, b)


def test_auto_switches_at_the_threshold():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 100)
    scores = rng.random(1000)
    # 99 kept over 10 classes = 9.9 per class < 10: easy; 100 kept = 10 per class: hard
    below = select(scores, 99, "auto", labels=labels, auto_min_per_class=10)
    at = select(scores, 100, "auto", labels=labels, auto_min_per_class=10)
    np.testing.assert_array_equal(below, select(scores, 99, "easy", labels=labels))
    np.testing.assert_array_equal(at, select(scores, 100, "hard", labels=labels))
    strategy, reason = resolve_strategy("auto", 99, 10, 10)
    assert strategy == "easy"
    assert reason == ("auto: 9.9 kept examples per class (99 kept / 10 classes) is below auto_min_per_class=10: "
                      "with scarce data keep the easiest examples (Sorscher et al. 2022, Fig. 1)")
    strategy, reason = resolve_strategy("auto", 100, 10, 10)
    assert strategy == "hard" and "10 kept examples per class" in reason and "is at least" in reason
    assert "hardest" in reason
    # without labels the data is one class: 9 kept < 10 -> easy, 10 -> hard
    np.testing.assert_array_equal(select(scores, 9, "auto", auto_min_per_class=10), select(scores, 9, "easy"))
    np.testing.assert_array_equal(select(scores, 10, "auto", auto_min_per_class=10), select(scores, 10, "hard"))
    assert "(9 kept / 1 class)" in resolve_strategy("auto", 9, 1, 10)[1]


def test_auto_default_threshold():
    assert isinstance(AUTO_MIN_PER_CLASS, int) and AUTO_MIN_PER_CLASS >= 1
    assert resolve_strategy("auto", AUTO_MIN_PER_CLASS * 3 - 1, 3)[0] == "easy"
    assert resolve_strategy("auto", AUTO_MIN_PER_CLASS * 3, 3)[0] == "hard"


@pytest.mark.parametrize("strategy", ["hard", "easy", "random"])
def test_explicit_strategies_resolve_to_themselves(strategy):
    resolved, reason = resolve_strategy(strategy, 5, 2, 100)
    assert resolved == strategy and f"'{strategy}' was requested" in reason


def test_ties_are_broken_by_a_seeded_random_order():
    scores = np.zeros(100)
    scores[:5] = 1.0  # five clear winners, the rest tied
    a = select(scores, 20, "hard", seed=0)
    np.testing.assert_array_equal(a, select(scores, 20, "hard", seed=0))
    assert set(range(5)) <= set(a.tolist())
    assert not np.array_equal(a, select(scores, 20, "hard", seed=1))
    assert not np.array_equal(a, np.arange(20))  # not the first positions
    # over many seeds, every tied position is picked about equally often (15 of 95 each time)
    hits = np.zeros(100)
    for seed in range(200):
        hits[select(scores, 20, "hard", seed=seed)] += 1
    assert np.all(hits[:5] == 200)
    assert hits[5:].min() > 10 and hits[5:].max() < 60  # expected 200 * 15 / 95 = 31.6


@pytest.mark.parametrize("args, kwargs, match", [
    ((np.arange(5.0), 0), {}, r"'keep'.*int in the range \[1, inf\) or a float in the range \(0, 1\]\. Got 0"),
    ((np.arange(5.0), 0.0), {}, r"'keep'.*Got 0\.0"),
    ((np.arange(5.0), 1.5), {}, r"'keep'.*Got 1\.5"),
    ((np.arange(5.0), -1), {}, r"'keep'.*Got -1"),
    ((np.arange(5.0), True), {}, r"'keep'.*Got True"),
    ((np.arange(5.0), 6), {}, r"'keep'.*at most the number of examples \(5\).*Got 6"),
    ((np.arange(5.0), "half"), {}, r"'keep'.*Got 'half'"),
    ((np.array([0.1, np.nan, 0.3]), 1), {}, r"'scores'.*NaN at index 1"),
    ((np.zeros((3, 2)), 1), {}, r"'scores'.*1-d array"),
    ((np.zeros(0), 1.0), {}, r"'scores'.*at least 1"),
    ((np.arange(5.0), 2), {"labels": [0, 1]}, r"'scores', 'labels'.*scores=5, labels=2"),
    ((np.arange(4.0), 2), {"labels": np.zeros((4, 1))}, r"'labels'.*1-d"),
    ((np.arange(5.0), 2, "hrad"), {}, r"'strategy'.*'auto', 'easy', 'hard', 'random'.*Did you mean 'hard'"),
    ((np.arange(5.0), 2), {"class_balance": 1}, r"'class_balance'.*Got 1"),
    ((np.arange(5.0), 2), {"seed": -1}, r"'seed'.*Got -1"),
    ((np.arange(5.0), 2), {"auto_min_per_class": 0}, r"'auto_min_per_class'.*Got 0"),
])
def test_bad_input(args, kwargs, match):
    with pytest.raises(InvalidParameterError, match=match):
        select(*args, **kwargs)


def test_resolve_strategy_bad_input():
    with pytest.raises(InvalidParameterError, match=r"'strategy' parameter of resolve_strategy.*Did you mean 'easy'"):
        resolve_strategy("eazy", 5, 1, 10)
    with pytest.raises(InvalidParameterError, match=r"'n_classes'.*Got 0"):
        resolve_strategy("auto", 5, 0, 10)
    with pytest.raises(InvalidParameterError, match=r"'n_keep'.*Got 0"):
        resolve_strategy("auto", 0, 2, 10)


def test_auto_default_threshold_sits_at_the_measured_crossover():
    """The default comes from the committed Fashion-MNIST benchmark: at every kept fraction, the
    strategy auto picks must be the one (easy or hard) that won there for most label-free and
    label-using metrics (EL2N, GraNd, self-supervised prototypes)."""
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks/results/pruning/fraction_kept_fashion-mnist-mlp.json"
    result = json.loads(path.read_text())
    acc = {(r["metric"], r["strategy"], r["fraction"]): r["test_accuracy_mean"] for r in result["summary"]}
    n_train, n_classes = result["n_train"], 10
    for fraction in (0.9, 0.7, 0.5, 0.3, 0.2, 0.1):
        wins = [acc[(m, "hard", fraction)] > acc[(m, "easy", fraction)] for m in ("el2n", "grand", "ssl_prototypes")]
        measured = "hard" if sum(wins) >= 2 else "easy"
        n_keep = round(fraction * n_train)
        assert resolve_strategy("auto", n_keep, n_classes)[0] == measured, fraction
