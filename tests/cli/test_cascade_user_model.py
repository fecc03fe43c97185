"""``leanscale cascade fit --model NAME=SPEC``: the user's own model as a stage of the cascade.

The user's ``models.py`` lives in ``tmp_path/user``; the data are a CSV with string labels in
``tmp_path/data``. The saved cascade is then evaluated (``leanscale cascade eval``) and served
(``create_app`` over 127.0.0.1) in a fresh Python process whose working folder is elsewhere and whose
``sys.path`` does not hold ``tmp_path/user``: the user's stage must load from the files alone (skops for
scikit-learn, an exported graph for torch). The torch stages run on a fake 384-d encoder (hashed
word vectors, installed as MiniLM's replacement in-process and in the subprocess) so the tests do
not spend ~10 s loading MiniLM; the encoder is not what is tested here.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from leanscale.cli.main import main

MODELS_SRC = '''\
import torch.nn as nn
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.feature_extraction.text import HashingVectorizer, TfidfVectorizer
from sklearn.linear_model import LinearRegression, LogisticRegression, SGDClassifier
from sklearn.pipeline import make_pipeline


def make_tfidf():
    return make_pipeline(TfidfVectorizer(), LogisticRegression(C=10.0, max_iter=500))


def make_hashing():
    return make_pipeline(HashingVectorizer(n_features=2**12, alternate_sign=False),
                         SGDClassifier(loss="log_loss", random_state=0))


def make_head():
    return nn.Sequential(nn.Linear(384, 32), nn.ReLU(), nn.Linear(32, 3))


def make_wide_head():
    return nn.Sequential(nn.Linear(384, 5))


class Own(BaseEstimator, ClassifierMixin):  # a class of the user's: cannot be loaded without this file
    def fit(self, X, y):
        self.inner_ = make_tfidf().fit(X, y)
        self.classes_ = self.inner_.classes_
        return self

    def predict_proba(self, X):
        return self.inner_.predict_proba(X)


def make_own():
    return Own()


def returns_none():
    pass


def returns_class():
    return LogisticRegression


def returns_regressor():
    return LinearRegression().fit([[0.0], [1.0]], [0.0, 1.0])  # fitted, and of the wrong kind
'''

QUEUES = {"billing": ["refund", "invoice", "charge", "paid", "card"],
          "login": ["password", "account", "locked", "reset", "username"],
          "shipping": ["parcel", "delivery", "courier", "tracking", "late"]}
FILLER = ["please", "help", "today", "again", "my", "the", "urgent", "thanks", "hello", "issue"]

# the fake MiniLM: unit-norm sums of hashed word vectors (deterministic across processes)
FAKE_ENCODER = """
import zlib
import numpy as np
import leanscale.cascade.embedding_head as _eh

def _fake_minilm(texts):
    out = np.zeros((len(texts), 384), dtype=np.float32)
    for i, t in enumerate(texts):
        for w in t.lower().split():
            out[i] += np.random.default_rng(zlib.crc32(w.encode())).normal(size=384).astype(np.float32)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

_eh._minilm_encoder = _fake_minilm
"""


def _fake_encoder():
    scope: dict = {}
    exec(FAKE_ENCODER, scope)
    return scope["_fake_minilm"]


@pytest.fixture
def user(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # what the CLI adds to it is undone after the test
    monkeypatch.setenv("LEANSCALE_NO_PROGRESS", "1")
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "models.py").write_text(MODELS_SRC)
    (tmp_path / "data").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(240):
        queue = list(QUEUES)[i % 3]
        words = list(rng.choice(QUEUES[queue], 2)) + list(rng.choice(FILLER, 3))
        rng.shuffle(words)
        rows.append((" ".join(words), queue))
    with open(tmp_path / "data" / "tickets.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["body", "queue"])
        w.writerows(rows)
    (tmp_path / "elsewhere").mkdir()
    return {"root": tmp_path, "texts": [r[0] for r in rows], "labels": [r[1] for r in rows]}


def _fit_args(out: str, stages: str, *models: str) -> list[str]:
    args = ["cascade", "fit", "--data", "data/tickets.csv", "--text-column", "body", "--label-column", "queue",
            "--stages", stages, "--out", out]
    for m in models:
        args += ["--model", m]
    return args


def _fresh_python(root, code: str, *, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -c code`` from ``root/elsewhere``, with the user's folder out of PYTHONPATH and a check that
    it is not on sys.path and its models.py not importable: the cascade must load from its files alone."""
    env = dict(os.environ)
    user_dir = str(root / "user")
    kept = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and not p.startswith(user_dir)]
    env.pop("PYTHONPATH", None)
    if kept:
        env["PYTHONPATH"] = os.pathsep.join(kept)
    env["LEANSCALE_NO_PROGRESS"] = "1"
    guard = textwrap.dedent("""
        import sys
        assert not any(p and p.rstrip('/').endswith('user') for p in sys.path), sys.path
        try:
            import models
        except ImportError:
            pass
        else:
            raise SystemExit('the user models.py is importable: ' + models.__file__)
        sys.modules.pop('models', None)
    """)
    proc = subprocess.run([sys.executable, "-c", guard + textwrap.dedent(code)], cwd=root / "elsewhere",
                          capture_output=True, text=True, timeout=timeout, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


EVAL_CODE = """
from leanscale.cli.main import main
raise SystemExit(main(["cascade", "eval", {cascade!r}, "--data", {data!r}, "--text-column", "body",
                       "--label-column", "queue", "--json"]))
"""

SERVE_CODE = """
import http.client, json, threading, time
import uvicorn
from leanscale.cascade import Cascade, create_app
from leanscale.cascade.server import server_config

app = create_app(Cascade.load({cascade!r}))
server = uvicorn.Server(server_config(app, host="127.0.0.1", port=0, log_level="error"))
thread = threading.Thread(target=server.run, daemon=True)
thread.start()
deadline = time.monotonic() + 30
while not server.started:
    assert thread.is_alive() and time.monotonic() < deadline
    time.sleep(0.01)
port = server.servers[0].sockets[0].getsockname()[1]
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
conn.request("POST", "/v1/predict", body=json.dumps({{"texts": {texts!r}}}),
             headers={{"Content-Type": "application/json"}})
resp = conn.getresponse()
print(json.dumps({{"status": resp.status, "body": json.loads(resp.read())}}))
server.should_exit = True
thread.join(15)
"""


# ----------------------------------------------------------------------------- scikit-learn stage


def test_sklearn_stage_is_fit_saved_with_skops_and_evaluated_without_the_users_code(user, capsys):
    root = user["root"]
    rc = main(_fit_args("out/c.json", "mine,tfidf", "mine=user/models.py:make_tfidf") + ["--costs", "mine=0.001,tfidf=0.01"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "mine: Pipeline fitted in" in captured.out
    doc = json.loads((root / "out" / "c.json").read_text())
    mine = doc["stages"][0]
    assert mine["name"] == "mine" and mine["model"]["class"] == "skops" and mine["cost"] == 0.001
    assert (root / "out" / mine["model"]["file"]).is_file()
    recorded = json.loads((root / "out" / "c.eval.json").read_text())["test"]  # the in-memory cascade, before save

    proc = _fresh_python(root, EVAL_CODE.format(cascade=str(root / "out" / "c.json"),
                                                data=str(root / "data" / "tickets.csv")))
    summary = json.loads(proc.stdout)
    assert summary["examples_used"].startswith("the test split recorded")
    assert summary["n"] == recorded["n"] == 48
    assert summary["accuracy"] == recorded["accuracy"] > 0.9
    assert {k: v["n"] for k, v in summary["stages"].items()} == {k: v["n"] for k, v in recorded["stages"].items()}
    assert summary["stages"]["mine"]["n"] > 0  # the user's stage answers requests


def test_sklearn_stage_predictions_after_load_in_a_server_equal_those_before_save(user):
    """The API behind the flag: fit_text_cascade(models=...) then save; a fresh process serves the file
    and answers exactly what the fitted cascade answered before it was saved."""
    from leanscale.cascade import Cascade
    from leanscale.cascade.evaluation import fit_text_cascade, save_text_cascade
    from leanscale.cli._spec import import_object

    make = import_object("user/models.py:make_hashing", "--model", "test", kind="callable")
    texts, labels = user["texts"], user["labels"]
    result = fit_text_cascade(texts, labels, stages=["mine", "tfidf"], models={"mine": make()},
                              costs={"mine": 0.001, "tfidf": 0.01}, seed=0)
    probe = ["refund for my card please", "password locked again", "courier is late", "hello thanks",
             "invoice for the parcel"]
    before = result.cascade.predict_detailed(probe)
    before_mine = result.cascade.stages[0].predict_proba(probe)
    path = user["root"] / "served" / "c.json"
    path.parent.mkdir()
    save_text_cascade(result, path, source="test")
    assert json.loads(path.read_text())["stages"][0]["model"]["class"] == "skops"

    proc = _fresh_python(user["root"], SERVE_CODE.format(cascade=str(path), texts=probe))
    reply = json.loads(proc.stdout.strip().splitlines()[-1])
    assert reply["status"] == 200
    got = reply["body"]["predictions"]
    assert [r["label"] for r in got] == before.labels.tolist()
    assert [r["stage"] for r in got] == before.stage.tolist()
    np.testing.assert_allclose([r["confidence"] for r in got], before.confidence, rtol=0, atol=1e-12)
    # and in this process, the loaded stage's probabilities are the fitted one's
    np.testing.assert_array_equal(Cascade.load(path).stages[0].predict_proba(probe), before_mine)


# ------------------------------------------------------------------------------------ torch stage


def test_torch_head_stage_trains_on_embeddings_saves_as_a_graph_and_evaluates_without_the_users_code(
        user, capsys, monkeypatch):
    import leanscale.cascade.embedding_head as eh
    from leanscale.cascade import Cascade
    from leanscale.cascade.external_models import ExportedGraph
    from leanscale.cascade.user_stages import EmbeddingModuleClassifier

    monkeypatch.setattr(eh, "_minilm_encoder", _fake_encoder())
    root = user["root"]
    rc = main(_fit_args("out/t.json", "tfidf,head", "head=user/models.py:make_head") + ["--costs", "tfidf=0.001"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "head: Sequential head trained on MiniLM embeddings in" in captured.out
    doc = json.loads((root / "out" / "t.json").read_text())
    head = doc["stages"][1]
    assert head["name"] == "head" and head["model"]["class"] == "EmbeddingModuleClassifier"
    assert head["model"]["meta"]["graph"]["input"]["shape"] == [None, 384]
    recorded = json.loads((root / "out" / "t.eval.json").read_text())["test"]

    loaded = Cascade.load(root / "out" / "t.json").stages[1].model
    assert isinstance(loaded, EmbeddingModuleClassifier) and isinstance(loaded.head_, ExportedGraph)
    assert loaded.module is None  # nothing of the user's module is kept
    assert len(loaded.loss_history_) == 20 and loaded.loss_history_[-1] < loaded.loss_history_[0]

    proc = _fresh_python(root, FAKE_ENCODER + EVAL_CODE.format(cascade=str(root / "out" / "t.json"),
                                                               data=str(root / "data" / "tickets.csv")))
    summary = json.loads(proc.stdout)
    assert summary["examples_used"].startswith("the test split recorded")
    assert summary["accuracy"] == recorded["accuracy"]
    assert {k: v["n"] for k, v in summary["stages"].items()} == {k: v["n"] for k, v in recorded["stages"].items()}


def test_torch_head_state_round_trip_equals_before_save(monkeypatch):
    """get_state/from_state of the torch stage: the exported graph's probabilities are the trained module's."""
    import torch
    from torch import nn

    from leanscale.cascade.user_stages import EmbeddingModuleClassifier

    rng = np.random.default_rng(0)
    E = rng.normal(size=(90, 384)).astype(np.float32)
    y = np.array(["a", "b", "c"])[np.argmax(E[:, :3], axis=1)]
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(384, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 3))
    clf = EmbeddingModuleClassifier(module=module, encoder=None, epochs=30, lr=1e-2, batch_size=32).fit_embeddings(E, y)
    assert clf.head_ is not module and not torch.equal(clf.head_[0].weight, module[0].weight)  # a trained copy
    meta, arrays = clf.get_state()
    json.dumps(meta)  # JSON-able
    clone = EmbeddingModuleClassifier.from_state(meta, arrays)
    np.testing.assert_allclose(clone.predict_proba_embeddings(E), clf.predict_proba_embeddings(E), rtol=1e-6,
                               atol=1e-7)
    assert (clone.predict_embeddings(E) == y).mean() > 0.9


# -------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("models,stages,match", [
    (["mine=user/models.py:returns_none"], "mine,tfidf",
     r"The '--model' parameter of leanscale cascade fit must give stage 'mine' an unfitted scikit-learn classifier.*"
     r"Got None from 'user/models.py:returns_none'"),
    (["mine=user/models.py:returns_class"], "mine,tfidf",
     r"'--model' parameter .* Got the class LogisticRegression from 'user/models.py:returns_class', not an "
     r"instance: return LogisticRegression\(\.\.\.\)"),
    (["mine=user/models.py:returns_regressor"], "mine,tfidf",
     r"'--model' parameter .* Got LinearRegression from .*, which has no predict_proba method"),
    (["mine=user/models.py:make_own"], "mine,tfidf",
     r"'--model' parameter of leanscale cascade fit gives stage 'mine' a Own from 'user/models.py:make_own', which "
     r"cannot be saved without your code: .*Own"),
    (["head=user/models.py:make_wide_head"], "tfidf,head",
     r"'--model' parameter .* gives stage 'head' a Sequential .*, which must return one float tensor of logits "
     r"\(batch, n_classes\) = \(2, 3\).*Got a tensor of shape \(2, 5\)"),
    (["mine=user/models.py:make_tfidf"], "rules,tfidf",
     r"The '--model' parameter of leanscale cascade fit gives stage 'mine', which '--stages' does not list \(got "
     r"'rules,tfidf'\)\. Put it in '--stages' at its place"),
    (["mine=user/models.py:make_tfidf"], "mine,theirs",
     r"The '--stages' parameter of leanscale cascade fit must be one of .*'mine'.*Got 'theirs' instead\..*"
     r"given by '--model'"),
    ([], "rules,mine", r"The '--stages' parameter .*Got 'mine' instead\..* A stage of your own is given by '--model'"),
    (["tfidf=user/models.py:make_tfidf"], "tfidf", r"'--model' parameter .* names stage 'tfidf', which is a built-in"),
    (["mine"], "mine", r"'--model' parameter of leanscale cascade fit must look like 'NAME=package.module:factory'"),
    (["mine=user/models.py:make_tfidf", "mine=user/models.py:make_hashing"], "mine",
     r"'--model' parameter .* gives stage 'mine' twice"),
    (["mine=user/models.py:absent"], "mine", r"'--model' parameter .* has no attribute 'absent'"),
    (["mine=user/models.py:make_tfidf"], "mine", None),  # the control: the same flags with a good factory work
])
def test_bad_model_flags_are_errors_naming_the_flag(user, capsys, models, stages, match):
    rc = main(_fit_args("bad/c.json", stages, *models))
    err = capsys.readouterr().err
    if match is None:
        assert rc == 0, err
        return
    assert rc == 2 and "Traceback" not in err
    assert re.search(match, err), err


def test_api_refuses_models_with_names_of_the_api():
    from leanscale.cascade.evaluation import build_text_stages
    from leanscale.core.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match=r"The 'models' parameter of build_text_stages must give stage "
                                                    r"'mine' an unfitted scikit-learn classifier.*Got int"):
        build_text_stages(["mine"], ["a b"] * 10, ["x", "y"] * 5, models={"mine": 3})
    with pytest.raises(InvalidParameterError, match=r"The 'models' parameter of build_text_stages gives stage 'mine', "
                                                    r"which 'stages' does not list"):
        build_text_stages(["tfidf"], ["a b"] * 10, ["x", "y"] * 5, models={"mine": 3})


# --------------------------------------------------------------------------------------- progress


def test_a_slow_stage_fit_reports_progress_on_stderr(user, capsys, monkeypatch):
    """A step that blocks (a user's fit) reports through leanscale.core.progress while it runs."""
    import time

    import leanscale.cascade.external_models as ext
    import leanscale.cascade.user_stages as us
    import leanscale.core.progress as progress_module

    class Slow:
        def fit(self, X, y):
            time.sleep(0.7)
            self.classes_ = np.unique(y)
            return self

        def predict_proba(self, X):
            return np.full((len(X), len(self.classes_)), 1.0 / len(self.classes_))

    monkeypatch.delenv("LEANSCALE_NO_PROGRESS")
    monkeypatch.setattr(progress_module, "HEARTBEAT_S", 0.2)
    monkeypatch.setattr(ext, "sklearn_dumps", lambda m: b"")  # Slow is test code: its savability is not tested here
    stage = us.build_user_stage("slow", Slow(), ["a b"] * 10, ["x", "y"] * 5)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("slow: fit Slow on 10 texts:")]
    assert len(lines) >= 3, err  # during the fit (every 0.2 s here, 2 s by default) and a last line
    assert "elapsed" in lines[0] and "done in" in lines[-1]
    assert stage.name == "slow"
