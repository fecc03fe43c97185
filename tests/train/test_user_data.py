"""``as_logits`` / ``output_cross_entropy``: the logits in whatever a user's model returns (#15)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from leanscale.train.user_data import as_logits, output_cross_entropy


def test_as_logits_finds_the_logits_in_every_common_output():
    z = torch.randn(4, 3)
    assert as_logits(z) is z
    assert as_logits((z, torch.tensor(1.0))) is z  # (logits, loss) models
    assert as_logits({"logits": z, "loss": None}) is z
    transformers = pytest.importorskip("transformers")
    out = transformers.modeling_outputs.SequenceClassifierOutput(logits=z)
    assert as_logits(out) is z
    assert as_logits("nothing") == "nothing"  # left for the caller's check to name


def test_output_cross_entropy_equals_cross_entropy_of_the_logits():
    z, y = torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    assert torch.equal(output_cross_entropy((z,), y), F.cross_entropy(z, y))


def test_train_classifier_trains_an_hf_classifier_on_token_ids():
    """fit_classifier's checks accept int64 token ids and HF outputs; accuracy is measured on the logits."""
    transformers = pytest.importorskip("transformers")
    from leanscale.train.classifier import evaluate

    cfg = transformers.BertConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, max_position_embeddings=8, num_labels=2)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg)
    x = torch.randint(1, 20, (6, 5))
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    acc, loss = evaluate(model, x, y, batch_size=4)
    model.eval()
    with torch.no_grad():
        logits = model(x).logits
    assert acc == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
