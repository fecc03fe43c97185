import math

import pytest
import torch
from torch import nn

from leanscale.core.errors import InvalidParameterError
from leanscale.large_batch.ghost_bn import GhostBatchNorm1d
from leanscale.large_batch.recipe import LargeBatchRecipe
from leanscale.large_batch.train import TrainConfig


def test_plan_is_hoffers_recipe():
    recipe = LargeBatchRecipe(batch_size=4096, base_batch_size=128, base_lr=0.1, base_epochs=10,
                              base_milestones=(5, 8))
    p = recipe.plan()
    k = 4096 / 128
    assert p.lr == pytest.approx(0.1 * math.sqrt(k))
    assert p.epochs == pytest.approx(10 * k) and p.milestones == pytest.approx((5 * k, 8 * k))
    assert p.ghost_batch_size == 128
    assert p.updates_ratio == pytest.approx(1.0)  # as many updates as the small batch
    assert p.compute_ratio == pytest.approx(k)
    assert any("Hoffer" in r for r in p.reasons) and "why:" in recipe.describe()


def test_partial_regime_linear_rule_cap_and_no_ghost():
    p = LargeBatchRecipe(batch_size=1024, base_batch_size=256, base_lr=0.1, base_epochs=4, lr_rule="linear",
                         regime_adaptation=0.5, ghost_batch_size=0, max_lr=0.3).plan()
    assert p.lr == 0.3  # 0.4 capped
    assert p.epochs == pytest.approx(4 * (1 + 0.5 * 3))
    assert p.updates_ratio == pytest.approx(2.5 / 4)
    assert p.ghost_batch_size is None


def test_ghost_as_large_as_the_batch_means_plain_batchnorm():
    assert LargeBatchRecipe(batch_size=128, base_batch_size=128).plan().ghost_batch_size is None


def test_train_config_and_scheduler():
    base = TrainConfig(batch_size=128, lr=0.1, epochs=2.0)
    recipe = LargeBatchRecipe(batch_size=1024, base_batch_size=128, base_lr=0.1, base_epochs=2.0,
                              warmup_epochs=1.0)
    cfg = recipe.train_config(base)
    assert (cfg.batch_size, cfg.ghost_batch_size) == (1024, 128)
    assert cfg.lr == pytest.approx(0.1 * math.sqrt(8)) and cfg.epochs == pytest.approx(16.0)
    assert cfg.warmup_start_factor == pytest.approx(0.1 / cfg.lr)  # warm up from the small-batch LR
    assert cfg.milestones == base.milestones  # fractions of training: they move with the epochs
    with pytest.raises(InvalidParameterError, match="base_lr"):
        recipe.train_config(TrainConfig(batch_size=128, lr=0.2, epochs=2.0))

    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    recipe.apply(model, opt)
    assert isinstance(model[1], GhostBatchNorm1d) and model[1].ghost_batch_size == 128
    sched = recipe.scheduler(opt, steps_per_epoch=10)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1)  # the small-batch LR at the first step
    assert lrs[10] == pytest.approx(cfg.lr)  # the scaled LR after one warmup epoch


@pytest.mark.parametrize(
    "kwargs,name",
    [({"batch_size": 0}, "batch_size"), ({"batch_size": 512, "lr_rule": "cubic"}, "lr_rule"),
     ({"batch_size": 512, "base_lr": -1.0}, "base_lr"), ({"batch_size": 512, "regime_adaptation": 2.0}, "regime_adaptation"),
     ({"batch_size": 512, "base_epochs": 4, "base_milestones": (3, 2)}, "base_milestones"),
     ({"batch_size": 64, "ghost_batch_size": 128}, "ghost_batch_size"),
     ({"batch_size": 512, "optimizer": "adam"}, "optimizer")],
)
def test_bad_input(kwargs, name):
    with pytest.raises(InvalidParameterError, match=f"'{name}' parameter of LargeBatchRecipe"):
        LargeBatchRecipe(**kwargs)
