"""The cascade's answer scorer: the safe arithmetic checker (closed-form cases), the math-answer
features, the fast per-request scoring against scikit-learn's sparse path, and the saved format
(round trip, the first format still loading, a newer one refused)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from leanscale.cascade.gateway.scorer import (
    ALL_FEATURES,
    DENSE_FEATURES,
    DENSE_FEATURES_V1,
    SCORER_VERSION,
    AnswerScorer,
    _sigmoid,
    answer_features,
    check_arithmetic,
    evaluate_arithmetic,
    final_answer,
)
from leanscale.core.errors import DataFormatError, InvalidParameterError
from leanscale.core.persistence import load_state, save_state


@pytest.mark.parametrize("text, value", [
    ("2 + 3 * 4", 14.0), ("(2 + 3) * 4", 20.0), ("10 - 4 - 3", 3.0), ("24 / 4 / 2", 3.0), ("-3 + 5", 2.0),
    ("2 * -3", -6.0), ("1,200 / 4", 300.0), ("$2.50 * 4", 10.0), ("9 x 2", 18.0), ("9 × 2", 18.0),
    ("10 ÷ 4", 2.5), ("50% * 80", 40.0), ("((1 + 2) * (3 + 4))", 21.0), (".5 * 4", 2.0), ("7", 7.0),
])
def test_evaluate_arithmetic_closed_form(text, value):
    assert evaluate_arithmetic(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["1 / 0", "2 +", "(2 + 3", "2 3", "import os", "__import__('os').system('x')",
                                  "2 ** 3", "x + 1", "", "1" + "+1" * 300])
def test_evaluate_arithmetic_refuses_what_is_not_arithmetic(text):
    assert evaluate_arithmetic(text) is None


def test_percent_is_tried_both_ways():
    assert evaluate_arithmetic("150% * 80,000") == pytest.approx(120_000)
    assert evaluate_arithmetic("150% * 80,000", percent=False) == pytest.approx(12_000_000)


@pytest.mark.parametrize("answer, expected", [
    ("She has 16 - 3 = 13 eggs. Then 13 - 4 = 9 are left.", (2, 0, 9.0)),
    ("425/5+17=91+17=108", (2, 1, 108.0)),  # 425/5 + 17 = 102, not 91 + 17; 91 + 17 = 108 is right
    ("So 85 + 17 = 101 letters.", (1, 1, 101.0)),
    ("She sells 9 * $2 = $<<9*2=18>>18.", (2, 0, 18.0)),  # the sentence and the annotation
    ("250 / 3 = 83.33 pieces", (1, 0, 83.33)),  # rounded as written: right
    ("250 / 3 = 83.3 pieces", (1, 0, 83.3)),
    ("250 / 3 = 83.5 pieces", (1, 1, 83.5)), ("2 / 3 = 0.66", (1, 0, 0.66)), ("5 / 2 = 3", (1, 0, 3.0)),
    ("The increase is 150% * 80,000 = 120,000.", (1, 0, 120000.0)),
    ("Let x = 5. Then x + 2 = 7.", (0, 0, None)),  # no side is arithmetic on numbers only
    ("No arithmetic here. #### 42", (0, 0, None)),
])
def test_check_arithmetic_closed_form(answer, expected):
    checked, wrong, last = check_arithmetic(answer)
    assert (checked, wrong) == expected[:2]
    assert last == (pytest.approx(expected[2]) if expected[2] is not None else None)


def test_final_answer_and_features():
    assert final_answer("so 3 + 4 = 7\n#### 1,234") == 1234.0
    assert final_answer("The answer is 12 apples, then 15.") == 15.0
    assert final_answer("no number") is None
    prompt = "Tom has 3 apples and buys 4 more. How many apples?"
    f = dict(zip(ALL_FEATURES, answer_features(prompt, "Tom has 3 + 4 = <<3+4=7>>7 apples.\n#### 7")))
    assert len(ALL_FEATURES) == len(answer_features("", "")) and DENSE_FEATURES == ALL_FEATURES
    assert f["gsm8k_final"] == 1 and f["final_integer"] == 1 and f["final_is_last_result"] == 1
    assert f["log_equations"] == pytest.approx(math.log1p(2)) and f["any_wrong_equation"] == 0
    assert f["prompt_numbers_used"] == 1.0 and f["final_in_prompt"] == 0 and f["final_negative"] == 0
    assert f["log_abs_final"] == pytest.approx(math.log1p(7)) and f["ends_cleanly"] == 1
    g = dict(zip(ALL_FEATURES, answer_features(prompt, "However, maybe 3 + 4 = 8, approximately 8.5")))
    assert g["any_wrong_equation"] == 1 and g["share_wrong_equations"] == 1.0 and g["final_integer"] == 0
    assert g["log_hedges"] == pytest.approx(math.log1p(3)) and g["final_differs_from_last_result"] == 1
    assert g["prompt_numbers_used"] == 1.0 and g["ends_cleanly"] == 0 and g["gsm8k_final"] == 0
    # the first format's features, closed form
    a = "x\n3 and 4\n#### 7"
    v1 = answer_features("one two three", a)[:7]
    wa, wp = math.log1p(6), math.log1p(3)
    assert v1 == pytest.approx([wa, wp, wa - wp, math.log1p(3), 1.0, 1.0, 0.0])
    assert ALL_FEATURES[:7] == DENSE_FEATURES_V1


def _data(n=120, seed=0):
    """Synthetic math answers: correct ones compute right and end with ####; wrong ones miscompute."""
    rng = np.random.default_rng(seed)
    prompts, answers, ok = [], [], []
    for i in range(n):
        a, b = int(rng.integers(2, 50)), int(rng.integers(2, 50))
        good = bool(rng.random() < 0.6)
        c = a * b if good else a * b + int(rng.integers(1, 9))
        prompts.append(f"A box holds {a} rows of {b} {['pens', 'cups', 'eggs'][i % 3]}. How many?")
        answers.append(f"It holds {a} * {b} = <<{a}*{b}={c}>>{c} items.\n#### {c}")
        ok.append(good)
    return prompts, answers, np.array(ok)


def test_fast_scoring_equals_the_sparse_path_and_learns_the_arithmetic():
    p, a, y = _data()
    scorer = AnswerScorer().fit(p[:90], a[:90], y[:90])
    fast = scorer.predict_proba(p[90:], a[90:])
    ref = _sigmoid(np.asarray(scorer._features(p[90:], a[90:]) @ scorer.coef_).ravel() + scorer.intercept_)
    np.testing.assert_allclose(fast, ref, rtol=0, atol=1e-12)
    assert fast[y[90:]].min() > fast[~y[90:]].max()  # the wrong-arithmetic answers are the least trusted
    assert scorer.predict_proba([], []).shape == (0,)


def test_saved_format_round_trip_and_versions(tmp_path):
    p, a, y = _data()
    scorer = AnswerScorer(C=0.5).fit(p, a, y)
    scorer.save(tmp_path / "v2")
    meta, arrays = load_state(tmp_path / "v2")
    assert meta["scorer_version"] == SCORER_VERSION == 2 and meta["dense_features"] == list(ALL_FEATURES)
    assert not list(tmp_path.glob("**/*.pkl"))
    again = AnswerScorer.load(tmp_path / "v2")
    np.testing.assert_array_equal(again.predict_proba(p, a), scorer.predict_proba(p, a))
    assert again.C == 0.5 and again.dense_features_ == ALL_FEATURES

    # a scorer of the first format (no scorer_version, the 7 first features) still loads, same numbers
    old = AnswerScorer(dense_features=DENSE_FEATURES_V1).fit(p, a, y)
    meta1, arrays1 = old.get_state()
    del meta1["scorer_version"]
    save_state(tmp_path / "v1", meta1, arrays1)
    back = AnswerScorer.load(tmp_path / "v1")
    np.testing.assert_array_equal(back.predict_proba(p, a), old.predict_proba(p, a))
    assert back.dense_features_ == DENSE_FEATURES_V1

    # a newer format, or a version-1 file with other features, is refused naming the folder and why
    save_state(tmp_path / "v9", {**meta, "scorer_version": 9}, arrays)
    with pytest.raises(DataFormatError, match=r"v9.*scorer_version 9.*versions 1 to 2.*upgrade leanscale"):
        AnswerScorer.load(tmp_path / "v9")
    save_state(tmp_path / "bad1", {**meta1, "dense_features": list(ALL_FEATURES)}, arrays1)
    with pytest.raises(DataFormatError, match="scorer_version 1"):
        AnswerScorer.load(tmp_path / "bad1")
    save_state(tmp_path / "unknown", {**meta, "dense_features": ["log_lines", "no_such_feature"]}, arrays)
    with pytest.raises(DataFormatError, match="no_such_feature"):
        AnswerScorer.load(tmp_path / "unknown")


def test_bad_parameters_are_named():
    p, a, y = _data(20)
    with pytest.raises(InvalidParameterError, match="'dense_features'.*nope"):
        AnswerScorer(dense_features=["nope"]).fit(p, a, y)
    with pytest.raises(InvalidParameterError, match="'dense_features'"):
        AnswerScorer(dense_features="log_lines").fit(p, a, y)
    with pytest.raises(InvalidParameterError, match="not fitted"):
        AnswerScorer().predict_proba(["q"], ["a"])
