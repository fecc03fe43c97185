"""Smoke test of the real tour: `leanscale tour --quick` on built-in data, as `make tour` runs it.

Every chapter runs for real, on its own data, except that the scaling chapter trains a tiny IsoFLOP
sweep (the one tests/scaling/test_sweep.py trains, ~10 s) instead of the quick tour's (6 runs, two
thirds of the quick tour's time: 67 of 115 s alone, ~150 s beside the other pytest worker). The
quick sweep's plan is checked below without training it; its time is a benchmark matter
(`benchmarks/tour_timing.py`, `benchmarks/results/tour.json`).
"""

import dataclasses
import json
import time

import pytest

from leanscale.cli.main import main
from leanscale.scaling.grid import plan_isoflop_grid
from leanscale.scaling.tour import tour_sweep_config

# tests/scaling/test_sweep.py's TINY sweep: 2 budgets x 3 sizes of 3k-23k parameters on 300 kB of gcide
TINY_SWEEP = dict(
    corpus="gcide", max_bytes=300_000, vocab_size=300, seq_len=32, head_dim=8, batch_size=8,
    budgets_flops=(2e9, 4e9), n_sizes=3, size_span=4.0, tokens_per_param=5.0,
    n_curve_points=4, val_batches=4,
)


def test_the_quick_tours_own_sweep_plans_as_its_docstring_says():
    """What the smoke test below does not train: 2 budgets x 3 sizes over a 4x bracket, one epoch
    of D = C/(6N) tokens each; the smallest model at 1.8e11 FLOPs is d16, not d8 (d8 would train
    5M tokens, ~60 s alone)."""
    grid = plan_isoflop_grid(tour_sweep_config(quick=True))
    budgets = sorted({s.budget_flops for s in grid})
    assert budgets == [9e10, 1.8e11] and len(grid) == 6
    for budget in budgets:
        specs = sorted((s for s in grid if s.budget_flops == budget), key=lambda s: s.n_params)
        assert len(specs) == 3 and len({s.n_embd for s in specs}) == 3
        for s in specs:
            assert 6 * s.n_params * s.n_tokens == pytest.approx(budget, rel=0.01)
    assert min((s for s in grid if s.budget_flops == 1.8e11), key=lambda s: s.n_params).n_embd == 16
    assert len(plan_isoflop_grid(tour_sweep_config(quick=False))) == 12  # 3 budgets x 4 sizes


@pytest.mark.slow  # ~1 minute beside the other pytest worker: every chapter of the quick tour
@pytest.mark.timeout(900)  # not the suite's 300 s per test: on a loaded machine it takes minutes
def test_quick_tour_runs_every_available_chapter(tmp_path, capsys, monkeypatch):
    def tiny_sweep(quick: bool, seed: int = 0):
        assert quick  # the chapter asked for the quick tour's sweep
        return dataclasses.replace(tour_sweep_config(quick, seed), **TINY_SWEEP)

    monkeypatch.setattr("leanscale.scaling.tour.tour_sweep_config", tiny_sweep)
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
    # the tiny sweep's law may have no frontier: the chapter then says so instead of failing
    per_param = next(r["value"] for r in chapters["scaling"]["summary_rows"] if r["metric"].startswith("tokens per"))
    assert isinstance(per_param, float) or per_param.startswith("none: the fitted law has no frontier")
    html = (out / "index.html").read_text()
    assert html.count("data:image/png;base64,") >= 4  # figures of large batch, pruning, cascade, the ledger
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
    print(f"quick tour, tiny sweep: {seconds:.1f} s")  # the tour's time is a benchmark matter, not asserted
