"""The tour frame (leanscale.tour, `leanscale tour`) with fake chapters, and the progress bars
its chapters get as ``ctx.progress`` (leanscale.core.progress)."""

import base64
import importlib.util
import json
import re
import sys
import types

import pytest

import leanscale.tour as tour_mod
from leanscale.cli.main import main
from leanscale.core.errors import InvalidParameterError
from leanscale.core.progress import LineProgress, progress
from leanscale.core.registry import TechniqueInfo
from leanscale.tour import ChapterResult, TourContext, run_tour

TINY_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)
MODULE = "fake_tour_chapters"


@pytest.fixture
def chapters(monkeypatch):
    """A module of fake chapters in sys.modules; ``calls`` records each chapter's context."""
    mod = types.ModuleType(MODULE)
    mod.calls = []

    def good(ctx: TourContext) -> ChapterResult:
        mod.calls.append(ctx)
        ctx.report.add_paragraph("Alpha chapter text <with markup>.")
        pytest.importorskip("matplotlib")
        from leanscale.report.figures import new_figure

        fig, ax = new_figure()
        ax.plot([1, 2, 3], [3, 2, 1])
        ctx.report.add_figure(fig, caption="alpha figure")
        (ctx.chapter_dir / "data.txt").write_text("x")
        assert sum(1 for _ in ctx.progress(range(3), desc="alpha")) == 3
        return ChapterResult(
            title="Alpha chapter",
            summary_rows=[{"metric": "tokens per parameter", "value": 19.6, "paper": 20.0}],
        )

    def png(ctx):
        mod.calls.append(ctx)
        ctx.report.add_figure(TINY_PNG, caption="pixel")
        return ChapterResult(title="Delta", summary_rows=[{"metric": "m", "value": 1, "paper": None}])

    def broken(ctx):
        mod.calls.append(ctx)
        raise ValueError("the fit diverged")

    def wrong_return(ctx):
        return {"title": "not a ChapterResult"}

    def interrupted(ctx):
        raise KeyboardInterrupt

    for f in (good, png, broken, wrong_return, interrupted):
        setattr(mod, f.__name__, f)
    monkeypatch.setitem(sys.modules, MODULE, mod)
    return mod


def technique(name, chapter=None, status="available", issues=()):
    return TechniqueInfo(
        name=name, title=f"{name.title()} technique", module=f"x.{name}",
        papers=(f"{name.title()} et al. 2020, arXiv 2001.00001",), status=status,
        tour_chapter=f"{MODULE}:{chapter}" if chapter else None, issues=issues,
    )


def test_tour_writes_report_and_summary(tmp_path, chapters):
    pytest.importorskip("matplotlib")
    techniques = [technique("alpha", "good"), technique("beta", status="planned", issues=(9,))]
    result = run_tour(tmp_path / "out", quick=True, seed=3, techniques=techniques, echo=False)

    assert result.ok and result.failed == []
    page = (tmp_path / "out" / "index.html").read_text(encoding="utf-8")
    srcs = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(srcs) == 1 and base64.b64decode(srcs[0]).startswith(b"\x89PNG")
    assert "http://" not in page and "https://" not in page
    assert "Alpha chapter text &lt;with markup&gt;." in page
    assert "planned (issue #9)" in page
    assert "tokens per parameter" in page

    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["quick"] is True and summary["seed"] == 3 and summary["failed"] == []
    alpha, beta = summary["chapters"]
    assert alpha["name"] == "alpha" and alpha["status"] == "ok" and alpha["title"] == "Alpha chapter"
    assert alpha["summary_rows"] == [{"metric": "tokens per parameter", "value": 19.6, "paper": 20.0}]
    assert alpha["seconds"] >= 0
    assert beta["status"] == "planned" and beta["label"] == "planned (issue #9)" and beta["issues"] == [9]
    assert (tmp_path / "out" / "alpha" / "data.txt").exists()

    (ctx,) = chapters.calls
    assert ctx.quick is True and ctx.seed == 3 and ctx.out_dir == tmp_path / "out"
    assert ctx.technique.name == "alpha"


def test_failed_chapter_is_reported_and_the_tour_goes_on(tmp_path, chapters):
    techniques = [technique("gamma", "broken"), technique("delta", "png"),
                  technique("eps", "wrong_return")]
    result = run_tour(tmp_path, techniques=techniques, echo=False)
    assert [c.name for c in result.failed] == ["gamma", "eps"]
    assert [c.status for c in result.chapters] == ["failed", "ok", "failed"]
    assert result.chapters[0].error == "ValueError: the fit diverged"
    assert "must return a ChapterResult" in result.chapters[2].error
    summary = json.loads(result.summary_json.read_text())
    assert summary["failed"] == ["gamma", "eps"]
    assert "Traceback" in summary["chapters"][0]["traceback"]
    page = result.index_html.read_text()
    assert "This chapter failed: ValueError: the fit diverged" in page
    assert "data:image/png;base64," in page  # delta still ran


def test_terminal_summary(tmp_path, chapters, capsys):
    techniques = [technique("gamma", "broken"), technique("delta", "png"),
                  technique("beta", status="planned", issues=(5, 6)), technique("zeta")]
    run_tour(tmp_path, techniques=techniques, echo=True)
    captured = capsys.readouterr()
    assert "planned (issue #5, #6)" in captured.out
    assert "ValueError: the fit diverged" in captured.out
    assert "no tour chapter" in captured.out
    assert "FAILED: gamma" in captured.out
    assert "index.html" in captured.out
    assert "[tour 1/4] gamma: running" in captured.err


@pytest.mark.parametrize("load,busy", [(0.2, False), (8.0, True)])
def test_load_average_is_recorded_and_a_busy_machine_named(tmp_path, chapters, capsys, monkeypatch, load, busy):
    """Timings from a shared machine are not the tour's own: summary.json keeps the load average at
    the start and the end, and a busy start is said on the terminal."""
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, 0.0, 0.0))
    result = run_tour(tmp_path, techniques=[technique("delta", "png")], echo=True)
    assert json.loads(result.summary_json.read_text())["load_average"] == {"start": load, "end": load}
    assert ("the machine is busy (load average 8.0 on 2 cores)" in capsys.readouterr().err) is busy


def test_chapters_select_a_subset_in_registry_order(tmp_path, chapters):
    techniques = [technique("gamma", "broken"), technique("delta", "png"), technique("alpha", "png")]
    result = run_tour(tmp_path, chapters=["alpha", "delta"], techniques=techniques, echo=False)
    assert [c.name for c in result.chapters] == ["delta", "alpha"]
    assert result.ok
    assert [c.name for c in run_tour(tmp_path, chapters="delta", techniques=techniques,
                                     echo=False).chapters] == ["delta"]


def test_unknown_chapter_lists_valid_names(tmp_path, chapters):
    techniques = [technique("gamma", "broken"), technique("delta", "png")]
    with pytest.raises(InvalidParameterError, match=r"'delta', 'gamma'. Got 'delt' instead. Did you mean 'delta'"):
        run_tour(tmp_path, chapters=["delt"], techniques=techniques, echo=False)
    assert not (tmp_path / "index.html").exists()


@pytest.mark.parametrize(("kwargs", "match"), [({"seed": -1}, "'seed'"), ({"seed": 1.5}, "'seed'"),
                                               ({"quick": "yes"}, "'quick'")])
def test_bad_parameters(tmp_path, kwargs, match):
    with pytest.raises(InvalidParameterError, match=match):
        run_tour(tmp_path, techniques=[], echo=False, **kwargs)


def test_out_dir_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(InvalidParameterError, match="'out_dir'"):
        run_tour(tmp_path / "f", techniques=[], echo=False)


def test_interrupt_writes_the_report_then_stops(tmp_path, chapters):
    techniques = [technique("delta", "png"), technique("stop", "interrupted"), technique("alpha", "png")]
    with pytest.raises(KeyboardInterrupt):
        run_tour(tmp_path, techniques=techniques, echo=False)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [c["status"] for c in summary["chapters"]] == ["ok", "interrupted", "interrupted"]


def test_ledger_is_shared_when_the_module_exists(tmp_path, chapters):
    run_tour(tmp_path, techniques=[technique("delta", "png"), technique("d2", "png")], echo=False)
    first, second = chapters.calls
    if importlib.util.find_spec("leanscale.core.ledger") is None:
        assert first.ledger is None
    else:
        from leanscale.core.ledger import CostLedger

        assert isinstance(first.ledger, CostLedger)
    assert first.ledger is second.ledger


class FakeLedger:
    def __init__(self):
        self.entries = []

    def __len__(self):
        return len(self.entries)

    def record(self, name, **kwargs):
        self.entries.append((name, kwargs))

    def summary_table(self):
        return "name  seconds\n" + "\n".join(f"{n}  {k['seconds']}" for n, k in self.entries)

    def save(self, path):
        path.write_text(json.dumps(self.entries))
        return path


def test_recorded_costs_are_saved_and_shown(tmp_path, chapters, monkeypatch, capsys):
    def spends(ctx):
        ctx.ledger.record(f"{ctx.technique.name} train", seconds=1.5)
        return ChapterResult(title="spends")

    monkeypatch.setattr(chapters, "spends", spends, raising=False)
    result = run_tour(tmp_path, techniques=[technique("omega", "spends")], ledger=FakeLedger(), echo=True)
    assert result.ledger_json == tmp_path / "ledger.json"
    assert json.loads(result.ledger_json.read_text()) == [["omega train", {"seconds": 1.5}]]
    assert json.loads(result.summary_json.read_text())["ledger"] == "ledger.json"
    page = result.index_html.read_text()
    assert "Cost ledger" in page and "omega train  1.5" in page
    assert "omega train  1.5" in capsys.readouterr().out


def test_the_ledger_figure_is_written_beside_the_ledger(tmp_path, chapters, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    from leanscale.core.ledger import CostLedger
    from leanscale.core.measure import measure

    def spends(ctx):
        with measure("cpu") as m:
            x = bytearray(b"\x01") * (20 * 2**20)  # 20 MiB, written
        del x
        ctx.ledger.record("base", flops=4e9, seconds=2.0, peak_memory_bytes=m.peak_memory_bytes,
                          compare="omega vs base", side="baseline")
        ctx.ledger.record("omega", flops=1e9, seconds=1.0, peak_memory_bytes=m.peak_memory_bytes // 2,
                          compare="omega vs base", side="technique")
        ctx.ledger.record("alone", seconds=1.0, peak_memory_bytes=0)
        return ChapterResult(title="spends")

    monkeypatch.setattr(chapters, "spends", spends, raising=False)
    result = run_tour(tmp_path, techniques=[technique("omega", "spends")], ledger=CostLedger(), echo=True)
    assert result.ledger_png == tmp_path / "ledger.png"
    assert result.ledger_png.read_bytes()[:4] == b"\x89PNG"
    summary = json.loads(result.summary_json.read_text())
    assert summary["ledger_figure"] == "ledger.png"
    assert summary["chapters"][0]["cpu_seconds"] >= 0
    rows = json.loads(result.ledger_json.read_text())["entries"]
    assert all(r["peak_memory_bytes"] is not None for r in rows)
    assert rows[0]["peak_memory_bytes"] >= 19 * 2**20
    page = result.index_html.read_text()
    assert "cost next to its baseline" in page and page.count("data:image/png;base64,") == 1
    assert "ledger.png" in capsys.readouterr().out


def test_a_malformed_comparison_leaves_a_note_not_a_failed_tour(tmp_path, chapters, monkeypatch):
    from leanscale.core.ledger import CostLedger

    def spends(ctx):
        ctx.ledger.record("odd", seconds=1.0, compare="c", side="middle")
        return ChapterResult(title="spends")

    monkeypatch.setattr(chapters, "spends", spends, raising=False)
    result = run_tour(tmp_path, techniques=[technique("omega", "spends")], ledger=CostLedger(), echo=False)
    assert result.ok and result.ledger_png is None and not (tmp_path / "ledger.png").exists()
    assert "&#x27;side&#x27; metadata of ledger row &#x27;odd&#x27;" in result.index_html.read_text()


def test_no_ledger_file_without_costs(tmp_path, chapters):
    result = run_tour(tmp_path, techniques=[technique("delta", "png")], ledger=FakeLedger(), echo=False)
    assert result.ledger_json is None and not (tmp_path / "ledger.json").exists()
    assert json.loads(result.summary_json.read_text())["ledger"] is None


def test_registry_techniques_are_toured_by_default(tmp_path, monkeypatch):
    planned = [technique("beta", status="planned", issues=(9,))]
    monkeypatch.setattr(tour_mod, "list_techniques", lambda status=None: planned)
    result = run_tour(tmp_path, echo=False)
    assert [c.label for c in result.chapters] == ["planned (issue #9)"]


# ----------------------------------------------------------------- `leanscale tour`

@pytest.fixture
def fake_registry(monkeypatch, chapters):
    techniques = [technique("delta", "png"), technique("gamma", "broken"),
                  technique("beta", status="planned", issues=(9,))]
    monkeypatch.setattr(tour_mod, "list_techniques", lambda status=None: techniques)
    monkeypatch.setenv("LEANSCALE_NO_PROGRESS", "1")


def test_cli_exit_1_when_a_chapter_fails(tmp_path, fake_registry, capsys):
    assert main(["tour", "--quick", "--out", str(tmp_path), "--seed", "7"]) == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["quick"] is True and summary["seed"] == 7 and summary["failed"] == ["gamma"]
    assert "Traceback" not in capsys.readouterr().err


def test_cli_exit_0_with_only(tmp_path, fake_registry):
    assert main(["tour", "--out", str(tmp_path), "--only", "delta", "beta"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [c["name"] for c in summary["chapters"]] == ["delta", "beta"]
    assert summary["quick"] is False


def test_cli_only_validation(tmp_path, fake_registry, capsys):
    assert main(["tour", "--out", str(tmp_path), "--only", "gama"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("leanscale tour: error:")
    assert "'beta', 'delta', 'gamma'" in err and "Did you mean 'gamma'?" in err
    assert "Traceback" not in err


# ----------------------------------------------------------------- ctx.progress

def test_progress_fallback_without_a_terminal(capsys, monkeypatch):
    monkeypatch.delenv("LEANSCALE_NO_PROGRESS", raising=False)
    bar = progress(range(5), desc="runs", interval=0.0)  # stderr is captured: not a TTY
    assert isinstance(bar, LineProgress)
    assert list(bar) == [0, 1, 2, 3, 4]
    err = capsys.readouterr().err
    assert "runs: 1/5 it (20%)" in err and "runs: 5/5 it (100%), done in" in err


def test_progress_fallback_is_quiet_for_short_loops(capsys, monkeypatch):
    monkeypatch.delenv("LEANSCALE_NO_PROGRESS", raising=False)
    assert sum(progress(range(3), desc="fast")) == 3
    assert capsys.readouterr().err == ""


def test_progress_manual_updates_and_context_manager(capsys, monkeypatch):
    monkeypatch.delenv("LEANSCALE_NO_PROGRESS", raising=False)
    with progress(total=4, desc="steps", unit="step", interval=0.0) as bar:
        bar.update(2)
        bar.set_postfix(loss=2.34567)
        bar.update(2)
    err = capsys.readouterr().err
    assert "steps: 2/4 step (50%)" in err and "loss=2.346" in err


@pytest.mark.parametrize("value", ["1", "true", "YES"])
def test_progress_disabled_by_env(capsys, monkeypatch, value):
    monkeypatch.setenv("LEANSCALE_NO_PROGRESS", value)
    bar = progress(range(3), desc="quiet", interval=0.0)
    assert list(bar) == [0, 1, 2]
    bar.write("hidden")
    assert capsys.readouterr().err == ""


def test_progress_without_tqdm_never_fails(capsys, monkeypatch):
    monkeypatch.delenv("LEANSCALE_NO_PROGRESS", raising=False)
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `from tqdm import tqdm` raises ImportError
    bar = progress(range(2), desc="x", disable=False, interval=0.0)
    assert isinstance(bar, LineProgress) and list(bar) == [0, 1]


def test_progress_forced_uses_tqdm_when_installed(monkeypatch):
    pytest.importorskip("tqdm")
    from tqdm import tqdm

    monkeypatch.delenv("LEANSCALE_NO_PROGRESS", raising=False)
    bar = progress(range(2), desc="x", disable=False)
    assert isinstance(bar, tqdm) and list(bar) == [0, 1]


def test_progress_on_a_terminal_uses_tqdm(monkeypatch):
    pytest.importorskip("tqdm")
    from tqdm import tqdm

    import leanscale.core.progress as progress_mod

    monkeypatch.delenv("LEANSCALE_NO_PROGRESS", raising=False)
    monkeypatch.setattr(progress_mod, "_stderr_is_tty", lambda: True)
    bar = progress(total=3, desc="tty")
    assert isinstance(bar, tqdm)
    bar.close()


def test_docstring_examples():
    import doctest

    import leanscale.core.progress as progress_mod

    assert doctest.testmod(progress_mod, raise_on_error=False).failed == 0
