"""The tour's chapter types live in leanscale.report.chapter; technique tours import them from there,
never the tour runner (leanscale.tour), so nothing imports back into the module that loads them."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import leanscale.report as report_pkg
import leanscale.tour as tour_mod
from leanscale.core.registry import TechniqueInfo, list_techniques, status_label
from leanscale.report import chapter
from leanscale.report.html import HTMLReport

SRC = Path(__file__).resolve().parents[2] / "src" / "leanscale"
TYPES = ("TourContext", "ChapterResult", "ChapterOutcome", "TourResult")
TOURS = sorted(p for p in SRC.glob("*/tour.py") if p.parent.name != "cli")  # cli/tour.py is the command


def _imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            if node.module == "leanscale":
                found |= {f"leanscale.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


@pytest.mark.parametrize("name", TYPES)
def test_types_are_one_class_importable_from_report_and_the_tour(name):
    cls = getattr(chapter, name)
    assert cls.__module__ == "leanscale.report.chapter"
    assert getattr(report_pkg, name) is cls  # the public home
    assert getattr(tour_mod, name) is cls  # `from leanscale.tour import ChapterResult` keeps working
    assert name in report_pkg.__all__


def test_status_label_moved_to_the_registry_and_still_importable_from_the_tour():
    assert tour_mod.status_label is status_label
    planned = TechniqueInfo(name="x", title="X", module="leanscale.x", papers=(), status="planned", issues=(5, 6))
    assert status_label(planned) == "planned (issue #5, #6)"
    assert status_label(TechniqueInfo(name="y", title="Y", module="leanscale.y", papers=(), status="available",
                                      issues=(3,))) == "available"


@pytest.mark.parametrize("path", TOURS, ids=lambda p: p.parent.name)
def test_technique_tours_import_report_not_the_tour_runner(path):
    modules = _imported_modules(path)
    assert "leanscale.tour" not in modules, f"{path.parent.name}/tour.py imports the tour runner"
    assert "leanscale.report.chapter" in modules


def test_every_registered_chapter_is_a_technique_tour_module():
    chapters = {t.tour_chapter.partition(":")[0] for t in list_techniques() if t.tour_chapter}
    assert chapters == {f"leanscale.{p.parent.name}.tour" for p in TOURS}


def test_loading_a_technique_tour_does_not_load_the_tour_runner():
    code = ("import sys, leanscale.large_batch.tour, leanscale.scaling.tour, leanscale.pruning.tour; "
            "print('leanscale.tour' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_chapter_built_from_report_types_runs_in_the_tour(tmp_path):
    seen = {}

    def fake_chapter(ctx: chapter.TourContext) -> chapter.ChapterResult:
        seen["ctx"] = ctx
        ctx.report.add_paragraph("hello")
        return chapter.ChapterResult(title="Fake", summary_rows=[{"metric": "m", "value": 1, "paper": 2}])

    mod = type(sys)("fake_report_chapter")
    mod.chapter = fake_chapter
    sys.modules[mod.__name__] = mod
    try:
        t = TechniqueInfo(name="fake", title="Fake", module="x", papers=(), status="available",
                          tour_chapter="fake_report_chapter:chapter")
        result = tour_mod.run_tour(tmp_path / "out", techniques=[t], echo=False)
    finally:
        del sys.modules[mod.__name__]
    assert isinstance(result, chapter.TourResult) and result.ok
    assert isinstance(seen["ctx"], chapter.TourContext) and isinstance(seen["ctx"].report, HTMLReport)
    [outcome] = result.chapters
    assert isinstance(outcome, chapter.ChapterOutcome)
    assert outcome.summary_rows == [{"metric": "m", "value": 1, "paper": 2}]
    assert seen["ctx"].chapter_dir == tmp_path / "out" / "fake"
