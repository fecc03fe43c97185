"""`leanscale serve` (and `cascade eval --objects`) on bad input: a clear message and exit 2, never a
traceback or a server that exits with status 3 after a few INFO lines. Nothing here starts a server."""

import os
import socket
import sys
import types

import pytest

from leanscale.cascade import server as server_mod
from leanscale.cli.main import main
from tests.cascade.test_server import build_cascade


@pytest.fixture
def saved(tmp_path, monkeypatch):
    """A saved cascade (its stages need --objects tests.cascade.test_server:OBJECTS); uvicorn is never
    started (serve's _run fails the test)."""

    def never(config):
        raise AssertionError("the server was started")

    monkeypatch.setattr(server_mod, "_run", never)
    cascade, _ = build_cascade()
    return str(cascade.save(tmp_path / "cascade.json"))


@pytest.fixture
def objects_module(monkeypatch):
    calls = []
    mod = types.ModuleType("leanscale_test_objects")
    mod.needs_args = lambda name: calls.append(name)
    mod.gives_list = lambda: ["small", "big"]
    mod.int_keys = {1: len}
    mod.NUMBER = 5
    mod.raises_type_error = lambda: int("1", base=[])
    monkeypatch.setitem(sys.modules, "leanscale_test_objects", mod)
    return calls


@pytest.mark.parametrize("spec,text", [
    ("os:system", "Got 'os:system', which needs arguments"),
    ("json:loads", "Got 'json:loads', which needs arguments"),
    ("leanscale_test_objects:needs_args", "which needs arguments"),
    ("leanscale_test_objects:raises_type_error", "calling it with no arguments failed"),
    ("leanscale_test_objects:gives_list", "Got list from 'leanscale_test_objects:gives_list'"),
    ("leanscale_test_objects:NUMBER", "Got int from 'leanscale_test_objects:NUMBER'"),
    ("leanscale_test_objects:int_keys", "keys that are not stage names (str): [1]"),
])
@pytest.mark.parametrize("command", [["serve"], ["cascade", "serve"], ["cascade", "eval"]])
def test_bad_objects_are_clean_errors(command, spec, text, saved, objects_module, capsys, monkeypatch):
    ran = []
    monkeypatch.setattr(os, "system", lambda command: ran.append(command))  # must never be called
    extra = ["--data", "nope.csv"] if command[-1] == "eval" else []
    assert main([*command, saved, "--objects", spec, *extra]) == 2
    err = capsys.readouterr().err
    owner = "leanscale cascade eval" if command[-1] == "eval" else "leanscale serve"
    assert f"The '--objects' parameter of {owner} must name a dict of stage name -> object, or a callable " \
           "that takes no arguments and returns one." in err
    assert text in err and "Traceback" not in err
    assert ran == [] and objects_module == []


def test_log_level_is_one_of_uvicorns(saved, capsys):
    assert main(["serve", saved, "--log-level", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--log-level: invalid choice: 'nope'" in err and "'trace'" in err and "Traceback" not in err
    from uvicorn.config import LOG_LEVELS

    from leanscale.cli.serve import LOG_LEVELS as ours

    assert set(ours) == set(LOG_LEVELS)


def test_an_address_it_cannot_listen_on_is_one_clear_error(saved, capsys):
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    try:
        assert main(["serve", saved, "--objects", "tests.cascade.test_server:OBJECTS", "--port", str(port)]) == 2
        err = capsys.readouterr().err
        assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in err and "Traceback" not in err
    finally:
        sock.close()
    assert main(["serve", saved, "--host", "999.1.1.1", "--port", "8765"]) == 2
    err = capsys.readouterr().err
    assert "cannot listen on 999.1.1.1:8765: " in err and "Traceback" not in err and "INFO" not in err
    for port in ("65536", "-1"):
        assert main(["serve", saved, "--port", port]) == 2
        assert "'port' parameter of serve must be an int in the range [0, 65535]" in capsys.readouterr().err


def test_the_flags_defaults_are_the_servers():
    """`leanscale serve` with no flags serves exactly as create_app/server_config would by default."""
    import inspect

    from leanscale.cascade.server import create_app, server_config
    from leanscale.cli.main import build_parser

    args = build_parser().parse_args(["serve", "c.json"])
    api = {**{k: p.default for k, p in inspect.signature(create_app).parameters.items()},
           **{k: p.default for k, p in inspect.signature(server_config).parameters.items()}}
    renamed = {"request_timeout": "request_timeout_s", "body_timeout": "body_timeout_s",
               "max_queue_age": "max_queue_age_s"}
    from leanscale.cli import serve as serve_cli

    for flag, kind, default, text in serve_cli._LIMITS:
        dest = flag[2:].replace("-", "_")
        assert getattr(args, dest) == default == api[renamed.get(dest, dest)], flag
        assert isinstance(getattr(args, dest), kind) and text.endswith(f"({default:g})" if kind is float else f"({default})"), flag
