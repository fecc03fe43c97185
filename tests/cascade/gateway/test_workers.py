"""``serve_gateway(..., workers=N)``: N uvicorn worker processes sharing one socket, each reading the
YAML config; all of them answer; SIGTERM stops every process, and a worker never outlives its
supervisor (even one killed with SIGKILL). Linux (/proc) process checks."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from leanscale.cascade.gateway import GatewayConfig, serve_gateway
from leanscale.cascade.gateway.app import WORKER_CONFIG_ENV, _worker_app
from leanscale.core.errors import InvalidParameterError

from .conftest import client

YAML = """\
models:
  - name: small
    base_url: {url}
    input_price_per_1k: 0.001
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli_has_workers() -> bool:
    """Whether ``leanscale gateway`` takes ``--workers`` (added to the CLI separately)."""
    try:
        from leanscale.cli import gateway as gateway_cli

        parser = argparse.ArgumentParser(prog="leanscale")
        gateway_cli.add_parser(parser.add_subparsers(dest="command"))
        args = parser.parse_args(["gateway", "--config", "gw.yaml", "--workers", "2"])
    except (Exception, SystemExit):  # noqa: BLE001 -- not there (yet): start it through the API
        return False
    return getattr(args, "workers", None) == 2


def _command(path: Path, port: int) -> list[str]:
    if _cli_has_workers():
        exe = Path(sys.executable).with_name("leanscale")
        return [str(exe), "gateway", "--config", str(path), "--port", str(port), "--workers", "2",
                "--log-level", "warning"]
    return [sys.executable, "-c", "from leanscale.cascade.gateway.app import serve_gateway; "
            f"serve_gateway({str(path)!r}, port={port}, workers=2, log_level='warning')"]


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # [state, ppid, ...] (the name may hold spaces)


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _owned_by_family(folder: Path, pid: int) -> bool:
    """Whether ``folder`` holds the metrics files of a process of ``pid``'s family (``*_PID.db``)."""
    family = _descendants(pid) | {pid}
    return any(int(f.stem.rsplit("_", 1)[-1]) in family for f in folder.glob("*_*.db")
               if f.stem.rsplit("_", 1)[-1].isdigit())


def _wait(predicate, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout} s. Gateway output:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def _worker_pids(base: str, proc: subprocess.Popen, log: Path) -> set[int]:
    """The pids /healthz reports, over fresh connections, until two differ."""
    pids: set[int] = set()

    def two() -> bool:
        assert proc.poll() is None, f"the gateway exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
        try:
            pids.add(httpx.get(base + "/healthz", timeout=2).json()["pid"])  # a new connection each time
        except httpx.HTTPError:
            pass
        return len(pids) >= 2

    # The deadline includes start-up: imports and two spawns (~3 s idle, ~20 s on loaded cores).
    _wait(two, 60, "two workers did not answer /healthz", log)
    return pids


@pytest.fixture
def gateway_workers(backends, tmp_path):
    small, _ = backends
    path = tmp_path / "gw.yaml"
    path.write_text(YAML.format(url=small.base_url))
    port = _free_port()
    log = tmp_path / "gateway.out"
    env = {k: v for k, v in os.environ.items() if k != WORKER_CONFIG_ENV}
    env["LEANSCALE_NO_PROGRESS"] = "1"
    with log.open("wb") as out:
        proc = subprocess.Popen(_command(path, port), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        yield proc, f"http://127.0.0.1:{port}", small, log
    finally:
        if proc.poll() is None:
            for pid in _descendants(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.kill()
        proc.wait(10)


def test_two_workers_answer_and_sigterm_stops_every_process(gateway_workers):
    proc, base, small, log = gateway_workers
    pids = _worker_pids(base, proc, log)
    assert proc.pid not in pids and pids <= _descendants(proc.pid)

    def ask(i: int) -> str:
        c = client(base + "/v1")  # one client (and connection pool) per thread: several connections
        return c.chat.completions.create(model="small", messages=[{"role": "user", "content": f"q{i}"}]).choices[
            0].message.content

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, range(20)))
    assert answers == ["the small model says hello"] * 20 and small.calls == 20
    # /metrics of whichever worker a scrape reaches reports all of them (multi-process mode);
    # a registry per worker would report only its own share of the 20 requests
    series = 'leanscale_gateway_requests_total{endpoint="chat",model="small",outcome="ok"} '
    for _ in range(6):
        text = httpx.get(base + "/metrics", timeout=5).text  # a new connection each time
        assert [line for line in text.splitlines() if line.startswith(series)] == [series + "20.0"]
        assert 'leanscale_gateway_in_flight 0.0' in text  # summed over the live workers
    metrics_dirs = [p for p in Path(tempfile.gettempdir()).glob("leanscale-gateway-metrics-*")
                    if _owned_by_family(p, proc.pid)]
    family = _descendants(proc.pid)
    assert len(family) >= 2
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0, log.read_text()[-3000:]
    _wait(lambda: not any(_alive(pid) for pid in family), 5, "a worker outlived the supervisor", log)
    assert len(metrics_dirs) == 1 and not metrics_dirs[0].exists()  # the metrics folder removed at the end


def test_no_worker_outlives_a_killed_supervisor(gateway_workers):
    proc, base, _, log = gateway_workers
    pids = _worker_pids(base, proc, log)
    family = _descendants(proc.pid)
    assert pids <= family
    proc.kill()  # SIGKILL: the supervisor cannot stop its workers itself
    proc.wait(5)
    _wait(lambda: not any(_alive(pid) for pid in family), 5, "an orphaned worker kept running", log)
    with pytest.raises(httpx.ConnectError):
        httpx.get(base + "/healthz", timeout=2)


def test_workers_need_a_yaml_path(tmp_path, monkeypatch):
    config = GatewayConfig.from_dict({"models": [{"name": "small", "base_url": "http://127.0.0.1:9/v1"}]})
    with pytest.raises(InvalidParameterError, match="'workers'.*path of the gateway YAML.*GatewayConfig"):
        serve_gateway(config, port=0, workers=2)
    for bad in (0, -1, 1.5, "2"):
        with pytest.raises(InvalidParameterError, match="workers"):
            serve_gateway(config, port=0, workers=bad)
    monkeypatch.delenv(WORKER_CONFIG_ENV, raising=False)
    with pytest.raises(InvalidParameterError, match=WORKER_CONFIG_ENV):
        _worker_app()
    path = tmp_path / "gw.yaml"
    path.write_text(YAML.format(url="http://127.0.0.1:9/v1"))
    monkeypatch.setenv(WORKER_CONFIG_ENV, str(path))
    assert _worker_app().state.config.model_names == ["small"]
