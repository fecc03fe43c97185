"""serve_gateway and the ``leanscale gateway`` CLI module build the uvicorn config they run
(``_run`` replaced: nothing listens), bound to loopback by default."""

from __future__ import annotations

import argparse
import logging

import pytest
from fastapi.testclient import TestClient

import leanscale.cascade.server as server_module
from leanscale.cascade.gateway import serve_gateway
from leanscale.cli import gateway as gateway_cli

YAML = """\
models:
  - name: small
    base_url: http://127.0.0.1:9/v1
"""


@pytest.fixture
def captured(monkeypatch):
    runs = []
    monkeypatch.setattr(server_module, "_run", runs.append)
    return runs


def test_serve_gateway_builds_the_server(tmp_path, captured, caplog):
    path = tmp_path / "gw.yaml"
    path.write_text(YAML)
    serve_gateway(path, port=0, max_connections=10, log_level="error")
    (config,) = captured
    assert (config.host, config.port, config.leanscale_max_connections) == ("127.0.0.1", 0, 10)
    with TestClient(config.app) as c:
        assert c.get("/v1/models").json()["data"][0]["id"] == "small"
    with caplog.at_level(logging.WARNING, logger="leanscale.cascade.gateway"):
        serve_gateway(path, host="0.0.0.0", port=0)
    assert "without client keys" in caplog.text


def test_cli_module(tmp_path, captured):
    path = tmp_path / "gw.yaml"
    path.write_text(YAML)
    parser = argparse.ArgumentParser(prog="leanscale")
    gateway_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["gateway", "--config", str(path), "--port", "0", "--log-level", "error"])
    assert args.func(args) == 0
    assert captured[0].port == 0 and captured[0].host == "127.0.0.1"
