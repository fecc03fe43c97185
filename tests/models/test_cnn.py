"""Tests of the BatchNorm classifiers."""

from __future__ import annotations

import doctest

import pytest
import torch
import torch.nn as nn

import leanscale.models.cnn as cnn_module
from leanscale.core.errors import InvalidParameterError
from leanscale.models import BNCNN, MLPClassifier


def test_doctests():
    result = doctest.testmod(cnn_module)
    assert result.attempted > 0 and result.failed == 0


def test_bncnn_shapes_and_batchnorm_layers():
    model = BNCNN()
    assert model(torch.randn(5, 1, 28, 28)).shape == (5, 10)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 4
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.modules()) == 1
    assert 50_000 < sum(p.numel() for p in model.parameters()) < 80_000  # "about 66k"
    rgb = BNCNN(n_classes=3, in_channels=3, width=8)
    assert rgb(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_bncnn_rejects_bad_width():
    with pytest.raises(InvalidParameterError, match="'width' parameter of BNCNN"):
        BNCNN(width=0)


def test_bncnn_fits_a_small_batch(one_thread):
    torch.manual_seed(0)
    model = BNCNN(width=8)
    x, y = torch.randn(16, 1, 12, 12), torch.randint(0, 10, (16,))  # small images: a fast test
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(20):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() > 0.8


@pytest.mark.parametrize("batchnorm", [True, False])
def test_mlp_classifier(batchnorm):
    model = MLPClassifier(in_features=784, hidden=64, n_classes=10, batchnorm=batchnorm)
    assert model(torch.randn(4, 1, 28, 28)).shape == (4, 10)  # images are flattened
    assert any(isinstance(m, nn.BatchNorm1d) for m in model.modules()) is batchnorm
    with pytest.raises(InvalidParameterError, match="'hidden' parameter of MLPClassifier"):
        MLPClassifier(784, 0, 10)


def test_bncnn_refuses_flat_or_wrong_channel_input():
    """Issue #13: a flat batch gave conv2d's error from deep inside the model."""
    model = BNCNN(n_classes=3, in_channels=1, width=2)
    with pytest.raises(InvalidParameterError, match="shape \\(batch, 1, height, width\\). Got shape \\(4, 784\\); flat"):
        model(torch.randn(4, 784))
    with pytest.raises(InvalidParameterError, match="Got shape \\(4, 3, 8, 8\\)"):
        model(torch.randn(4, 3, 8, 8))
    with pytest.raises(InvalidParameterError, match="at least 4x4 pixels"):
        model(torch.randn(4, 1, 2, 2))
    assert model(torch.randn(4, 1, 4, 4)).shape == (4, 3)


def test_num_classes_is_a_deprecated_alias_of_n_classes():
    """#14 naming pass: ``n_classes`` everywhere; ``num_classes`` works one release with a FutureWarning."""
    with pytest.warns(FutureWarning, match="'num_classes' parameter was renamed to 'n_classes'"):
        old = BNCNN(num_classes=3, width=2)
    assert old.classifier.out_features == 3
    with pytest.warns(FutureWarning, match="'num_classes'"):
        mlp = MLPClassifier(5, 4, num_classes=7)
    assert mlp.net[-1].out_features == 7
    assert MLPClassifier(5, 4, 7).net[-1].out_features == 7  # positional: no warning
    with pytest.raises(InvalidParameterError, match="'num_classes' parameter of BNCNN was renamed to 'n_classes'"):
        BNCNN(n_classes=4, num_classes=3)
    with pytest.raises(InvalidParameterError, match="of MLPClassifier was renamed.*Got both"):
        MLPClassifier(5, 4, 7, num_classes=7)
    with pytest.raises(InvalidParameterError, match="'n_classes' parameter of MLPClassifier.*Got None"):
        MLPClassifier(5, 4)  # missing
