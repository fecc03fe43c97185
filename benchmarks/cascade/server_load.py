"""Load test of the cascade server (:mod:`leanscale.cascade.server`) on loopback, three scenarios
(``--scenario``):

* ``faults`` (default): 10,000 requests from 64 concurrent clients while the middle stage fails
  (raises) on 5% of its calls -> ``server_load.json``.
* ``hang``: issue #13's starvation case -- 30% of the middle stage's calls hang for 10 s (its
  timeout: 0.5 s) and the last stage has a 1 s timeout; 3,000 requests from 64 clients. Before
  the fix one shared 8-thread pool filled with hung calls, the last stage timed out too and 236 of
  3,000 answers were HTTP 200 with ``"label": null`` (73 in this script's run on the code before
  the fix, ``server_load_hang_before.json``) -> ``server_load_hang.json``.
* ``starvation``: the same hangs under overload -- 6,000 requests from 256 clients against a
  64-text queue (a client pauses 100 ms after a 503), while a prober polls ``/healthz``: every
  request must get a labelled 200 or an explicit 503 (queue full), and ``/healthz`` must keep
  answering -> ``server_load_starvation.json``.

Counts lost answers (no answer or a client-side exception), wrong-format answers, answers without
a label (200 with ``"label": null``), non-200 answers and wrong labels; reports client-side
p50/p90/p99 latency, throughput, and per-stage answers and errors from /metrics.

The cascade: ``--cascade PATH`` (a file written by ``Cascade.save``; ``--objects module:name``
for its callable/rule/external stages; request texts from ``--texts FILE``, one per line, else
synthetic), or by default a synthetic three-stage cascade: regex -> a model-like batched callable
(``--small-ms`` per item, 0.2) -> a slower "big" callable (``--big-ms`` per item, 2). The
stage in the middle of the cascade is wrapped so that a seeded share of its calls raise
(``--fail-rate``) or hang (``--hang-rate``, ``--hang-s``).

A label is "wrong" when it is neither what the cascade answers with the middle stage up nor what
it answers with it down (a batch may take either path). Server and clients run in one process
(uvicorn in a thread, clients in 64 threads with keep-alive connections), so they share the GIL.
Prints and writes ``benchmarks/results/cascade/server_load.json``.

Usage: python benchmarks/cascade/server_load.py [--scenario faults|hang|starvation] [--requests N]
       [--clients N] [--cascade PATH]
"""

from __future__ import annotations

import argparse
import collections
import http.client
import importlib
import json
import random
import re
import statistics
import sys
import threading
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import numpy as np

from benchmarks.common import RESULTS, machine
from leanscale.cascade import CallableStage, Cascade, RegexStage, StageError
from leanscale.cascade.server import create_app
from leanscale.core.io import atomic_write_json

CLASSES = ("billing", "tech", "account", "shipping")
KEYWORDS = {"billing": ("refund", "invoice", "charged", "bill"), "tech": ("crash", "error", "bug", "freeze"),
            "account": ("login", "password", "locked", "username"), "shipping": ("parcel", "delivery", "late", "tracking")}
FILLER = ("please", "help", "my", "the", "order", "today", "again", "urgent", "thanks", "why", "is", "not", "working")


def _u(text: str, salt: str) -> float:
    """A deterministic uniform number in [0, 1) from the text."""
    return zlib.crc32((salt + text).encode()) / 2**32


def synthetic_texts(n: int, seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        c = CLASSES[rng.randrange(len(CLASSES))]
        words = rng.sample(FILLER, 4) + [rng.choice(KEYWORDS[c]), f"#{seed}-{i}"]
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(c)
    return texts, labels


def true_label(text: str) -> str:
    for c in CLASSES:
        if any(k in text.split() for k in KEYWORDS[c]):
            return c
    return CLASSES[0]


def make_small(ms_per_item: float):
    """Model-like: right and confident on ~70% of texts, unsure elsewhere (then right half the time)."""

    def small(items):
        time.sleep(ms_per_item * 1e-3 * len(items))
        out = []
        for t in items:
            u = _u(t, "small")
            if u < 0.7:
                out.append((true_label(t), 0.6 + 0.4 * _u(t, "conf")))
            else:
                wrong = CLASSES[int(_u(t, "lab") * len(CLASSES))]
                out.append((true_label(t) if u < 0.85 else wrong, 0.3 + 0.3 * _u(t, "conf")))
        return out

    return small


def make_big(ms_per_item: float):
    """Slow and right on ~98% of texts."""

    def big(items):
        time.sleep(ms_per_item * 1e-3 * len(items))
        return [(true_label(t) if _u(t, "big") < 0.98 else CLASSES[int(_u(t, "lab") * len(CLASSES))], 0.99)
                for t in items]

    return big


def synthetic_cascade(small_ms: float, big_ms: float) -> Cascade:
    rules = [(r"\brefund\b", "billing"), (r"\bcrash\b", "tech"), (r"\bpassword\b", "account")]
    stages = [RegexStage(rules, name="regex", cost=0.001),
              CallableStage(make_small(small_ms), name="small", cost=small_ms, batched=True),
              CallableStage(make_big(big_ms), name="big", cost=big_ms, batched=True)]
    X, y = synthetic_texts(2000, seed=1)
    return Cascade(stages).fit(X, y)  # target: the big model's own accuracy


class FlakyStage:
    """Wraps ``stage.predict`` so that a seeded ``rate`` of its calls raise StageError."""

    def __init__(self, stage, rate: float, seed: int):
        self.stage, self.rate, self.rng = stage, rate, random.Random(seed)
        self.original = stage.predict
        self.lock = threading.Lock()
        self.enabled = True
        self.calls = self.failed_calls = self.failed_items = 0
        stage.predict = self  # the cascade calls stage.predict(items)

    def __call__(self, items):
        with self.lock:
            fail = self.enabled and self.rng.random() < self.rate
            if self.enabled:
                self.calls += 1
                self.failed_calls += fail
                self.failed_items += len(items) if fail else 0
        if fail:
            raise StageError(f"stage {self.stage.name!r}: simulated outage")
        return self.original(items)


class HangingStage:
    """Wraps ``stage.predict`` so that a seeded ``rate`` of its calls sleep ``hang_s`` seconds
    before answering (a stuck remote call); the stage gets ``timeout``."""

    def __init__(self, stage, rate: float, hang_s: float, seed: int):
        self.stage, self.rate, self.hang_s, self.rng = stage, rate, hang_s, random.Random(seed)
        self.original = stage.predict
        self.lock = threading.Lock()
        self.enabled = True
        self.calls = self.hung_calls = self.hung_items = 0
        stage.predict = self

    def __call__(self, items):
        with self.lock:
            hang = self.enabled and self.rng.random() < self.rate
            if self.enabled:
                self.calls += 1
                self.hung_calls += hang
                self.hung_items += len(items) if hang else 0
        if hang:
            time.sleep(self.hang_s)
        return self.original(items)


def load_objects(spec: str | None) -> dict | None:
    if not spec:
        return None
    module, _, attr = spec.partition(":")
    value = getattr(importlib.import_module(module), attr)
    return value() if callable(value) and not isinstance(value, dict) else value


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def scrape(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    out = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def run_server(app):
    """uvicorn in a thread, configured as ``leanscale serve`` is (connection limits, timeouts)."""
    import uvicorn

    try:
        from leanscale.cascade.server import server_config
    except ImportError:  # a leanscale before server_config (to measure "before" numbers with this script)
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False, ws="none",
                                lifespan="on")
    else:
        config = server_config(app, host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    return server, thread, server.servers[0].sockets[0].getsockname()[1]


def drive(port: int, bodies: list[bytes], clients: int, timeout: float, backoff_s: float = 0.0) -> tuple[list, float]:
    """Send every body from ``clients`` threads; per request (status or error, data, seconds). A
    client that gets a 503 waits ``backoff_s`` before its next request (no retry)."""
    results: list = [None] * len(bodies)
    order = iter(range(len(bodies)))
    lock = threading.Lock()

    def loop():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        headers = {"Content-Type": "application/json"}
        try:
            while True:
                with lock:
                    i = next(order, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                try:
                    conn.request("POST", "/v1/predict", body=bodies[i], headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    results[i] = (resp.status, data, time.perf_counter() - t0)
                    if resp.will_close:
                        conn.close()
                    if resp.status == 503 and backoff_s:
                        time.sleep(backoff_s)
                except Exception as exc:  # counted as lost
                    conn.close()
                    results[i] = ("error", repr(exc), time.perf_counter() - t0)
        finally:
            conn.close()

    threads = [threading.Thread(target=loop) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


class HealthProber:
    """Polls /healthz every ``interval`` seconds on its own connection; records status and latency."""

    def __init__(self, port: int, interval: float = 0.05):
        self.port, self.interval = port, interval
        self.samples: list = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            t0 = time.perf_counter()
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                conn.request("GET", "/healthz")
                resp = conn.getresponse()
                body = json.loads(resp.read())
                self.samples.append((resp.status, body.get("status"), time.perf_counter() - t0))
            except Exception as exc:
                self.samples.append(("error", repr(exc), time.perf_counter() - t0))
            finally:
                conn.close()
            self.stop.wait(self.interval)

    def summary(self) -> dict:
        ok = [s for s in self.samples if s[0] != "error"]
        lat = np.array([s[2] for s in ok]) * 1e3 if ok else np.zeros(1)
        return {"probes": len(self.samples), "unanswered": len(self.samples) - len(ok),
                "status_counts": dict(collections.Counter(str(s[0]) for s in self.samples)),
                "latency_ms": {"p50": float(np.percentile(lat, 50)), "max": float(lat.max())}}


SCENARIOS = {
    "faults": {"requests": 10_000, "clients": 64, "fail_rate": 0.05, "hang_rate": 0.0, "max_queue": 1024,
               "middle_timeout": None, "last_timeout": None, "out": "server_load.json"},
    "hang": {"requests": 3_000, "clients": 64, "fail_rate": 0.0, "hang_rate": 0.3, "max_queue": 1024,
             "middle_timeout": 0.5, "last_timeout": 1.0, "out": "server_load_hang.json"},
    "starvation": {"requests": 6_000, "clients": 256, "fail_rate": 0.0, "hang_rate": 0.3, "max_queue": 64,
                   "middle_timeout": 0.5, "last_timeout": 1.0, "backoff_s": 0.1, "out": "server_load_starvation.json"},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), default="faults")
    ap.add_argument("--requests", type=int, default=None, help="default: 10,000 (faults), 3,000 (hang), 6,000")
    ap.add_argument("--clients", type=int, default=None, help="default: 64, or 256 (starvation)")
    ap.add_argument("--cascade", default=None, help="a saved cascade (Cascade.save); default: synthetic")
    ap.add_argument("--objects", default=None, help="'module:name' of the objects for Cascade.load")
    ap.add_argument("--texts", default=None, help="request texts, one per line (default: synthetic)")
    ap.add_argument("--fail-rate", type=float, default=None, help="fraction of the middle stage's calls that fail")
    ap.add_argument("--hang-rate", type=float, default=None, help="fraction of the middle stage's calls that hang")
    ap.add_argument("--hang-s", type=float, default=10.0, help="how long a hanging call hangs, seconds (10)")
    ap.add_argument("--middle-timeout", type=float, default=None, help="the middle stage's timeout, seconds")
    ap.add_argument("--last-timeout", type=float, default=None, help="the last stage's timeout, seconds")
    ap.add_argument("--small-ms", type=float, default=0.2, help="synthetic small model: ms per item")
    ap.add_argument("--big-ms", type=float, default=2.0, help="synthetic big model: ms per item")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-wait-ms", type=float, default=2.0)
    ap.add_argument("--max-queue", type=int, default=None, help="default: 1024, or 64 (starvation)")
    ap.add_argument("--timeout", type=float, default=60.0, help="client timeout per request, seconds")
    ap.add_argument("--backoff-ms", type=float, default=None,
                    help="a client's pause after a 503 before its next request (default: 0, or 100 for starvation)")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/cascade/server_load[_SCENARIO].json")
    args = ap.parse_args()
    sc = SCENARIOS[args.scenario]
    for key in ("requests", "clients", "fail_rate", "hang_rate", "max_queue", "middle_timeout", "last_timeout"):
        if getattr(args, key) is None:
            setattr(args, key, sc[key])
    out_path = args.out or str(RESULTS / "cascade" / sc["out"])

    if args.cascade:
        cascade = Cascade.load(args.cascade, objects=load_objects(args.objects))
    else:
        cascade = synthetic_cascade(args.small_ms, args.big_ms)
    if args.texts:
        pool = [line for line in Path(args.texts).read_text().splitlines() if line.strip()]
    else:
        pool = synthetic_texts(2000, seed=2)[0]
    stages = list(cascade.stages)
    middle = stages[len(stages) // 2] if len(stages) > 1 else stages[0]
    last = stages[-1]
    flaky = FlakyStage(middle, args.fail_rate, seed=0) if args.fail_rate > 0 else None
    hanging = HangingStage(middle, args.hang_rate, args.hang_s, seed=0) if args.hang_rate > 0 else None
    wrapper = hanging or flaky

    # what a right answer is: the cascade's label with the middle stage up, or with it down
    if wrapper is not None:
        wrapper.enabled = False
    ref_up = dict(zip(pool, cascade.predict(pool)))

    def down(items):
        raise StageError(f"stage {middle.name!r} is down")

    inner = wrapper if wrapper is not None else None
    if inner is not None:
        inner.original, up = down, inner.original
    else:
        up, middle.predict = middle.predict, down
    ref_down = dict(zip(pool, cascade.predict(pool)))
    if inner is not None:
        inner.original = up
        inner.enabled = True
    else:
        middle.predict = up
    valid_stages = {s.name for s in stages} | {"fallback"}
    # the timeouts only now: the references above run the whole pool as one batch
    if args.middle_timeout is not None:
        middle.timeout = float(args.middle_timeout)
    if args.last_timeout is not None:
        last.timeout = float(args.last_timeout)

    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(pool), size=args.requests)
    texts = [pool[i] for i in picks]
    bodies = [json.dumps({"text": t}).encode() for t in texts]

    app = create_app(cascade, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue)
    server, thread, port = run_server(app)
    prober = None
    backoff = args.backoff_ms / 1000.0 if args.backoff_ms is not None else sc.get("backoff_s", 0.0)
    try:
        drive(port, bodies[:300], min(args.clients, 64), args.timeout)  # warm-up, not counted
        if flaky is not None:
            flaky.calls = flaky.failed_calls = flaky.failed_items = 0
        if hanging is not None:
            hanging.calls = hanging.hung_calls = hanging.hung_items = 0
        before = scrape(port)
        if args.scenario == "starvation":
            prober = HealthProber(port)
            prober.thread.start()
        results, wall = drive(port, bodies, args.clients, args.timeout, backoff_s=backoff)
        if prober is not None:
            prober.stop.set()
            prober.thread.join(15)
        after = scrape(port)
    finally:
        server.should_exit = True
        thread.join(30)

    lost = wrong_format = wrong_label = no_label = 0
    statuses = collections.Counter()
    refusals = collections.Counter()
    answered_by = collections.Counter()
    latencies = []
    for text, res in zip(texts, results):
        if res is None or res[0] == "error":
            lost += 1
            continue
        status, data, seconds = res
        statuses[status] += 1
        latencies.append(seconds)
        if status != 200:
            try:
                detail = json.loads(data)["detail"]
            except (ValueError, KeyError, TypeError):
                detail = ""
            refusals["queue full" if "queue is full" in detail else
                     "no stage could answer" if "no stage could answer" in detail else
                     f"other {status}"] += 1
            continue
        try:
            preds = json.loads(data)["predictions"]
            (p,) = preds
            ok = (set(p) == {"label", "stage", "confidence", "cost"} and p["stage"] in valid_stages
                  and isinstance(p["confidence"], float) and 0 <= p["confidence"] <= 1 and isinstance(p["cost"], float))
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            wrong_format += 1
            continue
        if p["label"] is None:
            no_label += 1
            continue
        answered_by[p["stage"]] += 1
        if p["label"] not in (ref_up[text], ref_down[text]):
            wrong_label += 1

    def d(key):
        return after.get(key, 0.0) - before.get(key, 0.0)

    lat_ms = np.array(latencies) * 1e3
    batches = d("leanscale_batches_total")
    names = [s.name for s in stages] + ["fallback"]
    non_200 = sum(v for k, v in statuses.items() if k != 200)
    result = {
        "benchmark": "cascade_server_load",
        "scenario": args.scenario,
        "machine": machine(),
        "setup": {
            "requests": args.requests, "clients": args.clients, "texts_per_request": 1,
            "cascade": args.cascade or "synthetic: regex -> small (batched callable) -> big (batched callable)",
            "stage_ms_per_item": None if args.cascade else {"small": args.small_ms, "big": args.big_ms},
            "failing_stage": middle.name, "fail_rate_per_call": args.fail_rate,
            "hang_rate_per_call": args.hang_rate, "hang_seconds": args.hang_s if args.hang_rate > 0 else None,
            "timeouts": {s.name: s.timeout for s in stages},
            "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms, "max_queue": args.max_queue,
            "client_backoff_after_503_s": backoff,
            "thresholds": cascade.thresholds_,
            "process": "server (uvicorn, h11, configured by server_config) and clients in one process",
        },
        "lost": lost, "wrong_format": wrong_format, "answers_without_label": no_label, "non_200": non_200,
        "status_counts": {str(k): v for k, v in sorted(statuses.items())},
        "refusals": dict(refusals),
        "wrong_label": wrong_label,
        "latency_ms": {"p50": float(np.percentile(lat_ms, 50)), "p90": float(np.percentile(lat_ms, 90)),
                       "p99": float(np.percentile(lat_ms, 99)), "max": float(lat_ms.max()),
                       "mean": float(statistics.fmean(lat_ms))},
        "wall_seconds": wall, "throughput_rps": args.requests / wall,
        "server_metrics": {
            "requests": d("leanscale_requests_total"), "predictions": d("leanscale_predictions_total"),
            "stage_answers": {n: d(f'leanscale_stage_answers_total{{stage="{n}"}}') for n in names},
            "stage_errors": {s.name: d(f'leanscale_stage_errors_total{{stage="{s.name}"}}') for s in stages},
            "unanswered": {r: d(f'leanscale_unanswered_total{{reason="{r}"}}') for r in ("stage_failed", "abstained")},
            "rejected": {r: d(f'leanscale_rejected_total{{reason="{r}"}}') for r in ("queue_full", "too_large", "bad_request")},
            "internal_errors": d("leanscale_internal_errors_total"),
            "timed_out": d("leanscale_timed_out_total"),
            "batches": batches, "mean_batch_size": d("leanscale_predictions_total") / batches if batches else None,
            "mean_cost_per_request": d("leanscale_cost_total") / max(1.0, d("leanscale_predictions_total")),
        },
        "answers_by_stage_client_side": dict(answered_by),
    }
    if flaky is not None:
        result["failing_stage_calls"] = {"calls": flaky.calls, "failed_calls": flaky.failed_calls,
                                         "failed_items": flaky.failed_items}
    if hanging is not None:
        result["hanging_stage_calls"] = {"calls_started": hanging.calls, "hung_calls": hanging.hung_calls,
                                         "hung_items": hanging.hung_items}
    if prober is not None:
        result["healthz"] = prober.summary()
    passed = lost == 0 and wrong_format == 0 and no_label == 0 and wrong_label == 0
    if args.scenario == "starvation":
        passed = (passed and set(refusals) <= {"queue full"} and set(statuses) <= {200, 503}
                  and result["healthz"]["unanswered"] == 0 and result["healthz"]["probes"] > 0)
    else:
        passed = passed and non_200 == 0
    if flaky is not None:
        passed = (passed and result["server_metrics"]["stage_errors"][middle.name] == flaky.failed_items
                  and flaky.failed_calls > 0)
    if hanging is not None:
        passed = (passed and hanging.hung_calls > 0 and result["server_metrics"]["stage_errors"][last.name] == 0)
    result["passed"] = passed
    atomic_write_json(out_path, result)
    lm = result["latency_ms"]
    print(f"[{args.scenario}] {args.requests} requests, {args.clients} clients: lost {lost}, wrong format "
          f"{wrong_format}, without a label {no_label}, non-200 {non_200} {dict(refusals)}, wrong label "
          f"{wrong_label}; latency p50 {lm['p50']:.1f} ms, p90 {lm['p90']:.1f} ms, p99 {lm['p99']:.1f} ms; "
          f"{result['throughput_rps']:.0f} requests/s ({wall:.1f} s)")
    print(f"stage answers {result['server_metrics']['stage_answers']}; errors {result['server_metrics']['stage_errors']}; "
          f"{batches:.0f} batches, mean {result['server_metrics']['mean_batch_size'] or 0:.1f} texts")
    if flaky is not None:
        print(f"{flaky.failed_calls} of {flaky.calls} calls of {middle.name!r} failed")
    if hanging is not None:
        print(f"{hanging.hung_calls} of {hanging.calls} started calls of {middle.name!r} hung {args.hang_s:g} s")
    if prober is not None:
        print(f"/healthz: {result['healthz']}")
    print(f"-> {out_path}; passed: {result['passed']}")
    if not result["passed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
