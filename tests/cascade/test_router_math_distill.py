"""Router: the "math" feature block (maths word-problem counts) and distillation from privileged
text (``distill``, ``privileged_texts``), against hand counts, a brute-force soft-label fit and
the out-of-fold rule."""

import json
import math

import numpy as np
import pytest

from leanscale.cascade.router import Router, _fit_soft_logistic, math_question_stats
from leanscale.core.errors import InvalidParameterError

COSTS = {"weak": 1.0, "strong": 20.0}


def test_math_question_stats_match_hand_counts():
    t = ("Tom buys 3 apples at $1.50 each and 12 pears. If he pays 20% tax, how much does he pay in total? "
         "Then he gives half to Ann.")
    row = np.expm1(math_question_stats([t])[0])
    # numbers 3, 1.50, 12, 20 (4, all distinct); largest 20; 1.50 is not an integer
    assert row[:4] == pytest.approx([4, 4, math.log10(21), 1])
    # 3 sentences of "Tom ... pears." (10 words), "If ... total?" (12), "Then ... Ann." (6)
    assert row[4] == pytest.approx(3) and row[5] == pytest.approx((10 + 12 + 6) / 3)
    words = set("tom buys apples at each and pears if he pays tax how much does pay in total then gives half to ann".split())
    assert row[6] == pytest.approx(len(words)) == 22
    cues = dict(zip(["percent", "fraction", "rate", "time_unit", "money", "comparison", "total", "remaining",
                     "how_many", "how_much", "average", "measure_unit", "decimal", "number_word", "if", "sequence",
                     "commerce"], row[7:]))
    assert cues == {"percent": 1, "fraction": 1, "rate": 1, "time_unit": 0, "money": 1, "comparison": 0, "total": 1,
                    "remaining": 0, "how_many": 0, "how_much": 1, "average": 0, "measure_unit": 0, "decimal": 1,
                    "number_word": 0, "if": 1, "sequence": 1, "commerce": 1}
    empty = np.expm1(math_question_stats(["", "version 1.2.3 of it", "9" * 400 + ".5 apples"]))
    assert (empty[0] == 0).all()
    assert empty[1, 0] == 1 and empty[1, 2] == 0  # "1.2.3" is one number, not a quantity
    assert np.isfinite(empty[2]).all() and empty[2, 2] == pytest.approx(300)  # capped at 1e300


def word_problems(n, seed):
    """Weak fails on questions with a percentage or many numbers; strong is always right."""
    rng = np.random.default_rng(seed)
    texts, weak = [], []
    for _ in range(n):
        k = rng.integers(2, 8)
        pct = rng.random() < 0.3
        nums = " and ".join(str(x) for x in rng.integers(1, 99, size=k))
        texts.append(f"Sam has {nums} coins" + (" and loses 15% of them" if pct else "") + ". How many are left?")
        weak.append(not pct and k < 5)
    return texts, np.array(weak)


def test_math_block_is_standardised_saved_and_routes_the_hard_problems_first():
    texts, weak = word_problems(200, seed=0)
    r = Router(features="stats+math").fit(texts, {"weak": weak, "strong": np.ones(200, dtype=bool)}, COSTS)
    X = r.transform(texts)
    assert X.shape == (200, 10 + 24) and r.n_features_in_ == 34
    M = X[:, 10:]
    const = M.std(axis=0) < 1e-12  # cues absent from every problem stay 0
    assert np.allclose(M.mean(axis=0), 0, atol=1e-12)
    assert np.allclose(M.std(axis=0)[~const], 1 / math.sqrt(24))
    te, te_weak = word_problems(100, seed=1)
    gain = r.predict_gain(te)
    assert gain[~te_weak].min() > gain[te_weak].max()  # every failure before every success
    meta, arrays = r.get_state()
    json.dumps(meta)
    assert {"math_mean", "math_scale"} <= set(arrays)
    clone = Router.from_state(meta, arrays)
    assert np.array_equal(clone.predict_gain(te), gain)
    del arrays["math_scale"]
    with pytest.raises(InvalidParameterError, match="missing 'math_scale'"):
        Router.from_state(meta, arrays)


def test_soft_label_logistic_matches_a_brute_force_minimisation():
    from scipy.optimize import minimize
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 3))
    p = rng.random(60)
    p[:5] = 1.0  # weight-0 duplicate rows are dropped: same objective
    C = 0.7

    def objective(wb):  # scikit-learn's: C * soft cross-entropy + |w|^2 / 2 (intercept not penalised)
        z = X @ wb[:3] + wb[3]
        return C * np.sum(p * np.logaddexp(0, -z) + (1 - p) * np.logaddexp(0, z)) + 0.5 * wb[:3] @ wb[:3]

    ref = minimize(objective, np.zeros(4), method="BFGS", options={"gtol": 1e-10}).x
    lr, ok = _fit_soft_logistic(LogisticRegression, X, p, C=C, solver="lbfgs", max_iter=1000, tol=1e-10)
    assert ok
    assert np.allclose(np.r_[lr.coef_[0], lr.intercept_[0]], ref, atol=1e-5)


def distill_task(n, seed):
    texts, weak = word_problems(n, seed)
    rng = np.random.default_rng(seed + 50)
    answers = [("long careful answer " * 3 if not w else "short answer") + f" {rng.integers(9)}" for w in weak]
    return texts, weak, answers


def test_distill_soft_labels_are_out_of_fold_and_mix_linearly():
    texts, weak, answers = distill_task(100, seed=2)
    strong = np.ones(100, dtype=bool)
    strong[::7] = False
    outs = {"weak": weak, "strong": strong}
    r1 = Router(distill=1.0, seed=3)
    soft1 = r1._teacher_labels(texts, outs, ["weak", "strong"], answers)
    # a request's outcome never reaches its own soft label (distill=1: the teacher's out-of-fold probability)
    i = 4
    flipped = dict(outs, weak=weak.copy())
    flipped["weak"][i] = ~flipped["weak"][i]
    soft_f = r1._teacher_labels(texts, flipped, ["weak", "strong"], answers)
    assert soft_f["weak"][i] == soft1["weak"][i]
    assert not np.allclose(soft_f["weak"], soft1["weak"])  # it does move the other folds' teachers
    # distill = lam: lam * teacher + (1 - lam) * outcome, the same teacher
    soft = Router(distill=0.25, seed=3)._teacher_labels(texts, outs, ["weak", "strong"], answers)
    for name in outs:
        assert np.allclose(soft[name], 0.25 * soft1[name] + 0.75 * outs[name])
        assert ((soft1[name] > 0) & (soft1[name] < 1)).all()
    # the teacher reads the answers: the weak model's failures get the lower soft labels
    assert soft1["weak"][~weak].max() < soft1["weak"][weak].min()
    r = Router(features="stats+math", distill=0.5, seed=3).fit(texts, outs, COSTS, privileged_texts=answers)
    te, te_weak = word_problems(80, seed=5)
    gain = r.predict_gain(te)  # routing reads the request alone
    assert (gain[~te_weak][:, None] > gain[te_weak][None, :]).mean() > 0.9  # AUC of the weak failures
    clone = Router.from_state(*r.get_state())
    assert clone.distill == 0.5 and np.array_equal(clone.predict_gain(te), gain)


def test_distill_zero_is_the_plain_fit():
    texts, weak, _ = distill_task(80, seed=4)
    outs = {"weak": weak, "strong": np.ones(80, dtype=bool)}
    a = Router(features="math").fit(texts, outs, COSTS)
    b = Router(features="math", distill=0.0).fit(texts, outs, COSTS, privileged_texts=None)
    assert np.array_equal(a.coef_, b.coef_)


def test_distill_bad_inputs_name_the_parameter():
    texts, weak, answers = distill_task(40, seed=6)
    outs = {"weak": weak, "strong": np.ones(40, dtype=bool)}
    with pytest.raises(InvalidParameterError, match="'distill' parameter of Router must be .*Got 1.5"):
        Router(distill=1.5).fit(texts, outs, COSTS, privileged_texts=answers)
    with pytest.raises(InvalidParameterError, match="'privileged_texts' parameter of Router.fit is required with distill=0.5"):
        Router(distill=0.5).fit(texts, outs, COSTS)
    with pytest.raises(InvalidParameterError, match="'privileged_texts' parameter of Router.fit is only used with distill > 0"):
        Router().fit(texts, outs, COSTS, privileged_texts=answers)
    with pytest.raises(InvalidParameterError, match="'distill' parameter of Router applies to learner='logistic' only.*'gbt'"):
        Router(distill=0.5, learner="gbt").fit(texts, outs, COSTS, privileged_texts=answers)
    with pytest.raises(InvalidParameterError, match="'texts' and 'privileged_texts' .* texts=40, privileged_texts=39"):
        Router(distill=0.5).fit(texts, outs, COSTS, privileged_texts=answers[:-1])
