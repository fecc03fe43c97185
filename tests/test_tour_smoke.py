"""Smoke test of the real tour: `leanscale tour --quick` on built-in data, as `make tour` runs it."""

import json
import time

import pytest

from leanscale.cli.main import main


@pytest.mark.slow  # ~2 minutes: the whole quick tour
@pytest.mark.timeout(900)  # not the suite's 300 s per test: on a loaded machine it takes 4-5 minutes
def test_quick_tour_runs_every_available_chapter(tmp_path, capsys):
    out = tmp_path / "tour-report"
    start = time.perf_counter()
    rc = main(["tour", "--quick", "--out", str(out)])
    seconds = time.perf_counter() - start
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    chapters = {c["name"]: c for c in summary["chapters"]}
    assert chapters["scaling"]["status"] == "ok"
    metrics = {row["metric"] for row in chapters["scaling"]["summary_rows"]}
    assert any(m.startswith("a (N_opt ~ C^a)") for m in metrics)
    html = (out / "index.html").read_text()
    assert html.count("data:image/png;base64,") >= 2  # the sweep's figures are embedded
    assert (out / "scaling" / "sweep" / "runs.csv").is_file()
    assert chapters["large_batch"]["status"] == "ok"
    rows = {row["metric"]: row["value"] for row in chapters["large_batch"]["summary_rows"]}
    assert any(m.startswith("accuracy gap") and "with the recipe" in m for m in rows)
    assert any(m.startswith("B_simple") for m in rows)
    assert (out / "ledger.json").is_file()
    entries = json.loads((out / "ledger.json").read_text())["entries"]
    assert entries and all(e["peak_memory_bytes"] is not None for e in entries)  # every row measured
    assert summary["ledger_figure"] == "ledger.png" and (out / "ledger.png").is_file()
    compared = {e["meta"]["compare"] for e in entries if "compare" in e["meta"]}
    assert len(compared) >= 5  # large batch, pruning, SWAT, MoE, cascade: each next to its baseline
    assert all(c["cpu_seconds"] is not None for c in summary["chapters"] if c["status"] == "ok")
    assert chapters["cascade"]["status"] == "ok"
    rows = {row["metric"]: row["value"] for row in chapters["cascade"]["summary_rows"]}
    assert any(m.startswith("cascade vs big model") for m in rows)
    print(f"quick tour: {seconds:.1f} s")  # the 2-minute budget is a benchmark matter, not asserted
