"""The ``leanscale`` command line: a thin layer over the public API (torchtune's ``tune`` style).

Each subcommand is one module ``leanscale.cli.<name>``, listed in
:data:`leanscale.cli.main.SUBCOMMANDS`, that exposes::

    def add_parser(subparsers) -> argparse.ArgumentParser:
        parser = add_command(
            subparsers, "plan", help="one line for `leanscale --help`",
            description="what it does and which paper it follows",
            epilog="examples:\\n  leanscale plan --flops 1e21\\n  leanscale plan --flops 1e21 --json",
        )
        parser.add_argument(...)
        parser.set_defaults(func=run)
        return parser

    def run(args) -> int:       # exit status; calls the public API, holds no logic of its own
        ...

A :class:`~leanscale.core.errors.LeanscaleError` raised inside ``run`` becomes
``leanscale <cmd>: error: <message>`` on stderr and exit status 2, without a traceback
(set ``LEANSCALE_DEBUG=1`` to see it). Results print as a table and, with ``--json``, as JSON.

A command with actions (``leanscale batch plan|noise|train``) makes its action parsers with
:func:`add_actions` and gives each ``set_defaults(action_func=...)``: :func:`run_action`
dispatches, and the command alone is a usage error (its help on stderr, exit status 2) for every
such command. :func:`print_json` prints a ``--json`` result; :func:`torchrun_rank` runs a body in
the process group that ``torchrun`` asks for.
"""

import argparse
import contextlib
import json
import sys
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["add_actions", "add_command", "print_json", "run_action", "torchrun_rank"]


def add_command(subparsers, name: str, *, help: str, description: str, epilog: str) -> argparse.ArgumentParser:
    """The parser of ``leanscale <name>``, its ``epilog`` (examples) printed as written."""
    return subparsers.add_parser(name, help=help, description=description, epilog=epilog,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)


def add_actions(parser: argparse.ArgumentParser):
    """The sub-parsers of a command with actions; the command alone runs :func:`run_action`."""
    parser.set_defaults(func=run_action, print_help=parser.print_help)
    return parser.add_subparsers(dest="action", title="actions", metavar="<action>")


def run_action(args) -> int:
    """Run the action a command's sub-parser chose; without one, print the help to stderr and
    return 2 (a usage error, as argparse does for a missing argument)."""
    action = getattr(args, "action_func", None)
    if action is None:
        args.print_help(file=sys.stderr)
        return 2
    return action(args)


def print_json(blob: Any, warnings: Iterable[str] = ()) -> int:
    """``blob`` as indented JSON on stdout (through :func:`~leanscale.core.io.to_jsonable`), then
    each warning as ``WARNING: ...`` on stderr, so the JSON stays parseable; returns 0."""
    from leanscale.core.io import to_jsonable

    json.dump(to_jsonable(blob), sys.stdout, indent=2)
    print()
    sys.stdout.flush()
    for warning in warnings:
        print(f"WARNING: {warning}", file=sys.stderr)
    return 0


@contextlib.contextmanager
def torchrun_rank() -> Iterator[int]:
    """Run the body in the process group ``torchrun`` asks for (``WORLD_SIZE`` > 1, gloo) and tear
    it down after, also on error; yields this process's rank (0 without ``torchrun``), read while
    the group is up: only rank 0 should report."""
    from leanscale.core.distributed import init_from_env, rank_and_world, shutdown

    started = init_from_env()
    try:
        yield rank_and_world()[0]
    finally:
        if started:
            shutdown()
