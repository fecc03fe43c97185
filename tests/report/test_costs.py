"""The cost ledger as a figure (leanscale.report.costs): pairing rows into comparisons, the bars."""

import doctest

import pytest

import leanscale.report.costs as costs_module
from leanscale.core.errors import InvalidParameterError
from leanscale.core.ledger import CostLedger
from leanscale.report.costs import LEDGER_QUANTITIES, ledger_comparisons, ledger_figure

pytest.importorskip("matplotlib")


def _ledger() -> CostLedger:
    ledger = CostLedger()
    ledger.record("prune: score", flops=1e12, seconds=10.0, peak_memory_bytes=50 * 2**20,
                  compare="pruning", side="technique")
    ledger.record("prune: all data", flops=4e12, seconds=40.0, peak_memory_bytes=80 * 2**20,
                  compare="pruning", side="baseline")
    ledger.record("prune: kept half", flops=2e12, seconds=20.0, peak_memory_bytes=70 * 2**20,
                  compare="pruning", side="technique")
    ledger.record("sweep", flops=9e12, seconds=100.0)  # no baseline: not drawn
    ledger.record("dense", flops=8e12, seconds=30.0, compare=["swat", "both"], side="baseline")
    ledger.record("swat", flops=2e12, seconds=45.0, peak_memory_bytes=10 * 2**20,
                  compare=["swat", "both"], side="technique")
    ledger.record("lonely", flops=1.0, compare="one side only", side="technique")
    return ledger


def test_doctests():
    assert doctest.testmod(costs_module, raise_on_error=True).attempted > 0


def test_comparisons_sum_each_side_like_the_ledger_total():
    ledger = _ledger()
    comps = ledger_comparisons(ledger)
    assert [c["label"] for c in comps] == ["pruning", "swat", "both"]  # one-sided ones left out
    for c in comps:
        for side in ("baseline", "technique"):
            # brute force: the ledger's own total over the same entries
            rows = [e for e in ledger if e.name in c[side]["names"]]
            total = CostLedger(rows).total()
            assert c[side]["flops"] == total.flops and c[side]["seconds"] == total.seconds
            assert c[side]["peak_memory_bytes"] == total.peak_memory_bytes
    pruning = comps[0]
    assert pruning["technique"]["names"] == ["prune: score", "prune: kept half"]
    assert pruning["technique"]["flops"] == 3e12 and pruning["technique"]["peak_memory_bytes"] == 70 * 2**20
    assert comps[1]["baseline"]["peak_memory_bytes"] is None  # no row knew it


def test_saved_entries_and_flat_rows_pair_the_same(tmp_path):
    import json

    ledger = _ledger()
    saved = json.loads(ledger.save(tmp_path / "ledger.json").read_text())["entries"]  # meta nested
    assert ledger_comparisons(saved) == ledger_comparisons(ledger.to_rows()) == ledger_comparisons(ledger)


def test_figure_has_one_bar_pair_per_comparison_and_is_written(tmp_path):
    ledger = _ledger()
    comps = ledger_comparisons(ledger)
    path = tmp_path / "out" / "ledger.png"
    fig = ledger_figure(ledger, path, title="bill")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(fig.axes) == len(LEDGER_QUANTITIES)
    for ax, (key, _, scale, _) in zip(fig.axes, LEDGER_QUANTITIES):
        bars = ax.patches
        assert len(bars) == 2 * len(comps)  # one pair per comparison
        for i, c in enumerate(comps):
            base, tech = bars[2 * i], bars[2 * i + 1]
            want_b = (c["baseline"][key] or 0) / scale
            want_t = (c["technique"][key] or 0) / scale
            assert base.get_width() == pytest.approx(want_b) and tech.get_width() == pytest.approx(want_t)
            assert base.get_y() > tech.get_y()  # baseline above its technique
    ticks = {t.get_text(): y for t, y in zip(fig.axes[0].get_yticklabels(), fig.axes[0].get_yticks())}
    assert sorted(ticks, key=ticks.get, reverse=True) == [c["label"] for c in comps]  # first on top
    memory = fig.axes[2]
    assert [t.get_text().strip() for t in memory.texts].count("n/a") == 2  # dense (swat, both): unknown
    ratios = [t.get_text().strip() for t in fig.axes[0].texts]
    assert "0.75x" in ratios and "0.25x" in ratios  # pruning 3e12 / 4e12, swat 2e12 / 8e12


def test_bad_rows_are_refused_with_the_parameter_named():
    with pytest.raises(InvalidParameterError, match="'side' metadata of ledger row 'x'"):
        ledger_comparisons([{"name": "x", "compare": "c", "side": "middle"}])
    with pytest.raises(InvalidParameterError, match="'compare' metadata of ledger row 'x'"):
        ledger_comparisons([{"name": "x", "compare": 3, "side": "baseline"}])
    with pytest.raises(InvalidParameterError, match="'rows' parameter of ledger_comparisons"):
        ledger_comparisons("ledger.json")
    with pytest.raises(InvalidParameterError, match="'rows' parameter of ledger_comparisons must hold dicts"):
        ledger_comparisons([3])
    with pytest.raises(InvalidParameterError, match="'rows' parameter of ledger_figure must hold at least one"):
        ledger_figure([{"name": "sweep", "flops": 1.0}])
