"""The #15 test matrix through the command line: third-party model families with ``--model`` and ``--data``
from a temporary folder (the user's ``models.py`` next to their data, no PYTHONPATH).

Families: (a) a Hugging Face Llama-style classifier (``LlamaForSequenceClassification`` built from a config,
token ids in an ``.npz``), (b) a BERT-style encoder (``BertForSequenceClassification``, a tokenised Hugging
Face ``datasets`` folder with ``attention_mask`` and a ``ClassLabel``), (c) a ResNet-style CNN that calls
``F.relu`` (an image folder, one sub-folder per class), and GPT-2 (transformers' ``Conv1D`` projections:
SWAT train, checkpoint, export). The scikit-learn family (d) is covered by
``test_byo_cli.py::test_active_with_a_sklearn_model_on_csv`` and ``test_cascade_user_model.py``.

Each command's result is checked against the API on the same model and data (scores, noise-scale
estimates), or against what the data make learnable (accuracy well above chance), or against what the
conversion must find (SWAT: every ReLU functional, heads dense). Models and data are tiny: seconds each.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

pytest.importorskip("transformers", reason="the Hugging Face families need transformers (leanscale[hf])")

from leanscale.cli.main import main  # noqa: E402

MODELS = """\
import torch
import torch.nn.functional as F
from torch import nn


def llama():
    from transformers import LlamaConfig, LlamaForSequenceClassification
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                      num_labels=3, pad_token_id=0)
    return LlamaForSequenceClassification(cfg)


def bert():
    from transformers import BertConfig, BertForSequenceClassification
    cfg = BertConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=16, num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + x)


class ResNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.blocks = nn.Sequential(Block(8), Block(8))
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3)))


def resnet():
    return ResNetish()


class GPT2Classifier(nn.Module):
    # GPT-2 (transformers' Conv1D projections) with a linear head on the last position

    def __init__(self):
        super().__init__()
        from transformers import GPT2Config, GPT2Model
        self.body = GPT2Model(GPT2Config(vocab_size=40, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                                         bos_token_id=0, eos_token_id=0))
        self.head = nn.Linear(32, 3)

    def forward(self, ids):
        return self.head(self.body(ids).last_hidden_state[:, -1])


def gpt2():
    return GPT2Classifier()
"""
CLASSES = ("billing", "bug", "praise")


def _tokens(rng, n, seq=10, vocab=40):
    """Token ids whose first and last tokens give the class away (10 + class): BERT pools the first
    position, Llama's classifier reads the last. 0 is the padding id."""
    y = rng.integers(0, 3, n)
    x = rng.integers(1, vocab, (n, seq))
    x[:, 0] = x[:, -1] = 10 + y
    return x, y


@pytest.fixture
def project(tmp_path, monkeypatch):
    import datasets
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("LEANSCALE_NO_PROGRESS", "1")
    monkeypatch.setenv("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    rng = np.random.default_rng(0)
    (tmp_path / "models.py").write_text(MODELS)
    x, y = _tokens(rng, 192)
    np.savez(tmp_path / "tickets.npz", input_ids=x, y=np.array(CLASSES)[y])
    xb, yb = _tokens(rng, 160)
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int64")),
                                  "attention_mask": datasets.Sequence(datasets.Value("int8")),
                                  "label": datasets.ClassLabel(names=list(CLASSES))})
    ds = datasets.Dataset.from_dict({"input_ids": xb.tolist(), "attention_mask": np.ones_like(xb).tolist(),
                                     "label": yb.tolist()}, features=features)
    ds.save_to_disk(str(tmp_path / "tickets_ds"))
    # images: class c has a bright bar in row band c (12 x 12 grayscale), plus noise
    for c, name in enumerate(("horizontal", "middle", "bottom")):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(40):
            img = rng.integers(0, 60, (12, 12)).astype(np.uint8)
            img[4 * c:4 * c + 3, :] = 230
            Image.fromarray(img, mode="L").save(tmp_path / "images" / name / f"{i}.png")
    return tmp_path


def _run(capsys, *argv) -> dict:
    rc = main(list(argv))
    out = capsys.readouterr()
    assert rc == 0, out.err[-2000:]
    return json.loads(out.out)


def _model(name: str):
    """The user's factory, imported the way the CLI does (the current folder is the project)."""
    from leanscale.cli._spec import build_model

    return build_model(f"models.py:{name}", "--model", "test")


# ----------------------------------------------------------------------------------- (a) Llama


def test_llama_batch_train_on_token_ids_learns_the_task(project, capsys):
    blob = _run(capsys, "batch", "train", "--model", "models.py:llama", "--data", "tickets.npz", "--batch", "64",
                "--base-batch", "16", "--base-lr", "0.01", "--optimizer", "lamb", "--epochs", "3", "--json")
    assert blob["classes"] == list(CLASSES) and blob["data"].startswith("tickets.npz (npz; x='input_ids'")
    assert blob["test_accuracy"] >= 0.75  # chance is 1/3; the last token gives the class away
    assert blob["ledger"][0]["flops"] > 0


def test_llama_batch_noise_equals_the_api_on_the_same_model_and_batches(project, capsys):
    import torch

    from leanscale.data import load_dataset
    from leanscale.large_batch.noise_scale import measure_noise_scale
    from leanscale.train.user_data import output_cross_entropy

    blob = _run(capsys, "batch", "noise", "--model", "models.py:llama", "--data", "tickets.npz", "--batch-size",
                "16", "--n-batches", "6", "--warm-steps", "0", "--seed", "3", "--json")
    # the API on the same model (seeded as the CLI seeds it) and the same training split
    data = load_dataset("tickets.npz")
    train, _ = data.split(0.2, seed=0)
    torch.manual_seed(3)
    model = _model("llama")
    api = measure_noise_scale(model, output_cross_entropy, (torch.from_numpy(data.x[train]),
                                                            torch.from_numpy(data.y[train])),
                              batch_size=16, n_batches=6)
    assert blob["measurement"]["b_simple"] == pytest.approx(float(api.b_simple), rel=1e-5)
    assert blob["measurement"]["small_sq_norms"] == pytest.approx(api.small_sq_norms, rel=1e-5)
    assert blob["measurement"]["big_sq_norm"] == pytest.approx(api.big_sq_norm, rel=1e-5)


def test_llama_sparse_train_converts_projections_and_keeps_the_score_head_dense(project, capsys):
    blob = _run(capsys, "sparse", "train", "--model", "models.py:llama", "--data", "tickets.npz", "--sparsity",
                "0.5", "--epochs", "2", "--json")
    converted = {row["layer"] for row in blob["conversion"]["converted"]}
    skipped = {row["layer"]: row["reason"] for row in blob["conversion"]["skipped"]}
    for i in (0, 1):
        assert {f"model.layers.{i}.mlp.{p}_proj" for p in ("gate", "up", "down")} <= converted
    assert "output head kept dense" in skipped["score"]
    assert "embedding" in skipped["model.embed_tokens"]
    assert all(row["sparsity"] == 0.5 for row in blob["swat_layers"])


# ------------------------------------------------------------------------------------ (b) BERT


def _api_scores(metric: str, model: str, x, y, **kw) -> np.ndarray:
    """DataPruner with the user's factory, as `prune score` builds it."""
    from leanscale.cli._spec import import_object
    from leanscale.pruning import DataPruner

    factory = import_object(f"models.py:{model}", "--model", "test", kind="callable")
    pruner = DataPruner(metric=metric, keep=1.0, strategy="hard", model_fn=factory, **kw)
    return pruner.fit(x, y).scores_


def test_bert_prune_score_on_a_tokenised_datasets_folder_equals_data_pruner(project, capsys):
    import torch

    from leanscale.data import load_dataset

    rc = main(["prune", "score", "--model", "models.py:bert", "--data", "tickets_ds", "--metric", "el2n",
               "--epochs", "1", "--batch-size", "32", "--lr", "0.05", "--out", "scores/el2n"])
    assert rc == 0, capsys.readouterr().err
    scores = np.load(project / "scores" / "el2n" / "scores.npy")
    manifest = json.loads((project / "scores" / "el2n" / "manifest.json").read_text())
    assert manifest["data"]["classes"] == list(CLASSES)
    data = load_dataset("tickets_ds")  # attention_mask is not read as a feature
    assert data.kind == "tokens" and data.x.dtype == np.int64 and data.x.shape == (160, 10)
    ref = _api_scores("el2n", "bert", torch.from_numpy(data.x), data.y, score_epochs=1, batch_size=32, lr=0.05)
    np.testing.assert_allclose(scores, ref, rtol=1e-5, atol=1e-6)


def test_bert_batch_train_on_the_datasets_folder(project, capsys):
    blob = _run(capsys, "batch", "train", "--model", "models.py:bert", "--data", "tickets_ds", "--batch", "32",
                "--base-batch", "16", "--base-lr", "0.01", "--optimizer", "lamb", "--epochs", "4", "--json")
    assert blob["classes"] == list(CLASSES) and "token ids 'input_ids'" in blob["data"]
    assert blob["test_accuracy"] >= 0.75


# ------------------------------------------------------------------------- (c) ResNet, F.relu


def test_resnet_sparse_train_on_an_image_folder_covers_functional_relus(project, capsys):
    blob = _run(capsys, "sparse", "train", "--model", "models.py:resnet", "--data", "images", "--sparsity", "0.8",
                "--epochs", "3", "--set", "batch_size=32", "--json")
    report = blob["conversion"]
    assert report["functional_relu"] is True and report["not_covered"] == []
    converted = {row["layer"] for row in report["converted"]}
    assert converted == {f"blocks.{b}.conv{k}" for b in (0, 1) for k in (1, 2)}
    assert {row["layer"] for row in report["skipped"]} == {"stem", "fc"}
    assert blob["data"].startswith("images")


def test_resnet_batch_train_with_ghost_batchnorm_learns_the_images(project, capsys):
    blob = _run(capsys, "batch", "train", "--model", "models.py:resnet", "--data", "images", "--batch", "32",
                "--base-batch", "16", "--base-lr", "0.1", "--ghost-batch", "8", "--epochs", "4", "--json")
    assert blob["recipe"]["ghost_batch_size"] == 8
    assert blob["test_accuracy"] >= 0.8  # three bar positions: easy for a CNN


def test_resnet_prune_score_grand_matches_the_api(project, capsys):
    import torch

    from leanscale.data import load_dataset

    rc = main(["prune", "score", "--model", "models.py:resnet", "--data", "images", "--metric", "grand",
               "--epochs", "1", "--batch-size", "32", "--out", "scores/grand"])
    assert rc == 0, capsys.readouterr().err
    scores = np.load(project / "scores" / "grand" / "scores.npy")
    data = load_dataset("images")
    assert data.kind == "image" and data.x.shape == (120, 1, 12, 12)
    ref = _api_scores("grand", "resnet", torch.from_numpy(data.x), data.y, score_epochs=1, batch_size=32)
    np.testing.assert_allclose(scores, ref, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------ GPT-2 (Conv1D layers)


def test_gpt2_sparse_train_checkpoint_and_export_from_the_command_line(project, capsys):
    """SWAT on transformers' Conv1D: trained, checkpointed, exported; the exported weights load into a
    fresh model with the top-K sparsity in every converted projection and the first one dense."""
    import torch

    from leanscale.sparse import load_pruned

    blob = _run(capsys, "sparse", "train", "--model", "models.py:gpt2", "--data", "tickets.npz", "--sparsity", "0.7",
                "--epochs", "1", "--set", "batch_size=32", "--checkpoint", "swat.pt", "--json")
    converted = {row["layer"] for row in blob["conversion"]["converted"]}
    assert "body.h.1.mlp.c_fc" in converted and "body.h.0.attn.c_attn" not in converted  # first layer dense
    assert main(["sparse", "export", "--model", "models.py:gpt2", "--checkpoint", "swat.pt", "--out", "pruned.pt"]) == 0
    model = load_pruned(_model("gpt2"), project / "pruned.pt")
    for name in converted:
        weight = model.get_submodule(name).weight
        assert float((weight == 0).float().mean()) == pytest.approx(0.7, abs=0.01), name
    assert float((model.body.h[0].attn.c_attn.weight == 0).float().mean()) == 0.0
    with torch.no_grad():
        assert model(torch.ones(2, 10, dtype=torch.long)).shape == (2, 3)
