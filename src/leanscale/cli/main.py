"""``leanscale``: the entry point. Subcommands are the modules listed in :data:`SUBCOMMANDS`.

Exit status: 0 success, 1 the command ran but something failed (a tour chapter, a check; or
the disk is full / read-only), 2 bad usage, a :class:`~leanscale.core.errors.LeanscaleError` or a
path that cannot be used (missing file, a folder where a file is expected, no permission: message,
no traceback), 130 interrupted (Ctrl-C).

Only those errors are turned into messages: any other exception is a bug and keeps its traceback.
``LEANSCALE_DEBUG=1`` shows the traceback of every error.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from leanscale import __version__
from leanscale.core.errors import LeanscaleError

__all__ = ["SUBCOMMANDS", "build_parser", "main"]

# The explicit list of subcommands, in the order `leanscale --help` shows them. Each is a module
# leanscale.cli.<name> with add_parser(subparsers) and a parser default func=run(args) -> int.
SUBCOMMANDS: tuple[str, ...] = ("ls", "tour", "plan", "fit", "sweep", "batch", "prune", "active", "sparse", "cascade", "serve",
                                 "gateway")

DEBUG_ENV = "LEANSCALE_DEBUG"

_EPILOG = """\
examples:
  leanscale ls                       what is available, with papers
  leanscale tour --quick             a short tour of every technique -> tour-report/index.html
  leanscale <command> --help         options of one command

environment:
  LEANSCALE_NO_PROGRESS=1            no progress bars
  LEANSCALE_DEBUG=1                  show tracebacks of errors
"""


def _load_subcommand(name: str) -> ModuleType | None:
    """Import ``leanscale.cli.<name>``; None only when that very module does not exist yet."""
    module_name = f"{__package__ or 'leanscale.cli'}.{name}"
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None
        raise  # a missing dependency *inside* the module is a real error


def build_parser(subcommands: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser with every subcommand module that exists (default: SUBCOMMANDS)."""
    parser = argparse.ArgumentParser(
        prog="leanscale",
        description="leanscale: grow models without growing the bill. Large batches, data pruning, "
        "compute-optimal scaling, sparse activation and cascades, measured on one cost ledger.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"leanscale {__version__}")
    subparsers = parser.add_subparsers(dest="command", title="commands", metavar="<command>")
    for name in SUBCOMMANDS if subcommands is None else subcommands:
        module = _load_subcommand(name)
        if module is not None:
            module.add_parser(subparsers)
    return parser


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


# OS errors that mean "this path cannot be used as given" (exit 2) or "the machine cannot store
# the result" (exit 1). Anything else (a TypeError, a KeyError, ...) is a bug and is not caught.
_PATH_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError)
_STORAGE_ERRNOS = {errno.ENOSPC: 1, errno.EROFS: 1, errno.EDQUOT: 1, errno.ENAMETOOLONG: 2, errno.ELOOP: 2}


def os_error_message(exc: OSError) -> str:
    """A one-line description of an OS error that names the path, e.g.
    ``cannot use '/data/x.npz': No such file or directory``."""
    reason = exc.strerror or type(exc).__name__
    # for a two-path error (a rename of a temporary file onto the output) the second path is the
    # one the user named
    path = exc.filename2 if exc.filename2 is not None else exc.filename
    if path is None:
        return f"{reason} ({type(exc).__name__})"
    shown = repr(os.fsdecode(path)) if isinstance(path, (str, bytes, os.PathLike)) else repr(path)
    hint = {
        FileNotFoundError: "check the path (or create its parent folder)",
        IsADirectoryError: "a file was expected, not a folder",
        NotADirectoryError: "a part of the path is a file, not a folder",
        PermissionError: "no permission: choose a path you can read/write",
        FileExistsError: "something is already there: a file where a folder is needed?",
    }.get(type(exc))
    return f"cannot use {shown}: {reason}" + (f" ({hint})" if hint else "")


def _os_error_status(exc: OSError) -> int | None:
    """Exit status for an OS error the CLI reports as a message, or None for one it does not."""
    if isinstance(exc, _PATH_ERRORS):
        return 2
    return _STORAGE_ERRNOS.get(exc.errno)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``leanscale`` with ``argv`` (default: ``sys.argv[1:]``) and return the exit status.

    With no command it prints the help and returns 0.
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors (status 2)
        return _exit_code(exc.code)

    func = getattr(args, "func", None)
    if args.command is None or func is None:
        parser.print_help()
        return 0

    prog = f"leanscale {args.command}"
    try:
        return _exit_code(func(args))
    except LeanscaleError as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"\n{prog}: interrupted. Finished work is saved; run the same command again and long "
            f"jobs resume where they stopped.",
            file=sys.stderr,
        )
        return 130
    except BrokenPipeError:
        # `leanscale ls | head`: the reader left. Point stdout at devnull so the interpreter's
        # final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        finally:
            os.close(devnull)
        return 141
    except OSError as exc:
        status = _os_error_status(exc)
        if status is None or os.environ.get(DEBUG_ENV):
            raise
        print(f"{prog}: error: {os_error_message(exc)}", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
