"""An HTTP server for a fitted :class:`~leanscale.cascade.Cascade`: micro-batching, fallback,
bounded queue and connections, input limits, timeouts and Prometheus metrics
(``pip install 'leanscale[serve]'``).

::

    from leanscale.cascade.server import create_app, serve
    app = create_app(cascade, max_batch=64, max_wait_ms=2.0)   # a FastAPI app (uvicorn, TestClient...)
    serve("cascade.json", port=8000)                            # or: leanscale serve cascade.json

Endpoints:

* ``POST /v1/predict`` -- body ``{"text": "..."}`` or ``{"texts": ["...", ...]}``; answers
  ``{"predictions": [{"label", "stage", "confidence", "cost"}, ...]}`` in request order. ``stage``
  is the name of the stage that answered, or ``"fallback"`` (no stage was confident enough: the
  most confident answer seen, or the cascade's configured ``fallback_label``).
* ``GET /healthz`` -- 200 ``{"status": "ok", ...}`` while requests are answered in time; 503
  ``{"status": "stalled", ...}`` when the oldest request waiting (queued or being computed) has
  waited more than ``max_queue_age_s``, or when the batching worker is not running.
* ``GET /metrics`` -- Prometheus text format (``prometheus_client``, a registry per app).
* ``GET /openapi.json`` -- the API; ``GET /docs`` only with ``docs=True`` (Swagger UI loads its
  JavaScript from a CDN, so it is off by default).

The server never answers 200 without an answer: a text on which no stage gave any answer (every
stage failed, timed out or abstained) and the cascade has no ``fallback_label`` makes the request
answer 503 with a ``detail`` naming the stages that failed and why (``Retry-After`` when a stage
failed); with a ``fallback_label`` it is answered with that label, stage ``"fallback"``.

Micro-batching: the texts of all requests go into one bounded queue (``max_queue`` texts); a
single background worker takes up to ``max_batch`` of them, waiting at most ``max_wait_ms`` after
the first for more, and runs them through ``cascade.predict_detailed`` as one batch on a daemon
thread, so the event loop keeps accepting requests meanwhile. A stage that fails or times out is
handled by the cascade (the batch falls to the next stage; each stage with a timeout has its own
bounded threads, so a hung stage cannot starve the others); an unexpected failure of the whole
call answers the affected requests with 500 and the worker carries on. A request whose client
disconnects is dropped from the queue (never computed); one not answered within
``request_timeout_s`` is answered 504 and dropped too.

Limits (all answered with a JSON ``{"detail": message}``): a body over ``max_body_bytes`` -> 413
(checked on ``Content-Length`` and on the bytes actually received); a body not received within
``body_timeout_s`` -> 408; more than ``max_items_per_request`` texts or a text over
``max_text_chars`` characters -> 413; malformed JSON, wrong types, an empty list, both or neither
of ``text``/``texts`` -> 422; a full queue -> 503 at once. Connection limits (:func:`serve`,
:func:`server_config`): at most ``max_connections`` open connections (at the limit the oldest
idle one is closed to make room; with none idle the new one gets 503 and is closed), a connection
must send a complete request head within ``timeout_idle`` seconds (a slow or silent client is
disconnected), idle keep-alive connections close after ``timeout_keep_alive``, request heads over
``max_header_bytes`` are refused, and SIGTERM stops accepting, lets the requests in flight finish
(up to ``timeout_graceful_shutdown``) and exits with status 0.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the annotations of the endpoint
# functions defined inside create_app, whose request model is built there at run time.

import asyncio
import collections
import contextlib
import ipaddress
import json
import logging
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from leanscale.core.errors import InvalidParameterError, MissingDependencyError
from leanscale.core.validation import Interval, check_param

__all__ = ["LATENCY_BUCKETS", "create_app", "serve", "server_config"]

logger = logging.getLogger("leanscale.cascade.server")

PREDICT_PATH = "/v1/predict"
# Seconds; the upper bounds of the latency histogram (+Inf is added).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
REJECT_REASONS = ("queue_full", "too_large", "bad_request", "slow_body", "shutting_down")
CLOSE_REASONS = ("idle", "evicted", "refused")
_INSTALL = "pip install 'leanscale[serve]'"
_METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _require_fastapi():
    try:
        import fastapi
        import pydantic
    except ImportError as exc:
        raise MissingDependencyError(
            f"leanscale.cascade.server needs FastAPI (missing: {exc.name}). Install it with: {_INSTALL}"
        ) from exc
    return fastapi, pydantic


def _require_uvicorn():
    try:
        import uvicorn
    except ImportError as exc:
        raise MissingDependencyError(
            f"serving a cascade needs uvicorn (missing: {exc.name}). Install it with: {_INSTALL}"
        ) from exc
    return uvicorn


def _require_prometheus():
    try:
        import prometheus_client
    except ImportError as exc:
        raise MissingDependencyError(
            f"the cascade server's metrics need prometheus_client (missing: {exc.name}). Install it with: {_INSTALL}"
        ) from exc
    return prometheus_client


# ------------------------------------------------------------------------------------- metrics
class _Metrics:
    """The Prometheus metrics of one app, in a registry of its own (not the global one)."""

    def __init__(self, stage_names: list[str], fallback: str):
        pc = _require_prometheus()
        self._pc = pc
        self.registry = r = pc.CollectorRegistry(auto_describe=True)
        C, G = pc.Counter, pc.Gauge
        self.requests = C("leanscale_requests", "POST /v1/predict requests received (any outcome).", registry=r)
        self.predictions = C("leanscale_predictions", "Texts answered with a prediction (HTTP 200).", registry=r)
        self.answers = C("leanscale_stage_answers",
                         "Predictions per answering stage ('fallback': no stage was confident enough).",
                         ["stage"], registry=r)
        self.errors = C("leanscale_stage_errors",
                        "Texts a stage failed on (raised, timed out, saturated or answered badly); they fell to "
                        "the next stage.", ["stage"], registry=r)
        self.unanswered = C("leanscale_unanswered",
                            "Texts no stage gave an answer for (their request was answered 503), by reason.",
                            ["reason"], registry=r)
        self.cost = C("leanscale_cost", "Sum of the cascade cost paid for every prediction.", registry=r)
        self.rejected = C("leanscale_rejected", "Requests refused before computing, by reason.", ["reason"],
                          registry=r)
        self.internal_errors = C("leanscale_internal_errors",
                                 "Requests answered 500 because the cascade call itself failed unexpectedly.",
                                 registry=r)
        self.timed_out = C("leanscale_timed_out", "Requests answered 504: not answered within request_timeout_s.",
                           registry=r)
        self.abandoned = C("leanscale_abandoned", "Requests whose client disconnected before the answer.",
                           registry=r)
        self.skipped = C("leanscale_skipped_texts",
                         "Texts dropped from the queue without being computed (client gone or timed out).",
                         registry=r)
        self.batches = C("leanscale_batches", "Calls of cascade.predict_detailed (micro-batches).", registry=r)
        self.closed = C("leanscale_connections_closed",
                        "Connections the server closed: idle (no complete request head within timeout_idle), "
                        "evicted (oldest idle one, to make room at max_connections), refused (at max_connections, "
                        "none idle).", ["reason"], registry=r)
        self.queue_depth = G("leanscale_queue_depth", "Texts waiting in the micro-batching queue.", registry=r)
        self.oldest_wait = G("leanscale_oldest_wait_seconds",
                             "Age of the oldest request not yet answered (queued or being computed); 0 when none.",
                             registry=r)
        self.connections = G("leanscale_open_connections", "Open HTTP connections (when served by serve()).",
                             registry=r)
        self.latency = pc.Histogram("leanscale_request_latency_seconds",
                                    "Wall time of POST /v1/predict requests in the server, any outcome.",
                                    buckets=LATENCY_BUCKETS, registry=r)
        for name in [*stage_names, fallback]:  # every series present from the start, at 0
            self.answers.labels(stage=name)
        for name in stage_names:
            self.errors.labels(stage=name)
        for reason in ("stage_failed", "abstained"):
            self.unanswered.labels(reason=reason)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason=reason)
        for reason in CLOSE_REASONS:
            self.closed.labels(reason=reason)

    def render(self) -> bytes:
        return self._pc.generate_latest(self.registry)


def _json_label(value: Any) -> Any:
    """A label as JSON: numpy scalars to Python, non-finite floats to strings, other objects to str."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return [_json_label(v) for v in value]
    return str(value)


# ---------------------------------------------------------------------------------- batching
class _NoAnswer:
    """A text no stage gave an answer for: the stages that failed on it and their messages."""

    __slots__ = ("failed",)

    def __init__(self, failed: dict[str, str]):
        self.failed = failed


class _Job:
    """The texts of one request, the future its handler awaits and when it was queued."""

    __slots__ = ("future", "remaining", "results", "t0", "texts")

    def __init__(self, texts: list[str], future: asyncio.Future, t0: float):
        self.texts, self.future, self.t0 = texts, future, t0
        self.results: list[Any] = [None] * len(texts)
        self.remaining = len(texts)


class QueueFullError(Exception):
    """The queue cannot take the request's texts (answered 503)."""


class ShuttingDownError(Exception):
    """The server stopped before the request was answered (answered 503)."""


def _in_daemon_thread(fn, *args) -> asyncio.Future:
    """Run ``fn(*args)`` on a new daemon thread; an awaitable for its result. Not the loop's default
    executor: a batch stuck in a stage without a timeout must not keep the process from exiting."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def deliver(ok: bool, value) -> None:
        if not future.done():
            (future.set_result if ok else future.set_exception)(value)

    def run() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:
            ok, value = False, exc
        else:
            ok, value = True, result
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits any more
            loop.call_soon_threadsafe(deliver, ok, value)

    threading.Thread(target=run, name="leanscale-batch", daemon=True).start()
    return future


class _Batcher:
    """A bounded queue of (job, index) items and the one worker that empties it in batches."""

    def __init__(self, cascade, metrics: _Metrics, fallback: str, max_batch: int, max_wait_s: float,
                 max_queue: int):
        self.cascade, self.metrics, self.fallback = cascade, metrics, fallback
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self.items: collections.deque = collections.deque()
        self.event: asyncio.Event | None = None
        self.task: asyncio.Task | None = None
        self.stopping = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.in_flight_since: float | None = None  # t0 of the oldest job in the batch being computed

    @property
    def depth(self) -> int:
        return len(self.items)

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    def oldest_wait(self) -> float:
        """Seconds the oldest request not yet answered (queued or being computed) has waited."""
        if self.loop is None:
            return 0.0
        starts = [t for t in (self.in_flight_since, self.items[0][0].t0 if self.items else None) if t is not None]
        return max(0.0, self.loop.time() - min(starts)) if starts else 0.0

    def start(self) -> None:
        self.stopping = False
        self.loop = asyncio.get_running_loop()
        self.event = asyncio.Event()
        self.task = self.loop.create_task(self._run(), name="leanscale-batcher")

    async def stop(self) -> None:
        self.stopping = True
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.task = None
        while self.items:  # answer whatever is still queued rather than leaving it hanging
            job, _ = self.items.popleft()
            if not job.future.done():
                job.future.set_exception(ShuttingDownError("the server is shutting down"))

    def submit(self, texts: list[str]) -> _Job:
        """Queue all texts of one request or none of them (QueueFullError)."""
        if self.stopping or self.event is None:
            raise ShuttingDownError("the server is not running (no batching worker)")
        if not self.running:  # the worker never dies on an exception, but restart it if it ever did
            logger.error("the batching worker had stopped; restarting it")
            self.start()
        if len(self.items) + len(texts) > self.max_queue:
            raise QueueFullError(
                f"the queue is full ({len(self.items)} of {self.max_queue} texts waiting; this request has "
                f"{len(texts)}); retry later")
        loop = asyncio.get_running_loop()
        job = _Job(texts, loop.create_future(), loop.time())
        self.items.extend((job, i) for i in range(len(texts)))
        self.event.set()
        return job

    def abandon(self, job: _Job) -> int:
        """Cancel ``job`` and drop its queued texts (they are never computed); how many were dropped."""
        if not job.future.done():
            job.future.cancel()
        before = len(self.items)
        if any(j is job for j, _ in self.items):
            self.items = collections.deque(item for item in self.items if item[0] is not job)
        return before - len(self.items)

    async def _take_batch(self) -> list:
        while not self.items:
            self.event.clear()
            await self.event.wait()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while len(self.items) < self.max_batch:
            left = deadline - loop.time()
            if left <= 0:
                break
            self.event.clear()
            try:
                await asyncio.wait_for(self.event.wait(), left)
            except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                break
        n = min(self.max_batch, len(self.items))
        return [self.items.popleft() for _ in range(n)]

    async def _run(self) -> None:
        while True:
            batch: list = []
            try:
                batch = await self._take_batch()
                batch = [(job, i) for job, i in batch if not job.future.done()]  # skip abandoned requests
                if batch:
                    self.in_flight_since = min(job.t0 for job, _ in batch)
                    try:
                        await self._process(batch)
                    finally:
                        self.in_flight_since = None
            except asyncio.CancelledError:
                for job, _ in batch:
                    if not job.future.done():
                        job.future.set_exception(ShuttingDownError("the server is shutting down"))
                raise
            except Exception as exc:  # never let the worker die; answer the batch with the error
                logger.exception("micro-batch of %d texts failed", len(batch))
                for job, _ in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)

    async def _process(self, batch: list) -> None:
        texts = [job.texts[i] for job, i in batch]
        out = await _in_daemon_thread(self.cascade.predict_detailed, texts)
        n = len(texts)
        labels, stage, confidence, cost = (list(a) for a in (out.labels, out.stage, out.confidence, out.cost))
        if not (len(labels) == len(stage) == len(confidence) == len(cost) == n):
            raise RuntimeError(
                f"cascade.predict_detailed answered {len(labels)} labels, {len(stage)} stages, "
                f"{len(confidence)} confidences and {len(cost)} costs for {n} texts")
        answered = getattr(out, "answered", None)
        failed = getattr(out, "failed", None)
        reasons = getattr(out, "reasons", None) or {}
        fallback_label = getattr(self.cascade, "fallback_label", None)
        preds: list[Any] = []
        for k in range(n):
            no_answer = labels[k] is None or (answered is not None and not answered[k] and fallback_label is None)
            if no_answer:  # never sent as a 200: the handler answers 503 with the reasons
                names = tuple(failed[k]) if failed is not None else ()
                preds.append(_NoAnswer({str(s): str(reasons.get(s, "failed")) for s in names}))
                continue
            preds.append({"label": _json_label(labels[k]), "stage": str(stage[k]),
                          "confidence": float(confidence[k]), "cost": float(cost[k])})
        m = self.metrics
        m.batches.inc()
        for name, count in (getattr(out, "errors", None) or {}).items():
            m.errors.labels(stage=str(name)).inc(int(count))
        for (job, i), p in zip(batch, preds):
            if job.future.done():
                continue
            job.results[i] = p
            job.remaining -= 1
            if job.remaining == 0:
                job.future.set_result(job.results)


# ---------------------------------------------------------------------------- body size guard
class _BodyTimeout(Exception):
    pass


class _BodyGuard:
    """ASGI middleware: refuses bodies over ``max_body_bytes`` (declared or actual) with 413 and
    bodies that do not arrive within ``body_timeout_s`` with 408, and counts every POST
    /v1/predict request and its latency, whatever the outcome."""

    def __init__(self, app, metrics: _Metrics, max_body_bytes: int, body_timeout_s: float):
        self.app, self.metrics, self.max_body_bytes = app, metrics, max_body_bytes
        self.body_timeout_s = body_timeout_s
        self._drain_limit = max(4 * max_body_bytes, 8 << 20)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        counted = scope.get("path") == PREDICT_PATH and scope.get("method") == "POST"
        t0 = time.perf_counter()
        try:
            await self._guarded(scope, receive, send)
        finally:
            if counted:
                self.metrics.requests.inc()
                self.metrics.latency.observe(time.perf_counter() - t0)

    async def _receive(self, receive, deadline: float):
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise _BodyTimeout
        try:
            return await asyncio.wait_for(receive(), left)
        except asyncio.TimeoutError:
            raise _BodyTimeout from None

    async def _reject(self, send, status: int, reason: str, message: str, receive=None, more: bool = False,
                      deadline: float = 0.0) -> None:
        self.metrics.rejected.labels(reason=reason).inc()
        drained = 0
        with contextlib.suppress(_BodyTimeout):
            while receive is not None and more and drained <= self._drain_limit:
                # read (and drop) the rest of a moderately oversized body, so that the client, which is
                # usually still sending, sees the answer rather than a reset connection
                message_ = await self._receive(receive, deadline)
                if message_["type"] != "http.request":
                    break
                drained += len(message_.get("body", b""))
                more = message_.get("more_body", False)
        body = json.dumps({"detail": message}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def _guarded(self, scope, receive, send):
        limit = self.max_body_bytes
        deadline = asyncio.get_running_loop().time() + self.body_timeout_s
        declared = None
        for key, value in scope.get("headers", ()):
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    return await self._reject(send, 400, "bad_request",
                                              f"the Content-Length header must be an integer; got {value[:40]!r}")
        if declared is not None and declared > limit:
            return await self._reject(send, 413, "too_large",
                                      f"the request body is {declared} bytes; at most {limit} are accepted",
                                      receive, more=declared <= self._drain_limit, deadline=deadline)
        chunks, size, more = [], 0, True
        while more:
            try:
                message = await self._receive(receive, deadline)
            except _BodyTimeout:
                return await self._reject(send, 408, "slow_body",
                                          f"the request body did not arrive within {self.body_timeout_s:g} s "
                                          "(body_timeout_s)")
            if message["type"] != "http.request":  # the client went away
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await self._reject(send, 413, "too_large",
                                          f"the request body is over {limit} bytes; at most {limit} are accepted",
                                          receive, more=message.get("more_body", False), deadline=deadline)
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: blocks until the client disconnects

        await self.app(scope, replay, send)


async def _wait_disconnect(receive) -> None:
    """Return when the client has disconnected (the body has been read already)."""
    while True:
        message = await receive()
        if message.get("type") == "http.disconnect":
            return


# --------------------------------------------------------------------------------------- app
def _check_cascade(cascade) -> list[str]:
    if not callable(getattr(cascade, "predict_detailed", None)):
        raise InvalidParameterError(
            "The 'cascade' parameter of create_app must be a fitted leanscale.cascade.Cascade (something with "
            f"predict_detailed). Got {type(cascade).__name__} instead.")
    from leanscale.cascade.cascade import Cascade
    from leanscale.core.validation import check_is_fitted

    if isinstance(cascade, Cascade):
        check_is_fitted(cascade, ["thresholds_"])
    return [str(s.name) for s in getattr(cascade, "stages", [])]


def _no_answer_detail(unanswered: list[tuple[int, "_NoAnswer"]], n: int, fallback: str) -> tuple[str, dict]:
    failed: dict[str, str] = {}
    for _, na in unanswered:
        failed.update(na.failed)
    which = ", ".join(str(i) for i, _ in unanswered[:20]) + (" ..." if len(unanswered) > 20 else "")
    head = f"no stage could answer {len(unanswered)} of the {n} texts of this request (index {which})"
    if failed:
        why = "; ".join(f"stage {name!r} failed: {msg}" for name, msg in failed.items())
        detail = (f"{head}: {why}; no other stage gave an answer. Retry later, or give the cascade a "
                  "fallback_label.")
    else:
        detail = (f"{head}: every stage abstained and the cascade has no fallback_label (the {fallback!r} "
                  "answer would be null). Give the cascade a fallback_label to answer such texts.")
    return detail, failed


def create_app(cascade, *, max_batch: int = 64, max_wait_ms: float = 2.0, max_queue: int = 1024,
               max_items_per_request: int = 256, max_text_chars: int = 10_000, max_body_bytes: int = 1_000_000,
               request_timeout_s: float = 30.0, body_timeout_s: float = 10.0, max_queue_age_s: float = 10.0,
               docs: bool = False):
    """A FastAPI app serving ``cascade`` (see the module docstring). The batching worker starts
    with the app's lifespan (uvicorn, or ``with TestClient(app)``).

    ``request_timeout_s``: a request not answered in this time gets 504 (its texts are dropped
    from the queue). ``body_timeout_s``: the whole body must arrive in this time (else 408).
    ``max_queue_age_s``: ``/healthz`` answers 503 once a request has waited longer than this.
    ``docs``: serve ``/docs`` (Swagger UI; the browser loads it from a CDN). ``/openapi.json`` is
    always served."""
    fastapi, _ = _require_fastapi()
    _require_prometheus()
    from typing import Annotated

    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from pydantic import (
        BaseModel,
        ConfigDict,
        Field,
        StringConstraints,
        model_validator,
    )

    from leanscale.cascade.cascade import FALLBACK

    owner = "create_app"
    max_batch = int(check_param("max_batch", max_batch, [Interval(int, 1, None)], owner))
    max_wait_ms = float(check_param("max_wait_ms", max_wait_ms, [Interval("real", 0, None, closed="left")], owner))
    max_queue = int(check_param("max_queue", max_queue, [Interval(int, 1, None)], owner))
    max_items = int(check_param("max_items_per_request", max_items_per_request, [Interval(int, 1, None)], owner))
    max_chars = int(check_param("max_text_chars", max_text_chars, [Interval(int, 1, None)], owner))
    max_body = int(check_param("max_body_bytes", max_body_bytes, [Interval(int, 1, None)], owner))
    positive = [Interval("real", 0, None, closed="neither")]
    request_timeout_s = float(check_param("request_timeout_s", request_timeout_s, positive, owner))
    body_timeout_s = float(check_param("body_timeout_s", body_timeout_s, positive, owner))
    max_queue_age_s = float(check_param("max_queue_age_s", max_queue_age_s, positive, owner))
    docs = check_param("docs", docs, [bool], owner)
    stage_names = _check_cascade(cascade)

    Text = Annotated[str, StringConstraints(max_length=max_chars)]

    class PredictRequest(BaseModel):
        """One text (``text``) or a list of texts (``texts``); give exactly one of the two."""

        model_config = ConfigDict(extra="forbid", json_schema_extra={
            "examples": [{"text": "my card was charged twice"}, {"texts": ["reset my password", "refund please"]}]})
        text: Text | None = Field(None, description=f"one request (at most {max_chars} characters)")
        texts: list[Text] | None = Field(
            None, min_length=1, max_length=max_items,
            description=f"a batch of 1 to {max_items} requests (each at most {max_chars} characters)")

        @model_validator(mode="after")
        def _exactly_one(self):
            if (self.text is None) == (self.texts is None):
                raise ValueError("give exactly one of 'text' (a string) or 'texts' (a list of strings)")
            return self

    class Prediction(BaseModel):
        label: Any = Field(description="the predicted label (JSON: string, number or boolean; never null)")
        stage: str = Field(description=f"the stage that answered, or {FALLBACK!r} when none was confident enough")
        confidence: float = Field(description="the answering stage's confidence in [0, 1]")
        cost: float = Field(description="the cost paid for this request (sum over the stages it went through)")

    class PredictResponse(BaseModel):
        predictions: list[Prediction] = Field(description="one per input text, in order")

    class ErrorResponse(BaseModel):
        detail: str = Field(description="what went wrong")
        errors: list[dict[str, Any]] | None = Field(
            None, description="for 413/422 from validation: the first validation errors (loc, msg, type)")
        unanswered: list[int] | None = Field(
            None, description="for 503 'no stage could answer': the indices of the texts without an answer")
        failed_stages: dict[str, str] | None = Field(
            None, description="for 503 'no stage could answer': stage -> why it failed")

    class HealthResponse(BaseModel):
        status: str = Field(description="'ok', or 'stalled' / 'stopped' (with HTTP 503)")
        stages: list[str]
        queue_depth: int = Field(description="texts waiting in the queue")
        oldest_wait_s: float = Field(description="seconds the oldest unanswered request has waited")
        max_queue_age_s: float
        detail: str | None = None

    metrics = _Metrics(stage_names, FALLBACK)
    batcher = _Batcher(cascade, metrics, FALLBACK, max_batch, max_wait_ms / 1000.0, max_queue)
    metrics.queue_depth.set_function(lambda: batcher.depth)
    metrics.oldest_wait.set_function(batcher.oldest_wait)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = fastapi.FastAPI(
        title="leanscale cascade",
        description="Answers with the cheapest confident stage of a leanscale cascade; micro-batched, with "
                    "fallback when a stage fails, and Prometheus metrics at /metrics.",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url=None,
    )
    app.state.metrics, app.state.batcher = metrics, batcher
    app.add_middleware(_BodyGuard, metrics=metrics, max_body_bytes=max_body, body_timeout_s=body_timeout_s)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        too_large = any(e.get("type") in ("string_too_long", "too_long") for e in errors)
        reason, status = ("too_large", 413) if too_large else ("bad_request", 422)
        metrics.rejected.labels(reason=reason).inc()
        parts = []
        for e in errors[:5]:
            if e.get("type") == "json_invalid":
                error = (e.get("ctx") or {}).get("error", "")
                parts.append(f"the body is not valid JSON ({error})" if error else "the body is not valid JSON")
                continue
            not_an_object = e.get("type") in ("model_attributes_type", "model_type", "dict_type")
            if not_an_object and tuple(e.get("loc", ())) == ("body",):
                parts.append("the body must be a JSON object, {\"text\": \"...\"} or {\"texts\": [\"...\", ...]}, "
                             "sent with Content-Type: application/json")
                continue
            loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
            parts.append(f"{loc}: {e.get('msg', 'invalid')}")
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        detail = "invalid request: " + "; ".join(parts) + more
        return JSONResponse(status_code=status, content={
            "detail": detail,
            "errors": [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")),
                        "type": str(e.get("type", ""))} for e in errors[:20]]})

    error_responses = {
        408: {"model": ErrorResponse, "description": "the body did not arrive within body_timeout_s"},
        413: {"model": ErrorResponse, "description": "body, number of texts or a text over the limits"},
        422: {"model": ErrorResponse, "description": "malformed JSON, wrong types, empty list"},
        500: {"model": ErrorResponse, "description": "the cascade call failed unexpectedly"},
        503: {"model": ErrorResponse, "description": "the queue is full, the server is stopping, or no stage "
                                                     "could answer a text (detail and failed_stages say why)"},
        504: {"model": ErrorResponse, "description": "not answered within request_timeout_s"},
    }

    @app.post(PREDICT_PATH, response_model=PredictResponse, responses=error_responses,
              summary="Predict labels for one text or a batch of texts")
    async def predict(request: Request, body: PredictRequest):
        texts = [body.text] if body.texts is None else list(body.texts)
        if len(texts) > max_queue:  # could never fit, however empty the queue
            metrics.rejected.labels(reason="too_large").inc()
            return JSONResponse(status_code=413, content={
                "detail": f"this request has {len(texts)} texts; the queue holds at most {max_queue} (max_queue)"})
        try:
            job = batcher.submit(texts)
        except QueueFullError as exc:
            metrics.rejected.labels(reason="queue_full").inc()
            return JSONResponse(status_code=503, content={"detail": str(exc)}, headers={"Retry-After": "1"})
        except ShuttingDownError as exc:
            metrics.rejected.labels(reason="shutting_down").inc()
            return JSONResponse(status_code=503, content={"detail": str(exc)})
        gone = asyncio.ensure_future(_wait_disconnect(request.receive))
        try:
            done, _ = await asyncio.wait({job.future, gone}, timeout=request_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not job.future.done():  # the client went away, or the answer is late: drop the texts
            metrics.skipped.inc(batcher.abandon(job))
            if gone in done:
                metrics.abandoned.inc()
                return Response(status_code=499)  # nobody reads it
            metrics.timed_out.inc()
            return JSONResponse(status_code=504, content={
                "detail": f"not answered within {request_timeout_s:g} s (request_timeout_s); the cascade is slow or "
                          "stuck -- see /healthz and /metrics"})
        try:
            preds = job.future.result()
        except ShuttingDownError as exc:
            metrics.rejected.labels(reason="shutting_down").inc()
            return JSONResponse(status_code=503, content={"detail": str(exc)})
        except Exception as exc:
            metrics.internal_errors.inc()
            return JSONResponse(status_code=500, content={
                "detail": f"the cascade failed on this request: {type(exc).__name__}: {exc}"})
        unanswered = [(i, p) for i, p in enumerate(preds) if isinstance(p, _NoAnswer)]
        if unanswered:
            detail, failed = _no_answer_detail(unanswered, len(preds), FALLBACK)
            for _, p in unanswered:
                metrics.unanswered.labels(reason="stage_failed" if p.failed else "abstained").inc()
            return JSONResponse(
                status_code=503, headers={"Retry-After": "1"} if failed else None,
                content={"detail": detail, "unanswered": [i for i, _ in unanswered], "failed_stages": failed})
        metrics.predictions.inc(len(preds))
        for p in preds:
            metrics.answers.labels(stage=p["stage"]).inc()
            metrics.cost.inc(p["cost"])
        return {"predictions": preds}

    @app.get("/healthz", response_model=HealthResponse, summary="Health: 503 when stalled",
             responses={503: {"model": HealthResponse, "description": "stalled or stopped"}})
    async def healthz():
        wait = batcher.oldest_wait()
        body = {"status": "ok", "stages": stage_names, "queue_depth": batcher.depth,
                "oldest_wait_s": round(wait, 3), "max_queue_age_s": max_queue_age_s}
        if not batcher.running:
            body.update(status="stopped", detail="the batching worker is not running")
            return JSONResponse(status_code=503, content=body)
        if wait > max_queue_age_s:
            body.update(status="stalled", detail=(
                f"the oldest request has waited {wait:.1f} s, over max_queue_age_s={max_queue_age_s:g}; "
                f"{batcher.depth} texts queued"))
            return JSONResponse(status_code=503, content=body)
        return body

    @app.get("/metrics", summary="Prometheus metrics (text format 0.0.4)",
             responses={200: {"content": {"text/plain": {}}}})
    async def prometheus():
        return Response(metrics.render(), media_type=_METRICS_CONTENT_TYPE)

    return app


# ------------------------------------------------------------------------------- connections
def _protocol_class(max_connections: int, timeout_idle: float, metrics: "_Metrics | None"):
    """uvicorn's h11 protocol with a cap on open connections and a deadline for the request head.

    uvicorn closes a keep-alive connection ``timeout_keep_alive`` after a response, but holds a
    connection that never sends (or trickles) a request head forever, and ``limit_concurrency``
    answers 503 to *every* request while idle sockets fill it. Here: a connection must send a
    complete request head within ``timeout_idle`` seconds of opening (or of its last response);
    at ``max_connections`` the connection idle the longest is closed to make room, and only when
    every connection has a request in flight is the new one answered 503 and closed."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    state = {"last_warning": -math.inf}
    # connections by the time they became idle (oldest first); entries whose request has started
    # since are skipped lazily and come back when their answer is sent: O(1) per eviction
    idle_order: collections.OrderedDict = collections.OrderedDict()

    def warn(message: str) -> None:  # at most one line a minute, whatever the flood
        now = time.monotonic()
        if now - state["last_warning"] >= 60:
            state["last_warning"] = now
            logger.warning(message)

    def count(reason: str) -> None:
        if metrics is not None:
            metrics.closed.labels(reason=reason).inc()

    class LimitedH11Protocol(H11Protocol):
        _leanscale_idle_since = 0.0
        _leanscale_timer = None

        def _leanscale_waiting(self) -> bool:
            """No request in flight: waiting for (the rest of) a request head."""
            cycle = self.cycle
            return (cycle is None or cycle.response_complete) and not self.transport.is_closing()

        def _leanscale_arm(self) -> None:
            if self._leanscale_timer is not None:
                self._leanscale_timer.cancel()
            self._leanscale_idle_since = self.loop.time()
            self._leanscale_timer = self.loop.call_later(timeout_idle, self._leanscale_idle_check)
            idle_order[self] = None
            idle_order.move_to_end(self)

        def _leanscale_idle_check(self) -> None:
            self._leanscale_timer = None
            if self._leanscale_waiting():
                count("idle")
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._leanscale_arm()
            if metrics is not None:
                metrics.connections.set(len(self.connections))
            if len(self.connections) <= max_connections:
                return
            victim = None
            while idle_order:
                candidate, _ = idle_order.popitem(last=False)
                if candidate is self:  # the newest: nothing older is idle
                    idle_order[self] = None
                    break
                if candidate._leanscale_waiting():
                    victim = candidate
                    break
            if victim is not None:
                count("evicted")
                victim.transport.close()
                warn(f"{max_connections} connections open (max_connections): closing the longest idle ones to "
                     "make room")
                return
            count("refused")
            warn(f"{max_connections} connections open (max_connections), all busy: refusing new connections")
            body = b'{"detail": "too many connections (max_connections); retry later"}'
            transport.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                            b"retry-after: 1\r\nconnection: close\r\ncontent-length: "
                            + str(len(body)).encode() + b"\r\n\r\n" + body)
            transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._leanscale_arm()

        def connection_lost(self, exc) -> None:
            idle_order.pop(self, None)
            if self._leanscale_timer is not None:
                self._leanscale_timer.cancel()
                self._leanscale_timer = None
            super().connection_lost(exc)
            if metrics is not None:
                metrics.connections.set(len(self.connections))

    return LimitedH11Protocol


def _raise_open_files_limit(needed: int) -> int:
    """Raise the soft limit on open files towards ``needed`` (up to the hard limit); the limit."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return needed
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return needed if soft == resource.RLIM_INFINITY else int(soft)


_FD_RESERVE = 128  # files the process needs besides connections (listening socket, logs, models, ...)


def server_config(app, host: str = "127.0.0.1", port: int = 8000, *, max_connections: int = 1000,
                  timeout_keep_alive: float = 5.0, timeout_idle: float = 10.0,
                  timeout_graceful_shutdown: float = 30.0, backlog: int = 1024, max_header_bytes: int = 16_384,
                  log_level: str = "info", access_log: bool = False):
    """The ``uvicorn.Config`` :func:`serve` runs ``app`` with: the connection limits and timeouts
    of the module docstring. ``max_connections`` is lowered (with a warning) when the process may
    not open that many files."""
    uvicorn = _require_uvicorn()
    owner = "serve"
    port = int(check_param("port", port, [Interval(int, 0, 65535)], owner))
    max_connections = int(check_param("max_connections", max_connections, [Interval(int, 1, None)], owner))
    positive = [Interval("real", 0, None, closed="neither")]
    timeout_keep_alive = float(check_param("timeout_keep_alive", timeout_keep_alive, positive, owner))
    timeout_idle = float(check_param("timeout_idle", timeout_idle, positive, owner))
    timeout_graceful_shutdown = float(check_param("timeout_graceful_shutdown", timeout_graceful_shutdown,
                                                  positive, owner))
    backlog = int(check_param("backlog", backlog, [Interval(int, 1, None)], owner))
    max_header_bytes = int(check_param("max_header_bytes", max_header_bytes, [Interval(int, 1024, None)], owner))
    # asyncio accepts up to ``backlog`` connections in one go before any of them reaches the
    # connection cap, so the files needed are max_connections + backlog + the process's own
    needed = max_connections + backlog + _FD_RESERVE
    files = _raise_open_files_limit(needed)
    if files < needed:
        budget = max(2, files - _FD_RESERVE)
        new_backlog = min(backlog, max(1, budget // 4))
        new_max = max(1, budget - new_backlog)
        logger.warning("max_connections=%d with backlog=%d needs %d open files but the limit is %d (ulimit -n): "
                       "using max_connections=%d, backlog=%d", max_connections, backlog, needed, files, new_max,
                       new_backlog)
        max_connections, backlog = new_max, new_backlog
    metrics = getattr(getattr(app, "state", None), "metrics", None)
    if not isinstance(metrics, _Metrics):
        metrics = None
    protocol = _protocol_class(max_connections, timeout_idle, metrics)
    # loop="auto": uvloop when installed (the gateway extra installs it; measured -0.7 ms p50 at 64
    # clients, benchmarks/gateway/README.md); the protocol stays h11 for its request-head limit
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log, ws="none",
                            loop="auto", lifespan="on", http=protocol, backlog=backlog, timeout_keep_alive=timeout_keep_alive,
                            timeout_graceful_shutdown=timeout_graceful_shutdown,
                            h11_max_incomplete_event_size=max_header_bytes)
    config.leanscale_max_connections = max_connections
    return config


def _quiet_accept_errors(loop) -> None:
    """Out of files, asyncio logs a traceback for every failed accept (every second, forever): log
    one line a minute instead. Other loop errors go to the handler that was there."""
    previous = loop.get_exception_handler()
    last = [-math.inf]

    def handler(loop_, context) -> None:
        if str(context.get("message", "")).startswith("socket.accept() out of system resource"):
            now = time.monotonic()
            if now - last[0] >= 60:
                last[0] = now
                logger.warning("cannot accept connections: %s (open-files limit reached; lower --max-connections "
                               "or raise ulimit -n)", context.get("exception"))
            return
        if previous is not None:
            previous(loop_, context)
        else:
            loop_.default_exception_handler(context)

    loop.set_exception_handler(handler)


def _server_class():
    """``uvicorn.Server`` that exits normally after a graceful stop on SIGTERM (uvicorn re-raises
    the signal once it has drained, which kills the process with status -15); SIGINT still
    re-raises (KeyboardInterrupt)."""
    uvicorn = _require_uvicorn()

    class Server(uvicorn.Server):
        async def serve(self, sockets=None) -> None:
            _quiet_accept_errors(asyncio.get_running_loop())
            await super().serve(sockets=sockets)

        def handle_exit(self, sig, frame) -> None:
            self.__dict__.setdefault("leanscale_signals", []).append(sig)
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)
            if signal.SIGINT in self.__dict__.get("leanscale_signals", []):
                signal.raise_signal(signal.SIGINT)

    return Server


def _run(config) -> None:
    """Run the server until it stops (a separate function so that tests can replace it)."""
    server = _server_class()(config)
    server.run()
    if not server.started:
        raise SystemExit(3)  # as uvicorn.run: the server failed to start (the log says why)


def _is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


_SERVER_OPTIONS = ("max_connections", "timeout_keep_alive", "timeout_idle", "timeout_graceful_shutdown", "backlog",
                   "max_header_bytes")


def serve(path_or_cascade, host: str = "127.0.0.1", port: int = 8000, objects: dict | None = None, *,
          log_level: str = "info", access_log: bool = False, **options) -> None:
    """Load a saved cascade (:meth:`Cascade.load <leanscale.cascade.Cascade.load>`, with ``objects``
    for its callable/rule/external stages) or take a fitted one, and serve it with uvicorn until
    interrupted (SIGTERM: drain, then return). ``options``: the connection options of
    :func:`server_config` (``max_connections``, ``timeout_keep_alive``, ``timeout_idle``,
    ``timeout_graceful_shutdown``, ``backlog``, ``max_header_bytes``); the rest go to
    :func:`create_app`. Binds to loopback unless told otherwise. An address it cannot listen on
    (an invalid host, a port in use, a privileged port) raises before the cascade is loaded."""
    import errno
    import socket

    from leanscale.cascade.cascade import Cascade
    from leanscale.core.errors import LeanscaleError
    from leanscale.core.validation import InstanceOf

    _require_uvicorn()
    port = int(check_param("port", port, [Interval(int, 0, 65535)], "serve"))
    host = check_param("host", host, [InstanceOf(str)], "serve")
    # Try the bind uvicorn will do (asyncio's create_server: every address getaddrinfo gives, with
    # SO_REUSEADDR, IPv6 sockets v6-only), so that a bad address is one clear error rather than an
    # exit status 3 after a few INFO lines. The sockets are closed again at once.
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError, ValueError) as exc:
        raise InvalidParameterError(
            f"cannot listen on {where}: {exc}. The 'host' parameter of serve must be an address of this machine "
            f"(e.g. 127.0.0.1, 0.0.0.0, ::1) or a name that resolves to one. Got {host!r}.") from None
    held = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            try:
                sock = socket.socket(family, kind, proto)
            except OSError:
                continue  # an address family this machine lacks: asyncio skips it too
            held.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == getattr(socket, "AF_INET6", None) and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                hint = {errno.EADDRINUSE: " (another process is listening on that port)",
                        errno.EADDRNOTAVAIL: " (no network interface of this machine has that address)",
                        errno.EACCES: " (ports below 1024 need privileges)"}.get(exc.errno, "")
                raise LeanscaleError(f"cannot listen on {where}: {exc.strerror or exc}{hint}.") from None
    finally:
        for sock in held:
            sock.close()
    if isinstance(path_or_cascade, (str, Path)):
        cascade = Cascade.load(path_or_cascade, objects=objects)
    else:
        cascade = path_or_cascade
    server_options = {k: options.pop(k) for k in _SERVER_OPTIONS if k in options}
    app = create_app(cascade, **options)
    config = server_config(app, host=host, port=port, log_level=log_level, access_log=access_log, **server_options)
    if not _is_loopback(str(host)):
        logger.warning("serving on %s: the cascade server has no authentication; anyone who can reach this "
                       "address can query it. Put it behind a proxy that authenticates, or bind to 127.0.0.1.",
                       host)
    _run(config)
