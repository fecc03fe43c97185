"""How long the tour takes: wall and CPU seconds per chapter, full and quick -> benchmarks/results/tour.json.

Runs ``leanscale tour`` (``--quick`` with ``--quick``) in a child process and records, from the
tour's ``summary.json``, each chapter's wall seconds and CPU seconds (user + system of the tour's
process and of the worker processes it waited for: ``ChapterOutcome.cpu_seconds``). CPU seconds
vary less than wall seconds on a shared machine, but not nothing: two threads of a loaded
machine's torch spin while they wait for each other. ``--from-summary DIR`` records a tour that
already ran into DIR instead. Each mode's entry in tour.json is replaced, the other one kept.

Usage: python benchmarks/tour_timing.py [--quick] [--from-summary DIR] [--note TEXT]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import machine  # noqa: E402

RESULT = HERE / "results" / "tour.json"
GOALS = {"full": 600.0, "quick": 120.0}  # wall seconds on 2 cores (issue #17)


def _entry(summary: dict, wall: float | None, cpu: float | None, note: str) -> dict:
    chapters = [{"name": c["name"], "status": c["status"], "wall_s": c["seconds"], "cpu_s": c.get("cpu_seconds")}
                for c in summary["chapters"]]
    wall = summary["seconds"] if wall is None else wall
    if cpu is None:
        known = [c["cpu_s"] for c in chapters if c["cpu_s"] is not None]
        cpu = sum(known) if known else None
    mode = "quick" if summary["quick"] else "full"
    return {"mode": mode, "wall_s": wall, "cpu_s": cpu, "goal_wall_s": GOALS[mode],
            "goal_met": wall <= GOALS[mode], "failed": summary["failed"], "chapters": chapters,
            "load_average": summary.get("load_average"),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "note": note}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="time `leanscale tour --quick`")
    ap.add_argument("--from-summary", metavar="DIR", help="record a finished tour's DIR/summary.json instead")
    ap.add_argument("--note", default="", help="how the run was made (load, cache state)")
    args = ap.parse_args()
    wall = cpu = None
    if args.from_summary:
        out = Path(args.from_summary)
    else:
        out = Path(tempfile.mkdtemp(prefix="leanscale-tour-timing-"))
        cmd = [sys.executable, "-m", "leanscale.cli.main", "tour", "--out", str(out)] + (["--quick"] * args.quick)
        before = os.times()
        t0 = time.perf_counter()
        subprocess.run(cmd, check=False)
        wall = time.perf_counter() - t0
        after = os.times()
        cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    summary = json.loads((out / "summary.json").read_text())
    entry = _entry(summary, wall, cpu, args.note)
    blob = json.loads(RESULT.read_text()) if RESULT.is_file() else {}
    blob["machine"] = machine()
    blob.setdefault("runs", {})[entry["mode"]] = entry
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(blob, indent=2) + "\n")
    print(json.dumps(entry, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
