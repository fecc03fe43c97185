import math
import re
import time

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from leanscale.cascade.stages import (
    CallableStage,
    ModelStage,
    RegexStage,
    RuleStage,
    Stage,
    StageError,
    StageOutput,
    check_regex_safety,
    measure_cost,
    softmax_with_temperature,
)
from leanscale.core.errors import InvalidParameterError

ENGINES = ["re2", "re"]

# ------------------------------------------------------------------------------------------ regex


@pytest.mark.parametrize("engine", ENGINES)
def test_regex_first_match_wins_and_abstains(engine):
    stage = RegexStage([(r"\brefund\b", "billing"), (r"refund|crash", "tech")], engine=engine)
    out = stage.predict(["please refund, the app did crash", "it crashed", "hello there", "refunds"])
    assert isinstance(out, StageOutput)
    assert list(out.labels) == ["billing", "tech", None, "tech"]
    assert out.confidence.tolist() == [1.0, 1.0, 0.0, 1.0]
    assert out.answered.tolist() == [True, True, False, True]
    assert out.confidence.dtype == np.float64 and out.answered.dtype == bool


@pytest.mark.parametrize("engine", ENGINES)
def test_regex_case_insensitive_by_default(engine):
    items = ["REFUND now", "Refund", "refund"]
    assert RegexStage([("refund", 1)], engine=engine).predict(items).answered.tolist() == [True, True, True]
    strict = RegexStage([("refund", 1)], engine=engine, ignore_case=False)
    assert strict.predict(items).answered.tolist() == [False, False, True]


def test_regex_engine_choice():
    assert RegexStage([("a", 1)]).engine == "re2"  # google-re2 is installed in this environment
    assert RegexStage([("a", 1)], engine="re2").engine == "re2"
    assert RegexStage([("a", 1)], engine="re").engine == "re"


def test_regex_max_length_truncates_requests():
    stage = RegexStage([("needle", 1)], max_length=10)
    assert stage.predict(["needle" + "x" * 100, "x" * 100 + "needle"]).answered.tolist() == [True, False]


@pytest.mark.parametrize("pattern", [r"(a+)+$", r"(\w+\s?)*$", r"(a)\1", r"(?P<x>a)(?P=x)", r"(a*)*b",
                                     # alternations under a quantifier and nested groups (issue #13)
                                     r"(a|aa)+$", r"(a|a)+$", r"((a+))+$", r"(?:\w+)+#", r"(a|b)+",
                                     r"(?:x(?:a|ab))*$", r"(a?){2,}$"])
def test_re_engine_rejects_catastrophic_patterns(pattern):
    with pytest.raises(InvalidParameterError, match=re.escape(repr(pattern))):
        RegexStage([(r"\bok\b", 0), (pattern, 1)], engine="re")
    with pytest.raises(InvalidParameterError, match="'patterns'"):
        check_regex_safety(pattern)


@pytest.mark.parametrize("pattern", [r"\brefund\b", r"\blate\s+fee\b", r"(?:ab)+c", r"[ab]+", r"\d{3}-\d{4}",
                                     r"^(yes|no)$", r"(a+)?b", r"\((a|b)\)+"])
def test_safe_patterns_pass_the_check(pattern):
    check_regex_safety(pattern)
    assert RegexStage([(pattern, 1)], engine="re").engine == "re"


def test_re2_runs_nested_quantifiers_in_linear_time():
    stage = RegexStage([(r"(a+)+$", "x")])
    assert stage.engine == "re2"
    t0 = time.perf_counter()
    out = stage.predict(["a" * 50 + "b", "a" * 5000 + "b"])
    assert time.perf_counter() - t0 < 5.0  # a backtracking engine needs ~2**50 steps here
    assert out.answered.tolist() == [False, False] and list(out.labels) == [None, None]
    assert stage.predict(["aaa"]).labels[0] == "x"


def test_re2_rejects_back_references_naming_the_pattern():
    with pytest.raises(InvalidParameterError, match=re.escape(repr(r"(a)\1"))):
        RegexStage([(r"(a)\1", 1)], engine="re2")


def test_re_engine_time_limit_abandons_slow_matches():
    # \d*\d*\d*\d*\d*\s has no nested repetition (passes the check) but backtracks polynomially
    # (~n^5 steps); the per-request limit of the regex module stops it and the stage abstains.
    stage = RegexStage([(r"\d*\d*\d*\d*\d*\s", 1)], engine="re", match_timeout=0.02)
    t0 = time.perf_counter()
    out = stage.predict(["1" * 2000 + "b"])
    assert time.perf_counter() - t0 < 5.0
    assert out.answered.tolist() == [False]
    assert stage.timeouts_ == 1


def test_re_engine_is_refused_without_a_real_time_limit(monkeypatch):
    # Python's re cannot be interrupted: without the regex package engine="re" is refused for
    # every pattern, even a harmless one (issue #13).
    import leanscale.cascade.stages as stages_mod

    monkeypatch.setattr(stages_mod, "_regex_module", lambda: None)
    for pattern in (r"\brefund\b", r"(a|aa)+$", r"a*a*a*b"):
        with pytest.raises(InvalidParameterError, match="'engine'.*'regex' package.*time limit"):
            RegexStage([(pattern, 1)], engine="re")
    monkeypatch.setattr(stages_mod, "_re2", lambda: None)
    with pytest.raises(InvalidParameterError, match="'engine'.*'auto'.*'regex' package"):
        RegexStage([("a", 1)])


def test_lone_surrogate_is_isolated_to_its_own_text():
    # RE2 cannot encode a lone surrogate; it used to fail the whole batch (issue #13)
    stage = RegexStage([(r"\brefund\b", "billing")], engine="re2")
    out = stage.predict(["refund please", "refund \ud800 now", "\udfff", "nothing here"])
    assert out.answered.tolist() == [True, True, False, False]
    assert list(out.labels) == ["billing", "billing", None, None]
    assert stage.failures_ == 0


@pytest.mark.parametrize(
    "patterns",
    [[], "refund", [("refund",)], [(3, "x")], [("refund", 1, 2)], None],
)
def test_regex_bad_patterns(patterns):
    with pytest.raises(InvalidParameterError, match="'patterns'"):
        RegexStage(patterns)


@pytest.mark.parametrize("engine", ENGINES)
def test_regex_invalid_syntax(engine):
    with pytest.raises(InvalidParameterError, match=re.escape(repr("(unclosed"))):
        RegexStage([("(unclosed", 1)], engine=engine)


def test_regex_bad_options():
    with pytest.raises(InvalidParameterError, match="'engine'.*'pcre'"):
        RegexStage([("a", 1)], engine="pcre")
    with pytest.raises(InvalidParameterError, match="'match_timeout'"):
        RegexStage([("a", 1)], match_timeout=0)
    with pytest.raises(InvalidParameterError, match="'max_length'"):
        RegexStage([("a", 1)], max_length=0)


# ------------------------------------------------------------------------------------------- rules


def test_rule_stage_label_none_and_pair():
    def fn(x):
        if x.startswith("a"):
            return "A"
        if x.startswith("b"):
            return ("B", 0.7)
        if x.startswith("c"):
            return (None, 0.9)  # a None label abstains whatever the confidence
        return None

    out = RuleStage(fn, name="prefix").predict(["apple", "banana", "cherry", "date"])
    assert list(out.labels) == ["A", "B", None, None]
    assert out.confidence.tolist() == [1.0, 0.7, 0.0, 0.0]
    assert out.answered.tolist() == [True, True, False, False]


def test_rule_stage_rejects_non_callable():
    with pytest.raises(InvalidParameterError, match="'fn' parameter of RuleStage must be callable"):
        RuleStage("not callable")


# ---------------------------------------------------------------------------------------- callable


def test_callable_stage_unbatched_and_batched():
    calls = []

    def one(x):
        calls.append(x)
        return (x.upper(), 0.5) if x != "skip" else None

    out = CallableStage(one).predict(["a", "skip", "b"])
    assert calls == ["a", "skip", "b"]
    assert list(out.labels) == ["A", None, "B"] and out.confidence.tolist() == [0.5, 0.0, 0.5]

    batches = []

    def many(items):
        batches.append(list(items))
        return [(len(x), 0.25) if len(x) > 1 else len(x) for x in items]

    out = CallableStage(many, batched=True).predict(("xx", "y", "zzz"))
    assert batches == [["xx", "y", "zzz"]]  # one call for the whole batch
    assert list(out.labels) == [2, 1, 3] and out.confidence.tolist() == [0.25, 1.0, 0.25]


def test_callable_stage_reads_json_style_list_pairs():
    # a remote endpoint decoded from JSON answers with lists, not tuples
    out = CallableStage(lambda items: [["billing", 0.9], None, ["tech", 1]], batched=True).predict(["a", "b", "c"])
    assert list(out.labels) == ["billing", None, "tech"]
    assert out.confidence.tolist() == [0.9, 0.0, 1.0]


@pytest.mark.parametrize(
    "answers,match",
    [
        (["a", "b"], r"returned 2 answers for 3 requests"),
        (["a", "b", "c", "d"], r"returned 4 answers for 3 requests"),
        ([("a", 1.5), "b", "c"], r"confidence 1\.5 for request 0"),
        (["a", ("b", -0.1), "c"], r"confidence -0\.1 for request 1"),
        (["a", "b", ("c", math.nan)], r"confidence nan for request 2"),
        (["a", "b", ("c", math.inf)], r"confidence inf for request 2"),
        (["a", ("b", "high"), "c"], r"confidence 'high' for request 1"),
        (["a", ("b", None), "c"], r"confidence None for request 1"),
        ([("a", 0.5, "extra"), "b", "c"], r"expected \(label, confidence\)"),
        (["a", {"label": "b"}, "c"], r"expected \(label, confidence\)"),
        (["a", "b", ["c"]], r"expected \(label, confidence\)"),
        (42, r"returned int; expected a list"),
    ],
)
def test_malformed_answers_raise_stage_error(answers, match):
    stage = CallableStage(lambda items: answers, name="llm", batched=True)
    with pytest.raises(StageError, match=match) as exc:
        stage.predict(["x", "y", "z"])
    assert "'llm'" in str(exc.value)


def test_a_stage_that_raises_becomes_stage_error_with_its_name():
    def boom(x):
        raise KeyError("no such model")

    for stage in (CallableStage(boom, name="remote-llm"), RuleStage(boom, name="remote-llm")):
        with pytest.raises(StageError, match=r"stage 'remote-llm' raised KeyError: 'no such model'") as exc:
            stage.predict(["x"])
        assert isinstance(exc.value.__cause__, KeyError)


class _CustomStage(Stage):
    def __init__(self, out):
        super().__init__("custom")
        self.out = out

    def _predict(self, items):
        return self.out


@pytest.mark.parametrize(
    "out,match",
    [
        ((["a"], [1.0], [True]), "must return a StageOutput"),
        (StageOutput(np.array(["a", "b"], dtype=object), np.ones(2), np.ones(2, bool)), r"expected \(3,\)"),
        (StageOutput(np.array(["a"] * 3, dtype=object), np.array(["hi", "lo", "hi"], dtype=object),
                     np.ones(3, bool)), "expected numbers in"),
        (StageOutput(np.array(["a"] * 3, dtype=object), np.array([0.5, 2.0, 0.5]), np.ones(3, bool)),
         r"confidence 2\.0 for request 1"),
    ],
)
def test_custom_stage_output_is_checked(out, match):
    with pytest.raises(StageError, match=match):
        _CustomStage(out).predict(["x", "y", "z"])


def test_check_output_clears_abstentions():
    out = StageOutput(np.array(["a", "b"], dtype=object), np.array([0.3, 7.0]), np.array([True, False]))
    got = _CustomStage(out).predict(["x", "y"])  # confidence of an abstention is not checked, but zeroed
    assert list(got.labels) == ["a", None] and got.confidence.tolist() == [0.3, 0.0]


# ------------------------------------------------------------------------------------------- model


def _toy_text_problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 2))
    y = np.where(x[:, 0] + 0.5 * x[:, 1] > 0, "pos", "neg")
    return x, y


def test_model_stage_sklearn_logistic_regression():
    x, y = _toy_text_problem()
    clf = LogisticRegression().fit(x, y)
    stage = ModelStage(clf, name="logreg", transform=np.asarray)
    items = [row for row in x[:20]]
    out = stage.predict(items)
    proba = clf.predict_proba(x[:20])
    assert list(out.labels) == list(clf.classes_[proba.argmax(1)])
    np.testing.assert_allclose(out.confidence, proba.max(1))
    assert out.answered.all()
    assert (out.labels == clf.predict(x[:20])).all()
    np.testing.assert_allclose(stage.predict_proba(items), proba)


def test_model_stage_splits_batches():
    x, y = _toy_text_problem()
    clf = LogisticRegression().fit(x, y)
    seen = []

    def transform(batch):
        seen.append(len(batch))
        return np.asarray(batch)

    out = ModelStage(clf, transform=transform, batch_size=8).predict(list(x[:20]))
    assert seen == [8, 8, 4]
    np.testing.assert_allclose(out.confidence, clf.predict_proba(x[:20]).max(1))


class _TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 4)
        self.drop = torch.nn.Dropout(p=0.5)

    def forward(self, x):
        return self.lin(self.drop(x))


def test_model_stage_torch_module_with_classes():
    torch.manual_seed(0)
    net = _TinyNet()
    net.eval()
    classes = ["a", "b", "c", "d"]
    x = torch.randn(10, 3)
    stage = ModelStage(net, name="net", classes=classes, transform=lambda batch: torch.stack(batch))
    out = stage.predict(list(x))
    with torch.no_grad():
        proba = torch.softmax(net(x), dim=-1).numpy()
    assert list(out.labels) == [classes[i] for i in proba.argmax(1)]
    np.testing.assert_allclose(out.confidence, proba.max(1), rtol=1e-6)


def test_model_stage_torch_runs_in_eval_mode_and_restores_it():
    torch.manual_seed(0)
    net = _TinyNet()
    net.train()  # left in training mode: dropout would make predictions random
    stage = ModelStage(net, classes=list("abcd"), transform=lambda batch: torch.stack(batch))
    x = list(torch.randn(50, 3))
    first, second = stage.predict(x), stage.predict(x)
    np.testing.assert_array_equal(first.confidence, second.confidence)
    assert net.training  # the caller's mode is restored
    net.eval()
    with torch.no_grad():
        expected = torch.softmax(net(torch.stack(x)), dim=-1).max(-1).values.numpy()
    np.testing.assert_allclose(first.confidence, expected, rtol=1e-6)


def test_model_stage_temperature_scaling():
    x, y = _toy_text_problem()
    clf = LogisticRegression(C=10.0).fit(x, y)
    items = list(x[:30])
    plain = ModelStage(clf, transform=np.asarray).predict(items)
    hot = ModelStage(clf, transform=np.asarray, temperature=2.5).predict(items)
    cold = ModelStage(clf, transform=np.asarray, temperature=0.5).predict(items)
    assert list(hot.labels) == list(plain.labels) == list(cold.labels)  # argmax unchanged
    assert np.all(hot.confidence < plain.confidence) and np.all(cold.confidence > plain.confidence)
    # by hand: softmax(log p / T)
    p = clf.predict_proba(x[:30])
    z = np.log(p) / 2.5
    by_hand = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    np.testing.assert_allclose(hot.confidence, by_hand.max(1), rtol=1e-10)
    np.testing.assert_allclose(softmax_with_temperature(p, 1.0), p, rtol=1e-10)


def test_model_stage_wrong_probability_shape_is_stage_error():
    class Bad:
        classes_ = np.array(["a", "b"])

        def predict_proba(self, x):
            return np.full((len(x), 3), 1 / 3)

    with pytest.raises(StageError, match=r"shape \(2, 3\); expected \(2, 2\)"):
        ModelStage(Bad(), name="bad").predict(["x", "y"])


def test_model_stage_bad_arguments():
    with pytest.raises(InvalidParameterError, match="'model' parameter of ModelStage"):
        ModelStage(object())
    with pytest.raises(InvalidParameterError, match="'classes' parameter of ModelStage is required"):
        ModelStage(torch.nn.Linear(2, 2))
    x, y = _toy_text_problem()
    clf = LogisticRegression().fit(x, y)
    for t in (0, -1.0, math.nan, "2"):
        with pytest.raises(InvalidParameterError, match="'temperature' parameter of ModelStage"):
            ModelStage(clf, temperature=t)
    with pytest.raises(InvalidParameterError, match="'batch_size' parameter of ModelStage"):
        ModelStage(clf, batch_size=0)


# ------------------------------------------------------------------------------- names, costs, ...


@pytest.mark.parametrize("name", ["", "has space", "slash/name", None, 3, "é"])
def test_bad_names(name):
    with pytest.raises(InvalidParameterError, match=r"The 'name' parameter of RuleStage"):
        RuleStage(lambda x: None, name=name)


@pytest.mark.parametrize("cost", [-1, math.nan, "1", True])
def test_bad_costs(cost):
    with pytest.raises(InvalidParameterError, match=r"The 'cost' parameter of CallableStage must be a real number"):
        CallableStage(lambda x: None, cost=cost)


@pytest.mark.parametrize("timeout", [0, -2.0, math.nan, "5"])
def test_bad_timeouts(timeout):
    with pytest.raises(InvalidParameterError, match=r"The 'timeout' parameter of RegexStage"):
        RegexStage([("a", 1)], timeout=timeout)


def test_good_names_costs_timeouts():
    stage = RegexStage([("a", 1)], name="rules-v1.2_x", cost=0, timeout=0.5)
    assert (stage.name, stage.cost, stage.timeout) == ("rules-v1.2_x", 0.0, 0.5)
    assert RuleStage(lambda x: None).cost is None
    assert "RegexStage(name='rules-v1.2_x'" in repr(stage)


def test_measure_cost():
    stage = RuleStage(lambda x: (time.sleep(0.002), "a")[1])
    cost = measure_cost(stage, ["x"] * 5, repeats=2)
    assert 0.002 <= cost < 0.5
    with pytest.raises(InvalidParameterError, match="'items'"):
        measure_cost(stage, [])


def test_measure_cost_excludes_a_slow_first_call():
    """A stage that loads a model on its first call (0.3 s) costs 2 ms per request afterwards."""
    state = {"loaded": False}

    def fn(x):
        if not state["loaded"]:
            time.sleep(0.3)
            state["loaded"] = True
        time.sleep(0.002)
        return "a"

    cost = measure_cost(RuleStage(fn), ["x"] * 10)
    assert 0.002 <= cost < 0.02  # with the load counted it would be >= 0.03


# ------------------------------------------------------------------ model features, static embeddings

def test_model_stage_features_are_margin_and_normalised_entropy():
    from leanscale.cascade.stages import proba_features

    P = np.array([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3], [0.0, 1.0, 0.0]])

    class M:
        classes_ = np.array(["a", "b", "c"])

        def predict_proba(self, X):
            return P[: len(X)]

    out = ModelStage(M()).predict(["x", "y", "z"])
    ent0 = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)) / math.log(3)
    np.testing.assert_allclose(out.features, [[0.5, ent0], [0.0, 1.0], [1.0, 0.0]], atol=1e-9)
    np.testing.assert_allclose(proba_features(P), out.features)


def _fake_encoder(texts):
    """A deterministic 'static' encoder: character-class counts, unit-normalised (n, 4)."""
    E = np.array([[t.count("a") + 1, t.count("b"), len(t), t.count(" ")] for t in texts], dtype=np.float32)
    return E / np.linalg.norm(E, axis=1, keepdims=True)


def _static_data(n=120):
    rng = np.random.default_rng(0)
    texts = ["".join(rng.choice(list("aab b"), size=int(rng.integers(3, 12)))) for _ in range(n)]
    y = ["many_a" if t.count("a") > t.count("b") else "other" for t in texts]
    return texts, y


def test_static_embedding_stage_equals_encoder_then_head():
    from leanscale.cascade import StaticEmbeddingStage

    texts, y = _static_data()
    head = LogisticRegression(C=100.0).fit(_fake_encoder(texts), y)  # any head with predict_proba(E)
    stage = StaticEmbeddingStage(head, encoder=_fake_encoder, cost=0.001)
    out = stage.predict(texts[:50])
    p = head.predict_proba(_fake_encoder(texts[:50]))
    np.testing.assert_allclose(out.confidence, p.max(1), rtol=1e-6)
    assert out.labels.tolist() == head.classes_[p.argmax(1)].tolist()
    assert np.mean(out.labels == np.array(y[:50], dtype=object)) >= 0.7  # it learned something
    # an encoder object with .encode (a StaticTextEncoder) works the same
    enc = type("Enc", (), {"encode": staticmethod(_fake_encoder)})()
    np.testing.assert_allclose(StaticEmbeddingStage(head, encoder=enc).predict(texts[:50]).confidence, out.confidence)


def test_static_embedding_stage_fit_with_stacked_tfidf():
    from leanscale.cascade import StaticEmbeddingStage, TfidfClassifier
    from leanscale.cascade.stacking import STACK_SCALE

    texts, y = _static_data(200)
    tfidf = TfidfClassifier(min_df=1).fit(texts, y)
    stage = StaticEmbeddingStage.fit(texts, y, encoder=_fake_encoder, tfidf=tfidf, hidden=8, epochs=5)
    assert stage.head.n_features_in_ == 4 + len(tfidf.classes_)
    F = np.hstack([_fake_encoder(texts[:20]), STACK_SCALE * np.log(np.clip(tfidf.predict_proba(texts[:20]), 1e-6, 1))])
    p = stage.head.predict_proba_embeddings(F.astype(np.float32))
    np.testing.assert_allclose(stage.predict(texts[:20]).confidence, p.max(1), rtol=1e-6)
    assert stage.predict(texts[:20]).features.shape == (20, 2)


def test_static_embedding_stage_fit_passes_soft_targets_to_the_head():
    from leanscale.cascade import EmbeddingClassifier, StaticEmbeddingStage

    texts, y = _static_data(120)
    classes = sorted(set(y))
    q = np.full((len(y), len(classes)), 0.1 / (len(classes) - 1))
    q[np.arange(len(y)), [classes.index(v) for v in y]] = 0.9  # label smoothing as the "teacher"
    stage = StaticEmbeddingStage.fit(texts, y, encoder=_fake_encoder, hidden=8, epochs=5, soft_targets=q)
    ref = EmbeddingClassifier(encoder=None, hidden=8, epochs=5).fit_embeddings(_fake_encoder(texts), y,
                                                                               soft_targets=q)
    E = _fake_encoder(texts[:30])
    np.testing.assert_array_equal(stage.head.predict_proba_embeddings(E), ref.predict_proba_embeddings(E))
    with pytest.raises(InvalidParameterError, match="'soft_targets' parameter"):
        StaticEmbeddingStage.fit(texts, y, encoder=_fake_encoder, epochs=1, soft_targets=q[:5])


def test_static_embedding_stage_bad_inputs():
    from leanscale.cascade import StaticEmbeddingStage

    texts, y = _static_data(20)
    with pytest.raises(InvalidParameterError, match="'head'"):
        StaticEmbeddingStage(object())
    with pytest.raises(InvalidParameterError, match="'encoder'"):
        StaticEmbeddingStage.fit(texts, y, encoder=42)
    with pytest.raises(InvalidParameterError, match="'texts' and 'y'"):
        StaticEmbeddingStage.fit(texts, y[:-1], encoder=_fake_encoder)
    with pytest.raises(InvalidParameterError, match="'texts'"):
        StaticEmbeddingStage.fit("abc", ["x"], encoder=_fake_encoder)
    stage = StaticEmbeddingStage.fit(texts, y, encoder=_fake_encoder, epochs=2)
    stage.encoder, stage._encode_fn = None, (lambda t: np.zeros((len(t) + 1, 4)))
    with pytest.raises(StageError, match="encoder returned shape"):
        stage.predict(texts[:3])
