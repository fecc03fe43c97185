"""A circuit breaker per backend model: stop calling a backend that keeps failing, let the
gateway's fallback chain answer at once, and test the backend again later with one request.

::

    models:
      - name: small
        base_url: http://127.0.0.1:9001/v1
        breaker: {failure_threshold: 5, open_s: 30}   # the defaults; `breaker: null` or
                                                        # `breaker: {enabled: false}` turns it off

States (the standard ones):

* **closed** -- calls go through; ``failure_threshold`` *consecutive* failures open it (a success
  resets the count).
* **open** -- for ``open_s`` seconds every call fails at once, without touching the backend, with
  :class:`CircuitOpen` (the backend client turns it into a retryable ``BackendError`` of kind
  ``"circuit_open"`` whose ``retry_after`` is the time left, so the gateway moves on to the next
  model of the chain, and when every model of the chain is open answers 503 with a
  ``Retry-After`` of the soonest of those times).
* **half-open** -- after ``open_s``, exactly ONE call (the probe) goes through; concurrent callers
  fail at once (``retry_after`` 1 s). The probe's success closes the breaker (and resets
  ``open_s``); its failure opens it again for twice as long as the last time, at most
  ``max_open_s`` (set ``max_open_s`` to ``open_s`` for a constant wait). A probe that neither
  succeeds nor fails (saturated, a 429 that does not count, a cancelled call) frees the probe slot
  and the next call probes; a probe lost with its process frees it after ``timeout_s`` + 5 s.

**Why consecutive failures, not a failure rate over a window.** The breaker's job here is to
detect a backend that is *down* (refusing connections, timing out, answering 5xx to everything)
so that the fallback answers without first waiting for a timeout. Consecutive failures detect that
after exactly N calls whatever the traffic, need one integer of state (cheap to share through
Redis, atomic to update), and behave deterministically (testable, explainable: "5 failures in a
row"). A rate over a window also opens on a *partly* failing backend, but needs a window length
and a minimum volume to tune, and opening on a 20 %-failing backend moves 100 % of its traffic to
a more expensive fallback, while the fallback chain already rescues the failing 20 % one by one.
A backend that alternates success and failure therefore stays closed, by design.

**What counts.** Failures: ``timeout``, ``connection``, ``server_error`` (5xx, 408, 409),
``bad_response`` (not a completion), ``misconfigured``, and any unknown kind. Successes: an answer,
or a 4xx refusal of the request itself (``client_error``: the backend is up; the request was
wrong). Neither (they leave the count alone): ``saturated`` (this gateway's own
``max_concurrency``, not the backend's health) and, by default, ``rate_limited`` (a 429 is
overload, not failure: the backend works, but for this key or at this moment it wants fewer
calls; the fallback already moves that request elsewhere and the backend's ``Retry-After`` is
honoured per request). Many gateways open on 429s too, which sheds load from an overloaded
backend for ``open_s``: set ``count_rate_limited: true`` for that.

Options (all optional): ``enabled`` (true), ``failure_threshold`` (5, an integer >= 1),
``open_s`` (30 s, > 0), ``max_open_s`` (300 s or ``open_s`` if larger: the cap of the doubling),
``count_rate_limited`` (false). The state lives in the process by default, or in Redis for every
worker when the top-level ``state: {redis_url: ...}`` is set (:mod:`.store`); if Redis cannot be
reached the breaker lets calls through (it never takes the gateway down) and logs a warning.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .store import (
    KEEP,
    BreakerStore,
    MemoryBreakerStore,
    RedisBreakerStore,
    StateConfig,
)

__all__ = ["CLOSED", "HALF_OPEN", "OPEN", "Breaker", "BreakerConfig", "CircuitOpen", "Ticket", "parse_breaker"]

logger = logging.getLogger("leanscale.cascade.gateway")

CLOSED, HALF_OPEN, OPEN = 0, 1, 2  # the values of the metrics gauge
_STATE_CODES = {"closed": CLOSED, "half_open": HALF_OPEN, "open": OPEN}
_BREAKER_KEYS = {"enabled", "failure_threshold", "open_s", "max_open_s", "count_rate_limited"}
_FAILURE_KINDS_NEUTRAL = {"saturated", "circuit_open"}
BUSY_RETRY_S = 1.0  # retry_after while a probe is in flight
PROBE_LEASE_EXTRA_S = 5.0  # a probe's slot is freed after timeout_s + this even if its result never comes


@dataclass(frozen=True)
class BreakerConfig:
    """A model's ``breaker`` section (see the module docstring). ``redis_url`` and ``key_prefix``
    come from the top-level ``state`` section."""

    failure_threshold: int = 5
    open_s: float = 30.0
    max_open_s: float = 300.0
    count_rate_limited: bool = False
    redis_url: str | None = None
    key_prefix: str = "leanscale:gateway:"

    def outcome(self, kind: str | None) -> str:
        """"success", "failure" or "neutral" for a call that ended with ``kind`` (None: an answer)."""
        if kind is None or kind == "client_error":
            return "success"
        if kind in _FAILURE_KINDS_NEUTRAL or (kind == "rate_limited" and not self.count_rate_limited):
            return "neutral"
        return "failure"


def parse_breaker(c, key: str, raw: Any, state: StateConfig | None = None) -> BreakerConfig | None:
    """Validate a model's ``breaker`` value with the config's checker ``c`` (its ``mapping``,
    ``number``, ``fail``): absent (pass ``{}``) gives the defaults, ``None`` or ``enabled: false``
    disables the breaker (None)."""
    if raw is None:
        return None
    m = c.mapping(key, raw, _BREAKER_KEYS)
    enabled = m.get("enabled", True)
    if not isinstance(enabled, bool):
        raise c.fail(f"{key}.enabled", "must be true or false", enabled)
    count_rl = m.get("count_rate_limited", False)
    if not isinstance(count_rl, bool):
        raise c.fail(f"{key}.count_rate_limited", "must be true or false", count_rl)
    threshold = int(c.number(f"{key}.failure_threshold", m.get("failure_threshold", 5), 1, integer=True))
    open_s = float(c.number(f"{key}.open_s", m.get("open_s", 30.0), 0, strict=True))
    max_open_s = float(c.number(f"{key}.max_open_s", m.get("max_open_s", max(300.0, open_s)), 0, strict=True))
    if max_open_s < open_s:
        raise c.fail(f"{key}.max_open_s", f"must be >= open_s ({open_s:g})", max_open_s)
    if max_open_s > 86400:
        raise c.fail(f"{key}.max_open_s", "must be at most 86400 (a day)", max_open_s)
    if not enabled:
        return None
    state = state or StateConfig()
    return BreakerConfig(failure_threshold=threshold, open_s=open_s, max_open_s=max_open_s,
                         count_rate_limited=count_rl, redis_url=state.redis_url, key_prefix=state.key_prefix)


class CircuitOpen(Exception):
    """The breaker refused the call: ``retry_after`` seconds until a call may go through."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.message, self.retry_after = message, retry_after


@dataclass(frozen=True)
class Ticket:
    """An admitted call; ``probe``: the token of the half-open probe (None for a normal call)."""

    probe: str | None = None


_NORMAL = Ticket()


# ------------------------------------------------------------------------- the transitions
# Records: {"state": "closed"|"open"|"half_open", "failures": int, "until": t (open: the end of the
# wait), "open_s": the last wait, "probe": token or None, "probe_until": t, "last_error": str}.
# No record = closed with no failures. The functions are pure (the Redis store may rerun them).

def _admit(rec: dict | None, now: float, lease_s: float, token: str):
    if rec is None or rec.get("state") == "closed":
        return KEEP, ("ok", None, rec)
    if rec.get("state") == "open" and now < rec.get("until", 0.0):
        return KEEP, ("open", rec["until"] - now, rec)
    if rec.get("state") == "half_open" and rec.get("probe") and now < rec.get("probe_until", 0.0):
        return KEEP, ("busy", BUSY_RETRY_S, rec)
    new = {**rec, "state": "half_open", "probe": token, "probe_until": now + lease_s}
    return new, ("probe", None, new)


def _record(rec: dict | None, now: float, cfg: BreakerConfig, probe: str | None, outcome: str, error: str):
    """-> (new record or KEEP or None, (the record after, whether the call opened the breaker))."""
    is_probe = probe is not None and rec is not None and rec.get("probe") == probe
    state = "closed" if rec is None else rec.get("state", "closed")
    if outcome == "neutral":
        if is_probe:
            new = {**rec, "probe": None, "probe_until": 0.0}
            return new, (new, False)
        return KEEP, (rec, False)
    if outcome == "success":
        if is_probe or (state == "closed" and rec is not None):
            return None, (None, False)  # closed, count and wait reset
        return KEEP, (rec, False)  # a late success of a call admitted before the breaker opened: ignored
    failures = (rec or {}).get("failures", 0) + 1
    if is_probe:
        open_s = min(cfg.max_open_s, 2 * float(rec.get("open_s", cfg.open_s)))
        new = {"state": "open", "failures": failures, "until": now + open_s, "open_s": open_s, "last_error": error}
        return new, (new, True)
    if state == "closed":
        if failures >= cfg.failure_threshold:
            new = {"state": "open", "failures": failures, "until": now + cfg.open_s, "open_s": cfg.open_s,
                   "last_error": error}
            return new, (new, True)
        new = {"state": "closed", "failures": failures, "last_error": error}
        return new, (new, False)
    return KEEP, (rec, False)  # already open / half-open: a late failure changes nothing


class Breaker:
    """The breaker of one backend. ``store``: where the state lives (default: a
    :class:`MemoryBreakerStore`; a :class:`RedisBreakerStore` when ``config.redis_url`` is set);
    ``clock``: the time source (default: the store's; inject one in tests); ``probe_lease_s``: how
    long a probe holds the half-open slot at most (the backend's ``timeout_s`` + 5 s).

    Use: ``ticket = await breaker.admit()`` (raises :class:`CircuitOpen`), make the call, then
    ``await breaker.record(ticket, kind)`` with ``kind`` None on success, else the
    ``BackendError.kind`` (``"cancelled"`` counts as neutral)."""

    def __init__(self, name: str, config: BreakerConfig, store: BreakerStore | None = None, *,
                 clock: Callable[[], float] | None = None, probe_lease_s: float = 35.0):
        if store is None:
            store = RedisBreakerStore(config.redis_url) if config.redis_url else MemoryBreakerStore()
        self.name, self.config, self.store = name, config, store
        self.clock = clock or store.clock
        self.probe_lease_s = probe_lease_s
        self.key = f"{config.key_prefix}breaker:{name}"
        self._ttl_floor_s = config.max_open_s + probe_lease_s + 60.0
        self._last: dict | None = None  # the last record seen (for breaker_state without a round trip)
        self._warned_at = -1e18

    def _ttl(self, rec: dict | None, now: float) -> float:
        until = max(rec.get("until", 0.0), rec.get("probe_until", 0.0)) if rec else 0.0
        return max(0.0, until - now) + self._ttl_floor_s

    def _store_failed(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._warned_at > 60:
            self._warned_at = now
            logger.warning("circuit breaker of %r: the state store failed (%s: %s); calls go through", self.name,
                           type(exc).__name__, exc)

    async def _apply(self, fn):
        """Run a transition: a plain read first (most calls change nothing), the atomic update
        only when the record would change."""
        rec = await self.store.get(self.key)
        new, result = fn(rec)
        if new is KEEP:
            return result
        return await self.store.update(self.key, fn, self._ttl(new, self.clock()))

    async def admit(self) -> Ticket:
        """Let a call through (a :class:`Ticket`) or raise :class:`CircuitOpen`."""
        token = secrets.token_hex(8)

        def fn(rec):
            return _admit(rec, self.clock(), self.probe_lease_s, token)

        try:
            verdict, wait, rec = await self._apply(fn)
        except Exception as exc:  # noqa: BLE001 -- a broken store must not stop the gateway
            self._store_failed(exc)
            return _NORMAL
        self._last = rec
        if verdict == "ok":
            return _NORMAL
        if verdict == "probe":
            logger.info("circuit breaker of %r: half-open, one probe request goes through", self.name)
            return Ticket(probe=token)
        why = f"{rec.get('failures', 0)} failures in a row, the last: {rec.get('last_error') or '?'}"
        if verdict == "busy":
            raise CircuitOpen(f"circuit half-open ({why}); a probe request is testing the backend, "
                              f"retry in about {wait:g} s", wait)
        raise CircuitOpen(f"circuit open ({why}); calls fail at once until the backend is retried in {wait:.1f} s",
                          wait)

    async def record(self, ticket: Ticket, kind: str | None, message: str = "") -> None:
        """Count the end of an admitted call: ``kind`` None (an answer) or its error kind."""
        outcome = "neutral" if kind == "cancelled" else self.config.outcome(kind)
        error = f"{kind}: {message}"[:200] if kind else ""

        def fn(rec):
            return _record(rec, self.clock(), self.config, ticket.probe, outcome, error)

        try:
            rec, opened = await self._apply(fn)
        except Exception as exc:  # noqa: BLE001
            self._store_failed(exc)
            return
        self._last = rec
        if opened:
            logger.warning("circuit breaker of %r: open for %.3g s after %d failures in a row (last: %s)", self.name,
                           rec["open_s"], rec["failures"], error)
        elif ticket.probe is not None and outcome == "success":
            logger.info("circuit breaker of %r: closed (the probe succeeded)", self.name)

    def state(self) -> int:
        """The state last seen by this process: 0 closed, 1 half-open, 2 open (an open breaker
        whose wait is over reads 1: the next call probes). Without a round trip to the store, so
        another worker's transition shows here after this process's next call."""
        rec = self._last
        if rec is None:
            return CLOSED
        code = _STATE_CODES.get(rec.get("state", "closed"), CLOSED)
        if code == OPEN and self.clock() >= rec.get("until", 0.0):
            return HALF_OPEN
        return code

    async def refresh(self) -> int:
        """Read the shared state from the store (e.g. before rendering metrics) and answer :meth:`state`."""
        try:
            self._last = await self.store.get(self.key)
        except Exception as exc:  # noqa: BLE001
            self._store_failed(exc)
        return self.state()

    async def aclose(self) -> None:
        await self.store.aclose()
