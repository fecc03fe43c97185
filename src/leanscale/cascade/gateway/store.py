"""Where the gateway's shared state lives: in the process (default) or in Redis, so that several
workers (``--workers N``, several hosts behind a load balancer) see the same circuit breakers.

::

    state:                                  # optional, top level of the gateway config
      redis_url: redis://127.0.0.1:6379/0   # redis://, rediss:// (TLS) or unix:// (a socket path)
      key_prefix: "leanscale:gateway:"      # optional: keys are <key_prefix>breaker:<model>

:class:`BreakerStore` is the interface: ``get(key)`` and an atomic read-modify-write
``update(key, fn, ttl_s)`` of one small JSON-able record. :class:`MemoryBreakerStore` keeps the
records in a dict (one process); :class:`RedisBreakerStore` keeps them in Redis (``pip install
'leanscale[gateway-redis]'``), each key with a TTL, and makes ``update`` atomic with
``WATCH``/``MULTI``/``EXEC`` (optimistic: retried when another worker changed the key in between),
so the transition logic lives once, in Python (:mod:`.breaker`), for both stores.
"""

from __future__ import annotations

import abc
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from leanscale.core.errors import MissingDependencyError

__all__ = ["KEEP", "BreakerStore", "MemoryBreakerStore", "RedisBreakerStore", "StateConfig", "parse_state",
           "require_redis"]

_REDIS_INSTALL = "pip install 'leanscale[gateway-redis]'"
_STATE_KEYS = {"redis_url", "key_prefix"}
DEFAULT_KEY_PREFIX = "leanscale:gateway:"


class _Keep:
    def __repr__(self) -> str:
        return "KEEP"


KEEP: Any = _Keep()  # returned by an update function: leave the record as it is (no write)


@dataclass(frozen=True)
class StateConfig:
    """The top-level ``state`` section: ``redis_url`` (None: state kept in each process)."""

    redis_url: str | None = None
    key_prefix: str = DEFAULT_KEY_PREFIX


def parse_state(c, raw: Any) -> StateConfig:
    """Validate the top-level ``state`` section with the config's checker ``c`` (its ``mapping``,
    ``fail`` and ``error``); absent or null: in-process state."""
    if raw is None:
        return StateConfig()
    m = c.mapping("state", raw, _STATE_KEYS)
    url = m.get("redis_url")
    if url is not None:
        ok = isinstance(url, str)
        if ok:
            parts = urlsplit(url)
            ok = parts.scheme in ("redis", "rediss") and bool(parts.hostname) or (
                parts.scheme == "unix" and bool(parts.path))
        if not ok:
            raise c.fail("state.redis_url", "must be a Redis URL (redis://HOST:PORT/DB, rediss://... or "
                         "unix:///path/to/redis.sock)", url)
    prefix = m.get("key_prefix", DEFAULT_KEY_PREFIX)
    if not isinstance(prefix, str) or len(prefix) > 200:
        raise c.fail("state.key_prefix", "must be a string of at most 200 characters", prefix)
    return StateConfig(redis_url=url, key_prefix=prefix)


def require_redis():
    """The ``redis`` package (``redis.asyncio``), or a :class:`MissingDependencyError` naming the extra."""
    try:
        import redis
        import redis.asyncio  # noqa: F401 -- the async client
    except ImportError as exc:
        raise MissingDependencyError(
            f"the gateway's shared state (state.redis_url) needs the redis package (missing: {exc.name}). "
            f"Install it with: {_REDIS_INSTALL}") from exc
    return redis


class BreakerStore(abc.ABC):
    """Records (small JSON-able dicts) by key, with atomic updates. ``clock``: the time base of
    the times stored in the records (every process sharing a store must share it)."""

    clock: Callable[[], float] = staticmethod(time.time)

    @abc.abstractmethod
    async def get(self, key: str) -> dict | None:
        """The record of ``key`` (None when there is none or it expired)."""

    @abc.abstractmethod
    async def update(self, key: str, fn: Callable[[dict | None], tuple[Any, Any]], ttl_s: float) -> Any:
        """Atomically: ``new, result = fn(current)``; store ``new`` with a time to live of
        ``ttl_s`` seconds (``None``: delete the key; :data:`KEEP`: no write); answer ``result``.
        ``fn`` may be called more than once (when another writer won a race) and must be pure."""

    async def aclose(self) -> None:
        """Release connections (nothing to do for the in-memory store)."""


class MemoryBreakerStore(BreakerStore):
    """The records in a dict of this process (the default). ``clock`` defaults to
    ``time.monotonic`` (immune to wall-clock jumps). A lock makes updates atomic across threads;
    within one event loop they are atomic anyway (``fn`` runs without awaiting)."""

    def __init__(self, clock: Callable[[], float] | None = None):
        self.clock = clock or time.monotonic
        self._data: dict[str, tuple[dict, float]] = {}
        self._lock = threading.Lock()

    def _live(self, key: str) -> dict | None:
        item = self._data.get(key)
        if item is None:
            return None
        record, expires = item
        if self.clock() >= expires:
            del self._data[key]
            return None
        return dict(record)

    async def get(self, key: str) -> dict | None:
        with self._lock:
            return self._live(key)

    async def update(self, key: str, fn, ttl_s: float) -> Any:
        with self._lock:
            new, result = fn(self._live(key))
            if new is None:
                self._data.pop(key, None)
            elif new is not KEEP:
                self._data[key] = (dict(new), self.clock() + ttl_s)
            return result


class RedisBreakerStore(BreakerStore):
    """The records in Redis as JSON strings with a TTL (``SET ... PX``); ``update`` is a
    ``WATCH key; GET; MULTI; SET/DEL; EXEC`` transaction, retried (at most ``max_retries`` times)
    when another worker changed the key in between. Times are wall-clock (``time.time``) so that
    workers on several hosts agree, to within their clock skew. ``client``: an existing
    ``redis.asyncio.Redis`` (tests); else one is made from ``url`` with short socket timeouts
    (``timeout_s``), so a dead Redis slows a call by at most that much."""

    def __init__(self, url: str | None = None, *, client=None, timeout_s: float = 0.5, max_retries: int = 20,
                 clock: Callable[[], float] | None = None):
        redis = require_redis()
        self._watch_error = redis.WatchError
        if client is None:
            if url is None:
                raise ValueError("RedisBreakerStore needs a url or a client")
            client = redis.asyncio.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
            self._owned = True
        else:
            self._owned = False
        self.client, self.max_retries = client, max_retries
        self.clock = clock or time.time

    @staticmethod
    def _decode(raw) -> dict | None:
        if raw is None:
            return None
        try:
            record = json.loads(raw)
        except ValueError:
            return None  # not ours, or damaged: start afresh
        return record if isinstance(record, dict) else None

    async def get(self, key: str) -> dict | None:
        return self._decode(await self.client.get(key))

    async def update(self, key: str, fn, ttl_s: float) -> Any:
        ttl_ms = max(1, math.ceil(ttl_s * 1000))
        async with self.client.pipeline(transaction=True) as pipe:
            for _ in range(self.max_retries + 1):
                try:
                    await pipe.watch(key)
                    new, result = fn(self._decode(await pipe.get(key)))
                    if new is KEEP:
                        await pipe.unwatch()
                        return result
                    pipe.multi()
                    if new is None:
                        pipe.delete(key)
                    else:
                        pipe.set(key, json.dumps(new, separators=(",", ":")), px=ttl_ms)
                    await pipe.execute()
                    return result
                except self._watch_error:
                    continue  # another worker changed the key: read it again
                finally:
                    await pipe.reset()
        raise RuntimeError(f"redis key {key!r}: {self.max_retries + 1} conflicting updates in a row")

    async def aclose(self) -> None:
        if self._owned:
            close = getattr(self.client, "aclose", None) or self.client.close
            await close()
