"""EL2N, uncertainty scores and collect_probs against hand-computed values; bad inputs."""

import copy
import doctest
import math

import numpy as np
import pytest
import torch
from torch import nn

import leanscale.pruning.scores as scores_mod
from leanscale.core.errors import InvalidParameterError
from leanscale.pruning.scores import collect_probs, el2n_scores, uncertainty_scores

PROBS = np.array([
    [0.7, 0.2, 0.1],
    [0.1, 0.3, 0.6],
    [0.0, 0.0, 1.0],
])
LABELS = np.array([0, 1, 2])


def test_doctests():
    assert doctest.testmod(scores_mod, raise_on_error=False).failed == 0


def test_el2n_hand_values():
    expected = [
        math.sqrt(0.3**2 + 0.2**2 + 0.1**2),  # 1 - 0.7 on the true class, the rest as they are
        math.sqrt(0.1**2 + 0.7**2 + 0.6**2),
        0.0,  # a perfect prediction
    ]
    got = el2n_scores(PROBS, LABELS)
    assert got.dtype == np.float64 and got.shape == (3,)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    # a confident wrong prediction has the largest possible score sqrt(2)
    assert el2n_scores([[1.0, 0.0]], [1])[0] == pytest.approx(math.sqrt(2))
    # tensors (float32 rows summing to 1 within float error) give the same numbers
    got_t = el2n_scores(torch.tensor(PROBS, dtype=torch.float32), torch.tensor(LABELS))
    np.testing.assert_allclose(got_t, expected, rtol=1e-6)


def test_el2n_of_several_seeds_averages_the_norms():
    # three seeds that each predict one class with certainty; the true class is 0
    seeds = [np.array([[1.0, 0.0, 0.0], [0.2, 0.8, 0.0]]),
             np.array([[0.0, 1.0, 0.0], [0.2, 0.8, 0.0]]),
             np.array([[0.0, 0.0, 1.0], [0.2, 0.8, 0.0]])]
    labels = [0, 1]
    got = el2n_scores(seeds, labels)
    mean_of_norms = (0.0 + math.sqrt(2) + math.sqrt(2)) / 3  # the paper's E_w ||p - y||
    norm_of_mean = math.sqrt((2 / 3) ** 2 + (1 / 3) ** 2 + (1 / 3) ** 2)  # ||E_w p - y||: not this
    assert abs(mean_of_norms - norm_of_mean) > 0.1
    np.testing.assert_allclose(got, [mean_of_norms, math.sqrt(0.2**2 + 0.2**2)], rtol=1e-12)
    np.testing.assert_allclose(el2n_scores(tuple(torch.tensor(s) for s in seeds), labels), got, rtol=1e-12)
    np.testing.assert_allclose(el2n_scores([PROBS], LABELS), el2n_scores(PROBS, LABELS))


def test_uncertainty_hand_values():
    margin = uncertainty_scores(PROBS)  # default kind
    np.testing.assert_allclose(margin, [1 - (0.7 - 0.2), 1 - (0.6 - 0.3), 0.0], rtol=1e-12, atol=1e-15)
    entropy = uncertainty_scores(PROBS, kind="entropy")
    h = lambda ps: -sum(p * math.log(p) for p in ps if p > 0)
    np.testing.assert_allclose(entropy, [h([0.7, 0.2, 0.1]), h([0.1, 0.3, 0.6]), 0.0], rtol=1e-12, atol=1e-15)
    assert uncertainty_scores([[1 / 3] * 3], kind="entropy")[0] == pytest.approx(math.log(3))
    least = uncertainty_scores(PROBS, kind="least_confidence")
    np.testing.assert_allclose(least, [0.3, 0.4, 0.0], rtol=1e-12, atol=1e-15)
    # one class: every prediction is certain
    for kind in ("margin", "entropy", "least_confidence"):
        np.testing.assert_array_equal(uncertainty_scores(np.ones((2, 1)), kind=kind), [0.0, 0.0])
    # ties at the top: margin 1 (most uncertain)
    assert uncertainty_scores([[0.5, 0.5, 0.0]])[0] == pytest.approx(1.0)


def _tiny_linear():
    torch.manual_seed(0)
    return nn.Linear(4, 3)


def test_collect_probs_is_the_softmax_and_el2n_of_a_tiny_model():
    model = _tiny_linear()
    x = torch.randn(10, 4)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    with torch.no_grad():
        logits = model(x).double()  # (10, 3)
    manual = torch.exp(logits) / torch.exp(logits).sum(1, keepdim=True)
    probs = collect_probs(model, x, batch_size=3)
    assert probs.dtype == np.float64 and probs.shape == (10, 3)
    np.testing.assert_allclose(probs, manual.numpy(), rtol=1e-6)
    # the same from a pair, a DataLoader, a numpy float64 array (cast to the model's float32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    np.testing.assert_allclose(collect_probs(model, (x, y)), probs, rtol=1e-12)
    np.testing.assert_allclose(collect_probs(model, loader), probs, rtol=1e-12)
    np.testing.assert_allclose(collect_probs(model, x, device=torch.device("cpu")), probs, rtol=1e-12)
    np.testing.assert_allclose(collect_probs(model, x.double().numpy()), probs, rtol=1e-12)
    # EL2N of the model by hand: || softmax - onehot ||
    onehot = np.eye(3)[y.numpy()]
    expected = np.sqrt(((manual.numpy() - onehot) ** 2).sum(1))
    np.testing.assert_allclose(el2n_scores(probs, y), expected, rtol=1e-6)


def test_collect_probs_uses_eval_mode_and_restores_each_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
    model[1].running_mean.uniform_(-1, 1)
    model.train()
    model[3].eval()  # a mixed state must come back as it was
    modes = [m.training for m in model.modules()]
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(6, 4)
    probs = collect_probs(model, x)
    assert [m.training for m in model.modules()] == modes == [True, True, True, True, False]
    for k, v in model.state_dict().items():  # running statistics untouched
        torch.testing.assert_close(v, before[k])
    assert all(p.grad is None for p in model.parameters())
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        expected = torch.softmax(reference(x).double(), 1).numpy()
    np.testing.assert_allclose(probs, expected, rtol=1e-6)  # eval: running stats, no dropout


@pytest.mark.parametrize(
    ("probs", "labels", "match"),
    [
        (np.ones(3) / 3, [0], "'probs' parameter of el2n_scores must be a 2-d array"),
        (np.ones((2, 3, 1)) / 3, [0, 1], "must be a 2-d array"),
        ([[0.5, 0.6]], [0], r"row 0 summing to 1\.1"),
        ([[2.0, -1.0]], [0], "non-negative"),
        ([[np.nan, 1.0]], [0], "finite"),
        ([[0.5, 0.5]], [2], r"labels.*\[0, 2\).*Got 2 at index 0"),
        ([[0.5, 0.5]], [-1], r"labels.*Got -1"),
        ([[0.5, 0.5]], [0.0], "integer class indices"),
        ([[0.5, 0.5]], [[0]], "'labels' parameter of el2n_scores must be a 1-d array"),
        ([[0.5, 0.5], [0.5, 0.5]], [0], r"same length\. Got probs=2, labels=1"),
        ([np.ones((2, 2)) / 2, np.ones((2, 3)) / 3], [0, 1], r"same shape.*\(2, 2\), \(2, 3\)"),
        ([np.ones((2, 2)) / 2, np.ones((2, 2))], [0, 1], r"'probs\[1\]'.*sum to 1"),
        ([], [], "non-empty list"),
    ],
)
def test_el2n_bad_input(probs, labels, match):
    with pytest.raises(InvalidParameterError, match=match):
        el2n_scores(probs, labels)


def test_uncertainty_bad_input():
    with pytest.raises(InvalidParameterError, match=r"'kind'.*'entropy', 'least_confidence', 'margin'.*"
                                                    r"Got 'entropie'.*Did you mean 'entropy'"):
        uncertainty_scores(PROBS, kind="entropie")
    with pytest.raises(InvalidParameterError, match="'probs' parameter of uncertainty_scores must hold probabilities"):
        uncertainty_scores([[2.0, 0.0, 0.0]])
    with pytest.raises(InvalidParameterError, match="2-d"):
        uncertainty_scores(np.ones(3) / 3)


def test_collect_probs_bad_input():
    model = _tiny_linear()
    with pytest.raises(InvalidParameterError, match="'batch_size' parameter of collect_probs"):
        collect_probs(model, torch.randn(3, 4), batch_size=0)
    with pytest.raises(InvalidParameterError, match="'model' parameter of collect_probs"):
        collect_probs(lambda x: x, torch.randn(3, 4))
    with pytest.raises(InvalidParameterError, match="'data' parameter of collect_probs must be a tensor x"):
        collect_probs(model, 5)
    with pytest.raises(InvalidParameterError, match=r"same length\. Got x=3, y=2"):
        collect_probs(model, (torch.randn(3, 4), torch.zeros(2)))
    with pytest.raises(InvalidParameterError, match="'device' parameter"):
        collect_probs(model, torch.randn(3, 4), device="gpu7")
    with pytest.raises(InvalidParameterError, match=r"logits of shape \(3, n_classes\)\. Got \(3, 2, 2\)"):
        collect_probs(nn.Sequential(nn.Linear(4, 4), nn.Unflatten(1, (2, 2))), torch.randn(3, 4))
    with pytest.raises(InvalidParameterError, match="at least one example"):
        collect_probs(model, torch.randn(0, 4))
