"""``leanscale serve``: serve a saved cascade over HTTP (micro-batching, fallback, metrics).

Thin: loads the cascade with :meth:`leanscale.cascade.Cascade.load` and runs
:func:`leanscale.cascade.server.serve` (FastAPI + uvicorn; ``pip install 'leanscale[serve]'``).
"""

from __future__ import annotations

import argparse

from leanscale.cli import add_command

EPILOG = """\
examples:
  leanscale serve cascade.json                              http://127.0.0.1:8000 (/docs with --docs)
  leanscale serve cascade.json --port 9000 --max-batch 128 --max-wait-ms 5
  leanscale serve cascade.json --objects mypkg.stages:OBJECTS   callable/rule/external stages by name

  curl -s localhost:8000/v1/predict -H 'content-type: application/json' -d '{"text": "refund please"}'
  curl -s localhost:8000/metrics                            Prometheus metrics
  curl -s localhost:8000/healthz                            503 when requests wait over --max-queue-age

Regex stages, leanscale text models, scikit-learn models (saved with skops) and torch modules (saved as an
exported graph) load from the file alone: --objects is needed only for stages saved by name (rule and
callable stages, and model stages whose transform or model is user code: Cascade.save warns about those).

limits: a full queue answers 503 at once; a request not answered in --request-timeout gets 504; a text no
stage could answer gets 503 with the reason (never a 200 without a label) unless the cascade has a
fallback_label; at most --max-connections connections (the longest idle one is closed to make room); a
connection must send its request head within --timeout-idle; SIGTERM stops accepting, finishes the requests
in flight (up to --timeout-graceful-shutdown) and exits 0.
"""


# uvicorn's log levels (uvicorn.config.LOG_LEVELS; not imported so that --help works without uvicorn)
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")

# The server's limits and timeouts: (flag, type, default, help).
_LIMITS: tuple[tuple[str, type, int | float, str], ...] = (
    ("--max-batch", int, 64, "most texts per cascade call (64)"),
    ("--max-wait-ms", float, 2.0, "wait at most this long after the first text for a batch to fill (2)"),
    ("--max-queue", int, 1024, "texts waiting at most; beyond, answer 503 (1024)"),
    ("--max-items-per-request", int, 256, "texts per request at most (256)"),
    ("--max-text-chars", int, 10_000, "characters per text at most (10000)"),
    ("--max-body-bytes", int, 1_000_000, "request body size at most (1000000)"),
    ("--request-timeout", float, 30.0, "answer 504 when a request is not answered in this many seconds (30)"),
    ("--body-timeout", float, 10.0, "answer 408 when the request body does not arrive in this many seconds (10)"),
    ("--max-queue-age", float, 10.0,
     "/healthz answers 503 once a request has waited longer than this, in seconds (10)"),
    ("--max-connections", int, 1000,
     "open connections at most; at the limit the longest idle one is closed (1000)"),
    ("--timeout-idle", float, 10.0,
     "close a connection that sends no complete request head in this many seconds (10)"),
    ("--timeout-keep-alive", float, 5.0, "close an idle keep-alive connection after this many seconds (5)"),
    ("--timeout-graceful-shutdown", float, 30.0,
     "on SIGTERM, wait at most this many seconds for the requests in flight (30)"),
    ("--backlog", int, 1024, "listen backlog (1024)"),
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = add_command(
        subparsers, "serve", help="serve a saved cascade over HTTP (micro-batching, fallback, metrics)",
        description="Serve a saved leanscale cascade: POST /v1/predict, GET /healthz, GET /metrics (Prometheus), "
        "GET /openapi.json (and GET /docs with --docs). Requests are micro-batched; a failing stage falls back to "
        "the next one.",
        epilog=EPILOG,
    )
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``leanscale serve`` (shared with ``leanscale cascade serve``)."""
    p.add_argument("cascade", help="the cascade JSON written by Cascade.save")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (127.0.0.1; the server has no authentication, so bind wider with care)")
    p.add_argument("--port", type=int, default=8000, help="port (8000)")
    for flag, kind, default, text in _LIMITS:
        p.add_argument(flag, type=kind, default=default, help=text)
    p.add_argument("--docs", action="store_true",
                   help="serve the Swagger UI at /docs (your browser loads it from a CDN; off by default)")
    p.add_argument("--objects", default=None, metavar="MODULE:NAME",
                   help="'package.module:name' of a dict (or a function returning one) mapping stage names to the "
                   "functions/models of stages saved by name (callable, rule, external model)")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS, metavar="LEVEL",
                   help=f"uvicorn log level: {', '.join(LOG_LEVELS)} (info)")
    p.add_argument("--access-log", action="store_true", help="log every request")


def _objects(spec: str | None, owner: str = "leanscale serve") -> dict | None:
    """The stage objects ``--objects`` names: a dict of str -> object, or a callable taking no
    arguments that returns one (never called when its signature needs arguments)."""
    if spec is None:
        return None
    from leanscale.cli._spec import call_without_arguments, import_object
    from leanscale.core.errors import InvalidParameterError

    value = import_object(spec, "--objects", owner)
    expected = (f"The '--objects' parameter of {owner} must name a dict of stage name -> object, or a "
                "callable that takes no arguments and returns one.")
    if callable(value) and not isinstance(value, dict):
        value = call_without_arguments(value, spec, expected)
    if not isinstance(value, dict):
        raise InvalidParameterError(f"{expected} Got {type(value).__name__} from {spec!r}.")
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise InvalidParameterError(
            f"{expected} Got a dict from {spec!r} with keys that are not stage names (str): {bad[:5]!r:.200}.")
    return value


def run(args) -> int:
    from leanscale.cascade.server import serve

    serve(args.cascade, host=args.host, port=args.port, objects=_objects(args.objects), log_level=args.log_level,
          access_log=args.access_log, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
          max_queue=args.max_queue, max_items_per_request=args.max_items_per_request,
          max_text_chars=args.max_text_chars, max_body_bytes=args.max_body_bytes,
          request_timeout_s=args.request_timeout, body_timeout_s=args.body_timeout,
          max_queue_age_s=args.max_queue_age, docs=args.docs, max_connections=args.max_connections,
          timeout_idle=args.timeout_idle, timeout_keep_alive=args.timeout_keep_alive,
          timeout_graceful_shutdown=args.timeout_graceful_shutdown, backlog=args.backlog)
    return 0
