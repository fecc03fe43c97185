import json
import subprocess
import sys

import pytest

from leanscale.cli.main import main
from tests.distributed import free_port


def test_batch_plan_prints_the_recipe(capsys):
    assert main(["batch", "plan", "--batch", "2048", "--epochs", "10", "--milestones", "5,8"]) == 0
    out = capsys.readouterr().out
    assert "batch 2048, LR 0.4" in out and "160 epochs" in out and "ghost batch 128" in out and "why:" in out


def test_batch_plan_json(capsys):
    assert main(["batch", "plan", "--batch", "1024", "--rule", "linear", "--warmup-epochs", "2", "--json"]) == 0
    blob = json.loads(capsys.readouterr().out)
    assert blob["lr"] == pytest.approx(0.8) and blob["warmup_epochs"] == 2 and blob["ghost_batch_size"] == 128


def test_batch_plan_adamw_rules_json(capsys):
    """AdamW: batch 128 -> 512 with the sqrt LR rule and as many updates (regime 1): the timescale
    rule gives wd0 * lr0 / lr = 0.1 / 2, the beta2 rule 0.95 ** 4 (the same half-life in examples)."""
    assert main(["batch", "plan", "--batch", "512", "--optimizer", "adamw", "--base-lr", "1e-3",
                 "--weight-decay", "0.1", "--betas", "0.9,0.95", "--json"]) == 0
    blob = json.loads(capsys.readouterr().out)
    assert blob["lr"] == pytest.approx(2e-3) and blob["weight_decay"] == pytest.approx(0.05)
    assert blob["betas"] == pytest.approx([0.9, 0.95 ** 4])
    assert main(["batch", "plan", "--batch", "512", "--optimizer", "adamw", "--weight-decay", "0.1", "--betas",
                 "0.9,0.95", "--no-timescale-rule", "--no-beta2-rule", "--json"]) == 0
    blob = json.loads(capsys.readouterr().out)
    assert blob["weight_decay"] == pytest.approx(0.1) and blob["betas"] == pytest.approx([0.9, 0.95])
    assert main(["batch", "plan", "--batch", "512", "--weight-decay", "0.1"]) == 2  # sgd has no weight decay rule
    err = capsys.readouterr().err
    assert "'base_weight_decay' parameter of LargeBatchRecipe" in err and "Traceback" not in err


def test_batch_plan_rule_default_is_the_library_default():
    """#14: one LR-rule default; the parser writes it out (it must not import torch)."""
    import argparse

    from leanscale.cli.batch import add_parser
    from leanscale.large_batch import LargeBatchRecipe
    from leanscale.large_batch.schedules import DEFAULT_LR_RULE

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["batch", "plan", "--batch", "1024"])
    assert args.rule == DEFAULT_LR_RULE == LargeBatchRecipe(batch_size=1024).lr_rule == "sqrt"


def test_batch_bad_input_is_a_clean_error(capsys):
    assert main(["batch", "plan", "--batch", "1024", "--rule", "cubic"]) == 2
    err = capsys.readouterr().err
    assert "'lr_rule' parameter of LargeBatchRecipe" in err and "Traceback" not in err


def test_batch_train_single_process_and_torchrun_agree(tmp_path):
    """`leanscale batch train` on 512 Fashion-MNIST images: one process vs 2 gloo processes (each
    takes half of every global batch of 64, ghost batches of 16): the same accuracy and loss."""
    common = ["batch", "train", "--batch", "64", "--base-batch", "16", "--regime", "0",
              "--set", "n_train=512", "--set", "n_test=500", "--set", "width=4", "--set", "milestones=",
              "--json"]
    single = tmp_path / "single.json"
    assert main([*common, "--out", str(single)]) == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                "-m", "leanscale.cli.main"]
    env_out = tmp_path / "ddp.json"
    proc = subprocess.run([*torchrun, *common, "--out", str(env_out)], capture_output=True, text=True,
                          timeout=240, check=False, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = json.loads(single.read_text()), json.loads(env_out.read_text())
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert a["steps"] == b["steps"] == 8
    assert b["test_accuracy"] == pytest.approx(a["test_accuracy"], abs=0.01)
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)


def test_batch_noise_measures_and_advises(capsys):
    assert main(["batch", "noise", "--width", "4", "--warm-steps", "5", "--n-batches", "4", "--batch-size", "32",
                 "--json"]) == 0
    blob = json.loads(capsys.readouterr().out)
    assert blob["b_simple"] > 0 and blob["advice"]["batch_size"] >= 1
    assert blob["measurement"]["n_batches"] == 4 and blob["measurement"]["batch_small"] == 32


# ------------------------------------------------------------------ bad input (issue #13)
@pytest.mark.parametrize(("argv", "match"), [
    (["plan", "--batch", "256", "--epochs", "inf"], "'base_epochs' parameter of LargeBatchRecipe"),
    (["plan", "--batch", "256", "--clip", "inf"], "'clip_grad_norm'"),
    (["plan", "--batch", "256", "--max-lr", "inf"], "'max_lr'"),
    (["plan", "--batch", "256", "--warmup-epochs", "100"], "'warmup_epochs' parameter of LargeBatchRecipe must be at most"),
    (["plan", "--batch", "100000000000000000000", "--base-lr", "1e300", "--rule", "linear"], "scaled LR of inf"),
    # checked before any data are loaded or steps run (a negative count trained a full epoch)
    (["noise", "--warm-steps", "-3"], "'--warm-steps' parameter of leanscale batch noise"),
    (["noise", "--base-batch", "0"], "'--base-batch' parameter of leanscale batch noise"),
    (["noise", "--base-lr", "nan"], "'--base-lr' parameter of leanscale batch noise"),
    (["noise", "--n-batches", "1"], "'--n-batches'"),
    (["noise", "--width", "0"], "'width' parameter of TrainConfig"),
    # --set of a field the recipe sets itself was silently overwritten
    (["train", "--batch", "64", "--set", "optimizer=lars"], "must not set 'optimizer'.*use --optimizer"),
    (["train", "--batch", "64", "--set", "lr=1"], "must not set 'lr'.*use --base-lr"),
    (["train", "--batch", "64", "--set", "batch_size=32"], "must not set 'batch_size'"),
    (["train", "--batch", "64", "--set", "ghost_batch_size=8"], "use --ghost-batch"),
    (["train", "--batch", "64", "--epochs", "10", "--milestones", "5", "--set", "milestones=0.3"],
     "must not set 'milestones' together with --milestones"),
])
def test_batch_bad_flags_are_clean_errors(capsys, argv, match):
    import re

    assert main(["batch", *argv]) == 2
    err = capsys.readouterr().err
    assert re.search(match, err) and "Traceback" not in err


@pytest.mark.parametrize(("out", "match"), [
    ("{folder}", "must be a file to write. Got .*, which is a folder"),
    ("{file}/x.json", "must be a file in a folder. Got .*, but .* is a file, not a folder"),
])  # a missing folder is created (tests/cli/test_byo_cli.py)
def test_batch_train_checks_out_before_training(tmp_path, capsys, monkeypatch, out, match):
    import re

    import leanscale.large_batch.train as train_module

    def no_training(*args, **kwargs):
        raise AssertionError("trained before checking --out")

    monkeypatch.setattr(train_module, "train_classifier", no_training)
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    out = out.format(folder=tmp_path / "folder", file=tmp_path / "file", tmp=tmp_path)
    assert main(["batch", "train", "--batch", "64", "--out", out]) == 2
    err = capsys.readouterr().err
    assert re.search(match, err) and "'--out' parameter of leanscale batch train" in err


def test_batch_noise_unreliable_estimate_prints_no_number(capsys):
    """2 batches of 4 at initialisation: the estimate is noise; no B_simple, no advice, exit 1."""
    assert main(["batch", "noise", "--width", "2", "--warm-steps", "0", "--n-batches", "2", "--batch-size", "4"]) == 1
    out = capsys.readouterr().out
    assert "B_simple: no reliable estimate" in out and "warning: B_simple is unreliable" in out
    assert "Recommended batch size" not in out and "B_simple =" not in out
    assert main(["batch", "noise", "--width", "2", "--warm-steps", "0", "--n-batches", "2", "--batch-size", "4",
                 "--json"]) == 1
    blob = json.loads(capsys.readouterr().out)
    assert blob["b_simple"] is None and blob["reliable"] is False and blob["advice"] is None
    assert "unreliable" in blob["warnings"][0] and blob["measurement"]["reliable"] is False


def test_batch_noise_warm_steps_zero_does_not_train(capsys, monkeypatch):
    import leanscale.large_batch.train as train_module

    def no_training(*args, **kwargs):
        raise AssertionError("--warm-steps 0 must not train")

    monkeypatch.setattr(train_module, "train_classifier", no_training)
    main(["batch", "noise", "--width", "2", "--warm-steps", "0", "--n-batches", "8", "--batch-size", "16", "--json"])
    blob = json.loads(capsys.readouterr().out)
    assert blob["warm_steps"] == 0 and blob["measurement"]["n_batches"] == 8


def test_batch_train_divergence_is_reported_with_exit_1(capsys):
    argv = ["batch", "train", "--batch", "256", "--base-lr", "1000", "--set", "n_train=512", "--set", "n_test=100",
            "--set", "width=2"]
    with pytest.warns(RuntimeWarning, match="training diverged"):
        assert main([*argv, "--json"]) == 1
    assert "diverged" in json.loads(capsys.readouterr().out)["warnings"][0]


# ------------------------------------------------------------------ batch-size warmup and AdamW (issue #17)
TINY = ["--set", "n_train=512", "--set", "n_test=256", "--set", "width=4", "--set", "model=mlp", "--set", "milestones="]


def _tiny_config(**changes):
    from leanscale.large_batch.train import TrainConfig

    return TrainConfig(**{"n_train": 512, "n_test": 256, "width": 4, "model": "mlp", "milestones": (),
                          "batch_size": 32, "lr": 0.1, "epochs": 1.0, **changes})


def test_batch_train_schedule_equals_the_api_run(capsys):
    """--batch-schedule 0:32,0.25:64,0.5:128 is BatchSizeSchedule((32, 64, 128), (128, 256)) on the 512
    examples of the run: the same steps (4 + 2 + 2), accuracy and loss as train_classifier with it."""
    from leanscale.large_batch import BatchSizeSchedule
    from leanscale.large_batch.train import train_classifier

    assert main(["batch", "train", "--batch-schedule", "0:32,0.25:64,0.5:128", "--base-batch", "32", *TINY,
                 "--json"]) == 0
    blob = json.loads(capsys.readouterr().out)
    api = train_classifier(_tiny_config(ghost_batch_size=32),
                           batch_schedule=BatchSizeSchedule((32, 64, 128), (128, 256)))
    assert blob["schedule"] == {"batch_sizes": [32, 64, 128], "boundaries": [128, 256], "lr_rule": "sqrt"}
    assert blob["steps"] == api.steps == 8 and blob["fixed_batch_steps"] == 16
    assert blob["test_accuracy"] == api.test_accuracy
    assert blob["test_loss"] == pytest.approx(api.test_loss, rel=1e-6)
    assert [h["batch_size"] for h in blob["history"]] == [h["batch_size"] for h in api.history]
    assert blob["config"]["ghost_batch_size"] == 32 and "recipe" not in blob


def test_schedule_flag_round_trips():
    """What `batch critical` prints is the schedule it measured: boundaries back exactly."""
    from leanscale.cli.batch import _schedule_flag
    from leanscale.large_batch import BatchSizeSchedule

    for total, sched in ((60_000, BatchSizeSchedule((128, 256), (23_040,))),
                         (59_999, BatchSizeSchedule((128, 256, 512), (7_681, 23_039)))):
        flag = _schedule_flag(sched, total)
        points = [(float(f), int(b)) for f, b in (p.split(":") for p in flag.split(","))]
        assert BatchSizeSchedule.from_fractions(points, total) == sched
    assert _schedule_flag(BatchSizeSchedule((128, 256), (23_040,)), 60_000) == "0:128,0.384:256"


_FORM = "comma-separated FRACTION:BATCH points"


@pytest.mark.parametrize(("schedule", "got"), [
    ("abc", "'abc' is not FRACTION:BATCH"),
    ("0:128,0.5", "'0.5' is not FRACTION:BATCH"),
    ("0:128,0.5:2x", "'0.5:2x' is not FRACTION:BATCH"),
    ("0:128,nan:256", "'nan:256' is not FRACTION:BATCH"),
    ("0.1:128,0.5:256", "which starts at 0.1"),
    ("0:32,0.5:64,0.3:128", "whose fractions do not increase strictly: 0, 0.5, 0.3"),
    ("0:32,0.5:64,0.5:128", "whose fractions do not increase strictly: 0, 0.5, 0.5"),
    ("0:32,-0.5:64", "with fractions outside \\[0, 1\\): -0.5"),
    ("0:32,1.5:64", "with fractions outside \\[0, 1\\): 1.5"),
    ("0:-32", "with batch sizes below 1: -32"),
    ("0:32,0.5:0", "with batch sizes below 1: 0"),
])
def test_batch_schedule_malformed_exits_2_before_training(capsys, monkeypatch, schedule, got):
    import re

    import leanscale.large_batch.train as train_module

    monkeypatch.setattr(train_module, "train_classifier", lambda *a, **k: pytest.fail("trained"))
    monkeypatch.setattr(train_module, "load_image_data", lambda *a, **k: pytest.fail("loaded the data"))
    assert main(["batch", "train", "--batch-schedule", schedule, *TINY]) == 2
    err = capsys.readouterr().err
    assert "The '--batch-schedule' parameter of leanscale batch train must be " + _FORM in err
    assert f"Got {schedule!r}" in err and re.search(got, err) and "Traceback" not in err


@pytest.mark.parametrize(("schedule", "world", "got"), [
    ("0:32,0.5:1024", 1, "at most the 512 training examples. Got '0:32,0.5:1024', with 1024"),
    ("0:32,0.5:63", 2, "divisible by the 2 processes .* Got '0:32,0.5:63', with 63"),
    ("0:32,0.001:64,0.002:128", 1, "at least one example apart .* boundaries \\[1, 1\\]"),
    # the default ghost batch is the per-process part of the smallest batch; one of the user's must fit it
    ("0:32,0.5:64 --ghost-batch 32", 2, "'--ghost-batch' parameter .* at most the smallest per-process batch of "
                                        "--batch-schedule \\(16 = 32 / 2 process\\(es\\)\\). Got 32"),
])
def test_batch_schedule_that_does_not_fit_the_data_or_processes_exits_2(capsys, monkeypatch, schedule, world, got):
    """Checked once the data are loaded (and the processes known), before any step."""
    import re

    import leanscale.core.distributed as distributed
    import leanscale.large_batch.train as train_module

    monkeypatch.setattr(train_module, "train_classifier", lambda *a, **k: pytest.fail("trained"))
    monkeypatch.setattr(distributed, "rank_and_world", lambda: (0, world))
    schedule, *more = schedule.split()
    assert main(["batch", "train", "--batch-schedule", schedule, *more, *TINY]) == 2
    err = capsys.readouterr().err
    assert "--ghost-batch" in more or "The '--batch-schedule' parameter of leanscale batch train must" in err
    assert re.search(got, err) and "Traceback" not in err


@pytest.mark.parametrize(("argv", "match"), [
    ([], "'--batch' parameter of leanscale batch train is required, or '--batch-schedule' instead.*Got neither"),
    (["--batch", "64", "--batch-schedule", "0:32"], "Got both: --batch 64 and --batch-schedule '0:32'"),
    (["--batch-schedule", "0:32", "--regime", "0"], "'--regime' parameter .* applies to --batch"),
    (["--batch-schedule", "0:32", "--max-lr", "1"], "'--max-lr' parameter .* applies to --batch"),
    (["--batch-schedule", "0:32", "--weight-decay", "0.1"], "'--weight-decay' parameter .* needs --optimizer adamw"),
    (["--batch-schedule", "0:32", "--optimizer", "adamw", "--no-beta2-rule"], "'--no-beta2-rule' parameter"),
    (["--batch-schedule", "0:32", "--rule", "cubic"], "'lr_rule' parameter of leanscale batch train"),
    (["--batch-schedule", "0:32", "--optimizer", "adam"], "'optimizer' parameter of TrainConfig"),
    # AdamW: the recipe's values, refused by name
    (["--batch", "64", "--optimizer", "adamw", "--weight-decay", "-1"], "'base_weight_decay' parameter"),
    (["--batch", "64", "--optimizer", "adamw", "--betas", "0.9,1.5"], "'base_betas' parameter"),
    (["--batch", "64", "--optimizer", "adamw", "--betas", "0.9"], "'base_betas' parameter"),
    (["--batch", "64", "--optimizer", "adamw", "--base-lr", "0.1", "--weight-decay", "20"], "lr \\* weight_decay"),
    (["--batch", "64", "--weight-decay", "0.1"], "'base_weight_decay' parameter of LargeBatchRecipe"),
    (["--batch", "64", "--optimizer", "adamw", "--set", "weight_decay=0.1"],
     "must not set 'weight_decay': --optimizer adamw sets it \\(use --weight-decay\\)"),
    (["--batch", "64", "--optimizer", "adamw", "--set", "beta2=0.9"], "use --betas \\(beta2\\)"),
])
def test_batch_train_schedule_and_adamw_flags_exit_2_before_training(capsys, monkeypatch, argv, match):
    import re

    import leanscale.large_batch.train as train_module

    monkeypatch.setattr(train_module, "train_classifier", lambda *a, **k: pytest.fail("trained"))
    monkeypatch.setattr(train_module, "load_image_data", lambda *a, **k: pytest.fail("loaded the data"))
    assert main(["batch", "train", *argv, *TINY]) == 2
    err = capsys.readouterr().err
    assert re.search(match, err) and "Traceback" not in err


def test_batch_train_adamw_applies_the_recipe_plan(capsys, monkeypatch):
    """--optimizer adamw: the torch.optim.AdamW of the run has the recipe's LR, weight decay (timescale
    rule) and betas (beta2 rule); none on biases and norm weights."""
    import torch

    import leanscale.large_batch.train as train_module
    from leanscale.large_batch import LargeBatchRecipe

    built = []
    original = train_module.build_optimizer
    monkeypatch.setattr(train_module, "build_optimizer", lambda m, c: built.append(original(m, c)) or built[-1])
    argv = ["batch", "train", "--batch", "128", "--base-batch", "32", "--base-lr", "1e-3", "--regime", "0",
            "--optimizer", "adamw", "--weight-decay", "0.1", "--betas", "0.9,0.95", *TINY, "--json"]
    assert main(argv) == 0
    blob = json.loads(capsys.readouterr().out)
    plan = LargeBatchRecipe(batch_size=128, base_batch_size=32, base_lr=1e-3, regime_adaptation=0.0,
                            optimizer="adamw", base_weight_decay=0.1, base_betas=(0.9, 0.95)).plan()
    assert plan.weight_decay == pytest.approx(0.1 * 4 * 0.5) and plan.betas == pytest.approx((0.9, 0.95 ** 4))
    (opt,) = built
    assert type(opt) is torch.optim.AdamW
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == pytest.approx(plan.weight_decay) and plain["weight_decay"] == 0.0
    assert decayed["betas"] == pytest.approx(plan.betas) and decayed["lr"] == pytest.approx(plan.lr)  # constant LR
    assert all(p.ndim >= 2 for p in decayed["params"]) and all(p.ndim <= 1 for p in plain["params"])
    assert blob["config"]["optimizer"] == "adamw" and blob["recipe"]["weight_decay"] == pytest.approx(0.2)
    assert blob["steps"] == 4 and blob["test_accuracy"] > 0.3  # chance is 0.1


def test_batch_critical_equals_the_api_measurement(capsys):
    """`batch critical`: the base run's checkpoints branched with branch_critical_batch, and the warmup
    batch_warmup makes of them, as the API gives them from the same run."""
    import copy

    from leanscale.cli.batch import _schedule_flag
    from leanscale.large_batch import batch_warmup, branch_critical_batch
    from leanscale.large_batch.train import load_image_data, train_classifier
    from leanscale.train.user_data import output_cross_entropy

    argv = ["batch", "critical", "--base-batch", "64", "--sizes", "64,128,256", "--examples", "256", "--at",
            "0.25,0.5", "--tolerance", "0.5", "--margin", "1", *TINY]
    assert main([*argv, "--json"]) == 0
    blob = json.loads(capsys.readouterr().out)
    cfg = _tiny_config(batch_size=64, ghost_batch_size=64)
    snaps = {}
    base = train_classifier(cfg, on_step=lambda s, m, o: snaps.setdefault(s, copy.deepcopy((m, o)))
                            if s in (2, 4) else None)
    x, y, xt, yt = load_image_data(cfg)
    results = [branch_critical_batch(snaps[s][0], output_cross_entropy, (x, y), [64, 128, 256],
                                     optimizer=snaps[s][1], examples=256, eval_data=(xt, yt), tolerance=0.5,
                                     seed=s, eval_train_mode=True, examples_seen=s * 64) for s in (2, 4)]
    assert blob["base_run"]["steps"] == base.steps == 8
    assert blob["base_run"]["test_accuracy"] == base.test_accuracy
    assert [c["step"] for c in blob["checkpoints"]] == [2, 4]
    for got, want in zip(blob["checkpoints"], results):
        assert got["losses"] == pytest.approx(list(want.losses), rel=1e-6)
        assert got["critical_batch"] == want.critical_batch
    schedule = batch_warmup(results, 64, max_batch_size=256, margin=1.0)
    assert blob["schedule"] == schedule.to_dict() and blob["steps"] == schedule.steps(512)
    assert len(schedule.batch_sizes) > 1 and blob["steps"] < 8  # a warmup that saves steps
    assert blob["batch_schedule"] == _schedule_flag(schedule, 512)


@pytest.mark.parametrize(("argv", "match"), [
    (["--at", "0.5,0.2"], "'--at' parameter of leanscale batch critical must be checkpoints .* Got 0.5,0.2"),
    (["--at", "1.5"], "'--at' parameter .* Got 1.5"),
    (["--sizes", "128"], "'--sizes' parameter .* at least two distinct"),
    (["--sizes", "64,x"], "'--sizes' parameter .* comma-separated integers"),
    (["--sizes", "16,32"], "'--sizes' parameter .* at least the ghost batch \\(32"),
    (["--sizes", "32,64", "--examples", "100"], "'--examples' parameter .* not a multiple of 32,64"),
    (["--lr-grid", "0"], "'--lr-grid' parameter"),
    (["--tolerance", "-1"], "'--tolerance' parameter"),
    (["--margin", "0"], "'--margin' parameter"),
    (["--max-batch", "8"], "'--max-batch' parameter"),
    (["--rule", "cubic"], "'lr_rule' parameter of leanscale batch critical"),
    (["--set", "lr=1"], "must not set 'lr': use --base-lr"),
    (["--set", "target_accuracy=0.5"], "must not set 'target_accuracy'"),
    (["WORLD_SIZE=2"], "runs in one process .* without torchrun"),
])
def test_batch_critical_bad_flags_exit_2_before_training(capsys, monkeypatch, argv, match):
    import re

    import leanscale.large_batch.train as train_module

    if argv == ["WORLD_SIZE=2"]:
        monkeypatch.setenv("WORLD_SIZE", "2")
        argv = []

    monkeypatch.setattr(train_module, "train_classifier", lambda *a, **k: pytest.fail("trained"))
    monkeypatch.setattr(train_module, "load_image_data", lambda *a, **k: pytest.fail("loaded the data"))
    assert main(["batch", "critical", "--base-batch", "32", *argv]) == 2
    err = capsys.readouterr().err
    assert re.search(match, err) and "Traceback" not in err


def test_batch_train_schedule_on_your_model_and_data_equals_the_api(tmp_path, capsys, monkeypatch):
    """--model FILE:FACTORY --data FILE.npz (with its own test split) and --batch-schedule: the run of
    train_classifier(config, data=..., model=factory(), batch_schedule=...) on the same tensors."""
    import numpy as np
    import torch

    from leanscale.large_batch import BatchSizeSchedule
    from leanscale.large_batch.train import TrainConfig, train_classifier

    (tmp_path / "net.py").write_text("from torch import nn\n\n\ndef build():\n"
                                     "    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))\n")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 400)
    x = (rng.normal(size=(400, 8)) + 2 * np.eye(8)[y]).astype("float32")
    np.savez(tmp_path / "d.npz", x=x[:320], y=y[:320], x_test=x[320:], y_test=y[320:])
    monkeypatch.chdir(tmp_path)
    assert main(["batch", "train", "--model", "net.py:build", "--data", "d.npz", "--base-batch", "16",
                 "--base-lr", "0.05", "--batch-schedule", "0:16,0.5:64", "--json"]) == 0
    blob = json.loads(capsys.readouterr().out)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    data = tuple(torch.from_numpy(a) for a in (x[:320], y[:320], x[320:], y[320:]))
    api = train_classifier(TrainConfig(model="mlp", batch_size=16, lr=0.05), data=data, model=model,
                           batch_schedule=BatchSizeSchedule((16, 64), (160,)))
    assert blob["steps"] == api.steps == 10 + 2 and blob["config"]["ghost_batch_size"] is None  # no BatchNorm
    assert blob["test_accuracy"] == api.test_accuracy and blob["test_loss"] == pytest.approx(api.test_loss, rel=1e-6)
