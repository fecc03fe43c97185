"""GraNd with torch.func equals per-example gradient norms computed one example at a time."""

import copy
import doctest

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import leanscale.pruning.grand as grand_mod
from leanscale.core.errors import InvalidParameterError
from leanscale.models.cnn import BNCNN
from leanscale.pruning.grand import grand_scores


def _loop_reference(model, x, y, loss_fn=F.cross_entropy):
    """Per-example gradient norms with torch.autograd.grad in a plain loop (model in eval mode)."""
    model = copy.deepcopy(model).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    norms = []
    for i in range(len(x)):
        grads = torch.autograd.grad(loss_fn(model(x[i:i + 1]), y[i:i + 1]), params)
        norms.append(torch.sqrt(sum(g.double().pow(2).sum() for g in grads)).item())
    return np.array(norms)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 4))


def _bncnn():
    torch.manual_seed(1)
    model = BNCNN(n_classes=10, in_channels=1, width=4)
    for m in model.modules():  # running statistics far from the defaults, so they matter
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.train()


def test_doctests():
    assert doctest.testmod(grand_mod, raise_on_error=False).failed == 0


def test_grand_equals_loop_of_autograd_on_an_mlp():
    model = _mlp()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(11, 5, generator=g), torch.randint(0, 4, (11,), generator=g)
    expected = _loop_reference(model, x, y)
    got = grand_scores(model, (x, y), batch_size=4)  # chunks 4, 4, 3
    assert got.dtype == np.float64 and got.shape == (11,)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert np.ptp(got) > 0.1 * got.mean()  # the examples really differ
    # numpy inputs and a DataLoader give the same numbers
    np.testing.assert_allclose(grand_scores(model, (x.double().numpy(), y.numpy().astype(np.int32))), expected, rtol=1e-5)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=5)
    np.testing.assert_allclose(grand_scores(model, loader), expected, rtol=1e-5)
    np.testing.assert_allclose(grand_scores(model, (x, y), device="cpu"), expected, rtol=1e-5)


def test_grand_equals_loop_of_autograd_on_a_bncnn_in_eval_mode():
    model = _bncnn()
    before = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 1, 12, 12, generator=g), torch.randint(0, 10, (6,), generator=g)
    expected = _loop_reference(model, x, y)
    got = grand_scores(model, (x, y), batch_size=4)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # the running statistics are used: other buffers give other scores
    reset = copy.deepcopy(model)
    for m in reset.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
    assert np.abs(grand_scores(reset, (x, y)) / got - 1).max() > 1e-2
    # the model is as it was: modes, parameters, buffers, no .grad
    assert [m.training for m in model.modules()] == modes and model.training
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    model.zero_grad(set_to_none=True)
    grand_scores(model, (x, y))
    assert all(p.grad is None for p in model.parameters())


def test_grand_only_differentiates_trainable_parameters():
    model = _mlp()
    model[0].weight.requires_grad_(False)  # frozen: not part of the norm
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(7, 5, generator=g), torch.randint(0, 4, (7,), generator=g)
    np.testing.assert_allclose(grand_scores(model, (x, y)), _loop_reference(model, x, y), rtol=1e-5)


def test_grand_of_several_models_is_the_mean_and_custom_loss():
    models = [_mlp(0), _mlp(1)]
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(9, 5, generator=g), torch.randint(0, 4, (9,), generator=g)
    each = [grand_scores(m, (x, y)) for m in models]
    np.testing.assert_allclose(grand_scores(models, (x, y), batch_size=2), (each[0] + each[1]) / 2, rtol=1e-6)
    # a one-pass iterable is read once for all models
    batches = ((x[i:i + 3], y[i:i + 3]) for i in range(0, 9, 3))
    np.testing.assert_allclose(grand_scores(tuple(models), batches), (each[0] + each[1]) / 2, rtol=1e-6)

    def loss_fn(logits, target):  # (1, k), (1, k): squared error to a one-hot target
        return 3.0 * ((logits - target) ** 2).sum()

    onehot = F.one_hot(y, 4).float()
    expected = _loop_reference(models[0], x, onehot, loss_fn)
    np.testing.assert_allclose(grand_scores(models[0], (x, onehot), loss_fn=loss_fn), expected, rtol=1e-5)


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a value: impossible under vmap
            return self.linear(x)
        return -self.linear(x)


def test_grand_bad_input():
    model = _mlp()
    x, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    with pytest.raises(InvalidParameterError, match=r"labels in \[0, 4\).*Got 4 at position 2"):
        grand_scores(model, (x, torch.tensor([0, 1, 4, 3])))
    with pytest.raises(InvalidParameterError, match="integer class indices"):
        grand_scores(model, (x, y.float()))
    with pytest.raises(InvalidParameterError, match="must be a pair \\(x, y\\).*labels are needed"):
        grand_scores(model, x)
    with pytest.raises(InvalidParameterError, match="must yield \\(x, y\\) batches"):
        grand_scores(model, iter([x[:2], x[2:]]))
    with pytest.raises(InvalidParameterError, match=r"same length\. Got x=4, y=3"):
        grand_scores(model, (x, y[:3]))
    with pytest.raises(InvalidParameterError, match="'model' parameter of grand_scores must be an nn.Module"):
        grand_scores([], (x, y))
    with pytest.raises(InvalidParameterError, match="'model' parameter of grand_scores must be an nn.Module"):
        grand_scores([model, "not a model"], (x, y))
    frozen = _mlp().requires_grad_(False)
    with pytest.raises(InvalidParameterError, match="require grad"):
        grand_scores(frozen, (x, y))
    with pytest.raises(InvalidParameterError, match="'batch_size' parameter of grand_scores"):
        grand_scores(model, (x, y), batch_size=0)
    with pytest.raises(InvalidParameterError, match="'loss_fn' parameter of grand_scores"):
        grand_scores(model, (x, y), loss_fn="mse")
    with pytest.raises(InvalidParameterError, match="at least one example"):
        grand_scores(model, (x[:0], y[:0]))
    breaks = _DataDependent()
    with pytest.raises(InvalidParameterError, match="must run under torch.func.vmap.*torch said"):
        grand_scores(breaks, (torch.randn(3, 3), torch.tensor([0, 1, 0])))
    assert breaks.training  # mode restored after the error
