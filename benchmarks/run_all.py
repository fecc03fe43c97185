"""Run every benchmark; each writes JSON/CSV under benchmarks/results/<technique>/.

Usage: python benchmarks/run_all.py [--only scaling]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = {
    "scaling": ["scaling/fit_exactness.py", "scaling/own_law.py"],
    "pruning": ["pruning/fraction_kept.py", "pruning/fraction_kept.py --data wordnet --n-train 20000 --n-test 5000",
                "pruning/active_learning.py", "pruning/infobatch_fmnist.py", "pruning/ssl_encoder.py"],
    "byo": ["byo/moe_upcycling.py", "byo/swat_resnet.py"],
    "large_batch": ["large_batch/hoffer_table1.py", "large_batch/critical_batch.py", "large_batch/throughput.py",
                    "large_batch/adamw_rules.py"],
    "gateway": ["gateway/load.py", "gateway/quality.py", "gateway/cache_latency.py", "gateway/cache_quality.py"],
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=sorted(BENCHMARKS), action="append")
    args = ap.parse_args()
    status = 0
    for name in args.only or sorted(BENCHMARKS):
        for script in BENCHMARKS[name]:
            print(f"== {name}: {script}", flush=True)
            path, *extra = script.split()
            status |= subprocess.call([sys.executable, str(HERE / path), *extra])
    return status


if __name__ == "__main__":
    sys.exit(main())
