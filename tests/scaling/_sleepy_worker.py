"""A fake sweep run for the process-executor tests: reports its pid, then sleeps (never trains)."""

import os
import time
from pathlib import Path


def sleep_and_report(spec, max_minutes):
    (Path(os.environ["LEANSCALE_TEST_PID_DIR"]) / f"{os.getpid()}.pid").write_text(str(spec))
    time.sleep(600)
    return {}
