"""Learned deferral (``Cascade(deferral="learned")``, :mod:`leanscale.cascade.deferral`)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from leanscale.cascade import CallableStage, Cascade, StageError, StageOutput
from leanscale.cascade import deferral as D
from leanscale.cascade.search import evaluate_config, pareto_mask
from leanscale.core.errors import DataFormatError, InvalidParameterError


def test_fit_logistic_solves_the_regularised_problem():
    rng = np.random.default_rng(0)
    F = rng.normal(size=(1500, 4)) * [1.0, 5.0, 0.1, 2.0] + [0, 3, 0, -1]
    t = (F[:, 0] - 0.5 * F[:, 3] + rng.normal(size=1500) > 0).astype(float)
    w, b = D.fit_logistic(F, t, l2=1e-3)
    # the optimum of mean log-loss + l2/2 |w_std|^2 on standardised columns: the gradient is zero there
    mu, sd = F.mean(0), F.std(0)
    Z = (F - mu) / sd
    w_std = w * sd
    q = 1 / (1 + np.exp(-(F @ w + b)))
    np.testing.assert_allclose(Z.T @ (q - t) / len(t) + 1e-3 * w_std, 0, atol=1e-9)
    assert abs(np.mean(q - t)) < 1e-7  # the intercept has a 1e-8 ridge (separable classes)
    assert w[0] > 0 and w[3] < 0 and abs(w[2]) < abs(w[0])  # the signal's direction
    # one class only: a constant at the smoothed rate
    w1, b1 = D.fit_logistic(F, np.ones(1500))
    assert not w1.any() and 1 / (1 + np.exp(-b1)) == pytest.approx(1500.5 / 1501)


def test_cross_fitted_scores_never_see_their_own_label():
    rng = np.random.default_rng(1)
    F = rng.normal(size=(400, 3))
    t = (F[:, 0] + rng.normal(size=400) > 0).astype(float)
    rows = np.flatnonzero(rng.random(400) < 0.8)
    s1, _, _ = D.cross_fitted_scores(F, t, rows, n_folds=5, seed=0)
    for i in rows[:5]:
        t2 = t.copy()
        t2[i] = 1 - t2[i]
        s2, _, _ = D.cross_fitted_scores(F, t2, rows, n_folds=5, seed=0)
        assert s2[i] == s1[i]  # its own label is in no model that scores it
        assert np.abs(s2 - s1).max() > 0  # ... but it does train the models of the other folds
    assert not s1[np.setdiff1d(np.arange(400), rows)].any()  # only the given rows are scored
    # more informative than chance: right answers score higher (AUC from ranks)
    r = np.argsort(np.argsort(s1[rows])) + 1.0
    pos = t[rows] == 1
    auc = (r[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum())
    assert auc > 0.7


def _brute_all_on(answered, score, correct, costs):
    m = answered.shape[0]
    cands = [list(np.unique(score[k][answered[k]])) + [1.0] for k in range(m - 1)]
    pts = []
    for thr in itertools.product(*cands):
        c, a, _ = evaluate_config(thr, answered, score, correct, costs)
        pts.append((c, a))
    pts = np.array(pts)
    keep = pareto_mask(pts[:, 0], np.round(pts[:, 1] * answered.shape[1]))
    return pts[keep]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frontier_all_on_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    m, n = 3, 40
    answered = rng.random((m, n)) < 0.8
    answered[-1] = True
    score = np.round(rng.random((m, n)) * 0.99, 1)  # ties included
    correct = (rng.random((m, n)) < 0.6) & answered
    costs = np.array([1.0, 3.0, 10.0])
    fr = D.frontier_all_on(answered, score, correct, costs)
    ref = _brute_all_on(answered, score, correct, costs)
    np.testing.assert_allclose(np.c_[fr.cost, fr.accuracy], ref)
    for thr, c, a in zip(fr.thresholds, fr.cost, fr.accuracy):  # every point is what its thresholds give
        assert None not in thr
        c2, a2, _ = evaluate_config(thr, answered, score, correct, costs)
        assert (c2, a2) == pytest.approx((c, a))


# ------------------------------------------------------------------------------- a known signal
# The cheap stage is right 95% of the time on short requests and 30% on long ones, and its
# confidence says nothing about which; the big one is right 90% of the time.

def _problem(n=6000, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 5, n)
    lengths = rng.integers(1, 40, n)
    X = [("x" * int(k)) + f"|{i}" for i, k in enumerate(lengths)]
    short = np.array([len(x) for x in X]) < 22
    c_ok = np.where(short, rng.random(n) < 0.95, rng.random(n) < 0.3)
    c_lab = np.where(c_ok, y, (y + 1) % 5)
    c_conf = rng.uniform(0.3, 1.0, n)
    b_lab = np.where(rng.random(n) < 0.9, y, (y + 2) % 5)
    row = {x: i for i, x in enumerate(X)}

    def cheap(items):
        return [(int(c_lab[row[x]]), float(c_conf[row[x]])) for x in items]

    def big(items):
        return [(int(b_lab[row[x]]), 0.9) for x in items]

    def stages():
        return [CallableStage(cheap, "cheap", cost=1.0, batched=True), CallableStage(big, "big", cost=10.0, batched=True)]

    return X, y, short, c_lab, b_lab, stages, (cheap, big)


def test_learned_deferral_beats_confidence_and_nears_the_oracle():
    X, y, short, c_lab, b_lab, stages, _ = _problem()
    cal, test = slice(0, 3000), slice(3000, None)
    target = 0.85
    res = {}
    for d in ("confidence", "learned"):
        c = Cascade(stages(), target_accuracy=target, deferral=d).fit(X[cal], y[cal].tolist())
        out = c.predict_detailed(X[test])
        res[d] = (float(out.cost.mean()), float(np.mean(out.labels == y[test])))
    # the oracle knows the signal: answer the short ones with the cheap stage, defer the rest
    oracle_pred = np.where(short, c_lab, b_lab)[test]
    oracle = (1 + 10 * (~short[test]).mean(), float(np.mean(oracle_pred == y[test])))
    assert oracle[1] > target
    assert res["learned"][0] < 0.7 * res["confidence"][0]  # much cheaper at the same target
    assert res["learned"][0] <= oracle[0] * 1.05
    assert abs(res["learned"][1] - target) < 0.02 and abs(res["confidence"][1] - target) < 0.02


def _three_stage_problem(n=1500, seed=3):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    X = [f"r{i}" + "y" * int(rng.integers(0, 20)) for i in range(n)]
    row = {x: i for i, x in enumerate(X)}
    outs = []
    for acc in (0.6, 0.75, 0.9):
        ok = rng.random(n) < acc
        lab = np.where(ok, y, (y + 1 + rng.integers(0, 3, n)) % 4)
        conf = np.clip(np.where(ok, 0.6, 0.4) + rng.normal(0, 0.2, n), 0.01, 0.99)
        feats = np.c_[conf * 0.5, rng.random(n)]
        outs.append((lab, conf, feats))

    def make(k, name, cost):
        lab, conf, feats = outs[k]

        class S(CallableStage):
            def _predict(self, items):
                ii = np.array([row[x] for x in items], dtype=np.int64)
                return StageOutput(lab[ii].astype(object), conf[ii], np.ones(len(ii), bool), feats[ii])

        return S(lambda items: None, name=name, cost=cost, batched=True)

    def stages():
        return [make(0, "a", 1.0), make(1, "b", 2.0), make(2, "c", 20.0)]

    return X, y, stages, row, outs


def test_learned_predict_applies_the_fitted_models():
    X, y, stages, row, outs = _three_stage_problem()
    c = Cascade(stages(), target_accuracy=0.85, deferral="learned", max_thresholds=64).fit(X[:1000], y[:1000].tolist())
    on = [k for k, nm in enumerate("ab") if c.thresholds_[nm] is not None]
    assert on, c.explain()
    assert set(c.deferral_) == {"ab"[k] for k in on}
    new = X[1000:]
    out = c.predict_detailed(new)
    ii = np.array([row[x] for x in new])
    lengths = np.log1p([len(x) for x in new])
    # manual: every request goes through the switched-on stages until one's score clears its threshold
    remaining = np.ones(len(new), bool)
    expect = np.full(len(new), "c", dtype=object)
    prev = []
    for k in on:
        name = "ab"[k]
        lab, conf, feats = outs[k]
        o = StageOutput(lab[ii].astype(object), conf[ii], np.ones(len(ii), bool), feats[ii])
        model = c.deferral_[name]
        assert list(model.earlier) == [p[0] for p in prev]
        score = model.score(D.deferral_features(o, [p[1] for p in prev], lengths))
        take = remaining & (score >= c.thresholds_[name])
        expect[take] = name
        remaining &= ~take
        prev.append((name, o))
    assert (out.stage == expect).all()
    assert (out.stage != "c").any()
    # the calibration numbers are those of the chosen setting on the cross-fitted scores
    cost, acc, _ = evaluate_config(tuple(c.thresholds_[k] for k in "ab"), *c._cal)
    assert (cost, acc) == pytest.approx((c.expected_cost_, c.expected_accuracy_))
    assert c.expected_accuracy_ >= 0.85


def test_learned_scores_of_a_request_ignore_its_own_label():
    X, y, stages, _, _ = _three_stage_problem(n=600)
    st = stages()
    outs = [s.predict(X) for s in st]
    lengths = np.log1p([len(x) for x in X])
    costs = [1.0, 2.0, 20.0]

    def scores(labels):
        correct = np.stack([o.labels == labels for o in outs])
        return D.learned_frontier(outs, correct, costs, lengths, ["a", "b", "c"], seed=0, max_thresholds=16).scores

    s1 = scores(y.astype(object))
    y2 = y.copy()
    y2[7] = (y2[7] + 1) % 4
    s2 = scores(y2.astype(object))
    for subset in s1:
        np.testing.assert_array_equal(s1[subset][:, 7], s2[subset][:, 7])
    assert any(np.abs(s1[s] - s2[s]).max() > 0 for s in s1)


def test_learned_cascade_saves_and_loads(tmp_path):
    X, y, stages, _, _ = _three_stage_problem(n=900)
    c = Cascade(stages(), target_accuracy=0.85, deferral="learned", max_thresholds=64).fit(X[:600], y[:600].tolist())
    path = c.save(tmp_path / "c.json")
    st = stages()
    objects = {s.name: s.fn for s in st}
    # the stages are CallableStage subclasses: load rebuilds CallableStages around the objects given
    loaded = Cascade.load(path, objects=objects)
    loaded.stages = st
    np.testing.assert_array_equal(loaded.predict_detailed(X[600:]).stage, c.predict_detailed(X[600:]).stage)
    assert loaded.deferral == "learned"
    doc = json.loads(path.read_text())
    name = next(iter(doc["deferral"]))
    doc["deferral"][name]["coef"] = doc["deferral"][name]["coef"][:-1]
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(DataFormatError, match=r"'deferral'.*coef"):
        Cascade.load(tmp_path / "bad.json", objects=objects)


def test_default_is_raw_confidence_and_files_stay_as_before(tmp_path):
    X, y, stages, _, _ = _three_stage_problem(n=400)
    c = Cascade(stages(), target_accuracy=0.8).fit(X, y.tolist())
    assert c.deferral == "confidence" and c.deferral_ is None
    doc = json.loads(c.save(tmp_path / "c.json").read_text())
    assert "deferral" not in doc["params"] and "deferral" not in doc


def test_bad_inputs():
    X, y, stages, _, _ = _three_stage_problem(n=200)
    with pytest.raises(InvalidParameterError, match="'deferral'.*'learned'"):
        Cascade(stages(), deferral="magic").fit(X, y.tolist())
    with pytest.raises(InvalidParameterError, match="'deferral'.*guarantee"):
        Cascade(stages(), target_accuracy=0.8, guarantee=True, deferral="learned").fit(X, y.tolist())
    with pytest.raises(InvalidParameterError, match="'F'.*3 columns"):
        D.DeferralModel(np.zeros(3), 0.0).score(np.zeros((2, 4)))


def test_a_stage_whose_features_change_width_falls_through():
    X, y, stages, _, _ = _three_stage_problem(n=600)
    c = Cascade(stages(), target_accuracy=0.85, deferral="learned", max_thresholds=64).fit(X[:400], y[:400].tolist())
    name = next(iter(c.deferral_))
    s = next(s for s in c.stages if s.name == name)
    inner = s._predict
    s._predict = lambda items: inner(items)._replace(features=None)
    out = c.predict_detailed(X[400:])
    assert out.errors.get(name) == 200 and "feature columns" in out.reasons[name]
    assert (out.stage != name).all() and out.answered.all()


def test_stage_features_are_checked():
    bad = CallableStage(lambda items: None, name="x", batched=True)
    bad._predict = lambda items: StageOutput(np.array(["a"] * len(items), dtype=object), np.ones(len(items)),
                                             np.ones(len(items), bool), np.ones((len(items) + 1, 2)))
    with pytest.raises(StageError, match="features of shape"):
        bad.predict(["p", "q"])
