import copy

import pytest
import torch
from torch import nn

from leanscale.core.errors import InvalidParameterError
from leanscale.core.surgery import count_modules
from leanscale.large_batch.ghost_bn import (
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    apply_ghost_batchnorm,
    ghost_batch_sizes,
)
from leanscale.models.cnn import BNCNN, MLPClassifier

CASES = [  # (ghost class, BatchNorm class, input shape without the batch)
    (GhostBatchNorm1d, nn.BatchNorm1d, (6,)),
    (GhostBatchNorm1d, nn.BatchNorm1d, (6, 5)),
    (GhostBatchNorm2d, nn.BatchNorm2d, (6, 4, 3)),
    (GhostBatchNorm3d, nn.BatchNorm3d, (6, 2, 3, 2)),
]


def _pair(ghost_cls, bn_cls, ghost, momentum=0.1):
    torch.manual_seed(0)
    bn = bn_cls(6, momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    gbn = ghost_cls(6, ghost, momentum=momentum)
    gbn.load_state_dict(bn.state_dict())
    return gbn, bn


@pytest.mark.parametrize("batch,ghost", [(64, 16), (60, 16), (13, 4), (10, 3)])
@pytest.mark.parametrize("ghost_cls,bn_cls,shape", CASES)
def test_output_and_gradients_equal_chunked_batchnorm(ghost_cls, bn_cls, shape, batch, ghost):
    """Hoffer's Algorithm 1: BatchNorm applied to each ghost batch separately, then concatenated."""
    gbn, bn = _pair(ghost_cls, bn_cls, ghost)
    x = (torch.randn(batch, *shape) * 2 + 0.5).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    weights = torch.randn(batch, *shape)  # a loss that weighs every output differently

    out = gbn(x)
    (out * weights).sum().backward()

    sizes = ghost_batch_sizes(batch, ghost)
    assert sum(sizes) == batch and max(sizes) <= ghost and max(sizes) - min(sizes) <= 1
    ref = torch.cat([bn(chunk) for chunk in x_ref.split(sizes)])
    (ref * weights).sum().backward()

    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gbn.weight.grad, bn.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gbn.bias.grad, bn.bias.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("ghost_cls,bn_cls,shape", CASES)
def test_ghost_equal_to_batch_is_batchnorm_including_running_stats(ghost_cls, bn_cls, shape, momentum):
    gbn, bn = _pair(ghost_cls, bn_cls, ghost=32, momentum=momentum)
    for step in range(3):
        x = torch.randn(32, *shape) * (step + 1) + step
        assert torch.equal(gbn(x), bn(x))
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(gbn, name), getattr(bn, name), rtol=1e-6, atol=1e-7)
    assert int(gbn.num_batches_tracked) == int(bn.num_batches_tracked) == 3
    gbn.eval(), bn.eval()
    x = torch.randn(7, *shape)
    torch.testing.assert_close(gbn(x), bn(x), rtol=1e-5, atol=1e-6)  # running stats agree to rounding


def test_running_stats_follow_the_stated_rule():
    """running <- (1 - m) running + m * mean over ghost batches of (mean_j, unbiased var_j)."""
    gbn = GhostBatchNorm2d(3, 8, momentum=0.25)
    x = torch.randn(24, 3, 4, 4) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    gbn(x)
    chunks = x.split(8)
    means = torch.stack([c.mean(dim=(0, 2, 3)) for c in chunks]).mean(0)
    variances = torch.stack([c.transpose(0, 1).reshape(3, -1).var(dim=1, unbiased=True) for c in chunks]).mean(0)
    torch.testing.assert_close(gbn.running_mean, 0.25 * means, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gbn.running_var, 0.75 + 0.25 * variances, rtol=1e-5, atol=1e-6)


def test_eval_mode_is_batchnorm_with_running_stats():
    gbn, bn = _pair(GhostBatchNorm2d, nn.BatchNorm2d, ghost=4)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    gbn.load_state_dict(bn.state_dict())
    gbn.eval(), bn.eval()
    x = torch.randn(3, 6, 4, 3)  # smaller than the ghost batch: fine in eval mode
    assert torch.equal(gbn(x), bn(x))


def test_small_training_batch_raises_or_falls_back():
    gbn = GhostBatchNorm1d(6, 16)
    x = torch.randn(10, 6)
    with pytest.raises(InvalidParameterError, match=r"batch of 10 examples.*'ghost_batch_size' of 16"):
        gbn(x)
    assert int(gbn.num_batches_tracked) == 0  # nothing was updated
    lenient = GhostBatchNorm1d(6, 16, small_batch="batchnorm")
    bn = nn.BatchNorm1d(6)
    assert torch.equal(lenient(x), bn(x))


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"num_features": 4, "ghost_batch_size": 0}, "ghost_batch_size"),
        ({"num_features": 4, "ghost_batch_size": 2.5}, "ghost_batch_size"),
        ({"num_features": 0, "ghost_batch_size": 8}, "num_features"),
        ({"num_features": 4, "ghost_batch_size": 8, "small_batch": "skip"}, "small_batch"),
    ],
)
def test_constructor_bad_input(kwargs, name):
    with pytest.raises(InvalidParameterError, match=f"'{name}' parameter of GhostBatchNorm2d"):
        GhostBatchNorm2d(**kwargs)


def test_apply_converts_every_batchnorm_and_keeps_parameters_and_optimizer():
    torch.manual_seed(0)
    model = BNCNN(width=4)
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    params_before = [id(p) for g in opt.param_groups for p in g["params"]]
    keys_before = list(model.state_dict())
    n_bn = count_modules(model, nn.BatchNorm2d) + count_modules(model, nn.BatchNorm1d)

    assert apply_ghost_batchnorm(model, 8, optimizers=opt) is model
    assert sum(isinstance(m, (GhostBatchNorm1d, GhostBatchNorm2d)) for m in model.modules()) == n_bn == 5
    assert sum(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in model.modules()) == 0
    assert [id(p) for g in opt.param_groups for p in g["params"]] == params_before
    assert [id(p) for p in model.parameters()] == params_before
    assert list(model.state_dict()) == keys_before  # checkpoints load both ways
    reference.load_state_dict(model.state_dict())

    # With one ghost batch (ghost >= batch) the converted model trains exactly like the original.
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for net, o in ((model, opt), (reference, ref_opt)):
        for _ in range(2):
            o.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            o.step()
    for a, b in zip(model.state_dict().values(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_apply_twice_or_without_batchnorm_warns_and_changes_nothing():
    model = MLPClassifier(5, 8, 3)
    apply_ghost_batchnorm(model, 4)
    with pytest.warns(UserWarning, match="already has 1 Ghost BatchNorm"):
        apply_ghost_batchnorm(model, 4)
    plain = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    before = copy.deepcopy(plain.state_dict())
    with pytest.warns(UserWarning, match="no nn.BatchNorm1d/2d/3d"):
        assert apply_ghost_batchnorm(plain, 4) is plain
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())


def test_apply_bad_input_leaves_model_unchanged():
    model = BNCNN(width=4)
    with pytest.raises(InvalidParameterError, match="'ghost_batch_size' parameter of apply_ghost_batchnorm"):
        apply_ghost_batchnorm(model, -1)
    with pytest.raises(InvalidParameterError, match="'small_batch' parameter"):
        apply_ghost_batchnorm(model, 8, small_batch="maybe")
    with pytest.raises(InvalidParameterError, match="'model' parameter"):
        apply_ghost_batchnorm("not a model", 8)
    assert count_modules(model, GhostBatchNorm2d) == 0 and count_modules(model, nn.BatchNorm2d) == 4


def test_shared_buffers_move_with_the_model():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    apply_ghost_batchnorm(model, 2)
    model.double()
    out = model(torch.randn(6, 4, dtype=torch.float64))
    assert out.dtype == torch.float64 and model[1].running_mean.dtype == torch.float64


def test_accumulated_micro_batches_equal_one_batch():
    """Micro-batches that are multiples of the ghost batch, inside accumulate_running_stats, give
    the gradients and running statistics of the whole batch in one forward."""
    from leanscale.large_batch.ghost_bn import accumulate_running_stats

    torch.manual_seed(0)
    whole = apply_ghost_batchnorm(BNCNN(width=4), 8)
    micro = copy.deepcopy(whole)
    x, y = torch.randn(32, 1, 12, 12), torch.randint(0, 10, (32,))
    nn.functional.cross_entropy(whole(x), y).backward()
    with accumulate_running_stats(micro):
        for xb, yb in zip(x.split(16), y.split(16)):
            (nn.functional.cross_entropy(micro(xb), yb) * len(yb) / len(y)).backward()
    for (name, a), b in zip(whole.named_parameters(), micro.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
    for (name, a), b in zip(whole.named_buffers(), micro.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert int(micro.bn.num_batches_tracked) == 1
    # Without the context every micro-batch updates the running statistics.
    plain = copy.deepcopy(micro)
    for xb in x.split(16):
        plain(xb)
    assert int(plain.bn.num_batches_tracked) == 3
