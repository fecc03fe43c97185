"""The OpenAI-compatible gateway app (FastAPI): one front for several OpenAI-compatible backends,
with fallback chains, cost accounting, client keys, a bound on requests in flight and Prometheus
metrics (``pip install 'leanscale[gateway]'``).

::

    from leanscale.cascade.gateway import GatewayConfig, create_gateway_app, serve_gateway
    app = create_gateway_app(GatewayConfig.from_yaml("gateway.yaml"))   # uvicorn, TestClient...
    serve_gateway("gateway.yaml", port=8080)

Endpoints (clients use the official OpenAI clients with ``base_url=http://HOST:PORT/v1``):

* ``POST /v1/chat/completions``, ``POST /v1/completions`` -- the request's ``model`` names a
  configured model; the body is forwarded as is (``model`` replaced by the upstream name). On a
  backend failure (connection error, timeout, 5xx, 429, a 401/403/404 of the backend, an answer
  that is not a completion) the model's ``fallbacks`` are tried in order, after a short bounded
  backoff. ``stream: true`` answers server-sent events in OpenAI's chunk format ending with
  ``data: [DONE]``; the gateway asks the backend for usage (``stream_options.include_usage``) and
  falls back only before the first chunk: a failure after it ends the stream with an error event
  ``data: {"error": {...}}`` and no ``[DONE]`` (the OpenAI clients raise ``APIError``), never a
  silent truncation.
* ``model`` may also name a learned policy: ``leanscale-router[:<knob>]`` (a router picks the
  model up front) or ``leanscale-cascade[:<threshold>]`` (cheap model first, escalate when the
  quality estimator does not trust its answer); see ``README.md``. With ``log:`` configured,
  every request is one line of a JSONL log (:mod:`.log`).
* Before any policy or backend: canned answers (``rules:``, :mod:`.rules`; ``x-leanscale-model:
  leanscale-rules``) and the exact + semantic response cache (``cache:``, :mod:`.cache`;
  ``x-leanscale-cache: exact | semantic``), both at cost 0 and without calling a backend. A cache
  that raises never fails a request (counted in ``leanscale_gateway_cache_errors``).
* ``GET /v1/models`` -- the configured model names and policies. ``GET /healthz`` -- 200
  ``{"status": "ok", "pid": ...}`` (the gateway is up, and which worker process answered; backends
  are not probed). ``GET /metrics`` -- Prometheus text format.

``serve_gateway(path, workers=N)`` runs N worker processes (:func:`_worker_app`); the cache and the
circuit breakers are per process unless ``cache.redis_url`` / ``state.redis_url`` are set.

Every answer has the headers ``x-leanscale-model`` (the model that answered) and, when not
streamed, ``x-leanscale-cost-usd`` (from the answer's ``usage`` and the model's prices; ``unknown``
when the backend sent no usage); ``usage.cost_usd`` carries the same number in the body (for a
stream: in the final usage chunk, sent when the client asked for it with
``stream_options: {"include_usage": true}``, as OpenAI does).

Errors have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 malformed
request, 401 missing or wrong client key (when ``client_keys_env`` is configured), 404
``model_not_found``, 413 body too large, 429 with ``Retry-After`` when ``max_in_flight`` requests
are being answered already, 503 with ``Retry-After`` when every backend tried was overloaded
(429 or ``max_concurrency`` reached), 502 when every backend tried failed (the message names each
and why), and a backend's own 400-type refusal passed through with its status.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations at run time.

import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any

from leanscale.core.errors import InvalidParameterError, MissingDependencyError

from .backends import Backend, BackendError, BackendStream
from .config import (
    CASCADE_POLICY,
    ROUTER_POLICY,
    GatewayConfig,
    parse_cascade_threshold,
    parse_router_knob,
)
from .policies import answer_text, prompt_hash, prompt_text
from .rules import RULES_MODEL
from .scorer import combine_confidence, mean_logprob
from .store import require_redis

__all__ = ["create_gateway_app", "serve_gateway"]

logger = logging.getLogger("leanscale.cascade.gateway")
STREAM_CLOSE_TIMEOUT_S = 5.0  # closing a backend's stream after the client left or the answer ended

_INSTALL = "pip install 'leanscale[gateway]'"
_METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
REQUEST_OUTCOMES = ("ok", "bad_request", "unauthorized", "model_not_found", "too_large", "overloaded",
                    "backends_failed", "backend_refused", "stream_error", "internal_error")
BACKEND_OUTCOMES = ("ok", "timeout", "connection", "rate_limited", "saturated", "circuit_open", "server_error",
                    "misconfigured",
                    "bad_response", "client_error", "stream_error")
_NO_MODEL = "-"  # the model label of requests that named no configured model (bounded label values)
# stored with each cached answer (and removed from a hit): the configured model that answered it
_CACHE_MODEL_KEY = "_leanscale_model"
CACHE_WARN_EVERY_S = 60.0  # a failing cache is logged at most once a minute (it is counted every time)


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"the LLM gateway needs {module} (missing: {exc.name}). Install it with: {_INSTALL}") from exc


# ------------------------------------------------------------------------------------ metrics
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's multi-process mode (see _Metrics)


class _Metrics:
    """The gateway's Prometheus metrics, in a registry of its own.

    **Several worker processes** (``serve_gateway(workers=N)``, or gunicorn with
    ``PROMETHEUS_MULTIPROC_DIR`` set): a scrape reaches one worker, but must report all of them.
    ``serve_gateway`` gives its workers a fresh folder in ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's
    multi-process mode: each process writes its values to memory-mapped files there), and
    ``/metrics`` of any worker then sums the counters and histograms of every worker (dead ones
    included: their requests happened); the gauges are summed over the live workers (requests in
    flight, cache counters) or their maximum taken (breaker state: 2 when any worker holds its
    breaker open). Each worker refreshes its cache and breaker gauges once a second."""

    def __init__(self, models: list[str]):
        pc = _require("prometheus_client")
        self._pc = pc
        folder = os.environ.get(METRICS_DIR_ENV)
        self.multiprocess_dir: str | None = folder if folder and os.path.isdir(folder) else None
        self.registry = r = pc.CollectorRegistry(auto_describe=True)
        self._children: dict[tuple, Any] = {}
        C = pc.Counter
        self.requests = C("leanscale_gateway_requests",
                          "Completion requests by endpoint, model (the one that answered; the one asked for when "
                          "none did; '-' for none configured) and outcome.", ["endpoint", "model", "outcome"],
                          registry=r)
        self.backend_calls = C("leanscale_gateway_backend_calls", "Calls to each backend model by outcome.",
                               ["model", "outcome"], registry=r)
        self.fallbacks = C("leanscale_gateway_fallbacks", "Calls a model got as a fallback of another one.",
                           ["model"], registry=r)
        self.cost = C("leanscale_gateway_cost_usd", "USD spent (usage x prices), by the model that answered.",
                      ["model"], registry=r)
        self.tokens = C("leanscale_gateway_tokens", "Tokens by model and kind (prompt, completion).",
                        ["model", "kind"], registry=r)
        self.in_flight = pc.Gauge("leanscale_gateway_in_flight", "Completion requests being answered.", registry=r,
                                  multiprocess_mode="livesum")
        self.cache = pc.Gauge("leanscale_gateway_cache", "Response cache counters (hits_exact, hits_semantic, "
                              "misses, puts, evictions, expired, size, ...).", ["stat"], registry=r,
                              multiprocess_mode="livesum")
        self.cache_errors = C("leanscale_gateway_cache_errors",
                              "Response cache look-ups and stores that raised (the request was answered by the "
                              "backends as if the cache were off).", ["op"], registry=r)
        for op in ("get", "put"):
            self.cache_errors.labels(op=op)
        self.breaker = pc.Gauge("leanscale_gateway_breaker_state", "Circuit breaker of each backend model: 0 closed, "
                                "1 half-open, 2 open.", ["model"], registry=r, multiprocess_mode="livemax")
        self.latency = pc.Histogram("leanscale_gateway_request_latency_seconds",
                                    "Wall time of completion requests in the gateway (streams: to their end), any "
                                    "outcome.", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.backend_latency = pc.Histogram("leanscale_gateway_backend_latency_seconds",
                                            "Wall time of successful backend calls (streams: to the first event).",
                                            ["model"], buckets=LATENCY_BUCKETS, registry=r)
        for name in models:  # every series present from the start, at 0
            self.cost.labels(model=name)
            self.fallbacks.labels(model=name)
            for kind in ("prompt", "completion"):
                self.tokens.labels(model=name, kind=kind)
            for outcome in BACKEND_OUTCOMES:
                self.backend_calls.labels(model=name, outcome=outcome)
        self.policy_decisions = C("leanscale_gateway_policy_decisions",
                                  "Decisions of the learned policies: the router's chosen model, the cascade's "
                                  "accepted / escalated answers (per gated call).", ["policy", "decision"],
                                  registry=r)
        self.log_dropped = C("leanscale_gateway_log_dropped",
                             "Request-log lines dropped because the log's queue was full.", registry=r)
        for endpoint in ENDPOINTS.values():
            self.latency.labels(endpoint=endpoint)

    def child(self, metric, *values: str):
        """``metric.labels(*values)`` (in the metric's label order), kept: prometheus_client checks
        and joins the values on every call, a few microseconds each, several times a request. The
        label values are bounded (configured names, fixed outcomes), and so is this table."""
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            if len(self._children) >= 10_000:
                self._children.clear()
            found = self._children[key] = metric.labels(*values)
        return found

    def render(self) -> bytes:
        if self.multiprocess_dir is None:
            return self._pc.generate_latest(self.registry)
        from prometheus_client import multiprocess

        merged = self._pc.CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=self.multiprocess_dir)
        return self._pc.generate_latest(merged)

    def process_exit(self) -> None:
        """Multi-process mode: this worker's live gauges leave the sums (its counters stay)."""
        if self.multiprocess_dir is not None:
            from prometheus_client import multiprocess

            with contextlib.suppress(Exception):
                multiprocess.mark_process_dead(os.getpid(), self.multiprocess_dir)


# ------------------------------------------------------------------------------------- errors
class GatewayError(Exception):
    """An error answered to the client in OpenAI's shape."""

    def __init__(self, status: int, message: str, kind: str, code: str | None = None, param: str | None = None,
                 headers: dict | None = None, outcome: str = "bad_request", model: str = _NO_MODEL):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param
        self.headers, self.outcome, self.model = headers or {}, outcome, model

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _usage_cost(usage: Any, model) -> float | None:
    """USD for a ``usage`` block (None when it lacks the token counts)."""
    if not isinstance(usage, dict):
        return None
    p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (p, c)):
        return None
    return model.cost(p, c)


def _tokens(usage: Any) -> dict | None:
    """``{"prompt_tokens", "completion_tokens"}`` of a usage block (for the request log: replay
    reprices logged traffic with new prices), or None."""
    if not isinstance(usage, dict):
        return None
    out = {k: usage.get(k) for k in ("prompt_tokens", "completion_tokens")}
    return out if all(isinstance(v, int) and not isinstance(v, bool) for v in out.values()) else None


def _cost_header(cost: float | None) -> str:
    return "unknown" if cost is None else f"{cost:.12g}"


def _all_failed(requested: str, chain: list[str], failures: list[BackendError]) -> GatewayError:
    why = "; ".join(f"{e.model!r}: {e.message}" for e in failures)
    tried = ", ".join(map(repr, chain))
    headers = {"x-leanscale-tried": ",".join(chain)}
    if failures and all(e.overload for e in failures):
        waits = [e.retry_after for e in failures if e.retry_after is not None]
        headers["retry-after"] = str(max(1, min(60, math.ceil(min(waits))))) if waits else "1"
        return GatewayError(503, f"every backend for model {requested!r} is overloaded (tried {tried}): {why}. "
                            "Retry later.", "server_error", "backends_overloaded", headers=headers,
                            outcome="overloaded", model=requested)
    return GatewayError(502, f"every backend for model {requested!r} failed (tried {tried}): {why}.",
                        "server_error", "backends_failed", headers=headers, outcome="backends_failed",
                        model=requested)


def _passthrough(requested: str, e: BackendError) -> GatewayError:
    """A backend's refusal of the request itself (a 4xx other than 429): its status and message."""
    err = e.body.get("error") if isinstance(e.body, dict) else None
    err = err if isinstance(err, dict) else {}
    param = err.get("param") if isinstance(err.get("param"), str) else None
    code = err.get("code") if isinstance(err.get("code"), str) else None
    kind = err.get("type") if isinstance(err.get("type"), str) else "invalid_request_error"
    return GatewayError(int(e.status or 400), f"model {e.model!r} refused the request: {e.message}", kind, code,
                        param, outcome="backend_refused", model=requested)


def _backend_outcome(e: BackendError) -> str:
    return e.kind if e.kind in BACKEND_OUTCOMES else "server_error"


# ---------------------------------------------------------------------------------- streaming
def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


class _Done:
    """Runs the cleanup of a request once (the slot of max_in_flight, metrics, a backend stream)."""

    def __init__(self, fn):
        self._fn, self._called = fn, False

    async def __call__(self, *args) -> None:
        if not self._called:
            self._called = True
            await self._fn(*args)


def _sse_response_class():
    from starlette.responses import Response

    class _SSEResponse(Response):
        """An ASGI response streaming ``events`` (bytes) as ``text/event-stream``; stops (and runs
        ``on_close``, which closes the backend stream) as soon as the client disconnects."""

        def __init__(self, events, headers: dict, on_close):
            self.events, self.extra_headers, self.on_close = events, headers, on_close
            self.status_code, self.background = 200, None
            self.init_headers({"content-type": "text/event-stream; charset=utf-8", **headers})

        async def _pump(self, send) -> None:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def __call__(self, scope, receive, send) -> None:
            async def disconnected() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass

            pump = asyncio.create_task(self._pump(send))
            watch = asyncio.create_task(disconnected())
            try:
                await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
                logger.debug("stream response: %s first", "pump" if pump.done() else "client disconnect")
                if pump.done():
                    pump.result()  # re-raise a failure of the pump
            finally:
                for task in (pump, watch):
                    task.cancel()
                for task in (pump, watch):
                    with contextlib.suppress(BaseException):
                        await task
                with contextlib.suppress(Exception):
                    await self.events.aclose()
                await self.on_close("stream_error")

    return _SSEResponse


# ------------------------------------------------------------------------------------ policies
def _load_policies(config: GatewayConfig):
    """The router policy and the cascade's scorer named by the config (None when absent),
    loaded and checked against the configured models; the router's expected costs are set from
    the config's prices."""
    router_policy = scorer = None
    if config.router is not None:
        from .router_policy import RouterPolicy

        router_policy = RouterPolicy.load(config.router.path)
        models = router_policy.models
        missing = [m for m in models if m not in config.model_names]
        if missing:
            raise InvalidParameterError(
                f"{config.source}: router.path {config.router.path!r} holds a router over {models}; "
                f"{', '.join(map(repr, missing))} is not a configured model ({', '.join(map(repr, config.model_names))}).")
        if config.router.models is not None and set(config.router.models) != set(models):
            raise InvalidParameterError(
                f"{config.source}: router.models {list(config.router.models)} must be the models of the saved router "
                f"{config.router.path!r}: {models}.")
        router_policy.use_prices(lambda m, pt, ct: config.model(m).cost(pt, ct))
    if config.cascade is not None and config.cascade.scorer is not None:
        from .scorer import AnswerScorer

        scorer = AnswerScorer.load(config.cascade.scorer)
    return router_policy, scorer


# ------------------------------------------------------------------------------------ the app
def create_gateway_app(config, *, docs: bool = False, transport=None, cache_embed=None):
    """A FastAPI app serving ``config`` (a :class:`GatewayConfig`, or the path of its YAML file;
    see the module docstring). The backend clients are created with the app's lifespan (uvicorn,
    or ``with TestClient(app)``). ``transport``: an httpx transport for every backend (tests).
    ``cache_embed``: the semantic cache's ``embed(texts) -> (n, d)`` (default: MiniLM).
    Fails at once when a configured environment variable (a backend's ``api_key_env``,
    ``client_keys_env``) is unset."""
    _require("fastapi")
    _require("httpx")
    _require("prometheus_client")
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    if isinstance(config, (str, Path)):
        config = GatewayConfig.from_yaml(config)
    if not isinstance(config, GatewayConfig):
        raise InvalidParameterError(
            "The 'config' parameter of create_gateway_app must be a GatewayConfig or the path of a gateway YAML "
            f"file. Got {type(config).__name__} instead.")
    client_keys = [k.encode() for k in config.client_keys()] if config.client_keys_env else None
    if config.state.redis_url is not None:
        require_redis()  # a missing redis package fails now, not at startup
    for m in config.models:
        m.api_key()  # an unset api_key_env fails now, not on the first request
    metrics = _Metrics(config.model_names)
    _SSEResponse = _sse_response_class()
    backends: dict[str, Backend] = {}
    state: dict[str, Any] = {"in_flight": 0, "log": None, "cache_warned": -math.inf}
    router_policy, scorer = _load_policies(config)
    rules = None
    if config.rules:
        from .rules import CannedRules

        rules = CannedRules.from_config(list(config.rules))
    cache = None
    if config.cache is not None and config.cache.get("enabled"):
        from .cache import ResponseCache

        cache = ResponseCache(config.cache, embed=cache_embed)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        for m in config.models:
            backends[m.name] = Backend(m, transport=transport)
        if config.log is not None:
            from .log import RequestLog

            state["log"] = RequestLog(config.log.path, config.log.max_queue)
        app.state.request_log = state["log"]
        refresher = None
        if metrics.multiprocess_dir is not None:  # a scrape reads every worker's gauges from its files

            async def refresh_every_second() -> None:
                while True:
                    with contextlib.suppress(Exception):
                        refresh_gauges()
                    await asyncio.sleep(1.0)

            refresher = asyncio.ensure_future(refresh_every_second())
        try:
            yield
        finally:
            if refresher is not None:
                refresher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await refresher
            metrics.process_exit()
            for b in list(backends.values()):
                with contextlib.suppress(Exception):
                    await b.aclose()
            backends.clear()
            if state["log"] is not None:
                await asyncio.to_thread(state["log"].close)  # writes what is queued
                state["log"] = None

    def refresh_gauges() -> None:
        """The breaker and cache gauges from their current state (they change without a request)."""
        for name, backend in backends.items():
            metrics.child(metrics.breaker, name).set(backend.breaker_state())
        if cache is not None:
            for stat, value in cache.stats().items():
                metrics.child(metrics.cache, stat).set(value)

    app = FastAPI(title="leanscale LLM gateway", version="1", lifespan=lifespan, docs_url="/docs" if docs else None,
                  redoc_url=None)
    app.state.metrics = metrics
    app.state.config = config
    app.state.router_policy, app.state.scorer = router_policy, scorer
    app.state.request_log = None
    all_names = config.model_names + config.policy_names

    def error_response(e: GatewayError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(GatewayError(exc.status_code, str(exc.detail), "invalid_request_error",
                                           headers=dict(exc.headers or {})))

    # -------------------------------------------------------------------------- checks
    def check_key(request: Request) -> None:
        if client_keys is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip().encode()
        ok = False
        for key in client_keys:  # compare with every key: the time does not tell which matched
            ok |= hmac.compare_digest(token, key)
        if scheme.lower() != "bearer" or not ok:
            what = "no API key was sent" if not header else "the API key sent is not valid"
            raise GatewayError(401, f"Incorrect API key: {what}. Send 'Authorization: Bearer <key>' with a key of "
                               "this gateway.", "invalid_request_error", "invalid_api_key", outcome="unauthorized")

    async def read_json(request: Request) -> dict:
        limit = config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise GatewayError(413, f"the request body is {declared} bytes; at most {limit} are accepted.",
                               "invalid_request_error", "request_too_large", outcome="too_large")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise GatewayError(413, f"the request body is over {limit} bytes; at most {limit} are accepted.",
                                   "invalid_request_error", "request_too_large", outcome="too_large")
        try:
            body = json.loads(bytes(raw))
        except (ValueError, UnicodeDecodeError) as exc:
            raise GatewayError(400, f"the request body must be a JSON object: {exc}.", "invalid_request_error",
                               "invalid_json") from None
        if not isinstance(body, dict):
            raise GatewayError(400, f"the request body must be a JSON object. Got a JSON {type(body).__name__}.",
                               "invalid_request_error", "invalid_json")
        return body

    def resolve_policy(model: str) -> tuple[str, str, Any]:
        """(kind, label, argument) of a request's ``model``: ("model", name, name), ("router",
        "leanscale-router", knob) or ("cascade", "leanscale-cascade", threshold)."""
        if model in config.model_names:
            return "model", model, model
        base, sep, arg = model.partition(":")
        if base == ROUTER_POLICY and config.router is not None:
            try:
                knob = parse_router_knob(arg) if sep else config.router.default_knob
            except ValueError as exc:
                raise GatewayError(400, f"'model' {model[:100]!r}: {exc}.", "invalid_request_error", "invalid_value",
                                   "model", model=base) from None
            return "router", base, knob
        if base == CASCADE_POLICY and config.cascade is not None:
            try:
                threshold = parse_cascade_threshold(arg) if sep else config.cascade.threshold
            except ValueError as exc:
                raise GatewayError(400, f"'model' {model[:100]!r}: {exc}.", "invalid_request_error", "invalid_value",
                                   "model", model=base) from None
            return "cascade", base, threshold
        hint = ""
        if base in (ROUTER_POLICY, CASCADE_POLICY):
            hint = f" The policy {base!r} is not configured (add a '{base.split('-')[1]}:' section to the config)."
        raise GatewayError(404, f"The model {model[:100]!r} does not exist on this gateway. Models: "
                           f"{', '.join(map(repr, all_names))}.{hint}", "invalid_request_error",
                           "model_not_found", "model", outcome="model_not_found")

    def check_body(body: dict, endpoint: str) -> tuple[str, str, Any]:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise GatewayError(400, f"'model' must be the name of a model of this gateway "
                               f"({', '.join(map(repr, all_names))}). Got {model!r:.100}.",
                               "invalid_request_error", "invalid_value", "model")
        kind, label, arg = resolve_policy(model)
        model = label  # a bounded metrics label
        if endpoint == "chat":
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
                raise GatewayError(400, "'messages' must be a non-empty list of message objects. Got "
                                   f"{messages!r:.100}.", "invalid_request_error", "invalid_value", "messages",
                                   model=model)
        elif "prompt" not in body:
            raise GatewayError(400, "'prompt' is required.", "invalid_request_error", "invalid_value", "prompt",
                               model=model)
        stream = body.get("stream", False)
        if stream is not None and not isinstance(stream, bool):
            raise GatewayError(400, f"'stream' must be true or false. Got {stream!r:.50}.", "invalid_request_error",
                               "invalid_value", "stream", model=model)
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise GatewayError(400, "'stream_options' must be an object.", "invalid_request_error", "invalid_value",
                               "stream_options", model=model)
        return kind, label, arg

    def backoff(attempt: int) -> float:
        return min(config.max_backoff_s, config.backoff_s * 2 ** (attempt - 1))

    def account(name: str, usage: Any) -> float | None:
        cost = _usage_cost(usage, config.model(name))
        if cost is not None:
            metrics.child(metrics.cost, name).inc(cost)
            metrics.child(metrics.tokens, name, "prompt").inc(usage["prompt_tokens"])
            metrics.child(metrics.tokens, name, "completion").inc(usage["completion_tokens"])
        return cost

    # ---------------------------------------------------------------------------- cache
    def cache_failed(op: str, exc: Exception) -> None:
        metrics.cache_errors.labels(op=op).inc()
        now = time.monotonic()
        if now - state["cache_warned"] >= CACHE_WARN_EVERY_S:
            state["cache_warned"] = now
            logger.warning("the response cache failed (%s): %r; answering as if it were off (counted in "
                           "leanscale_gateway_cache_errors, logged at most once a minute)", op, exc)

    async def cache_get(body: dict) -> tuple[dict, str] | None:
        """The cache's answer, or None (a miss, or a cache that raised: never a failed request)."""
        try:
            return await cache.aget(body)
        except Exception as exc:  # noqa: BLE001 -- the embedding, Redis...: the backends answer instead
            cache_failed("get", exc)
            return None

    async def cache_put(body: dict, answer: dict, name: str) -> None:
        """Store ``answer`` (from the configured model ``name``); a failure is counted, never raised."""
        try:
            await cache.aput(body, {**answer, _CACHE_MODEL_KEY: name})
        except Exception as exc:  # noqa: BLE001 -- the answer is there: the client gets it
            cache_failed("put", exc)

    def whole_events(answer: dict, want_usage: bool, finish):
        """A canned or cached answer as a stream (every choice, as OpenAI streams them), ``[DONE]``."""
        from .rules import completion_to_chunks

        async def events():
            outcome = "stream_error"
            try:
                for chunk in completion_to_chunks(answer, include_usage=want_usage):
                    yield _sse(chunk)
                yield b"data: [DONE]\n\n"
                outcome = "ok"
            finally:
                await finish(outcome)

        return events()

    # ----------------------------------------------------------------------- completions
    async def call_chain(requested: str, path: str, body: dict, stream: bool, called: list | None = None):
        """The first backend of the chain that answers: (name, JSON answer or BackendStream).
        ``called``: a list each model called is appended to."""
        chain = config.chain(requested)
        failures: list[BackendError] = []
        for attempt, name in enumerate(chain):
            if attempt:
                if failures[-1].kind != "circuit_open":  # the last model was not called: no need to wait
                    await asyncio.sleep(backoff(attempt))
                metrics.child(metrics.fallbacks, name).inc()
            if called is not None:
                called.append(name)
            backend = backends[name]
            t0 = time.perf_counter()
            try:
                answer = await (backend.open_stream(path, body) if stream else backend.request_json(path, body))
            except BackendError as e:
                metrics.child(metrics.backend_calls, name, _backend_outcome(e)).inc()
                logger.info("backend %r failed (%s): %s", name, e.kind, e.message)
                if not e.retryable:
                    raise _passthrough(requested, e) from None
                if e.kind == "circuit_open" and called:
                    called.pop()  # refused by its breaker: the model was not called
                failures.append(e)
                continue
            metrics.child(metrics.backend_calls, name, "ok").inc()
            metrics.child(metrics.backend_latency, name).observe(time.perf_counter() - t0)
            return name, answer
        raise _all_failed(requested, chain, failures)

    def relay(name: str, stream: BackendStream, want_usage: bool, endpoint: str, finish, extra_cost: float | None = 0.0,
              rec: dict | None = None, cache_body: dict | None = None):
        """The client's events: the backend's chunks (usage with cost_usd, plus ``extra_cost``:
        the calls made before this one, e.g. a cascade's cheap call; None = unknown), then
        ``[DONE]``; an error event (and no ``[DONE]``) when the backend fails or ends the stream
        early. ``rec``: the request's log record (its cost, and its answer text when logged).
        ``cache_body``: the request, when the finished stream is to be stored in the cache."""
        model = config.model(name)
        capture = rec is not None and "_answer" in rec
        chunks: list[dict] | None = [] if cache is not None and cache_body is not None and cache.cacheable(
            cache_body) else None

        def error_event(message: str) -> bytes:
            return _sse({"error": {"message": f"model {name!r} failed during the stream: {message}",
                                   "type": "server_error", "param": None, "code": "stream_interrupted"}})

        async def events():
            outcome = "stream_error"
            usage = None
            data = stream.first
            it = aiter(stream)
            try:
                while True:
                    if data.strip() == "[DONE]":
                        outcome = "ok"
                        if chunks:  # stored before [DONE]: a client that saw the end finds it cached
                            from .cache import completion_from_chunks

                            whole = completion_from_chunks(chunks)
                            if whole is not None:
                                await cache_put(cache_body, whole, name)
                        yield b"data: [DONE]\n\n"
                        return
                    try:
                        obj = json.loads(data)
                    except ValueError:
                        metrics.backend_calls.labels(model=name, outcome="stream_error").inc()
                        yield error_event(f"an event that is not JSON: {data[:100]!r}")
                        return
                    if isinstance(obj, dict) and obj.get("error"):
                        metrics.backend_calls.labels(model=name, outcome="stream_error").inc()
                        err = obj["error"]
                        msg = err.get("message") if isinstance(err, dict) else err
                        yield error_event(str(msg)[:300])
                        return
                    send = True
                    if capture and isinstance(obj, dict) and isinstance(obj.get("choices"), list) and obj["choices"]:
                        ch = obj["choices"][0]
                        piece = (ch.get("delta") or {}).get("content") if endpoint == "chat" else ch.get("text")
                        if isinstance(piece, str):
                            rec["_answer"].append(piece)
                    if isinstance(obj, dict) and isinstance(obj.get("usage"), dict):
                        usage = obj["usage"]
                        if rec is not None and _tokens(usage) is not None:
                            rec["usage"] = _tokens(usage)
                        cost = _usage_cost(usage, model)
                        if cost is not None and extra_cost is not None:
                            usage["cost_usd"] = cost + extra_cost
                    if chunks is not None and isinstance(obj, dict):
                        chunks.append(dict(obj))  # a copy: the usage popped below is still stored
                    if isinstance(obj, dict) and isinstance(obj.get("usage"), dict) and not want_usage:
                        # the client did not ask: as OpenAI, no usage chunk
                        if obj.get("choices"):
                            obj.pop("usage")
                        else:
                            send = False
                    if send:
                        yield _sse(obj)
                    try:
                        data = await anext(it)
                    except StopAsyncIteration:
                        metrics.backend_calls.labels(model=name, outcome="stream_error").inc()
                        yield error_event("the backend ended the stream without [DONE]")
                        return
                    except BackendError as e:
                        metrics.backend_calls.labels(model=name, outcome="stream_error").inc()
                        yield error_event(e.message)
                        return
            finally:
                if outcome == "ok" or usage is not None:
                    cost = account(name, usage)
                    if rec is not None:
                        rec["cost_usd"] = None if cost is None or extra_cost is None else cost + extra_cost
                await finish(outcome)

        return events()

    def answer_events(answer: dict, want_usage: bool, endpoint: str, finish):
        """A whole (non-streamed) answer as a stream: one content chunk, a finish chunk, the
        usage chunk when asked for, ``[DONE]`` (the cascade's accepted answer, see the README)."""
        chat = endpoint == "chat"

        async def events():
            outcome = "stream_error"
            try:
                kind = "chat.completion.chunk" if chat else "text_completion"
                head = {"id": answer.get("id"), "object": kind, "created": answer.get("created"),
                        "model": answer.get("model")}
                text = answer_text(answer, chat)
                try:
                    reason = answer["choices"][0].get("finish_reason") or "stop"
                except (KeyError, IndexError, TypeError, AttributeError):
                    reason = "stop"
                if chat:
                    first = {"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": None,
                             "logprobs": None}
                    last = {"index": 0, "delta": {}, "finish_reason": reason, "logprobs": None}
                else:
                    first = {"index": 0, "text": text, "finish_reason": None, "logprobs": None}
                    last = {"index": 0, "text": "", "finish_reason": reason, "logprobs": None}
                yield _sse({**head, "choices": [first]})
                yield _sse({**head, "choices": [last]})
                if want_usage and isinstance(answer.get("usage"), dict):
                    yield _sse({**head, "choices": [], "usage": answer["usage"]})
                yield b"data: [DONE]\n\n"
                outcome = "ok"
            finally:
                await finish(outcome)

        return events()

    # --------------------------------------------------------------------------- policies
    async def cascade(body: dict, path: str, endpoint: str, threshold: float, prompt: str, stream: bool,
                      rec: dict):
        """Call the cascade's models in order until one is trusted (see the README): returns
        ``(name, answer, cost, None)`` with the total cost of every call, or, when the last model
        is streamed, ``(name, None, cost of the calls before it, BackendStream)``."""
        cfg = config.cascade
        chat = endpoint == "chat"
        called = rec["models_called"]
        steps: list[dict] = []
        rec["cascade"] = {"threshold": threshold, "steps": steps}
        plain = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        gated = dict(plain)
        added_logprobs = cfg.request_logprobs and not body.get("logprobs")
        if added_logprobs:
            gated["logprobs"] = True if chat else 1
        spent: float | None = 0.0
        for i, step in enumerate(cfg.models):
            last = i == len(cfg.models) - 1
            if last and stream:
                sbody = {**body, "stream_options": {**(body.get("stream_options") or {}), "include_usage": True}}
                name, backend_stream = await call_chain(step, path, sbody, stream=True, called=called)
                steps.append({"model": name, "decision": "final"})
                return name, None, spent, backend_stream
            try:
                name, answer = await call_chain(step, path, plain if last else gated, stream=False, called=called)
            except GatewayError as e:
                if last or e.outcome not in ("backends_failed", "overloaded"):
                    raise
                steps.append({"model": step, "decision": "failed"})  # escalate past a failed model
                continue
            cost = account(name, answer.get("usage"))
            spent = None if spent is None or cost is None else spent + cost
            if last or name != step:  # the last model, or a fallback of the step answered: final
                steps.append({"model": name, "decision": "final", "cost_usd": cost,
                              "usage": _tokens(answer.get("usage"))})
                return name, answer, spent, None
            p = float(scorer.predict_proba([prompt], [answer_text(answer, chat)])[0]) if scorer is not None else None
            lp = mean_logprob(answer)
            conf = combine_confidence(p, lp, cfg.logprob_weight)
            accept = conf is not None and conf >= threshold
            steps.append({"model": name, "decision": "accept" if accept else "escalate", "scorer": p,
                          "mean_logprob": lp, "confidence": conf, "cost_usd": cost,
                          "usage": _tokens(answer.get("usage"))})
            metrics.policy_decisions.labels(policy="cascade", decision="accepted" if accept else "escalated").inc()
            if accept:
                if added_logprobs:  # the client did not ask for them
                    for choice in answer.get("choices") or []:
                        if isinstance(choice, dict):
                            choice["logprobs"] = None
                return name, answer, spent, None
        raise AssertionError("unreachable: the last cascade model always returns")  # pragma: no cover

    def write_log(rec: dict, outcome: str, t0: float) -> None:
        """One line of the request log (when configured); never blocks (a full queue: dropped)."""
        log = state["log"]
        if log is None:
            return
        line = {"time": rec["time"], "request_id": rec["request_id"], "endpoint": rec["endpoint"],
                "policy": rec["policy"], "models_called": rec["models_called"], "model": rec["model"],
                "latency_s": round(time.perf_counter() - t0, 6), "cost_usd": rec["cost_usd"], "status": outcome,
                "stream": rec["stream"]}
        prompt = rec.get("_prompt")
        if prompt is not None:
            if config.log.prompts == "text":
                line["prompt"] = prompt
                answer = rec.get("_answer")
                line["answer"] = "".join(answer) if isinstance(answer, list) else answer
            else:
                line["prompt_sha256"] = prompt_hash(prompt)
        for key in ("rule", "cache", "router", "cascade", "usage"):
            if key in rec:
                line[key] = rec[key]
        if not log.log(line):
            metrics.log_dropped.inc()

    def answer_headers(rec: dict, cost: float | None) -> dict:
        headers = {"x-leanscale-model": rec["model"], "x-leanscale-models-called": ",".join(rec["models_called"]),
                   "x-leanscale-request-id": rec["request_id"]}
        if cost is not ...:
            headers["x-leanscale-cost-usd"] = _cost_header(cost)
        steps = (rec.get("cascade") or {}).get("steps") or []
        confidences = [f"{st['confidence']:.6g}" for st in steps if st.get("confidence") is not None]
        if confidences:
            headers["x-leanscale-confidence"] = ",".join(confidences)
        return headers

    async def completions(request: Request, endpoint: str, path: str):
        t0 = time.perf_counter()
        outcome, label = "internal_error", _NO_MODEL
        streaming = False
        rec: dict[str, Any] = {"time": round(time.time(), 6), "request_id": uuid.uuid4().hex, "endpoint": endpoint,
                               "policy": None, "models_called": [], "model": None, "cost_usd": None,
                               "stream": False}

        async def finish(final_outcome: str) -> None:
            state["in_flight"] -= 1
            metrics.in_flight.set(state["in_flight"])
            metrics.child(metrics.requests, endpoint, label, final_outcome).inc()
            metrics.child(metrics.latency, endpoint).observe(time.perf_counter() - t0)
            write_log(rec, final_outcome, t0)

        def failed(e: GatewayError) -> JSONResponse:
            response = error_response(e)
            response.headers["x-leanscale-request-id"] = rec["request_id"]
            if rec["models_called"]:
                response.headers["x-leanscale-models-called"] = ",".join(rec["models_called"])
            return response

        done = _Done(finish)
        try:
            check_key(request)
            if state["in_flight"] >= config.max_in_flight:
                raise GatewayError(429, f"the gateway is answering {config.max_in_flight} requests already "
                                   "(max_in_flight); retry later.", "rate_limit_error", "gateway_overloaded",
                                   headers={"retry-after": "1"}, outcome="overloaded")
        except GatewayError as e:
            metrics.child(metrics.requests, endpoint, _NO_MODEL, e.outcome).inc()
            write_log(rec, e.outcome, t0)
            return failed(e)
        state["in_flight"] += 1
        metrics.in_flight.set(state["in_flight"])
        try:
            body = await read_json(request)
            kind, label, arg = check_body(body, endpoint)
            rec["policy"] = body["model"][:200]
            stream = bool(body.get("stream"))
            rec["stream"] = stream
            prompt = prompt_text(body, endpoint == "chat") if kind != "model" or state["log"] is not None else None
            if state["log"] is not None:
                rec["_prompt"] = prompt
                if config.log.prompts == "text":
                    rec["_answer"] = []
            # Before any policy or backend: canned answers (rules), then the response cache.
            want_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            early = None
            if rules is not None:
                rule = rules.match_body(body)
                if rule is not None:
                    from .rules import completion_json

                    early = completion_json(rule, body, endpoint=endpoint)
                    rec["rule"] = rule.name
                    metrics.policy_decisions.labels(policy="rules", decision=rule.name[:64]).inc()
            if early is None and cache is not None:
                hit = await cache_get(body)
                if hit is not None:
                    early, rec["cache"] = hit
                    metrics.child(metrics.policy_decisions, "cache", rec["cache"]).inc()
            if early is not None:
                if "cache" in rec:  # the configured model that answered originally (no backend called now)
                    stored = early.pop(_CACHE_MODEL_KEY, None)
                    label = stored if stored in config.model_names else _NO_MODEL
                    rec["model"] = stored if isinstance(stored, str) else str(early.get("model") or _NO_MODEL)
                else:
                    label = rec["model"] = RULES_MODEL
                rec["cost_usd"] = 0.0
                if "_answer" in rec:
                    rec["_answer"] = answer_text(early, endpoint == "chat")
                headers = answer_headers(rec, 0.0)
                if "cache" in rec:
                    headers["x-leanscale-cache"] = rec["cache"]
                if stream:
                    streaming = True
                    return _SSEResponse(whole_events(early, want_usage, done),
                                        headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"},
                                        on_close=done)
                outcome = "ok"
                return JSONResponse(early, headers=headers)
            extra_cost: float | None = 0.0
            backend_stream = None
            if kind == "cascade":
                name, answer, cost, backend_stream = await cascade(body, path, endpoint, arg, prompt, stream, rec)
                if backend_stream is not None:
                    extra_cost = cost
            else:
                target = arg
                if kind == "router":
                    try:
                        target, info = router_policy.decide(prompt, arg)
                    except InvalidParameterError as exc:
                        raise GatewayError(400, f"'model' {body['model'][:100]!r}: {exc}", "invalid_request_error",
                                           "invalid_value", "model", model=label) from None
                    rec["router"] = {"choice": target, **info}
                    metrics.policy_decisions.labels(policy="router", decision=target).inc()
                if stream:
                    sbody = {**body, "stream_options": {**(body.get("stream_options") or {}), "include_usage": True}}
                    name, backend_stream = await call_chain(target, path, sbody, stream=True,
                                                            called=rec["models_called"])
                else:
                    name, answer = await call_chain(target, path, body, stream=False, called=rec["models_called"])
                    cost = account(name, answer.get("usage"))
                    if _tokens(answer.get("usage")) is not None:
                        rec["usage"] = _tokens(answer.get("usage"))
            label = name
            rec["model"] = name
            if backend_stream is not None:
                async def finish_stream(final_outcome: str) -> None:
                    # the request's slot first, then the backend's stream, bounded: a close that
                    # hangs (a cancelled read inside the HTTP client) must not hold the slot
                    try:
                        await done(final_outcome)
                    finally:
                        try:
                            await asyncio.wait_for(backend_stream.aclose(), timeout=STREAM_CLOSE_TIMEOUT_S)
                        except asyncio.TimeoutError:
                            logger.warning("closing the stream of backend %r took over %g s: abandoned", name,
                                           STREAM_CLOSE_TIMEOUT_S)
                        except Exception as exc:  # noqa: BLE001 -- the answer is over; log, never raise
                            logger.info("closing the stream of backend %r failed: %r", name, exc)

                streaming = True
                return _SSEResponse(relay(name, backend_stream, want_usage, endpoint, finish_stream, extra_cost, rec,
                                          cache_body=body),
                                    headers={**answer_headers(rec, ...), "cache-control": "no-cache",
                                             "x-accel-buffering": "no"}, on_close=_Done(finish_stream))
            rec["cost_usd"] = cost
            if cache is not None:
                await cache_put(body, answer, name)  # before cost_usd is added: a hit costs nothing
            if cost is not None:
                answer["usage"]["cost_usd"] = cost
            if "_answer" in rec:
                rec["_answer"] = answer_text(answer, endpoint == "chat")
            if stream:  # a cascade's whole answer, streamed after the decision
                streaming = True
                return _SSEResponse(answer_events(answer, want_usage, endpoint, done),
                                    headers={**answer_headers(rec, ...), "cache-control": "no-cache",
                                             "x-accel-buffering": "no"}, on_close=done)
            outcome = "ok"
            return JSONResponse(answer, headers=answer_headers(rec, cost))
        except GatewayError as e:
            outcome = e.outcome
            if e.model != _NO_MODEL:
                label = e.model
            return failed(e)
        finally:
            if not streaming:
                await done(outcome)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await completions(request, "chat", "chat/completions")

    @app.post("/v1/completions")
    async def text_completions(request: Request):
        return await completions(request, "completions", "completions")

    @app.get("/v1/models")
    async def list_models(request: Request):
        try:
            check_key(request)
        except GatewayError as e:
            return error_response(e)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "leanscale"}
                                           for name in all_names]}

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "pid": os.getpid(), "models": config.model_names, "policies": config.policy_names,
                "in_flight": state["in_flight"],
                "max_in_flight": config.max_in_flight}

    @app.get("/metrics")
    async def prometheus_metrics():
        refresh_gauges()
        return Response(metrics.render(), media_type=_METRICS_CONTENT_TYPE)

    return app


# ------------------------------------------------------------------------------------ workers
WORKER_CONFIG_ENV = "LEANSCALE_GATEWAY_CONFIG"  # the YAML path each worker process reads
WORKER_OPTIONS_ENV = "LEANSCALE_GATEWAY_WORKER"  # JSON: docs, max_connections, timeout_idle, parent_pid
_WORKER_APP = "leanscale.cascade.gateway.app:_worker_app"
_WORKER_PROTOCOL = "leanscale.cascade.gateway.app:_worker_protocol"
_worker_state: dict[str, Any] = {}


def _worker_options() -> dict:
    raw = os.environ.get(WORKER_OPTIONS_ENV)
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except ValueError:
        options = None
    if not isinstance(options, dict):
        raise InvalidParameterError(f"the environment variable {WORKER_OPTIONS_ENV} must hold a JSON object (set by "
                                    f"serve_gateway for its workers). Got {raw[:100]!r}.")
    return options


def _die_with_parent(parent_pid: Any) -> None:
    """Linux: this process gets SIGTERM (a graceful stop) when its parent dies, even by SIGKILL,
    so no worker outlives the supervisor; exits at once when the parent is already gone."""
    if not isinstance(parent_pid, int) or not hasattr(os, "getppid"):
        return
    import sys

    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        with contextlib.suppress(Exception):  # no libc / no prctl: the supervisor's own SIGTERM still works
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the supervisor died before the call above: do not serve orphaned
        raise SystemExit(0)


def _worker_app():
    """The app of one worker process: ``create_gateway_app`` of the YAML file named by the
    environment variable ``LEANSCALE_GATEWAY_CONFIG``. :func:`serve_gateway` (``workers > 1``)
    runs it with uvicorn's ``factory=True``; any process manager can too, e.g.
    ``LEANSCALE_GATEWAY_CONFIG=gw.yaml gunicorn -w 4 -k uvicorn.workers.UvicornWorker
    'leanscale.cascade.gateway.app:_worker_app()'``."""
    path = os.environ.get(WORKER_CONFIG_ENV)
    if not path:
        raise InvalidParameterError(f"the environment variable {WORKER_CONFIG_ENV} must name the gateway's YAML "
                                    "config for a worker process. It is not set.")
    options = _worker_options()
    _die_with_parent(options.get("parent_pid"))
    return create_gateway_app(path, docs=bool(options.get("docs", False)))


def _worker_protocol(*args, **kwargs):
    """uvicorn's ``http`` protocol of a worker: the connection limits of ``leanscale serve``
    (``max_connections``, ``timeout_idle`` from ``LEANSCALE_GATEWAY_WORKER``), built once per
    process (the class cannot travel to a spawned worker: it is made by a function)."""
    cls = _worker_state.get("protocol")
    if cls is None:
        from leanscale.cascade.server import _protocol_class

        options = _worker_options()
        cls = _worker_state["protocol"] = _protocol_class(int(options.get("max_connections", 1000)),
                                                          float(options.get("timeout_idle", 10.0)), None)
    return cls(*args, **kwargs)


def serve_gateway(config, host: str = "127.0.0.1", port: int = 8080, *, workers: int = 1, log_level: str = "info",
                  access_log: bool = False, docs: bool = False, **options) -> None:
    """Serve the gateway with uvicorn until interrupted (SIGTERM: drain, then return).

    Args:
        config: a :class:`GatewayConfig` or the path of its YAML file (a path when ``workers > 1``).
        host, port: where to listen; loopback unless told otherwise.
        workers: worker processes. 1 serves in this process. ``N > 1``: uvicorn's supervisor binds
            the socket and runs N processes that share it, each reading the YAML file (named to
            them by the environment variable ``LEANSCALE_GATEWAY_CONFIG``) with
            :func:`_worker_app`; SIGTERM / SIGINT stop them all, and on Linux a worker also stops
            when the supervisor dies. Each worker has its own response cache, circuit breakers,
            in-flight bound, ``max_concurrency`` slots and request log writer: set
            ``cache.redis_url`` (exact cache hits) and ``state.redis_url`` (breakers) to share
            them; give each worker its own ``log.path`` or rotate from outside. ``/metrics``
            reports all workers together (prometheus_client's multi-process mode, in a temporary
            folder, or in ``PROMETHEUS_MULTIPROC_DIR`` when set).
        log_level, access_log, docs: uvicorn's log level, one line per request, Swagger UI at /docs.
        options: the connection limits of :func:`leanscale.cascade.server.server_config`
            (``max_connections`` per process, ``timeout_keep_alive``, ``timeout_idle``,
            ``timeout_graceful_shutdown``, ``backlog``, ``max_header_bytes``).

    Raises:
        InvalidParameterError: ``workers`` is not an integer >= 1, or ``workers > 1`` with a
            :class:`GatewayConfig` object.
    """
    from leanscale.cascade.server import _is_loopback, _run, server_config
    from leanscale.core.validation import Interval, check_param

    workers = int(check_param("workers", workers, [Interval(int, 1, None)], "serve_gateway"))
    if workers > 1 and not isinstance(config, (str, Path)):
        raise InvalidParameterError(
            f"The 'workers' parameter of serve_gateway is {workers}: each worker process reads the config itself, "
            f"so 'config' must be the path of the gateway YAML file. Got a {type(config).__name__} object "
            "instead (use workers=1, or pass the YAML path).")
    path = Path(config).resolve() if isinstance(config, (str, Path)) else None
    if path is not None:
        config = GatewayConfig.from_yaml(path)
    app = create_gateway_app(config, docs=docs)  # workers > 1: checks the config (keys, policies) here, once
    uv_config = server_config(app, host=host, port=port, log_level=log_level, access_log=access_log, **options)
    if not _is_loopback(str(host)) and config.client_keys_env is None:
        logger.warning("serving the gateway on %s without client keys (client_keys_env): anyone who can reach this "
                       "address can spend the backends' budget. Set client_keys_env, or bind to 127.0.0.1.", host)
    if workers == 1:
        _run(uv_config)
        return
    if config.cache is not None and config.cache.get("enabled") and config.cache.get("redis_url") is None:
        logger.info("%d workers: each has its own response cache (set cache.redis_url to share exact hits)", workers)
    if config.state.redis_url is None:
        logger.info("%d workers: each has its own circuit breakers (set state.redis_url to share them)", workers)
    _serve_workers(path, uv_config, workers, docs=docs, log_level=log_level, access_log=access_log,
                   timeout_idle=float(options.get("timeout_idle", 10.0)))


def _serve_workers(path: Path, uv_config, workers: int, *, docs: bool, log_level: str, access_log: bool,
                   timeout_idle: float) -> None:
    """uvicorn's multi-process supervisor over :func:`_worker_app` (``factory=True``), with the
    limits already checked in ``uv_config``; the environment tells the workers the rest."""
    import shutil
    import tempfile

    import uvicorn

    saved = {k: os.environ.get(k) for k in (WORKER_CONFIG_ENV, WORKER_OPTIONS_ENV, METRICS_DIR_ENV)}
    # the workers' metrics in one folder (prometheus_client's multi-process mode: /metrics of any
    # worker reports them all); a folder the user set is kept, ours is removed at the end
    own_metrics_dir = None
    if not os.environ.get(METRICS_DIR_ENV):
        own_metrics_dir = os.environ[METRICS_DIR_ENV] = tempfile.mkdtemp(prefix="leanscale-gateway-metrics-")
    os.environ[WORKER_CONFIG_ENV] = str(path)
    os.environ[WORKER_OPTIONS_ENV] = json.dumps({
        "docs": bool(docs), "max_connections": int(uv_config.leanscale_max_connections),
        "timeout_idle": timeout_idle, "parent_pid": os.getpid()})
    try:
        uvicorn.run(_WORKER_APP, factory=True, workers=workers, host=uv_config.host, port=uv_config.port,
                    log_level=log_level, access_log=access_log, ws="none", lifespan="on", http=_WORKER_PROTOCOL,
                    backlog=uv_config.backlog, timeout_keep_alive=uv_config.timeout_keep_alive,
                    timeout_graceful_shutdown=uv_config.timeout_graceful_shutdown,
                    h11_max_incomplete_event_size=uv_config.h11_max_incomplete_event_size)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if own_metrics_dir is not None:
            shutil.rmtree(own_metrics_dir, ignore_errors=True)
