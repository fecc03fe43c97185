import doctest
import itertools
import math
import warnings

import pytest
import torch
from torch import nn

import leanscale.large_batch.schedules as schedules_module
from leanscale.core.errors import InvalidParameterError
from leanscale.large_batch.schedules import (
    Regime,
    adapt_regime,
    clip_gradients,
    scale_lr,
    warmup_factor,
    warmup_schedule,
)


# ------------------------------------------------------------------------------------- scale_lr
@pytest.mark.parametrize(
    "args,rule,expected",
    [
        ((0.1, 256, 8192), "linear", 3.2),  # Goyal et al.: k = 32
        ((0.1, 128, 2048), "sqrt", 0.4),  # Hoffer et al.: sqrt(16)
        ((0.1, 100, 300), "sqrt", 0.1 * math.sqrt(3)),
        ((0.1, 100, 300), "none", 0.1),
        ((0.4, 1024, 256), "linear", 0.1),  # scaling down
        ((0.4, 1024, 256), "sqrt", 0.2),
        ((0.05, 64, 64), "linear", 0.05),
    ],
)
def test_scale_lr_closed_form(args, rule, expected):
    assert scale_lr(*args, lr_rule=rule) == pytest.approx(expected, rel=1e-15)
    assert scale_lr(*args, rule) == pytest.approx(expected, rel=1e-15)  # positional


def test_scale_lr_default_rule_is_sqrt_as_everywhere_and_says_it_changed():
    """#14: one LR-rule default (sqrt, as LargeBatchRecipe, adapt_regime and the CLI); scale_lr's
    default was linear, so leaving lr_rule out warns for one release instead of changing silently."""
    assert schedules_module.DEFAULT_LR_RULE == "sqrt"
    with pytest.warns(FutureWarning, match="default lr_rule of scale_lr changed from 'linear' to 'sqrt'"):
        assert scale_lr(0.1, 256, 1024) == pytest.approx(0.2)
    assert adapt_regime(10, (), 128, 512, base_lr=0.1).lr == pytest.approx(0.2)  # no warning: already sqrt


def test_scale_lr_old_keywords_warn_and_still_work():
    with pytest.warns(FutureWarning) as record:
        lr = scale_lr(0.1, base_batch=256, batch=1024, rule="linear")
    assert lr == pytest.approx(0.4)
    messages = " ".join(str(w.message) for w in record)
    for old, new in (("base_batch", "base_batch_size"), ("batch", "batch_size"), ("rule", "lr_rule")):
        assert f"the {old!r} parameter was renamed to {new!r}" in messages
    with pytest.raises(InvalidParameterError, match="'rule' parameter of scale_lr was renamed to 'lr_rule'.*Got both"):
        scale_lr(0.1, 256, 1024, lr_rule="sqrt", rule="linear")
    with pytest.raises(InvalidParameterError, match="'base_batch' parameter of scale_lr was renamed.*Got both"):
        scale_lr(0.1, 256, 1024, base_batch=128, lr_rule="sqrt")
    with pytest.raises(InvalidParameterError, match="'batch_size' parameter of scale_lr must be an int.*Got None"):
        scale_lr(0.1, 256, lr_rule="sqrt")  # missing


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"base_lr": 0.0}, r"'base_lr' parameter of scale_lr must be a float in the range \(0, inf\)\. Got 0\.0 instead"),
        ({"base_lr": -0.1}, r"'base_lr' parameter .* Got -0\.1 instead"),
        ({"base_lr": math.inf}, r"'base_lr' parameter .* Got inf instead"),
        ({"base_lr": math.nan}, r"'base_lr' parameter .* Got nan instead"),
        ({"base_batch_size": 0}, r"'base_batch_size' parameter of scale_lr must be an int in the range \[1, inf\)\. Got 0 instead"),
        ({"batch_size": 12.5}, r"'batch_size' parameter .* Got 12\.5 instead"),
        ({"batch_size": True}, r"'batch_size' parameter .* Got True instead"),
    ],
)
def test_scale_lr_bad_numbers(kwargs, match):
    args = {"base_lr": 0.1, "base_batch_size": 128, "batch_size": 1024, "lr_rule": "linear"} | kwargs
    with pytest.raises(InvalidParameterError, match=match):
        scale_lr(**args)


def test_scale_lr_unknown_rule_lists_valid_ones():
    with pytest.raises(
        InvalidParameterError,
        match=r"The 'lr_rule' parameter of scale_lr must be one of 'linear', 'none', 'sqrt'\. Got 'sqrtt' instead\. "
        r"Did you mean 'sqrt'\?",
    ):
        scale_lr(0.1, 128, 1024, lr_rule="sqrtt")
    with pytest.raises(InvalidParameterError, match=r"'lr_rule' parameter .* Got 5 instead"):
        scale_lr(0.1, 128, 1024, lr_rule=5)


# ---------------------------------------------------------------------------------------- warmup
def test_warmup_factor_values():
    assert [warmup_factor(s, 4, start_factor=0.25) for s in range(6)] == pytest.approx(
        [0.25, 0.4375, 0.625, 0.8125, 1.0, 1.0]
    )
    assert [warmup_factor(s, 5) for s in (0, 1, 5, 100)] == pytest.approx([0.0, 0.2, 1.0, 1.0])
    assert warmup_factor(0, 0, start_factor=0.1) == 1.0  # no warmup
    assert warmup_factor(2, 4, start_factor=3.0) == pytest.approx(2.0)  # a ramp down
    with pytest.raises(InvalidParameterError, match=r"'step' parameter of warmup_factor .* Got -1 instead"):
        warmup_factor(-1, 4)
    with pytest.raises(InvalidParameterError, match=r"'start_factor' parameter .* Got -0\.5 instead"):
        warmup_factor(1, 4, start_factor=-0.5)


def _lrs(optimizer, scheduler, n, group=0):
    """LR of each of n optimizer steps, read from the param group while training."""
    out = []
    for _ in range(n):
        out.append(optimizer.param_groups[group]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def _sgd(lr=0.8, second_lr=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    groups = [{"params": model[0].parameters()}, {"params": model[1].parameters()}]
    if second_lr is not None:
        groups[1]["lr"] = second_lr
    return torch.optim.SGD(groups, lr=lr, momentum=0.9)


def test_warmup_then_step_decay():
    opt = _sgd(lr=0.8, second_lr=0.08)
    k = 8  # Goyal: start at the small-batch LR, base / large = 1 / k
    sched = warmup_schedule(opt, 8, milestones=(12, 16), gamma=0.1, start_factor=1 / k)
    lrs = _lrs(opt, sched, 20)
    assert lrs[0] == pytest.approx(0.1)  # step 0: the small-batch LR
    assert lrs[4] == pytest.approx(0.1 + (0.8 - 0.1) * 4 / 8)  # mid-warmup: linear
    assert lrs[7] == pytest.approx(0.1 + 0.7 * 7 / 8)
    assert lrs[8:12] == pytest.approx([0.8] * 4)  # peak from step warmup_steps on
    assert lrs[12:16] == pytest.approx([0.08] * 4)  # first drop at step 12
    assert lrs[16:] == pytest.approx([0.008] * 4)
    # every group is scaled from its own peak
    assert opt.param_groups[1]["lr"] == pytest.approx(0.08 * 0.01)
    assert opt.param_groups[0]["initial_lr"] == 0.8


def test_warmup_cosine_end_value_and_no_decay():
    opt = _sgd(lr=1.0)
    sched = warmup_schedule(opt, 5, total_steps=25, decay="cosine")
    lrs = _lrs(opt, sched, 31)
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(0.2)  # start_factor=None: from 0
    assert lrs[5] == pytest.approx(1.0)
    assert lrs[15] == pytest.approx(0.5)  # half-way through the cosine
    assert lrs[10] == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 20)))
    assert lrs[25] == pytest.approx(0.0, abs=1e-15)  # end value
    assert lrs[30] == pytest.approx(0.0, abs=1e-15)  # and it stays there
    assert all(a >= b for a, b in itertools.pairwise(lrs[5:]))

    opt = _sgd(lr=0.3)
    sched = warmup_schedule(opt, 3, start_factor=0.5, decay="none")
    assert _lrs(opt, sched, 6) == pytest.approx([0.15, 0.2, 0.25, 0.3, 0.3, 0.3])


def test_no_warmup_and_state_dict_roundtrip():
    opt = _sgd(lr=0.5)
    sched = warmup_schedule(opt, 0, milestones=(2,), gamma=0.5)
    assert _lrs(opt, sched, 4) == pytest.approx([0.5, 0.5, 0.25, 0.25])
    state = sched.state_dict()
    opt2 = _sgd(lr=0.5)
    sched2 = warmup_schedule(opt2, 0, milestones=(2,), gamma=0.5)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(state)
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.25)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"milestones": (10, 5)}, r"'milestones' parameter of warmup_schedule must be a strictly increasing sequence of ints .* Got \(10, 5\) instead"),
        ({"milestones": (5, 5)}, r"'milestones' parameter .* Got \(5, 5\) instead"),
        ({"milestones": (0, 5)}, r"'milestones' parameter .* Got \(0, 5\) instead"),
        ({"milestones": (5, 20), "total_steps": 20}, r"'milestones' parameter .* in \(0, total_steps=20\)\. Got \(5, 20\)"),
        ({"milestones": (5,), "decay": "cosine", "total_steps": 20}, r"'milestones' parameter .* empty unless decay='step'"),
        ({"decay": "cosine"}, r"'total_steps' parameter of warmup_schedule must be an int greater than warmup_steps=4 .* Got None"),
        ({"decay": "cosine", "total_steps": 4}, r"'total_steps' parameter .* Got 4 instead"),
        ({"total_steps": 3}, r"'warmup_steps' parameter of warmup_schedule must be at most total_steps=3\. Got 4"),
        ({"gamma": 0.0}, r"'gamma' parameter .* in the range \(0, 1\]\. Got 0\.0"),
        ({"gamma": 1.5}, r"'gamma' parameter .* Got 1\.5"),
        ({"start_factor": -0.1}, r"'start_factor' parameter .* Got -0\.1"),
        ({"decay": "linear"}, r"'decay' parameter of warmup_schedule must be one of 'cosine', 'none', 'step'\. Got 'linear'"),
    ],
)
def test_warmup_schedule_bad_input(kwargs, match):
    opt = _sgd()
    with pytest.raises(InvalidParameterError, match=match):
        warmup_schedule(opt, 4, **kwargs)


def test_warmup_schedule_bad_step_counts():
    opt = _sgd()
    with pytest.raises(InvalidParameterError, match=r"'warmup_steps' parameter .* Got -1 instead"):
        warmup_schedule(opt, -1)
    with pytest.raises(InvalidParameterError, match=r"'optimizer' parameter .* Got 'sgd' instead"):
        warmup_schedule("sgd", 4)


# ----------------------------------------------------------------------------- regime adaptation
def test_adapt_regime_preserves_updates_and_moves_milestones():
    n_examples = 50_000
    r = adapt_regime(100, (50, 75), 128, 4096, base_lr=0.1)
    assert isinstance(r, Regime)
    k = 4096 / 128
    assert r.epochs == pytest.approx(100 * k)
    assert r.milestones == pytest.approx((50 * k, 75 * k))
    # same number of updates as the small-batch run: epochs * N / batch
    assert r.epochs * n_examples / r.batch_size == pytest.approx(100 * n_examples / 128, rel=1e-12)
    assert r.updates_ratio == pytest.approx(1.0) and r.compute_ratio == pytest.approx(k)
    # and the LR drops at the same *update* counts
    for m_new, m_old in zip(r.milestones, (50, 75)):
        assert m_new * n_examples / 4096 == pytest.approx(m_old * n_examples / 128)
    assert r.lr == pytest.approx(0.1 * math.sqrt(k))  # sqrt rule by default
    steps = r.steps(n_examples)
    assert steps.steps_per_epoch == math.ceil(n_examples / 4096) == 13
    assert steps.total == 3200 * 13 and steps.milestones == (1600 * 13, 2400 * 13)
    assert r.steps(n_examples, drop_last=True).steps_per_epoch == 12


def test_adapt_regime_fraction_rule_and_scaling_down():
    r0 = adapt_regime(90, (30, 60), 256, 1024, base_lr=0.1, lr_rule="linear", fraction=0.0)
    assert (r0.epochs, r0.milestones, r0.lr) == (90.0, (30.0, 60.0), pytest.approx(0.4))
    assert r0.updates_ratio == pytest.approx(0.25)
    half = adapt_regime(90, (30, 60), 256, 1024, fraction=0.5)
    assert half.epochs == pytest.approx(90 * 2.5) and half.milestones == pytest.approx((75.0, 150.0))
    assert half.lr is None and half.base_lr is None
    down = adapt_regime(10, (5,), 128, 64, base_lr=0.1, lr_rule="linear", warmup_epochs=1)
    assert down.epochs == pytest.approx(5.0) and down.milestones == pytest.approx((2.5,))
    assert down.lr == pytest.approx(0.05) and down.warmup_epochs == 1.0  # warmup not multiplied
    assert down.steps(1000).warmup == 16  # 1 epoch of ceil(1000 / 64) = 16 steps


def test_regime_describe_and_frozen():
    r = adapt_regime(10, (5, 8), 128, 2048, base_lr=0.1, warmup_epochs=2)
    text = r.describe()
    assert "batch 128 -> 2048 (k = 16)" in text
    assert "10 -> 160 epochs, LR drops at epochs 80, 128, 2 warmup epochs" in text
    assert "LR 0.1 -> 0.4 (sqrt rule)" in text
    assert "updates x1 of the small-batch run, examples processed x16" in text
    assert r.to_dict()["epoch_multiplier"] == 16.0
    with pytest.raises(AttributeError):
        r.epochs = 1.0
    assert r.lr_rule == "sqrt" and r.to_dict()["lr_rule"] == "sqrt"
    with pytest.warns(FutureWarning, match="Regime.rule was renamed to Regime.lr_rule"):
        assert r.rule == "sqrt"


def test_adapt_regime_old_keywords_warn_and_still_work():
    new = adapt_regime(10, (5,), base_batch_size=128, batch_size=512, base_lr=0.1, lr_rule="linear")
    with pytest.warns(FutureWarning) as record:
        old = adapt_regime(10, (5,), base_batch=128, batch=512, base_lr=0.1, rule="linear")
    assert old == new and new.lr == pytest.approx(0.4)
    assert sorted(str(w.message).split("'")[1] for w in record) == ["base_batch", "batch", "rule"]
    with pytest.raises(InvalidParameterError, match="'batch' parameter of adapt_regime was renamed.*Got both"):
        adapt_regime(10, (5,), 128, 512, batch=256)


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((100, (75, 50), 128, 1024), {}, r"'milestones' parameter of adapt_regime must be a strictly increasing sequence of numbers in \(0, epochs=100\)\. Got \(75, 50\) instead"),
        ((100, (50, 100), 128, 1024), {}, r"'milestones' parameter .* Got \(50, 100\) instead"),
        ((100, (50, 150), 128, 1024), {}, r"'milestones' parameter .* Got \(50, 150\) instead"),
        ((100, 50, 128, 1024), {}, r"'milestones' parameter of adapt_regime must be a sequence of numbers\. Got 50"),
        ((0, (), 128, 1024), {}, r"'epochs' parameter of adapt_regime must be a float in the range \(0, inf\)\. Got 0 instead"),
        ((10, (), 0, 1024), {}, r"'base_batch_size' parameter .* Got 0 instead"),
        ((10, (), 128, -4), {}, r"'batch_size' parameter .* Got -4 instead"),
        ((10, (), 128, 1024), {"base_lr": 0.0}, r"'base_lr' parameter .* Got 0\.0 instead"),
        ((10, (), 128, 1024), {"fraction": 1.5}, r"'fraction' parameter of adapt_regime must be a float in the range \[0, 1\]\. Got 1\.5"),
        ((10, (), 128, 1024), {"lr_rule": "cubic"}, r"'lr_rule' parameter of adapt_regime must be one of 'linear', 'none', 'sqrt'\. Got 'cubic'"),
        ((10, (), 128, 256), {"warmup_epochs": 25}, r"'warmup_epochs' parameter .* \[0, 20\.0\]\. Got 25 instead"),
    ],
)
def test_adapt_regime_bad_input(args, kwargs, match):
    with pytest.raises(InvalidParameterError, match=match):
        adapt_regime(*args, **kwargs)


def test_regime_steps_bad_input():
    r = adapt_regime(10, (), 128, 1024)
    with pytest.raises(InvalidParameterError, match=r"'n_examples' parameter of Regime.steps .* Got 0"):
        r.steps(0)
    with pytest.raises(InvalidParameterError, match=r"'n_examples' .* at least batch_size=1024 with drop_last=True"):
        r.steps(1000, drop_last=True)


# ---------------------------------------------------------------------------- gradient clipping
def _params_with_grads(*grads):
    params = []
    for g in grads:
        p = nn.Parameter(torch.zeros(len(g), dtype=torch.float64))
        p.grad = torch.tensor(g, dtype=torch.float64)
        params.append(p)
    return params


def test_clip_gradients_matches_hand_computation():
    params = _params_with_grads([3.0, 4.0], [12.0])
    total = clip_gradients(params, 6.5)
    assert total == pytest.approx(13.0)  # sqrt(9 + 16 + 144)
    coef = 6.5 / (13.0 + 1e-6)  # torch's clip coefficient
    assert params[0].grad.tolist() == pytest.approx([3 * coef, 4 * coef], rel=1e-12)
    assert params[1].grad.tolist() == pytest.approx([12 * coef], rel=1e-12)
    new_norm = math.sqrt(sum(float((p.grad**2).sum()) for p in params))
    assert new_norm == pytest.approx(6.5, rel=1e-6)

    params = _params_with_grads([3.0, -4.0], [12.0])
    assert clip_gradients(params, 100.0) == pytest.approx(13.0)
    assert params[0].grad.tolist() == [3.0, -4.0]  # below the threshold: untouched

    params = _params_with_grads([3.0, -4.0], [1.0])
    assert clip_gradients(params, 2.0, norm_type=math.inf) == pytest.approx(4.0)
    assert params[0].grad.tolist() == pytest.approx([1.5, -2.0], rel=1e-6)
    params = _params_with_grads([3.0, -4.0], [1.0])
    assert clip_gradients(params, 100.0, norm_type=1.0) == pytest.approx(8.0)


def test_clip_gradients_module_skips_parameters_without_grad():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    model(torch.ones(3, 2)).sum().backward()
    model[0].bias.grad = None
    expected = math.sqrt(sum(float((p.grad**2).sum()) for p in model.parameters() if p.grad is not None))
    assert clip_gradients(model, 1e9) == pytest.approx(expected, rel=1e-6)
    assert clip_gradients(model[1].weight, 1e9) == pytest.approx(float(model[1].weight.grad.norm()), rel=1e-6)


def test_clip_gradients_nonfinite():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    model(torch.ones(1, 2)).sum().backward()
    model[1].weight.grad[0, 0] = math.inf
    before = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match=r"non-finite gradients in 1\.weight\. The gradients were left unclipped"):
        clip_gradients(model, 1.0)
    with pytest.warns(RuntimeWarning, match=r"total 2-norm of the gradients is inf"):
        assert clip_gradients(model, 1.0, nonfinite="warn") == math.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert clip_gradients(model, 1.0, nonfinite="ignore") == math.inf
    for p, g in zip(model.parameters(), before):
        assert torch.equal(p.grad, g)  # untouched, not multiplied by NaN
    model[0].bias.grad[0] = math.nan
    with pytest.raises(FloatingPointError, match=r"is nan; non-finite gradients in 0\.bias, 1\.weight"):
        clip_gradients(model, 1.0)


def test_clip_gradients_bad_input():
    params = _params_with_grads([1.0])
    with pytest.raises(InvalidParameterError, match=r"'max_norm' parameter of clip_gradients must be a float in the range \(0, inf\)\. Got 0\.0"):
        clip_gradients(params, 0.0)
    with pytest.raises(InvalidParameterError, match=r"'norm_type' parameter .* Got -2\.0"):
        clip_gradients(params, 1.0, norm_type=-2.0)
    with pytest.raises(InvalidParameterError, match=r"'nonfinite' parameter .* one of 'ignore', 'raise', 'warn'\. Got 'skip'"):
        clip_gradients(params, 1.0, nonfinite="skip")
    with pytest.raises(InvalidParameterError, match=r"at least one parameter with a gradient \(call loss\.backward\(\) first\)"):
        clip_gradients(nn.Linear(2, 1), 1.0)
    with pytest.raises(InvalidParameterError, match=r"'model_or_params' parameter .* Got int instead"):
        clip_gradients(3, 1.0)
    with pytest.raises(InvalidParameterError, match=r"'model_or_params' parameter .* Got list instead"):
        clip_gradients([1.0, 2.0], 1.0)


def test_doctests():
    result = doctest.testmod(schedules_module, raise_on_error=False)
    assert result.attempted > 10 and result.failed == 0


def test_the_old_keyword_warning_points_at_the_callers_line():
    from leanscale.large_batch.schedules import scale_lr

    with pytest.warns(FutureWarning, match="'base_batch' parameter was renamed") as record:
        scale_lr(0.1, base_batch=128, batch_size=256, lr_rule="linear")
    assert record[0].filename == __file__
