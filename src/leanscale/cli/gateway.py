"""``leanscale gateway``: serve the OpenAI-compatible LLM gateway (fallback chains, cost per
request, client keys, metrics, learned routing) from a YAML config; ``leanscale gateway replay``
turns its request log and an outcomes file into the cost-quality frontier of each policy, and
``leanscale gateway train`` into a router / cascade scorer.

Thin: serving reads the config with :meth:`leanscale.cascade.gateway.GatewayConfig.from_yaml` and
runs :func:`leanscale.cascade.gateway.serve_gateway`; replay and train call
:mod:`leanscale.cascade.gateway.replay` (``pip install 'leanscale[gateway]'``).
"""

from __future__ import annotations

import argparse
import sys

from leanscale.cli import add_command, print_json

EPILOG = """\
examples:
  leanscale gateway --config gateway.yaml                  http://127.0.0.1:8080/v1 (OpenAI API)
  leanscale gateway --config gateway.yaml --port 9000 --workers 4 --log-level warning

  python -c "import openai; c = openai.OpenAI(base_url='http://127.0.0.1:8080/v1', api_key='...');
             print(c.chat.completions.create(model='small', messages=[{'role': 'user', 'content': 'hi'}]))"
  curl -s localhost:8080/v1/models                          the configured models and policies
  curl -s localhost:8080/metrics                            Prometheus metrics (requests, cost, latency)

  leanscale gateway replay requests.jsonl --outcomes outcomes.jsonl --config gateway.yaml
                                      cost-quality frontier: always-<model>, random, router, cascade, logged
  leanscale gateway replay requests.jsonl --outcomes outcomes.csv --config gateway.yaml --json --out frontier.json
  leanscale gateway train requests.jsonl --outcomes outcomes.jsonl --out policies/ --config gateway.yaml
                                      writes policies/router and policies/scorer for router.path / cascade.scorer

config (YAML): models (name, base_url, optional model, api_key_env, input_price_per_1k,
output_price_per_1k, timeout_s, max_concurrency), fallbacks (model -> [models tried next on an error,
a timeout or a 429]), client_keys_env (a variable holding the comma-separated keys clients must send),
router, cascade, log {path, prompts: hash|text}.

outcomes file (JSONL, or CSV with a header): one row per (prompt, model): prompt | prompt_sha256 |
request_id, model, correct (true/false) | score (number), optional answer, cost_usd, prompt_tokens +
completion_tokens. See src/leanscale/cascade/gateway/README.md and gateway/replay.py.
"""

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = add_command(
        subparsers, "gateway",
        help="serve an OpenAI-compatible LLM gateway; replay its log; train its router",
        description="Serve an OpenAI-compatible gateway in front of OpenAI-compatible backends: "
        "POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /healthz, GET /metrics. "
        "A failing backend falls back to the next model of its chain. Without an action it serves; "
        "'replay' and 'train' work offline on its request log.",
        epilog=EPILOG,
    )
    p.add_argument("--config", help="the gateway's YAML config (required to serve)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (127.0.0.1; set client_keys_env before binding wider)")
    p.add_argument("--port", type=int, default=8080, help="port (8080)")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes sharing the port (1); each holds its own cache, breakers and metrics "
                   "unless the config sets redis")
    p.add_argument("--max-connections", type=int, default=1000,
                   help="open connections at most; at the limit the longest idle one is closed (1000)")
    p.add_argument("--timeout-graceful-shutdown", type=float, default=30.0,
                   help="on SIGTERM, wait at most this many seconds for the requests in flight (30)")
    p.add_argument("--docs", action="store_true", help="serve the Swagger UI at /docs (loaded from a CDN)")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS, metavar="LEVEL",
                   help=f"uvicorn log level: {', '.join(LOG_LEVELS)} (info)")
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.set_defaults(func=run, print_help=p.print_help)
    actions = p.add_subparsers(dest="action", title="actions (optional; without one: serve)", metavar="<action>")

    r = actions.add_parser(
        "replay", help="the cost-quality frontier of each policy on the logged traffic",
        description="Replay the request log with its outcomes: always-<model>, random at a sweep of strong "
        "fractions, leanscale-router at a sweep of knobs (re-deciding each logged prompt with the saved router), "
        "leanscale-cascade at a sweep of thresholds (needs the cheap model's answers) and what the logged "
        "traffic did: mean quality, mean USD per request, share of calls per model; for two models the gap "
        "recovered at 20% / 50% strong calls.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("log", help="the gateway's JSONL request log")
    r.add_argument("--outcomes", required=True, help="the outcomes file (.jsonl or .csv)")
    r.add_argument("--config", dest="replay_config",
                   help="the gateway's YAML config: prices, router.path, cascade.scorer and cascade.models")
    r.add_argument("--router", help="a saved router folder (default: the config's router.path)")
    r.add_argument("--scorer", help="a saved cascade scorer folder (default: the config's cascade.scorer)")
    r.add_argument("--json", action="store_true", help="print the result as JSON")
    r.add_argument("--out", help="also write the result as JSON to this file")
    r.set_defaults(action_func=run_replay)

    t = actions.add_parser(
        "train", help="train the router (and the cascade scorer) from the request log and outcomes",
        description="Train leanscale-router's router on the logged prompts and each model's outcomes, and the "
        "cascade's answer scorer when the cheap model's answers are known (a 'prompts: text' log or an "
        "'answer' column); writes OUT/router and OUT/scorer for the config's router.path / cascade.scorer.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("log", help="the gateway's JSONL request log")
    t.add_argument("--outcomes", required=True, help="the outcomes file (.jsonl or .csv)")
    t.add_argument("--out", required=True, help="the folder to write (router/ and scorer/ inside)")
    t.add_argument("--config", dest="train_config",
                   help="the gateway's YAML config: prices (the router then prices from token counts) and "
                   "cascade.models[0] (the cheap model)")
    t.add_argument("--score-threshold", type=float,
                   help="with 'score' outcomes: a score >= this counts as correct (required then)")
    t.add_argument("--features", default="tfidf", choices=("tfidf", "minilm"), help="the router's features (tfidf)")
    t.add_argument("--json", action="store_true", help="print the result as JSON")
    t.set_defaults(action_func=run_train)
    return p


def run(args) -> int:
    action = getattr(args, "action_func", None)
    if action is not None:
        return action(args)
    if args.config is None:
        print("leanscale gateway: error: --config is required to serve (or give an action: replay, train).",
              file=sys.stderr)
        return 2
    if args.workers < 1:
        print(f"leanscale gateway: error: --workers must be >= 1. Got {args.workers}.", file=sys.stderr)
        return 2
    from leanscale.cascade.gateway import serve_gateway

    serve_gateway(args.config, host=args.host, port=args.port, log_level=args.log_level,
                  access_log=args.access_log, docs=args.docs, max_connections=args.max_connections,
                  timeout_graceful_shutdown=args.timeout_graceful_shutdown, workers=args.workers)
    return 0


def run_replay(args) -> int:
    from leanscale.cascade.gateway.replay import replay
    from leanscale.core.io import atomic_write_json

    result = replay(args.log, args.outcomes, args.replay_config, router=args.router, scorer=args.scorer)
    if args.out:
        atomic_write_json(args.out, result.to_dict())
    if args.json:
        return print_json(result.to_dict())
    print(result.format_table())
    return 0


def run_train(args) -> int:
    from leanscale.cascade.gateway.replay import train_from_log

    result = train_from_log(args.log, args.outcomes, args.out, args.train_config,
                            score_threshold=args.score_threshold, features=args.features)
    if args.json:
        return print_json(result)
    print(f"trained on {result['prompts']} distinct prompts")
    print(f"router: {result['router'] or 'not trained'}")
    print(f"scorer: {result['scorer'] or 'not trained'}")
    if result["config"]:
        import yaml

        print("\nfor the gateway's config:\n" + yaml.safe_dump(result["config"], sort_keys=False).rstrip())
    for note in result["notes"]:
        print(f"note: {note}")
    return 0
