"""The ``leanscale`` command line: a thin layer over the public API (torchtune's ``tune`` style).

Each subcommand is one module ``leanscale.cli.<name>``, listed in
:data:`leanscale.cli.main.SUBCOMMANDS`, that exposes::

    def add_parser(subparsers) -> argparse.ArgumentParser:
        parser = subparsers.add_parser(
            "plan", help="one line for `leanscale --help`",
            description="what it does and which paper it follows",
            epilog="examples:\\n  leanscale plan --flops 1e21\\n  leanscale plan --flops 1e21 --json",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        parser.add_argument(...)
        parser.set_defaults(func=run)
        return parser

    def run(args) -> int:       # exit status; calls the public API, holds no logic of its own
        ...

A :class:`~leanscale.core.errors.LeanscaleError` raised inside ``run`` becomes
``leanscale <cmd>: error: <message>`` on stderr and exit status 2, without a traceback
(set ``LEANSCALE_DEBUG=1`` to see it). Results print as a table and, with ``--json``, as JSON.

A command with actions (``leanscale batch plan|noise|train``) gives each action parser
``set_defaults(action_func=...)`` and its own parser ``set_defaults(func=run_action,
print_help=parser.print_help)``: :func:`run_action` dispatches, and the command alone is a usage
error (its help on stderr, exit status 2) for every such command.
"""

import sys


def run_action(args) -> int:
    """Run the action a command's sub-parser chose; without one, print the help to stderr and
    return 2 (a usage error, as argparse does for a missing argument)."""
    action = getattr(args, "action_func", None)
    if action is None:
        args.print_help(file=sys.stderr)
        return 2
    return action(args)
