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
