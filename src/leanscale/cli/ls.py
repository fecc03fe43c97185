"""``leanscale ls``: the registry of techniques as a table, JSON or the README's Markdown table."""

from __future__ import annotations

import argparse
import dataclasses
import json

from leanscale.cli import add_command
from leanscale.core import registry
from leanscale.core.errors import InvalidParameterError
from leanscale.core.io import to_jsonable
from leanscale.core.registry import status_label
from leanscale.report.table import format_table

__all__ = ["add_parser", "run", "technique_rows"]

EPILOG = """\
examples:
  leanscale ls                        every technique: status, commands, papers
  leanscale ls --status available     only what can be used now
  leanscale ls --json                 the full registry as JSON (for scripts), with where each
                                      technique's benchmark results are read from
  leanscale ls --markdown             the README's technique table, with measured headlines
                                      (from the results shipped with the package, or the checkout's
                                      benchmarks/results/)
"""


def technique_rows(status: str | None = None) -> list[dict[str, str]]:
    """One row per technique for the terminal table: name, status, title, cli, papers."""
    return [
        {
            "name": t.name,
            "status": status_label(t),
            "title": t.title,
            "cli": ", ".join(t.cli) if t.cli else "-",
            # "Hoffmann et al. 2022, arXiv 2203.15556" -> "Hoffmann et al. 2022"; --json has it all.
            "papers": "; ".join(p.split(",")[0] for p in t.papers),
        }
        for t in registry.list_techniques(status)
    ]


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = add_command(
        subparsers, "ls",
        help="list the techniques, their status, commands and papers",
        description="List every technique of leanscale: whether it is available or planned, its "
        "subcommands and the papers it follows.",
        epilog=EPILOG,
    )
    fmt = parser.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print the registry as JSON")
    fmt.add_argument("--markdown", action="store_true", help="print the README's Markdown table")
    parser.add_argument("--status", choices=("available", "planned"), default=None,
                        help="only techniques with this status")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.markdown:
        if args.status is not None:
            raise InvalidParameterError(
                "--markdown shows every technique (the README's table); drop --status or use --json"
            )
        print(registry.markdown_table())
        return 0
    if args.json:
        blob = [
            {**dataclasses.asdict(t), "folder": str(t.folder),
             "results": str(t.results) if t.results is not None else None}
            for t in registry.list_techniques(args.status)
        ]
        print(json.dumps(to_jsonable(blob), indent=2))
        return 0
    print(format_table(technique_rows(args.status), columns=["name", "status", "title", "cli", "papers"]))
    return 0
