"""Worker of tests/scaling/test_sweep_ddp.py, launched by ``torchrun --nproc_per_node=2``.

Usage: python _ddp_sweep_worker.py LOG_DIR [leanscale sweep arguments...]

Runs ``leanscale sweep`` (which starts the gloo process group itself under torchrun) and writes,
per rank, ``LOG_DIR/rank<r>.json``: a digest of every training window this rank saw and the
runs :func:`run_sweep` returned on it, so the test can check that the ranks read disjoint data
and agree on the metrics.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import leanscale.scaling.sweep as sweep_module  # `leanscale sweep` imports run_sweep from here when it runs
from leanscale.cli.main import main
from leanscale.core.io import atomic_write_json
from leanscale.data.text import TokenStream


def run() -> int:
    log_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    rank = int(os.environ["RANK"])
    seen: list[str] = []
    original_batches = TokenStream.train_batches
    original_run_sweep = sweep_module.run_sweep

    def recording_train_batches(self, *args, **kwargs):
        for x, y in original_batches(self, *args, **kwargs):  # x: (B_local, T)
            seen.extend(hashlib.sha1(row.numpy().tobytes()).hexdigest() for row in x)
            yield x, y

    def recording_run_sweep(*args, **kwargs):
        import torch.distributed as dist

        result = original_run_sweep(*args, **kwargs)
        atomic_write_json(log_dir / f"rank{rank}.json",
                          {"windows": seen, "runs": result.runs, "world_size": dist.get_world_size()})
        return result

    TokenStream.train_batches = recording_train_batches
    sweep_module.run_sweep = recording_run_sweep
    return main(argv)


if __name__ == "__main__":
    sys.exit(run())
