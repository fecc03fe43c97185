"""The scoring models' training loop: reproducible, every example once per epoch, the same steps
as a hand-written SGD loop, bad input."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leanscale.core.errors import InvalidParameterError
from leanscale.pruning._train import train_scoring_model
from leanscale.train.batches import epoch_batches


def _data(n=40, d=5, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, k, (n,), generator=g)
    return x, y


def _mlp():
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def test_epoch_batches_cover_every_example_once_and_are_not_smaller_than_batch_size():
    batches = epoch_batches(103, 10, epoch=0, seed=0)
    assert len(batches) == 10
    assert sorted(torch.cat(batches).tolist()) == list(range(103))
    assert min(len(b) for b in batches) >= 10 and max(len(b) for b in batches) <= 11
    again = epoch_batches(103, 10, epoch=0, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    other_epoch = epoch_batches(103, 10, epoch=1, seed=0)
    assert not torch.equal(torch.cat(batches), torch.cat(other_epoch))
    assert len(epoch_batches(5, 10, epoch=0, seed=0)) == 1  # fewer examples than a batch: one batch


def test_training_equals_a_hand_written_sgd_loop_with_cosine_lr():
    x, y = _data()
    lr, momentum, wd, epochs, bs = 0.2, 0.9, 1e-3, 2, 16
    model = train_scoring_model(_mlp, x, y, epochs=epochs, batch_size=bs, lr=lr, momentum=momentum,
                                weight_decay=wd, seed=3)

    torch.manual_seed(3)
    ref = _mlp()
    decay = [p for p in ref.parameters() if p.ndim >= 2]
    other = [p for p in ref.parameters() if p.ndim < 2]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": wd}, {"params": other, "weight_decay": 0.0}],
                          lr=lr, momentum=momentum)
    total = epochs * (40 // bs)
    step = 0
    for epoch in range(epochs):
        for idx in epoch_batches(40, bs, epoch, 3):
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            opt.zero_grad()
            F.cross_entropy(ref(x[idx]), y[idx]).backward()
            opt.step()
            step += 1
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_seeded_reproducible_global_rng_untouched_and_on_batch_sees_every_example():
    x, y = _data()
    seen = []
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = train_scoring_model(_mlp, x, y, epochs=1.5, batch_size=8, seed=1,
                            on_batch=lambda idx, logits, yb: seen.append((idx.clone(), logits.shape, yb.clone())))
    after = torch.rand(1)
    assert torch.equal(before, after)  # the global RNG was restored
    b = train_scoring_model(_mlp, x, y, epochs=1.5, batch_size=8, seed=1)
    c = train_scoring_model(_mlp, x, y, epochs=1.5, batch_size=8, seed=2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    assert len(seen) == round(1.5 * 5)
    first_epoch = torch.cat([s[0] for s in seen[:5]])
    assert sorted(first_epoch.tolist()) == list(range(40))
    for idx, shape, yb in seen:
        assert shape == (len(idx), 3) and torch.equal(yb, y[idx])


def test_numpy_inputs_and_training_learns():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5)).astype(np.float64)
    y = (x[:, 0] > 0).astype(np.int64)
    model = train_scoring_model(lambda: nn.Linear(5, 2), x, y, epochs=5, batch_size=20, lr=0.5, seed=0)
    acc = (model(torch.as_tensor(x, dtype=torch.float32)).argmax(1).numpy() == y).mean()
    assert acc > 0.9


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": 0}, "'epochs'"),
        ({"epochs": 1, "batch_size": 0}, "'batch_size'"),
        ({"epochs": 1, "lr": -1.0}, "'lr'"),
        ({"epochs": 1, "on_batch": 3}, "'on_batch'"),
    ],
)
def test_bad_parameters(kwargs, match):
    x, y = _data()
    with pytest.raises(InvalidParameterError, match=match):
        train_scoring_model(_mlp, x, y, **kwargs)


def test_bad_data_and_model_fn():
    x, y = _data()
    with pytest.raises(InvalidParameterError, match="'y'.*40 class indices"):
        train_scoring_model(_mlp, x, y[:10], epochs=1)
    with pytest.raises(InvalidParameterError, match="'y'.*non-negative integer"):
        train_scoring_model(_mlp, x, y.float(), epochs=1)
    with pytest.raises(InvalidParameterError, match="'x'.*at least 2 dimensions"):
        train_scoring_model(_mlp, x[:, 0], y, epochs=1)
    with pytest.raises(InvalidParameterError, match="'model_fn'.*nn.Module"):
        train_scoring_model(lambda: "not a model", x, y, epochs=1)
