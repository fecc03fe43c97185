"""The circuit breaker per backend: the state machine with an injected clock (through
:class:`Backend` and an httpx mock transport counting the calls that reach the backend), the config
keys, the stores (in memory; Redis against a real ``redis-server`` when one is installed) and the
gateway end to end with the official ``openai`` client in front of fake backends."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time

import httpx
import openai
import pytest

from leanscale.cascade.gateway import GatewayConfig
from leanscale.cascade.gateway.backends import Backend, BackendError
from leanscale.cascade.gateway.breaker import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    Breaker,
    BreakerConfig,
    CircuitOpen,
)
from leanscale.cascade.gateway.store import KEEP, MemoryBreakerStore, RedisBreakerStore
from leanscale.core.errors import InvalidParameterError, MissingDependencyError

from .conftest import client, redis_missing, redis_server, running_gateway

MESSAGES = [{"role": "user", "content": "hello"}]
COMPLETION = {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class Upstream:
    """An httpx mock transport: answers ``self.status`` (200: a completion), raises
    ``self.raise_`` (a connection error), or waits on ``self.gate`` first; counts the calls."""

    def __init__(self):
        self.calls, self.status, self.raise_, self.gate, self.sleep_s = 0, 200, None, None, 0.0
        self.started = asyncio.Event()

    async def handler(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.sleep_s:
            await asyncio.sleep(self.sleep_s)
        if self.raise_ is not None:
            raise self.raise_
        if self.status == 200:
            return httpx.Response(200, json=COMPLETION)
        return httpx.Response(self.status, json={"error": {"message": f"injected {self.status}"}})


def model_config(breaker=..., **extra):
    entry = {"name": "small", "base_url": "http://127.0.0.1:9/v1", "timeout_s": 0.2, **extra}
    if breaker is not ...:
        entry["breaker"] = breaker
    return GatewayConfig.from_dict({"models": [entry]}).models[0]


def make_backend(upstream: Upstream, clock: Clock, **breaker) -> Backend:
    cfg = model_config({"failure_threshold": 3, "open_s": 10, **breaker})
    b = Breaker(cfg.name, cfg.breaker, MemoryBreakerStore(clock=clock), probe_lease_s=5.0)
    return Backend(cfg, transport=httpx.MockTransport(upstream.handler), breaker=b)


async def call(backend: Backend):
    """The answer, or the BackendError raised."""
    try:
        return await backend.request_json("chat/completions", {"model": "small", "messages": MESSAGES})
    except BackendError as e:
        return e


def run(coro):
    return asyncio.run(coro)


# ------------------------------------------------------------------------ the state machine
def test_opens_after_n_consecutive_failures_then_fails_fast_without_calling_the_backend():
    async def main():
        up, clock = Upstream(), Clock()
        backend = make_backend(up, clock)
        up.status = 500
        for _ in range(2):
            assert (await call(backend)).kind == "server_error"
        up.status = 200
        assert isinstance(await call(backend), dict)  # a success resets the count
        up.status = 500
        for _ in range(2):
            assert (await call(backend)).kind == "server_error"
            assert backend.breaker_state() == CLOSED
        assert (await call(backend)).kind == "server_error"  # the 3rd in a row
        assert backend.breaker_state() == OPEN
        assert up.calls == 6
        clock.advance(1.0)
        for _ in range(5):
            e = await call(backend)
            assert e.kind == "circuit_open" and e.retryable and e.overload
            assert e.retry_after == pytest.approx(9.0)  # open_s 10, 1 s later
            assert "retried in 9.0 s" in e.message and "3 failures in a row" in e.message
            assert "injected 500" in e.message
        assert up.calls == 6  # not one call reached the backend while open
        assert backend.in_flight == 0
        await backend.aclose()

    run(main())


def test_failure_kinds_timeout_connection_5xx_count_429_does_not_unless_configured():
    async def main():
        up, clock = Upstream(), Clock()
        backend = make_backend(up, clock)
        up.status = 429
        for _ in range(10):
            assert (await call(backend)).kind == "rate_limited"
        assert backend.breaker_state() == CLOSED and up.calls == 10  # 429 is overload, not failure
        up.status = 400
        assert (await call(backend)).kind == "client_error"  # the backend is up: counts as a success
        up.status, up.sleep_s = 200, 1.0  # timeout_s 0.2
        assert (await call(backend)).kind == "timeout"
        up.sleep_s, up.raise_ = 0.0, httpx.ConnectError("refused")
        assert (await call(backend)).kind == "connection"
        up.raise_, up.status = None, 503
        assert (await call(backend)).kind == "server_error"
        assert backend.breaker_state() == OPEN and up.calls == 14
        await backend.aclose()

        up2 = Upstream()
        counted = make_backend(up2, clock, count_rate_limited=True)
        up2.status = 429
        kinds = [(await call(counted)).kind for _ in range(5)]
        assert kinds == ["rate_limited"] * 3 + ["circuit_open"] * 2 and up2.calls == 3
        await counted.aclose()

    run(main())


async def tripped(**kw):
    """A backend (failure_threshold 3) whose upstream answered 500 three times: its breaker is open."""
    up, clock = Upstream(), Clock()
    backend = make_backend(up, clock, **kw)
    up.status = 500
    for _ in range(3):
        await call(backend)
    return backend, up, clock


def test_half_open_lets_exactly_one_probe_through_while_concurrent_callers_fail_fast():
    async def main():
        backend, up, clock = await tripped()
        assert backend.breaker_state() == OPEN and up.calls == 3
        clock.advance(10.0)
        assert backend.breaker_state() == HALF_OPEN  # the wait is over: the next call probes
        up.status, up.gate, up.started = 200, asyncio.Event(), asyncio.Event()
        probe = asyncio.create_task(call(backend))
        await asyncio.wait_for(up.started.wait(), 5)  # the probe is at the backend, waiting
        others = await asyncio.gather(*(call(backend) for _ in range(20)))
        assert up.calls == 4  # only the probe reached the backend
        assert all(isinstance(e, BackendError) and e.kind == "circuit_open" for e in others)
        assert all(e.retry_after == 1.0 and "probe" in e.message for e in others)
        assert backend.breaker_state() == HALF_OPEN
        up.gate.set()
        assert isinstance(await probe, dict)
        assert backend.breaker_state() == CLOSED  # the probe succeeded: closed
        up.gate = None
        for _ in range(3):
            assert isinstance(await call(backend), dict)
        assert up.calls == 7
        # closing reset the count: 2 failures do not reopen it
        up.status = 500
        for _ in range(2):
            await call(backend)
        assert backend.breaker_state() == CLOSED
        await backend.aclose()

    run(main())


def test_probe_failure_reopens_for_twice_as_long_up_to_the_cap_and_success_resets_it():
    async def main():
        backend, up, clock = await tripped(max_open_s=25)
        waits = []
        for _ in range(3):
            wait = (await call(backend)).retry_after
            waits.append(wait)
            clock.advance(wait)
            calls = up.calls
            assert (await call(backend)).kind == "server_error"  # the probe, failed
            assert up.calls == calls + 1
            assert backend.breaker_state() == OPEN
        assert waits == [pytest.approx(10), pytest.approx(20), pytest.approx(25)]
        assert (await call(backend)).retry_after == pytest.approx(25)  # capped at max_open_s
        clock.advance(25)
        up.status = 200
        assert isinstance(await call(backend), dict)
        up.status = 500
        for _ in range(3):
            await call(backend)
        assert (await call(backend)).retry_after == pytest.approx(10)  # back to open_s
        await backend.aclose()

    run(main())


def test_a_cancelled_probe_frees_the_half_open_slot():
    async def main():
        backend, up, clock = await tripped()
        clock.advance(10)
        up.gate, up.started = asyncio.Event(), asyncio.Event()
        probe = asyncio.create_task(call(backend))
        await asyncio.wait_for(up.started.wait(), 5)
        assert (await call(backend)).kind == "circuit_open"
        probe.cancel()  # the client went away
        with contextlib.suppress(asyncio.CancelledError):
            await probe
        up.gate, up.status = None, 200
        assert isinstance(await call(backend), dict)  # the next call is the probe
        assert backend.breaker_state() == CLOSED
        await backend.aclose()

    run(main())


def test_a_lost_probe_frees_the_slot_after_its_lease():
    async def main():
        clock = Clock()
        cfg = model_config({"failure_threshold": 1, "open_s": 1})
        b = Breaker("small", cfg.breaker, MemoryBreakerStore(clock=clock), probe_lease_s=5.0)
        await b.record(await b.admit(), "timeout")
        clock.advance(1)
        await b.admit()  # a probe whose result never comes (its worker died)
        with pytest.raises(CircuitOpen):
            await b.admit()
        clock.advance(5)
        ticket = await b.admit()
        assert ticket.probe is not None
        await b.record(ticket, None)
        assert b.state() == CLOSED

    run(main())


def test_streams_count_and_fail_fast_too():
    async def main():
        up, clock = Upstream(), Clock()
        backend = make_backend(up, clock)
        up.status = 502
        for _ in range(3):
            with pytest.raises(BackendError, match="502"):
                await backend.open_stream("chat/completions", {"model": "small", "messages": MESSAGES, "stream": True})
        with pytest.raises(BackendError) as info:
            await backend.open_stream("chat/completions", {"model": "small", "messages": MESSAGES, "stream": True})
        assert info.value.kind == "circuit_open" and up.calls == 3 and backend.in_flight == 0
        await backend.aclose()

    run(main())


def test_disabled_breaker_never_opens():
    for breaker in (None, {"enabled": False, "failure_threshold": 1}):
        cfg = model_config(breaker)
        assert cfg.breaker is None

        async def main(cfg=cfg):
            up = Upstream()
            backend = Backend(cfg, transport=httpx.MockTransport(up.handler))
            assert backend.breaker is None
            up.status = 500
            kinds = {(await call(backend)).kind for _ in range(12)}
            assert kinds == {"server_error"} and up.calls == 12 and backend.breaker_state() == CLOSED
            await backend.aclose()

        run(main())


# ------------------------------------------------------------------------------------ config
def test_breaker_config_defaults_and_validation():
    cfg = model_config()
    assert cfg.breaker == BreakerConfig(failure_threshold=5, open_s=30.0, max_open_s=300.0, count_rate_limited=False)
    cfg = model_config({"open_s": 600, "failure_threshold": 2, "count_rate_limited": True})
    assert (cfg.breaker.open_s, cfg.breaker.max_open_s, cfg.breaker.failure_threshold) == (600, 600, 2)
    assert cfg.breaker.outcome("rate_limited") == "failure"
    bad = [({"failure_threshold": 0}, r"models\[0\]\.breaker\.failure_threshold must be an integer >= 1\. Got 0"),
           ({"failure_threshold": 2.5}, r"failure_threshold must be an integer"),
           ({"open_s": 0}, r"models\[0\]\.breaker\.open_s must be a number > 0"),
           ({"open_s": 10, "max_open_s": 5}, r"max_open_s must be >= open_s \(10\)\. Got 5"),
           ({"enabled": "no"}, r"breaker\.enabled must be true or false"),
           ({"treshold": 3}, r"unknown key models\[0\]\.breaker\.treshold.*allowed: count_rate_limited, enabled"),
           ([5, 30], r"models\[0\]\.breaker must be a mapping")]
    for value, message in bad:
        with pytest.raises(InvalidParameterError, match=message):
            model_config(value)


def test_state_config_validation_and_propagation():
    base = {"models": [{"name": "a", "base_url": "http://127.0.0.1:9/v1"},
                       {"name": "b", "base_url": "http://127.0.0.1:8/v1", "breaker": None}]}
    config = GatewayConfig.from_dict(base)
    assert config.state.redis_url is None and config.models[0].breaker.redis_url is None
    config = GatewayConfig.from_dict({**base, "state": {"redis_url": "redis://10.0.0.5:6380/2", "key_prefix": "gw1:"}})
    assert config.state.redis_url == "redis://10.0.0.5:6380/2"
    assert (config.models[0].breaker.redis_url, config.models[0].breaker.key_prefix) == ("redis://10.0.0.5:6380/2",
                                                                                          "gw1:")
    assert config.models[1].breaker is None
    for state, message in [({"redis_url": "http://x:1"}, r"state\.redis_url must be a Redis URL.*Got 'http://x:1'"),
                           ({"redis_ur": "redis://x"}, r"unknown key state\.redis_ur.*Did you mean 'redis_url'"),
                           ({"key_prefix": 3}, r"state\.key_prefix must be a string")]:
        with pytest.raises(InvalidParameterError, match=message):
            GatewayConfig.from_dict({**base, "state": state})


# ------------------------------------------------------------------------------------ stores
def test_memory_store_update_semantics_and_ttl():
    async def main():
        clock = Clock()
        store = MemoryBreakerStore(clock=clock)
        assert await store.get("k") is None
        assert await store.update("k", lambda rec: ({"n": 1}, "set"), ttl_s=5) == "set"
        assert await store.update("k", lambda rec: (KEEP, rec["n"]), ttl_s=5) == 1
        clock.advance(4.9)
        assert await store.get("k") == {"n": 1}
        clock.advance(0.2)
        assert await store.get("k") is None  # expired
        await store.update("k", lambda rec: ({"n": 2}, None), ttl_s=5)
        await store.update("k", lambda rec: (None, None), ttl_s=5)
        assert await store.get("k") is None  # deleted

    run(main())


def test_redis_store_without_the_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "redis", None)  # import redis -> ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'leanscale\[gateway-redis\]'"):
        RedisBreakerStore("redis://127.0.0.1:6379/0")
    cfg = GatewayConfig.from_dict({"models": [{"name": "a", "base_url": "http://127.0.0.1:9/v1"}],
                                   "state": {"redis_url": "redis://127.0.0.1:6379/0"}}).models[0]
    with pytest.raises(MissingDependencyError, match=r"state\.redis_url.*leanscale\[gateway-redis\]"):
        Backend(cfg)


class _FakeRedis:
    """Just enough of ``redis.asyncio.Redis`` for :class:`RedisBreakerStore` (GET, and a pipeline
    with WATCH / MULTI / SET PX / DEL / EXEC failing with WatchError when the key changed): it
    checks the store's transaction logic where no redis-server is installed; the real server is
    tested below when it is."""

    class WatchError(Exception):
        pass

    def __init__(self):
        self.data, self.version, self.px, self.conflicts = {}, {}, {}, 0

    async def get(self, key):
        return self.data.get(key)

    def pipeline(self, transaction=True):
        return _FakePipeline(self)


class _FakePipeline:
    def __init__(self, r):
        self.r, self.watched, self.ops, self.executions = r, None, [], 0

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.reset()

    async def watch(self, key):
        self.watched = (key, self.r.version.get(key, 0))

    async def get(self, key):
        if self.r.conflicts:  # another worker writes between our WATCH and EXEC
            self.r.conflicts -= 1
            self.r.version[key] = self.r.version.get(key, 0) + 1
        return self.r.data.get(key)

    def multi(self):
        self.ops = []

    def set(self, key, value, px):
        self.ops.append(("set", key, value, px))

    def delete(self, key):
        self.ops.append(("del", key))

    async def execute(self):
        key, version = self.watched
        if self.r.version.get(key, 0) != version:
            raise _FakeRedis.WatchError()
        for op in self.ops:
            self.r.version[op[1]] = version + 1
            if op[0] == "set":
                self.r.data[op[1]], self.r.px[op[1]] = op[2], op[3]
            else:
                self.r.data.pop(op[1], None)

    async def unwatch(self):
        self.watched = None

    async def reset(self):
        self.watched, self.ops = None, []


def test_redis_store_transactions_on_a_fake_client(monkeypatch):
    import types

    fake_module = types.ModuleType("redis")
    fake_module.WatchError = _FakeRedis.WatchError
    fake_module.asyncio = types.ModuleType("redis.asyncio")
    monkeypatch.setitem(sys.modules, "redis", fake_module)
    monkeypatch.setitem(sys.modules, "redis.asyncio", fake_module.asyncio)

    async def main():
        r, clock = _FakeRedis(), Clock()
        cfg = model_config({"failure_threshold": 2, "open_s": 10}).breaker
        a = Breaker("small", cfg, RedisBreakerStore(client=r), clock=clock, probe_lease_s=5)
        b = Breaker("small", cfg, RedisBreakerStore(client=r), clock=clock, probe_lease_s=5)
        await a.record(await a.admit(), "timeout")
        r.conflicts = 3  # the next update loses 3 races and is retried
        await b.record(await b.admit(), "server_error", "HTTP 500")
        assert r.conflicts == 0
        key = "leanscale:gateway:breaker:small"
        assert json.loads(r.data[key])["state"] == "open" and json.loads(r.data[key])["failures"] == 2
        assert r.px[key] == (10 + cfg.max_open_s + 5 + 60) * 1000  # a TTL on every key
        with pytest.raises(CircuitOpen):
            await a.admit()
        clock.advance(10)
        t = await b.admit()
        with pytest.raises(CircuitOpen, match="probe"):
            await a.admit()
        await b.record(t, None)
        assert key not in r.data and await a.refresh() == CLOSED  # closed: the key is deleted
        r.conflicts = 10**6
        store = RedisBreakerStore(client=r, max_retries=3)
        with pytest.raises(RuntimeError, match="4 conflicting updates"):
            await store.update(key, lambda rec: ({"x": 1}, None), ttl_s=1)

    run(main())


@pytest.mark.skipif(redis_missing() is not None, reason=f"Redis test skipped: {redis_missing()}")
def test_redis_store_shares_the_breaker_between_workers():
    async def main(url):
        clock = Clock()
        cfg = model_config({"failure_threshold": 2, "open_s": 10}).breaker
        # two "workers": each its own client and store, one Redis
        a = Breaker("small", cfg, RedisBreakerStore(url), clock=clock, probe_lease_s=5)
        b = Breaker("small", cfg, RedisBreakerStore(url), clock=clock, probe_lease_s=5)
        await a.record(await a.admit(), "timeout")
        await b.record(await b.admit(), "server_error", "HTTP 500")  # 2 in a row across workers: open
        for w in (a, b):
            with pytest.raises(CircuitOpen) as info:
                await w.admit()
            assert info.value.retry_after == pytest.approx(10)
        ttl = await a.store.client.pttl(a.key)
        assert 10_000 < ttl <= (10 + cfg.max_open_s + 5 + 60) * 1000  # keys expire
        clock.advance(10)
        tickets = await asyncio.gather(*(w.admit() for w in (a, b) for _ in range(10)), return_exceptions=True)
        probes = [t for t in tickets if not isinstance(t, Exception)]
        assert len(probes) == 1 and probes[0].probe is not None  # exactly one probe across the workers
        owner = a if tickets.index(probes[0]) < 10 else b
        await owner.record(probes[0], None)
        assert await a.refresh() == CLOSED and await b.refresh() == CLOSED
        await a.aclose()
        await b.aclose()

    with redis_server() as url:
        run(main(url))


# ----------------------------------------------------------------------- end to end (openai)
def _e2e_config(small, big, small_breaker, big_breaker=None):
    return GatewayConfig.from_dict({
        "models": [
            {"name": "small", "base_url": small.base_url, "timeout_s": 2, "breaker": small_breaker},
            {"name": "big", "base_url": big.base_url, "timeout_s": 2,
             **({"breaker": big_breaker} if big_breaker is not None else {})},
        ],
        "fallbacks": {"small": ["big"]},
        "backoff_s": 0.0,
    })


def test_gateway_stops_calling_a_failing_model_answers_with_the_fallback_and_probes_after_open_s(backends):
    small, big = backends
    small.set_fault(status=500)
    with running_gateway(_e2e_config(small, big, {"failure_threshold": 3, "open_s": 0.3, "max_open_s": 0.3})) as url:
        c = client(url)

        def ask():
            raw = c.chat.completions.with_raw_response.create(model="small", messages=MESSAGES)
            assert raw.parse().choices[0].message.content == "the big model answers carefully"
            return raw.headers["x-leanscale-model"]

        for _ in range(3):
            assert ask() == "big"
        t_open = time.monotonic()
        assert (small.calls, big.calls) == (3, 3)
        for _ in range(6):  # open: small is not called, big answers
            assert ask() == "big"
        # streams too
        chunks = list(c.chat.completions.create(model="small", messages=MESSAGES, stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == \
            "the big model answers carefully"
        if time.monotonic() - t_open < 0.3:  # (on a machine too slow for that, a probe may have gone by now)
            assert small.calls == 3
        metrics = httpx.get(url.removesuffix("/v1") + "/metrics").text
        assert 'leanscale_gateway_backend_calls_total{model="big",outcome="ok"} 10.0' in metrics
        time.sleep(0.35)  # > open_s (= max_open_s) after the last call to small: half-open
        calls = small.calls
        t_probe = time.monotonic()
        assert ask() == "big"  # the probe reached small (still failing), big answered
        assert small.calls == calls + 1
        assert ask() == "big"
        if time.monotonic() - t_probe < 0.3:
            assert small.calls == calls + 1  # reopened: no further call
        calls = small.calls
        small.clear_faults()
        time.sleep(0.35)
        raw = c.chat.completions.with_raw_response.create(model="small", messages=MESSAGES)
        assert raw.headers["x-leanscale-model"] == "small"  # the probe succeeded: closed
        assert raw.parse().choices[0].message.content == "the small model says hello"
        assert small.calls == calls + 1
        for _ in range(3):
            assert c.chat.completions.with_raw_response.create(
                model="small", messages=MESSAGES).headers["x-leanscale-model"] == "small"


def test_every_model_of_the_chain_open_answers_503_with_the_soonest_retry_after(backends):
    small, big = backends
    small.set_fault(status=500)
    big.set_fault(status=503)
    config = _e2e_config(small, big, {"failure_threshold": 1, "open_s": 20}, {"failure_threshold": 2, "open_s": 40})
    with running_gateway(config) as url:
        c = client(url)
        with pytest.raises(openai.InternalServerError) as info:  # big fails twice: open for 40 s
            c.chat.completions.create(model="big", messages=MESSAGES)
        assert info.value.status_code == 502
        with pytest.raises(openai.InternalServerError) as info:
            c.chat.completions.create(model="big", messages=MESSAGES)
        assert big.calls == 2
        with pytest.raises(openai.InternalServerError) as info:  # big alone, open: 503, Retry-After 40
            c.chat.completions.create(model="big", messages=MESSAGES)
        assert info.value.status_code == 503
        assert info.value.response.headers["retry-after"] == "40"
        assert "circuit open" in info.value.message
        with pytest.raises(openai.InternalServerError) as info:  # small fails once (open 20 s), big is open
            c.chat.completions.create(model="small", messages=MESSAGES)
        assert info.value.status_code == 502 and small.calls == 1
        with pytest.raises(openai.InternalServerError) as info:  # both open: the soonest, small's 20 s
            c.chat.completions.create(model="small", messages=MESSAGES)
        assert info.value.status_code == 503
        assert info.value.response.headers["retry-after"] == "20"
        assert (small.calls, big.calls) == (1, 2)
