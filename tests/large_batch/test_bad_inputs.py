"""Bad input to every public entry point of leanscale.large_batch (issue #13).

Each case must end in a clear error naming the parameter (an InvalidParameterError, never a bare
torch/Python exception from deep inside) or, where the result is legal but untrustworthy, in an
explicit warning carried by the result. The README's "Bad input" section lists the same cases.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from leanscale.core.errors import InvalidParameterError, LeanscaleError
from leanscale.large_batch import (
    LAMB,
    LARS,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GradientNoiseScale,
    LargeBatchRecipe,
    accumulate_running_stats,
    advise,
    ghost_batch_sizes,
    measure_noise_scale,
    scale_lr,
    sharpness,
    two_batch_estimates,
)
from leanscale.large_batch.train import TrainConfig, train_classifier

NAN, INF = math.nan, math.inf


def _net(bn: bool = True) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(4, 8), *([nn.BatchNorm1d(8)] if bn else []), nn.ReLU(), nn.Linear(8, 3)]
    return nn.Sequential(*layers)


def _xy(n: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def _image_data(n_train: int = 64, n_test: int = 32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n_train, 1, 8, 8, generator=g), torch.randint(0, 3, (n_train,), generator=g),
            torch.randn(n_test, 1, 8, 8, generator=g), torch.randint(0, 3, (n_test,), generator=g))


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"width": 2, "batch_size": 16, "epochs": 1.0, "n_test": 32, **kw})


# --------------------------------------------------------------------------- LargeBatchRecipe
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"base_epochs": INF}, "'base_epochs' parameter of LargeBatchRecipe"),
    ({"base_lr": INF}, "'base_lr' parameter of LargeBatchRecipe"),
    ({"warmup_epochs": INF}, "'warmup_epochs' parameter of LargeBatchRecipe"),
    ({"max_lr": INF}, "'max_lr' parameter of LargeBatchRecipe"),
    ({"clip_grad_norm": INF}, "'clip_grad_norm' parameter of LargeBatchRecipe"),
    ({"base_milestones": "5", "base_epochs": 10}, "'base_milestones' parameter of LargeBatchRecipe must be a sequence"),
    ({"base_milestones": 5, "base_epochs": 10}, "'base_milestones' parameter of LargeBatchRecipe must be a sequence"),
    ({"base_milestones": (True,), "base_epochs": 10}, "'base_milestones'"),
    ({"base_milestones": (NAN,), "base_epochs": 10}, "'base_milestones'"),
    # the run (2 epochs at regime adaptation 1) would end inside its own warmup
    ({"warmup_epochs": 100}, "'warmup_epochs' parameter of LargeBatchRecipe must be at most the epochs .*\\(2\\)"),
    ({"batch_size": True}, "'batch_size'"),
    ({"batch_size": 2.5}, "'batch_size'"),
    ({"ghost_batch_size": 1000}, "'ghost_batch_size'.*at most the batch"),
    ({"lr_rule": None}, "'lr_rule'"),
])
def test_recipe_refuses(kwargs, match):
    with pytest.raises(InvalidParameterError, match=match):
        LargeBatchRecipe(**{"batch_size": 256, **kwargs}).plan()


def test_recipe_refuses_an_infinite_scaled_lr():
    with pytest.raises(InvalidParameterError, match="'base_lr' parameter of LargeBatchRecipe gives a scaled LR of inf"):
        LargeBatchRecipe(batch_size=2**40, base_batch_size=1, base_lr=1e300, lr_rule="linear").plan()


def test_recipe_scheduler_refuses_a_non_optimizer():
    with pytest.raises(InvalidParameterError, match="'optimizer' parameter of LargeBatchRecipe.scheduler"):
        LargeBatchRecipe(batch_size=256).scheduler("sgd", 10)


@settings(max_examples=40, deadline=None)
@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5), st.booleans(), st.none(),
                 st.text(max_size=3)))
def test_recipe_base_lr_is_accepted_only_when_positive_and_finite(value):
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
          and math.isfinite(value * math.sqrt(2)))  # the scaled LR must not overflow either
    if ok:
        assert LargeBatchRecipe(batch_size=256, base_lr=value).plan().lr == pytest.approx(value * math.sqrt(2))
    else:
        with pytest.raises(InvalidParameterError, match="'base_lr'"):
            LargeBatchRecipe(batch_size=256, base_lr=value).plan()


@settings(max_examples=40, deadline=None)
@given(st.floats(0, 50), st.integers(129, 4096))
def test_recipe_warmup_longer_than_the_run_is_refused(warmup, batch):
    epochs = 1.0 * batch / 128  # regime adaptation 1: base_epochs * batch / base_batch
    if warmup <= epochs:
        assert LargeBatchRecipe(batch_size=batch, warmup_epochs=warmup).plan().warmup_epochs == warmup
    else:
        with pytest.raises(InvalidParameterError, match="'warmup_epochs'"):
            LargeBatchRecipe(batch_size=batch, warmup_epochs=warmup)


@settings(max_examples=30, deadline=None)
@given(st.one_of(st.integers(-3, 0), st.booleans(), st.floats(allow_nan=True), st.none()))
def test_scale_lr_bad_batch(batch):
    with pytest.raises(InvalidParameterError, match="'batch_size' parameter of scale_lr"):
        scale_lr(0.1, 128, batch)


# --------------------------------------------------------------------------- Ghost BatchNorm
@pytest.mark.parametrize(("make", "match"), [
    (lambda: GhostBatchNorm1d(8, 32, "raise"), "'eps' parameter of GhostBatchNorm1d"),  # eps is the 3rd argument
    (lambda: GhostBatchNorm1d(8, 32, momentum=2.0), "'momentum' parameter of GhostBatchNorm1d"),
    (lambda: GhostBatchNorm1d(8, 32, affine=1), "'affine' parameter"),
    (lambda: ghost_batch_sizes(10, 0), "'ghost_batch_size' parameter of ghost_batch_sizes"),
    (lambda: ghost_batch_sizes(0, 4), "'batch_size' parameter of ghost_batch_sizes"),
    (lambda: accumulate_running_stats("model").__enter__(), "'model' parameter of accumulate_running_stats"),
])
def test_ghost_bn_construction_refuses(make, match):
    with pytest.raises(InvalidParameterError, match=match):
        make()


@pytest.mark.parametrize(("module", "x", "match"), [
    (GhostBatchNorm1d(8, 32), torch.randn(64, 5), "must have 8 channels"),
    (GhostBatchNorm1d(8, 32), torch.randn(64, 8, 4, 4), "'input' of GhostBatchNorm1d must be a batch of the shape"),
    (GhostBatchNorm2d(8, 32), torch.randn(64, 8), "'input' of GhostBatchNorm2d"),
    # a ghost batch of one example without spatial dims: no statistics to take
    (GhostBatchNorm1d(8, 1), torch.randn(64, 8), "ghost batches with 1 value per channel"),
])
def test_ghost_bn_forward_refuses(module, x, match):
    with pytest.raises(InvalidParameterError, match=match):
        module.train()(x)


def test_ghost_batch_of_one_image_is_fine():
    """One example per ghost batch is legal when it has spatial positions (H * W values per channel)."""
    out = GhostBatchNorm2d(3, 1).train()(torch.randn(4, 3, 5, 5))
    torch.testing.assert_close(out[0].mean(dim=(1, 2)), torch.zeros(3), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- LARS / LAMB
@pytest.mark.parametrize("opt", [LARS, LAMB])
@pytest.mark.parametrize(("params", "match"), [
    ([], "must hold at least one parameter"),
    ("abc", "must be an iterable of parameters"),
    (None, "must be an iterable of parameters"),
    (_net(), "Got a model \\(Sequential\\): pass model.parameters\\(\\)"),
    ([torch.zeros(2, requires_grad=True), "w"], "Got str at index 1"),
    ([{"params": "abc"}], "'params' of param group 0 .* Got str"),
    ([{"params": [torch.zeros(2), 3]}], "Got list holding Tensor, int"),
    ([{"lr": 0.1}], "param group 0 .* must have a 'params' key"),
])
def test_optimizers_refuse_bad_params(opt, params, match):
    with pytest.raises(InvalidParameterError, match=f"'params' parameter of {opt.__name__} {match}"
                       if match.startswith("must") else match):
        opt(params, lr=0.1)


@pytest.mark.parametrize("opt", [LARS, LAMB])
def test_optimizers_accept_a_generator_of_parameters(opt):
    model = _net()
    o = opt(model.parameters(), lr=0.1)
    assert sum(len(g["params"]) for g in o.param_groups) == len(list(model.parameters()))


# --------------------------------------------------------------------------- noise scale
def _noise(data=None, model=None, loss_fn=F.cross_entropy, **kw):
    return measure_noise_scale(model or _net(), loss_fn, data if data is not None else _xy(),
                               **{"batch_size": 8, "n_batches": 4, **kw})


@pytest.mark.parametrize(("call", "match"), [
    (lambda: _noise((torch.full((64, 4), NAN), _xy()[1])), "'data' parameter of measure_noise_scale must hold only finite"),
    (lambda: _noise((torch.where(torch.arange(64)[:, None] == 37, INF, _xy()[0]), _xy()[1])), "in example 37"),
    (lambda: _noise([(torch.full((8, 4), NAN), _xy()[1][:8])] * 3), "in example 0 of batch 0"),
    (lambda: _noise((torch.randn(64, 5), _xy()[1])), "'model' parameter of measure_noise_scale failed .*shape \\(8, 5\\)"),
    (lambda: _noise((_xy()[0], _xy()[1] + 5)), "'loss_fn' parameter of measure_noise_scale failed .*class indices"),
    (lambda: _noise((_xy()[0], _xy()[1].float())), "'loss_fn' parameter of measure_noise_scale failed"),
    (lambda: _noise((_xy()[0].long(), _xy()[1])), "'model' parameter of measure_noise_scale failed"),
    (lambda: _noise(loss_fn=lambda o, y: torch.tensor(1.0)), "'loss_fn' .* without a gradient"),
    (lambda: _noise(loss_fn=lambda o, y: F.cross_entropy(o, y).detach()), "'loss_fn' .* without a gradient"),
    (lambda: _noise(batch_size=1, n_batches=8), "'model' parameter of measure_noise_scale failed"),  # BatchNorm, 1 example
    (lambda: _noise([(_xy()[0], _xy()[1][:3]), (_xy()[0], _xy()[1])]), "'loss_fn' parameter of measure_noise_scale failed"),
    (lambda: _noise((_xy()[0], _xy()[1][:10])), "same first dimension"),
    (lambda: _noise("data"), "'data' parameter"),
    (lambda: _noise(model=_net().requires_grad_(False)), "'model' parameter .*requires_grad"),
    (lambda: two_batch_estimates("a", 8, 1.0, 64), "'small_sq_norm' parameter of two_batch_estimates"),
    (lambda: two_batch_estimates(None, 8, 1.0, 64), "'small_sq_norm'"),
    (lambda: two_batch_estimates(1.0, 8, [1.0], 64), "'big_sq_norm'"),
    (lambda: GradientNoiseScale().load_state_dict({**GradientNoiseScale().state_dict(), "history": [1, 2]}),
     "'history' parameter of GradientNoiseScale.load_state_dict must be a list of dicts"),
])
def test_noise_scale_refuses(call, match):
    with pytest.raises(InvalidParameterError, match=match):
        call()


def test_model_state_is_restored_after_a_refused_batch():
    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with pytest.raises(InvalidParameterError):
        _noise((_xy()[0], _xy()[1] + 5), model=model)
    assert not model.training
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_zero_gradients_are_unreliable_not_inf():
    """A loss that ignores the parameters gives |G|^2 = tr(Sigma) = 0: no number to act on."""
    with pytest.warns(RuntimeWarning, match="every gradient was zero"):
        res = _noise(loss_fn=lambda o, y: (o * 0).sum())
    assert not res.reliable and "every gradient was zero" in res.warning


def test_noise_dominated_measurement_says_so():
    """2 small batches of 2: the |G|^2 or tr(Sigma) estimate is <= 0 or its error is huge for most seeds;
    whenever that happens the result must say unreliable (and warn), never just carry the number."""
    flagged = 0
    for seed in range(8):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = _noise(_xy(64, seed), batch_size=2, n_batches=2, seed=seed)
        bad_estimate = not (res.grad_sq_norm > 0 and res.trace_sigma > 0)
        if bad_estimate:
            assert not res.reliable
        assert res.reliable == (res.warning is None)
        assert (not res.reliable) == any("unreliable" in str(w.message) for w in caught)
        if not res.reliable:
            flagged += 1
            with pytest.warns(RuntimeWarning, match="unreliable"):
                advice = res.advise(max_batch=64)
            assert any("unreliable" in w for w in advice.warnings) and str(advice).startswith("Warning:")
    assert flagged >= 4


def test_reliable_measurement_does_not_warn():
    x = torch.randn(4096, 4, generator=torch.Generator().manual_seed(1))
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = _noise((x, y), model=_net(bn=False), batch_size=64, n_batches=32)
        assert res.reliable and res.warning is None and res.relative_error < 1
        assert res.n_examples == 4096


def test_noise_with_nan_gradients_cannot_be_advised():
    model = _net(bn=False)
    with torch.no_grad():
        model[0].weight.fill_(INF)
    with pytest.warns(RuntimeWarning, match="non-finite gradients"):
        res = _noise(model=model)
    assert math.isnan(res.b_simple) and not res.reliable
    with pytest.raises(InvalidParameterError, match="no estimate to advise from"):
        res.advise()


def test_online_estimator_flags_non_positive_estimates():
    gns = GradientNoiseScale(beta=0).update([1.0], 8, 1.5, 64)  # tr(Sigma) estimate < 0 -> b_simple 0
    assert gns.b_simple == 0 and not gns.reliable and "tr(Sigma) estimate" in gns.warning
    with pytest.warns(RuntimeWarning, match="unreliable"):
        advice = gns.advise()
    assert advice.batch_size == 1 and any("unreliable" in w for w in advice.warnings)
    good = GradientNoiseScale(beta=0).update(3.0, 8, 1.25, 64)
    assert good.reliable and good.warning is None


# --------------------------------------------------------------------------- advise
def test_advise_caps_at_the_data_set_and_warns_for_a_large_fraction():
    """The example of the issue: B_simple ~ 1000 on 1,257 examples suggested batch 1024."""
    a = advise(1000.0, n_examples=1257)
    assert a.batch_size == 1024 and a.n_examples == 1257
    assert len(a.warnings) == 1 and "81% of the 1,257 training examples" in a.warnings[0]
    assert "1 step(s) per epoch" in a.warnings[0] and "Warning:" in a.reasoning
    capped = advise(5000.0, n_examples=1257)
    assert capped.batch_size == 1257 and "capped at the 1,257 examples" in capped.reasoning
    assert advise(1000.0, n_examples=10240).warnings == ()  # exactly 10 steps per epoch: fine
    assert advise(1000.0, n_examples=10239).warnings != ()
    assert advise(5000.0, n_examples=1257, n_devices=4).batch_size == 1256


def test_advise_of_zero_noise_warns():
    a = advise(0.0)
    assert a.batch_size == 1 and any("B_simple = 0" in w for w in a.warnings)


def test_measured_advise_uses_the_data_set_size():
    x = torch.randn(512, 4, generator=torch.Generator().manual_seed(2))
    y = (x[:, 0] > 0).long()
    res = _noise((x, y), model=_net(bn=False), batch_size=32, n_batches=16)
    assert res.n_examples == 512
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        advice = res.advise()
    assert advice.n_examples == 512 and advice.batch_size <= 512
    if advice.batch_size > 51:
        assert advice.warnings


@settings(max_examples=40, deadline=None)
@given(st.floats(0, 1e6), st.integers(1, 100_000), st.integers(1, 8))
def test_advise_never_exceeds_the_data_set(b_simple, n, devices):
    if n < devices:
        with pytest.raises(InvalidParameterError, match="'n_examples'"):
            advise(b_simple, n_examples=n, n_devices=devices)
        return
    a = advise(b_simple, n_examples=n, n_devices=devices)
    assert devices <= a.batch_size <= n and a.batch_size % devices == 0
    assert bool(a.warnings) == (a.batch_size * 10 > n or b_simple == 0)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"n_examples": 0}, "'n_examples' parameter of advise"),
    ({"n_examples": 3.5}, "'n_examples' parameter of advise"),
    ({"n_examples": True}, "'n_examples' parameter of advise"),
    ({"n_examples": 2, "n_devices": 4}, "'n_examples' parameter of advise must be at least n_devices"),
])
def test_advise_bad_n_examples(kwargs, match):
    with pytest.raises(InvalidParameterError, match=match):
        advise(100.0, **kwargs)


# --------------------------------------------------------------------------- sharpness
@pytest.mark.parametrize(("data", "match"), [
    ((torch.full((64, 4), NAN), _xy()[1]), "'data' parameter of sharpness must hold only finite inputs"),
    ((_xy()[0], _xy()[1] + 7), "'loss_fn' parameter of sharpness failed"),
    ((torch.randn(64, 6), _xy()[1]), "'model' parameter of sharpness failed"),
])
def test_sharpness_refuses(data, match):
    with pytest.raises(InvalidParameterError, match=match):
        sharpness(_net(), F.cross_entropy, data, steps=2)


def test_sharpness_refuses_a_detached_loss():
    with pytest.raises(InvalidParameterError, match="'loss_fn' parameter of sharpness .* without a gradient"):
        sharpness(_net(), lambda o, y: F.cross_entropy(o, y).detach(), _xy(), steps=2)


# --------------------------------------------------------------------------- train_classifier
@pytest.mark.parametrize(("mutate", "match"), [
    (lambda d: (d[0], d[1]), "'data' parameter of train_classifier must be a tuple \\(x_train, y_train, x_test, y_test\\)"),
    (lambda d: "data", "must be a tuple"),
    (lambda d: tuple(t.numpy() for t in d), "items of types ndarray"),
    (lambda d: (d[0], d[1][:40], d[2], d[3]), "one label per example of x_train"),
    (lambda d: (d[0], d[1], d[2], d[3][:5]), "one label per example of x_test"),
    (lambda d: (d[0], d[1], d[2][:0], d[3][:0]), "at least one test example"),
    (lambda d: (d[0][:0], d[1][:0], d[2], d[3]), "at least one train example"),
    (lambda d: (torch.full_like(d[0], NAN), *d[1:]), "only finite inputs. Got NaN or inf in x_train \\(example 0 and 63 more\\)"),
    (lambda d: (d[0], d[1], torch.full_like(d[2], INF), d[3]), "NaN or inf in x_test"),
    (lambda d: (d[0], d[1].float(), d[2], d[3]), "y_train as a 1-d tensor of integer class indices"),
    (lambda d: (d[0], d[1][:, None], d[2], d[3]), "y_train as a 1-d tensor"),
    (lambda d: (d[0], d[1] - 1, d[2], d[3]), "class indices >= 0 in y_train"),
    (lambda d: (d[0].long(), *d[1:]), "floating-point inputs x_train"),
    (lambda d: (d[0].reshape(64, -1), d[1], d[2].reshape(32, -1), d[3]), "images .* for model='bncnn'"),
    (lambda d: (d[0], d[1], d[2][:, :, :4], d[3]), "same shape"),
])
def test_train_classifier_refuses_bad_data(mutate, match):
    with pytest.raises(InvalidParameterError, match=match):
        train_classifier(_cfg(), data=mutate(_image_data()))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"model": "m"}, "'model' parameter of train_classifier must be None or an instance of torch.nn.Module"),
    ({"model": _net}, "a class or factory\\? pass an instance"),
    ({"model": nn.Sequential(nn.Flatten(), nn.Linear(64, 2))}, "n_classes >= 3"),
    ({"model": nn.Sequential(nn.Linear(5, 3))}, "'model' parameter of train_classifier failed on the training inputs"),
    ({"on_step": "x"}, "'on_step' parameter of train_classifier"),
    ({"keep_model": 1}, "'keep_model'"),
])
def test_train_classifier_refuses_bad_arguments(kwargs, match):
    with pytest.raises(InvalidParameterError, match=match):
        train_classifier(_cfg(), data=_image_data(), **kwargs)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"milestones": "0.5"}, "'milestones' parameter of TrainConfig must be a sequence of numbers"),
    ({"milestones": 0.5}, "'milestones' parameter of TrainConfig must be a sequence of numbers"),
    ({"nesterov": 1}, "'nesterov' parameter of TrainConfig"),
    ({"nesterov": True, "momentum": 0.0}, "'nesterov' parameter of TrainConfig needs a momentum > 0"),
    ({"warmup_epochs": 100}, "'warmup_epochs' parameter of TrainConfig must be at most 'epochs'"),
    ({"data_root": 3}, "'data_root' parameter of TrainConfig"),
])
def test_train_config_refuses(kwargs, match):
    with pytest.raises(InvalidParameterError, match=match):
        train_classifier(_cfg(**kwargs), data=_image_data())


def test_diverged_training_is_reported_not_silent():
    with pytest.warns(RuntimeWarning, match="training diverged"):
        result = train_classifier(_cfg(lr=1e6, model="mlp"), data=_image_data())
    assert result.warnings and "diverged" in result.warnings[0]
    assert result.to_dict()["warnings"] == result.warnings


def test_normal_training_has_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = train_classifier(_cfg(), data=_image_data())
    assert result.warnings == [] and result.to_dict()["warnings"] == []


def test_every_refusal_is_a_leanscale_error_and_a_value_error():
    """The CLI prints LeanscaleError messages without a traceback; ValueError keeps `except` working."""
    with pytest.raises(InvalidParameterError) as info:
        train_classifier(_cfg(), data=(_image_data()[0], _image_data()[1]))
    assert isinstance(info.value, LeanscaleError) and isinstance(info.value, ValueError)
