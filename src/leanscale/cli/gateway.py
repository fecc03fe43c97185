"""``leanscale gateway``: serve the OpenAI-compatible LLM gateway (fallback chains, cost per
request, client keys, metrics) from a YAML config.

Thin: reads the config with :meth:`leanscale.cascade.gateway.GatewayConfig.from_yaml` and runs
:func:`leanscale.cascade.gateway.serve_gateway` (``pip install 'leanscale[gateway]'``).
"""

from __future__ import annotations

import argparse

from leanscale.cli import add_command

EPILOG = """\
examples:
  leanscale gateway --config gateway.yaml                  http://127.0.0.1:8080/v1 (OpenAI API)
  leanscale gateway --config gateway.yaml --port 9000 --log-level warning

  python -c "import openai; c = openai.OpenAI(base_url='http://127.0.0.1:8080/v1', api_key='...');
             print(c.chat.completions.create(model='small', messages=[{'role': 'user', 'content': 'hi'}]))"
  curl -s localhost:8080/v1/models                          the configured models
  curl -s localhost:8080/metrics                            Prometheus metrics (requests, cost, latency)

config (YAML): models (name, base_url, optional model, api_key_env, input_price_per_1k,
output_price_per_1k, timeout_s, max_concurrency), fallbacks (model -> [models tried next on an error,
a timeout or a 429]), client_keys_env (a variable holding the comma-separated keys clients must send).
See src/leanscale/cascade/gateway/README.md.
"""

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = add_command(
        subparsers, "gateway", help="serve an OpenAI-compatible LLM gateway (fallbacks, cost, keys, metrics)",
        description="Serve an OpenAI-compatible gateway in front of OpenAI-compatible backends: "
        "POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /healthz, GET /metrics. "
        "A failing backend falls back to the next model of its chain.",
        epilog=EPILOG,
    )
    p.add_argument("--config", required=True, help="the gateway's YAML config")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (127.0.0.1; set client_keys_env before binding wider)")
    p.add_argument("--port", type=int, default=8080, help="port (8080)")
    p.add_argument("--max-connections", type=int, default=1000,
                   help="open connections at most; at the limit the longest idle one is closed (1000)")
    p.add_argument("--timeout-graceful-shutdown", type=float, default=30.0,
                   help="on SIGTERM, wait at most this many seconds for the requests in flight (30)")
    p.add_argument("--docs", action="store_true", help="serve the Swagger UI at /docs (loaded from a CDN)")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS, metavar="LEVEL",
                   help=f"uvicorn log level: {', '.join(LOG_LEVELS)} (info)")
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from leanscale.cascade.gateway import serve_gateway

    serve_gateway(args.config, host=args.host, port=args.port, log_level=args.log_level,
                  access_log=args.access_log, docs=args.docs, max_connections=args.max_connections,
                  timeout_graceful_shutdown=args.timeout_graceful_shutdown)
    return 0
