"""An async client per backend model: an ``httpx.AsyncClient`` with the model's timeout, at most
``max_concurrency`` requests in flight (beyond, the call fails at once as "saturated", so the
gateway can fall back rather than queue), the backend key as ``Authorization: Bearer`` and the
request's ``model`` replaced by the upstream name.

:meth:`Backend.request_json` answers the JSON body; :meth:`Backend.open_stream` answers a
:class:`BackendStream` once the first server-sent event has arrived (so that a failure before it
can still fall back). Failures raise :class:`BackendError`, which says whether another backend
could help (``retryable``: a connection error, a timeout, 5xx, 429, a bad answer, saturation) or
not (another 4xx: the request itself is wrong).

Each backend has a circuit breaker (:mod:`.breaker`, the model's ``breaker`` config; on by
default): after ``failure_threshold`` failures in a row the calls fail at once for ``open_s``
seconds with a retryable :class:`BackendError` of kind ``"circuit_open"`` (``retry_after``: the
seconds until the backend is tried again), so the gateway's fallback chain moves on without
waiting; then one probe call tests the backend. :meth:`Backend.breaker_state` answers 0 / 1 / 2
(closed / half-open / open) for the metrics.

**Connection pools.** The ``max_concurrency`` connections of a backend are split over several
``httpx.AsyncClient`` instances of at most :data:`POOL_SHARD_SIZE` connections each (a call takes
the first one with a free connection). httpcore's pool looks at every pooled connection -- and at
every idle one once per pooled connection, a poll() system call each -- whenever a request starts
or ends, so one pool of 128 keep-alive connections cost the gateway ~1.5 ms of CPU per request
under 64 clients; pools of 8 cost a few microseconds. The limit per backend is unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from leanscale.core.errors import MissingDependencyError

from .breaker import Breaker, CircuitOpen, Ticket
from .config import ModelConfig

__all__ = ["Backend", "BackendError", "BackendStream"]

_INSTALL = "pip install 'leanscale[gateway]'"
MAX_RESPONSE_BYTES = 32 << 20  # a non-streamed answer larger than this is refused
MAX_EVENT_BYTES = 4 << 20  # one server-sent event at most
POOL_SHARD_SIZE = 8  # connections per httpx client (the pool's work per request grows with its size)


def _require_httpx():
    try:
        import httpx
    except ImportError as exc:
        raise MissingDependencyError(
            f"the LLM gateway needs httpx (missing: {exc.name}). Install it with: {_INSTALL}") from exc
    return httpx


class BackendError(Exception):
    """A backend call failed. ``kind``: "timeout", "connection", "rate_limited", "saturated",
    "server_error", "bad_response", "circuit_open" (the backend's circuit breaker is open: not
    called; ``retry_after`` says when it will be tried again) (all ``retryable``) or
    "client_error" (the backend refused the request with a 4xx other than 429; ``status`` and
    ``body`` hold its answer)."""

    def __init__(self, model: str, kind: str, message: str, *, status: int | None = None,
                 body: Any = None, retry_after: float | None = None):
        super().__init__(message)
        self.model, self.kind, self.message = model, kind, message
        self.status, self.body, self.retry_after = status, body, retry_after

    @property
    def retryable(self) -> bool:
        return self.kind != "client_error"

    @property
    def overload(self) -> bool:
        """Retrying later helps: the backend is busy (429, saturated) or resting (circuit open);
        when every model of a chain failed this way the gateway answers 503 with ``Retry-After``."""
        return self.kind in ("rate_limited", "saturated", "circuit_open")


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP date: ignored
    return seconds if 0 <= seconds < 3600 else None


def _error_message(body: Any, text: str) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", ""))[:300]
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])[:300]
    return text[:300]


async def _bounded(awaitable, seconds: float):
    """``await awaitable`` within ``seconds`` (``TimeoutError`` after). In the calling task
    (``asyncio.timeout``, Python >= 3.11): ``asyncio.wait_for`` runs it as a second task, and a
    cancellation of the caller (a client that left a stream) could then wait for the backend's
    next event before it took effect."""
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)


class BackendStream:
    """An open streamed answer: ``first`` (the data of the first event, already received) and the
    rest through ``async for data in stream`` (each item the ``data:`` payload of one event,
    ``"[DONE]"`` included). Call :meth:`aclose` when done (it frees the concurrency slot)."""

    def __init__(self, model: str, first: str, events: AsyncIterator[str], close):
        self.model, self.first, self._events, self._close = model, first, events, close
        self._closed = False

    def __aiter__(self):
        return self._events

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(Exception):  # the generator failed already; the connection closes below
                await self._events.aclose()
            await self._close()


class Backend:
    """The client of one configured model (create it inside the event loop that uses it).
    ``breaker``: the circuit breaker to use (default: one built from ``config.breaker``, None when
    it is disabled; pass one with an injected clock or store in tests)."""

    def __init__(self, config: ModelConfig, *, transport=None, breaker: Breaker | None | object = ...):
        httpx = _require_httpx()
        self.config = config
        self.name = config.name
        headers = {"accept": "application/json"}
        key = config.api_key()
        if key is not None:
            headers["authorization"] = f"Bearer {key}"
        t = config.timeout_s
        n = config.max_concurrency
        # one client per POOL_SHARD_SIZE connections (see the module docstring); an injected
        # transport (tests) is one object that every client would close: one client then
        sizes = [n] if transport is not None else [min(POOL_SHARD_SIZE, n - i) for i in range(0, n, POOL_SHARD_SIZE)]
        # one TLS context for them all (httpx builds one per client otherwise: ~25 ms each, the CA bundle read)
        verify = httpx.create_ssl_context() if len(sizes) > 1 and hasattr(httpx, "create_ssl_context") else True
        self._clients = [httpx.AsyncClient(
            base_url=config.base_url + "/", headers=headers, transport=transport, follow_redirects=False,
            verify=verify, timeout=httpx.Timeout(t, connect=min(t, 10.0)),
            limits=httpx.Limits(max_connections=size, max_keepalive_connections=size))  # no reconnects under load
            for size in sizes]
        self._shard_size = sizes
        self._urls: dict[str, Any] = {}  # path -> absolute httpx.URL (merging with base_url costs per call)
        self._shard_busy = [0] * len(sizes)  # calls in flight on each client
        self.in_flight = 0  # calls holding one of the max_concurrency slots
        if breaker is ...:
            cfg = getattr(config, "breaker", None)
            breaker = None if cfg is None else Breaker(config.name, cfg, probe_lease_s=t + 5.0)
        self.breaker: Breaker | None = breaker

    async def aclose(self) -> None:
        try:
            for client in self._clients:
                with contextlib.suppress(Exception):
                    await client.aclose()
        finally:
            if self.breaker is not None:
                await self.breaker.aclose()

    def breaker_state(self) -> int:
        """0 closed (or no breaker), 1 half-open, 2 open: the gauge value for the metrics."""
        return 0 if self.breaker is None else self.breaker.state()

    async def _admit(self) -> Ticket | None:
        """Ask the breaker (None without one); an open circuit raises ``BackendError("circuit_open")``."""
        if self.breaker is None:
            return None
        try:
            return await self.breaker.admit()
        except CircuitOpen as exc:
            raise BackendError(self.name, "circuit_open", exc.message, retry_after=exc.retry_after) from None

    async def _record(self, ticket: Ticket | None, exc: BaseException | None) -> None:
        """Tell the breaker how an admitted call ended (never raises)."""
        if ticket is None or self.breaker is None:
            return
        if exc is None:
            kind, message = None, ""
        elif isinstance(exc, BackendError):
            kind, message = exc.kind, exc.message
        else:  # cancelled (the client went away) or an unexpected error: neither success nor failure
            kind, message = "cancelled", type(exc).__name__
        with contextlib.suppress(Exception):
            await self.breaker.record(ticket, kind, message)

    def _url(self, path: str):
        """The absolute URL of ``path`` under the backend's ``base_url`` (built once per path)."""
        url = self._urls.get(path)
        if url is None:
            if len(self._urls) >= 64:  # a handful of paths in practice; bounded all the same
                self._urls.clear()
            url = self._urls[path] = self._clients[0].build_request("POST", path.lstrip("/")).url
        return url

    def _body(self, body: dict) -> dict:
        return {**body, "model": self.config.model}

    def _acquire(self) -> int:
        """Take a slot: the index of the client (pool shard) to call with. A non-blocking
        semaphore (one event loop: no lock needed): all taken -> fail now, fall back."""
        if self.in_flight >= self.config.max_concurrency:
            raise BackendError(self.name, "saturated",
                               f"{self.config.max_concurrency} requests in flight (max_concurrency)")
        busy, sizes = self._shard_busy, self._shard_size
        shard = 0
        while busy[shard] >= sizes[shard]:  # the first one with a free connection: one exists, the
            shard += 1                      # sizes add up to max_concurrency > in_flight
        busy[shard] += 1
        self.in_flight += 1
        return shard

    def _release(self, shard: int) -> None:
        self._shard_busy[shard] -= 1
        self.in_flight -= 1

    def _wrap(self, exc: Exception) -> BackendError:
        httpx = _require_httpx()
        t = self.config.timeout_s
        if isinstance(exc, BackendError):
            return exc
        if isinstance(exc, (httpx.TimeoutException, asyncio.TimeoutError)):
            return BackendError(self.name, "timeout", f"no answer within {t:g} s (timeout_s)")
        if isinstance(exc, httpx.HTTPError):
            return BackendError(self.name, "connection", f"{type(exc).__name__}: {exc}"[:300])
        return BackendError(self.name, "bad_response", f"{type(exc).__name__}: {exc}"[:300])

    def _status_error(self, status: int, raw: bytes, headers) -> BackendError:
        text = raw.decode("utf-8", "replace")
        try:
            body = json.loads(text)
        except ValueError:
            body = None
        detail = _error_message(body, text)
        message = f"HTTP {status}" + (f": {detail}" if detail else "")
        if status == 429:
            return BackendError(self.name, "rate_limited", message, status=status, body=body,
                                retry_after=_retry_after(headers.get("retry-after")))
        if status >= 500 or status in (408, 409):
            return BackendError(self.name, "server_error", message, status=status, body=body)
        return BackendError(self.name, "client_error", message, status=status, body=body)

    async def request_json(self, path: str, body: dict) -> dict:
        """POST ``body`` (with the upstream model name) to ``path`` and answer the JSON object;
        the whole call is bounded by ``timeout_s``."""
        ticket = await self._admit()
        outcome: BaseException | None = asyncio.CancelledError()
        try:
            shard = self._acquire()
            try:
                out = await _bounded(self._request_json(self._clients[shard], path, body), self.config.timeout_s)
            except Exception as exc:  # noqa: BLE001 -- every failure becomes a BackendError (fall back)
                outcome = self._wrap(exc)
                raise outcome from None
            finally:
                self._release(shard)
        except BackendError as exc:  # saturated, or the call failed
            outcome = exc
            raise
        else:
            outcome = None
            return out
        finally:
            await self._record(ticket, outcome)

    async def _request_json(self, client, path: str, body: dict) -> dict:
        async with client.stream("POST", self._url(path), json=self._body(body)) as r:
            raw = bytearray()
            async for chunk in r.aiter_bytes():
                raw += chunk
                if len(raw) > MAX_RESPONSE_BYTES:
                    raise BackendError(self.name, "bad_response", f"answer over {MAX_RESPONSE_BYTES} bytes")
            if r.status_code != 200:
                raise self._status_error(r.status_code, bytes(raw), r.headers)
        try:
            out = json.loads(bytes(raw))
        except ValueError:
            raise BackendError(self.name, "bad_response", f"the answer is not JSON: {bytes(raw[:100])!r}") from None
        if not isinstance(out, dict) or not isinstance(out.get("choices"), list):
            raise BackendError(self.name, "bad_response", "the answer is not an OpenAI completion (no 'choices')")
        return out

    async def open_stream(self, path: str, body: dict) -> BackendStream:
        """POST a streaming request; answer once the status is 200 and the first event has
        arrived, both within ``timeout_s``. Later events each arrive within ``timeout_s`` of the
        previous one (else the iteration raises :class:`BackendError` "timeout"). For the circuit
        breaker the call succeeded once the first event arrived; a failure later in the stream
        counts as one more failure."""
        ticket = await self._admit()
        try:
            shard = self._acquire()
        except BackendError as exc:
            await self._record(ticket, exc)
            raise
        cm = self._clients[shard].stream("POST", self._url(path), json=self._body(body),
                                 headers={"accept": "text/event-stream"})
        response = None

        async def close() -> None:
            try:
                if response is not None:
                    with contextlib.suppress(Exception):  # closing a broken connection
                        await cm.__aexit__(None, None, None)
            finally:
                self._release(shard)

        async def start():
            nonlocal response
            response = await cm.__aenter__()
            if response.status_code != 200:
                raw = bytearray()
                async for chunk in response.aiter_bytes():
                    raw += chunk
                    if len(raw) > 65536:
                        break
                raise self._status_error(response.status_code, bytes(raw), response.headers)
            events = self._events(response)
            first = await events.__anext__()
            return events, first

        try:
            events, first = await _bounded(start(), self.config.timeout_s)
        except StopAsyncIteration:
            await close()
            error = BackendError(self.name, "bad_response", "the stream ended before its first event")
            await self._record(ticket, error)
            raise error from None
        except BaseException as exc:
            await close()
            error = self._wrap(exc) if isinstance(exc, Exception) else exc
            await self._record(ticket, error)
            if isinstance(exc, Exception):
                raise error from None
            raise
        await self._record(ticket, None)
        return BackendStream(self.name, first, self._guarded(events, ticket), close)

    async def _guarded(self, events: AsyncIterator[str], ticket: Ticket | None = None) -> AsyncIterator[str]:
        while True:
            try:
                data = await _bounded(events.__anext__(), self.config.timeout_s)
            except StopAsyncIteration:
                return
            except Exception as exc:  # noqa: BLE001 -- every failure becomes a BackendError
                error = self._wrap(exc)
                await self._record(ticket, error)
                raise error from None
            yield data

    async def _events(self, response) -> AsyncIterator[str]:
        """The ``data`` of each server-sent event (multi-line data joined by newlines)."""
        data: list[str] = []
        size = 0
        async for line in response.aiter_lines():
            if line == "":
                if data:
                    yield "\n".join(data)
                    data, size = [], 0
                continue
            if line.startswith(":"):
                continue  # a comment (keep-alive)
            name, _, value = line.partition(":")
            if name == "data":
                value = value.removeprefix(" ")
                size += len(value)
                if size > MAX_EVENT_BYTES:
                    raise BackendError(self.name, "bad_response", f"a stream event over {MAX_EVENT_BYTES} bytes")
                data.append(value)
        if data:
            yield "\n".join(data)
