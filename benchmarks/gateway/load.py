"""Load test of the LLM gateway (issue #16): 10,000 chat completions from 64 concurrent clients
through the gateway while the ``small`` backend fails at random -- 5% of its calls answer HTTP
500 and 1% hang for longer than its ``timeout_s`` -- with a fallback ``small -> big``.

Processes (see ``benchmarks/gateway/common.py``): the client (raw HTTP/1.1 over asyncio streams, one
keep-alive connection per concurrent client) in this process, the gateway (uvicorn configured as
``leanscale gateway`` serves it, default limits, breaker and backoff) in a second one, each fake backend
(:class:`~leanscale.cascade.gateway.testing.FakeOpenAIBackend` with random per-call faults) in a
process of its own. No cache, no router: the request's ``model`` is ``small``. The fakes answer
after ``--backend-latency-ms`` (300) times a uniform factor in [0.5, 1.5] (``--latency-jitter``): with
a constant latency, 64 closed-loop clients that start together stay synchronized in waves of 64
requests that reach the gateway at the same instant (measured: +63..75 ms p50 at 64 clients, the
time the gateway needs to work through one wave), which real LLM backends do not do. The latency
draws are reseeded at the start of every phase, so every phase sees the same answer times.

Phases, in one run, in this order (each after a warm-up that is not counted):

1. ``direct_unloaded`` / ``gateway_unloaded``: ``--unloaded-requests`` requests one at a time,
   straight to the small fake, then through the gateway (no faults; the fakes answering at once,
   ``--unloaded-latency-ms`` 0) -- the gateway's own time per request.
2. ``direct``: ``--requests`` requests from ``--concurrency`` clients straight to the small fake
   (no faults).
3. ``gateway_clean``: the same through the gateway (no faults).
4. ``gateway_faults``: the same through the gateway with the faults on -- the load test proper.
5. A leak probe: faults off, the hung calls over, ``small`` answering again (a circuit breaker
   opened by the faults would first have to let a probe through), its answers taking 300 ms (at
   most half its timeout); exactly ``max_concurrency`` requests at once for ``small``: none may be
   refused by the gateway as "saturated" (a concurrency slot leaked by a failed, timed-out or
   cancelled call would do that), and ``/healthz`` must report 0 requests in flight.

A request is **lost** when it gets no answer (connection error or the client's timeout), a
non-200 without OpenAI's error body, or a 200 without ``choices[0].message.content``. Goal: 0.
**Gateway overhead** = p50 through the gateway minus p50 of the direct calls to the same fake
(both without faults, same client, same concurrency); goal: <= 2 ms (no cache, no router). It is
reported unloaded (one request at a time: the gateway's own per-request time) and at
``--concurrency`` clients (on a small machine, mostly the queueing of a CPU-bound extra hop).

Usage: python benchmarks/gateway/load.py [--requests 10000 --concurrency 64 --backend-latency-ms 300]
Writes benchmarks/results/gateway/load.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import RESULTS, machine
from benchmarks.gateway.common import (
    CLIENTS,
    chat_body,
    classify,
    cpu_seconds,
    drive,
    healthz,
    latency_summary,
    pin_cores,
    scrape,
    server_stack,
    start_backend,
    start_gateway,
)

MAX_CONCURRENCY = 64  # per backend model (the config's default)


def prompts(n: int, offset: int = 0) -> list[str]:
    return [f"Request {offset + i}: what is {i % 97} plus {i % 89}? Answer briefly." for i in range(n)]


def summarize(results, wall: float, cpu: dict[str, float | None]) -> dict:
    kinds: collections.Counter = collections.Counter()
    statuses: collections.Counter = collections.Counter()
    lost_why: collections.Counter = collections.Counter()
    errors: collections.Counter = collections.Counter()
    models: collections.Counter = collections.Counter()
    for r in results:
        kind, detail = classify(r)
        kinds[kind] += 1
        statuses["no answer" if r.status is None else str(r.status)] += 1
        if kind == "lost":
            lost_why[detail] += 1
        elif kind == "error":
            errors[detail] += 1
        else:
            models[r.model or "(no x-leanscale-model)"] += 1
    n = len(results)
    out = {"requests": n, "lost": kinds["lost"], "answered_200": kinds["ok"], "openai_errors": kinds["error"],
           "status_counts": dict(sorted(statuses.items())), "lost_reasons": dict(lost_why),
           "error_codes": dict(errors), "answered_by": dict(models),
           "latency_ms": latency_summary([r.seconds for r in results if r.status is not None]),
           "wall_s": wall, "throughput_rps": n / wall if wall else None,
           "cpu_s": cpu}
    out["cpu_ms_per_request"] = {k: (v * 1e3 / n if v is not None and n else None) for k, v in cpu.items()}
    return out


OUTCOMES = ("ok", "timeout", "server_error", "saturated", "connection", "bad_response", "rate_limited",
            "circuit_open")


def wait_until_small_answers(url: str, args, deadline_s: float = 330.0) -> float:
    """One request a second until ``small`` answers one (a circuit breaker opened by the faults
    lets a probe through after its ``open_s``); the seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline_s:
        (r,), _ = drive(url, [chat_body("small", "Are you there?")], 1, args.client_timeout, args.client)
        if r.model == "small":
            break
        time.sleep(1.0)
    return time.monotonic() - t0


def gateway_counts(before: dict, after: dict) -> dict:
    """The gateway's backend calls by model and outcome, fallbacks and requests by outcome, between
    two scrapes of /metrics (zero counts left out)."""
    def d(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    calls = {m: {o: d(f'leanscale_gateway_backend_calls_total{{model="{m}",outcome="{o}"}}') for o in OUTCOMES}
             for m in ("small", "big")}
    requests = {}
    for key in after:
        if key.startswith("leanscale_gateway_requests_total{") and d(key):
            requests[key[len("leanscale_gateway_requests_total"):]] = d(key)
    return {"backend_calls": {m: {o: v for o, v in c.items() if v} for m, c in calls.items()},
            "fallbacks_to_big": d('leanscale_gateway_fallbacks_total{model="big"}'), "requests": requests}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10_000, help="requests per loaded phase (10,000)")
    ap.add_argument("--concurrency", type=int, default=64, help="concurrent clients (64)")
    ap.add_argument("--unloaded-requests", type=int, default=500,
                    help="requests of the one-at-a-time phases, direct and through the gateway (500)")
    ap.add_argument("--fault-rate", type=float, default=0.05, help="share of small's calls answering 500 (0.05)")
    ap.add_argument("--hang-rate", type=float, default=0.01, help="share of small's calls that hang (0.01)")
    ap.add_argument("--hang-s", type=float, default=5.0, help="how long a hang lasts, seconds (5)")
    ap.add_argument("--timeout-s", type=float, default=2.0, help="small's timeout_s in the gateway config (2)")
    ap.add_argument("--backend-latency-ms", type=float, default=300.0,
                    help="the fakes' time to answer in the loaded phases, ms (300; an LLM takes longer still)")
    ap.add_argument("--latency-jitter", type=float, default=0.5,
                    help="each answer waits the latency times a uniform factor in [1-j, 1+j] (0.5; 0: constant)")
    ap.add_argument("--unloaded-latency-ms", type=float, default=0.0,
                    help="the fakes' time to answer in the one-at-a-time phases, ms (0)")
    ap.add_argument("--warmup", type=int, default=300, help="uncounted requests before each phase (300)")
    ap.add_argument("--client-timeout", type=float, default=30.0, help="the client's timeout per request (30 s)")
    ap.add_argument("--client", choices=CLIENTS, default="raw",
                    help="raw: HTTP/1.1 over asyncio streams (default); httpx: an httpx.AsyncClient per client")
    ap.add_argument("--pin", action="store_true",
                    help="give the gateway a core of its own (CPU 0) and the client and fakes the others, as in a "
                         "deployment where the load generator and the LLM backends run on other machines")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "gateway" / "load.json"))
    args = ap.parse_args()
    for name in ("requests", "concurrency", "unloaded_requests"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be a positive integer. Got {getattr(args, name)}.")
    if not (0 <= args.fault_rate and 0 <= args.hang_rate and args.fault_rate + args.hang_rate <= 1):
        ap.error(f"--fault-rate and --hang-rate must be >= 0 with a sum <= 1. Got {args.fault_rate} and "
                 f"{args.hang_rate}.")
    if not 0 <= args.latency_jitter <= 1:
        ap.error(f"--latency-jitter must be in [0, 1]. Got {args.latency_jitter}.")
    if args.hang_s <= args.timeout_s:
        print(f"note: --hang-s {args.hang_s} is not longer than --timeout-s {args.timeout_s}: hangs are only "
              "slow answers", file=sys.stderr)
    t_start = time.perf_counter()
    latency_s = args.backend_latency_ms / 1e3
    small = start_backend("small", {"text": "The answer is 42, as the small model computed it."},
                          latency_s=latency_s, latency_jitter=args.latency_jitter, fault_rate=args.fault_rate, hang_rate=args.hang_rate,
                          hang_s=args.hang_s, seed=args.seed)
    big = start_backend("big", {"text": "The answer is 42, as the big model computed it carefully."},
                        latency_s=latency_s, latency_jitter=args.latency_jitter, seed=args.seed + 1)
    config = {"models": [
        {"name": "small", "base_url": small.base_url, "input_price_per_1k": 0.0006, "output_price_per_1k": 0.0018,
         "timeout_s": args.timeout_s, "max_concurrency": MAX_CONCURRENCY},
        {"name": "big", "base_url": big.base_url, "input_price_per_1k": 0.01, "output_price_per_1k": 0.03,
         "timeout_s": 30, "max_concurrency": MAX_CONCURRENCY}],
        "fallbacks": {"small": ["big"]}}
    gateway = None
    try:
        gateway = start_gateway(config)
        procs = {"client": None, "gateway": gateway.process.pid, "small_fake": small.process.pid,
                 "big_fake": big.process.pid}
        pinned = pin_cores(gateway.process.pid, [small.process.pid, big.process.pid, None]) if args.pin else None
        direct_url = small.base_url + "/chat/completions"
        gateway_url = gateway.base_url + "/chat/completions"

        def phase(url: str, n: int, concurrency: int, tag: str) -> dict:
            if args.warmup:
                drive(url, [chat_body("small", p) for p in prompts(args.warmup, offset=10**8)],
                      min(concurrency, args.warmup), args.client_timeout, args.client)
            bodies = [chat_body("small", p) for p in prompts(n)]
            for fake in (small, big):  # every phase sees the same sequence of answer times
                fake.command("reseed", args.seed)
            through_gateway = url == gateway_url
            m_before = scrape(gateway.base_url) if through_gateway else None
            before = {k: cpu_seconds(pid) for k, pid in procs.items()}
            results, wall = drive(url, bodies, concurrency, args.client_timeout, args.client)
            after = {k: cpu_seconds(pid) for k, pid in procs.items()}
            cpu = {k: (after[k] - before[k] if after[k] is not None and before[k] is not None else None)
                   for k in procs}
            out = summarize(results, wall, cpu)
            if through_gateway:
                out["gateway_metrics"] = gateway_counts(m_before, scrape(gateway.base_url))
            print(f"{tag:17s} n={n:6d} c={concurrency:3d} lost={out['lost']} p50={out['latency_ms']['p50']:.2f} ms "
                  f"p99={out['latency_ms']['p99']:.2f} ms {out['throughput_rps']:.0f} req/s "
                  f"status={out['status_counts']}", flush=True)
            return out

        phases = {}
        small.command("latency", args.unloaded_latency_ms / 1e3)
        phases["direct_unloaded"] = phase(direct_url, args.unloaded_requests, 1, "direct_unloaded")
        phases["gateway_unloaded"] = phase(gateway_url, args.unloaded_requests, 1, "gateway_unloaded")
        small.command("latency", latency_s)
        phases["direct"] = phase(direct_url, args.requests, args.concurrency, "direct")
        phases["gateway_clean"] = phase(gateway_url, args.requests, args.concurrency, "gateway_clean")
        small.command("faults", True)
        fakes_before = {"small": small.command("stats"), "big": big.command("stats")}
        phases["gateway_faults"] = phase(gateway_url, args.requests, args.concurrency, "gateway_faults")
        small.command("faults", False)
        fakes_after = {"small": small.command("stats"), "big": big.command("stats")}

        # the leak probe: every small slot must be free again
        time.sleep(args.hang_s + 0.5)  # the hung calls end on the fake's side
        health_after = healthz(gateway.base_url)
        breaker_wait = wait_until_small_answers(gateway_url, args)  # a circuit breaker may be open
        # the probe's requests overlap in time, and stay well within small's timeout
        small.command("latency", min(max(latency_s, 0.3), args.timeout_s / 2))
        m_before = scrape(gateway.base_url)
        probe, _ = drive(gateway_url, [chat_body("small", p) for p in prompts(MAX_CONCURRENCY, offset=10**9)],
                         MAX_CONCURRENCY, args.client_timeout, args.client)
        probe_metrics = gateway_counts(m_before, scrape(gateway.base_url))
        small.command("latency", latency_s)
        probe_models = collections.Counter(r.model for r in probe if classify(r)[0] == "ok")
        health_end = healthz(gateway.base_url)
    finally:
        for child in (gateway, small, big):
            if child is not None:
                child.stop()

    injected = {k: fakes_after["small"]["injected"].get(k, 0) - fakes_before["small"]["injected"].get(k, 0)
                for k in ("status_500", "hang")}
    p50 = {k: v["latency_ms"]["p50"] for k, v in phases.items()}
    overhead = {
        "unloaded_p50_ms": p50["gateway_unloaded"] - p50["direct_unloaded"],
        "loaded_p50_ms": p50["gateway_clean"] - p50["direct"],
        "loaded_with_faults_p50_ms": p50["gateway_faults"] - p50["direct"],
        "gateway_cpu_ms_per_request": phases["gateway_clean"]["cpu_ms_per_request"]["gateway"],
        "definition": "p50 through the gateway minus p50 of direct calls to the same fake backend without faults, "
                      "same client and concurrency (unloaded: 1 request at a time; loaded: --concurrency clients)",
    }
    faults = phases["gateway_faults"]
    lost_total = sum(p["lost"] for p in phases.values())
    saturated = probe_metrics["backend_calls"]["small"].get("saturated", 0)
    leak = {"requests": MAX_CONCURRENCY, "answered_by": dict(probe_models), "gateway_metrics": probe_metrics,
            "seconds_waited_for_small_before_probe": breaker_wait, "small_saturated": saturated,
            "all_answered_by_small": probe_models.get("small", 0) == MAX_CONCURRENCY,
            "in_flight_after_faults": health_after.get("in_flight"), "in_flight_at_end": health_end.get("in_flight"),
            "ok": saturated == 0 and health_after.get("in_flight") == 0 and health_end.get("in_flight") == 0}
    goals = {
        "lost_with_faults": {"value": faults["lost"], "goal": "== 0", "met": faults["lost"] == 0},
        "lost_all_phases": {"value": lost_total, "goal": "== 0", "met": lost_total == 0},
        "non_200_with_faults": {"value": faults["requests"] - faults["answered_200"], "goal": "== 0 (every fault "
                                "recovered by the fallback)", "met": faults["answered_200"] == faults["requests"]},
        "overhead_p50_unloaded_ms": {"value": overhead["unloaded_p50_ms"], "goal": "<= 2",
                                     "met": overhead["unloaded_p50_ms"] <= 2.0},
        "overhead_p50_loaded_ms": {"value": overhead["loaded_p50_ms"], "goal": "<= 2",
                                   "met": overhead["loaded_p50_ms"] <= 2.0},
        "no_leaked_slots": {"value": {"answered_by": leak["answered_by"], "small_saturated": saturated},
                            "goal": f"{MAX_CONCURRENCY} simultaneous requests for small: none refused as saturated "
                                    "(max_concurrency), 0 in flight after", "met": leak["ok"]},
    }
    record = {
        "benchmark": "gateway_load",
        "machine": machine(),
        "settings": {
            "requests": args.requests, "concurrency": args.concurrency, "unloaded_requests": args.unloaded_requests,
            "warmup_per_phase": args.warmup, "fault_rate_small": args.fault_rate, "hang_rate_small": args.hang_rate,
            "hang_s": args.hang_s, "timeout_s_small": args.timeout_s, "backend_latency_ms": args.backend_latency_ms,
            "backend_latency_jitter": args.latency_jitter, "unloaded_backend_latency_ms": args.unloaded_latency_ms, "client_kind": args.client,
            "max_concurrency_per_model": MAX_CONCURRENCY, "fallbacks": config["fallbacks"],
            "backoff_s": 0.05, "cache": None, "router": None, "seed": args.seed,
            "client": "raw HTTP/1.1 over asyncio streams, one keep-alive connection per concurrent client (not the "
                      "openai client, not one shared httpx.AsyncClient: see benchmarks/gateway/common.py)",
            "processes": "client in the benchmark process; gateway (uvicorn via leanscale.cascade.server.server_config, "
                         f"{server_stack()}) in a second process; each fake backend in its own process",
            "cores": pinned or "shared: every process may run on every core",
            "request": "chat completion, model 'small', one short user message, not streamed",
        },
        "phases": phases,
        "overhead": overhead,
        "faults": {"injected_on_small": injected, "small_calls": fakes_after["small"]["calls"]
                   - fakes_before["small"]["calls"], "big_calls": fakes_after["big"]["calls"]
                   - fakes_before["big"]["calls"], "gateway_metrics": phases["gateway_faults"]["gateway_metrics"]},
        "leak_probe": leak,
        "goals": goals,
        "seconds_total": time.perf_counter() - t_start,
    }
    out = Path(args.out)
    from leanscale.core.io import atomic_write_json

    atomic_write_json(out, record, indent=1)
    print(json.dumps({"overhead": overhead, "goals": goals}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
