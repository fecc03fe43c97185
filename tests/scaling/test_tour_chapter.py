"""The tour's scaling chapter on a sweep whose losses are known in closed form (no training): its
summary must state the law the runs come from, and a sweep that determines no frontier must be
reported, not fail the chapter (the smoke test in tests/test_tour_smoke.py trains a tiny sweep)."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest

from leanscale.report.html import HTMLReport
from leanscale.scaling.analysis import analyze_runs
from leanscale.scaling.laws import EPOCH_2024
from leanscale.scaling.sweep import SweepResult
from leanscale.scaling.tour import chapter
from leanscale.tour import TourContext

BUDGETS = (1e19, 1e20, 1e21)


def _fake_sweep(loss_of):
    """A run_sweep that writes runs.csv and curves.csv of 5 sizes per budget (one epoch of C/(6N)
    tokens, sizes 1/4..4x Epoch's N_opt), the losses from ``loss_of(n, d)``, curves at 4 points."""

    def run_sweep(config, out_dir, progress=None):
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        runs, curves = [], []
        for c in BUDGETS:
            n_opt, _ = EPOCH_2024.compute_optimal(c)
            for k, n in enumerate(n_opt * np.geomspace(0.25, 4.0, 5)):
                d = c / (6 * n)
                run_id = f"C{c:.0e}-{k}"
                runs.append({"run_id": run_id, "budget_flops": c, "n_params": n, "n_tokens": d, "flops": c,
                             "loss": float(loss_of(n, d)), "train_loss": float(loss_of(n, d))})
                for frac in (0.25, 0.5, 0.75, 1.0):
                    curves.append({"run_id": run_id, "n_params": n, "n_tokens": d * frac, "flops": c * frac,
                                   "loss": float(loss_of(n, d * frac)), "train_loss": float(loss_of(n, d * frac))})
        paths = []
        for name, rows in (("runs.csv", runs), ("curves.csv", curves)):
            with open(out / name, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
            paths.append(out / name)
        return SweepResult(out_dir=out, runs=runs, curves=curves, runs_csv=paths[0], curves_csv=paths[1],
                           config=config, n_trained=len(runs), n_skipped=0)

    return run_sweep


def _run_chapter(tmp_path, monkeypatch, loss_of):
    monkeypatch.setattr("leanscale.scaling.sweep.run_sweep", _fake_sweep(loss_of))
    # 100 bootstrap resamples, not the quick tour's 1,000: the intervals are not what is tested
    monkeypatch.setattr("leanscale.scaling.tour.analyze_runs",
                        lambda runs, curves, n_resamples, seed: analyze_runs(runs, curves, n_resamples=100, seed=seed))
    ctx = TourContext(out_dir=tmp_path, quick=True, seed=0, report=HTMLReport("t"), ledger=None, echo=False)
    result = chapter(ctx)
    rows = {r["metric"]: r["value"] for r in result.summary_rows}
    html = ctx.report.render()
    return rows, html


def _row(rows, start):
    return next(v for k, v in rows.items() if k.startswith(start))


def test_the_chapter_recovers_the_law_its_runs_come_from(tmp_path, monkeypatch):
    rows, html = _run_chapter(tmp_path, monkeypatch, EPOCH_2024.predict)
    n, d = EPOCH_2024.compute_optimal(max(BUDGETS))
    assert _row(rows, "tokens per parameter") == pytest.approx(d / n, rel=0.02)  # the fit recovers Epoch's law
    a = float(re.match(r"(-?[\d.]+) \[", _row(rows, "a (N_opt ~ C^a)")).group(1))
    assert a == pytest.approx(EPOCH_2024.beta_ / (EPOCH_2024.alpha_ + EPOCH_2024.beta_), abs=0.02)  # closed form
    assert "unreliable" not in _row(rows, "a (N_opt ~ C^a)")
    assert "efficient frontier" in html  # the contour figure


def test_a_law_without_a_frontier_is_reported_not_a_failed_chapter(tmp_path, monkeypatch):
    # loss grows with N at every budget: alpha < 0, no compute-optimal frontier
    rows, html = _run_chapter(tmp_path, monkeypatch, lambda n, d: 1.0 + 1e-3 * n**0.1 + 400.0 / d**0.3)
    assert _row(rows, "tokens per parameter").startswith("none: the fitted law has no frontier (alpha=-")
    assert re.search(r"\(unreliable: \d+ warning\(s\) in the report\)", _row(rows, "a (N_opt ~ C^a)"))
    assert "not both positive" in html and "efficient frontier" not in html
