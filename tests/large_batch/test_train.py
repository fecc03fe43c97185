import math

import pytest
import torch

from leanscale.core.errors import InvalidParameterError
from leanscale.large_batch.train import TrainConfig, train_classifier, with_overrides
from leanscale.train.classifier import _interpolate_target, evaluate
from leanscale.train.schedules import lr_factor


def synthetic(n=256, n_test=128, seed=0):
    """A learnable 10-class problem on 1x12x12 'images': the class sets the mean of one patch."""
    g = torch.Generator().manual_seed(seed)

    def make(m):
        y = torch.randint(0, 10, (m,), generator=g)
        x = torch.randn(m, 1, 12, 12, generator=g) * 0.5
        for c in range(10):
            x[y == c, 0, c, :] += 2.0
        return x, y

    return (*make(n), *make(n_test))


def test_lr_factor_warmup_then_step_decay():
    total, warm = 100, 10
    kw = dict(warmup_steps=warm, warmup_start=0.25, decay="step", milestones=(50, 75), gamma=0.1)
    assert lr_factor(0, total, **kw) == pytest.approx(0.25)  # the first step at the start factor
    assert lr_factor(5, total, **kw) == pytest.approx(0.25 + 0.75 * 5 / 10)
    assert lr_factor(10, total, **kw) == pytest.approx(1.0)  # the peak after warmup_steps
    assert lr_factor(49, total, **kw) == 1.0
    assert lr_factor(50, total, **kw) == pytest.approx(0.1)
    assert lr_factor(75, total, **kw) == pytest.approx(0.01)
    assert lr_factor(50, 100, decay="cosine") == pytest.approx(0.5)
    assert lr_factor(100, 100, decay="cosine") == pytest.approx(0.0, abs=1e-12)


def test_interpolated_steps_to_target():
    history = [{"step": 10, "test_accuracy": 0.5}, {"step": 40, "test_accuracy": 0.9}]
    # halfway in accuracy -> geometric mean of the steps
    assert _interpolate_target(history, 0.7) == pytest.approx(math.sqrt(10 * 40))
    assert _interpolate_target(history, 0.95) is None
    assert _interpolate_target(history, 0.4) == 10.0


def test_training_learns_counts_steps_and_bills_the_ledger():
    data = synthetic()
    cfg = TrainConfig(width=4, batch_size=32, lr=0.1, epochs=3.0, eval_every_epochs=1.0, milestones=())
    result = train_classifier(cfg, data=data)
    assert result.steps == 3 * (256 // 32) and result.examples == result.steps * 32
    assert [h["step"] for h in result.history] == [8, 16, 24]
    assert result.test_accuracy > 0.3  # chance is 0.1
    entry = result.ledger.total("train")
    assert entry.n_examples == result.examples
    assert entry.flops == pytest.approx(result.flops_per_example * result.examples)
    assert result.flops_per_example > 0


def test_micro_batches_with_ghost_batchnorm_give_the_same_training():
    data = synthetic()
    base = TrainConfig(width=4, batch_size=64, lr=0.1, epochs=1.0, ghost_batch_size=16, milestones=())
    whole = train_classifier(base, data=data, keep_model=True)
    micro = train_classifier(with_overrides(base, micro_batch_size=32), data=data, keep_model=True)
    for (name, a), b in zip(whole.model.state_dict().items(), micro.model.state_dict().values()):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-5, msg=name)


def test_target_accuracy_stops_early_and_reports_steps():
    data = synthetic()
    cfg = TrainConfig(width=4, batch_size=16, lr=0.1, epochs=5.0, milestones=(), decay="none",
                      target_accuracy=0.5, eval_growth=1.5)
    result = train_classifier(cfg, data=data)
    assert result.reached_target and result.steps < 5 * 256 // 16
    assert result.history[-1]["test_accuracy"] >= 0.5 > result.history[0]["test_accuracy"] or len(result.history) == 1
    assert 1 <= result.steps_to_target <= result.steps


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"micro_batch_size": 24}, "'micro_batch_size'.*must divide"),
        ({"micro_batch_size": 16}, "'micro_batch_size'.*multiple of 'ghost_batch_size'"),
        ({"ghost_batch_size": 64}, "'ghost_batch_size'.*at most the per-process batch"),
        ({"batch_size": 512}, "'batch_size'.*at most the number of training examples"),
    ],
)
def test_bad_training_settings(changes, match):
    cfg = TrainConfig(width=4, batch_size=32, epochs=1.0, milestones=())
    cfg = TrainConfig(**{**cfg.__dict__, **changes})
    with pytest.raises(InvalidParameterError, match=match):
        train_classifier(cfg, data=synthetic())


@pytest.mark.parametrize(
    "changes,name",
    [({"optimizer": "adam"}, "optimizer"), ({"milestones": (0.8, 0.5)}, "milestones"),
     ({"lr": 0.0}, "lr"), ({"epochs": -1.0}, "epochs"), ({"momentum": 1.0}, "momentum"),
     ({"beta2": 1.0}, "beta2"), ({"beta2": -0.1}, "beta2"), ({"weight_decay": float("inf")}, "weight_decay"),
     # AdamW multiplies the weights by 1 - lr * weight_decay: at >= 1 they flip sign every step
     ({"optimizer": "adamw", "lr": 0.1, "weight_decay": 10.0}, "weight_decay")],
)
def test_config_validation_names_the_field(changes, name):
    with pytest.raises(InvalidParameterError, match=f"'{name}' parameter of TrainConfig"):
        with_overrides(TrainConfig(), **changes)


def test_evaluate_restores_training_mode():
    data = synthetic()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(144, 10))
    model.train()
    acc, loss = evaluate(model, data[2], data[3])
    assert model.training and 0 <= acc <= 1 and loss > 0


@pytest.mark.parametrize("optimizer,lr", [("lars", 5.0), ("lamb", 0.03)])
def test_lars_and_lamb_train_the_reference_model(optimizer, lr):
    data = synthetic()
    cfg = TrainConfig(width=4, batch_size=32, lr=lr, optimizer=optimizer, epochs=3.0, milestones=(),
                      eval_every_epochs=1.0, decay="none")
    result = train_classifier(cfg, data=data)
    losses = [h["train_loss"] for h in result.history]
    # ln(10) = 2.30 at chance; both optimizers at least halve it in 24 steps (LARS needs a large
    # global LR: its trust coefficient 1e-3 scales every layer's step).
    assert losses[0] > losses[-1] and losses[-1] < 0.5 * 2.303


def test_a_run_with_a_checkpoint_resumes_after_a_crash_and_ends_as_an_uninterrupted_one(tmp_path):
    data = synthetic()
    cfg = TrainConfig(width=4, batch_size=32, lr=0.1, epochs=2.0, eval_every_epochs=0.5, milestones=(0.6,),
                      warmup_epochs=0.25)
    straight = train_classifier(cfg, data=data, keep_model=True)

    def crash(step, model, optimizer):
        if step == 11:
            raise KeyboardInterrupt

    ck = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):
        train_classifier(cfg, data=data, checkpoint=ck, checkpoint_every=5, on_step=crash)
    assert ck.is_file()
    resumed = train_classifier(cfg, data=data, checkpoint=ck, checkpoint_every=5, keep_model=True)
    assert not ck.exists()
    drop = {"seconds"}
    assert [{k: v for k, v in h.items() if k not in drop} for h in resumed.history] == \
        [{k: v for k, v in h.items() if k not in drop} for h in straight.history]
    assert resumed.steps == straight.steps and resumed.examples == straight.examples
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_evaluate_moved_to_the_engine_and_the_old_name_warns():
    import leanscale.large_batch.train as lb_train

    with pytest.warns(FutureWarning, match="leanscale.train.classifier.evaluate"):
        assert lb_train.evaluate is evaluate


def test_a_model_of_ones_own_takes_flat_features_whatever_config_model_says():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, generator=g)
    y = (x[:, 0] > 0).long()
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    cfg = TrainConfig(batch_size=16, epochs=3.0, eval_every_epochs=3.0, milestones=())  # model="bncnn" by default
    result = train_classifier(cfg, data=(x, y, x, y), model=net)
    assert result.test_accuracy > 0.8
    with pytest.raises(InvalidParameterError, match="must hold images"):
        train_classifier(cfg, data=(x, y, x, y))  # the built-in BNCNN does need images


def test_adamw_builds_torch_adamw_with_the_config_and_trains():
    """optimizer="adamw": torch.optim.AdamW with betas (momentum, beta2), the decoupled weight decay on
    rank >= 2 weights only; one step of the run equals one torch.optim.AdamW step done by hand."""
    from leanscale.large_batch.train import build_model, build_optimizer

    data = synthetic()
    cfg = TrainConfig(model="mlp", width=2, batch_size=256, lr=0.01, optimizer="adamw", momentum=0.8, beta2=0.99,
                      weight_decay=0.5, epochs=1.0, milestones=(), decay="none")
    model = build_model(cfg, (1, 12, 12), 10)
    opt = build_optimizer(model, cfg)
    assert type(opt) is torch.optim.AdamW
    decayed, plain = opt.param_groups
    assert decayed["betas"] == (0.8, 0.99) and decayed["lr"] == 0.01 and not decayed["amsgrad"]
    assert decayed["weight_decay"] == 0.5 and plain["weight_decay"] == 0.0
    assert {id(p) for p in decayed["params"]} == {id(p) for p in model.parameters() if p.ndim >= 2}
    # the whole 256-example set is the one batch: the run's step is a hand-made AdamW step on it
    hand = build_model(cfg, (1, 12, 12), 10)
    ref = torch.optim.AdamW([{"params": [p for p in hand.parameters() if p.ndim >= 2], "weight_decay": 0.5},
                             {"params": [p for p in hand.parameters() if p.ndim <= 1], "weight_decay": 0.0}],
                            lr=0.01, betas=(0.8, 0.99))
    hand.train()
    torch.nn.functional.cross_entropy(hand(data[0]), data[1]).backward()
    ref.step()
    run = train_classifier(cfg, data=data, keep_model=True)
    assert run.steps == 1
    for (name, a), b in zip(run.model.state_dict().items(), hand.state_dict().values()):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-6, msg=name)
    longer = train_classifier(with_overrides(cfg, batch_size=32, epochs=3.0, weight_decay=0.01, eval_every_epochs=3.0),
                              data=data)
    assert longer.test_accuracy > 0.3  # chance is 0.1
