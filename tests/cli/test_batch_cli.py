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
