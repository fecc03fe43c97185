import json
import math
from collections import Counter

import numpy as np
import pytest
from scipy.stats import binomtest

from leanscale.cascade.rules import (
    MinedRules,
    evaluate_rules,
    mine_rules,
    precision_lower_bound,
)
from leanscale.cascade.stages import RegexStage
from leanscale.core.errors import InvalidParameterError

LABELS = ["billing", "tech", "account"]
# keyword -> (label, true precision): P(label | keyword in the request)
KEYWORDS = {
    "refund": ("billing", 1.0),
    "invoice": ("billing", 0.995),
    "crash": ("tech", 1.0),
    "password": ("account", 0.99),
    "error": ("tech", 0.90),
    "charge": ("billing", 0.80),
}
FILLER = [f"w{i}" for i in range(300)]


def _generate(n, seed):
    """Requests of filler words plus (85 % of the time) one keyword whose label precision is known."""
    rng = np.random.default_rng(seed)
    keys = list(KEYWORDS)
    texts, labels = [], []
    for _ in range(n):
        words = list(rng.choice(FILLER, size=6))
        if rng.random() < 0.85:
            kw = keys[rng.integers(len(keys))]
            lab, p = KEYWORDS[kw]
            if rng.random() >= p:
                lab = rng.choice([x for x in LABELS if x != lab])
            words.insert(int(rng.integers(len(words) + 1)), kw.upper() if rng.random() < 0.3 else kw)
        else:
            lab = LABELS[rng.integers(3)]
        texts.append(" ".join(words))
        labels.append(str(lab))
    return texts, labels


def _tokens(rules):
    return [r["token"] for r in rules.rules]


def _docs(template, n, seed=0):
    """``n`` requests ``template`` with ``{}`` replaced by random filler words shared by every label."""
    rng = np.random.default_rng(seed)
    return [template.format(*rng.choice(FILLER, size=template.count("{}"))) for _ in range(n)]


# ----------------------------------------------------------------------------------- the bound


@pytest.mark.parametrize("k,n", [(10, 10), (149, 150), (900, 1000), (1, 7), (50, 60)])
def test_lower_bound_is_the_one_sided_clopper_pearson_bound(k, n):
    # one-sided at 95 % = the lower end of the two-sided exact interval at 90 %
    expected = binomtest(k, n).proportion_ci(confidence_level=0.90, method="exact").low
    assert precision_lower_bound(k, n, 0.95) == pytest.approx(expected, rel=1e-9)
    assert precision_lower_bound(k, n, 0.95) < k / n


def test_lower_bound_closed_form_and_edges():
    assert precision_lower_bound(10, 10, 0.95) == pytest.approx(0.05 ** (1 / 10))
    assert precision_lower_bound(0, 10, 0.95) == 0.0
    assert precision_lower_bound(0, 0, 0.95) == 0.0
    np.testing.assert_allclose(precision_lower_bound([5, 0], [5, 3], 0.9), [0.1 ** (1 / 5), 0.0])


# ------------------------------------------------------------------------------------ mining


def test_exact_keyword_is_found():
    texts = _docs("{} {} refund {}", 200, seed=0) + _docs("{} crash {} {}", 200, seed=1)
    labels = ["billing"] * 200 + ["tech"] * 200
    rules = mine_rules(texts, labels)
    assert len(rules) == 2
    assert sorted(_tokens(rules)) == ["crash", "refund"]  # shorter n-grams win ties; bigrams are redundant
    by_token = {r["token"]: r for r in rules.rules}
    assert by_token["refund"]["label"] == "billing" and by_token["crash"]["label"] == "tech"
    assert by_token["refund"]["pattern"] == r"\brefund\b"
    for r in rules.rules:
        assert r["support"] == 200 and r["precision"] == 1.0
        assert r["precision_lower_bound"] == pytest.approx(0.05 ** (1 / 200))
    ev = evaluate_rules(rules, texts, labels)
    assert ev["coverage"] == 1.0 and ev["precision"] == 1.0


def _ninety_percent_keyword():
    texts = ["error"] * 1000 + ["hello"] * 1000
    labels = ["tech"] * 900 + ["billing"] * 100 + ["tech", "billing"] * 500
    return texts, labels


def test_ninety_percent_keyword_rejected_at_098_accepted_at_085():
    texts, labels = _ninety_percent_keyword()
    assert len(mine_rules(texts, labels, min_precision=0.98)) == 0
    rules = mine_rules(texts, labels, min_precision=0.85)
    assert _tokens(rules) == ["error"]
    r = rules.rules[0]
    assert (r["label"], r["support"], r["precision"]) == ("tech", 1000, 0.9)
    assert 0.85 <= r["precision_lower_bound"] < 0.9
    assert len(mine_rules(texts, labels, min_precision=0.85, confidence=0.999999)) == 0  # 0.9 - 5 sigma < 0.85


def test_tiny_support_perfect_precision_is_rejected_by_the_bound():
    texts = ["zebra"] * 10 + ["hello", "world"] * 150
    labels = ["tech"] * 10 + ["tech", "billing", "billing", "tech"] * 75
    rules = mine_rules(texts, labels, min_precision=0.98, min_support=5)
    assert len(rules) == 0  # "zebra": empirical precision 1.0, but on 10 documents only
    # the bound on 10/10 is 0.05 ** 0.1 = 0.74: accepted when that is enough
    loose = mine_rules(texts, labels, min_precision=0.7, min_support=5)
    assert _tokens(loose) == ["zebra"]
    assert loose.rules[0]["precision_lower_bound"] == pytest.approx(0.05 ** 0.1)
    assert len(mine_rules(texts, labels, min_precision=0.7, min_support=11)) == 0


def test_held_out_precision_holds_on_synthetic_keywords():
    texts, labels = _generate(4000, seed=1)
    train_x, train_y, test_x, test_y = texts[:2000], labels[:2000], texts[2000:], labels[2000:]
    rules = mine_rules(train_x, train_y, min_precision=0.95)
    # exactly the keywords whose true precision is comfortably above 0.95; none of the filler
    assert sorted(_tokens(rules)) == ["crash", "invoice", "password", "refund"]
    assert all(r["label"] == KEYWORDS[r["token"]][0] for r in rules.rules)
    ev = evaluate_rules(rules, test_x, test_y)
    assert ev["precision"] >= 0.95
    assert 0.4 < ev["coverage"] < 0.7  # 4 of the 6 keywords, in 85 % of the requests
    for r in ev["per_rule"]:
        assert r["support"] > 200 and r["precision"] >= 0.95
    # the 90 % and 80 % keywords, mined with a looser target, do not hold 0.95 on held-out data
    loose = mine_rules(train_x, train_y, min_precision=0.65)
    assert {"error", "charge"} <= set(_tokens(loose))
    low = [r for r in evaluate_rules(loose, test_x, test_y)["per_rule"] if r["pattern"] in (r"\berror\b", r"\bcharge\b")]
    assert len(low) == 2 and all(r["precision"] < 0.95 for r in low)


def test_reported_statistics_are_what_the_stage_does_on_training_data():
    texts, labels = _generate(1500, seed=2)
    rules = mine_rules(texts, labels, min_precision=0.9)
    assert len(rules) >= 3
    ev = evaluate_rules(rules, texts, labels)
    for mined, measured in zip(rules.rules, ev["per_rule"]):
        assert mined["support"] == measured["support"]
        assert mined["precision"] == pytest.approx(measured["precision"])
        assert mined["precision_lower_bound"] >= 0.9


def test_whole_words_only():
    texts = _docs("{} refund {}", 200) + _docs("{} thanks {}", 200)
    labels = ["billing"] * 200 + ["other"] * 200
    rules = mine_rules(texts, labels, ngram_range=(1, 1))
    assert rules.patterns == [(r"\brefund\b", "billing"), (r"\bthanks\b", "other")]
    stage = rules.to_stage()
    probe = ["refunded twice", "prerefund", "refund_id 3", "refund2", "REFUND!", "(refund)", "a refund."]
    out = stage.predict(probe)
    assert out.answered.tolist() == [False, False, False, False, True, True, True]
    assert all(lab == "billing" for lab in out.labels[out.answered])


def test_bigrams_are_mined_and_match_adjacent_words_only():
    texts = (["late fee"] * 200 + ["late reply"] * 200 + ["fee reply"] * 200
             + ["late, fee"] * 50)  # a comma between the words: not the bigram
    labels = ["billing"] * 200 + ["tech"] * 400 + ["tech"] * 50
    rules = mine_rules(texts, labels)
    tokens = _tokens(rules)
    assert "late fee" in tokens and "late" not in tokens and "fee" not in tokens
    r = next(r for r in rules.rules if r["token"] == "late fee")
    assert r["pattern"] == r"\blate\s+fee\b" and r["label"] == "billing" and r["support"] == 200
    stage = RegexStage([(r["pattern"], r["label"])])
    assert stage.predict(["LATE   fee", "late\tfee!", "late, fee", "fee late", "latefee", "late fees"]
                         ).answered.tolist() == [True, True, False, False, False, False]
    assert "late fee" not in _tokens(mine_rules(texts, labels, ngram_range=(1, 1)))
    assert "late fee" in _tokens(mine_rules(texts, labels, ngram_range=(2, 2)))


def test_redundant_rules_are_pruned():
    texts = [f"refund policy {i}" for i in range(300)] + [f"other thing {i}" for i in range(300)]
    labels = ["billing"] * 300 + ["misc"] * 300
    pruned = mine_rules(texts, labels)
    full = mine_rules(texts, labels, prune_redundant=False)
    assert len(pruned) == 2  # one rule per label: the others answer nothing new
    assert {"policy", "refund", "refund policy", "other", "thing", "other thing"} <= set(_tokens(full))
    assert evaluate_rules(pruned, texts, labels)["coverage"] == evaluate_rules(full, texts, labels)["coverage"] == 1.0


def test_max_rules_keeps_the_best():
    texts = ["alpha"] * 400 + ["beta"] * 200 + ["gamma"] * 160
    labels = ["a"] * 400 + ["b"] * 200 + ["c"] * 160
    assert _tokens(mine_rules(texts, labels)) == ["alpha", "beta", "gamma"]  # by lower bound
    assert _tokens(mine_rules(texts, labels, max_rules=2)) == ["alpha", "beta"]


def test_stop_words_and_case():
    texts = _docs("{} the refund {}", 200) + _docs("{} Crash {}", 200)
    labels = ["billing"] * 200 + ["tech"] * 200
    assert "the" in _tokens(mine_rules(texts, labels, ngram_range=(1, 1), prune_redundant=False))
    stopped = mine_rules(texts, labels, stop_words=["THE"], prune_redundant=False)
    assert "the" not in _tokens(stopped) and "the refund" not in _tokens(stopped)
    assert stopped.params["stop_words"] == ["the"]
    english = mine_rules(texts, labels, stop_words="english")
    assert sorted(_tokens(english)) == ["crash", "refund"]
    cased = mine_rules(texts, labels, lowercase=False, ngram_range=(1, 1))
    assert "Crash" in _tokens(cased)
    stage = cased.to_stage()
    assert not stage.ignore_case
    assert stage.predict(["Crash", "crash"]).answered.tolist() == [True, False]


def test_non_ascii_tokens_agree_with_the_engine():
    # RE2's \b is ASCII-only: \bcafé\b never matches there. The mined rules are checked with the
    # engine, so their statistics stay true instead of silently never firing.
    texts = ["un café noir"] * 200 + ["un thé vert"] * 200
    labels = ["coffee"] * 200 + ["tea"] * 200
    re_rules = mine_rules(texts, labels, engine="re", ngram_range=(1, 1))
    assert _tokens(re_rules) == ["café", "thé"]  # ties go alphabetically; "noir"/"vert" are then redundant
    assert evaluate_rules(re_rules, texts, labels, engine="re")["coverage"] == 1.0
    re2_rules = mine_rules(texts, labels, engine="re2", ngram_range=(1, 1))
    assert re2_rules.params["engine"] == "re2"
    assert _tokens(re2_rules) == ["noir", "vert"]
    ev = evaluate_rules(re2_rules, texts, labels, engine="re2")
    for mined, measured in zip(re2_rules.rules, ev["per_rule"]):
        assert mined["support"] == measured["support"]


def test_to_dict_round_trip_through_json():
    texts, labels = _generate(1500, seed=3)
    int_labels = np.array([LABELS.index(y) for y in labels])  # numpy ints must become JSON ints
    rules = mine_rules(texts, int_labels, min_precision=0.9)
    assert len(rules) >= 3
    back = MinedRules.from_dict(json.loads(json.dumps(rules.to_dict())))
    assert back.patterns == rules.patterns
    assert all(type(lab) is int for _, lab in back.patterns)
    assert back.rules == rules.to_dict()["rules"] and back.lowercase is True
    assert back.params["min_precision"] == 0.9 and back.params["n_documents"] == 1500
    assert back.explain() == rules.explain()
    probe = texts[:300]
    a, b = rules.to_stage().predict(probe), back.to_stage().predict(probe)
    assert list(a.labels) == list(b.labels)


def test_to_stage_agrees_with_evaluate_rules():
    texts, labels = _generate(3000, seed=4)
    rules = mine_rules(texts[:1500], labels[:1500], min_precision=0.9)
    stage = rules.to_stage(name="mined", cost=0.0)
    assert isinstance(stage, RegexStage) and stage.name == "mined" and stage.cost == 0.0
    assert stage.patterns == rules.patterns
    test_x, test_y = texts[1500:], labels[1500:]
    out = stage.predict(test_x)
    ev = evaluate_rules(rules, test_x, test_y)
    assert ev["n_answered"] == int(out.answered.sum()) and ev["n"] == 1500
    assert ev["coverage"] == pytest.approx(out.answered.mean())
    hits = sum(p == y for p, y, a in zip(out.labels, test_y, out.answered) if a)
    assert ev["precision"] == pytest.approx(hits / out.answered.sum())
    by_label = Counter()
    for r in ev["per_rule"]:
        by_label[r["label"]] += r["support"]
    assert +by_label == Counter(out.labels[out.answered].tolist())
    # plain (pattern, label) pairs and rule dicts give the same numbers
    assert evaluate_rules(rules.patterns, test_x, test_y) == ev
    assert evaluate_rules(rules.rules, test_x, test_y) == ev


def test_explain_is_a_readable_table():
    texts = _docs("{} late fee {}", 300) + _docs("{} crash {}", 200)
    labels = ["billing"] * 300 + ["tech"] * 200
    text = mine_rules(texts, labels, ngram_range=(2, 2), min_support=150).explain()
    lines = text.splitlines()
    assert lines[0].split() == ["#", "n-gram", "label", "support", "precision", "lower", "bound"]
    assert lines[2].split() == ["1", "late", "fee", "billing", "300", "1.0000", f"{0.05 ** (1 / 300):.4f}"]
    assert len(lines) == 4 and "1 rules" in lines[3] and "0.98" in lines[3] and "500 documents" in lines[3]
    empty = mine_rules(["a b"] * 3, ["x", "y", "x"])
    assert len(empty) == 0 and "no rules" in empty.explain()
    with pytest.raises(InvalidParameterError, match="empty"):
        empty.to_stage()


def test_evaluate_rules_without_answers():
    ev = evaluate_rules([(r"\bnever\b", "x")], ["a", "b"], ["x", "y"])
    assert ev["coverage"] == 0.0 and ev["n_answered"] == 0 and math.isnan(ev["precision"])
    assert ev["per_rule"][0]["support"] == 0 and math.isnan(ev["per_rule"][0]["precision"])


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"texts": ["a", "b"], "labels": ["x"]}, r"'texts', 'labels' of mine_rules must have the same length"),
        ({"texts": [], "labels": []}, r"'texts' parameter of mine_rules must not be empty"),
        ({"texts": "one text", "labels": ["x"]}, r"'texts' parameter of mine_rules must be a sequence of strings"),
        ({"texts": ["a", 3], "labels": ["x", "y"]}, r"'texts' .* Got int 3 at index 1"),
        ({"texts": ["a", None], "labels": ["x", "y"]}, r"'texts' .* Got NoneType None at index 1"),
        ({"texts": [b"a"], "labels": ["x"]}, r"'texts' .* Got bytes"),
        ({"labels": [["x"], ["y"]]}, r"'labels' parameter of mine_rules must be a 1-d array"),
        ({"labels": ["x", None]}, r"'labels' parameter of mine_rules must not contain missing"),
        ({"min_precision": 0}, r"'min_precision' parameter of mine_rules must be a float in the range \(0, 1\]"),
        ({"min_precision": 1.5}, r"'min_precision' .* Got 1\.5 instead"),
        ({"min_precision": math.nan}, r"'min_precision'"),
        ({"min_support": 0}, r"'min_support' parameter of mine_rules must be an int in the range \[1, inf\)"),
        ({"min_support": 2.5}, r"'min_support'"),
        ({"max_rules": 0}, r"'max_rules'"),
        ({"confidence": 1.0}, r"'confidence' parameter of mine_rules must be a float in the range \(0, 1\)"),
        ({"ngram_range": (0, 1)}, r"'ngram_range' .* Got \(0, 1\) instead"),
        ({"ngram_range": (2, 1)}, r"'ngram_range'"),
        ({"ngram_range": 2}, r"'ngram_range'"),
        ({"stop_words": "french"}, r"'stop_words' parameter of mine_rules must be None, 'english'"),
        ({"stop_words": [1, 2]}, r"'stop_words'"),
        ({"lowercase": "yes"}, r"'lowercase'"),
        ({"engine": "pcre"}, r"'engine' parameter of mine_rules must be one of"),
    ],
)
def test_mine_rules_bad_input(kwargs, match):
    args = {"texts": ["a text", "another"], "labels": ["x", "y"], **kwargs}
    with pytest.raises(InvalidParameterError, match=match):
        mine_rules(**args)


def test_evaluate_rules_bad_input():
    with pytest.raises(InvalidParameterError, match="'rules_or_patterns'"):
        evaluate_rules("refund", ["a"], ["x"])
    with pytest.raises(InvalidParameterError, match="'rules_or_patterns' .* item 0"):
        evaluate_rules([("refund",)], ["a"], ["x"])
    with pytest.raises(InvalidParameterError, match="same length"):
        evaluate_rules([("a", "x")], ["a", "b"], ["x"])
    with pytest.raises(InvalidParameterError, match="'texts'"):
        evaluate_rules([("a", "x")], [1], ["x"])


@pytest.mark.parametrize(
    "data,match",
    [
        ([], "written by MinedRules.to_dict"),
        ({"format": "something else"}, "format 'something else'"),
        ({"format": "leanscale.mined_rules", "version": 99, "rules": []}, "version 99"),
        ({"format": "leanscale.mined_rules", "version": 1, "rules": [{"label": "x"}]}, "'pattern' string"),
    ],
)
def test_from_dict_bad_input(data, match):
    with pytest.raises(InvalidParameterError, match=match):
        MinedRules.from_dict(data)
