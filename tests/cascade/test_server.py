"""The cascade HTTP server, run for real with uvicorn on a free loopback port: answers match
``cascade.predict``, nothing is lost under 64 concurrent clients while a stage fails on 5% of its
calls, micro-batching batches, metrics (parsed with prometheus_client) count what happened, the
queue refuses at once when full, a failing cascade call answers 500 and the worker survives, bad
input gets a 4xx with a message. Hangs, starvation, idle connections and SIGTERM:
test_server_limits.py."""

from __future__ import annotations

import collections
import contextlib
import http.client
import json
import re
import threading
import time

import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from leanscale.cascade import CallableStage, Cascade, RegexStage
from leanscale.cascade import server as server_mod
from leanscale.cascade.server import LATENCY_BUCKETS, create_app, server_config
from leanscale.core.errors import InvalidParameterError

# ------------------------------------------------------------------------------ the cascade


def truth(text: str) -> str:
    if "refund" in text or "bill" in text:
        return "billing"
    if "crash" in text or "error" in text:
        return "tech"
    if "login" in text or "password" in text:
        return "account"
    return "other"


def small_model(items):
    """Confident and right on 'bill'/'login'; unsure (0.4) elsewhere, and then often wrong."""
    out = []
    for t in items:
        if "bill" in t:
            out.append(("billing", 0.9))
        elif "login" in t:
            out.append(("account", 0.9))
        else:
            out.append(("other", 0.4))
    return out


def big_model(items):
    """Always right, except that it abstains on '???' texts (then the cascade falls back)."""
    return [None if "???" in t else (truth(t), 1.0) for t in items]


class Flaky:
    """A batched stage function that counts its calls and raises on every 20th (5% of calls,
    deterministically: the 3rd, 23rd, 43rd... since the last reset)."""

    def __init__(self, fn):
        self.fn = fn
        self.lock = threading.Lock()
        self.enabled = False
        self.calls = 0
        self.failed_calls = 0
        self.failed_items = 0

    def __call__(self, items):
        with self.lock:
            self.calls += 1
            fail = self.enabled and self.calls % 20 == 3
            if fail:
                self.failed_calls += 1
                self.failed_items += len(items)
        if fail:
            raise RuntimeError("simulated outage of the small model")
        return self.fn(items)


TEMPLATES = ("please refund order {i}", "my bill {i} is wrong", "the app crash {i}", "cannot login {i}",
             "hello {i}", "forgot password {i}", "error code {i}")


def make_texts(n: int, offset: int = 0) -> list[str]:
    return [TEMPLATES[i % len(TEMPLATES)].format(i=offset + i) for i in range(n)]


def build_cascade():
    flaky = Flaky(small_model)
    stages = [RegexStage([(r"\brefund\b", "billing"), (r"\bcrash\b", "tech")], name="regex", cost=0.001),
              CallableStage(flaky, name="small", cost=0.01, batched=True),
              CallableStage(big_model, name="big", cost=1.0, batched=True)]
    X = make_texts(140, offset=10_000)
    cascade = Cascade(stages, target_accuracy=1.0).fit(X, [truth(t) for t in X])
    return cascade, flaky


# -------------------------------------------------------------------------- server plumbing


@contextlib.contextmanager
def running(app, **options):
    """Run ``app`` with uvicorn in a thread on a free loopback port, configured as ``serve`` does
    (:func:`server_config`, connection ``options``); yields the port."""
    config = server_config(app, host="127.0.0.1", port=0, log_level="error", **options)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.005)
    try:
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(15)
        assert not thread.is_alive(), "the server did not shut down"


class Client:
    """One keep-alive HTTP/1.1 connection (http.client reconnects when the server closed it)."""

    def __init__(self, port: int, timeout: float = 20.0):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def request(self, method: str, path: str, body=None, headers=None) -> tuple[int, dict, bytes]:
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        hdrs = {"Content-Type": "application/json"} if headers is None else headers
        try:
            self.conn.request(method, path, body=body, headers=hdrs)
            resp = self.conn.getresponse()
            data = resp.read()
        except Exception:
            self.conn.close()
            raise
        if resp.will_close:
            self.conn.close()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data

    def close(self):
        self.conn.close()


def call(port: int, method: str, path: str, body=None, headers=None) -> tuple[int, dict, bytes]:
    client = Client(port)
    try:
        return client.request(method, path, body, headers)
    finally:
        client.close()


def predict(port: int, body) -> tuple[int, dict]:
    status, _, data = call(port, "POST", "/v1/predict", body)
    return status, json.loads(data)


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[a-zA-Z_][a-zA-Z0-9_]*="[^"]*"(?:,[a-zA-Z_][a-zA-Z0-9_]*="[^"]*")*\})? '
                     r"(\S+)$")


def parse_metrics(text: str) -> dict:
    """``name{label="value",...}`` -> value, parsed with prometheus_client's own parser; every
    histogram checked: buckets cumulative (non-decreasing in ``le``), ``+Inf`` == ``_count``."""
    out = {}
    for line in text.splitlines():  # strict: every line a comment or a sample
        assert line.startswith(("# HELP ", "# TYPE ")) or _SAMPLE.match(line), f"not a Prometheus line: {line!r}"
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            key = sample.name + (f"{{{labels}}}" if labels else "")
            assert key not in out, f"duplicate series {key}"
            out[key] = sample.value
        if family.type == "histogram":
            buckets = sorted(((float(s.labels["le"]), s.value) for s in family.samples
                              if s.name.endswith("_bucket")), key=lambda b: b[0])
            counts = [c for _, c in buckets]
            assert buckets and buckets[-1][0] == float("inf"), family.name
            assert counts == sorted(counts), f"{family.name}: buckets not cumulative: {buckets}"
            count = next(s.value for s in family.samples if s.name == family.name + "_count")
            assert counts[-1] == count, f"{family.name}: +Inf bucket {counts[-1]} != _count {count}"
    return out


def metrics(port: int) -> dict:
    """GET /metrics, parsed and checked (:func:`parse_metrics`)."""
    status, headers, data = call(port, "GET", "/metrics", headers={})
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse_metrics(data.decode())


def delta(after: dict, before: dict, key: str) -> float:
    return after[key] - before.get(key, 0.0)


def well_formed(body: dict, n: int) -> bool:
    preds = body.get("predictions")
    if not isinstance(preds, list) or len(preds) != n:
        return False
    return all(set(p) == {"label", "stage", "confidence", "cost"} and isinstance(p["stage"], str)
               and isinstance(p["confidence"], float) and 0.0 <= p["confidence"] <= 1.0
               and isinstance(p["cost"], float) and p["cost"] > 0 for p in preds)


@pytest.fixture(scope="module")
def served():
    cascade, flaky = build_cascade()
    assert cascade.thresholds_ == {"regex": 1.0, "small": 0.9}  # the setting the tests rely on
    app = create_app(cascade, max_batch=64, max_wait_ms=2.0, max_queue=4096, max_items_per_request=50,
                     max_text_chars=1000, max_body_bytes=200_000)
    with running(app) as port:
        yield cascade, flaky, port


# ----------------------------------------------------------------------------------- tests


def test_single_and_batch_predict_labels_and_stages(served):
    cascade, flaky, port = served
    flaky.enabled = False
    status, body = predict(port, {"text": "please refund order 7"})
    assert status == 200 and well_formed(body, 1)
    assert body["predictions"][0] == {"label": "billing", "stage": "regex", "confidence": 1.0, "cost": 0.001}

    texts = ["my bill 3 is wrong", "the app crash 4", "hello 5", "forgot password 6", "cannot login 8", "??? 9"]
    status, body = predict(port, {"texts": texts})
    assert status == 200 and well_formed(body, len(texts))
    preds = body["predictions"]
    assert [p["label"] for p in preds] == ["billing", "tech", "other", "account", "account", "other"]
    assert [p["stage"] for p in preds] == ["small", "regex", "big", "big", "small", "fallback"]
    assert preds[-1]["confidence"] == pytest.approx(0.4)  # the most confident answer seen on the way
    assert [p["cost"] for p in preds] == pytest.approx([0.011, 0.001, 1.011, 1.011, 0.011, 1.011])
    ref = cascade.predict_detailed(texts)
    assert [p["label"] for p in preds] == list(ref.labels)
    assert [p["stage"] for p in preds] == list(ref.stage)


def test_failing_stage_falls_back_and_is_counted(served):
    _, flaky, port = served
    flaky.enabled, flaky.calls = True, 2  # the next call of the small model is the 3rd: it fails
    before = metrics(port)
    status, body = predict(port, {"texts": ["my bill 1 is wrong", "cannot login 2", "please refund order 3"]})
    assert status == 200 and well_formed(body, 3)
    preds = body["predictions"]
    assert [p["label"] for p in preds] == ["billing", "account", "billing"]
    assert [p["stage"] for p in preds] == ["big", "big", "regex"]  # the small model failed: next stage
    after = metrics(port)
    assert delta(after, before, 'leanscale_stage_errors_total{stage="small"}') == 2
    assert delta(after, before, 'leanscale_stage_errors_total{stage="big"}') == 0
    assert delta(after, before, 'leanscale_stage_answers_total{stage="big"}') == 2
    flaky.enabled = False


def test_64_concurrent_clients_nothing_lost_or_wrong(served):
    cascade, flaky, port = served
    pool = make_texts(210)
    expected = dict(zip(pool, cascade.predict(pool)))
    assert all(expected[t] == truth(t) for t in pool)
    # 1000 requests: most with one text, every 5th with three
    requests = [({"texts": [pool[(11 * i + j) % len(pool)] for j in range(3)]} if i % 5 == 0 else
                 {"text": pool[(11 * i) % len(pool)]}) for i in range(1000)]
    n_texts = sum(len(r.get("texts", [0])) for r in requests)
    flaky.enabled, flaky.calls, flaky.failed_calls, flaky.failed_items = True, 0, 0, 0
    before = metrics(port)

    results: list = [None] * len(requests)
    next_index = iter(range(len(requests)))
    lock = threading.Lock()

    def client_loop():
        client = Client(port)
        try:
            while True:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                try:
                    status, _, data = client.request("POST", "/v1/predict", requests[i])
                    results[i] = (status, data)
                except Exception as exc:  # recorded as lost
                    results[i] = ("exception", repr(exc))
        finally:
            client.close()

    threads = [threading.Thread(target=client_loop) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    flaky.enabled = False

    stages = collections.Counter()
    total_cost = 0.0
    for req, res in zip(requests, results):
        assert res is not None and res[0] == 200, res
        body = json.loads(res[1])
        texts = req.get("texts", [req.get("text")])
        assert well_formed(body, len(texts)), body
        for text, p in zip(texts, body["predictions"]):
            assert p["label"] == expected[text], (text, p)
            stages[p["stage"]] += 1
            total_cost += p["cost"]

    after = metrics(port)
    assert delta(after, before, "leanscale_requests_total") == len(requests)
    assert delta(after, before, "leanscale_predictions_total") == n_texts
    for name in ("regex", "small", "big", "fallback"):
        assert delta(after, before, f'leanscale_stage_answers_total{{stage="{name}"}}') == stages[name]
    assert sum(stages.values()) == n_texts
    assert delta(after, before, "leanscale_cost_total") == pytest.approx(total_cost)
    # the flaky stage failed on some calls; each failure is counted, and those requests fell back
    assert flaky.failed_calls >= 1
    assert delta(after, before, 'leanscale_stage_errors_total{stage="small"}') == flaky.failed_items
    assert after["leanscale_queue_depth"] == 0
    # latency histogram: one observation per request, cumulative buckets
    assert delta(after, before, "leanscale_request_latency_seconds_count") == len(requests)
    buckets = [after[f'leanscale_request_latency_seconds_bucket{{le="{le!r}"}}'] for le in LATENCY_BUCKETS]
    assert buckets == sorted(buckets)
    count = after["leanscale_request_latency_seconds_count"]
    assert after['leanscale_request_latency_seconds_bucket{le="+Inf"}'] == count
    assert after["leanscale_request_latency_seconds_sum"] > 0
    # micro-batching: far fewer cascade calls than requests
    batches = delta(after, before, "leanscale_batches_total")
    assert flaky.calls <= batches < len(requests) / 2, (flaky.calls, batches)


def test_bad_input_gets_4xx_with_a_message(served):
    port = served[2]
    before = metrics(port)
    cases = [
        (b"{not json", 422),
        ({}, 422),
        ({"texts": []}, 422),
        ({"text": 3}, 422),
        ({"texts": "not a list"}, 422),
        ({"texts": ["a", None]}, 422),
        ({"text": "a", "texts": ["b"]}, 422),
        ({"text": "a", "unknown": 1}, 422),
        (["a list"], 422),
        ({"texts": ["x"] * 51}, 413),  # max_items_per_request=50
        ({"text": "y" * 1001}, 413),  # max_text_chars=1000
        ({"text": "z", "pad": "p" * 200_000}, 413),  # body over max_body_bytes=200_000 (Content-Length)
    ]
    for body, expected in cases:
        status, headers, data = call(port, "POST", "/v1/predict", body)
        assert status == expected, (body if len(str(body)) < 100 else str(body)[:100], status, data[:200])
        assert headers["content-type"] == "application/json"
        detail = json.loads(data)["detail"]
        assert isinstance(detail, str) and len(detail) > 10
    # the actual body size is checked too, not only Content-Length (chunked: no Content-Length)
    status, _, data = call(port, "POST", "/v1/predict", (b"x" * 1000 for _ in range(300)),
                           headers={"Content-Type": "application/json"})
    assert status == 413 and "200000" in json.loads(data)["detail"]
    # a text/plain body is not a JSON object
    status, _, data = call(port, "POST", "/v1/predict", "hello", headers={"Content-Type": "text/plain"})
    assert status == 422 and "JSON object" in json.loads(data)["detail"]
    # the messages say what is wrong
    status, body = predict(port, {"texts": ["x"] * 51})
    assert "at most 50" in body["detail"]
    status, body = predict(port, {"text": "y" * 1001})
    assert "at most 1000 characters" in body["detail"]
    after = metrics(port)
    assert delta(after, before, 'leanscale_rejected_total{reason="bad_request"}') == 10
    assert delta(after, before, 'leanscale_rejected_total{reason="too_large"}') == 6
    assert delta(after, before, 'leanscale_rejected_total{reason="queue_full"}') == 0
    assert delta(after, before, "leanscale_predictions_total") == 0
    # and the server still answers
    assert predict(port, {"text": "hello 1"})[0] == 200


def test_healthz_openapi_and_docs(served):
    port = served[2]
    status, _, data = call(port, "GET", "/healthz", headers={})
    health = json.loads(data)
    assert status == 200 and health["status"] == "ok" and health["stages"] == ["regex", "small", "big"]
    assert health["queue_depth"] == 0 and health["oldest_wait_s"] == 0.0 and health["max_queue_age_s"] == 10.0
    status, _, data = call(port, "GET", "/openapi.json", headers={})
    spec = json.loads(data)
    assert status == 200 and "post" in spec["paths"]["/v1/predict"]
    op = spec["paths"]["/v1/predict"]["post"]
    assert "requestBody" in op and {"200", "413", "422", "503"} <= set(op["responses"])
    schemas = spec["components"]["schemas"]
    assert schemas["PredictRequest"]["properties"]["texts"]["anyOf"][0]["maxItems"] == 50
    assert set(schemas["Prediction"]["properties"]) == {"label", "stage", "confidence", "cost"}
    # /docs loads Swagger UI from a CDN: off unless asked for (docs=True)
    assert call(port, "GET", "/docs", headers={})[0] == 404
    assert call(port, "GET", "/redoc", headers={})[0] == 404
    app = create_app(_gated_cascade()[0], docs=True)
    with running(app) as port2:
        status, _, data = call(port2, "GET", "/docs", headers={})
        assert status == 200 and b"swagger" in data.lower()


def _gated_cascade():
    """A one-stage cascade whose stage blocks on ``gate`` once ``state['gated']`` is set."""
    gate, entered, state = threading.Event(), threading.Event(), {"gated": False}

    def slow(items):
        if state["gated"]:
            entered.set()
            assert gate.wait(20)
        return [(f"label-{t}", 1.0) for t in items]

    stage = CallableStage(slow, name="slow", cost=1.0, batched=True)
    cascade = Cascade([stage]).fit(["a", "b"], ["label-a", "label-b"])
    return cascade, gate, entered, state


def test_full_queue_answers_503_at_once_and_loses_nothing():
    cascade, gate, entered, state = _gated_cascade()
    app = create_app(cascade, max_batch=1, max_wait_ms=0.0, max_queue=1)
    with running(app) as port:
        state["gated"] = True
        answers = {}

        def send(text):
            answers[text] = predict(port, {"text": text})

        first = threading.Thread(target=send, args=("first",))
        first.start()
        assert entered.wait(10)  # the worker is busy with "first"
        second = threading.Thread(target=send, args=("second",))
        second.start()
        deadline = time.monotonic() + 10
        while metrics(port)["leanscale_queue_depth"] < 1:  # "second" waits in the queue
            assert time.monotonic() < deadline
            time.sleep(0.01)
        t0 = time.monotonic()
        status, headers, data = call(port, "POST", "/v1/predict", {"text": "third"})
        assert status == 503 and time.monotonic() - t0 < 5
        assert "queue is full" in json.loads(data)["detail"] and headers.get("retry-after") == "1"
        assert predict(port, {"text": "fourth"})[0] == 503
        status, body = predict(port, {"texts": ["x", "y"]})  # more than max_queue=1 texts: never fits
        assert status == 413 and "max_queue" in body["detail"]
        gate.set()
        first.join(10)
        second.join(10)
        assert answers["first"] == (200, {"predictions": [
            {"label": "label-first", "stage": "slow", "confidence": 1.0, "cost": 1.0}]})
        assert answers["second"][0] == 200 and answers["second"][1]["predictions"][0]["label"] == "label-second"
        m = metrics(port)
        assert m['leanscale_rejected_total{reason="queue_full"}'] == 2
        assert m['leanscale_rejected_total{reason="too_large"}'] == 1
        assert m["leanscale_predictions_total"] == 2 and m["leanscale_requests_total"] == 5


def test_unexpected_failure_answers_500_and_the_worker_survives():
    cascade = _gated_cascade()[0]
    original = cascade.predict_detailed

    def broken(texts):
        if "boom" in texts:
            raise RuntimeError("kaboom")
        out = original(texts)
        if "short" in texts:  # a wrong number of answers must not be sent back
            return out._replace(labels=out.labels[:-1])
        return out

    cascade.predict_detailed = broken
    app = create_app(cascade, max_batch=8, max_wait_ms=1.0)
    with running(app) as port:
        status, body = predict(port, {"text": "boom"})
        assert status == 500 and "kaboom" in body["detail"]
        status, body = predict(port, {"texts": ["short", "fine"]})
        assert status == 500 and "labels" in body["detail"]
        status, body = predict(port, {"text": "fine"})  # the worker is still there
        assert status == 200 and body["predictions"][0]["label"] == "label-fine"
        answers = [None] * 20

        def send(i):
            answers[i] = predict(port, {"text": f"t{i}"})

        threads = [threading.Thread(target=send, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert [a[0] for a in answers] == [200] * 20
        assert [a[1]["predictions"][0]["label"] for a in answers] == [f"label-t{i}" for i in range(20)]
        m = metrics(port)
        assert m["leanscale_internal_errors_total"] == 2 and m["leanscale_requests_total"] == 23


def test_create_app_checks_its_parameters():
    cascade, *_ = _gated_cascade()
    with pytest.raises(InvalidParameterError, match="max_batch"):
        create_app(cascade, max_batch=0)
    with pytest.raises(InvalidParameterError, match="max_wait_ms"):
        create_app(cascade, max_wait_ms=-1)
    with pytest.raises(InvalidParameterError, match="request_timeout_s"):
        create_app(cascade, request_timeout_s=0)
    with pytest.raises(InvalidParameterError, match="max_queue_age_s"):
        create_app(cascade, max_queue_age_s=-1)
    with pytest.raises(InvalidParameterError, match="'docs'"):
        create_app(cascade, docs="yes")
    app = create_app(cascade)
    with pytest.raises(InvalidParameterError, match="max_connections"):
        server_config(app, max_connections=0)
    with pytest.raises(InvalidParameterError, match="timeout_idle"):
        server_config(app, timeout_idle=0)
    with pytest.raises(InvalidParameterError, match="cascade"):
        create_app(object())
    from leanscale.core.errors import NotFittedError

    with pytest.raises(NotFittedError):
        create_app(Cascade([CallableStage(lambda x: x, name="f")]))


OBJECTS = {"small": small_model, "big": big_model}  # for Cascade.load / leanscale serve --objects


def test_cli_serve_loads_a_saved_cascade_and_serves_it(tmp_path, monkeypatch):
    from leanscale.cli.main import build_parser

    cascade, _ = build_cascade()
    path = cascade.save(tmp_path / "cascade.json")
    launched = {}
    monkeypatch.setattr(server_mod, "_run", lambda config: launched.update(config=config))
    args = build_parser(["serve"]).parse_args(
        ["serve", str(path), "--port", "0", "--max-batch", "8", "--objects", f"{__name__}:OBJECTS",
         "--max-connections", "50", "--timeout-idle", "3", "--request-timeout", "7"])
    assert args.func(args) == 0
    config = launched["config"]
    assert config.host == "127.0.0.1" and config.port == 0
    assert config.leanscale_max_connections == 50 and config.timeout_graceful_shutdown == 30.0
    assert config.app.docs_url is None  # no --docs
    with running(config.app) as port:  # the loaded cascade answers like the original
        texts = ["my bill 1 is wrong", "the app crash 2", "hello 3"]
        status, body = predict(port, {"texts": texts})
        assert status == 200
        assert [p["label"] for p in body["predictions"]] == list(cascade.predict(texts))
        assert [p["stage"] for p in body["predictions"]] == ["small", "regex", "big"]


def test_serve_warns_off_loopback_and_needs_the_objects(tmp_path, monkeypatch, caplog):
    from leanscale.cascade.server import serve

    cascade, _ = build_cascade()
    path = cascade.save(tmp_path / "cascade.json")
    launched = {}
    monkeypatch.setattr(server_mod, "_run", lambda config: launched.update(config=config))
    with caplog.at_level("WARNING", logger="leanscale.cascade.server"):
        serve(path, host="127.0.0.1", objects=OBJECTS)
    assert not caplog.records
    with caplog.at_level("WARNING", logger="leanscale.cascade.server"):
        serve(path, host="0.0.0.0", port=0, objects=OBJECTS)
    assert launched["config"].host == "0.0.0.0" and "no authentication" in caplog.text
    with pytest.raises(InvalidParameterError, match="objects"):
        serve(path)  # the callable stages cannot be loaded without their functions


@pytest.fixture
def held_port():
    """A port on 127.0.0.1 another socket listens on (set up as a server would: SO_REUSEADDR)."""
    import socket

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock.getsockname()[1]
    sock.close()


def test_serve_refuses_an_address_it_cannot_listen_on_before_loading(tmp_path, monkeypatch, held_port):
    from leanscale.cascade.server import serve
    from leanscale.core.errors import LeanscaleError

    def never(config):
        raise AssertionError("uvicorn started on an address serve cannot listen on")

    monkeypatch.setattr(server_mod, "_run", never)
    missing = tmp_path / "missing.json"  # the address is checked first: no cascade loaded (or needed)
    with pytest.raises(LeanscaleError, match=rf"cannot listen on 127\.0\.0\.1:{held_port}: .*in use"):
        serve(missing, host="127.0.0.1", port=held_port)
    with pytest.raises(LeanscaleError, match=rf"cannot listen on localhost:{held_port}: .*in use"):
        serve(missing, host="localhost", port=held_port)
    # not an address (999 > 255): fails in getaddrinfo; names the host parameter
    with pytest.raises(InvalidParameterError, match=r"cannot listen on 999\.1\.1\.1:8765: .*'host' parameter of serve"):
        serve(missing, host="999.1.1.1", port=8765)
    # an address of no interface here (TEST-NET-1, RFC 5737): bind fails at once, no network used
    with pytest.raises(LeanscaleError, match=r"cannot listen on 192\.0\.2\.1:8765: "):
        serve(missing, host="192.0.2.1", port=8765)
    for port in (-1, 65536, 8000.5, "8000"):
        with pytest.raises(InvalidParameterError, match="'port' parameter of serve"):
            serve(missing, port=port)
    with pytest.raises(InvalidParameterError, match="'host' parameter of serve"):
        serve(missing, host=None)


def test_missing_fastapi_names_the_extra(monkeypatch):
    import sys

    from leanscale.core.errors import MissingDependencyError

    cascade, *_ = _gated_cascade()
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi -> ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'leanscale\[serve\]'"):
        create_app(cascade)
