"""Bad input to leanscale.pruning (DataPruner, select, scores, ActiveLearner, InfoBatch, data files)
and its CLIs: a clear LeanscaleError naming the parameter or the file, checked before any
training; saved state is untrusted (a damaged entry is recomputed or refused, never a traceback);
a manifest says what was done, not what was asked."""

import copy
import io
import json
import os
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from leanscale.cli.main import main
from leanscale.core.errors import DataFormatError, DataNotFoundError, InvalidParameterError, LeanscaleError
from leanscale.models.encoders import embed_with
from leanscale.models.linear import SoftmaxRegression
from leanscale.pruning import (
    ActiveLearner,
    DataPruner,
    ForgettingTracker,
    InfoBatch,
    collect_probs,
    grand_scores,
    load_pruning_data,
    select,
)
from leanscale.core.io import read_npy

RNG = np.random.default_rng(0)
X = RNG.normal(size=(40, 3))
Y = np.arange(40) % 2
X_NAN = X.copy()
X_NAN[7, 2] = np.nan


class Counting:
    """A model_fn / train_fn that records calls: nothing may be trained before the inputs are checked."""

    def __init__(self):
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1
        if args:  # ActiveLearner train_fn(X, y)
            return lambda X: np.full((len(X), 2), 0.5)
        return nn.Linear(3, 2)


# ----------------------------------------------------------------------------- the issue's cases


def test_model_fn_instance_is_refused_at_construction_and_fit():
    message = (r"The 'model_fn' parameter of DataPruner must be a callable returning a new nn.Module .*got an "
               r"nn.Module instance \(Linear\) -- pass the class or a lambda")
    with pytest.raises(InvalidParameterError, match=message):
        DataPruner(model_fn=nn.Linear(3, 2))
    pruner = DataPruner(score_epochs=0.5)
    pruner.set_params(model_fn=nn.Linear(3, 2))
    with pytest.raises(InvalidParameterError, match=message):
        pruner.fit(X, Y)
    # the class itself and a lambda are fine
    assert len(DataPruner(model_fn=lambda: nn.Linear(3, 2), score_epochs=0.5, keep=10).fit_transform(X, Y)) == 10


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("metric", ["el2n", "forgetting", "prototypes", "grand"])
def test_non_finite_x_is_refused_before_any_training(metric, bad):
    x = X.copy()
    x[7, 2] = bad
    model_fn = Counting()
    pruner = DataPruner(metric=metric, model_fn=model_fn, score_epochs=1.0, n_clusters=2)
    with pytest.raises(InvalidParameterError, match=r"The 'x' parameter of DataPruner.fit must contain only finite "
                                                    r"values\. Got -?(nan|inf) in example 7"):
        pruner.fit(torch.as_tensor(x) if metric == "grand" else x, Y)
    assert model_fn.calls == 0


def test_non_finite_inputs_of_active_learning_and_scoring_functions():
    train_fn = Counting()
    learner = ActiveLearner(train_fn, initial_size=4, batch_size=2)
    with pytest.raises(InvalidParameterError, match=r"'X_pool' parameter of ActiveLearner.run must contain only "
                                                    r"finite values\. Got nan in example 7"):
        learner.run(X_NAN, Y, budget=10)
    with pytest.raises(InvalidParameterError, match=r"'X_pool' parameter of ActiveLearner.run .* example 7"):
        learner.run(X_NAN.tolist(), Y, budget=10)  # plain nested lists too
    with pytest.raises(InvalidParameterError, match=r"'X_eval' parameter of ActiveLearner.run .* example 7"):
        ActiveLearner(train_fn, initial_size=4).run(X, Y, budget=10, X_eval=X_NAN, y_eval=Y)
    with pytest.raises(InvalidParameterError, match=r"'oracle' parameter of ActiveLearner.run must hold a label"):
        ActiveLearner(train_fn, initial_size=4).run(X, np.where(Y == 0, np.nan, 1.0), budget=10)
    assert train_fn.calls == 0
    with pytest.raises(InvalidParameterError, match=r"'data' parameter of collect_probs must contain only finite"):
        collect_probs(nn.Linear(3, 2), torch.as_tensor(X_NAN, dtype=torch.float32))
    with pytest.raises(InvalidParameterError, match=r"'data' parameter of grand_scores must contain only finite"):
        grand_scores(nn.Linear(3, 2), (torch.as_tensor(X_NAN, dtype=torch.float32), torch.as_tensor(Y)))
    with pytest.raises(InvalidParameterError, match=r"'losses' parameter of InfoBatch must contain only finite"):
        InfoBatch(4, epochs=2).update([0, 1], [np.nan, 1.0])


def test_a_text_file_given_as_npz_names_the_file(tmp_path, capsys):
    path = tmp_path / "data.npz"
    path.write_text("x,y\n1,2\n")
    with pytest.raises(DataFormatError) as info:
        load_pruning_data(path)
    assert str(path) in str(info.value) and "not a zip archive" in str(info.value) and "pickle" not in str(info.value)
    assert main(["prune", "score", "--data", str(path), "--metric", "random", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "Traceback" not in err


@pytest.mark.parametrize("arrays,text", [
    ({"x": np.array([[1.0, np.nan], [0.0, 1.0]])}, "array 'x' of .* must hold finite numbers. Got nan in row 0"),
    ({"x": np.array([["a", "b"], ["c", "d"]])}, "array 'x' of .* must be numeric"),
    # negative integer labels are classes since #15 (load_dataset): a fraction is what is refused now
    ({"x": np.zeros((2, 2)), "y": np.array([0, 0.5])}, "row 1: the label must be an integer or a string .* Got 0.5"),
    ({"x": np.zeros((2, 2)), "x_test": np.array([[np.inf, 0.0]])}, "array 'x_test' of .* finite"),
    ({"y": np.zeros(2)}, "has no array 'x' .*Its arrays are: 'y'"),
])
def test_bad_npz_contents_are_refused_naming_the_file(tmp_path, arrays, text):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataFormatError, match=text) as info:
        load_pruning_data(path)
    assert str(path) in str(info.value)


def test_prune_select_without_data_says_it_did_not_balance(tmp_path, capsys):
    """The issue: `prune select` without --data did no class balancing while its manifest said it did."""
    np.savez(tmp_path / "d.npz", x=X, y=Y)
    out = tmp_path / "scores"
    assert main(["prune", "score", "--data", str(tmp_path / "d.npz"), "--metric", "random", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["prune", "select", "--scores", str(out), "--keep", "0.5", "--out", str(tmp_path / "a"), "--json"]) == 0
    captured = capsys.readouterr()
    manifest = json.loads(captured.out)
    assert manifest["class_balance"] is False and manifest["class_balance_requested"] is True
    assert len(manifest["warnings"]) == 1 and "no class balancing was done" in manifest["warnings"][0]
    assert f"--data {tmp_path / 'd.npz'}" in manifest["warnings"][0]  # the data `prune score` used
    assert "warning: no class balancing was done" in captured.err
    saved = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert saved["class_balance"] is False and saved["warnings"] == manifest["warnings"]
    # with labels the classes are balanced, and the manifest says so
    assert main(["prune", "select", "--scores", str(out), "--data", str(tmp_path / "d.npz"), "--keep", "0.5",
                 "--out", str(tmp_path / "b"), "--json"]) == 0
    balanced = json.loads(capsys.readouterr().out)
    assert balanced["class_balance"] is True and balanced["warnings"] == []
    assert {c["kept"] for c in balanced["per_class"].values()} == {10}
    # ranking over all classes on purpose: no warning
    assert main(["prune", "select", "--scores", str(out), "--keep", "0.5", "--no-class-balance",
                 "--out", str(tmp_path / "c"), "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["class_balance"] is False and plain["class_balance_requested"] is False and plain["warnings"] == []


def test_data_pruner_manifest_is_truthful_about_class_balance(tmp_path):
    pruner = DataPruner(metric="random", keep=0.5).fit(X)  # no labels
    assert pruner.class_balanced_ is False and "had no effect" in pruner.warnings_[0]
    manifest = json.loads(pruner.write_manifest(tmp_path).read_text())
    assert manifest["class_balance"] is False and manifest["class_balance_requested"] is True
    assert manifest["warnings"] == pruner.warnings_
    pruner = DataPruner(metric="random", keep=0.5).fit(X, Y)
    assert pruner.class_balanced_ is True and pruner.warnings_ == []
    assert DataPruner(metric="random", keep=1.0).fit(X).warnings_ == []  # nothing dropped: nothing to balance


# ----------------------------------------------------------------------------- API sweep

API_CASES = [
    (lambda: DataPruner(metric="nope").fit(X, Y), "'metric' parameter of DataPruner"),
    (lambda: DataPruner(keep=0).fit(X, Y), "'keep' parameter of DataPruner"),
    (lambda: DataPruner(keep=float("nan")).fit(X, Y), "'keep' parameter of DataPruner"),
    (lambda: DataPruner(keep=100).fit(X, Y), "'keep' parameter of DataPruner must be at most"),
    (lambda: DataPruner(strategy="hardest").fit(X, Y), "'strategy' parameter of DataPruner"),
    (lambda: DataPruner(n_seeds=0).fit(X, Y), "'n_seeds' parameter of DataPruner"),
    (lambda: DataPruner(model_fn=3).fit(X, Y), "'model_fn' parameter of DataPruner"),
    (lambda: DataPruner(model_fn=lambda: 3, score_epochs=0.5).fit(X, Y), "'model_fn' parameter of train_scoring_model"),
    (lambda: DataPruner(model_fn=lambda: nn.Linear(5, 2), score_epochs=0.5).fit(X, Y),
     "'model_fn' parameter of train_scoring_model must build a model that accepts x"),
    (lambda: DataPruner(model_fn=lambda: nn.Linear(3, 1), score_epochs=0.5).fit(X, Y),
     "'model_fn' parameter of train_scoring_model must build a model returning logits"),
    (lambda: DataPruner(out_dir=3).fit(X, Y), "'out_dir' parameter of DataPruner"),
    (lambda: DataPruner(out_dir=__file__).fit(X, Y), "'out_dir' parameter of DataPruner must be a folder"),
    (lambda: DataPruner(metric="random").fit(X, np.where(Y == 0, np.nan, 1.0)), "'y' parameter of DataPruner.fit"),
    (lambda: DataPruner(metric="random").fit(X, np.array([None, "a"] * 20, dtype=object)), "one sortable type"),
    (lambda: DataPruner(metric="random").fit(X, np.zeros((40, 2))), "'y' parameter of DataPruner.fit"),
    (lambda: DataPruner(metric="random").fit(X, Y[:5]), "must have the same length"),
    (lambda: DataPruner().fit(X), "'y' parameter of DataPruner.fit is required"),
    (lambda: DataPruner().fit(None, Y, scores=np.full(40, np.nan)), "'scores' parameter of DataPruner.fit"),
    (lambda: DataPruner().fit(None, Y, scores=["a"] * 40), "'scores' parameter of DataPruner.fit"),
    (lambda: DataPruner(score_epochs=0.5).fit(np.zeros(40), Y), "'x' parameter of DataPruner.fit"),
    (lambda: DataPruner(score_epochs=0.5).fit("abc", Y[:3]), "'x' parameter of DataPruner.fit"),
    (lambda: DataPruner(metric="prototypes", embedding=np.zeros(40)).fit(X), "'embedding' parameter of DataPruner"),
    (lambda: DataPruner(metric="prototypes", n_clusters=2, embedding=X_NAN).fit(X), "'embedding' parameter"),
    (lambda: DataPruner(metric="prototypes").fit(X), "'n_clusters' parameter of DataPruner is required"),
    (lambda: DataPruner(metric="forgetting", score_epochs=0.5).fit(X, Y), "'score_epochs' parameter"),
    (lambda: DataPruner(metric="random").fit(X, Y).transform(5), "'x' parameter of DataPruner.transform"),
    (lambda: DataPruner(metric="random").fit(X, Y).transform(X[:3]), "'x' parameter of DataPruner.transform"),
    (lambda: DataPruner().set_params(nope=1), "Got 'nope'"),
    (lambda: select(None, 2), "'scores' parameter of select"),
    (lambda: select(np.arange(4.0), True), "'keep' parameter of select"),
    (lambda: select(np.arange(4.0), 2, labels=[0.0, np.nan, 1.0, 1.0]), "'labels' parameter of select must hold"),
    (lambda: select(np.arange(4.0), 2, labels=np.array([None, "a", "b", 1], dtype=object)), "one sortable type"),
    (lambda: select([0.0, np.nan], 1), "'scores' parameter of select must not contain NaN"),
    (lambda: collect_probs(nn.Linear(3, 2), torch.zeros(4, 5)), "'data' parameter of collect_probs must fit the model"),
    (lambda: InfoBatch(0, epochs=2), "'n_examples' parameter of InfoBatch"),
    (lambda: InfoBatch(10, epochs=2, prune_ratio=1.0), "'prune_ratio' parameter of InfoBatch"),
    (lambda: InfoBatch(10, epochs=2).load_state_dict(None), "'state' parameter of InfoBatch.load_state_dict"),
    (lambda: ActiveLearner(None).run(X, Y, budget=5), "'model' parameter of ActiveLearner"),
    (lambda: ActiveLearner(SoftmaxRegression).run(X, Y, budget=5), "'model' parameter of ActiveLearner"),
    (lambda: ActiveLearner(SoftmaxRegression(), strategy="x").run(X, Y, budget=5), "'strategy' parameter"),
    (lambda: ActiveLearner(SoftmaxRegression(), initial_size=4).run(X, Y[:5], budget=8), "'oracle' parameter"),
    (lambda: ActiveLearner(SoftmaxRegression()).run(X, Y, budget=0), "'budget' parameter of ActiveLearner.run"),
    (lambda: ActiveLearner(SoftmaxRegression(), initial_size=4).run(X, Y, budget=8, X_eval=5, y_eval=[1]),
     "'X_eval' parameter of ActiveLearner.run"),
    (lambda: ActiveLearner(SoftmaxRegression()).teach([0.5], [1]), "'indices' parameter of ActiveLearner.teach"),
    (lambda: embed_with(lambda b: np.full((len(b), 2), np.nan), np.zeros((4, 2))), "must return finite embeddings"),
    (lambda: load_pruning_data(3), "'data' parameter of load_pruning_data"),
    (lambda: load_pruning_data("/nonexistent.npz"), "'data' parameter of load_pruning_data"),
    (lambda: load_pruning_data("fashion-mnist", n_train=0), "'n_train' parameter of load_pruning_data"),
]


@pytest.mark.parametrize("call,text", API_CASES, ids=[f"case{i}" for i in range(len(API_CASES))])
def test_api_bad_input_is_a_clear_error(call, text):
    with pytest.raises(LeanscaleError) as info:
        call()
    assert text in str(info.value)


@settings(max_examples=40, deadline=None)
@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 60), st.booleans(), st.none(),
                 st.text(max_size=2)))
def test_keep_is_a_valid_fraction_or_count_or_refused(keep):
    valid = (not isinstance(keep, bool)) and (
        (isinstance(keep, int) and 1 <= keep <= 40) or (isinstance(keep, float) and 0 < keep <= 1))
    if valid:
        kept = DataPruner(metric="random", keep=keep).fit_transform(X, Y)
        expected = keep if isinstance(keep, int) else max(1, min(40, int(np.floor(keep * 40 + 0.5 + 1e-9))))
        assert len(kept) == expected and len(set(kept.tolist())) == expected
    else:
        with pytest.raises(InvalidParameterError, match=r"The 'keep' parameter of DataPruner"):
            DataPruner(metric="random", keep=keep).fit(X, Y)


# ----------------------------------------------------------------------------- fuzz: DataPruner state


def _double(batch):
    return np.asarray(batch, dtype=np.float64) * 2.0


def _state_files(out):
    return sorted((out / "state" / "tasks").glob("*.json")), sorted((out / "state" / "arrays").glob("*.npy"))


def _npy_with_header(shape):
    """A .npy whose header claims ``shape`` but holds only 16 bytes of data."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False, "shape": shape})
    return buf.getvalue() + b"\0" * 16


JSON_MUTATIONS = [
    lambda b: b[: len(b) // 2],
    lambda b: b"",
    lambda b: b"\xff\xfe garbage",
    lambda b: b"[1, 2, 3]",
    lambda b: json.dumps({"key": "k"}).encode(),
    lambda b: json.dumps({"key": "k", "result": None}).encode(),
    lambda b: json.dumps({"key": "k", "result": {"file": "/etc/passwd", "shape": [40, 3], "dtype": "<f8"}}).encode(),
    lambda b: json.dumps({"key": "k", "result": {"file": "../../../x.npy", "shape": [40, 3], "dtype": "<f8"}}).encode(),
    lambda b: json.dumps({"key": "k", "result": {"file": 5, "shape": [40, 3]}}).encode(),
    lambda b: json.dumps({"key": "k", "result": {"file": "arrays", "shape": "40"}}).encode(),
]
NPY_MUTATIONS = [
    lambda b: b[: len(b) // 2],
    lambda b: b[:10],
    lambda b: b"",
    lambda b: b"just some text\n",
    lambda b: bytes(random.Random(0).randrange(256) for _ in range(200)),
    lambda b: _npy_with_header((10**9, 10**9)),  # refused from the header, nothing allocated
    lambda b: _npy_with_header((40, 3)),
    lambda b: (lambda buf: (np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True), buf.getvalue())[1])(
        io.BytesIO()),
    lambda b: (lambda buf: (np.save(buf, np.full((40, 3), np.nan)), buf.getvalue())[1])(io.BytesIO()),
    lambda b: (lambda buf: (np.save(buf, np.zeros((5, 3))), buf.getvalue())[1])(io.BytesIO()),
]


@pytest.mark.parametrize("target", ["json", "npy"])
def test_fuzz_pruner_state_a_damaged_entry_is_recomputed(tmp_path, target):
    out = tmp_path / "run"
    reference = DataPruner(metric="prototypes", n_clusters=2, embedding=_double, out_dir=out).fit(X).scores_
    tasks, arrays = _state_files(out)
    assert len(tasks) == len(arrays) == 1
    victim = tasks[0] if target == "json" else arrays[0]
    good = victim.read_bytes()
    for i, mutate in enumerate(JSON_MUTATIONS if target == "json" else NPY_MUTATIONS):
        victim.write_bytes(mutate(good))
        with pytest.warns(RuntimeWarning, match="computed again"):  # said, not silent
            pruner = DataPruner(metric="prototypes", n_clusters=2, embedding=_double, out_dir=out).fit(X)
        np.testing.assert_array_equal(pruner.scores_, reference, err_msg=f"mutation {i}")
        assert pruner.reused_ == [], f"mutation {i}: a damaged entry was reused"
        victim.write_bytes(good)
    pruner = DataPruner(metric="prototypes", n_clusters=2, embedding=_double, out_dir=out).fit(X)
    assert len(pruner.reused_) == 1  # the intact entry is reused


def test_fuzz_trained_scores_state_is_recomputed_not_trusted(tmp_path):
    out = tmp_path / "run"
    kw = {"metric": "el2n", "score_epochs": 1.0, "out_dir": out, "batch_size": 16}
    reference = DataPruner(**kw).fit(X, Y).scores_
    (_, arrays) = _state_files(out)
    probs = arrays[0]
    buf = io.BytesIO()
    np.save(buf, np.full((40, 2), 0.5))  # plausible but edited probabilities of the right shape ...
    probs.write_bytes(buf.getvalue()[:-8])  # ... truncated: refused by size, recomputed
    with pytest.warns(RuntimeWarning, match=r"claims shape \(40, 2\) .* computed again"):
        np.testing.assert_allclose(DataPruner(**kw).fit(X, Y).scores_, reference)


def test_read_npy_checks_the_header_against_the_size(tmp_path):
    path = tmp_path / "a.npy"
    path.write_bytes(_npy_with_header((10**9, 10**9)))
    with pytest.raises(DataFormatError, match=r"claims shape \(1000000000, 1000000000\) .* holds 16 bytes"):
        read_npy(path)
    path.write_text("hello")
    with pytest.raises(DataFormatError, match=r"a.npy' is not a readable .npy file"):
        read_npy(path)
    with pytest.raises(DataNotFoundError):
        read_npy(tmp_path / "missing.npy")


# ----------------------------------------------------------------------------- fuzz: prune select inputs


@pytest.mark.parametrize("i", range(len(NPY_MUTATIONS)))
def test_fuzz_prune_select_scores_file(tmp_path, capsys, i):
    buf = io.BytesIO()
    np.save(buf, np.linspace(0, 1, 40))
    (tmp_path / "scores.npy").write_bytes(NPY_MUTATIONS[i](buf.getvalue()))
    code = main(["prune", "select", "--scores", str(tmp_path), "--keep", "0.5", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code in (0, 2) and "Traceback" not in err
    if code == 2:
        assert "scores.npy" in err


@pytest.mark.parametrize("content", [b"{", b"[]", b"\xff", b'{"metric": 5}', b'{"data": [1]}', b"null"])
def test_fuzz_prune_select_manifest(tmp_path, capsys, content):
    np.save(tmp_path / "scores.npy", np.linspace(0, 1, 40))
    (tmp_path / "manifest.json").write_bytes(content)
    code = main(["prune", "select", "--scores", str(tmp_path), "--keep", "0.5", "--out", str(tmp_path / "o"), "--json"])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    if code == 2:
        assert "manifest.json" in captured.err
    else:
        assert code == 0 and json.loads(captured.out)["metric"] == "given"


# ----------------------------------------------------------------------------- fuzz: state dicts

WEIRD = [None, 1, -1, 2.5, float("nan"), "x", [], {}, [1, "a"], [[1], [2, 3]], torch.zeros(0), torch.zeros(3, 3),
         torch.full((10,), -5), torch.tensor([float("inf")] * 10), torch.tensor(True), {"a": 1}]


def _mutations(state):
    for key in list(state):
        yield {k: v for k, v in state.items() if k != key}
        for value in WEIRD:
            yield {**state, key: value}


def _only_leanscale_errors(load, state):
    try:
        load(copy.deepcopy(state))
    except LeanscaleError:
        return "refused"
    return "loaded"


def test_fuzz_infobatch_state_dict(tmp_path):
    ib = InfoBatch(10, epochs=3, seed=1)
    ib.set_epoch(0)
    ib.update(np.arange(10), np.linspace(0.1, 2, 10))
    ib.set_epoch(1)
    state = ib.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)  # the documented way to save it
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    outcomes = [_only_leanscale_errors(InfoBatch(10, epochs=3, seed=1).load_state_dict, s) for s in _mutations(state)]
    assert outcomes.count("refused") > 0.8 * len(outcomes)
    fresh = InfoBatch(10, epochs=3, seed=1)
    fresh.load_state_dict(state)  # the intact state still loads and resumes the same plan
    assert torch.equal(fresh.epoch_indices(), ib.epoch_indices())


def test_fuzz_active_learner_and_forgetting_state_dicts():
    learner = ActiveLearner(SoftmaxRegression(), initial_size=6, batch_size=4).run(X, Y, budget=14)
    state = json.loads(json.dumps(learner.state_dict()))
    outcomes = [_only_leanscale_errors(ActiveLearner(SoftmaxRegression()).load_state_dict, s) for s in _mutations(state)]
    assert outcomes.count("refused") > 0.6 * len(outcomes)
    tracker = ForgettingTracker(5).update([0, 1, 2], [True, False, True])
    state = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in tracker.state_dict().items()}
    outcomes = [_only_leanscale_errors(ForgettingTracker(5).load_state_dict, s) for s in _mutations(state)]
    assert outcomes.count("refused") > 0.6 * len(outcomes)


def test_active_cli_starts_over_from_a_damaged_state(tmp_path, capsys):
    np.savez(tmp_path / "d.npz", x=X, y=Y, x_test=X, y_test=Y)
    argv = ["active", "--data", str(tmp_path / "d.npz"), "--budget", "12", "--batch-size", "4", "--initial", "4",
            "--out", str(tmp_path / "run"), "--json"]
    assert main(argv) == 0
    reference = json.loads(capsys.readouterr().out)
    state = tmp_path / "run" / "state.json"
    good = json.loads(state.read_text())
    bad_labels = copy.deepcopy(good)
    bad_labels["learner"]["labels"] = [1 - v for v in good["learner"]["labels"]]  # edited labels: not the data's
    for content in (b"{", b"[]", json.dumps({"settings": good["settings"], "learner": {"labels": 5}}).encode(),
                    json.dumps(bad_labels).encode()):
        state.write_bytes(content)
        assert main(argv) == 0
        captured = capsys.readouterr()
        assert "warning: ignoring the damaged state file" in captured.err
        assert json.loads(captured.out)["history"] == reference["history"]  # started over: the same run


# ----------------------------------------------------------------------------- CLI flags

CLI_CASES = [
    (["prune", "score", "--metric", "random", "--seeds", "0", "--out", "o"], "'--seeds' parameter of leanscale prune score"),
    (["prune", "score", "--metric", "random", "--epochs", "-1", "--out", "o"], "'--epochs' parameter"),
    (["prune", "score", "--metric", "random", "--lr", "0", "--out", "o"], "'--lr' parameter"),
    (["prune", "score", "--metric", "random", "--batch-size", "0", "--out", "o"], "'--batch-size' parameter"),
    (["prune", "score", "--metric", "random", "--n-clusters", "0", "--out", "o"], "'--n-clusters' parameter"),
    (["prune", "score", "--metric", "random", "--seed", "-1", "--out", "o"], "'--seed' parameter"),
    (["prune", "score", "--metric", "nope", "--data", "d.npz", "--out", "o"], "'metric' parameter of DataPruner"),
    (["prune", "score", "--data", "missing.npz", "--out", "o"], "'--data' parameter of leanscale prune score must be one of 'fashion-mnist', 'wordnet' or an existing file"),
    (["prune", "select", "--scores", "s.npy", "--keep", "0"], "'keep' parameter"),
    (["prune", "select", "--scores", "s.npy", "--keep", "nan"], "'keep' parameter"),
    (["prune", "select", "--scores", "s.npy", "--keep", "0.5", "--strategy", "hardest"], "'strategy' parameter"),
    (["prune", "select", "--scores", "s.npy", "--keep", "0.5", "--data", "short.npz"],
     "must have one training example per score. Got 5 examples"),
    (["prune", "select", "--scores", "s.npy", "--keep", "0.5", "--data", "nolabels.npz"], "must have labels (y)"),
    (["prune", "select", "--scores", "s2d.npy", "--keep", "0.5"], "must hold a 1-d array"),
    (["active", "--data", "d.npz", "--budget", "0"], "'--budget' parameter of leanscale active"),
    (["active", "--data", "d.npz", "--batch-size", "0"], "'--batch-size' parameter of leanscale active"),
    (["active", "--data", "d.npz", "--C", "-1"], "'--C' parameter of leanscale active"),
    (["active", "--data", "d.npz", "--strategy", "best"], "'strategy' parameter of ActiveLearner"),
    (["active", "--data", "nolabels.npz"], "must have labels (y)"),
]


@pytest.mark.parametrize("argv,text", CLI_CASES, ids=[f"cli{i}" for i in range(len(CLI_CASES))])
def test_cli_bad_flags(argv, text, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.savez("d.npz", x=X, y=Y)
    np.savez("short.npz", x=X[:5], y=Y[:5])
    np.savez("nolabels.npz", x=X)
    np.save("s.npy", np.linspace(0, 1, 40))
    np.save("s2d.npy", np.zeros((4, 2)))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert text in err and "Traceback" not in err
    assert not os.path.exists("o/manifest.json")
