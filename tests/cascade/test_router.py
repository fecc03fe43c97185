import doctest
import json

import numpy as np
import pytest

from leanscale.cascade import router as router_mod
from leanscale.cascade.router import Router, evaluate_router, quality_curve
from leanscale.core.errors import InvalidParameterError, NotFittedError
from leanscale.core.persistence import load_fitted

COSTS = {"weak": 1.0, "strong": 20.0}


def marker_task(n, seed, marker="quantum", share=0.25):
    """Random filler texts; a ``share`` of them contain the marker word. The weak model fails
    exactly on the marked texts; the strong model is right except on the unmarked texts that
    contain "zebra" (about 10% of them), where only the weak model is right."""
    rng = np.random.default_rng(seed)
    filler = [f"w{i}" for i in range(200)]
    marked = rng.random(n) < share
    zebra = ~marked & (rng.random(n) < 0.1)
    texts = []
    for m, z in zip(marked, zebra, strict=True):
        words = list(rng.choice(filler, size=8))
        if m or z:
            words.insert(int(rng.integers(9)), marker if m else "zebra")
        texts.append(" ".join(words))
    weak = ~marked
    strong = ~zebra
    return texts, marked, weak, strong


@pytest.fixture(scope="module")
def fitted():
    texts, _, weak, strong = marker_task(600, seed=0)
    return Router().fit(texts, {"weak": weak, "strong": strong}, costs=COSTS)


def test_doctests():
    assert doctest.testmod(router_mod, raise_on_error=False).failed == 0


def test_fit_learned_attributes(fitted):
    r = fitted
    assert r.models_ == ["weak", "strong"]
    assert r.costs_ == COSTS
    assert (r.weak_, r.strong_) == ("weak", "strong")
    assert r.coef_.shape == (2, r.n_features_in_) and r.intercept_.shape == (2,)
    assert r.vectorizer_ is not None and all(r.converged_.values())
    assert 0.7 < r.base_rates_["weak"] < 0.8 and 0.88 < r.base_rates_["strong"] < 0.96


def test_route_sends_marked_texts_to_strong_first(fitted):
    texts, marked, _, _ = marker_task(400, seed=1)
    p = fitted.predict_correct(texts)
    assert set(p) == {"weak", "strong"}
    assert p["weak"][marked].max() < p["weak"][~marked].min()
    f = marked.mean()
    routes = fitted.route(texts, strong_fraction=f)
    assert routes.shape == (400,)
    assert set(routes.tolist()) == {"weak", "strong"}
    assert (routes == "strong").sum() == round(f * 400)
    assert (routes[marked] == "strong").all()  # every marked text, and only those
    half = fitted.route(texts, strong_fraction=f / 2)
    assert (half == "strong").sum() == round(f * 200)
    assert marked[half == "strong"].all()
    assert (fitted.route(texts, strong_fraction=0.0) == "weak").all()
    assert (fitted.route(texts, strong_fraction=1.0) == "strong").all()


def test_router_apgr_near_oracle_far_above_random(fitted):
    texts, marked, weak, strong = marker_task(400, seed=2)
    res = evaluate_router(fitted, texts, weak, strong)
    assert res["random"]["apgr"] == pytest.approx(0.5, abs=1e-9)
    assert res["apgr"] > 0.85
    assert res["oracle"]["apgr"] - res["apgr"] < 0.05
    # the gap is closed once the marked texts (a quarter) go to strong
    assert res["cpt_80"] <= marked.mean() + 0.01
    assert res["random"]["cpt_50"] == pytest.approx(0.5, abs=1e-9)
    assert res["random"]["cpt_80"] == pytest.approx(0.8, abs=1e-9)
    np.testing.assert_allclose(res["cost"], 1.0 + 19.0 * res["strong_fraction"])
    np.testing.assert_allclose(res["quality"][[0, -1]], [weak.mean(), strong.mean()])


def test_evaluate_router_hand_computed_tiny_case():
    # gains strong - weak = [0, 1, 1, 0]; q_weak = 0.25, q_strong = 0.75
    weak = [True, False, False, False]
    strong = [True, True, True, False]
    scores = [0.9, 0.8, 0.1, 0.5]  # order r0 (0), r1 (+1), r3 (0), r2 (+1): PGR at k/4 = 0, 0, .5, .5, 1
    for n_points in (5, 101):
        res = evaluate_router(scores, None, weak, strong, n_points=n_points)
        assert res["quality_weak"] == 0.25 and res["quality_strong"] == 0.75
        assert res["apgr"] == pytest.approx(0.25 * (0 + 0.25 + 0.5 + 0.75), abs=1e-12)  # 0.375
        assert res["cpt_50"] == pytest.approx(0.5, abs=1e-12)
        assert res["cpt_80"] == pytest.approx(0.75 + 0.6 * 0.25, abs=1e-12)  # 0.9
        # oracle: r1, r2 first -> PGR 0, .5, 1, 1, 1
        assert res["oracle"]["apgr"] == pytest.approx(0.75, abs=1e-12)
        assert res["oracle"]["cpt_50"] == pytest.approx(0.25, abs=1e-12)
        assert res["oracle"]["cpt_80"] == pytest.approx(0.4, abs=1e-12)
        assert res["random"]["apgr"] == pytest.approx(0.5, abs=1e-12)
    res = evaluate_router(scores, None, weak, strong, n_points=5)
    np.testing.assert_allclose(res["pgr"], [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(res["quality"], [0.25, 0.25, 0.5, 0.5, 0.75])
    assert res["auc"] == pytest.approx(0.25 * (0.25 + 0.375 + 0.5 + 0.625))
    assert res["cost"] is None
    res = evaluate_router(scores, None, weak, strong, costs=(1, 3), n_points=5, cpt_levels=(0.25,))
    np.testing.assert_allclose(res["cost"], [1, 1.5, 2, 2.5, 3])
    assert res["cpt_25"] == pytest.approx(0.375)


def test_random_router_is_exactly_half_and_ties_are_expected_values():
    rng = np.random.default_rng(3)
    weak, strong = rng.random(37) < 0.4, rng.random(37) < 0.7
    assert weak.mean() != strong.mean()
    res = evaluate_router(rng.random(37), None, weak, strong)
    assert abs(res["random"]["apgr"] - 0.5) < 1e-9
    np.testing.assert_allclose(res["random"]["pgr"], res["strong_fraction"], atol=1e-12)
    # a constant score is the random router; the oracle is never worse than the router
    const = evaluate_router(np.ones(37), None, weak, strong)
    assert const["apgr"] == pytest.approx(0.5, abs=1e-12)
    assert np.all(res["oracle"]["quality"] >= res["quality"] - 1e-12)
    # quality_curve: ties average the gain
    q = quality_curve(np.array([1.0, 1.0]), np.array([False, False]), np.array([True, False]))
    np.testing.assert_allclose(q, [0.0, 0.25, 0.5])
    # equal weak and strong quality: PGR undefined
    same = evaluate_router([0.1, 0.2], None, [True, False], [False, True])
    assert np.isnan(same["apgr"]) and np.isnan(same["cpt_50"]) and np.isnan(same["pgr"]).all()


def test_budget_conversion(fitted):
    texts, *_ = marker_task(200, seed=4)
    assert fitted.fraction_for_budget(1.0) == 0.0
    assert fitted.fraction_for_budget(5.75) == pytest.approx(0.25)
    assert fitted.fraction_for_budget(100.0) == 1.0
    for budget in (1.0, 3.0, 5.75, 10.0, 20.0):
        routes = fitted.route(texts, budget=budget)
        mean_cost = np.mean([COSTS[m] for m in routes])
        assert mean_cost <= budget + 1e-12
        f = fitted.fraction_for_budget(budget)
        # the largest number of strong calls the budget affords
        assert (routes == "strong").sum() == int(np.floor(f * 200 + 1e-9))
    assert np.array_equal(fitted.route(texts[:100], budget=5.75), fitted.route(texts[:100], strong_fraction=0.25))
    with pytest.raises(InvalidParameterError, match="'budget'.*cheapest"):
        fitted.route(texts, budget=0.5)


def test_three_models_lagrangian_budget():
    rng = np.random.default_rng(5)
    n = 400
    filler = [f"w{i}" for i in range(100)]
    kind = rng.integers(3, size=n)  # 0 easy, 1 medium ("algebra"), 2 hard ("topology")
    texts = [" ".join(list(rng.choice(filler, size=6)) + [("", "algebra", "topology")[k]]).strip() for k in kind]
    outcomes = {"small": kind == 0, "medium": kind <= 1, "large": np.ones(n, dtype=bool)}
    costs = {"small": 1.0, "medium": 4.0, "large": 10.0}
    r = Router(C=10.0).fit(texts, outcomes, costs)
    assert (r.weak_, r.strong_) == ("small", "large")
    accs = []
    for budget in (1.0, 2.0, 3.0, 4.0, 5.0, 10.0):
        routes = r.route(texts, budget=budget)
        mean_cost = np.mean([costs[m] for m in routes])
        assert budget - 0.05 <= mean_cost <= budget + 1e-9  # the budget is met and (nearly) used
        accs.append(np.mean([outcomes[m][i] for i, m in enumerate(routes)]))
    assert accs == sorted(accs) and accs[0] == pytest.approx((kind == 0).mean()) and accs[-2] >= 0.99
    # a budget of 4: easy -> small, medium -> medium, the rest of the money on hard requests
    mid = r.route(texts, budget=4.0)
    assert (mid[kind == 0] == "small").all() and (mid[kind == 1] == "medium").all()
    assert set(mid[kind == 2].tolist()) == {"small", "large"}
    assert (r.route(texts, budget=1.0) == "small").all()
    assert (r.route(texts, budget=10.0) == "large").all()  # lambda = 0: the most likely right model
    with pytest.raises(InvalidParameterError, match="'strong_fraction'.*two models"):
        r.route(texts, strong_fraction=0.5)


def test_state_round_trip_and_save_load(fitted, tmp_path):
    texts, *_ = marker_task(100, seed=6)
    meta, arrays = fitted.get_state()
    json.dumps(meta)
    assert set(arrays) == {"coef", "intercept", "idf"}
    clone = Router.from_state(meta, arrays)
    p0, p1 = fitted.predict_correct(texts), clone.predict_correct(texts)
    for name in p0:
        assert np.array_equal(p0[name], p1[name])
    folder = fitted.save(tmp_path / "router")
    for loaded in (Router.load(folder), load_fitted(folder)):
        assert isinstance(loaded, Router)
        assert loaded.costs_ == fitted.costs_ and loaded.models_ == fitted.models_
        assert np.array_equal(loaded.route(texts, strong_fraction=0.3), fitted.route(texts, strong_fraction=0.3))
        assert np.array_equal(loaded.predict_gain(texts), fitted.predict_gain(texts))


def test_callable_features_and_constant_outcomes():
    texts, marked, weak, _ = marker_task(200, seed=7)

    def feats(batch):
        return np.array([[float("quantum" in t), 1.0] for t in batch])

    r = Router(features=feats).fit(texts, {"weak": weak, "strong": np.ones(200, dtype=bool)}, COSTS)
    p = r.predict_correct(texts)
    assert np.allclose(p["strong"], 200.5 / 201)  # always right: smoothed constant
    assert (r.route(texts, strong_fraction=marked.mean())[marked] == "strong").all()
    with pytest.raises(InvalidParameterError, match="callable"):
        r.get_state()


def test_bad_inputs(fitted):
    texts, _, weak, strong = marker_task(50, seed=8)
    with pytest.raises(InvalidParameterError, match="'costs'.*'medium'.*not in 'outcomes'.*'weak', 'strong'"):
        Router().fit(texts, {"weak": weak, "strong": strong}, {"weak": 1.0, "strong": 5.0, "medium": 2.0})
    with pytest.raises(InvalidParameterError, match="no cost for model 'strong'"):
        Router().fit(texts, {"weak": weak, "strong": strong}, {"weak": 1.0})
    with pytest.raises(InvalidParameterError, match="'texts' and 'outcomes\\['strong'\\]'.*same length"):
        Router().fit(texts, {"weak": weak, "strong": strong[:-1]}, COSTS)
    with pytest.raises(InvalidParameterError, match="at least 2 models"):
        Router().fit(texts, {"weak": weak}, {"weak": 1.0})
    with pytest.raises(InvalidParameterError, match="cost > 0"):
        Router().fit(texts, {"weak": weak, "strong": strong}, {"weak": 0.0, "strong": 5.0})
    with pytest.raises(InvalidParameterError, match="0/1"):
        Router().fit(texts, {"weak": weak.astype(int) * 2, "strong": strong}, COSTS)
    with pytest.raises(InvalidParameterError, match="'features' parameter of Router must be one of 'math', 'minilm', "
                                                    "'minilm\\+math', .*'tfidf\\+stats\\+math' or a callable. Got 'bert'"):
        Router(features="bert").fit(texts, {"weak": weak, "strong": strong}, COSTS)
    with pytest.raises(InvalidParameterError, match="'ngram_range' parameter of Router must be a pair"):
        Router(ngram_range=(2, 1)).fit(texts, {"weak": weak, "strong": strong}, COSTS)
    with pytest.raises(NotFittedError):
        Router().route(texts, strong_fraction=0.5)
    with pytest.raises(InvalidParameterError, match="Exactly one.*Got both"):
        fitted.route(texts, strong_fraction=0.5, budget=5.0)
    with pytest.raises(InvalidParameterError, match="Exactly one.*Got neither"):
        fitted.route(texts)
    with pytest.raises(InvalidParameterError, match="'strong_fraction'.*\\[0, 1\\]"):
        fitted.route(texts, strong_fraction=1.5)
    with pytest.raises(InvalidParameterError, match="same length"):
        evaluate_router([0.1, 0.2, 0.3], None, [True, False], [True, True])
    with pytest.raises(InvalidParameterError, match="'texts'.*required"):
        evaluate_router(fitted, None, weak, strong)
    with pytest.raises(InvalidParameterError, match="'texts'.*None"):
        evaluate_router(np.zeros(50), texts, weak, strong)
    with pytest.raises(InvalidParameterError, match="'costs'.*'weak'"):
        evaluate_router(np.zeros(50), None, weak, strong, costs={"wek": 1.0, "strong": 2.0})
    with pytest.raises(InvalidParameterError, match="'n_points'"):
        evaluate_router(np.zeros(50), None, weak, strong, n_points=1)


def test_parameters_follow_the_estimator_contract(fitted):
    from sklearn.base import clone

    r = Router(C=0.5, max_features=100)
    assert repr(r) == "Router(C=0.5, max_features=100)"
    assert r.get_params() == {"features": "tfidf", "C": 0.5, "seed": 0, "max_features": 100, "ngram_range": (1, 2),
                              "learner": "logistic", "static_path": None, "distill": 0.0}
    assert r.set_params(seed=2) is r and r.seed == 2
    with pytest.raises(InvalidParameterError, match="Did you mean 'seed'"):
        r.set_params(sed=1)
    twin = clone(fitted)
    assert twin.get_params() == fitted.get_params() and not hasattr(twin, "coef_")
    meta, _ = fitted.get_state()
    assert meta["params"] == {**fitted.get_params(), "ngram_range": [1, 2]}
