"""The AdamW rules of LargeBatchRecipe: the EMA timescale (Wang & Aitchison 2024; Bergsma et al. 2025,
"Power Lines") and beta2's half-life in examples (Marek et al. 2025)."""

import math
import warnings

import pytest
import torch
from torch import nn

from leanscale.core.errors import InvalidParameterError
from leanscale.large_batch import (
    LargeBatchRecipe,
    adamw_timescale,
    beta_half_life,
    scale_beta,
)
from leanscale.large_batch.train import TrainConfig

N = 60_000  # examples per epoch


def _recipe(batch, **kw):
    args = dict(base_batch_size=128, base_lr=1e-3, base_epochs=2.0, optimizer="adamw", base_weight_decay=0.1,
                base_betas=(0.9, 0.999), dataset_size=N)
    args.update(kw)
    return LargeBatchRecipe(batch_size=batch, **args)


def _tau_from_first_principles(batch, lr, wd, epochs):
    steps = epochs * N / batch  # optimizer steps of the run
    return (1.0 / (lr * wd)) / steps  # EMA timescale 1/(lr*wd) in steps, as a fraction of the run


@pytest.mark.parametrize("rule", ["sqrt", "linear", "none"])
@pytest.mark.parametrize("batch", [32, 512, 4096])
@pytest.mark.parametrize("regime", [0.0, 0.5, 1.0])
def test_timescale_is_invariant_under_the_batch_change(rule, batch, regime):
    r = _recipe(batch, lr_rule=rule, regime_adaptation=regime)
    p = r.plan()
    k = batch / 128
    tau0 = _tau_from_first_principles(128, 1e-3, 0.1, 2.0)
    assert r.base_timescale == pytest.approx(tau0, rel=1e-12)
    assert r.timescale == pytest.approx(tau0, rel=1e-12)  # the rule's point
    assert _tau_from_first_principles(batch, p.lr, p.weight_decay, p.epochs) == pytest.approx(tau0, rel=1e-12)
    if regime == 0.0:  # same data D: the brief's closed form lambda0 * (B/B0) * (eta0/eta)
        assert p.weight_decay == pytest.approx(0.1 * k * 1e-3 / p.lr, rel=1e-12)
    if regime == 1.0:  # same number of updates: only the LR change is compensated
        assert p.weight_decay == pytest.approx(0.1 * 1e-3 / p.lr, rel=1e-12)


def test_power_lines_lambda_linear_in_batch_at_fixed_lr_and_data():
    # Bergsma et al. 2025 (arXiv 2505.13738), abstract: "optimal lambda scales linearly with B, for a
    # fixed N and D" (eta held fixed). With lr_rule="none" and the same data the rule gives exactly that.
    for batch in (64, 256, 1024, 8192):
        r = _recipe(batch, lr_rule="none", regime_adaptation=0.0)
        assert r.weight_decay == pytest.approx(0.1 * batch / 128, rel=1e-12)


def test_max_lr_cap_moves_into_the_weight_decay():
    r = _recipe(4096, lr_rule="linear", regime_adaptation=0.0, max_lr=5e-3)
    assert r.plan().lr == 5e-3
    assert r.weight_decay == pytest.approx(0.1 * 32 * 1e-3 / 5e-3)
    assert r.timescale == pytest.approx(r.base_timescale)


def test_weights_shrink_alike_in_torch_adamw():
    # Brute force through torch.optim.AdamW: with zero gradients the update is 0 and only the decay acts,
    # w_T = w_0 * (1 - lr*wd)^T. Keeping tau, the fraction of w_0 left at the end of the run is the same.
    # Small batch: 512 steps; batch x4 with the same data: 128 steps.
    def left(recipe, steps):
        w = nn.Parameter(torch.ones(3, dtype=torch.float64))
        opt = recipe.adamw([w])
        for _ in range(steps):
            w.grad = torch.zeros_like(w)
            opt.step()
        return w.detach()[0].item()

    base = _recipe(128, base_lr=1e-3, base_weight_decay=0.5, dataset_size=512 * 128, base_epochs=1.0)
    big = _recipe(512, base_lr=1e-3, base_weight_decay=0.5, dataset_size=512 * 128, base_epochs=1.0,
                  regime_adaptation=0.0)
    kept = _recipe(512, base_lr=1e-3, base_weight_decay=0.5, dataset_size=512 * 128, base_epochs=1.0,
                   regime_adaptation=0.0, keep_timescale=False)
    w_small, w_big, w_kept = left(base, 512), left(big, 128), left(kept, 128)
    assert w_small == pytest.approx(math.exp(-1e-3 * 0.5 * 512), rel=1e-3)
    assert w_big == pytest.approx(w_small, rel=2e-3)  # same fraction of w_0 left: same timescale
    assert abs(w_kept - w_small) > 0.05  # without the rule the EMA runs 2x longer (sqrt LR: lr*wd x2, steps /4)


@pytest.mark.parametrize("batch", [1, 8, 128, 4096])
def test_beta2_half_life_in_examples_is_invariant(batch):
    r = _recipe(batch)
    b1, b2 = r.betas
    assert b2 == pytest.approx(0.999 ** (batch / 128), rel=1e-12)
    assert beta_half_life(b2, batch) == pytest.approx(beta_half_life(0.999, 128), rel=1e-9)
    assert math.log(0.5) / math.log(b2) * batch == pytest.approx(math.log(0.5) / math.log(0.999) * 128, rel=1e-9)
    assert b1 == 0.9  # beta1 is kept unless asked (Marek et al.'s rule is stated for beta2)


def test_beta2_half_life_in_torch_adam_state():
    # A gradient impulse, then zero gradients: Adam's exp_avg_sq keeps beta2^n of it. The half-life in
    # examples is 64 steps x 8 = 512 at batch 8; at batch 32 (beta2 scaled) it must be 16 steps x 32 = 512.
    b20 = 0.5 ** (1 / 64)

    def remaining(recipe, steps):
        w = nn.Parameter(torch.zeros(1, dtype=torch.float64))
        opt = recipe.adamw([w])
        w.grad = torch.ones_like(w)
        opt.step()
        v0 = opt.state[w]["exp_avg_sq"].item()
        for _ in range(steps):
            w.grad = torch.zeros_like(w)
            opt.step()
        return opt.state[w]["exp_avg_sq"].item() / v0

    small = _recipe(8, base_batch_size=8, base_betas=(0.9, b20), base_weight_decay=0.0)
    big = _recipe(32, base_batch_size=8, base_betas=(0.9, b20), base_weight_decay=0.0)
    assert remaining(small, 64) == pytest.approx(0.5, rel=1e-9)
    assert remaining(big, 16) == pytest.approx(0.5, rel=1e-9)


def test_beta1_rule_and_switches():
    r = _recipe(512, keep_beta1_half_life=True)
    assert r.betas == pytest.approx((0.9 ** 4, 0.999 ** 4))
    off = _recipe(512, keep_beta2_half_life=False, keep_timescale=False)
    assert off.betas == (0.9, 0.999) and off.weight_decay == 0.1
    assert off.timescale == pytest.approx(off.base_timescale / 2)  # sqrt LR x2, 4x fewer steps at regime 1: x4/2
    assert not any("Marek" in x or "keeps AdamW" in x for x in off.plan().reasons)


def test_marek_rule_matches_malladi_sde_rule_to_first_order():
    # Malladi et al. 2022 (arXiv 2205.10287) scale 1 - beta by k; beta**k agrees to O((k(1-beta))^2).
    for beta, k in ((0.999, 4), (0.9999, 16), (0.99, 2)):
        malladi = 1 - k * (1 - beta)
        assert abs(scale_beta(beta, 1, k) - malladi) <= (k * (1 - beta)) ** 2


def test_defaults_describe_and_json():
    r = LargeBatchRecipe(batch_size=512, base_batch_size=128, base_lr=1e-3, optimizer="adamw")
    assert r.weight_decay == pytest.approx(0.01 * 1e-3 / 2e-3)  # torch's defaults, regime adaptation 1
    assert r.betas == pytest.approx((0.9, 0.999 ** 4))
    assert r.timescale is None and r.base_timescale is None  # no dataset_size
    d = r.plan().to_dict()
    assert d["optimizer"] == "adamw" and d["betas"] == r.betas and d["weight_decay"] == r.weight_decay
    text = _recipe(512).describe()
    assert "AdamW: weight decay 0.1 ->" in text and "Marek et al. 2025" in text and "Wang & Aitchison" in text
    assert "Malladi" in text and "trust ratio" not in text
    sgd = LargeBatchRecipe(batch_size=512).plan()
    assert (sgd.weight_decay, sgd.betas, sgd.timescale) == (None, None, None)
    assert adamw_timescale(128, 1e-3, 0.1, 2 * N) == pytest.approx(_recipe(128).base_timescale)


def test_timescale_guideline_notes():
    # Wang & Aitchison 2024 (arXiv 2405.13698): tau between ~1 epoch and the whole run.
    long = _recipe(512, base_weight_decay=0.001)
    assert long.timescale > 1 and any("longer than the run" in x for x in long.plan().reasons)
    short = _recipe(512, base_weight_decay=50.0, base_lr=1e-3, base_epochs=2.0)
    assert short.timescale * short.plan().epochs < 1 and any("under one epoch" in x for x in short.plan().reasons)


def test_adamw_builder_keeps_group_overrides():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    r = _recipe(512)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = r.adamw([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], eps=1e-6)
    g0, g1 = opt.param_groups
    assert g0["weight_decay"] == pytest.approx(r.weight_decay) and g1["weight_decay"] == 0.0
    assert g0["betas"] == pytest.approx(r.betas) and g0["lr"] == pytest.approx(r.plan().lr) and g0["eps"] == 1e-6
    sched = r.scheduler(opt, steps_per_epoch=10)  # the LR schedule works on AdamW as on SGD
    assert opt.param_groups[0]["lr"] == pytest.approx(r.plan().lr) and sched is not None


@pytest.mark.parametrize(
    "kwargs,name",
    [({"base_weight_decay": -0.1}, "base_weight_decay"), ({"base_weight_decay": math.inf}, "base_weight_decay"),
     ({"base_betas": (1.0, 0.9)}, "base_betas"), ({"base_betas": (0.9,)}, "base_betas"),
     ({"base_betas": "ab"}, "base_betas"), ({"base_betas": (0.9, True)}, "base_betas"),
     ({"dataset_size": 0}, "dataset_size"), ({"dataset_size": 100}, "dataset_size"),
     ({"dataset_size": 6e4}, "dataset_size"), ({"keep_timescale": "yes"}, "keep_timescale"),
     ({"keep_beta2_half_life": 1}, "keep_beta2_half_life"), ({"keep_beta1_half_life": None}, "keep_beta1_half_life"),
     ({"base_lr": 1.0, "base_weight_decay": 2.0}, "base_weight_decay"),  # lr * wd >= 1 at the base
     ({"base_lr": 0.1, "base_weight_decay": 3.0, "regime_adaptation": 0.0, "lr_rule": "none"}, "base_weight_decay"),
     ({"base_betas": (0.9, 0.9999999999999999), "batch_size": 32}, "base_betas")],  # beta2 ** (1/4) == 1.0
)
def test_bad_adamw_input(kwargs, name):
    args = {"batch_size": 512, **kwargs}
    with pytest.raises(InvalidParameterError, match=f"'{name}' parameter of LargeBatchRecipe"):
        _recipe(args.pop("batch_size"), **args)


@pytest.mark.parametrize("name,value", [("base_weight_decay", 0.1), ("base_betas", (0.9, 0.99)),
                                        ("dataset_size", 50_000)])
def test_adamw_fields_refused_for_other_optimizers(name, value):
    with pytest.raises(InvalidParameterError, match=f"'{name}' parameter of LargeBatchRecipe is only used with"):
        LargeBatchRecipe(batch_size=512, optimizer="lamb", **{name: value})


def test_adamw_entry_points_refuse_what_they_cannot_do():
    r = _recipe(512, base_epochs=2.0)
    config = r.train_config(TrainConfig(batch_size=128, lr=1e-3, epochs=2.0))  # AdamW: the plan's decay and betas
    plan = r.plan()
    assert (config.optimizer, config.weight_decay, (config.momentum, config.beta2)) == ("adamw", plan.weight_decay,
                                                                                      plan.betas)
    with pytest.raises(InvalidParameterError, match="'lr' parameter of LargeBatchRecipe.adamw"):
        r.adamw([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(InvalidParameterError, match="'optimizer' parameter of LargeBatchRecipe must be 'adamw'"):
        LargeBatchRecipe(batch_size=512).adamw([nn.Parameter(torch.zeros(1))])
    with pytest.raises(InvalidParameterError, match="'beta' parameter of scale_beta"):
        scale_beta(1.0, 1, 2)
    with pytest.raises(InvalidParameterError, match="'batch_size' parameter of beta_half_life"):
        beta_half_life(0.9, 0)
    with pytest.raises(InvalidParameterError, match="'weight_decay' parameter of adamw_timescale"):
        adamw_timescale(128, 1e-3, 0.0, 1000)


def test_beta1_above_sqrt_beta2_warns():
    # beta2 0.95 at batch 32 -> 0.95 ** 16 = 0.44 at batch 512, below beta1 ** 2 = 0.81 (our benchmark diverged).
    with pytest.warns(RuntimeWarning, match=r"sqrt\(beta2\)"):
        r = _recipe(512, base_batch_size=32, base_betas=(0.9, 0.95))
    reasons = r.plan().reasons  # plan() does not warn again: the warning is the constructor's
    assert any(x.startswith("WARNING: beta1=0.9 > sqrt(beta2)") for x in reasons)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ok = _recipe(512, base_batch_size=32, base_betas=(0.9, 0.95),
                     keep_beta1_half_life=True)  # both scaled: 0.185 < sqrt(0.44)
        assert not any("WARNING" in x for x in ok.plan().reasons)
        _recipe(512, base_batch_size=32, base_betas=(0.9, 0.999))  # 0.999 ** 16 = 0.984: fine
        _recipe(512, base_batch_size=32, base_betas=(0.95, 0.5))  # the user's own base betas: no warning
