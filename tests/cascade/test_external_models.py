"""A cascade of rules -> a scikit-learn pipeline -> a torch MLP is saved without user code: a fresh
process that cannot import this module loads it and predicts exactly what the fitted cascade does,
and so does ``leanscale serve``. Tampered files (an untrusted type in a skops file, an op outside
the allow-list in a torch graph) are refused."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import skops.io as skops_io  # the cascade extra
import torch
from sklearn.feature_extraction.text import HashingVectorizer, TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from torch import nn

from leanscale.cascade import Cascade, ExternalStageWarning, ModelStage, RegexStage
from leanscale.cascade import external_models as ext
from leanscale.core.errors import DataFormatError, InvalidParameterError

WORDS = {"billing": ["refund", "money", "invoice", "charge"], "login": ["password", "account", "locked", "reset"],
         "shipping": ["parcel", "late", "track", "courier"]}
NOISE = sorted(w for ws in WORDS.values() for w in ws if w != "refund") + ["please", "help", "today", "again"]


def make_texts(n, seed):
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        label = sorted(WORDS)[i % 3]
        words = list(rng.choice(WORDS[label], 1)) + list(rng.choice(NOISE, 3))  # noisy: other classes' words
        texts.append(" ".join(rng.permutation(words)))
        labels.append(label)
    return texts, labels


def build(seed=0):
    """rules -> TF-IDF + logistic regression (a Pipeline) -> an MLP on hashed features (a torch
    module with a scikit-learn transformer as its transform), fitted on synthetic tickets."""
    texts, labels = make_texts(600, seed)
    pipe = make_pipeline(TfidfVectorizer(), LogisticRegression(C=0.3)).fit(texts[:300], labels[:300])
    hv = HashingVectorizer(n_features=64, alternate_sign=False, norm="l2")
    torch.manual_seed(seed)
    mlp = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.LayerNorm(32), nn.Dropout(0.2), nn.Linear(32, 3))
    x = torch.as_tensor(hv.transform(texts[:300]).toarray(), dtype=torch.float32)
    y = torch.tensor([sorted(WORDS).index(v) for v in labels[:300]])
    opt = torch.optim.Adam(mlp.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(mlp(x), y).backward()
        opt.step()
    stages = [RegexStage([(r"\brefund\b", "billing")], name="rules", cost=0.001),
              ModelStage(pipe, name="tfidf", cost=0.5),
              ModelStage(mlp, name="mlp", cost=1.0, transform=hv, classes=sorted(WORDS))]
    cascade = Cascade(stages, target_accuracy=0.645).fit(texts[300:], labels[300:])  # every stage answers some
    return cascade, texts


@pytest.fixture(scope="module")
def fitted():
    return build()


RUNNER = textwrap.dedent("""
    import importlib.util, json, sys
    assert importlib.util.find_spec("tests") is None, "the test package must not be importable here"
    from leanscale.cascade import Cascade
    cascade = Cascade.load(sys.argv[1])  # no objects=: no user code
    texts = json.load(open(sys.argv[2]))
    out = cascade.predict_detailed(texts)
    json.dump({"labels": out.labels.tolist(), "stage": out.stage.tolist(), "confidence": out.confidence.tolist(),
               "proba": {s.name: s.predict_proba(texts).tolist() for s in cascade.stages if s.kind == "model"},
               "types": {s.name: type(s.model).__name__ for s in cascade.stages if s.kind == "model"}},
              open(sys.argv[3], "w"))
""")


def test_saved_cascade_loads_in_a_process_without_user_code(fitted, tmp_path):
    cascade, texts = fitted
    path = cascade.save(tmp_path / "c.json")
    doc = json.loads(path.read_text())
    assert doc["version"] == 2
    kinds = {d["name"]: (d["model"]["class"] if d["kind"] == "model" else None) for d in doc["stages"]}
    assert kinds == {"rules": None, "tfidf": "skops", "mlp": "torch.graph"}
    assert doc["stages"][2]["transform"]["class"] == "skops"
    assert not any(p.suffix in (".pt", ".pt2", ".pkl", ".pickle") for p in tmp_path.iterdir())
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    (tmp_path / "run.py").write_text(RUNNER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-I", "run.py", str(path), "texts.json", "out.json"], cwd=tmp_path, env=env,
                   check=True, timeout=120)
    got = json.loads((tmp_path / "out.json").read_text())
    want = cascade.predict_detailed(texts)
    assert got["labels"] == want.labels.tolist() and got["stage"] == want.stage.tolist()
    np.testing.assert_array_equal(got["confidence"], want.confidence)
    assert set(want.stage) == {"rules", "tfidf", "mlp"}  # every stage answers some requests
    for s in cascade.stages[1:]:
        np.testing.assert_array_equal(np.array(got["proba"][s.name]), s.predict_proba(texts))
    assert got["types"] == {"tfidf": "Pipeline", "mlp": "ExportedGraph"}


def test_the_exported_graph_has_a_dynamic_batch_and_saves_again(fitted, tmp_path):
    cascade, texts = fitted
    loaded = Cascade.load(cascade.save(tmp_path / "a.json"))
    mlp = loaded.stages[2]
    for n in (1, 2, 7, 300):  # any batch size, also ones never seen at export
        np.testing.assert_array_equal(mlp.predict_proba(texts[:n]), cascade.stages[2].predict_proba(texts[:n]))
    again = Cascade.load(loaded.save(tmp_path / "b.json"))  # a loaded graph saves as it was loaded
    assert list(again.predict(texts)) == list(cascade.predict(texts))
    a, b = (json.loads((tmp_path / f).read_text())["stages"][2]["model"] for f in ("a.json", "b.json"))
    assert a["graph"] == b["graph"] and a["sha256"] == b["sha256"]
    # a new save under the same name removes the files only the previous one named (skops files too)
    assert len(list(tmp_path.glob("a.*.skops"))) == 2 and len(list(tmp_path.glob("a.*.arrays"))) == 1
    rules_only = Cascade([cascade.stages[0]]).fit(texts[:20], ["billing"] * 20)
    rules_only.save(tmp_path / "a.json")
    assert sorted(p.name for p in tmp_path.glob("a.*")) == ["a.json"]


def test_a_skops_file_with_an_untrusted_type_is_refused(fitted, tmp_path):
    cascade, _ = fitted
    path = cascade.save(tmp_path / "c.json")
    doc = json.loads(path.read_text())
    entry = doc["stages"][1]["model"]
    # an attacker replaces the model with one holding os.system, and updates the hash in the JSON
    from sklearn.preprocessing import FunctionTransformer

    evil = skops_io.dumps(make_pipeline(FunctionTransformer(os.system), LogisticRegression()))
    (tmp_path / entry["file"]).write_bytes(evil)
    with pytest.raises(DataFormatError, match="does not match the hash recorded"):
        Cascade.load(path)
    import hashlib

    entry["sha256"] = hashlib.sha256(evil).hexdigest()
    path.write_text(json.dumps(doc))
    with pytest.raises(DataFormatError, match=r"c\.tfidf\.[0-9a-f]{16}\.skops.*not trusted: 'posix.system'"):
        Cascade.load(path)
    # a file that is not skops at all, and one outside the folder
    (tmp_path / entry["file"]).write_bytes(b"not a zip")
    entry["sha256"] = hashlib.sha256(b"not a zip").hexdigest()
    path.write_text(json.dumps(doc))
    with pytest.raises(DataFormatError, match="is not a skops file"):
        Cascade.load(path)
    entry["file"] = "../elsewhere.skops"
    path.write_text(json.dumps(doc))
    with pytest.raises(DataFormatError, match="must lie inside the folder"):
        Cascade.load(path)


def test_allowed_types_are_classes_of_sklearn_numpy_scipy_sparse():
    assert ext.allowed_type("sklearn.tree._tree.Tree")
    assert ext.allowed_type("sklearn.linear_model._logistic.LogisticRegression")
    assert ext.allowed_type("numpy.ndarray")
    for name in ("posix.system", "builtins.eval", "numpy.load", "numpy.lib.npyio.load", "sklearn.nope.Nope",
                 "numpy.conftest.Anything", "sklearn.tests.test_base.T",
                 "sklearn", "sklearnx.evil.Type", "scipy.io.loadmat", "sklearn.base.clone", "", None, "a..b"):
        assert not ext.allowed_type(name), name


class UserModel:
    """A model class only this test module defines: skops cannot save it as trusted data."""

    classes_ = np.array(["a", "b"])

    def predict_proba(self, items):
        return np.tile([0.9, 0.1], (len(items), 1))


def test_user_code_is_saved_by_name_with_a_warning_that_says_why(tmp_path):
    hv = HashingVectorizer(n_features=8)
    net = nn.Linear(8, 2)
    lambda_stage = ModelStage(net, name="net", classes=["a", "b"], cost=1.0,
                              transform=lambda batch: torch.as_tensor(hv.transform(batch).toarray(), dtype=torch.float32))
    user_stage = ModelStage(UserModel(), name="user", cost=0.5)
    c = Cascade([user_stage, lambda_stage], target_accuracy=0.5).fit(["x", "y"] * 10, ["a", "b"] * 10)
    with pytest.warns(ExternalStageWarning) as record:
        path = c.save(tmp_path / "c.json")
    messages = [str(w.message) for w in record]
    assert any("'user'" in m and "UserModel" in m and "objects=" in m for m in messages), messages
    assert any("'net'" in m and "transform is a Python callable" in m and "scikit-learn transformer" in m
               for m in messages), messages
    assert any("its model (UserModel) cannot be saved as data" in m and "tests.cascade.test_external_models" in m
               for m in messages), messages
    doc = json.loads(path.read_text())
    assert [d["model"] for d in doc["stages"]] == ["external", "external"] and doc["version"] == 1
    with pytest.raises(InvalidParameterError, match="'objects'.*'user'"):
        Cascade.load(path)
    loaded = Cascade.load(path, objects={"user": user_stage.model, "net": lambda_stage})  # a stage keeps its transform
    assert loaded.stages[1].transform is lambda_stage.transform
    assert list(loaded.predict(["x", "y"])) == list(c.predict(["x", "y"]))


def test_a_torch_module_that_cannot_be_exported_is_saved_by_name(tmp_path):
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.export refuses it
                return self.lin(x)
            return -self.lin(x)

    stage = ModelStage(DataDependent(), name="dd", classes=["a", "b"], transform=HashingVectorizer(n_features=4))
    c = Cascade([stage]).fit(["x", "y"] * 5, ["a", "b"] * 5)
    with pytest.warns(ExternalStageWarning, match="'dd'.*torch.export could not export it"):
        path = c.save(tmp_path / "c.json")
    assert json.loads(path.read_text())["stages"][0]["model"] == "external"


def _torch_doc(fitted, tmp_path):
    cascade, _ = fitted
    path = cascade.save(tmp_path / "c.json")
    return path, json.loads(path.read_text())


@pytest.mark.parametrize("change,message", [
    (lambda g: g["nodes"][0].update(op="aten.empty.memory_format"), "not an allowed ATen op"),
    (lambda g: g["nodes"][0].update(op="torch.load"), "not an allowed ATen op"),
    (lambda g: g["nodes"][0].update(op="aten.linear.nope"), "which this torch does not have"),
    (lambda g: g["nodes"][0].update(args=[{"node": "later"}]), "invalid argument"),
    (lambda g: g["nodes"][0].update(args=[{"eval": "1"}]), "invalid argument"),
    (lambda g: g.update(output="nowhere"), "returns 'nowhere'"),
    (lambda g: g["input"].update(shape=[None, 65]), "does not run|returns"),
    (lambda g: g["placeholders"][next(iter(g["placeholders"]))].update(shape=[1]), "the shape of its array"),
    (lambda g: g["nodes"].append(dict(g["nodes"][0])), "a new name"),
])
def test_a_tampered_torch_graph_is_refused(fitted, tmp_path, change, message):
    path, doc = _torch_doc(fitted, tmp_path)
    change(doc["stages"][2]["model"]["graph"])
    path.write_text(json.dumps(doc))
    with pytest.raises(DataFormatError, match=message):
        Cascade.load(path)


def test_versions_of_saved_models_and_files(fitted, tmp_path):
    path, doc = _torch_doc(fitted, tmp_path)
    doc["stages"][2]["model"]["format_version"] = 2
    path.write_text(json.dumps(doc))
    with pytest.raises(DataFormatError, match="format_version 2: it was written by a newer leanscale"):
        Cascade.load(path)
    doc["stages"][2]["model"]["format_version"] = 1
    doc["stages"][2]["model"]["extra"] = 1
    path.write_text(json.dumps(doc))
    with pytest.raises(DataFormatError, match="exactly the keys"):
        Cascade.load(path)
    del doc["stages"][2]["model"]["extra"]
    doc["version"] = 3
    path.write_text(json.dumps(doc))
    with pytest.raises(DataFormatError, match="has version 3: it was written by a newer leanscale"):
        Cascade.load(path)


def test_leanscale_serve_answers_from_a_cascade_loaded_without_user_code(fitted, tmp_path, monkeypatch):
    from leanscale.cascade import server as server_mod
    from leanscale.cli.main import main
    from tests.cascade.test_server import predict, running

    cascade, texts = fitted
    path = cascade.save(tmp_path / "c.json")
    configs = []
    monkeypatch.setattr(server_mod, "_run", configs.append)  # the app `leanscale serve` would run
    assert main(["serve", str(path), "--port", "0", "--log-level", "error"]) == 0  # no --objects
    sample = texts[:40]
    want = cascade.predict_detailed(sample)
    with running(configs[0].app) as port:
        status, body = predict(port, {"texts": sample})
    assert status == 200
    assert [p["label"] for p in body["predictions"]] == want.labels.tolist()
    assert [p["stage"] for p in body["predictions"]] == want.stage.tolist()
    np.testing.assert_allclose([p["confidence"] for p in body["predictions"]], want.confidence, rtol=1e-12)


def test_fuzzed_files_of_sklearn_and_torch_stages_give_only_leanscale_errors(fitted, tmp_path, monkeypatch):
    """Seeded mutations of the JSON (graph included) and of the .skops bytes (hash updated, so
    they reach skops): loading raises only leanscale errors, never unpickles, and whatever loads
    predicts without a raw exception."""
    import hashlib
    import pickle
    import random

    from tests.cascade.test_file_fuzz import (
        _load_expecting_only_leanscale_errors,
        mutate_bytes,
        mutate_tree,
    )

    cascade, _ = fitted
    path = cascade.save(tmp_path / "c.json")
    good = json.loads(path.read_text())
    skops_name = good["stages"][1]["model"]["file"]
    original = (tmp_path / skops_name).read_bytes()

    def forbidden(*a, **k):
        raise AssertionError("pickle/torch.load used while loading an untrusted file")

    for mod, name in ((pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(mod, name, forbidden)
    rng = random.Random(11)
    outcomes = {"refused": 0, "loaded": 0}
    for i in range(80):
        doc = json.loads(json.dumps(good))
        if i % 4 == 3:
            data = mutate_bytes(original, rng)
            (tmp_path / skops_name).write_bytes(data)
            doc["stages"][1]["model"]["sha256"] = hashlib.sha256(data).hexdigest()
        else:
            (tmp_path / skops_name).write_bytes(original)
            where = rng.randrange(4)
            if where == 0:
                doc = mutate_tree(doc, rng)
            elif where == 3:
                doc["stages"][2]["model"]["graph"] = mutate_tree(doc["stages"][2]["model"]["graph"], rng)
            else:
                doc["stages"][where] = mutate_tree(doc["stages"][where], rng)
        path.write_text(json.dumps(doc))
        outcomes[_load_expecting_only_leanscale_errors(lambda: Cascade.load(path), "cascade", i)] += 1
    assert outcomes["refused"] > 30 and outcomes["loaded"] >= 2, outcomes


def test_tree_ensembles_round_trip_through_skops(tmp_path):
    """Models whose state holds types skops does not trust by default (sklearn.tree._tree.Tree,
    TreePredictor) load: those are scikit-learn classes on the allow-list."""
    from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier

    texts, labels = make_texts(240, seed=3)
    hv = HashingVectorizer(n_features=32, alternate_sign=False)
    forest = make_pipeline(hv, RandomForestClassifier(n_estimators=5, random_state=0)).fit(texts[:120], labels[:120])
    from sklearn.decomposition import TruncatedSVD

    dense = make_pipeline(hv, TruncatedSVD(n_components=8, random_state=0)).fit(texts[:120])  # a fitted transform
    boost = HistGradientBoostingClassifier(max_iter=5).fit(dense.transform(texts[:120]), labels[:120])
    stages = [ModelStage(forest, name="forest", cost=1.0),
              ModelStage(boost, name="boost", cost=2.0, transform=dense)]
    c = Cascade(stages).fit(texts[120:], labels[120:])
    loaded = Cascade.load(c.save(tmp_path / "c.json"))
    for a, b in zip(c.stages, loaded.stages):
        np.testing.assert_array_equal(a.predict_proba(texts), b.predict_proba(texts))
