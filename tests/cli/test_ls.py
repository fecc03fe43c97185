"""`leanscale ls` (leanscale.cli.ls)."""

import json
from pathlib import Path

import pytest

from leanscale.cli.main import main
from leanscale.core import registry

ROOT = Path(__file__).resolve().parents[2]


def test_json_parses_and_matches_the_registry(capsys):
    assert main(["ls", "--json"]) == 0
    blob = json.loads(capsys.readouterr().out)
    assert [t["name"] for t in blob] == [t.name for t in registry.list_techniques()]
    first = blob[0]
    assert {"name", "title", "status", "papers", "cli", "issues", "tour_chapter"} <= set(first)
    assert isinstance(first["papers"], list)


@pytest.mark.parametrize("status", ["available", "planned"])
def test_json_filtered_by_status(capsys, status):
    assert main(["ls", "--json", "--status", status]) == 0
    blob = json.loads(capsys.readouterr().out)
    assert [t["name"] for t in blob] == [t.name for t in registry.list_techniques(status=status)]
    assert all(t["status"] == status for t in blob)


def test_table_lists_every_technique(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header == ["name", "status", "title", "cli", "papers"]
    for t in registry.list_techniques():
        assert t.name in out
        if t.status == "planned" and t.issues:
            assert f"planned (issue #{t.issues[0]}" in out


def test_table_status_filter(capsys):
    assert main(["ls", "--status", "available"]) == 0
    out = capsys.readouterr().out
    for t in registry.list_techniques():
        assert (t.name in out) == (t.status == "available")


def test_markdown_prints_the_registry_table(monkeypatch, capsys):
    monkeypatch.setattr(registry, "markdown_table", lambda results_root=None: "| technique |\n|---|")
    assert main(["ls", "--markdown"]) == 0
    assert capsys.readouterr().out == "| technique |\n|---|\n"


def test_markdown_with_status_is_an_error(capsys):
    assert main(["ls", "--markdown", "--status", "planned"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("leanscale ls: error: --markdown") and "Traceback" not in err


def test_json_and_markdown_are_exclusive(capsys):
    assert main(["ls", "--json", "--markdown"]) == 2
    assert "not allowed with" in capsys.readouterr().err


def test_bad_status_choice(capsys):
    assert main(["ls", "--status", "done"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_json_says_where_each_technique_reads_its_results(capsys):
    assert main(["ls", "--json"]) == 0
    blob = json.loads(capsys.readouterr().out)
    for t, row in zip(registry.list_techniques(), blob, strict=True):
        expected = registry.results_dir(t.benchmarks) if t.benchmarks else None
        assert row["results"] == (str(expected) if expected is not None else None)
        if t.status == "available":  # a checkout (editable install) reads benchmarks/results/<name>
            assert row["results"] == str(ROOT / "benchmarks" / "results" / t.benchmarks)
            assert list(Path(row["results"]).glob("*.json")), f"no results for {t.name}"
