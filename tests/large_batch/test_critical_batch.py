"""The critical batch by branching (Merrill et al. 2025) and batch-size warmup: closed forms on
quadratics, exact restoration of the checkpoint, hand-computed schedules, training with a schedule."""

import copy
import math
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leanscale.core.errors import InvalidParameterError
from leanscale.large_batch import (
    BatchSizeSchedule,
    CriticalBatchResult,
    batch_warmup,
    branch_critical_batch,
)
from leanscale.large_batch.critical_batch import _order
from leanscale.large_batch.train import TrainConfig, train_classifier


def _identical_examples(n=64, x0=1.0, y0=0.0, w0=1.0):
    """Every example the same: no gradient noise at all (tr(Sigma) = 0), curvature h = 2 x0^2 of the MSE."""
    x, y = torch.full((n, 1), x0), torch.full((n, 1), y0)
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(w0)
    return model, (x, y)


def test_noise_free_curvature_limited_closed_form():
    # SGD on r = w - w*: r <- (1 - 2 lr x0^2) r per step; lr 0.25 at batch 8 (factor 1/2). With the linear
    # rule and 64 examples: B=8: 8 steps of 1/2; B=16: 4 steps of 0 (exact); B=32: 2 of -1; B=64: 1 of -3.
    model, data = _identical_examples()
    opt = torch.optim.SGD(model.parameters(), lr=0.25)
    res = branch_critical_batch(model, F.mse_loss, data, [8, 16, 32, 64], optimizer=opt, examples=64,
                                lr_rule="linear")
    expected = [0.5 ** 16, 0.0, 1.0, 9.0]  # r0 = 1: loss = r^2
    assert res.losses == pytest.approx(expected, abs=1e-12)
    assert res.critical_batch == 16 and not res.saturated  # one step of 2x the LR is exact, more overshoots
    assert res.start_loss == pytest.approx(1.0)
    assert [r["steps"] for r in res.runs] == [8, 4, 2, 1]
    assert res.lrs == ((0.25,), (0.5,), (1.0,), (2.0,))
    # The square-root rule moves too little: B=16 takes 4 steps of factor 1 - 1/sqrt(2) -> worse than B=8.
    res = branch_critical_batch(model, F.mse_loss, data, [8, 16, 32], optimizer=opt, examples=64, lr_rule="sqrt")
    assert res.losses[1] == pytest.approx((1 - 2 * 0.25 * math.sqrt(2)) ** 8, rel=1e-5)
    assert res.critical_batch == 8
    assert model.weight.item() == 1.0  # the checkpoint is untouched


def test_noise_dominated_small_lr_saturates():
    # Pure label noise around the optimum (w* = 0, start there) and lr * curvature << 1 at every batch:
    # linear scaling keeps each branch the same SDE, all losses agree -> the CBS is the largest tested.
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2048, 4, generator=g), torch.randn(2048, 1, generator=g)
    model = nn.Linear(4, 1, bias=False)
    nn.init.zeros_(model.weight)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    res = branch_critical_batch(model, F.mse_loss, (x, y), [8, 16, 32, 64], optimizer=opt, examples=512,
                                lr_rule="linear", tolerance=0.01)
    assert res.saturated and res.critical_batch == 64
    assert max(res.losses) <= res.threshold
    # The tolerance is what decides: zero tolerance keeps only batches at or below the reference loss.
    strict = branch_critical_batch(model, F.mse_loss, (x, y), [8, 64], optimizer=opt, examples=512,
                                   lr_rule="linear", tolerance=0.0)
    assert strict.critical_batch == (64 if strict.losses[1] <= strict.losses[0] else 8)


class _DropNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.drop, self.b = nn.Linear(5, 16), nn.Dropout(0.3), nn.Linear(16, 1)

    def forward(self, x):
        return self.b(self.drop(torch.relu(self.a(x))))


def _checkpoint():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 5, generator=g)
    y = x[:, :1] * 2 + 0.3 * torch.randn(300, 1, generator=g)
    torch.manual_seed(0)
    model = _DropNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for i in range(5):  # some momentum state to restore
        opt.zero_grad()
        F.mse_loss(model(x[i * 32:(i + 1) * 32]), y[i * 32:(i + 1) * 32]).backward()
        opt.step()
    return model, opt, (x, y)


def test_branches_restore_the_checkpoint_exactly():
    model, opt, data = _checkpoint()
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)  # a scheduler patches opt.step: the copies must not step opt
    before_model = copy.deepcopy(model.state_dict())
    before_opt = copy.deepcopy(opt.state_dict())
    kw = dict(optimizer=opt, examples=96, seed=3, lr_grid=(0.5, 1.0))
    with pytest.warns(RuntimeWarning, match="edge"):
        first = branch_critical_batch(model, F.mse_loss, data, [16, 32, 48], **kw)
    with pytest.warns(RuntimeWarning):
        second = branch_critical_batch(model, F.mse_loss, data, [16, 32, 48], **kw)
    assert [r["loss"] for r in first.runs] == [r["loss"] for r in second.runs]  # same seed, same branches
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_model[k])
    assert opt.state_dict()["param_groups"] == before_opt["param_groups"]
    for k, s in opt.state_dict()["state"].items():
        assert torch.equal(s["momentum_buffer"], before_opt["state"][k]["momentum_buffer"])

    # Reference: the branch at the base batch with multiplier 1 is a plain continuation of the run, from a
    # copy of the model and the optimizer (momentum included), on the seeded order, with dropout seeded.
    net, o = copy.deepcopy((model, opt))
    x, y = data
    torch.manual_seed(3)
    for idx in _order(len(y), 96, 3).split(16):
        o.zero_grad(set_to_none=True)
        F.mse_loss(net(x[idx]), y[idx]).backward()
        o.step()
    net.eval()
    with torch.no_grad():
        ref = F.mse_loss(net(x), y).item()
    run = next(r for r in first.runs if r["batch_size"] == 16 and r["lr_multiplier"] == 1.0)
    assert run["loss"] == pytest.approx(ref, rel=1e-6)
    # sqrt rule from base 16: batch 48 at 0.05 * sqrt(3) * multiplier
    run48 = next(r for r in first.runs if r["batch_size"] == 48 and r["lr_multiplier"] == 0.5)
    assert run48["lrs"] == [pytest.approx(0.05 * math.sqrt(3) * 0.5)]  # one param group


def test_factory_optimizer_and_micro_batches():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(256, 3, generator=g), torch.randn(256, 1, generator=g)
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    fresh = branch_critical_batch(model, F.mse_loss, (x, y), [8, 32], optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                                  examples=64)
    stateless = branch_critical_batch(model, F.mse_loss, (x, y), [8, 32],
                                      optimizer=torch.optim.SGD(model.parameters(), lr=0.1), examples=64)
    assert fresh.losses == stateless.losses  # plain SGD has no state: the factory and the instance agree
    micro = branch_critical_batch(model, F.mse_loss, (x, y), [8, 32], optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                                  examples=64, micro_batch_size=4)
    assert micro.losses == pytest.approx(fresh.losses, rel=1e-5)  # accumulation: the same steps
    d = fresh.to_dict()
    assert d["batch_sizes"] == [8, 32] and d["critical_batch"] in (8, 32) and len(d["runs"]) == 2


def test_schedule_phases_hand_computed():
    s = BatchSizeSchedule((128, 256, 512), boundaries=(10_000, 30_000), lr_rule="linear")
    assert [s.batch_at(e) for e in (0, 9_999, 10_000, 29_999, 30_000, 10**9)] == [128, 128, 256, 256, 512, 512]
    # 10000 / 128 = 78.1 -> 78 steps (to 9984); (30000 - 9984) / 256 = 78.2 -> 78 (to 29952);
    # (60000 - 29952) // 512 = 58 (to 59648; the last 352 examples dropped)
    assert s.phases(60_000) == [
        {"start": 0, "end": 9_984, "batch_size": 128, "steps": 78},
        {"start": 9_984, "end": 29_952, "batch_size": 256, "steps": 78},
        {"start": 29_952, "end": 59_648, "batch_size": 512, "steps": 58},
    ]
    assert s.steps(60_000) == 214
    assert s.phases(20_000) == [{"start": 0, "end": 9_984, "batch_size": 128, "steps": 78},
                                {"start": 9_984, "end": 19_968, "batch_size": 256, "steps": 39}]  # cut short
    assert s.lr(0.1, 128, 512) == pytest.approx(0.4)
    assert s.to_dict() == {"batch_sizes": [128, 256, 512], "boundaries": [10_000, 30_000], "lr_rule": "linear"}


def test_schedule_from_fractions_hand_computed():
    s = BatchSizeSchedule.from_fractions([(0, 128), (0.25, 256), (0.6, 512)], 60_000, lr_rule="linear")
    assert s == BatchSizeSchedule((128, 256, 512), (15_000, 36_000), "linear")
    assert BatchSizeSchedule.from_fractions([(0.0, 64)], 10) == BatchSizeSchedule((64,))
    assert BatchSizeSchedule.from_fractions([(0, 32), (1 / 3, 64)], 512).boundaries == (171,)  # 170.67 -> 171
    for points, match in (([(0.1, 128)], "start at 0"), ([(0, 128), (0.5, 256), (0.4, 512)], "increase strictly"),
                          ([(0, 128), (1.0, 256)], "below 1"), ([], "non-empty"), ("0:128", "non-empty"),
                          ([(0, 128), (0.001, 256), (0.002, 512)], "at least one example apart")):
        with pytest.raises(InvalidParameterError, match=f"'points' parameter of BatchSizeSchedule.from_fractions.*{match}"):
            BatchSizeSchedule.from_fractions(points, 512)
    with pytest.raises(InvalidParameterError, match="'batch_sizes' parameter of BatchSizeSchedule"):
        BatchSizeSchedule.from_fractions([(0, 128), (0.5, -256)], 512)
    with pytest.raises(InvalidParameterError, match="'total_examples' parameter"):
        BatchSizeSchedule.from_fractions([(0, 128)], 0)


def test_schedule_ghost_batch_is_the_base_batch_capped_by_the_smallest_per_process_batch():
    s = BatchSizeSchedule((128, 256, 512), (10_000, 30_000))
    assert s.ghost_batch_size(128) == 128 and s.ghost_batch_size(32) == 32
    assert s.ghost_batch_size(256) == 128  # never above the first phase's batch
    assert s.ghost_batch_size(128, world_size=2) == 64 and s.ghost_batch_size(128, world_size=4) == 32
    # one batch size: the ghost batch would be every whole batch, which plain BatchNorm already is
    assert BatchSizeSchedule((64,)).ghost_batch_size(128) is None
    assert BatchSizeSchedule((64,)).ghost_batch_size(16) == 16
    assert BatchSizeSchedule((64,)).ghost_batch_size(64, world_size=2) is None  # 32 per process: the whole batch
    with pytest.raises(InvalidParameterError, match="'world_size' parameter of BatchSizeSchedule.ghost_batch_size "
                                                    "must divide every batch size .*Got 3"):
        s.ghost_batch_size(128, world_size=3)
    for bad in (0, -1, 2.0, True, None):
        with pytest.raises(InvalidParameterError, match="'base_batch_size' parameter"):
            s.ghost_batch_size(bad)


def test_batch_warmup_hand_computed():
    meas = [(4000, 900), (1000, 100), (2000, 300), (3000, 1100)]  # any order
    # base 64: at 1000 the CBS 100 < 128 -> stay; at 2000: 300 >= 256 -> 256; at 3000: 1100 -> 1024, capped 512;
    # at 4000 the CBS fell to 900 -> the batch never shrinks.
    assert batch_warmup(meas, 64, max_batch_size=512) == BatchSizeSchedule((64, 256, 512), (2000, 3000))
    assert batch_warmup(meas, 64) == BatchSizeSchedule((64, 256, 1024), (2000, 3000))
    # margin 2: a batch only once the CBS is twice it: 300 -> 128, 1100 -> 512
    assert batch_warmup(meas, 64, margin=2.0) == BatchSizeSchedule((64, 128, 512), (2000, 3000))
    assert batch_warmup(meas, 64, growth=4) == BatchSizeSchedule((64, 256, 1024), (2000, 3000))
    assert batch_warmup([(0, 600)], 128, lr_rule="linear") == BatchSizeSchedule((512,), (), "linear")
    res = CriticalBatchResult(critical_batch=256, saturated=False, batch_sizes=(64, 256), losses=(1.0, 1.0),
                              lrs=((0.1,), (0.2,)), reference_loss=1.0, threshold=1.01, start_loss=2.0, examples=256,
                              tolerance=0.01, relative=True, lr_rule="sqrt", base_batch_size=64, examples_seen=500)
    assert batch_warmup([res], 64) == BatchSizeSchedule((64, 256), (500,))


def _data(n=256, n_test=64):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (n + n_test,), generator=g)
    x = torch.randn(n + n_test, 6, generator=g) + F.one_hot(y, 6).float() * 2
    return x[:n], y[:n], x[n:], y[n:]


def test_train_with_schedule_steps_lr_and_one_phase_equivalence():
    data = _data()
    cfg = TrainConfig(model="mlp", width=1, batch_size=16, lr=0.1, epochs=1.0, decay="step", milestones=(0.5,),
                      eval_every_epochs=0.5, seed=0)
    plain = train_classifier(cfg, data=data)
    one = train_classifier(cfg, data=data, batch_schedule=BatchSizeSchedule((16,)))
    assert one.steps == plain.steps == 16
    assert one.test_accuracy == plain.test_accuracy and one.test_loss == plain.test_loss
    assert [h["test_loss"] for h in one.history] == [h["test_loss"] for h in plain.history]

    lrs, steps = [], []

    def on_step(step, model, opt):
        steps.append(step)
        lrs.append(opt.param_groups[0]["lr"])

    warm = train_classifier(cfg, data=data, batch_schedule=BatchSizeSchedule((16, 32), (128,)), on_step=on_step)
    # 128 examples at 16 (8 steps, LR 0.1), then 128 at 32 (4 steps, LR 0.1 * sqrt(2), x0.1 after the milestone at 128)
    assert warm.steps == 12 and steps == list(range(1, 13)) and warm.examples == 256
    assert lrs == pytest.approx([0.1] * 8 + [0.1 * math.sqrt(2) * 0.1] * 4)
    assert [h["batch_size"] for h in warm.history] == [16, 32]
    assert [h["step"] for h in warm.history] == [8, 12] and warm.history[-1]["examples"] == 256
    rows = warm.ledger.to_rows()  # one ledger line per phase
    assert [r["steps"] for r in rows] == [8, 4] and [r["batch_size"] for r in rows] == [16, 32]
    assert sum(r["n_examples"] for r in rows) == 256


def test_bad_inputs():
    model, data = _identical_examples()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    call = dict(optimizer=opt, examples=64)
    with pytest.raises(InvalidParameterError, match="'batch_sizes'.*distinct"):
        branch_critical_batch(model, F.mse_loss, data, [8, 8], **call)
    with pytest.raises(InvalidParameterError, match="'batch_sizes'.*at least 2"):
        branch_critical_batch(model, F.mse_loss, data, [8], **call)
    with pytest.raises(InvalidParameterError, match="'examples'.*multiple of every batch size.*\\[48\\]"):
        branch_critical_batch(model, F.mse_loss, data, [8, 48], **call)
    with pytest.raises(InvalidParameterError, match="'optimizer'.*parameters of 'model'"):
        branch_critical_batch(model, F.mse_loss, data, [8, 16], optimizer=torch.optim.SGD(nn.Linear(1, 1).parameters(),
                                                                                         lr=0.1), examples=64)
    with pytest.raises(InvalidParameterError, match="'optimizer'"):
        branch_critical_batch(model, F.mse_loss, data, [8, 16], optimizer="sgd", examples=64)
    with pytest.raises(InvalidParameterError, match="'lr_grid'"):
        branch_critical_batch(model, F.mse_loss, data, [8, 16], lr_grid=[], **call)
    with pytest.raises(InvalidParameterError, match="'tolerance'"):
        branch_critical_batch(model, F.mse_loss, data, [8, 16], tolerance=-0.1, **call)
    with pytest.raises(InvalidParameterError, match="'lr_rule'.*Did you mean 'linear'"):
        branch_critical_batch(model, F.mse_loss, data, [8, 16], lr_rule="linaer", **call)
    with pytest.raises(InvalidParameterError, match="'data'.*finite"):
        branch_critical_batch(model, F.mse_loss, (torch.full((64, 1), math.nan), data[1]), [8, 16], **call)
    with pytest.raises(InvalidParameterError, match="'eval_data'.*same first dimension"):
        branch_critical_batch(model, F.mse_loss, data, [8, 16], eval_data=(data[0], data[1][:3]), **call)
    with pytest.raises(InvalidParameterError, match="'model'"):  # wrong input width, the model's error named
        branch_critical_batch(model, F.mse_loss, (torch.zeros(64, 3), data[1]), [8, 16], **call)
    with pytest.raises(InvalidParameterError, match="smallest batch .*diverged"), pytest.warns(RuntimeWarning):
        branch_critical_batch(model, F.mse_loss, data, [8, 16], optimizer=torch.optim.SGD(model.parameters(), lr=1e30),
                              examples=64)
    locked, _ = _identical_examples()
    locked.lock = threading.Lock()  # cannot be copied
    with pytest.raises(InvalidParameterError, match="'model'.*deep-copyable"):
        branch_critical_batch(locked, F.mse_loss, data, [8, 16], optimizer=torch.optim.SGD(locked.parameters(), lr=0.1),
                              examples=64)
    with pytest.raises(InvalidParameterError, match="'boundaries'.*one boundary fewer"):
        BatchSizeSchedule((128, 256), ())
    with pytest.raises(InvalidParameterError, match="'boundaries'.*strictly increasing"):
        BatchSizeSchedule((128, 256, 512), (5000, 5000))
    with pytest.raises(InvalidParameterError, match="'batch_sizes'"):
        BatchSizeSchedule((128, 0), (10,))
    with pytest.raises(InvalidParameterError, match="'max_batch_size'.*at least 'base_batch_size'"):
        batch_warmup([(10, 100)], 64, max_batch_size=32)
    with pytest.raises(InvalidParameterError, match="'measurements'.*Item 0"):
        batch_warmup([(10, -1)], 64)
    cfg = TrainConfig(model="mlp", width=1, batch_size=16, epochs=1.0)
    sched = BatchSizeSchedule((16, 32), (128,))
    for bad_cfg, match in ((TrainConfig(model="mlp", batch_size=16, target_accuracy=0.5), "target_accuracy"),
                           (TrainConfig(model="mlp", batch_size=16, decay="cosine"), "cosine"),
                           (TrainConfig(model="mlp", batch_size=16, ghost_batch_size=16, width=1),
                            "ghost_batch_size \\(16\\)")):
        with pytest.raises(InvalidParameterError, match=match):
            train_classifier(bad_cfg, data=_data(), batch_schedule=BatchSizeSchedule((8, 16), (128,)))
    with pytest.raises(InvalidParameterError, match="'batch_schedule'.*BatchSizeSchedule"):
        train_classifier(cfg, data=_data(), batch_schedule=[16, 32])
    with pytest.raises(InvalidParameterError, match="'batch_schedule'.*checkpoint"):
        train_classifier(cfg, data=_data(), batch_schedule=sched, checkpoint="x.pt")
    with pytest.raises(InvalidParameterError, match="at most the number of training examples \\(256\\)"):
        train_classifier(cfg, data=_data(), batch_schedule=BatchSizeSchedule((16, 512), (128,)))


@pytest.mark.slow
@pytest.mark.distributed
def test_batch_warmup_under_ddp_matches_one_process(tmp_path):
    import json
    from pathlib import Path

    from tests.distributed import run_torchrun
    from tests.large_batch._ddp_batch_warmup_worker import ddp_case

    run_torchrun(Path(__file__).with_name("_ddp_batch_warmup_worker.py"), tmp_path, nproc=2)
    ddp = json.loads((tmp_path / "rank0.json").read_text())
    one, model = ddp_case()
    # 96/16 = 6 steps, 96/32 = 3, 128/64 = 2: 11 steps; each rank took half of every global batch
    assert ddp["world"] == 2 and ddp["steps"] == one.steps == 11 and ddp["examples"] == one.examples == 320
    assert [h[:2] for h in ddp["history"]] == [[h["step"], h["batch_size"]] for h in one.history]
    for got, want in zip(ddp["history"], one.history):
        assert got[2] == pytest.approx(want["train_loss"], rel=1e-4)
        assert got[3] == pytest.approx(want["test_loss"], rel=1e-4)
    for got, p in zip(ddp["weights"], model.parameters()):
        assert torch.allclose(torch.tensor(got), p.detach().reshape(-1), atol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    ({"at": (0.5, 0.2)}, "'at' parameter of measure_batch_warmup must be checkpoints"),
    ({"at": (0.0,)}, "'at' parameter"),
    ({"at": "0.5"}, "'at' parameter"),
    ({"batch_sizes": (64, 64)}, "'batch_sizes' parameter of measure_batch_warmup must hold distinct"),
    ({"batch_sizes": (64,)}, "'batch_sizes' parameter of measure_batch_warmup must be a sequence of at least 2"),
    ({"batch_sizes": (32, 64)}, "at least the ghost batch"),
    ({"examples": 100}, "'examples' parameter of measure_batch_warmup must be a multiple"),
    ({"eval_mode": "test"}, "'eval_mode' parameter of measure_batch_warmup"),
    ({"max_batch_size": 32}, "'max_batch_size' parameter of measure_batch_warmup"),
])
def test_measure_batch_warmup_refuses_bad_parameters_before_training(kwargs, match):
    from leanscale.large_batch import measure_batch_warmup
    from leanscale.large_batch.train import TrainConfig

    config = TrainConfig(batch_size=64, ghost_batch_size=64, n_train=512, n_test=128, width=4)
    with pytest.raises(InvalidParameterError, match=match):
        measure_batch_warmup(config, **kwargs)
