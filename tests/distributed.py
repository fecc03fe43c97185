"""Launch a test worker script under ``torchrun --nproc_per_node=N`` (gloo on CPU).

Workers should, before ``destroy_process_group()``, delete the DDP model and optimizer, call
``gc.collect()`` and ``dist.barrier()`` (rank 0 otherwise sometimes aborts at exit on this machine).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(script: str | Path, *args: str, nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``script args...`` on ``nproc`` gloo processes; fail with the workers' stderr."""
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LEANSCALE_NO_PROGRESS": "1"}
    proc = subprocess.run(
        [str(torchrun), f"--nproc_per_node={nproc}", f"--master_port={free_port()}", str(script), *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=env, check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"torchrun exited with {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc
