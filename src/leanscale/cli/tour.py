"""``leanscale tour``: run every technique's chapter and write one self-contained HTML report."""

from __future__ import annotations

import argparse

from leanscale.cli import add_command

__all__ = ["add_parser", "run"]

EPILOG = """\
examples:
  leanscale tour                         the full tour -> tour-report/index.html, summary.json
  leanscale tour --quick                 the short version (a few minutes on a laptop)
  leanscale tour --only scaling --quick  one chapter
  leanscale tour --out /tmp/tour --seed 1

exit status: 0 every chapter ran, 1 a chapter failed (the others still ran; see the report),
2 bad arguments.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = add_command(
        subparsers, "tour",
        help="run every technique on built-in data and write an HTML report",
        description="Run the tour chapter of every available technique, in registry order, on "
        "built-in data. Each chapter puts our measured numbers next to the paper's. The report is "
        "one self-contained HTML file with a JSON summary beside it.",
        epilog=EPILOG,
    )
    parser.add_argument("--quick", action="store_true", help="run the short version of each chapter")
    parser.add_argument("--out", default="tour-report", metavar="DIR",
                        help="output folder (default: tour-report)")
    parser.add_argument("--only", nargs="+", action="extend", metavar="NAME", default=None,
                        help="run only these techniques (see `leanscale ls`)")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="random seed (default: 0)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    # the tour imports more than `leanscale --help` needs
    from leanscale.tour import run_tour

    result = run_tour(out_dir=args.out, quick=args.quick, chapters=args.only, seed=args.seed)
    return 1 if result.failed else 0
