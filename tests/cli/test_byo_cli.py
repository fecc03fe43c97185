"""Bring your own model and data (#15): the CLI from a temporary folder with the user's model file and data.

Run in-process (``leanscale.cli.main.main``) from ``tmp_path`` (``monkeypatch.chdir``): the model is
named ``module:factory`` (the current folder importable, no PYTHONPATH) or ``path/to/file.py:factory``;
the data are an .npz with string labels and a CSV. Each run is tiny (300 examples, 16 features).
"""

from __future__ import annotations

import csv
import json
import sys

import numpy as np
import pytest

from leanscale.cli.main import main

MODEL_SRC = """\
import torch.nn as nn


def build():
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))


def not_a_model():
    return 42
"""
CLASSES = ("cat", "dog", "eel")


@pytest.fixture
def byo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # what the CLI adds to it is undone after the test
    monkeypatch.setenv("LEANSCALE_NO_PROGRESS", "1")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    x[:, :3] += 4 * np.eye(3, dtype=np.float32)[y]  # separable: class c is feature c
    names = np.array(CLASSES)[y]
    np.savez(tmp_path / "data.npz", x=x, y=names)
    with open(tmp_path / "data.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([f"f{i}" for i in range(16)] + ["species"])
        w.writerows([*map(repr, map(float, row)), lab] for row, lab in zip(x, names))
    (tmp_path / "models").mkdir()
    (tmp_path / "byo_model_a.py").write_text(MODEL_SRC)
    (tmp_path / "models" / "net.py").write_text(MODEL_SRC)
    return {"x": x, "y": y, "names": names, "root": tmp_path}


def test_batch_train_module_model_on_npz_with_string_labels(byo, capsys):
    rc = main(["batch", "train", "--batch", "64", "--base-batch", "32", "--epochs", "2", "--model",
               "byo_model_a:build", "--data", "data.npz", "--out", "runs/new/run.json", "--json"])
    blob = json.loads(capsys.readouterr().out)
    assert rc == 0 and blob["classes"] == list(CLASSES) and blob["model"] == "byo_model_a:build"
    assert blob["test_accuracy"] > 0.8  # chance is 1/3: the user's model learned the user's data
    assert json.loads((byo["root"] / "runs" / "new" / "run.json").read_text())["data"].startswith("data.npz")


def test_batch_train_refuses_set_dataset_with_a_hint(byo, capsys):
    assert main(["batch", "train", "--batch", "64", "--set", "dataset=digits"]) == 2
    assert "must not set 'dataset': pass --data" in capsys.readouterr().err


def test_prune_score_file_model_on_csv_matches_the_api(byo, capsys):
    """`prune score --model models/net.py:build --data data.csv` gives the scores DataPruner computes."""
    import torch

    from leanscale.pruning import DataPruner

    rc = main(["prune", "score", "--model", "models/net.py:build", "--data", "data.csv", "--label-column", "species",
               "--epochs", "1", "--out", "scores/el2n"])
    assert rc == 0, capsys.readouterr().err
    scores = np.load(byo["root"] / "scores" / "el2n" / "scores.npy")
    manifest = json.loads((byo["root"] / "scores" / "el2n" / "manifest.json").read_text())
    assert manifest["data"]["classes"] == list(CLASSES) and manifest["data"]["model"] == "models/net.py:build"

    def build():
        return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))

    ref = DataPruner(metric="el2n", keep=1.0, strategy="hard", score_epochs=1, model_fn=build)
    ref.fit(torch.as_tensor(byo["x"]), byo["y"])
    np.testing.assert_allclose(scores, ref.scores_, rtol=1e-5, atol=1e-6)


def test_cascade_fit_on_a_csv_with_string_labels_creates_out_folders(byo, capsys):
    words = {"billing": ["refund", "invoice", "charge", "paid"], "login": ["password", "account", "locked", "reset"]}
    rng = np.random.default_rng(1)
    with open("tickets.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["body", "queue"])
        for i in range(120):
            queue = ("billing", "login")[i % 2]
            w.writerow([" ".join(rng.choice(words[queue], 3)) + " please help", queue])
    rc = main(["cascade", "fit", "--data", "tickets.csv", "--text-column", "body", "--label-column", "queue",
               "--stages", "rules,tfidf", "--out", "deep/new/folder/c.json"])
    out = capsys.readouterr().out
    assert rc == 0 and (byo["root"] / "deep" / "new" / "folder" / "c.json").is_file()
    assert "2 labels" in out
    rc = main(["cascade", "eval", "deep/new/folder/c.json", "--data", "tickets.csv", "--text-column", "body",
               "--label-column", "queue", "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert rc == 0 and summary["accuracy"] > 0.9


@pytest.mark.parametrize("spec,match", [
    ("nope_module_xyz:build", (r"'--model' parameter of leanscale batch train must name an importable callable.*"
                               r"current folder")),
    ("models/missing.py:build", r"'--model' parameter .* existing Python file.*no such file"),
    ("models/net.py:absent", r"'--model' parameter .* has no attribute 'absent'"),
    ("models/net.py:not_a_model", (r"'--model' parameter of leanscale batch train must return a torch.nn.Module. "
                                   r"Got int")),
])
def test_bad_model_flags_name_model(byo, capsys, spec, match):
    import re

    assert main(["batch", "train", "--batch", "64", "--base-batch", "32", "--model", spec, "--data", "data.npz"]) == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err


def test_data_errors_are_the_data_layers_messages(byo, capsys):
    assert main(["prune", "score", "--data", "data.csv", "--out", "p"]) == 2
    err = capsys.readouterr().err
    assert "data.csv' has no column 'label'" in err and "'f0', 'f1'" in err and "--label-column" in err
    assert main(["batch", "train", "--batch", "64", "--data", "missing.npz"]) == 2
    assert "The '--data' parameter of leanscale batch train must be one of 'fashion-mnist' or an existing" in \
        capsys.readouterr().err


def test_active_with_a_sklearn_model_on_csv(byo, capsys):
    (byo["root"] / "est.py").write_text(
        "from sklearn.linear_model import LogisticRegression\n\n\ndef make():\n    return LogisticRegression()\n")
    rc = main(["active", "--data", "data.csv", "--label-column", "species", "--model", "est.py:make", "--budget", "40",
               "--initial", "20", "--batch-size", "10", "--out", "al", "--json"])
    blob = json.loads(capsys.readouterr().out)
    assert rc == 0 and [h["n_labels"] for h in blob["history"]] == [20, 30, 40]
    assert blob["settings"]["model"] == "est.py:make"
    labelled = json.loads((byo["root"] / "al" / "history.json").read_text())["labeled_indices"]
    assert len(set(labelled)) == 40 and max(labelled) < 300


def test_sparse_train_user_model_and_export_needs_it_again(byo, capsys):
    (byo["root"] / "deep.py").write_text(
        "import torch.nn as nn\n\n\ndef build():\n    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), "
        "nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))\n")
    assert main(["sparse", "train", "--model", "deep.py:build", "--data", "data.npz", "--epochs", "1", "--sparsity",
                 "0.5", "--checkpoint", "ck/swat.pt", "--json"]) == 0
    blob = json.loads(capsys.readouterr().out)
    assert blob["model"] == "deep.py:build" and [layer["layer"] for layer in blob["swat_layers"]] == ["2"]
    assert main(["sparse", "export", "--checkpoint", "ck/swat.pt", "--out", "ck/pruned.pt"]) == 2
    assert "Pass --model deep.py:build" in capsys.readouterr().err
    assert main(["sparse", "export", "--model", "deep.py:build", "--checkpoint", "ck/swat.pt", "--out",
                 "ck/pruned.pt"]) == 0
