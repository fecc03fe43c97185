"""RequestLog: lines written by a writer thread, flushed; a full queue drops and counts instead of
blocking; the gateway's log in text mode holds the prompt and the answer, and /metrics counts drops."""

from __future__ import annotations

import json
import time

from leanscale.cascade.gateway import GatewayConfig
from leanscale.cascade.gateway.log import RequestLog
from leanscale.cascade.gateway.policies import prompt_hash

from .conftest import client, running_gateway


def test_lines_are_written_in_order_and_flushed(tmp_path):
    path = tmp_path / "log.jsonl"
    log = RequestLog(path, max_queue=100)
    for i in range(20):
        assert log.log({"i": i, "text": "é"})
    assert log.flush(5)
    assert [json.loads(x)["i"] for x in path.read_text(encoding="utf-8").splitlines()] == list(range(20))
    log.close()
    log.close()  # idempotent
    assert not log.log({"i": 99}) and log.dropped == 1
    RequestLog(path).close()  # appends, never truncates
    assert len(path.read_text().splitlines()) == 20


def test_a_full_queue_drops_and_counts_without_blocking(tmp_path):
    path = tmp_path / "log.jsonl"
    log = RequestLog(path, max_queue=3, start=False)  # no writer yet: the queue fills up
    t0 = time.perf_counter()
    results = [log.log({"i": i}) for i in range(10)]
    assert time.perf_counter() - t0 < 1.0  # never waits (a blocking put would wait forever: no writer yet)
    assert results == [True] * 3 + [False] * 7 and log.dropped == 7
    log.start()
    assert log.flush(5)
    log.close()
    assert [json.loads(x)["i"] for x in path.read_text().splitlines()] == [0, 1, 2]


def test_gateway_log_in_text_mode_and_dropped_metric(backends, tmp_path):
    small, big = backends
    path = tmp_path / "req.jsonl"
    config = GatewayConfig.from_dict({
        "models": [{"name": "small", "base_url": small.base_url, "input_price_per_1k": 1.0},
                   {"name": "big", "base_url": big.base_url}],
        "fallbacks": {"small": ["big"]}, "backoff_s": 0.01,
        "log": {"path": str(path), "prompts": "text"}})
    with running_gateway(config) as url:
        c = client(url)
        raw = c.chat.completions.with_raw_response.create(model="small", messages=[{"role": "user", "content": "a b"}])
        small.set_fault(status=500, times=1)
        chunks = list(c.chat.completions.create(model="small", messages=[{"role": "user", "content": "x"}],
                                                stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "the big model answers carefully"
        deadline = time.monotonic() + 5
        while len(path.read_text().splitlines() if path.exists() else []) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        first, second = [json.loads(x) for x in path.read_text().splitlines()]
        import httpx

        metrics = httpx.get(url.removesuffix("/v1") + "/metrics").text
    assert first["request_id"] == raw.headers["x-leanscale-request-id"]
    assert (first["prompt"], first["answer"], first["model"], first["models_called"]) == (
        "a b", "the small model says hello", "small", ["small"])
    assert first["cost_usd"] == (2 * 1.0) / 1000 and first["policy"] == "small" and "prompt_sha256" not in first
    assert second["models_called"] == ["small", "big"] and second["model"] == "big" and second["stream"] is True
    assert second["answer"] == "the big model answers carefully" and second["status"] == "ok"
    assert prompt_hash("x").startswith("sha256:") and len(prompt_hash("x")) == 7 + 64
    assert "leanscale_gateway_log_dropped_total 0.0" in metrics
