"""The scripts in examples/ run end to end (tiny settings), in one process and under torchrun."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed import free_port

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ENV = {**os.environ, "LEANSCALE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
ARGS = ["--batch", "256", "--n-train", "1024", "--epochs", "1", "--micro", "128"]


def test_large_batch_own_loop_single_process():
    proc = subprocess.run([sys.executable, str(EXAMPLES / "large_batch_own_loop.py"), *ARGS],
                          capture_output=True, text=True, timeout=240, env=ENV, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "large batch: batch 256, LR 0.141" in proc.stdout
    assert "test accuracy" in proc.stdout and "Recommended batch size" in proc.stdout


@pytest.mark.distributed
def test_large_batch_own_loop_under_torchrun():
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         str(EXAMPLES / "large_batch_own_loop.py"), *ARGS],
        capture_output=True, text=True, timeout=240, env=ENV, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("test accuracy") == 1  # rank 0 reports
    assert "Recommended batch size" in proc.stdout  # the DDP hook measured the noise scale


PRUNE_ARGS = ["--n-train", "1000", "--n-test", "500", "--epochs", "3", "--score-epochs", "2", "--keep", "0.6"]


def _check_pruning_output(stdout: str) -> None:
    assert stdout.count("test accuracy") == 1  # rank 0 reports
    assert "kept 600 of 1000 (60%)" in stdout
    skipped = float(stdout.split("InfoBatch skipped ")[1].split("%")[0])
    assert 0.0 < skipped < 50.0  # epoch 1 of 3 prunes part of the below-mean examples
    forgotten = int(stdout.split("EL2N median ")[1].split(", ")[1].split(" ")[0])
    assert forgotten > 0  # two scoring epochs: some examples are learned, then forgotten


def test_pruning_own_loop_single_process():
    proc = subprocess.run([sys.executable, str(EXAMPLES / "pruning_own_loop.py"), *PRUNE_ARGS],
                          capture_output=True, text=True, timeout=240, env=ENV, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_pruning_output(proc.stdout)


@pytest.mark.distributed
def test_pruning_own_loop_under_torchrun():
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         str(EXAMPLES / "pruning_own_loop.py"), *PRUNE_ARGS],
        capture_output=True, text=True, timeout=240, env=ENV, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_pruning_output(proc.stdout)
