"""Cascade: the exact frontier equals brute force, the chosen setting meets the target at least
cost, the guarantee holds on simulated data, fallback never loses a request, save/load, bad input."""

from __future__ import annotations

import itertools
import json
import time

import numpy as np
import pytest

from leanscale.cascade import (
    FALLBACK,
    CallableStage,
    Cascade,
    ModelStage,
    RegexStage,
    RuleStage,
)
from leanscale.cascade.search import (
    evaluate_config,
    fixed_sequence_test,
    frontier,
    pareto_mask,
)
from leanscale.core.errors import DataFormatError, InvalidParameterError, NotFittedError


def brute_force(answered, conf, correct, costs):
    m = answered.shape[0]
    cands = [[None] + sorted(set(conf[k][answered[k]].tolist())) for k in range(m - 1)]
    pts = np.array([evaluate_config(t, answered, conf, correct, costs)[:2] for t in itertools.product(*cands)])
    keep = pareto_mask(pts[:, 0], pts[:, 1])
    return pts[keep]


@pytest.mark.parametrize("seed", range(40))
def test_frontier_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    m, n = int(rng.integers(1, 5)), int(rng.integers(2, 12))
    answered = rng.random((m, n)) < 0.8
    conf = np.round(rng.random((m, n)), 1)  # ties on purpose
    correct = rng.random((m, n)) < 0.7
    costs = rng.random(m) * 10
    fr = frontier(answered, conf, correct, costs)
    bf = brute_force(answered, conf, correct, costs)
    np.testing.assert_allclose(fr.cost, bf[:, 0])
    np.testing.assert_allclose(fr.accuracy, bf[:, 1])
    assert fr.exact
    for thr, c, a in zip(fr.thresholds, fr.cost, fr.accuracy):  # each point is what its thresholds give
        c2, a2, _ = evaluate_config(thr, answered, conf, correct, costs)
        assert c == pytest.approx(c2) and a == pytest.approx(a2)
    assert np.all(np.diff(fr.cost) > 0) and np.all(np.diff(fr.accuracy) > 0)


def test_frontier_max_thresholds_is_subset_and_flagged():
    rng = np.random.default_rng(0)
    answered = np.ones((3, 60), bool)
    conf, correct = rng.random((3, 60)), rng.random((3, 60)) < 0.6
    full = frontier(answered, conf, correct, [1, 2, 10])
    coarse = frontier(answered, conf, correct, [1, 2, 10], max_thresholds=4)
    assert full.exact and not coarse.exact
    assert coarse.n_evaluated < full.n_evaluated
    # the coarse frontier is never better than the exact one at any cost
    for c, a in zip(coarse.cost, coarse.accuracy):
        assert a <= full.accuracy[full.cost <= c + 1e-12].max() + 1e-12


def test_fixed_sequence_test_stops_at_first_failure():
    certified, p = fixed_sequence_test([95, 94, 80, 99], 100, 0.85, 0.05)
    assert certified == 2 and len(p) == 3  # 80/100 fails; 99 after it is never tested
    from scipy.stats import binom

    assert p[0] == pytest.approx(binom.sf(94, 100, 0.85))


# --------------------------------------------------------------------------- synthetic cascade


def make_task(n, seed=0):
    """Requests 'k<i> ...'; 20% carry the word 'refund' (label 'refund'); the rest are labelled by
    parity. A small model is right with probability = its confidence; the big model is always right."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        if rng.random() < 0.2:
            texts.append(f"k{i} refund please")
            labels.append("refund")
        else:
            texts.append(f"k{i} other")
            labels.append("odd" if i % 2 else "even")
    return texts, np.array(labels, dtype=object)


def truth(text):
    i = int(text.split()[0][1:])
    return "refund" if "refund" in text else ("odd" if i % 2 else "even")


def small_model(items):
    out = []
    for t in items:
        r = np.random.default_rng(abs(hash(t)) % 2**32)
        c = 0.5 + 0.5 * r.random()
        right = r.random() < c
        lab = truth(t) if right else ("even" if truth(t) == "odd" else "odd")
        out.append((lab, c))
    return out


def big_model(items):
    return [(truth(t), 0.99) for t in items]


def stages(big=big_model, small=small_model):
    return [RegexStage([(r"\brefund\b", "refund")], name="rules", cost=0.01),
            CallableStage(small, name="small", cost=1.0, batched=True),
            CallableStage(big, name="big", cost=20.0, batched=True)]


def test_cascade_meets_target_at_least_cost():
    X, y = make_task(3000)
    c = Cascade(stages(), target_accuracy=0.95).fit(X, y)
    assert c.expected_accuracy_ >= 0.95
    # cheapest: no other frontier point with accuracy >= target is cheaper
    ok = c.frontier_.accuracy >= 0.95
    assert c.expected_cost_ == pytest.approx(c.frontier_.cost[ok].min())
    assert c.thresholds_["rules"] == 1.0  # free and always right: on
    assert 0.5 < c.thresholds_["small"] <= 1.0
    Xt, yt = make_task(3000, seed=1)
    assert c.score(Xt, yt) >= 0.93
    out = c.predict_detailed(Xt)
    assert set(out.stage) <= {"rules", "small", "big"}
    assert out.cost.mean() < 0.5 * 20.0  # much cheaper than the big model alone
    assert "answers when its confidence" in c.explain()


def test_cascade_budget_and_default_target():
    X, y = make_task(2000)
    c = Cascade(stages(), budget=2.0).fit(X, y)
    assert c.expected_cost_ <= 2.0
    ok = c.frontier_.cost <= 2.0
    assert c.expected_accuracy_ == pytest.approx(c.frontier_.accuracy[ok].max())
    d = Cascade(stages()).fit(X, y)  # default: match the big model
    assert d.reference_accuracy_ == 1.0 and d.expected_accuracy_ == 1.0
    assert d.expected_cost_ < 20.0  # the free rules still answer their share


def test_guarantee_holds_on_simulated_data():
    """Over 100 calibration draws the certified setting has true accuracy >= target in >= 95%."""
    rng = np.random.default_rng(0)
    n_pool, target, delta = 200_000, 0.9, 0.05
    # pool: stage 1 (cheap) confidence c, right with probability c; stage 2 always right
    conf1 = rng.random(n_pool)
    right1 = rng.random(n_pool) < conf1
    answered = np.ones((2, n_pool), bool)
    conf = np.stack([conf1, np.ones(n_pool)])
    correct = np.stack([right1, np.ones(n_pool, bool)])
    costs = [1.0, 10.0]
    fails = 0
    for trial in range(100):
        idx = rng.choice(n_pool, 1000, replace=False)
        X = list(idx)
        y = np.ones(1000, dtype=object)
        st = [CallableStage(lambda its: [(1 if right1[i] else 0, conf1[i]) for i in its], name="cheap", cost=1.0,
                            batched=True),
              CallableStage(lambda its: [(1, 1.0) for _ in its], name="big", cost=10.0, batched=True)]
        c = Cascade(st, target_accuracy=target, guarantee=True, delta=delta, seed=trial).fit(X, y)
        t = c.thresholds_["cheap"]
        # the true accuracy of the chosen setting on the whole pool
        _, acc, _ = evaluate_config((t,), answered, conf, correct, costs)
        fails += acc < target
        if trial == 0:
            assert c.guarantee_["n_test"] == 500 and c.guarantee_["p_value"] <= delta
    assert fails <= 5, fails


def test_guarantee_unreachable_target_says_so():
    X, y = make_task(400)
    weak = [CallableStage(lambda its: [("odd", 0.6) for _ in its], name="a", cost=1.0, batched=True),
            CallableStage(lambda its: [("even", 0.6) for _ in its], name="b", cost=2.0, batched=True)]
    with pytest.raises(InvalidParameterError, match="target_accuracy.*cannot be certified"):
        Cascade(weak, target_accuracy=0.9, guarantee=True).fit(X, y)
    with pytest.raises(InvalidParameterError, match="best reachable accuracy is 0.4"):
        Cascade(weak, target_accuracy=0.99).fit(X, y)


def test_failing_stage_falls_back_and_never_loses_a_request():
    X, y = make_task(1000)
    calls = {"n": 0}

    def flaky_small(items):
        calls["n"] += 1
        if calls["n"] > 1:  # works during fit, fails afterwards
            raise RuntimeError("backend down")
        return small_model(items)

    c = Cascade(stages(small=flaky_small), target_accuracy=0.95).fit(X, y)
    out = c.predict_detailed(X)
    assert len(out.labels) == len(X) and all(lab is not None for lab in out.labels)
    assert "small" not in set(out.stage)
    assert out.errors["small"] > 0 and c.errors_["small"] == out.errors["small"]
    assert np.mean(out.labels == y) == 1.0  # the big model took over


def test_malformed_answers_and_timeouts_fall_back():
    X, y = make_task(300)

    def slow(items):
        time.sleep(0.5)
        return small_model(items)

    c = Cascade(stages(), target_accuracy=0.9).fit(X, y)
    c.stages[1] = CallableStage(lambda its: [("odd", 1.5)] * len(its), name="small", cost=1.0, batched=True)
    out = c.predict_detailed(X[:50])
    assert out.errors == {"small": sum(1 for t in X[:50] if "refund" not in t)}
    c.stages[1] = CallableStage(slow, name="small", cost=1.0, batched=True, timeout=0.05)
    t0 = time.perf_counter()
    out = c.predict_detailed(X[:50])
    assert time.perf_counter() - t0 < 0.4 and out.errors.get("small")
    assert list(out.labels) == list(y[:50])


def test_last_stage_failing_uses_best_answer_seen_or_fallback_label():
    X, y = make_task(200)

    def dead(items):
        raise RuntimeError("down")

    c = Cascade(stages(), target_accuracy=0.99).fit(X, y)
    c.stages[2] = CallableStage(dead, name="big", cost=20.0, batched=True)
    out = c.predict_detailed(X)
    below = out.stage == FALLBACK
    assert below.any()
    assert all(lab in ("odd", "even") for lab in out.labels[below])  # the small model's answer
    c2 = Cascade([RegexStage([(r"zzz", "z")], name="r"), CallableStage(dead, name="big")], fallback_label="unknown")
    c2.thresholds_, c2.costs_, c2.errors_ = {"r": 1.0}, {"r": 0.0, "big": 1.0}, {}
    out = c2.predict_detailed(["a", "zzz"])
    assert list(out.labels) == ["unknown", "z"] and list(out.stage) == [FALLBACK, "r"]


class _Proba:
    """A model with predict_proba: over-confident by a factor of 3 in log space."""

    classes_ = np.array(["even", "odd"])

    def predict_proba(self, items):
        p = []
        for t in items:
            i = int(t.split()[0][1:])
            q = 0.75 if i % 2 else 0.25
            logit = 3 * np.log(q / (1 - q))
            pq = 1 / (1 + np.exp(-logit))
            p.append([1 - pq, pq])
        return np.array(p)


def test_temperature_calibration_softens_overconfident_model():
    rng = np.random.default_rng(0)
    X = [f"k{i} other" for i in range(4000)]
    # the truth agrees with the model's top class 75% of the time
    y = np.array([("odd" if i % 2 else "even") if rng.random() < 0.75 else ("even" if i % 2 else "odd")
                  for i in range(4000)], dtype=object)
    st = [ModelStage(_Proba(), name="m", cost=1.0), CallableStage(big_model, name="big", cost=5.0, batched=True)]
    c = Cascade(st, target_accuracy=0.5, calibrate=True).fit(X, y)
    assert c.temperatures_["m"] == pytest.approx(3.0, rel=0.1)
    conf = st[0].predict(X[:10]).confidence
    np.testing.assert_allclose(conf, 0.75, atol=0.01)


def test_save_load_round_trip(tmp_path):
    X, y = make_task(1000)
    rule = RuleStage(lambda t: "refund" if "refund" in t else None, name="rule", cost=0.0)
    st = [RegexStage([(r"\bplease\b", "refund")], name="rules", cost=0.01), rule,
          CallableStage(small_model, name="small", cost=1.0, batched=True),
          CallableStage(big_model, name="big", cost=20.0, batched=True)]
    c = Cascade(st, target_accuracy=0.95).fit(X, y)
    path = c.save(tmp_path / "c.json")
    assert json.loads(path.read_text())["version"] == 1  # no skops/torch stage: older leanscale reads it
    with pytest.raises(InvalidParameterError, match="'objects'.*'rule'"):
        Cascade.load(path)
    objects = {"rule": rule.fn, "small": small_model, "big": big_model}
    d = Cascade.load(path, objects=objects)
    assert d.thresholds_ == c.thresholds_ and d.costs_ == c.costs_
    np.testing.assert_allclose(d.frontier_.cost, c.frontier_.cost)
    assert list(d.predict(X)) == list(c.predict(X))
    with pytest.raises(InvalidParameterError, match="'objects'.*nope"):
        Cascade.load(path, objects={**objects, "nope": big_model})
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DataFormatError, match="bad.json.*not a saved leanscale cascade"):
        Cascade.load(tmp_path / "bad.json")


def test_get_set_params():
    c = Cascade(stages(), target_accuracy=0.9)
    assert c.get_params()["target_accuracy"] == 0.9
    assert c.set_params(delta=0.1) is c and c.delta == 0.1
    with pytest.raises(InvalidParameterError, match="Did you mean 'delta'"):
        c.set_params(deltaa=0.1)
    assert list(c.get_params()) == ["stages", "target_accuracy", "budget", "guarantee", "delta", "guarantee_split",
                                    "calibrate", "max_thresholds", "fallback_label", "seed", "deferral"]
    assert repr(Cascade([RuleStage(lambda t: None, name="r")], seed=3)) == \
        "Cascade(stages=[RuleStage(name='r', cost=None)], seed=3)"
    from sklearn.base import clone

    twin = clone(c.set_params(seed=5))
    assert twin is not c and twin.get_params()["seed"] == 5 and twin.delta == 0.1


def test_random_state_is_renamed_seed_and_works_for_one_release(tmp_path):
    """``Cascade(random_state=)`` -> ``seed=`` (as Router and the rest): the old name warns and
    still sets the seed (None included: unseeded), both names at once are refused, and files saved
    with "random_state" load without a warning."""
    X, y = make_task(200)
    with pytest.warns(FutureWarning, match="'random_state' parameter was renamed to 'seed'"):
        old = Cascade(stages(), target_accuracy=0.6, guarantee=True, random_state=3)
    new = Cascade(stages(), target_accuracy=0.6, guarantee=True, seed=3)
    assert old.seed == 3 and "random_state" not in old.get_params()
    assert list(old.fit(X, y).predict(X)) == list(new.fit(X, y).predict(X))
    assert old.guarantee_ == new.guarantee_
    with pytest.warns(FutureWarning, match="pass seed=None"):
        assert Cascade(stages(), random_state=None).seed is None
    with pytest.raises(InvalidParameterError, match="pass only 'seed'"):
        Cascade(stages(), random_state=1, seed=2)
    with pytest.warns(FutureWarning, match="renamed"):
        assert Cascade(stages()).set_params(random_state=4).seed == 4
    with pytest.warns(FutureWarning, match="renamed"):
        assert new.random_state == 3
    with pytest.raises(InvalidParameterError, match="'seed' parameter of Cascade"):
        Cascade(stages(), seed=-1).fit(X, y)

    # a file written before the rename stores "random_state"
    objects = {"small": small_model, "big": big_model}
    path = new.save(tmp_path / "c.json")
    doc = json.loads(path.read_text())
    assert doc["params"]["seed"] == 3 and "random_state" not in doc["params"]
    doc["params"]["random_state"] = doc["params"].pop("seed")
    path.write_text(json.dumps(doc))
    loaded = Cascade.load(path, objects=objects)  # no FutureWarning: filterwarnings = error
    assert loaded.seed == 3 and list(loaded.predict(X)) == list(new.predict(X))
    doc["params"]["seed"] = 3  # both names: refused
    path.write_text(json.dumps(doc))
    with pytest.raises(DataFormatError, match="'params' must be an object with keys among"):
        Cascade.load(path, objects=objects)
    doc["version"] = 3  # a file of a newer leanscale
    path.write_text(json.dumps(doc))
    with pytest.raises(DataFormatError, match="has version 3: it was written by a newer leanscale"):
        Cascade.load(path, objects=objects)


@pytest.mark.parametrize("kwargs, match", [
    ({"stages": []}, "The 'stages' parameter of Cascade must not be empty. Got 0 stages."),
    ({"stages": ["x"]}, "'stages'.*must be a sequence of Stage objects.*Got str 'x' at index 0"),
    ({"stages": RegexStage([("a", "x")])}, "'stages'.*Got RegexStage instead"),
    ({"stages": (s for s in stages())}, "'stages'.*Got generator instead"),
    ({"target_accuracy": 1.5}, "'target_accuracy'.*range \\[0, 1\\] or None. Got 1.5"),
    ({"target_accuracy": -0.1}, "'target_accuracy'"),
    ({"budget": -1}, "'budget'"),
    ({"delta": 0.0}, "'delta'.*range \\(0, 1\\)"),
    ({"target_accuracy": 0.9, "budget": 2.0}, "exclusive"),
    ({"guarantee": True}, "'target_accuracy'.*required when guarantee=True"),
])
def test_bad_parameters(kwargs, match):
    st = kwargs.pop("stages", stages())
    X, y = make_task(50)
    with pytest.raises(InvalidParameterError, match=match):
        Cascade(st, **kwargs).fit(X, y)


def test_bad_fit_inputs():
    X, y = make_task(50)
    with pytest.raises(InvalidParameterError, match="'X', 'y'.*same length"):
        Cascade(stages()).fit(X, y[:10])
    dup = [CallableStage(big_model, name="a"), CallableStage(big_model, name="a")]
    with pytest.raises(InvalidParameterError, match="repeated stage names"):
        Cascade(dup).fit(X, y)
    with pytest.raises(InvalidParameterError, match="stage 'small', which failed on the calibration data"):
        Cascade(stages(small=lambda its: 1 / 0)).fit(X, y)
    with pytest.raises(InvalidParameterError, match="'budget'.*below the cheapest"):
        Cascade(stages(), budget=0.0).fit(X, y)
    with pytest.raises(NotFittedError):
        Cascade(stages()).predict(X)
