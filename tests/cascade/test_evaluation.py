"""leanscale.cascade.evaluation: split, built-in stages, fit + test, the eval record, saved-cascade evaluation.

Synthetic tickets (rules and TF-IDF only, declared costs): fast and deterministic."""

from __future__ import annotations

import doctest
import json
import random

import numpy as np
import pytest

from leanscale.cascade import Cascade, RuleStage
from leanscale.cascade import evaluation as ev
from leanscale.cascade.evaluation import (
    TextCascadeFit,
    build_text_stages,
    eval_record_path,
    evaluate_cascade,
    evaluate_saved_cascade,
    fit_text_cascade,
    format_evaluation,
    recorded_test_split,
    save_text_cascade,
    split_labelled,
    unseen_label_warnings,
)
from leanscale.core.errors import DataFormatError, InvalidParameterError

KEYWORDS = {"billing": ["refund", "invoice"], "tech": ["crash", "error"], "sales": ["price", "quote"]}
FILLER = ["please", "help", "me", "with", "my", "account", "today", "thanks", "the", "of", "order", "now"]
COSTS = {"rules": 0.001, "tfidf": 0.05}


def tickets(n=300, seed=0, noise=0.05):
    """Label i % 3; 85% of the texts hold one of the label's keywords; 5% of the labels are random."""
    rng = random.Random(seed)
    names = list(KEYWORDS)
    texts, labels = [], []
    for i in range(n):
        lab = names[i % 3]
        words = rng.sample(FILLER, 5)
        if rng.random() < 0.85:
            words.insert(rng.randrange(6), rng.choice(KEYWORDS[lab]))
        if rng.random() < noise:
            lab = rng.choice(names)
        texts.append(" ".join(words))
        labels.append(lab)
    return texts, np.asarray(labels, dtype=object)


@pytest.fixture(scope="module")
def data():
    return tickets()


@pytest.fixture(scope="module")
def fitted(data):
    texts, y = data
    return fit_text_cascade(texts, y, stages=("rules", "tfidf"), min_precision=0.8, costs=COSTS, seed=0)


def test_doctests():
    assert doctest.testmod(ev, raise_on_error=False).failed == 0


# ---------------------------------------------------------------------------------------- split


def test_split_is_disjoint_stratified_and_deterministic(data):
    _, y = data
    s = split_labelled(y, seed=1)
    assert (len(s.train), len(s.calibration), len(s.test)) == (180, 60, 60)
    assert sorted(np.concatenate([s.train, s.calibration, s.test]).tolist()) == list(range(300))
    assert s.n_examples == 300 and s.n_classes == 3 and s.max_examples is None
    for part in (s.train, s.calibration, s.test):
        assert len(set(y[part].tolist())) == 3  # every label in every part
    again = split_labelled(list(y), seed=1)  # a list of labels gives the same split as an array
    assert all(np.array_equal(a, b) for a, b in zip((s.train, s.calibration, s.test),
                                                      (again.train, again.calibration, again.test)))
    other = split_labelled(y, seed=2)
    assert not np.array_equal(s.test, other.test)


def test_split_subsample_is_stratified_and_indexes_the_full_data(data):
    _, y = data
    s = split_labelled(y, max_examples=60, seed=0)
    assert len(s.pool) == 60 and s.n_examples == 300 and s.max_examples == 60
    assert sorted(np.concatenate([s.train, s.calibration, s.test]).tolist()) == sorted(s.pool.tolist())
    full = {lab: int(np.sum(y == lab)) for lab in KEYWORDS}
    for lab, count in full.items():  # each label in proportion (+-1) to its share of the full data
        assert abs(int(np.sum(y[s.pool] == lab)) - 60 * count / 300) <= 1
    assert split_labelled(y, max_examples=1000).pool.tolist() == list(range(300))  # more than there is: all


@pytest.mark.parametrize("labels,kwargs,match", [
    (["a"] * 20, {}, r"at least 10 examples of at least 2 labels.*20 example\(s\) of 1 label"),
    (["a", "b"] * 4, {}, r"Got 8 example\(s\) of 2 label"),
    (["a", "b"] * 10, {"max_examples": 5}, "'max_examples' parameter of split_labelled"),
    (["a", "b"] * 10, {"seed": -1}, "'seed' parameter of split_labelled"),
    (np.zeros((10, 2)), {}, "1-d sequence"),
])
def test_split_bad_input(labels, kwargs, match):
    with pytest.raises(InvalidParameterError, match=match):
        split_labelled(labels, **kwargs)


# --------------------------------------------------------------------------------------- stages


def test_build_stages_in_order_with_declared_costs_and_a_log(data):
    texts, y = data
    lines = []
    stages = build_text_stages(["rules", "tfidf"], texts, y, min_precision=0.8, costs={"tfidf": 0.5}, log=lines.append)
    assert [s.name for s in stages] == ["rules", "tfidf"]
    assert stages[1].cost == 0.5 and stages[0].cost is None  # rules measured later
    assert lines[0].startswith("rules: ") and "rule(s) mined (precision lower bound >= 0.8)" in lines[0]
    assert lines[1].startswith("tfidf: TF-IDF + logistic regression trained in ")
    assert stages[1].predict(["I want a refund", "the app shows an error"]).labels.tolist() == ["billing", "tech"]


def test_rules_are_left_out_with_a_note_when_none_passes(data):
    texts, y = data
    lines = []
    stages = build_text_stages(["rules", "tfidf"], texts, y, min_precision=1.0, log=lines.append)
    assert [s.name for s in stages] == ["tfidf"]
    assert lines[0].startswith("rules: no keyword rule reached precision 1.0") and "stage skipped" in lines[0]
    with pytest.raises(InvalidParameterError, match="left no stage to run: no rule passed min_precision=1.0"):
        fit_text_cascade(texts, y, stages=["rules"], min_precision=1.0)


@pytest.mark.parametrize("kwargs,match", [
    ({"stages": ["rules", "bert"]}, "'stages' parameter of build_text_stages must be one of"),
    ({"stages": ["tfidf", "tfidf"]}, "repeats tfidf"),
    ({"stages": "tfidf"}, "must be a sequence of names"),
    ({"stages": []}, "at least one of"),
    ({"costs": {"rules": 1.0}}, "'costs' parameter of build_text_stages must be one of 'tfidf'"),
    ({"costs": {"tfidf": -1.0}}, r"costs\['tfidf'\]"),
    ({"min_precision": 0.0}, "'min_precision'"),
])
def test_build_stages_bad_arguments(data, kwargs, match):
    texts, y = data
    args = {"stages": ["tfidf"], **kwargs}
    with pytest.raises(InvalidParameterError, match=match):
        build_text_stages(args.pop("stages"), texts[:30], y[:30], **args)


# ------------------------------------------------------------------------------------------ fit


def test_fit_trains_on_train_calibrates_on_calibration_and_reports_test(data, fitted):
    texts, y = data
    assert isinstance(fitted, TextCascadeFit)
    c, s = fitted.cascade, fitted.split
    assert [st.name for st in c.stages] == ["rules", "tfidf"] and c.costs_ == COSTS
    assert fitted.stages_requested == ["rules", "tfidf"] and fitted.costs_declared == COSTS
    assert fitted.settings == {"target_accuracy": None, "budget": None, "guarantee": False, "delta": 0.05,
                               "calibrate": False, "min_precision": 0.8, "deferral": "confidence"}
    # the default split is split_labelled(labels, seed=seed)
    assert np.array_equal(s.test, split_labelled(y, seed=0).test)
    # the test summary is the cascade measured on exactly the test split
    te = s.test
    out = c.predict_detailed([texts[i] for i in te])
    assert fitted.test_summary["n"] == len(te)
    assert fitted.test_summary["accuracy"] == pytest.approx(float(np.mean(out.labels == y[te])), abs=1e-12)
    assert fitted.test_summary["accuracy"] > 0.75
    assert fitted.test_summary["mean_cost"] == pytest.approx(float(out.cost.mean()))
    # the same data and seed give the same cascade; the thresholds were chosen on calibration only
    again = fit_text_cascade(texts, y, stages=("rules", "tfidf"), min_precision=0.8, costs=COSTS, seed=0)
    assert again.test_summary["accuracy"] == fitted.test_summary["accuracy"]
    assert again.cascade.thresholds_ == c.thresholds_


def test_fit_bad_arguments(data):
    texts, y = data
    with pytest.raises(InvalidParameterError, match="one label per text"):
        fit_text_cascade(texts, y[:-1], stages=["tfidf"])
    with pytest.raises(InvalidParameterError, match="'split' parameter of fit_text_cascade must be a split of these"):
        fit_text_cascade(texts[:100], y[:100], stages=["tfidf"], split=split_labelled(y))
    with pytest.raises(InvalidParameterError, match="TextSplit"):
        fit_text_cascade(texts, y, stages=["tfidf"], split=(1, 2, 3))
    with pytest.raises(InvalidParameterError, match="'texts' parameter"):
        fit_text_cascade("one text", y, stages=["tfidf"])


# -------------------------------------------------------------------------------------- evaluate


def test_evaluate_counts_and_reports_requests_no_stage_answered():
    stage = RuleStage(lambda t: "refund" if "refund" in t else None, name="rules", cost=1.0)
    cascade = Cascade([stage]).fit(["refund me", "refund now", "hello", "refund pls"],
                                   ["refund", "refund", "other", "refund"])
    s = evaluate_cascade(cascade, ["refund a", "hi there", "hello", "refund b"], ["refund", "other", "other", "refund"])
    assert s["accuracy"] == 0.5 and s["unanswered"] == 2
    assert s["stages"]["rules"] == {"n": 2, "fraction": 0.5, "accuracy": 1.0}
    assert s["stages"]["fallback"] == {"n": 2, "fraction": 0.5, "accuracy": 0.0}
    assert any("2 of 4 requests got no answer from any stage" in w for w in s["warnings"])
    text = format_evaluation(s, "held out")
    assert text.startswith("held out: 4 examples\n  accuracy 0.5000 at mean cost 1 per request")
    assert "fallback" in text and "50.0%" in text and "frontier:" in text


# --------------------------------------------------------------------------- eval record, saved


def test_save_writes_the_cascade_and_a_record_tied_to_it(tmp_path, data, fitted):
    texts, y = data
    path = tmp_path / "c.json"
    record = save_text_cascade(fitted, path, source="tickets", text_column="body", label_column="queue")
    assert record == eval_record_path(path) == tmp_path / "c.eval.json"
    doc = json.loads(record.read_text())
    assert doc["format"] == ev.EVAL_FORMAT and doc["cascade"] == "c.json" and len(doc["cascade_sha256"]) == 64
    assert doc["data"]["source"] == "tickets" and doc["data"]["n_examples"] == 300
    assert doc["indices"]["test"] == fitted.split.test.tolist()
    assert doc["stages"] == ["rules", "tfidf"] and doc["fractions"] == [0.6, 0.2, 0.2]
    assert doc["test"]["accuracy"] == fitted.test_summary["accuracy"]
    assert Cascade.load(path).predict(["I want a refund"]).tolist() == ["billing"]

    # the same data: only the recorded test split, with the same numbers
    idx, note, warnings = recorded_test_split(path, texts, y)
    assert idx == fitted.split.test.tolist() and "the test split recorded in c.eval.json" == note and warnings == []
    s = evaluate_saved_cascade(path, texts, y)
    assert s["n"] == len(fitted.split.test) and s["accuracy"] == fitted.test_summary["accuracy"]
    assert s["examples_used"] == note
    assert evaluate_saved_cascade(path, texts, y, all_examples=True)["n"] == 300
    # other data (one label changed): every example, said so
    y2 = y.copy()
    y2[fitted.split.test[0]] = "sales" if y2[fitted.split.test[0]] != "sales" else "tech"
    idx, note, _ = recorded_test_split(path, texts, y2)
    assert idx is None and "not the ones recorded" in note
    assert evaluate_saved_cascade(path, texts, y2)["n"] == 300

    # another save of the cascade with the old record: refused, not silently paired
    def billing(text):
        return "billing"

    Cascade([RuleStage(billing, name="r", cost=1.0)]).fit(texts[:10], y[:10]).save(path)
    with pytest.raises(DataFormatError, match="belongs to another save of") as info:
        evaluate_saved_cascade(path, texts, y, objects={"r": billing})
    assert "all_examples=True" in str(info.value)


def test_missing_or_unreadable_record_uses_every_example_with_a_warning(tmp_path, data, fitted):
    texts, y = data
    path = tmp_path / "c.json"
    fitted.cascade.save(path)
    idx, note, warnings = recorded_test_split(path, texts, y)
    assert idx is None and "no c.eval.json beside the cascade" in note and "including any it was" in warnings[0]
    eval_record_path(path).write_text("{not json")
    idx, note, warnings = recorded_test_split(path, texts, y)
    assert idx is None and "cannot be read" in note and len(warnings) == 1
    s = evaluate_saved_cascade(path, texts, y)
    assert s["n"] == 300 and "cannot be read" in s["warnings"][0]


def test_unseen_labels_are_reported_and_all_unseen_is_refused(tmp_path, data, fitted):
    texts, y = data
    c = fitted.cascade
    assert unseen_label_warnings(c, y) == []
    y2 = np.where(np.arange(len(y)) % 3 == 0, "refunds", y).astype(object)
    (w,) = unseen_label_warnings(c, y2)
    assert w.startswith("100 of 300 examples (33.3%) have labels the cascade never saw") and "'refunds'" in w
    with pytest.raises(DataFormatError, match=r"holds no label the cascade knows.*'x0', 'x1'"):
        unseen_label_warnings(c, [f"x{i % 2}" for i in range(10)])
    path = tmp_path / "c.json"
    save_text_cascade(fitted, path, source="tickets")
    s = evaluate_saved_cascade(path, texts, y2, all_examples=True)
    assert s["examples_used"] == "every example (--all)" and any("'refunds'" in x for x in s["warnings"])
    with pytest.raises(InvalidParameterError, match="'cascade' parameter of evaluate_saved_cascade"):
        evaluate_saved_cascade(path, texts, y, cascade="c.json")
