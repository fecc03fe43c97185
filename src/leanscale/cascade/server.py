"""An HTTP server for a fitted :class:`~leanscale.cascade.Cascade`: micro-batching, fallback,
bounded queue, input limits and Prometheus metrics (``pip install 'leanscale[serve]'``).

::

    from leanscale.cascade.server import create_app, serve
    app = create_app(cascade, max_batch=64, max_wait_ms=2.0)   # a FastAPI app (uvicorn, TestClient...)
    serve("cascade.json", port=8000)                            # or: leanscale serve cascade.json

Endpoints:

* ``POST /v1/predict`` -- body ``{"text": "..."}`` or ``{"texts": ["...", ...]}``; answers
  ``{"predictions": [{"label", "stage", "confidence", "cost"}, ...]}`` in request order. ``stage``
  is the name of the stage that answered, or ``"fallback"``.
* ``GET /healthz`` -- ``{"status": "ok", "stages": [...]}``.
* ``GET /metrics`` -- Prometheus text format: requests, predictions, answers and errors per stage,
  total cost, rejections by reason, queue depth, batches, and a latency histogram.
* ``GET /docs``, ``GET /openapi.json`` -- the API, documented from the request/response models.

Micro-batching: the texts of all requests go into one bounded queue (``max_queue`` texts); a
single background worker takes up to ``max_batch`` of them, waiting at most ``max_wait_ms`` after
the first for more, and runs them through ``cascade.predict_detailed`` as one batch in a thread,
so the event loop keeps accepting requests meanwhile. A stage that fails or times out is handled
by the cascade (the batch falls to the next stage); an unexpected failure of the whole call
answers the affected requests with 500 and the worker carries on. Nothing waits forever on a
full queue: the request is refused at once with 503.

Limits (all answered with a JSON ``{"detail": message}``): a body over ``max_body_bytes`` -> 413
(checked on ``Content-Length`` and on the bytes actually received); more than
``max_items_per_request`` texts or a text over ``max_text_chars`` characters -> 413; malformed
JSON, wrong types, an empty list, both or neither of ``text``/``texts`` -> 422; a full queue -> 503.
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
import time
from pathlib import Path
from typing import Any

import numpy as np

from leanscale.core.errors import InvalidParameterError, MissingDependencyError
from leanscale.core.validation import Interval, check_param

__all__ = ["LATENCY_BUCKETS", "create_app", "serve"]

logger = logging.getLogger("leanscale.cascade.server")

PREDICT_PATH = "/v1/predict"
# Seconds; the upper bounds of the latency histogram (+Inf is added).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
REJECT_REASONS = ("queue_full", "too_large", "bad_request")
_INSTALL = "pip install 'leanscale[serve]'"


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


# ------------------------------------------------------------------------------------- metrics
class _Metrics:
    """Counters of one app. Only touched from the event loop's thread, so no lock is needed."""

    def __init__(self, stage_names: list[str], fallback: str):
        self.requests = 0
        self.predictions = 0
        self.batches = 0
        self.internal_errors = 0
        self.cost = 0.0
        self.answers = {name: 0 for name in [*stage_names, fallback]}
        self.errors = {name: 0 for name in stage_names}
        self.rejected = {reason: 0 for reason in REJECT_REASONS}
        self.bucket_counts = [0] * len(LATENCY_BUCKETS)
        self.latency_sum = 0.0
        self.latency_count = 0

    def observe_latency(self, seconds: float) -> None:
        self.latency_sum += seconds
        self.latency_count += 1
        for i, upper in enumerate(LATENCY_BUCKETS):
            if seconds <= upper:
                self.bucket_counts[i] += 1  # stored per bucket; rendered cumulatively

    def render(self, queue_depth: int) -> str:
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, Any]]):
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            for suffix_labels, value in samples:
                out.append(f"{name}{suffix_labels} {_fmt(value)}")

        metric("leanscale_requests_total", "counter", "POST /v1/predict requests received (any outcome).",
               [("", self.requests)])
        metric("leanscale_predictions_total", "counter", "Texts answered with a prediction.",
               [("", self.predictions)])
        metric("leanscale_stage_answers_total", "counter",
               "Predictions per answering stage ('fallback': no stage was confident enough).",
               [(f'{{stage="{_esc(k)}"}}', v) for k, v in self.answers.items()])
        metric("leanscale_stage_errors_total", "counter",
               "Requests a stage failed on (raised, timed out or answered badly); they fell to the next stage.",
               [(f'{{stage="{_esc(k)}"}}', v) for k, v in self.errors.items()])
        metric("leanscale_cost_total", "counter", "Sum of the cascade cost paid for every prediction.",
               [("", self.cost)])
        metric("leanscale_rejected_total", "counter", "Requests refused, by reason.",
               [(f'{{reason="{k}"}}', v) for k, v in self.rejected.items()])
        metric("leanscale_internal_errors_total", "counter",
               "Requests answered 500 because the cascade call itself failed unexpectedly.",
               [("", self.internal_errors)])
        metric("leanscale_batches_total", "counter", "Calls of cascade.predict_detailed (micro-batches).",
               [("", self.batches)])
        metric("leanscale_queue_depth", "gauge", "Texts waiting in the micro-batching queue.",
               [("", queue_depth)])
        cumulative, samples = 0, []
        for upper, count in zip(LATENCY_BUCKETS, self.bucket_counts):
            cumulative += count
            samples.append((f'_bucket{{le="{_fmt(upper)}"}}', cumulative))
        samples += [('_bucket{le="+Inf"}', self.latency_count), ("_sum", self.latency_sum),
                    ("_count", self.latency_count)]
        metric("leanscale_request_latency_seconds", "histogram",
               "Wall time of POST /v1/predict requests in the server, any outcome.", samples)
        return "\n".join(out) + "\n"


def _fmt(value: Any) -> str:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    v = float(value)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v)


def _esc(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


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
class _Job:
    """The texts of one request and the future its handler awaits."""

    __slots__ = ("future", "remaining", "results", "texts")

    def __init__(self, texts: list[str], future: asyncio.Future):
        self.texts, self.future = texts, future
        self.results: list[Any] = [None] * len(texts)
        self.remaining = len(texts)


class QueueFullError(Exception):
    """The queue cannot take the request's texts (answered 503)."""


class ShuttingDownError(Exception):
    """The server stopped before the request was answered (answered 503)."""


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

    @property
    def depth(self) -> int:
        return len(self.items)

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    def start(self) -> None:
        self.stopping = False
        self.event = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._run(), name="leanscale-batcher")

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

    def submit(self, texts: list[str]) -> asyncio.Future:
        """Queue all texts of one request or none of them (QueueFullError)."""
        if self.stopping or self.event is None:
            raise QueueFullError("the server is not running (no batching worker)")
        if not self.running:  # the worker never dies on an exception, but restart it if it ever did
            logger.error("the batching worker had stopped; restarting it")
            self.start()
        if len(self.items) + len(texts) > self.max_queue:
            raise QueueFullError(
                f"the queue is full ({len(self.items)} of {self.max_queue} texts waiting; this request has "
                f"{len(texts)}); retry later")
        job = _Job(texts, asyncio.get_running_loop().create_future())
        self.items.extend((job, i) for i in range(len(texts)))
        self.event.set()
        return job.future

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
                    await self._process(batch)
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
        out = await asyncio.to_thread(self.cascade.predict_detailed, texts)
        n = len(texts)
        labels, stage, confidence, cost = (list(a) for a in (out.labels, out.stage, out.confidence, out.cost))
        if not (len(labels) == len(stage) == len(confidence) == len(cost) == n):
            raise RuntimeError(
                f"cascade.predict_detailed answered {len(labels)} labels, {len(stage)} stages, "
                f"{len(confidence)} confidences and {len(cost)} costs for {n} texts")
        preds = []
        for k in range(n):
            preds.append({"label": _json_label(labels[k]), "stage": str(stage[k]),
                          "confidence": float(confidence[k]), "cost": float(cost[k])})
        m = self.metrics
        m.batches += 1
        for name, count in (getattr(out, "errors", None) or {}).items():
            m.errors[str(name)] = m.errors.get(str(name), 0) + int(count)
        for (job, i), p in zip(batch, preds):
            if job.future.done():
                continue
            job.results[i] = p
            job.remaining -= 1
            if job.remaining == 0:
                job.future.set_result(job.results)


# ---------------------------------------------------------------------------- body size guard
class _BodyGuard:
    """ASGI middleware: refuses bodies over ``max_body_bytes`` (declared or actual) with 413 and
    counts every POST /v1/predict request and its latency, whatever the outcome."""

    def __init__(self, app, metrics: _Metrics, max_body_bytes: int):
        self.app, self.metrics, self.max_body_bytes = app, metrics, max_body_bytes
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
                self.metrics.requests += 1
                self.metrics.observe_latency(time.perf_counter() - t0)

    async def _reject(self, send, status: int, reason: str, message: str, receive=None, more: bool = False) -> None:
        self.metrics.rejected[reason] += 1
        drained = 0
        while receive is not None and more and drained <= self._drain_limit:
            # read (and drop) the rest of a moderately oversized body, so that the client, which is
            # usually still sending, sees the answer rather than a reset connection
            message_ = await receive()
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
                                      receive, more=declared <= self._drain_limit)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await self._reject(send, 413, "too_large",
                                          f"the request body is over {limit} bytes; at most {limit} are accepted",
                                          receive, more=message.get("more_body", False))
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


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


def create_app(cascade, *, max_batch: int = 64, max_wait_ms: float = 2.0, max_queue: int = 1024,
               max_items_per_request: int = 256, max_text_chars: int = 10_000, max_body_bytes: int = 1_000_000):
    """A FastAPI app serving ``cascade`` (see the module docstring). The batching worker starts
    with the app's lifespan (uvicorn, or ``with TestClient(app)``)."""
    fastapi, _ = _require_fastapi()
    from typing import Annotated

    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
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
        label: Any = Field(description="the predicted label (JSON: string, number, boolean or null)")
        stage: str = Field(description=f"the stage that answered, or {FALLBACK!r} when none was confident enough")
        confidence: float = Field(description="the answering stage's confidence in [0, 1]")
        cost: float = Field(description="the cost paid for this request (sum over the stages it went through)")

    class PredictResponse(BaseModel):
        predictions: list[Prediction] = Field(description="one per input text, in order")

    class ErrorResponse(BaseModel):
        detail: str = Field(description="what went wrong")
        errors: list[dict[str, Any]] | None = Field(
            None, description="for 413/422 from validation: the first validation errors (loc, msg, type)")

    class HealthResponse(BaseModel):
        status: str
        stages: list[str]

    metrics = _Metrics(stage_names, FALLBACK)
    batcher = _Batcher(cascade, metrics, FALLBACK, max_batch, max_wait_ms / 1000.0, max_queue)

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
    )
    app.state.metrics, app.state.batcher = metrics, batcher
    app.add_middleware(_BodyGuard, metrics=metrics, max_body_bytes=max_body)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        too_large = any(e.get("type") in ("string_too_long", "too_long") for e in errors)
        reason, status = ("too_large", 413) if too_large else ("bad_request", 422)
        metrics.rejected[reason] += 1
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
        413: {"model": ErrorResponse, "description": "body, number of texts or a text over the limits"},
        422: {"model": ErrorResponse, "description": "malformed JSON, wrong types, empty list"},
        500: {"model": ErrorResponse, "description": "the cascade call failed unexpectedly"},
        503: {"model": ErrorResponse, "description": "the queue is full; retry later"},
    }

    @app.post(PREDICT_PATH, response_model=PredictResponse, responses=error_responses,
              summary="Predict labels for one text or a batch of texts")
    async def predict(body: PredictRequest):
        texts = [body.text] if body.texts is None else list(body.texts)
        if len(texts) > max_queue:  # could never fit, however empty the queue
            metrics.rejected["too_large"] += 1
            return JSONResponse(status_code=413, content={
                "detail": f"this request has {len(texts)} texts; the queue holds at most {max_queue} (max_queue)"})
        try:
            future = batcher.submit(texts)
        except QueueFullError as exc:
            metrics.rejected["queue_full"] += 1
            return JSONResponse(status_code=503, content={"detail": str(exc)}, headers={"Retry-After": "1"})
        try:
            preds = await future
        except ShuttingDownError as exc:
            return JSONResponse(status_code=503, content={"detail": str(exc)})
        except Exception as exc:
            metrics.internal_errors += 1
            return JSONResponse(status_code=500, content={
                "detail": f"the cascade failed on this request: {type(exc).__name__}: {exc}"})
        metrics.predictions += len(preds)
        for p in preds:
            metrics.answers[p["stage"]] = metrics.answers.get(p["stage"], 0) + 1
            metrics.cost += p["cost"]
        return {"predictions": preds}

    @app.get("/healthz", response_model=HealthResponse, summary="Liveness and the stages served")
    async def healthz():
        return {"status": "ok" if batcher.running else "starting", "stages": stage_names}

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics (text format 0.0.4)")
    async def prometheus():
        return PlainTextResponse(metrics.render(batcher.depth),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def _is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve(path_or_cascade, host: str = "127.0.0.1", port: int = 8000, objects: dict | None = None, *,
          log_level: str = "info", access_log: bool = False, **app_kwargs) -> None:
    """Load a saved cascade (:meth:`Cascade.load <leanscale.cascade.Cascade.load>`, with ``objects``
    for its callable/rule/external stages) or take a fitted one, and serve it with uvicorn until
    interrupted. ``app_kwargs`` go to :func:`create_app`. Binds to loopback unless told otherwise."""
    from leanscale.cascade.cascade import Cascade

    uvicorn = _require_uvicorn()
    if isinstance(path_or_cascade, (str, Path)):
        cascade = Cascade.load(path_or_cascade, objects=objects)
    else:
        cascade = path_or_cascade
    port = int(check_param("port", port, [Interval(int, 0, 65535)], "serve"))
    app = create_app(cascade, **app_kwargs)
    if not _is_loopback(str(host)):
        logger.warning("serving on %s: the cascade server has no authentication; anyone who can reach this "
                       "address can query it. Put it behind a proxy that authenticates, or bind to 127.0.0.1.",
                       host)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=access_log, ws="none",
                lifespan="on")
