"""The gateway served for real (uvicorn on 127.0.0.1) in front of two fake OpenAI backends, driven
with the official ``openai`` client: pass-through, streaming, fallback on 500 / 429 / timeout,
every backend failing, unknown models, client keys, malformed bodies, cost and metrics."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from leanscale.cascade.gateway.testing import FakeOpenAIBackend, count_tokens

from .conftest import BIG, SMALL, client, running_gateway, two_model_config

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say hello to the gateway"}]
PROMPT_TOKENS = count_tokens("be brief\nsay hello to the gateway")  # the fake counts words: 7


def _cost(prices: dict, prompt_tokens: int, completion_tokens: int) -> float:
    return (prompt_tokens * prices["input"] + completion_tokens * prices["output"]) / 1000


def test_pass_through_text_usage_cost_and_upstream_model(backends, monkeypatch):
    small, big = backends
    monkeypatch.setenv("SMALL_KEY", "sk-backend-small")
    config = two_model_config(small, big, small={"model": "llama-8b-upstream", "api_key_env": "SMALL_KEY"})
    with running_gateway(config) as url:
        raw = client(url).chat.completions.with_raw_response.create(model="small", messages=MESSAGES)
    answer = raw.parse()
    assert answer.choices[0].message.content == "the small model says hello"
    assert raw.headers["x-leanscale-model"] == "small"
    assert PROMPT_TOKENS == 7
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (7, 5)
    expected = _cost(SMALL, 7, 5)  # (7 * 0.0006 + 5 * 0.0018) / 1000
    assert float(raw.headers["x-leanscale-cost-usd"]) == pytest.approx(expected, rel=1e-9)
    assert answer.usage.model_extra["cost_usd"] == pytest.approx(expected, rel=1e-9)
    # the backend got the upstream model name and the backend key, never the client's key
    assert small.requests[-1]["model"] == "llama-8b-upstream"
    assert small.requests[-1]["messages"] == MESSAGES
    assert small.headers[-1]["authorization"] == "Bearer sk-backend-small"
    assert big.calls == 0


def test_text_completions_endpoint(gateway):
    url, small, big = gateway
    raw = client(url).completions.with_raw_response.create(model="big", prompt="one two three")
    answer = raw.parse()
    assert answer.choices[0].text == "the big model answers carefully"
    assert raw.headers["x-leanscale-model"] == "big"
    assert float(raw.headers["x-leanscale-cost-usd"]) == pytest.approx(_cost(BIG, 3, 5), rel=1e-9)
    assert (small.calls, big.calls) == (0, 1)


def test_streaming_chunks_join_to_the_text_and_end_with_usage(gateway):
    url, small, _ = gateway
    c = client(url)
    raw = c.chat.completions.with_raw_response.create(model="small", messages=MESSAGES, stream=True,
                                                      stream_options={"include_usage": True})
    assert raw.headers["x-leanscale-model"] == "small"
    assert "x-leanscale-cost-usd" not in raw.headers  # unknown before the end: in the usage chunk instead
    with raw.parse() as stream:
        assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == "the small model says hello"
    chunks = list(c.chat.completions.create(model="small", messages=MESSAGES, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == "the small model says hello"
    assert len([ch for ch in chunks if ch.choices]) > 3  # really streamed, word by word
    last = chunks[-1]
    assert last.choices == [] and (last.usage.prompt_tokens, last.usage.completion_tokens) == (7, 5)
    assert last.usage.model_extra["cost_usd"] == pytest.approx(_cost(SMALL, 7, 5), rel=1e-9)
    assert all(ch.usage is None for ch in chunks[:-1])
    # the gateway asked the backend for usage even when the client does not; the client then gets none
    chunks = list(c.chat.completions.create(model="small", messages=MESSAGES, stream=True))
    assert small.requests[-1]["stream_options"] == {"include_usage": True}
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "the small model says hello"
    assert all(ch.usage is None and ch.choices for ch in chunks)


def test_streaming_text_completions(gateway):
    url, _, _ = gateway
    chunks = list(client(url).completions.create(model="big", prompt="hi there", stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == "the big model answers carefully"
    assert chunks[-1].usage.model_extra["cost_usd"] == pytest.approx(_cost(BIG, 2, 5), rel=1e-9)


@pytest.mark.parametrize("fault", [{"status": 500}, {"status": 429, "retry_after": 8}, {"hang_s": 8.0}],
                         ids=["500", "429", "timeout"])
def test_fallback_to_big(short_timeout_gateway, fault):
    url, small, big = short_timeout_gateway
    small.set_fault(**fault)
    t0 = time.perf_counter()
    raw = client(url).chat.completions.with_raw_response.create(model="small", messages=MESSAGES)
    elapsed = time.perf_counter() - t0
    assert raw.headers["x-leanscale-model"] == "big"
    assert raw.parse().choices[0].message.content == "the big model answers carefully"
    # the cost is big's: its usage at big's prices
    assert float(raw.headers["x-leanscale-cost-usd"]) == pytest.approx(_cost(BIG, 7, 5), rel=1e-9)
    assert (small.calls, big.calls) == (1, 1)
    # neither small's 8-s hang nor its Retry-After of 8 s was waited for (small's timeout is 0.5 s);
    # the bound leaves room for a loaded machine (a fallback took 1.2 s at load average 12)
    assert elapsed < 5.0


def test_stream_falls_back_before_the_first_chunk(short_timeout_gateway):
    url, small, big = short_timeout_gateway
    small.set_fault(status=503)
    c = client(url)
    raw = c.chat.completions.with_raw_response.create(model="small", messages=MESSAGES, stream=True)
    assert raw.headers["x-leanscale-model"] == "big"
    with raw.parse() as stream:
        assert "".join(ch.choices[0].delta.content or "" for ch in stream) == "the big model answers carefully"
    small.set_fault(hang_s=3.0)
    chunks = list(c.chat.completions.create(model="small", messages=MESSAGES, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "the big model answers carefully"
    assert small.calls == 2 and big.calls == 2


def test_a_stream_broken_after_the_first_chunk_ends_with_an_error_not_a_truncation(gateway):
    url, small, big = gateway
    small.set_fault(stream_fail_after=2)
    got = []
    with pytest.raises(openai.APIError, match="failed during the stream"):
        for ch in client(url).chat.completions.create(model="small", messages=MESSAGES, stream=True):
            got.append(ch.choices[0].delta.content or "")
    assert "".join(got) == "the small"  # the two words sent before the break, then the error
    assert big.calls == 0  # no fallback once chunks went out
    health = httpx.get(url.removesuffix("/v1") + "/healthz").json()
    assert health["in_flight"] == 0


def test_every_backend_failing_is_a_502_naming_each(gateway):
    url, small, big = gateway
    small.set_fault(status=500, message="small is down")
    big.set_fault(status=502, message="big is down too")
    with pytest.raises(openai.APIStatusError) as info:
        client(url).chat.completions.create(model="small", messages=MESSAGES)
    err = info.value
    assert err.status_code == 502
    body = err.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == "backends_failed"
    message = body["error"]["message"]
    assert "'small': HTTP 500: small is down" in message and "'big': HTTP 502: big is down too" in message
    assert (small.calls, big.calls) == (1, 1)
    # streams too, before the first chunk
    with pytest.raises(openai.APIStatusError) as info:
        list(client(url).chat.completions.create(model="small", messages=MESSAGES, stream=True))
    assert info.value.status_code == 502


def test_every_backend_overloaded_is_a_503_with_retry_after(gateway):
    url, small, big = gateway
    small.set_fault(status=429, retry_after=3)
    big.set_fault(status=429, retry_after=7)
    with pytest.raises(openai.InternalServerError) as info:
        client(url).chat.completions.create(model="small", messages=MESSAGES)
    assert info.value.status_code == 503
    assert info.value.response.headers["retry-after"] == "3"
    assert info.value.response.json()["error"]["code"] == "backends_overloaded"


def test_a_model_without_fallbacks_is_tried_once(gateway):
    url, small, big = gateway
    big.set_fault(status=500)
    with pytest.raises(openai.APIStatusError) as info:
        client(url).chat.completions.create(model="big", messages=MESSAGES)
    assert info.value.status_code == 502 and (small.calls, big.calls) == (0, 1)


def test_unknown_model_is_404_model_not_found(gateway):
    url, small, big = gateway
    with pytest.raises(openai.NotFoundError) as info:
        client(url).chat.completions.create(model="gpt-17", messages=MESSAGES)
    assert info.value.code == "model_not_found"
    assert "'gpt-17'" in info.value.message and "'small'" in info.value.message
    assert small.calls == big.calls == 0


@pytest.mark.parametrize("kwargs, param", [
    ({"model": "small", "messages": []}, "messages"),
    ({"model": "small", "messages": "hello"}, "messages"),
    ({"model": "small", "messages": MESSAGES, "extra_body": {"stream": "yes"}}, "stream"),
    ({"model": "", "messages": MESSAGES}, "model"),
])
def test_malformed_requests_are_400(gateway, kwargs, param):
    url, small, big = gateway
    with pytest.raises(openai.BadRequestError) as info:
        client(url).chat.completions.create(**kwargs)
    assert info.value.param == param
    assert small.calls == big.calls == 0


def test_a_body_that_is_not_json_is_400(gateway):
    url, _, _ = gateway
    r = httpx.post(url + "/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_a_backend_refusing_the_request_is_passed_through_without_fallback(gateway):
    url, small, big = gateway
    small.set_fault(status=400, message="max_tokens is too large")
    with pytest.raises(openai.BadRequestError, match="max_tokens is too large"):
        client(url).chat.completions.create(model="small", messages=MESSAGES, max_tokens=10**9)
    assert (small.calls, big.calls) == (1, 0)


def test_client_keys(backends, monkeypatch):
    small, big = backends
    monkeypatch.setenv("GW_KEYS", "key-one, key-two")
    with running_gateway(two_model_config(small, big, client_keys_env="GW_KEYS")) as url:
        for key in ("wrong-key", "key-one,key-two", "key-on"):
            with pytest.raises(openai.AuthenticationError) as info:
                client(url, api_key=key).chat.completions.create(model="small", messages=MESSAGES)
            assert info.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):  # no Authorization header at all
            client(url).models.list(extra_headers={"Authorization": openai.Omit()})
        with pytest.raises(openai.AuthenticationError):
            client(url, api_key="nope").models.list()
        assert small.calls == 0
        for key in ("key-one", "key-two"):
            answer = client(url, api_key=key).chat.completions.create(model="small", messages=MESSAGES)
            assert answer.choices[0].message.content == "the small model says hello"
        assert [m.id for m in client(url, api_key="key-two").models.list()] == ["small", "big"]
        # the client's key is not forwarded to the backend
        assert "authorization" not in small.headers[-1]


def test_models_list(gateway):
    url, _, _ = gateway
    models = list(client(url).models.list())
    assert [m.id for m in models] == ["small", "big"]
    assert all(m.object == "model" and m.owned_by == "leanscale" for m in models)


def test_max_in_flight_answers_429_with_retry_after(backends):
    small, big = backends
    small.latency_s = 1.0
    with running_gateway(two_model_config(small, big, max_in_flight=1, small={"timeout_s": 3})) as url:
        slow = {}
        t = threading.Thread(target=lambda: slow.update(
            r=client(url).chat.completions.create(model="small", messages=MESSAGES)))
        t.start()
        deadline = time.monotonic() + 5
        while small.calls == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as info:
            client(url).chat.completions.create(model="big", messages=MESSAGES)
        assert info.value.response.headers["retry-after"] == "1"
        assert info.value.code == "gateway_overloaded"
        t.join(5)
        assert slow["r"].choices[0].message.content == "the small model says hello"
        assert client(url).chat.completions.create(model="big", messages=MESSAGES).choices  # the slot is free again


def test_backend_max_concurrency_falls_back(backends):
    small, big = backends
    small.latency_s = 1.0
    config = two_model_config(small, big, small={"timeout_s": 3, "max_concurrency": 1})
    with running_gateway(config) as url:
        first = {}
        t = threading.Thread(target=lambda: first.update(
            r=client(url).chat.completions.with_raw_response.create(model="small", messages=MESSAGES)))
        t.start()
        deadline = time.monotonic() + 5
        while small.calls == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        raw = client(url).chat.completions.with_raw_response.create(model="small", messages=MESSAGES)
        assert raw.headers["x-leanscale-model"] == "big" and small.calls == 1
        t.join(5)
        assert first["r"].headers["x-leanscale-model"] == "small"


def test_a_client_leaving_a_stream_frees_its_slot(backends):
    small, big = backends
    small.chunk_delay_s = 2.0  # the stream would last 10 s
    with running_gateway(two_model_config(small, big, small={"timeout_s": 3})) as url:
        c = client(url)
        stream = c.chat.completions.create(model="small", messages=MESSAGES, stream=True)
        next(iter(stream))
        t0 = time.monotonic()
        stream.close()
        c.close()  # and its connection pool: the socket is closed for sure
        base = url.removesuffix("/v1")
        deadline = time.monotonic() + 5
        while httpx.get(base + "/healthz").json()["in_flight"] != 0:
            assert time.monotonic() < deadline, ("the stream's slot was not freed after the client left",
                                                 httpx.get(base + "/metrics").text)
            time.sleep(0.02)
        assert time.monotonic() - t0 < 5.0  # at once (room for a loaded machine), not when the 10-s stream ends
        metrics = httpx.get(base + "/metrics").text
        assert 'leanscale_gateway_in_flight 0.0' in metrics


def _metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{{want}}} not in the metrics")


def test_metrics_count_requests_outcomes_and_cost(gateway):
    url, small, _ = gateway
    c = client(url)
    c.chat.completions.create(model="small", messages=MESSAGES)
    list(c.chat.completions.create(model="small", messages=MESSAGES, stream=True))
    small.set_fault(status=500, times=1)
    c.chat.completions.create(model="small", messages=MESSAGES)  # answered by big
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=MESSAGES)
    text = httpx.get(url.removesuffix("/v1") + "/metrics").text
    assert _metric(text, "leanscale_gateway_requests_total", endpoint="chat", model="small", outcome="ok") == 2
    assert _metric(text, "leanscale_gateway_requests_total", endpoint="chat", model="big", outcome="ok") == 1
    assert _metric(text, "leanscale_gateway_requests_total", endpoint="chat", model="-",
                   outcome="model_not_found") == 1
    assert _metric(text, "leanscale_gateway_backend_calls_total", model="small", outcome="server_error") == 1
    assert _metric(text, "leanscale_gateway_fallbacks_total", model="big") == 1
    assert _metric(text, "leanscale_gateway_cost_usd_total", model="small") == pytest.approx(2 * _cost(SMALL, 7, 5))
    assert _metric(text, "leanscale_gateway_cost_usd_total", model="big") == pytest.approx(_cost(BIG, 7, 5))
    assert _metric(text, "leanscale_gateway_request_latency_seconds_count", endpoint="chat") == 4


def test_healthz_and_openai_shaped_404_for_unknown_paths(gateway):
    url, _, _ = gateway
    base = url.removesuffix("/v1")
    assert httpx.get(base + "/healthz").json()["status"] == "ok"
    r = httpx.get(base + "/v1/nothing")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_fake_backend_replays_recorded_answers():
    recorded = {"2+2?": "4", "capital of France?": "Paris"}
    with FakeOpenAIBackend(reply=lambda prompt: recorded.get(prompt, "I don't know")) as fake:
        c = client(fake.base_url)
        assert c.chat.completions.create(model="x", messages=[{"role": "user", "content": "2+2?"}]) \
            .choices[0].message.content == "4"
        assert c.completions.create(model="x", prompt="capital of France?").choices[0].text == "Paris"
        assert fake.calls == 2
