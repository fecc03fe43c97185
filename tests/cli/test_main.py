"""The `leanscale` entry point: subcommand discovery, errors, exit codes (leanscale.cli.main)."""

import argparse
import importlib
import sys
import textwrap

import pytest

import leanscale
import leanscale.cli
from leanscale.cli import main as cli_main
from leanscale.cli.main import SUBCOMMANDS, main

FAKE_COMMANDS = '''
import argparse

from leanscale.core.errors import InvalidParameterError


def add_parser(subparsers):
    parser = subparsers.add_parser("{name}", description="a test command", epilog="leanscale {name}")
    parser.add_argument("--what", default="leanscale")
    parser.set_defaults(func=run)
    return parser


def run(args):
    if args.what == "leanscale":
        raise InvalidParameterError("The 'what' parameter must be good. Got 'leanscale' instead.")
    if args.what == "interrupt":
        raise KeyboardInterrupt
    if args.what == "bug":
        raise RuntimeError("a real bug")
    if args.what == "none":
        return None
    return 0
'''


@pytest.fixture
def extra_commands(tmp_path, monkeypatch):
    """Put modules leanscale.cli.<name> from tmp_path on the package path; list them in SUBCOMMANDS."""

    def install(**sources):
        for name, source in sources.items():
            (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        monkeypatch.setattr(leanscale.cli, "__path__", [*leanscale.cli.__path__, str(tmp_path)])
        monkeypatch.setattr(cli_main, "SUBCOMMANDS", (*SUBCOMMANDS, *sources))
        importlib.invalidate_caches()

    yield install
    for name in list(sys.modules):
        if name.startswith("leanscale.cli.") and name.rsplit(".", 1)[1] in {
            p.stem for p in tmp_path.glob("*.py")
        }:
            del sys.modules[name]


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"leanscale {leanscale.__version__}"


def test_no_command_prints_help_and_returns_0(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: leanscale")
    assert "ls" in out and "tour" in out


def test_unknown_command_is_a_usage_error(capsys):
    assert main(["nonsense"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_leanscale_error_gives_exit_2_and_no_traceback(extra_commands, capsys):
    extra_commands(boom=FAKE_COMMANDS.format(name="boom"))
    assert main(["boom"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == (
        "leanscale boom: error: The 'what' parameter must be good. Got 'leanscale' instead."
    )
    assert "Traceback" not in captured.err + captured.out


def test_leanscale_error_traceback_with_debug_env(extra_commands, monkeypatch):
    extra_commands(boom=FAKE_COMMANDS.format(name="boom"))
    monkeypatch.setenv("LEANSCALE_DEBUG", "1")
    with pytest.raises(leanscale.core.errors.InvalidParameterError):
        main(["boom"])


def test_other_exceptions_are_not_hidden(extra_commands):
    extra_commands(boom=FAKE_COMMANDS.format(name="boom"))
    with pytest.raises(RuntimeError, match="a real bug"):
        main(["boom", "--what", "bug"])


def test_keyboard_interrupt_exits_130_and_says_jobs_resume(extra_commands, capsys):
    extra_commands(boom=FAKE_COMMANDS.format(name="boom"))
    assert main(["boom", "--what", "interrupt"]) == 130
    err = capsys.readouterr().err
    assert "leanscale boom: interrupted" in err and "resume" in err
    assert "Traceback" not in err


def test_run_returning_none_is_success(extra_commands):
    extra_commands(boom=FAKE_COMMANDS.format(name="boom"))
    assert main(["boom", "--what", "none"]) == 0
    assert main(["boom", "--what", "ok"]) == 0


def test_missing_subcommand_module_is_skipped(monkeypatch, capsys):
    monkeypatch.setattr(cli_main, "SUBCOMMANDS", (*SUBCOMMANDS, "not_written_yet"))
    parser = cli_main.build_parser()
    assert "not_written_yet" not in parser.format_help()
    assert main(["ls", "--json"]) == 0


def test_missing_dependency_inside_a_subcommand_is_not_skipped(extra_commands):
    extra_commands(broken="import leanscale_no_such_dependency\n")
    with pytest.raises(ModuleNotFoundError, match="leanscale_no_such_dependency"):
        cli_main.build_parser()


def _existing_subcommands():
    return [name for name in SUBCOMMANDS if cli_main._load_subcommand(name) is not None]


@pytest.mark.parametrize("name", _existing_subcommands())
def test_every_subcommand_follows_the_contract(name, capsys):
    """Each module: add_parser returns a parser with a description, a usage epilog and func=run."""
    module = cli_main._load_subcommand(name)
    subparsers = argparse.ArgumentParser(prog="leanscale").add_subparsers(dest="command")
    parser = module.add_parser(subparsers)
    assert isinstance(parser, argparse.ArgumentParser)
    assert parser.description, f"leanscale {name} needs a description"
    assert parser.epilog and f"leanscale {name}" in parser.epilog, f"leanscale {name} needs an epilog of real usage"
    assert parser.get_default("func") is module.run
    assert main([name, "--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: leanscale {name}")


def test_ls_and_tour_are_registered():
    assert {"ls", "tour"} <= set(_existing_subcommands())
    assert SUBCOMMANDS[:2] == ("ls", "tour")


def test_module_entry_point_runs():
    import subprocess

    out = subprocess.run([sys.executable, "-m", "leanscale.cli.main", "--version"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"leanscale {leanscale.__version__}"


OS_ERROR_COMMANDS = '''
import errno
import os


def add_parser(subparsers):
    parser = subparsers.add_parser("{name}", description="a test command", epilog="leanscale {name}")
    parser.add_argument("what")
    parser.add_argument("--path", default="x")
    parser.set_defaults(func=run)
    return parser


def run(args):
    if args.what == "missing":
        open(os.path.join(args.path, "no", "such.json"))
    if args.what == "folder":
        open(args.path)
    if args.what == "under-a-file":
        os.makedirs(os.path.join(args.path, "sub"))
    if args.what == "rename-onto-folder":
        tmp = os.path.join(os.path.dirname(args.path), ".x.tmp")
        open(tmp, "w").close()
        os.replace(tmp, args.path)
    if args.what == "permission":
        raise PermissionError(errno.EACCES, "Permission denied", args.path)
    if args.what == "disk-full":
        raise OSError(errno.ENOSPC, "No space left on device", args.path)
    if args.what == "other-oserror":
        raise OSError(errno.EIO, "Input/output error")
    if args.what == "connection":
        raise ConnectionResetError("peer reset")
    return 0
'''


@pytest.mark.parametrize(("what", "status", "message"), [
    ("missing", 2, r"No such file or directory \(check the path"),
    ("folder", 2, r"Is a directory \(a file was expected, not a folder\)"),
    ("under-a-file", 2, "a part of the path is a file|a file where a folder is needed"),
    ("rename-onto-folder", 2, "Is a directory"),
    ("permission", 2, r"Permission denied \(no permission"),
    ("disk-full", 1, "No space left on device"),
])
def test_os_errors_about_paths_are_clean_messages(extra_commands, tmp_path, capsys, what, status, message):
    """A path the user gave that cannot be used: one line naming it, exit 2 (1: the disk), no traceback."""
    import re

    extra_commands(oscmd=OS_ERROR_COMMANDS.format(name="oscmd"))
    folder = tmp_path / "a folder"
    folder.mkdir()
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("x")
    path = {"missing": tmp_path, "folder": folder, "under-a-file": a_file,
            "rename-onto-folder": folder}.get(what, tmp_path / "out.json")
    assert main(["oscmd", what, "--path", str(path)]) == status
    err = capsys.readouterr().err
    assert err.startswith("leanscale oscmd: error: cannot use '") and re.search(message, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    if what == "rename-onto-folder":  # the path the user named, not the temporary file
        assert repr(str(folder)) in err and ".x.tmp" not in err


def test_os_errors_keep_the_traceback_with_debug_env(extra_commands, tmp_path, monkeypatch):
    extra_commands(oscmd=OS_ERROR_COMMANDS.format(name="oscmd"))
    monkeypatch.setenv("LEANSCALE_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(["oscmd", "missing", "--path", str(tmp_path)])


@pytest.mark.parametrize(("what", "exc"), [("other-oserror", OSError), ("connection", ConnectionResetError)])
def test_other_os_errors_are_not_hidden(extra_commands, what, exc):
    """Only path and storage errors become messages; an I/O error or a network error is a real fault."""
    extra_commands(oscmd=OS_ERROR_COMMANDS.format(name="oscmd"))
    with pytest.raises(exc):
        main(["oscmd", what])


def test_os_error_message_without_a_path():
    assert cli_main.os_error_message(PermissionError(13, "Permission denied")) == "Permission denied (PermissionError)"


@pytest.mark.parametrize("argv", [
    ["sweep", "--preset", "quick", "--out", "{file}/sub"],
    ["batch", "train", "--batch", "64", "--out", "{folder}"],
    ["batch", "train", "--batch", "64", "--out", "{file}/x.json"],
    ["prune", "select", "--scores", "{scores}", "--keep", "0.5", "--out", "{file}"],
])
def test_real_commands_with_unusable_output_paths_fail_cleanly(tmp_path, capsys, argv):
    """Regressions from the bad-input sweep of issue #13: these were FileExistsError / IsADirectoryError /
    NotADirectoryError tracebacks (batch train only after training)."""
    import numpy as np

    a_file = tmp_path / "a_file.json"
    a_file.write_text("{}")
    folder = tmp_path / "folder"
    folder.mkdir()
    scores = tmp_path / "scores.npy"
    np.save(scores, np.linspace(0, 1, 20))
    argv = [a.format(file=a_file, folder=folder, scores=scores) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error:" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["batch", "prune", "sparse", "cascade"])
def test_a_command_without_its_action_is_a_usage_error(command, capsys):
    """One dispatch (leanscale.cli.run_action) for every command with actions: help on stderr, exit 2."""
    assert main([command]) == 2
    out, err = capsys.readouterr()
    assert out == "" and f"usage: leanscale {command}" in err and "<action>" in err


def test_print_json_keeps_stdout_parseable_and_warnings_on_stderr(capsys):
    import json

    import numpy as np

    from leanscale.cli import print_json

    assert print_json({"x": np.float32(1.5), "n": np.arange(2)}, ["careful", "twice"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"x": 1.5, "n": [0, 1]}  # through to_jsonable
    assert err.splitlines() == ["WARNING: careful", "WARNING: twice"]


def test_torchrun_rank_without_torchrun_is_rank_0_and_starts_nothing(monkeypatch):
    import torch.distributed as dist

    from leanscale.cli import torchrun_rank

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with torchrun_rank() as rank:
        assert rank == 0 and not dist.is_initialized()
    with pytest.raises(RuntimeError, match="inside"):  # an error in the body goes through
        with torchrun_rank():
            raise RuntimeError("inside")


def test_add_command_and_add_actions_make_the_usual_parsers(capsys):
    from leanscale.cli import add_actions, add_command, run_action

    parser = argparse.ArgumentParser(prog="leanscale")
    p = add_command(parser.add_subparsers(dest="command"), "demo", help="h", description="d",
                    epilog="examples:\n  leanscale demo go")
    q = add_command(add_actions(p), "go", help="g", description="go", epilog="")
    q.set_defaults(action_func=lambda args: 7)
    assert p.formatter_class is argparse.RawDescriptionHelpFormatter  # the epilog is printed as written
    args = parser.parse_args(["demo", "go"])
    assert args.func is run_action and args.func(args) == 7
    args = parser.parse_args(["demo"])
    assert args.func(args) == 2 and "usage: leanscale demo" in capsys.readouterr().err
