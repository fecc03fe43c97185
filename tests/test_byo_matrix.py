"""Bring your own model (#15): the techniques on models leanscale did not write.

Model families: (a) a Hugging Face Llama-style causal LM built from a config (no weights), (b) a
``nn.TransformerEncoder`` classifier, (c) a ResNet-style CNN calling ``F.relu`` in ``forward``,
(d) a scikit-learn estimator. Each test compares with a brute force or a closed form. MoE and SWAT
conversions of these families are tested in ``tests/sparse/`` (``test_moe_third_party.py``,
``test_swat_third_party.py``), cascades of sklearn and torch stages in ``tests/cascade/``, the
trainers' callbacks in ``tests/integrations/``.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------------------------- the models
def llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


class EncoderClassifier(nn.Module):
    """Token ids (b, T) -> (b, k) logits through ``nn.TransformerEncoder`` and a mean pool."""

    def __init__(self, vocab=50, d=32, k=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d, k)

    def forward(self, ids):
        return self.head(self.encoder(self.embed(ids)).mean(1))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))  # functional activations, as torchvision's ResNet does
        return F.relu(x + self.bn2(self.conv2(out)))


class ResNetish(nn.Module):
    """(b, 1, 12, 12) images -> (b, 10) logits: stem, two residual blocks, pool, head."""

    def __init__(self, c=8):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.blocks = nn.Sequential(Block(c), Block(c))
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def images(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = torch.randn(n, 1, 12, 12, generator=g) * 0.5
    for c in range(10):
        x[y == c, 0, c, :] += 2.0
    return x, y


# ---------------------------------------------------------------------- large batches
def test_ghost_batchnorm_on_a_resnet_with_functional_relus_is_batchnorm_per_ghost_batch():
    from leanscale.large_batch import apply_ghost_batchnorm

    torch.manual_seed(0)
    dense = ResNetish().train()
    ghost = apply_ghost_batchnorm(copy.deepcopy(dense), 4)
    x, _ = images(16)
    expected = torch.cat([dense(chunk) for chunk in x.split(4)])  # brute force: BatchNorm per ghost batch
    assert torch.allclose(ghost(x), expected, atol=1e-5)
    assert sum(isinstance(m, nn.BatchNorm2d) and type(m) is nn.BatchNorm2d for m in ghost.modules()) == 0


def _grad(model, loss_fn, x, y):
    model.zero_grad()
    loss_fn(model(x), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]).double()


def test_noise_scale_of_an_hf_llama_matches_the_gradients_computed_by_hand():
    from leanscale.large_batch import measure_noise_scale

    model = llama()
    g = torch.Generator().manual_seed(0)
    ids = (torch.randint(0, 64, (24, 1), generator=g) + torch.arange(17)) % 64  # counting: a clear signal
    batches = [(ids[i:i + 6, :-1], ids[i:i + 6, 1:]) for i in range(0, 24, 6)]  # 4 batches of 6 sequences

    def loss_fn(out, y):  # the HF output's logits (b, T, V) against the next tokens (b, T)
        return F.cross_entropy(out.logits.flatten(0, 1), y.flatten())

    result = measure_noise_scale(model, loss_fn, batches, n_batches=4)
    grads = [_grad(model, loss_fn, x, y) for x, y in batches]
    small = [float(g_.pow(2).sum()) for g_ in grads]
    big = float(torch.stack(grads).mean(0).pow(2).sum())
    assert result.small_sq_norms == pytest.approx(small, rel=1e-4)
    assert result.big_sq_norm == pytest.approx(big, rel=1e-4)
    # McCandlish et al.'s unbiased estimators (Appendix A), B_small = 6, B_big = 24
    g2 = (24 * big - 6 * np.mean(small)) / (24 - 6)
    s = (np.mean(small) - big) / (1 / 6 - 1 / 24)
    assert result.b_simple == pytest.approx(s / g2, rel=1e-3)


def test_sharpness_of_a_transformer_encoder_is_a_real_ascent_and_leaves_the_weights():
    from leanscale.large_batch import sharpness

    torch.manual_seed(0)
    model = EncoderClassifier()
    g = torch.Generator().manual_seed(1)
    ids, y = torch.randint(0, 50, (32, 7), generator=g), torch.randint(0, 3, (32,), generator=g)
    before = copy.deepcopy(model.state_dict())
    r = sharpness(model, F.cross_entropy, (ids, y), eps=1e-2, steps=3)
    model.eval()
    with torch.no_grad():
        assert r.loss == pytest.approx(float(F.cross_entropy(model(ids), y)), rel=1e-5)  # f(x) at the given weights
    assert r.max_loss >= r.loss and r.sharpness == pytest.approx(100 * (r.max_loss - r.loss) / (1 + r.loss))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------- data pruning
def test_data_pruner_scores_with_a_users_resnet():
    from leanscale.pruning import DataPruner

    x, y = images(64)
    pruner = DataPruner(metric="el2n", keep=0.5, model_fn=ResNetish, score_epochs=1, n_seeds=1,
                        batch_size=16).fit(x, y)
    scores = pruner.scores_
    assert scores.shape == (64,) and np.isfinite(scores).all()
    assert ((0 <= scores) & (scores <= np.sqrt(2) + 1e-6)).all()  # EL2N: |p - onehot| lies in [0, sqrt 2]
    assert len(pruner.transform()) == 32


def test_infobatch_with_the_engine_on_a_transformer_encoder():
    from leanscale.pruning import InfoBatch
    from leanscale.train import fit

    torch.manual_seed(0)
    model = EncoderClassifier()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 50, (64, 7), generator=g)
    y = (ids[:, 0] % 3).long()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    ib = InfoBatch(64, epochs=4, prune_ratio=0.5, seed=0)

    def loss_fn(net, idx):
        losses = F.cross_entropy(net(ids[idx]), y[idx], reduction="none")  # (b,)
        return (losses * ib.weights(idx)).mean(), losses.detach()

    steps = []
    for epoch in range(4):
        batches = list(ib.epoch_indices(epoch).split(16))
        steps.append(fit(model, opt, batches, loss_fn, n_steps=len(batches),
                         on_step=lambda out: ib.update(out.batch, out.extra)).steps)
    assert steps[0] == 4 and min(steps[1:3]) < 4 and np.isfinite(ib.losses_).all()


def test_active_learning_with_a_scikit_learn_model_beats_random_queries():
    from sklearn.linear_model import LogisticRegression

    from leanscale.pruning import ActiveLearner

    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 5))
    y = (X[:, 0] + 0.3 * X[:, 1] > 0).astype(int)
    learner = ActiveLearner(LogisticRegression(), strategy="margin", batch_size=10, initial_size=10, seed=0)
    labelled = []
    for _ in range(4):
        idx = learner.query(X)
        assert len(set(idx.tolist())) == len(idx) and not set(idx.tolist()) & set(labelled)  # new, distinct
        learner.teach(idx, y[idx])
        labelled += idx.tolist()
    assert len(labelled) == 40
    acc = (learner.model.predict(X) == y).mean()
    assert acc > 0.9  # 40 well-chosen labels of a linear problem
