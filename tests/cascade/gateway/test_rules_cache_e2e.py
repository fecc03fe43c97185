"""Canned rules and the response cache wired into the gateway, end to end: the gateway served by
uvicorn in front of :class:`FakeOpenAIBackend` servers, driven with the official ``openai`` client.
A rule or a cache hit calls no backend, costs 0 and says so (headers, ``usage``, request log,
metrics); streamed and non-streamed requests share cache entries; a failing cache never fails a
request."""

from __future__ import annotations

import json
import math

import httpx
import numpy as np
import pytest

from leanscale.cascade.gateway import create_gateway_app
from leanscale.cascade.gateway.testing import FakeOpenAIBackend

from .conftest import SMALL, client, serve_app, two_model_config

RULES = [{"name": "hours", "pattern": r"\bopening hours\b", "answer": "We are open 9:00-17:00, Monday to Friday."}]
ASK = [{"role": "user", "content": "What are your OPENING HOURS please?"}]


def _cost(prices: dict, prompt_tokens: int, completion_tokens: int) -> float:
    return (prompt_tokens * prices["input"] + completion_tokens * prices["output"]) / 1000


def metric(base: str, name: str, **labels) -> float:
    """The value of one sample of the gateway's /metrics."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))  # prometheus_client sorts them
    prefix = f"{name}{{{want}}} " if labels else f"{name} "
    for line in httpx.get(base.removesuffix("/v1") + "/metrics").text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    raise AssertionError(f"{prefix!r} not in the metrics")


def read_log(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def echo_backends():
    """Backends whose answer names the prompt (which question was answered is visible)."""
    with FakeOpenAIBackend(reply=lambda p: f"small answers: {p}") as small, \
            FakeOpenAIBackend(reply=lambda p: f"big answers: {p}") as big:
        yield small, big


# ------------------------------------------------------------------------------------- rules
def test_rule_answers_without_any_backend_streamed_too(backends, tmp_path):
    small, big = backends
    log = tmp_path / "req.jsonl"
    config = two_model_config(small, big, rules=RULES, log={"path": str(log), "prompts": "text"})
    with serve_app(create_gateway_app(config)) as url:
        c = client(url)
        raw = c.chat.completions.with_raw_response.create(model="small", messages=ASK)
        answer = raw.parse()
        assert answer.choices[0].message.content == RULES[0]["answer"]
        assert answer.model == raw.headers["x-leanscale-model"] == "leanscale-rules"
        assert float(raw.headers["x-leanscale-cost-usd"]) == 0.0
        assert raw.headers["x-leanscale-models-called"] == ""
        assert answer.usage.model_extra["cost_usd"] == 0.0
        # usage in words (no tokenizer without a model): 6 words asked, 7 answered
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (6, 7)
        # streamed, with and without the usage chunk; n=2: every choice streamed
        raw = c.chat.completions.with_raw_response.create(model="big", messages=ASK, stream=True,
                                                          stream_options={"include_usage": True})
        assert raw.headers["x-leanscale-model"] == "leanscale-rules"
        with raw.parse() as stream:
            chunks = list(stream)
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == RULES[0]["answer"]
        assert chunks[-1].choices == [] and chunks[-1].usage.model_extra["cost_usd"] == 0.0
        chunks = list(c.chat.completions.create(model="small", messages=ASK, stream=True, n=2))
        texts = {i: "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices[0].index == i)
                 for i in (0, 1)}
        assert texts == {0: RULES[0]["answer"], 1: RULES[0]["answer"]}
        assert all(ch.usage is None for ch in chunks)
        # /v1/completions: a string prompt is the user message
        done = c.completions.create(model="small", prompt="opening hours?")
        assert done.choices[0].text == RULES[0]["answer"] and done.model == "leanscale-rules"
        # a request no rule matches goes to the backend
        other = c.chat.completions.create(model="small", messages=[{"role": "user", "content": "hello"}])
        assert other.choices[0].message.content == "the small model says hello"
        assert (small.calls, big.calls) == (1, 0)  # only the last request reached a backend
        assert metric(url, "leanscale_gateway_requests_total", endpoint="chat", model="leanscale-rules",
                      outcome="ok") == 3
        assert metric(url, "leanscale_gateway_policy_decisions_total", policy="rules", decision="hours") == 4
        assert metric(url, "leanscale_gateway_cost_usd_total", model="small") == pytest.approx(
            _cost(SMALL, 1, 5), rel=1e-9)  # the rules added nothing
    lines = read_log(log)
    assert len(lines) == 5
    rule_lines = lines[:4]
    assert [ln["rule"] for ln in rule_lines] == ["hours"] * 4
    assert all(ln["model"] == "leanscale-rules" and ln["cost_usd"] == 0.0 and ln["models_called"] == []
               and ln["status"] == "ok" and ln["answer"] == RULES[0]["answer"] for ln in rule_lines)
    assert [ln["policy"] for ln in rule_lines] == ["small", "big", "small", "small"]
    assert [ln["stream"] for ln in rule_lines] == [False, True, True, False]
    assert "rule" not in lines[4] and lines[4]["model"] == "small"


# ------------------------------------------------------------------------------------- exact cache
def test_exact_hit_at_temperature_0_only(echo_backends, tmp_path, monkeypatch):
    small, big = echo_backends
    log = tmp_path / "req.jsonl"
    # the upstream name differs from the configured one: a hit still reports the configured model
    config = two_model_config(small, big, small={"model": "llama-8b-upstream"}, cache={"semantic": False},
                              log={"path": str(log), "prompts": "hash"})
    msgs = [{"role": "user", "content": "what is two plus two"}]
    with serve_app(create_gateway_app(config)) as url:
        c = client(url)
        first = c.chat.completions.with_raw_response.create(model="small", messages=msgs, temperature=0)
        second = c.chat.completions.with_raw_response.create(model="small", messages=msgs, temperature=0.0,
                                                             user="someone-else")  # ignored by the key
        assert small.calls == 1
        a, b = first.parse(), second.parse()
        assert "x-leanscale-cache" not in first.headers
        assert second.headers["x-leanscale-cache"] == "exact"
        assert second.headers["x-leanscale-model"] == "small" and second.headers["x-leanscale-models-called"] == ""
        assert float(first.headers["x-leanscale-cost-usd"]) == pytest.approx(_cost(SMALL, 5, 7), rel=1e-9)
        assert float(second.headers["x-leanscale-cost-usd"]) == 0.0 and b.usage.model_extra["cost_usd"] == 0.0
        assert b.choices[0].message.content == a.choices[0].message.content == "small answers: what is two plus two"
        assert b.id != a.id and b.model == a.model == "llama-8b-upstream"
        assert "_leanscale_model" not in b.model_extra  # the gateway's bookkeeping stays inside
        # only deterministic requests: temperature 0.7 (and absent) go to the backend every time
        for _ in range(2):
            c.chat.completions.create(model="small", messages=msgs, temperature=0.7)
            c.chat.completions.create(model="small", messages=msgs)
        assert small.calls == 5
        # a different model (or parameter) is another key
        c.chat.completions.create(model="big", messages=msgs, temperature=0)
        c.chat.completions.create(model="small", messages=msgs, temperature=0, max_tokens=5)
        assert (small.calls, big.calls) == (6, 1)
        stats = {s: metric(url, "leanscale_gateway_cache", stat=s)
                 for s in ("hits", "hits_exact", "hits_semantic", "misses", "skipped", "puts", "size")}
        assert stats == {"hits": 1, "hits_exact": 1, "hits_semantic": 0, "misses": 3, "skipped": 4, "puts": 3,
                         "size": 3}
        assert metric(url, "leanscale_gateway_requests_total", endpoint="chat", model="small", outcome="ok") == 7
        assert metric(url, "leanscale_gateway_cost_usd_total", model="small") == pytest.approx(
            6 * _cost(SMALL, 5, 7), rel=1e-9)  # 6 backend answers; the hit cost nothing
    lines = read_log(log)
    assert len(lines) == 8
    assert lines[1]["cache"] == "exact" and lines[1]["model"] == "small" and lines[1]["cost_usd"] == 0.0
    assert lines[1]["models_called"] == [] and lines[1]["policy"] == "small"
    assert lines[1]["request_id"] == second.headers["x-leanscale-request-id"]
    assert lines[1]["prompt_sha256"] == lines[0]["prompt_sha256"]
    assert [ln.get("cache") for ln in lines].count("exact") == 1


# ------------------------------------------------------------------------------------- semantic cache
BASE = "how do I reset my password"
NEAR, FAR = "how can I reset my password", "how do I delete my account"
COS_NEAR, COS_FAR = 0.97, 0.90  # with the default threshold 0.95: a hit and a miss


def fake_embed(texts: list[str]) -> np.ndarray:
    """Known cosines: NEAR is at 0.97 of BASE, FAR at 0.90; any other text is orthogonal to them."""
    table = {BASE: [1.0, 0.0, 0.0], NEAR: [COS_NEAR, math.sqrt(1 - COS_NEAR**2), 0.0],
             FAR: [COS_FAR, -math.sqrt(1 - COS_FAR**2), 0.0]}
    return np.array([table.get(t, [0.0, 0.0, 1.0]) for t in texts]) * 3.0  # not normalised: the cache does it


def test_semantic_hit_above_the_threshold_miss_below(echo_backends):
    small, big = echo_backends
    config = two_model_config(small, big, cache={})
    with serve_app(create_gateway_app(config, cache_embed=fake_embed)) as url:
        c = client(url)

        def ask(text: str, **kw):
            return c.chat.completions.with_raw_response.create(
                model="small", messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": text}],
                temperature=0, **kw)

        assert ask(BASE).parse().choices[0].message.content == f"small answers: be brief\n{BASE}"
        near = ask(NEAR)
        assert near.headers["x-leanscale-cache"] == "semantic" and small.calls == 1
        assert near.parse().choices[0].message.content == f"small answers: be brief\n{BASE}"  # BASE's answer
        assert float(near.headers["x-leanscale-cost-usd"]) == 0.0
        far = ask(FAR)
        assert "x-leanscale-cache" not in far.headers and small.calls == 2
        assert far.parse().choices[0].message.content == f"small answers: be brief\n{FAR}"
        # the same question with other parameters is not the same group: no semantic hit
        other = ask(NEAR, max_tokens=50)
        assert "x-leanscale-cache" not in other.headers and small.calls == 3
        assert metric(url, "leanscale_gateway_cache", stat="hits_semantic") == 1
        assert metric(url, "leanscale_gateway_cache", stat="misses") == 3
        assert metric(url, "leanscale_gateway_policy_decisions_total", policy="cache", decision="semantic") == 1


def test_streamed_miss_serves_a_plain_request_and_vice_versa(echo_backends, tmp_path):
    small, big = echo_backends
    log = tmp_path / "req.jsonl"
    config = two_model_config(small, big, cache={}, log={"path": str(log), "prompts": "text"})
    with serve_app(create_gateway_app(config, cache_embed=fake_embed)) as url:
        c = client(url)
        one = [{"role": "user", "content": BASE}]
        # 1. a streamed miss (the client does not ask for usage) is stored whole, usage included
        chunks = list(c.chat.completions.create(model="small", messages=one, temperature=0, stream=True))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
        assert text == f"small answers: {BASE}" and small.calls == 1
        # ... and served to a non-streamed request: the same text, usage of the original call, cost 0
        raw = c.chat.completions.with_raw_response.create(model="small", messages=one, temperature=0)
        assert raw.headers["x-leanscale-cache"] == "exact" and small.calls == 1
        hit = raw.parse()
        assert hit.choices[0].message.content == text and hit.choices[0].finish_reason == "stop"
        assert (hit.usage.prompt_tokens, hit.usage.completion_tokens) == (6, 8)
        assert hit.usage.model_extra["cost_usd"] == 0.0
        # ... and to a semantically close streamed one
        raw = c.chat.completions.with_raw_response.create(
            model="small", messages=[{"role": "user", "content": NEAR}], temperature=0, stream=True,
            stream_options={"include_usage": True})
        assert raw.headers["x-leanscale-cache"] == "semantic" and raw.headers["x-leanscale-model"] == "small"
        assert float(raw.headers["x-leanscale-cost-usd"]) == 0.0
        with raw.parse() as stream:
            chunks = list(stream)
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
        assert chunks[-1].usage.model_extra["cost_usd"] == 0.0 and small.calls == 1
        # 2. a non-streamed miss served to a streamed request (completions endpoint: exact only)
        first = c.completions.create(model="big", prompt="count to three", temperature=0)
        chunks = list(c.completions.create(model="big", prompt="count to three", temperature=0, stream=True))
        assert "".join(ch.choices[0].text for ch in chunks) == first.choices[0].text == "big answers: count to three"
        assert chunks[-1].choices[0].finish_reason == "stop" and big.calls == 1
        # an interrupted stream is never stored
        small.set_fault(stream_fail_after=2, times=1)
        broken = [{"role": "user", "content": "tell me a story"}]
        with pytest.raises(Exception):  # noqa: B017,PT011 -- the client's APIError on the error event
            list(c.chat.completions.create(model="small", messages=broken, temperature=0, stream=True))
        again = c.chat.completions.with_raw_response.create(model="small", messages=broken, temperature=0)
        assert "x-leanscale-cache" not in again.headers and small.calls == 3
        assert again.parse().choices[0].message.content == "small answers: tell me a story"
        assert metric(url, "leanscale_gateway_cache", stat="puts") == 3  # BASE (streamed), count, story
        assert metric(url, "leanscale_gateway_cache", stat="size") == 3
    lines = read_log(log)
    assert [ln.get("cache") for ln in lines] == [None, "exact", "semantic", None, "exact", None, None]
    for ln in (lines[1], lines[2]):
        assert ln["model"] == "small" and ln["cost_usd"] == 0.0 and ln["answer"] == text
    assert lines[2]["prompt"] == NEAR and lines[2]["stream"] is True
    assert lines[4]["model"] == "big" and lines[4]["answer"] == "big answers: count to three"


# ------------------------------------------------------------------------------------- failures
def test_a_failing_cache_never_fails_a_request(echo_backends, caplog):
    small, big = echo_backends
    calls = {"n": 0}

    def broken_embed(texts):
        calls["n"] += 1
        raise RuntimeError("the embedding model is gone")

    config = two_model_config(small, big, cache={})
    with serve_app(create_gateway_app(config, cache_embed=broken_embed)) as url:
        c = client(url)
        msgs = [{"role": "user", "content": "what time is it"}]
        for _ in range(2):
            answer = c.chat.completions.create(model="small", messages=msgs, temperature=0)
            assert answer.choices[0].message.content == "small answers: what time is it"
        chunks = list(c.chat.completions.create(model="small", messages=msgs, temperature=0, stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "small answers: what time is it"
        assert small.calls == 3 and calls["n"] == 6  # each request: a failed look-up and a failed store
        assert metric(url, "leanscale_gateway_cache_errors_total", op="get") == 3
        assert metric(url, "leanscale_gateway_cache_errors_total", op="put") == 3
        assert metric(url, "leanscale_gateway_requests_total", endpoint="chat", model="small", outcome="ok") == 3
    assert caplog.text.count("the response cache failed") == 1  # logged once a minute, counted every time
