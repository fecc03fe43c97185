"""Conformance: every registered technique keeps its promises (timm-style parametrized registry test)."""

import importlib
import re
from pathlib import Path

import pytest

from leanscale.cli.main import SUBCOMMANDS
from leanscale.core import registry
from leanscale.core.errors import DataFormatError, InvalidParameterError
from leanscale.core.registry import get_technique, list_techniques, load_object, markdown_table, read_result

ROOT = Path(__file__).resolve().parents[2]
CARD_SECTIONS = ("## How to use", "## Suggested settings", "## When it hurts", "## Cost", "## Benchmark")
AVAILABLE = [t.name for t in list_techniques("available")]


def test_registry_is_plain_unique_data():
    names = [t.name for t in list_techniques()]
    assert len(names) == len(set(names)) == 5
    assert {t.status for t in list_techniques()} <= {"available", "planned"}
    for t in list_techniques():
        assert t.folder == ROOT / "src" / "leanscale" / t.name
        assert t.module == f"leanscale.{t.name}"


@pytest.mark.parametrize("name", AVAILABLE)
def test_available_technique_is_complete(name):
    t = get_technique(name)
    importlib.import_module(t.module)
    card = (t.folder / "README.md").read_text(encoding="utf-8")
    for section in CARD_SECTIONS:
        assert section in card, f"method card of {name} lacks {section!r}"
    assert callable(load_object(t.tour_chapter))
    assert isinstance(load_object(t.headline)(None), str)
    assert t.cli and set(t.cli) <= set(SUBCOMMANDS)
    for sub in t.cli:
        importlib.import_module(f"leanscale.cli.{sub}")
    results = ROOT / "benchmarks" / "results" / t.benchmarks
    jsons = list(results.glob("*.json"))
    assert jsons, f"no committed benchmark results for {name} in {results}"
    for j in jsons:
        assert '"machine"' in j.read_text(encoding="utf-8"), f"{j} does not describe its machine"


def test_registry_rows_follow_the_layout():
    # every available technique: package, tour chapter, headline and results folder named after it
    for t in list_techniques("available"):
        assert (t.tour_chapter, t.headline) == (f"leanscale.{t.name}.tour:chapter", f"leanscale.{t.name}.tour:headline")
        assert t.benchmarks == t.name and t.cli and t.papers and t.issues


def test_read_result(tmp_path, monkeypatch):
    (tmp_path / "pruning").mkdir()
    (tmp_path / "pruning" / "a.json").write_text('{"x": 1}')
    (tmp_path / "pruning" / "bad.json").write_text('{"x": ')
    assert read_result("pruning", "a.json", tmp_path) == {"x": 1}  # a results root of one's own
    assert read_result("pruning", "missing.json", tmp_path) is None  # not written: None, not an error
    with pytest.raises(DataFormatError):
        read_result("pruning", "bad.json", tmp_path)  # written but damaged: an error
    monkeypatch.setattr(registry, "results_root", lambda: tmp_path)  # the default: results_dir(folder)
    assert read_result("pruning", "a.json") == {"x": 1}
    with pytest.raises(InvalidParameterError, match="one folder name"):
        read_result("../pruning", "a.json", tmp_path)


def test_unknown_technique_lists_the_valid_ones():
    with pytest.raises(InvalidParameterError, match="Did you mean 'scaling'"):
        get_technique("scalling")


def test_readme_table_is_current():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- techniques:start -->\n(.*?)\n<!-- techniques:end -->", readme, re.S)
    assert block, "README.md lacks the techniques table markers"
    assert block.group(1).strip() == markdown_table().strip(), "run `make readme` to refresh the table"


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), re.S)


@pytest.mark.parametrize(
    "path", [ROOT / "README.md", *sorted((ROOT / "src" / "leanscale").glob("*/README.md"))],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_readme_examples_run(path, capsys):
    blocks = _python_blocks(path)
    for code in blocks:
        exec(compile(code, str(path), "exec"), {"__name__": "__readme__"})
