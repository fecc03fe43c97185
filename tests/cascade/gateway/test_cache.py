"""The gateway's response cache (leanscale.cascade.gateway.cache): exact and semantic hits (with a
fake embedding at known cosines), what changes the key, TTL with an injected clock, LRU eviction
against a reference, Redis (a fake client; the lazy import error), async wrappers and config checks."""

from __future__ import annotations

import asyncio
import random
import sys
import threading
import zlib
from collections import OrderedDict

import numpy as np
import pytest
from openai.types.chat import ChatCompletion

from leanscale.cascade.gateway.cache import (
    CACHE_DEFAULTS,
    EmbedBatcher,
    EmbedQueueFull,
    ResponseCache,
    check_cache_config,
    completion_from_chunks,
    request_key,
)
from leanscale.cascade.gateway.rules import completion_to_chunks
from leanscale.core.errors import (
    DataFormatError,
    InvalidParameterError,
    MissingDependencyError,
)

from .conftest import redis_missing, redis_server

THRESHOLD = 0.95


def body(text: str = "What is the capital of France?", **kw) -> dict:
    b = {"model": "small", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}],
         "temperature": 0}
    b.update(kw)
    return b


def answer(text: str = "Paris.", model: str = "small") -> dict:
    return {"id": "chatcmpl-orig", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                         "logprobs": None}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10, "cost_usd": 0.0123}}


class FakeEmbed:
    """Texts -> 64-d vectors: "base" is e1, "near"/"far" are at cosines just above / below the
    threshold (closed form: [c, sqrt(1 - c^2), 0, ...]); any other text gets a random Gaussian
    vector in dimensions 3..63 (seeded by the text): orthogonal to those three, and at cosine
    ~N(0, 1/61) with the other texts -- far below the threshold. Records the texts it embeds and
    the threads it ran on."""

    DIM = 64

    def __init__(self):
        self.calls: list[str] = []
        self.threads: set[int] = set()
        c_hi, c_lo = THRESHOLD + 1e-3, THRESHOLD - 1e-3
        self.table = {
            "base": [1.0, 0.0, 0.0],
            "near": [c_hi, np.sqrt(1 - c_hi**2), 0.0],
            "far": [c_lo, np.sqrt(1 - c_lo**2), 0.0],
            "near-scaled": [7 * c_hi, 7 * np.sqrt(1 - c_hi**2), 0.0],  # rows are normalised by the cache
            "other": [0.0, 0.0, 1.0],
        }

    def __call__(self, texts):
        self.calls.extend(texts)
        self.threads.add(threading.get_ident())
        return np.stack([self.vector(t) for t in texts]).astype(np.float32)

    def vector(self, text: str) -> np.ndarray:
        out = np.zeros(self.DIM)
        key = text.split(" #")[0]  # "near #46": the vector of "near" (numbers barely move MiniLM either)
        if key in self.table:
            out[:3] = self.table[key]
        else:
            out[3:] = np.random.default_rng(zlib.crc32(text.encode())).standard_normal(self.DIM - 3)
        return out


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def make(embed=None, clock=None, **settings) -> ResponseCache:
    return ResponseCache.from_config({"threshold": THRESHOLD, **settings}, embed=embed or FakeEmbed(),
                                     clock=clock or Clock())


def content(hit) -> str:
    return hit[0]["choices"][0]["message"]["content"]


def test_exact_hit_is_a_fresh_zero_cost_copy_and_ignores_stream_and_user():
    cache = make(semantic=False)
    assert cache.get(body()) is None
    assert cache.put(body(), answer())
    got, kind = cache.get(body())
    assert kind == "exact" and content((got, kind)) == "Paris."
    parsed = ChatCompletion.model_validate(got)
    assert parsed.id != "chatcmpl-orig" and parsed.id.startswith("chatcmpl-cache-")
    assert got["usage"]["cost_usd"] == 0.0 and got["usage"]["total_tokens"] == 10 and got["model"] == "small"
    got["choices"][0]["message"]["content"] = "mutated"  # the caller's copy, not the stored answer
    # streaming, stream_options, user, metadata and key order do not change the key; 0 == 0.0
    same = {"stream": True, "stream_options": {"include_usage": True}, "user": "u1", "metadata": {"a": "b"},
            "temperature": 0.0}
    again = cache.get(dict(reversed(list(body(**same).items()))))
    assert again[1] == "exact" and content(again) == "Paris."
    assert request_key(body()) == request_key(body(**same))
    s = cache.stats()
    assert (s["hits"], s["hits_exact"], s["misses"], s["size"], s["puts"]) == (2, 2, 1, 1, 1)


@pytest.mark.parametrize("change", [
    {"model": "big"}, {"model": "leanscale-router:0.3"}, {"max_tokens": 10}, {"top_p": 0.5}, {"seed": 1},
    {"stop": ["\n"]}, {"n": 2}, {"response_format": {"type": "json_object"}}, {"tools": []},
    {"top_k": 5},  # a backend-specific field the cache does not know: keyed (the safe side)
    {"messages": [{"role": "user", "content": "What is the capital of France?"}]},  # no system prompt
])
def test_different_params_miss(change):
    for semantic in (False, True):
        cache = make(semantic=semantic)
        cache.put(body(), answer())
        assert cache.get(body(**change)) is None, change
        assert cache.get(body()) is not None


def test_non_deterministic_requests_are_not_cached_unless_switched_off():
    cache = make()
    for b in (body(temperature=0.7), {k: v for k, v in body().items() if k != "temperature"},
              body(temperature=True), body(temperature="0")):
        assert not cache.cacheable(b)
        assert cache.put(b, answer()) is False and cache.get(b) is None
    assert cache.stats()["skipped"] == 4 and cache.stats()["size"] == 0 and cache.stats()["misses"] == 0
    loose = make(only_deterministic=False)
    sampled = body(temperature=0.7)
    assert loose.put(sampled, answer()) and loose.get(sampled)[1] == "exact"
    assert loose.get(body(temperature=0.8)) is None  # temperature is still part of the key


def test_semantic_hit_at_closed_form_cosines_just_above_and_below_the_threshold():
    embed = FakeEmbed()
    cache = make(embed=embed)
    cache.put(body("base"), answer("A1"))
    hit = cache.get(body("near"))  # cosine = threshold + 0.001
    assert hit is not None and hit[1] == "semantic" and content(hit) == "A1"
    assert cache.get(body("near-scaled"))[1] == "semantic"  # the embedding's scale does not matter
    assert cache.get(body("far")) is None  # cosine = threshold - 0.001
    assert cache.get(body("other")) is None
    # same text: the exact layer answers first
    assert cache.get(body("base"))[1] == "exact"
    # near, but another model / parameter / history: no semantic hit
    assert cache.get(body("near", model="big")) is None
    assert cache.get(body("near", max_tokens=5)) is None
    history = body("near")
    history["messages"] = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                           *history["messages"][1:]]
    assert cache.get(history) is None
    s = cache.stats()
    assert (s["hits_semantic"], s["hits_exact"], s["misses"]) == (2, 1, 5)


def test_semantic_hit_needs_the_same_numbers_unless_switched_off():
    for same_numbers in (True, False):
        cache = make(semantic_same_numbers=same_numbers)
        cache.put(body("base #48 clips in April, half as many in May"), answer("72"))
        assert cache.get(body("near #48 clips in April, half as many in May"))[1] == "semantic"
        other = cache.get(body("near #46 clips in April, half as many in May"))
        assert (other is None) == same_numbers
        assert (cache.get(body("near #48 clips in April, half as many in May 2")) is None) == same_numbers


def test_semantic_picks_the_most_similar_entry_and_skips_ineligible_requests():
    embed = FakeEmbed()
    cache = make(embed=embed, semantic_max_chars=10)
    cache.put(body("far"), answer("FAR"))  # cosine(near, far) ~ 0.99999 > cosine(near, base)
    cache.put(body("base"), answer("BASE"))
    assert content(cache.get(body("near"))) == "FAR"
    assert content(cache.get(body("base"))) == "BASE"
    n = len(embed.calls)
    long_text = "x" * 11  # over semantic_max_chars: exact layer only, never embedded
    cache.put(body(long_text), answer("L"))
    assert cache.get(body(long_text))[1] == "exact" and len(embed.calls) == n
    # last message not from the user (a tool-call round trip): exact only
    tool_turn = body("base")
    tool_turn["messages"] = [*tool_turn["messages"], {"role": "tool", "tool_call_id": "1", "content": "42"}]
    assert cache.get(tool_turn) is None and len(embed.calls) == n
    # a miss's embedding is reused by the put that follows (one embed call per text)
    cache.get(body("other"))
    cache.put(body("other"), answer("O"))
    assert embed.calls.count("other") == 1


@pytest.mark.parametrize("max_entries", [200, 40])  # 30 live rows: a small group (rows only) / most rows
def test_semantic_best_entry_matches_brute_force_in_both_lookup_paths(max_entries):
    """Random unit vectors in 8 dimensions; one group of 30 stored texts (and 5 of another system
    prompt, never eligible): every look-up returns the brute-force best stored text of its group
    when that cosine reaches the threshold, else a miss."""
    rng = np.random.default_rng(max_entries)
    table = {f"t{i}": v / np.linalg.norm(v) for i, v in enumerate(rng.normal(size=(60, 8)))}

    def embed(texts):
        return np.stack([table[t] for t in texts])

    cache = make(embed=embed, max_entries=max_entries, threshold=0.8, semantic_same_numbers=False)
    stored = [f"t{i}" for i in range(30)]
    for t in stored:
        cache.put(body(t), answer(t))
    other = [{"role": "system", "content": "Another system prompt."}]
    for i in range(30, 35):
        b = body(f"t{i}")
        b["messages"] = [*other, b["messages"][1]]
        cache.put(b, answer(f"OTHER-{i}"))
    hits = 0
    for i in range(35, 60):
        q = f"t{i}"
        sims = {t: float(table[q] @ table[t]) for t in stored}
        best = max(sims, key=sims.get)
        got = cache.get(body(q))
        if sims[best] >= 0.8:
            hits += 1
            assert got is not None and got[1] == "semantic" and content(got) == best
        else:
            assert got is None
    assert 1 <= hits < 25  # both outcomes were exercised


def test_ttl_expiry_with_an_injected_clock():
    clock = Clock()
    cache = make(clock=clock, ttl_s=10)
    cache.put(body("base"), answer())
    clock.t += 9.99
    assert cache.get(body("base"))[1] == "exact" and cache.get(body("near"))[1] == "semantic"
    clock.t += 0.01  # exactly ttl_s after the put: expired (a hit did not extend it)
    assert cache.get(body("near")) is None  # the semantic layer skips expired rows
    assert cache.get(body("base")) is None
    s = cache.stats()
    assert s["expired"] == 1 and s["size"] == 0
    cache.put(body("base"), answer("again"))
    assert content(cache.get(body("base"))) == "again"


def test_lru_eviction_at_the_bound_frees_the_semantic_rows():
    embed = FakeEmbed()
    cache = make(embed=embed, max_entries=3)
    for t in ("base", "q1", "q2"):
        cache.put(body(t), answer(t))
    assert cache.get(body("base")) is not None  # base is now the most recently used
    cache.put(body("q3"), answer("q3"))  # evicts q1 (least recently used)
    assert cache.get(body("q1")) is None
    assert [content(cache.get(body(t))) for t in ("base", "q2", "q3")] == ["base", "q2", "q3"]
    s = cache.stats()
    assert s["evictions"] == 1 and s["size"] == 3
    for t in ("q4", "q5", "q6"):  # base evicted too: its row is free, so "near" no longer hits
        cache.put(body(t), answer(t))
    assert cache.get(body("near")) is None and cache.stats()["evictions"] == 4
    # expired entries go before any live one
    clock = Clock()
    c2 = make(clock=clock, max_entries=2, ttl_s=5, semantic=False)
    c2.put(body("a"), answer("a"))
    clock.t += 3
    c2.put(body("b"), answer("b"))
    c2.get(body("a"))  # a is most recently used ...
    clock.t += 3  # ... but expired
    c2.put(body("c"), answer("c"))
    assert c2.stats()["evictions"] == 0 and c2.stats()["expired"] == 1 and c2.get(body("b")) is not None


def test_exact_layer_matches_a_reference_lru_on_a_random_sequence():
    rng = random.Random(0)
    cache = make(semantic=False, max_entries=5)
    ref: OrderedDict[str, str] = OrderedDict()
    for step in range(600):
        q = f"q{rng.randrange(12)}"
        if rng.random() < 0.5:
            hit = cache.get(body(q))
            want = ref.get(q)
            if want is not None:
                ref.move_to_end(q)
            assert (content(hit) if hit else None) == want, step
        else:
            a = f"{q}-{step}"
            cache.put(body(q), answer(a))
            ref.pop(q, None)
            ref[q] = a
            while len(ref) > 5:
                ref.popitem(last=False)
    assert len(cache) == len(ref) == 5


def test_answers_that_are_not_cached():
    cache = make(max_answer_bytes=2000)
    assert not cache.put(body(), {"error": {"message": "x"}})
    assert not cache.put(body(), {"choices": []})
    assert not cache.put(body(), answer("x" * 3000))
    assert not cache.put(body(), {"choices": [{"text": float("nan")}]})
    assert not cache.put({"model": "small", "temperature": 0}, answer())  # neither messages nor prompt
    assert not cache.put(body(temperature=0, max_tokens=float("nan")), answer())
    assert cache.stats()["size"] == 0
    off = ResponseCache.from_config(None)
    assert not off.enabled and not off.put(body(), answer()) and off.get(body()) is None
    assert off.stats()["skipped"] == 0


def test_text_completions_are_cached_exactly():
    cache = make()
    req = {"model": "small", "prompt": "Say hi", "temperature": 0}
    done = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "small",
            "choices": [{"index": 0, "text": "hi", "finish_reason": "stop", "logprobs": None}]}
    assert cache.put(req, done)
    got, kind = cache.get(req)
    assert kind == "exact" and got["choices"][0]["text"] == "hi" and got["id"].startswith("cmpl-cache-")


def test_async_wrappers_run_the_embedding_in_a_worker_thread():
    embed = FakeEmbed()
    cache = make(embed=embed)

    async def main():
        assert await cache.aget(body("base")) is None
        assert await cache.aput(body("base"), answer("A"))
        exact = await cache.aget(body("base"))
        semantic = await cache.aget(body("near"))
        return exact, semantic

    exact, semantic = asyncio.run(main())
    assert (exact[1], semantic[1]) == ("exact", "semantic")
    assert threading.get_ident() not in embed.threads and embed.threads
    s = cache.stats()
    assert (s["hits"], s["misses"]) == (2, 1)


def test_concurrent_threads_keep_the_bound():
    cache = make(max_entries=50)
    errors = []

    def work(seed):
        rng = random.Random(seed)
        try:
            for _ in range(300):
                q = f"q{rng.randrange(120)}"
                if cache.get(body(q)) is None:
                    cache.put(body(q), answer(q))
        except Exception as exc:  # noqa: BLE001 -- reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = cache.stats()
    assert not errors and s["size"] == 50 and s["hits"] + s["misses"] == 8 * 300
    assert s["puts"] >= s["evictions"] + 50  # ">": two threads that missed the same question both put it
    for q in (f"q{i}" for i in range(120)):  # every entry still answers its own question
        hit = cache.get(body(q))
        assert hit is None or content(hit) == q


class FakeRedis:
    """Redis's get/set(px=) over a dict with expiry on an injected clock; can be made to fail."""

    def __init__(self, clock):
        self.clock, self.data, self.fail, self.px = clock, {}, False, []

    def get(self, key):
        if self.fail:
            raise ConnectionError("redis down")
        value, expires = self.data.get(key, (None, 0))
        return value if value is not None and self.clock() < expires else None

    def set(self, key, value, px):
        if self.fail:
            raise ConnectionError("redis down")
        assert isinstance(value, bytes)
        self.px.append(px)
        self.data[key] = (value, self.clock() + px / 1000)


def test_redis_shares_exact_hits_between_workers_and_fails_soft():
    clock = Clock()
    redis = FakeRedis(clock)
    worker1 = ResponseCache.from_config({"ttl_s": 60, "redis_url": "redis://127.0.0.1:6379/0", "semantic": False},
                                        clock=clock, redis_client=redis)
    worker2 = ResponseCache.from_config({"ttl_s": 60, "redis_url": "redis://127.0.0.1:6379/0", "semantic": False},
                                        clock=clock, redis_client=redis)
    assert worker1.put(body(), answer("shared"))
    assert redis.px == [60_000] and all(k.startswith("leanscale:gateway:cache:") for k in redis.data)
    got = asyncio.run(worker2.aget(body()))
    assert got[1] == "exact" and content(got) == "shared" and got[0]["usage"]["cost_usd"] == 0.0
    clock.t += 60
    assert worker2.get(body()) is None  # Redis's own expiry
    redis.fail = True
    assert worker1.put(body("q2"), answer()) is True  # stored locally; Redis error counted
    assert worker2.get(body("q2")) is None
    assert worker1.stats()["redis_errors"] == 1 and worker2.stats()["redis_errors"] == 1


@pytest.mark.skipif(redis_missing() is not None, reason=f"Redis test skipped: {redis_missing()}")
def test_a_real_redis_shares_exact_hits_between_two_workers():
    """Two caches (two workers) on one real redis-server: an answer stored by one is an exact hit
    for the other, with the configured TTL on the key; a different request misses."""
    import redis as redis_module

    with redis_server() as url:
        settings = {"ttl_s": 30, "redis_url": url, "semantic": False, "redis_prefix": "test:cache:"}
        worker1, worker2 = ResponseCache.from_config(settings), ResponseCache.from_config(settings)
        assert worker1.put(body(), answer("from worker 1"))
        got = asyncio.run(worker2.aget(body()))
        assert got is not None and got[1] == "exact" and content(got) == "from worker 1"
        assert got[0]["usage"]["cost_usd"] == 0.0
        assert worker2.get(body("another question")) is None
        client = redis_module.Redis.from_url(url)
        keys = client.keys("test:cache:*")
        assert len(keys) == 1 and 0 < client.pttl(keys[0]) <= 30_000
        client.close()
        assert worker1.stats()["redis_errors"] == worker2.stats()["redis_errors"] == 0


def test_redis_url_without_the_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "redis", None)  # import redis -> ImportError, installed or not
    with pytest.raises(MissingDependencyError, match=r"pip install 'leanscale\[gateway-redis\]'"):
        ResponseCache.from_config({"redis_url": "redis://127.0.0.1:6379/0"})


def test_completion_from_chunks_round_trips_and_refuses_partial_streams():
    original = answer("Paris is the capital of France. " * 300)
    original["usage"] = {"prompt_tokens": 9, "completion_tokens": 1800, "total_tokens": 1809}
    chunks = completion_to_chunks(original, include_usage=True)
    rebuilt = completion_from_chunks(chunks)
    ChatCompletion.model_validate(rebuilt)
    assert rebuilt["choices"][0]["message"]["content"] == original["choices"][0]["message"]["content"]
    assert rebuilt["usage"] == original["usage"] and rebuilt["choices"][0]["finish_reason"] == "stop"
    assert completion_from_chunks(chunks[:-2]) is None  # cut before finish_reason
    assert completion_from_chunks([]) is None
    assert completion_from_chunks([*chunks[:1], {"error": {"message": "x"}}]) is None
    tool = {**chunks[0], "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0}]}, "finish_reason": None}]}
    assert completion_from_chunks([tool, chunks[-2]]) is None
    cache = make()
    assert cache.put(body(stream=True), rebuilt) and cache.get(body())[1] == "exact"


@pytest.mark.parametrize("value, needle", [
    ({"threshold": 1.5}, "cache.threshold must be in (0, 1]. Got 1.5."),
    ({"threshold": 0}, "cache.threshold must be in (0, 1]. Got 0."),
    ({"threshold": "high"}, "cache.threshold must be in (0, 1]. Got 'high'."),
    ({"ttl_s": 0}, "cache.ttl_s must be a number of seconds in (0, 2592000]. Got 0."),
    ({"ttl_s": float("inf")}, "cache.ttl_s must be a number of seconds"),
    ({"max_entries": 0}, "cache.max_entries must be an integer in [1, 1000000]. Got 0."),
    ({"max_entries": 10.0}, "cache.max_entries must be an integer"),
    ({"only_deterministic": "yes"}, "cache.only_deterministic must be true or false. Got 'yes'."),
    ({"semantic": 1}, "cache.semantic must be true or false. Got 1."),
    ({"redis_url": "http://x"}, "cache.redis_url must be a Redis URL"),
    ({"redis_url": "redis://"}, "cache.redis_url must be a Redis URL"),
    ({"redis_prefix": ""}, "cache.redis_prefix must be a non-empty string"),
    ({"treshold": 0.9}, "unknown key cache.treshold"),
    ([1], "cache must be a mapping"),
])
def test_config_errors_name_the_key_path(value, needle):
    with pytest.raises(InvalidParameterError) as e:
        check_cache_config(value)
    assert needle in str(e.value), str(e.value)


def test_config_defaults_source_and_error_class():
    assert check_cache_config({}) == {**CACHE_DEFAULTS, "threshold": 0.95}  # MiniLM's default threshold
    assert check_cache_config(None)["enabled"] is False
    out = check_cache_config({"threshold": 1, "ttl_s": 5})
    assert out["threshold"] == 1.0 and isinstance(out["ttl_s"], float)
    with pytest.raises(DataFormatError) as e:
        check_cache_config({"treshold": 0.9}, "gateway config 'gw.yaml'", DataFormatError)
    assert str(e.value).startswith("gateway config 'gw.yaml': unknown key cache.treshold (allowed: ")
    assert str(e.value).endswith("Did you mean 'threshold'?")


# ------------------------------------------------------------------------- embedding batcher
class BatchRecorder(FakeEmbed):
    """FakeEmbed that records the size of each call and can hold a call until released."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, texts):
        self.sizes.append(len(texts))
        self.entered.set()
        assert self.gate.wait(10)
        return super().__call__(texts)


def test_batcher_embeds_concurrent_texts_together_with_the_rows_of_unbatched_calls():
    fn = BatchRecorder()
    batcher = EmbedBatcher(fn, window_s=0.2, max_batch=8, max_queue=100)
    texts = [f"question {i}" for i in range(20)] + ["base", "near", "far"]
    futures = [batcher.submit(t) for t in texts]  # within the window: batches of max_batch
    rows = [f.result(10) for f in futures]
    assert fn.sizes == [8, 8, 7] and batcher.batches == 3 and batcher.texts == len(texts)
    for text, row in zip(texts, rows):  # each row is the one of embedding its text alone
        np.testing.assert_array_equal(row, FakeEmbed()([text])[0].astype(np.float32))
    # from threads: the same rows, fewer calls than texts
    fn2 = BatchRecorder()
    batcher2 = EmbedBatcher(fn2, window_s=0.05, max_batch=64)
    out: dict[int, np.ndarray] = {}
    workers = [threading.Thread(target=lambda i=i: out.__setitem__(i, batcher2.embed(texts[i])))
               for i in range(len(texts))]
    for w in workers:
        w.start()
    for w in workers:
        w.join(10)
    assert len(fn2.sizes) < len(texts) and sum(fn2.sizes) == len(texts)
    for i, text in enumerate(texts):
        np.testing.assert_array_equal(out[i], rows[i])


def test_batched_cache_answers_as_the_unbatched_one():
    """The same requests, one cache batching (threads, async) and one embedding one text at a time:
    the same hits, kinds and stored vectors."""
    reqs = [body("base"), body("near"), body("far"), body("other"), body("near #4"), body("base"), body("near")]
    plain = make(embed=FakeEmbed(), embed_batch_ms=0)
    batched = make(embed=BatchRecorder(), embed_batch_ms=20)
    want = []
    for i, r in enumerate(reqs):
        hit = plain.get(r)
        want.append(None if hit is None else (hit[1], content(hit)))
        if hit is None:
            plain.put(r, answer(f"A{i}"))

    async def main():
        got = []
        for i, r in enumerate(reqs):
            hit = await batched.aget(r)
            got.append(None if hit is None else (hit[1], content(hit)))
            if hit is None:
                await batched.aput(r, answer(f"A{i}"))
        # many concurrent look-ups: one or a few embedding calls, the same answers
        many = await asyncio.gather(*(batched.aget(body(f"new question {i}")) for i in range(30)))
        return got, many

    got, many = asyncio.run(main())
    assert got == want and want[1] == ("semantic", "A0") and want[2] is None
    assert many == [None] * 30 and len(batched._embed_fn.sizes) < 30 + len(reqs)
    assert max(batched._embed_fn.sizes) > 1
    np.testing.assert_allclose(batched._vecs[: len(plain)], plain._vecs[: len(plain)], atol=1e-7)
    assert plain.stats()["hits"] == batched.stats()["hits"]  # the same hit counts


def test_batcher_queue_is_bounded_and_a_full_queue_skips_the_semantic_layer():
    fn = BatchRecorder()
    cache = make(embed=fn, embed_batch_ms=1, embed_max_batch=1, embed_max_queue=3)
    assert cache.put(body("base"), answer("A"))
    fn.gate.clear()  # the next embedding call blocks: texts pile up in the queue
    fn.entered.clear()
    batcher = cache.batcher()
    first = batcher.submit("held")
    assert fn.entered.wait(10)  # taken off the queue, inside fn
    queued = [batcher.submit(f"q{i}") for i in range(3)]
    assert batcher.pending() == 3
    with pytest.raises(EmbedQueueFull, match="embed_max_queue"):
        batcher.submit("one too many")
    # the cache answers at once: no semantic hit (a miss), counted; a put stores for exact hits only
    assert cache.get(body("near")) is None
    assert cache.put(body("near"), answer("N"))
    s = cache.stats()
    assert s["semantic_busy"] == 2 and s["misses"] == 1
    fn.gate.set()
    assert first.result(10).shape == (FakeEmbed.DIM,) and all(q.result(10) is not None for q in queued)
    assert cache.get(body("near"))[1] == "exact"  # stored, without a vector
    assert cache.get(body("near-scaled"))[1] == "semantic"  # via "base": the embedder works again


def test_batcher_hands_an_embedding_failure_to_every_caller_of_the_batch():
    def broken(texts):
        raise RuntimeError("encoder down")

    batcher = EmbedBatcher(broken, window_s=0.05)
    futures = [batcher.submit(f"t{i}") for i in range(3)]
    for f in futures:
        with pytest.raises(RuntimeError, match="encoder down"):
            f.result(10)
    wrong = EmbedBatcher(lambda texts: np.zeros((1, 4)), window_s=0.05)
    futures = [wrong.submit(f"t{i}") for i in range(2)]
    with pytest.raises(InvalidParameterError, match=r"shape \(n, d\) for n texts. Got shape \(1, 4\) for 2"):
        futures[0].result(10)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("embed_batch_ms", -1, r"cache.embed_batch_ms must be a number of milliseconds in \[0, 1000\]. Got -1"),
    ("embed_max_batch", 0, r"cache.embed_max_batch must be an integer in \[1, 4096\]. Got 0"),
    ("embed_max_queue", 1.5, r"cache.embed_max_queue must be an integer in \[1, 1000000\]. Got 1.5"),
])
def test_batcher_settings_are_checked(key, value, message):
    with pytest.raises(InvalidParameterError, match=message):
        check_cache_config({key: value})


def test_minilm_batched_rows_match_single_text_embeddings():
    """The real MiniLM: texts of different lengths embedded in one batch (padded) give the rows of
    embedding each alone, within float rounding."""
    from leanscale.models import embed_texts

    texts = ["Hi", "What is the capital of France?",
             "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
             "How many clips did Natalia sell altogether in April and May?", "reset my password please"]
    batcher = EmbedBatcher(embed_texts, window_s=0.5, max_batch=8)
    futures = [batcher.submit(t) for t in texts]
    rows = np.stack([f.result(60) for f in futures])
    assert batcher.batches == 1
    single = np.concatenate([embed_texts([t]) for t in texts])
    np.testing.assert_allclose(rows, single, atol=2e-5)


def test_embed_wait_budget_answers_a_late_lookup_as_a_miss_and_keeps_its_vector():
    fn = BatchRecorder()
    cache = make(embed=fn, embed_batch_ms=1, embed_wait_ms=50)
    assert cache.put(body("base"), answer("A"))

    async def main():
        fn.gate.clear()  # the embedder is slow now
        t0 = asyncio.get_running_loop().time()
        late = await cache.aget(body("near"))  # would be a semantic hit, but its vector is late
        waited = asyncio.get_running_loop().time() - t0
        fn.gate.set()
        for _ in range(200):  # the vector lands in the memo once computed
            if cache._memo_get("near")[1] is not None:
                break
            await asyncio.sleep(0.01)
        hit = await cache.aget(body("near"))  # now in time (remembered): the semantic hit
        return late, waited, hit

    late, waited, hit = asyncio.run(main())
    assert late is None and waited < 5 and hit[1] == "semantic" and content(hit) == "A"
    s = cache.stats()
    assert s["semantic_late"] == 1 and s["misses"] == 1 and s["hits_semantic"] == 1
    assert fn.calls.count("near") == 1  # embedded once
