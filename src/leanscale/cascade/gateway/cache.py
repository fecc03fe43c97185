"""The gateway's response cache: an exact layer and a semantic layer, consulted before any model.

The YAML section (every key optional; the section present means the cache is on)::

    cache:
      enabled: true              # (true)
      only_deterministic: true   # (true) cache only requests with temperature == 0 (see below)
      semantic: true             # (true) the semantic layer; false: exact matches only
      embedder: minilm           # (minilm) MiniLM-L6, or static: MiniLM distilled into static token
                                 #   embeddings (model2vec; ~0.3 ms a text instead of ~20-120 ms)
      embedder_path: ~/.cache/leanscale/minilm-static-256   # (this) the static embedder's folder,
                                 #   built there on first start when missing (~15 s)
      threshold: 0.95            # (0.95 with minilm, 0.975 with static) cosine of the last user
                                 #   messages' embeddings, in (0, 1]
      semantic_max_chars: 1000   # (1000) longer last user messages are cached exactly only
      semantic_same_numbers: true  # (true) a semantic hit needs the same numbers in both messages
      max_entries: 10000         # (10000) least recently used entries are evicted beyond
      ttl_s: 3600                # (3600) seconds an entry lives
      max_answer_bytes: 200000   # (200000) larger answers are not cached
      embed_batch_ms: 2          # (2) wait up to this long to embed concurrent misses in one call; 0: one by one
                                 #   (the embed_* keys apply to minilm; the static embedder runs inline)
      embed_max_batch: 32        # (32) texts per embedding call at most
      embed_max_queue: 256       # (256) texts waiting to be embedded at most; beyond, a look-up skips the
                                 #   semantic layer (exact only; counted in semantic_busy)
      embed_wait_ms: 0           # (0: no limit) a look-up waits at most this long for its vector, then goes on
                                 #   as a miss (semantic_late); the vector still serves the put that follows
      redis_url: redis://127.0.0.1:6379/0   # optional: the exact layer also in Redis (shared by workers)
      redis_prefix: "leanscale:gateway:cache:"

**The key.** A request is keyed by its body, normalised: canonical JSON (sorted keys, no spaces,
integral floats as integers: ``0.0`` and ``0`` are one key) of every field except those that do
not change the answer -- :data:`IGNORED_FIELDS`: ``stream``, ``stream_options``, ``user``,
``metadata``, ``store``, ``service_tier``, ``safety_identifier``, ``prompt_cache_key``,
``prompt_cache_retention``. So the key holds ``model`` (the configured model or the policy such
as ``leanscale-router:0.3``), ``messages`` (or ``prompt``, ``suffix``, ``echo``, ``best_of``),
``temperature``, ``top_p``, ``max_tokens``, ``max_completion_tokens``, ``n``, ``stop``, ``seed``,
``presence_penalty``, ``frequency_penalty``, ``logit_bias``, ``logprobs``, ``top_logprobs``,
``response_format``, ``tools``, ``tool_choice``, ``parallel_tool_calls``, ``functions``,
``function_call``, ``reasoning_effort`` -- and any other field (e.g. vLLM's ``top_k``,
``repetition_penalty``, ``guided_json``): a field the cache does not know is assumed to change
the answer, the safe side. A streamed and a non-streamed request share their entry (the app turns
a cached answer into chunks with :func:`~leanscale.cascade.gateway.rules.completion_to_chunks`,
and a finished stream into an answer to store with :func:`completion_from_chunks`).

**Only deterministic requests** (``only_deterministic: true``, the default) are cached: those
with ``temperature`` 0. A request that samples (``temperature`` > 0, or absent: OpenAI's and
vLLM's default is 1.0) asks for a fresh draw each time; answering it from the cache would
silently return the same draw forever (and ``n`` > 1 samples would be the same as last time).
``only_deterministic: false`` caches every request (for apps that sample but prefer cost).

**Exact layer.** The SHA-256 of the canonical JSON -> the answer. **Semantic layer.** For a
chat request whose last message is from the user and has text only, at most
``semantic_max_chars`` characters long: its embedding (MiniLM-L6 via
:func:`leanscale.models.embed_texts`, normalised) is compared (cosine = dot product) with those of
the cached entries that have the *same everything else*: the same model/policy, the same
parameters and the same earlier messages (system prompt, history); the best cosine >= ``threshold``
is a hit. With ``semantic_same_numbers`` (the default) both messages must also hold the same
numbers (digit runs, in order): MiniLM barely sees them. The length bound exists because MiniLM reads only the first 256 word pieces: two long
texts that differ after them would embed alike. The embeddings live in one numpy matrix
``(max_entries, 384)`` (float32, ~1.5 kB an entry); a look-up is one matrix-vector product.

**The static embedder** (``embedder: static``, ``pip install 'leanscale[static-embeddings]'``):
MiniLM-L6 distilled by model2vec (every vocabulary token embedded once by MiniLM, PCA to 256
columns, SIF weights; Tulkens & van Dongen 2024): a text's vector is the mean of its tokens' rows,
so embedding costs ~0.3 ms instead of MiniLM's ~20 ms alone or 100+ ms on busy cores (measured
at 64 clients on 2 cores: +29 ms p50 on backend calls instead of MiniLM's +1,250 ms,
``benchmarks/gateway/cache_latency.py``).
The price: word order and negation count even less ("Is Paris (not) the capital of France?" at
0.978, MiniLM 0.954), and questions of one kind sit closer (the nearest other GSM8K question at
up to 0.93, MiniLM 0.84). Hence its higher default threshold, 0.975: on the 1,319 GSM8K questions
(``benchmarks/gateway/cache_quality.py``) it makes no more false hits than MiniLM at 0.95 (0.15%
of questions, and none with ``semantic_same_numbers``) and hits 99.4% of the reworded questions
(MiniLM at 0.95: 96.0%); a rewording that changes words, "How do I / How can I reset my
password?" (0.972), misses. The folder (``embedder_path``, default
``$LEANSCALE_CACHE/minilm-static-256``) is built on the first start when missing, atomically;
point the workers and machines of one deployment at one folder.

**When the semantic layer hurts:** questions that differ in a detail the embedding barely sees
can be above the threshold and get the other question's answer. Measured with MiniLM-L6: two
GSM8K questions that differ only in "48" vs "46" are at cosine 0.994 (hence
``semantic_same_numbers``); "Is Paris the capital of France?" vs "Is Paris *not* the capital of
France?" at 0.954 (above the default 0.95: a negation is not caught), while "How do I / How can I
reset my password?" is at 0.992 and "What is the capital of France?" vs "what's the capital of
france" only at 0.908 (a miss). Use a higher threshold, ``semantic: false`` for such traffic,
or rules.

**Bounds and expiry.** ``max_entries`` entries at most (least recently used evicted first; an
expired entry is dropped before any live one), each at most ``max_answer_bytes`` of JSON, so the
memory is bounded by about ``max_entries * (max_answer_bytes + 1.5 kB)``. Every entry expires
``ttl_s`` seconds after it was stored (a hit does not extend it).

**Redis.** With ``redis_url``, the exact layer is also kept in Redis (``pip install
'leanscale[gateway-redis]'``; values are the answers' JSON with Redis's own expiry ``ttl_s``), so
all the gateway's workers share exact hits; the semantic layer stays per process (its embeddings
are local). A Redis error is a miss (counted in ``redis_errors``), never a failed request.

**Batched embeddings.** Embedding is the semantic layer's cost, and only a miss of the exact
layer pays it (an exact hit is answered first; the vector of a miss is kept and reused by the
``put`` that follows). MiniLM's cost per text falls several times in a batch (measured on 2 busy
cores: ~19 ms for one text, ~10 ms per text in a batch of 8; more with torch's default threads),
so concurrent misses are embedded together: the first text waits ``embed_batch_ms`` for others
(at most ``embed_max_batch``), one embedding call serves them all, on a thread of the cache's own
(the event loop never waits for it; async callers await the result). The vectors are those of
embedding each text alone (within float rounding: a batch pads the shorter texts, which BERT's
attention mask ignores). At most ``embed_max_queue`` texts wait; beyond, a look-up skips the
semantic layer (a miss unless exact; ``semantic_busy``) and a put stores the answer for exact
hits only, so an overloaded embedder adds no unbounded latency. ``embed_batch_ms: 0`` embeds
each text alone in the calling thread.

**A latency budget.** When the machine cannot embed as fast as misses arrive (MiniLM on 2 busy
cores: ~50-100 texts a second), vectors queue up and every miss waits. ``embed_wait_ms`` bounds
that wait for look-ups from the event loop (:meth:`ResponseCache.aget`): past it the request goes
on to the backend as a miss (``semantic_late``), and its vector, once computed, is kept for the
``put`` of the answer (so later paraphrases still find it; the put waits at most
``embed_wait_ms`` too, else it stores the answer for exact hits only).

**Threads and the event loop.** Every method is thread-safe (one lock around the tables; the
embedding runs outside it). Embedding is CPU work (~ms) and Redis is network I/O: the app's
async code calls :meth:`ResponseCache.aget` / :meth:`ResponseCache.aput`, which answer exact
local hits inline and run the rest in a worker thread (``asyncio.to_thread``).

Interface for the app::

    cache = ResponseCache.from_config(config_cache)      # check_cache_config is run inside
    hit = await cache.aget(body)                          # (answer_json, "exact" | "semantic") or None
    if hit: answer, kind = hit                            # a fresh copy: new id, usage.cost_usd 0.0
    ... call the model ...
    await cache.aput(body, answer)                        # stored when cacheable (returns True)
    cache.stats()                                         # hits, misses, evictions, size... for /metrics
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from leanscale.core.errors import InvalidParameterError, MissingDependencyError

__all__ = [
    "CACHE_DEFAULTS",
    "EmbedBatcher",
    "EmbedQueueFull",
    "IGNORED_FIELDS",
    "ResponseCache",
    "check_cache_config",
    "completion_from_chunks",
    "request_key",
]

IGNORED_FIELDS = frozenset({"stream", "stream_options", "user", "metadata", "store", "service_tier",
                            "safety_identifier", "prompt_cache_key", "prompt_cache_retention"})
CACHE_DEFAULTS: dict[str, Any] = {
    "enabled": True,
    "only_deterministic": True,
    "semantic": True,
    "embedder": "minilm",
    "embedder_path": None,
    "threshold": None,
    "semantic_max_chars": 1000,
    "semantic_same_numbers": True,
    "max_entries": 10_000,
    "ttl_s": 3600.0,
    "max_answer_bytes": 200_000,
    "embed_batch_ms": 2.0,
    "embed_max_batch": 32,
    "embed_max_queue": 256,
    "embed_wait_ms": 0.0,
    "redis_url": None,
    "redis_prefix": "leanscale:gateway:cache:",
}
_REDIS_INSTALL = "pip install 'leanscale[gateway-redis]'"
_MAX_TTL_S = 30 * 24 * 3600
_EMBED_MEMO = 256  # recent embeddings kept (a miss's vector is reused by the put that follows)
_PLACEHOLDER = "\x00leanscale-last-user-message\x00"
EMBEDDERS = ("minilm", "static")
DEFAULT_THRESHOLDS = {"minilm": 0.95, "static": 0.975}  # see the module docstring
STATIC_EMBEDDER_DIR = "minilm-static-256"  # under leanscale.data.cache_dir(): the default embedder_path


# ------------------------------------------------------------------------------------ config
def _got(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return f" Got a {type(value).__name__}."
    return f" Got {value!r:.200}."


def check_cache_config(value: Any, source: str | None = None,
                       error: type[Exception] = InvalidParameterError, base: Any = None) -> dict:
    """Check the ``cache:`` section of a gateway config; return it with every key set.

    Args:
        value: the section (a mapping; see the module docstring for its keys). ``None`` (the
            section absent or empty in YAML) means no cache: ``enabled`` False. ``{}`` means a
            cache with the defaults.
        source: the config's name for messages (e.g. ``"gateway config 'gw.yaml'"``); none when None.
        error: the exception class raised (``DataFormatError`` for a file, ``InvalidParameterError``
            for a dict).
        base: the folder a relative ``embedder_path`` is read from (the config file's; None: the
            current folder).

    Returns:
        a dict with the keys of :data:`CACHE_DEFAULTS`.

    Raises:
        ``error``: naming the key path, what was expected and what was received, e.g.
            ``cache.threshold must be in (0, 1]. Got 1.5.``
    """
    p = f"{source}: " if source else ""
    if value is None:
        return {**CACHE_DEFAULTS, "enabled": False}
    if not isinstance(value, dict):
        raise error(f"{p}cache must be a mapping of cache settings.{_got(value)}")
    bad = [k for k in value if not isinstance(k, str) or k not in CACHE_DEFAULTS]
    if bad:
        import difflib

        hint = difflib.get_close_matches(str(bad[0]), sorted(CACHE_DEFAULTS), n=1, cutoff=0.6)
        raise error(f"{p}unknown key cache.{bad[0]!s:.100} (allowed: {', '.join(sorted(CACHE_DEFAULTS))})."
                    + (f" Did you mean {hint[0]!r}?" if hint else ""))
    out = {**CACHE_DEFAULTS, **value}

    def real(key: str, lo: float, hi: float, lo_open: bool, what: str) -> float:
        v = out[key]
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if not ok or v < lo or (lo_open and v == lo) or v > hi:
            raise error(f"{p}cache.{key} must be {what}.{_got(v)}")
        return float(v)

    def integer(key: str, lo: int, hi: int) -> int:
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise error(f"{p}cache.{key} must be an integer in [{lo}, {hi}].{_got(v)}")
        return v

    for key in ("enabled", "only_deterministic", "semantic", "semantic_same_numbers"):
        if not isinstance(out[key], bool):
            raise error(f"{p}cache.{key} must be true or false.{_got(out[key])}")
    if out["embedder"] not in EMBEDDERS:
        raise error(f"{p}cache.embedder must be one of {', '.join(map(repr, EMBEDDERS))}.{_got(out['embedder'])}")
    if out["threshold"] is None:
        out["threshold"] = DEFAULT_THRESHOLDS[out["embedder"]]
    out["threshold"] = real("threshold", 0.0, 1.0, True, "in (0, 1]")
    path = out["embedder_path"]
    if path is not None:
        if not isinstance(path, str) or not path.strip() or len(path) > 4096:
            raise error(f"{p}cache.embedder_path must be a folder path (a non-empty string).{_got(path)}")
        if out["embedder"] != "static":
            raise error(f"{p}cache.embedder_path is the static embedder's folder: it needs cache.embedder: static. "
                        f"Got embedder {out['embedder']!r}.")
        from pathlib import Path

        folder = Path(path).expanduser()
        if not folder.is_absolute():
            folder = Path(base) / folder if base is not None else Path.cwd() / folder
        if folder.exists() and not folder.is_dir():
            raise error(f"{p}cache.embedder_path must be a folder; {str(folder)!r} is a file.")
        out["embedder_path"] = str(folder.resolve())
    out["ttl_s"] = real("ttl_s", 0.0, _MAX_TTL_S, True, f"a number of seconds in (0, {_MAX_TTL_S}]")
    out["max_entries"] = integer("max_entries", 1, 1_000_000)
    out["max_answer_bytes"] = integer("max_answer_bytes", 1, 100_000_000)
    out["semantic_max_chars"] = integer("semantic_max_chars", 1, 1_000_000)
    out["embed_batch_ms"] = real("embed_batch_ms", 0.0, 1000.0, False, "a number of milliseconds in [0, 1000]")
    out["embed_max_batch"] = integer("embed_max_batch", 1, 4096)
    out["embed_max_queue"] = integer("embed_max_queue", 1, 1_000_000)
    out["embed_wait_ms"] = real("embed_wait_ms", 0.0, 600_000.0, False,
                                "a number of milliseconds in [0, 600000] (0: no limit)")
    url = out["redis_url"]
    if url is not None:
        ok = isinstance(url, str) and len(url) <= 2000
        if ok:
            parts = urlsplit(url)
            ok = (parts.scheme in ("redis", "rediss") and bool(parts.hostname)) or (
                parts.scheme == "unix" and bool(parts.path))
    if url is not None and not ok:
        shown = url.rsplit("@", 1)[-1] if isinstance(url, str) else url  # never echo a password
        raise error(f"{p}cache.redis_url must be a Redis URL (redis://HOST:PORT/DB, rediss://... or "
                    f"unix://PATH).{_got(shown)}")
    prefix = out["redis_prefix"]
    if not isinstance(prefix, str) or not prefix or len(prefix) > 200:
        raise error(f"{p}cache.redis_prefix must be a non-empty string of at most 200 characters.{_got(prefix)}")
    return out


# ------------------------------------------------------------------------------------ keys
def _canon(obj: Any) -> Any:
    """``obj`` with integral floats as ints (``0.0`` -> ``0``): JSON-equal values, one key."""
    if isinstance(obj, float) and obj.is_integer() and abs(obj) < 2**53:
        return int(obj)
    if isinstance(obj, dict):
        return {str(k): _canon(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canon(v) for v in obj]
    return obj


def _dumps(obj: Any) -> bytes:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8", "surrogatepass")


def request_key(body: dict) -> str:
    """The exact key of a request body: the SHA-256 (hex) of its canonical JSON without
    :data:`IGNORED_FIELDS`. Raises ValueError for a body that is not JSON (NaN, ...)."""
    return hashlib.sha256(_dumps(_canon({k: v for k, v in body.items() if k not in IGNORED_FIELDS}))).hexdigest()


_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def _semantic_parts(body: dict, max_chars: int, same_numbers: bool) -> tuple[str, int] | None:
    """(the last user message's text, the group id of everything else), or None when the request
    is not for the semantic layer (not chat, last message not a user's text, text too long)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
        return None
    last = messages[-1]
    content = last.get("content")
    if last.get("role") != "user" or not isinstance(content, str) or not content.strip() or len(content) > max_chars:
        return None
    rest = {k: v for k, v in body.items() if k not in IGNORED_FIELDS}
    rest["messages"] = [*messages[:-1], {**last, "content": _PLACEHOLDER}]
    if same_numbers:  # the numbers join the group: a semantic hit needs the same ones
        rest[_PLACEHOLDER] = _NUMBER.findall(content)
    digest = hashlib.sha256(_dumps(_canon(rest))).digest()
    return content, int.from_bytes(digest[:8], "little", signed=True)


@dataclass
class _Prepared:
    key: str
    semantic: tuple[str, int] | None  # (text, group id)


@dataclass
class _Entry:
    answer: str  # the answer's JSON
    expires: float
    slot: int  # its row in the embedding matrix, -1 when none


def _fresh(answer_json: str, kind: str) -> tuple[dict, str]:
    answer = json.loads(answer_json)
    prefix = "cmpl" if answer.get("object") == "text_completion" else "chatcmpl"
    answer["id"] = f"{prefix}-cache-{uuid.uuid4().hex}"
    answer["created"] = int(time.time())
    if isinstance(answer.get("usage"), dict):
        answer["usage"]["cost_usd"] = 0.0  # no backend was called
    return answer, kind


class EmbedQueueFull(Exception):
    """The embedding batcher holds ``max_queue`` texts already (the caller skips the semantic layer)."""


class EmbedBatcher:
    """Embeds the texts submitted within ``window_s`` of each other in one call of ``fn``, on a
    thread of its own (started on demand, gone after ``idle_s`` without work).

    Args:
        fn: ``fn(texts: list[str]) -> array (n, d)``, rows in the order of ``texts``.
        window_s: how long the first text of a batch waits for others (0: no wait; texts that
            arrived while the previous call ran are still embedded together).
        max_batch: texts per call of ``fn`` at most.
        max_queue: texts waiting at most; :meth:`submit` raises :class:`EmbedQueueFull` beyond.

    :meth:`submit` answers a ``concurrent.futures.Future`` of the text's row (a float32 vector
    of shape ``(d,)``); a failing ``fn`` fails the futures of its batch with its exception, and a
    wrong shape with ``InvalidParameterError``.
    """

    def __init__(self, fn: Callable[[list[str]], Any], *, window_s: float = 0.002, max_batch: int = 32,
                 max_queue: int = 256, idle_s: float = 10.0):
        self.fn, self.window_s, self.max_batch, self.max_queue = fn, float(window_s), int(max_batch), int(max_queue)
        self.idle_s = float(idle_s)
        self._cond = threading.Condition()
        self._queue: list[tuple[str, Any, float]] = []  # (text, future, monotonic time submitted)
        self._thread: threading.Thread | None = None
        self.batches = 0  # calls of fn
        self.texts = 0  # texts embedded

    def submit(self, text: str):
        from concurrent.futures import Future

        fut: Future = Future()
        with self._cond:
            if len(self._queue) >= self.max_queue:
                raise EmbedQueueFull(f"{self.max_queue} texts are waiting to be embedded (embed_max_queue)")
            self._queue.append((text, fut, time.monotonic()))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="leanscale-cache-embed", daemon=True)
                self._thread.start()
            self._cond.notify()
        return fut

    def embed(self, text: str) -> np.ndarray:
        """The row of ``text`` (blocking; batched with the texts of other threads)."""
        return self.submit(text).result()

    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def _take(self) -> list[tuple[str, Any, float]] | None:
        """The next batch (None: idle for idle_s, the thread ends)."""
        with self._cond:
            while not self._queue:
                if not self._cond.wait(self.idle_s) and not self._queue:
                    self._thread = None  # under the lock: a submit after this starts a new thread
                    return None
            deadline = self._queue[0][2] + self.window_s
            while len(self._queue) < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch, self._queue = self._queue[:self.max_batch], self._queue[self.max_batch:]
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            live = [(t, f) for t, f, _ in batch if f.set_running_or_notify_cancel()]
            if not live:
                continue
            texts = [t for t, _ in live]
            try:
                out = np.asarray(self.fn(texts), dtype=np.float32)
                if out.ndim != 2 or out.shape[0] != len(texts):
                    raise InvalidParameterError(
                        f"the cache's embed function must return an array of shape (n, d) for n texts. Got shape "
                        f"{out.shape} for {len(texts)} texts.")
            except BaseException as exc:  # noqa: BLE001 -- handed to every waiting caller
                for _, f in live:
                    f.set_exception(exc)
                continue
            self.batches += 1
            self.texts += len(texts)
            for i, (_, f) in enumerate(live):
                f.set_result(out[i].copy())


# ------------------------------------------------------------------------------------ the cache
class ResponseCache:
    """Exact + semantic response cache (see the module docstring). Build with :meth:`from_config`.

    Args:
        settings: the output of :func:`check_cache_config` (or a mapping it accepts).
        embed: ``embed(texts: list[str]) -> array (n, d)``; None uses
            :func:`leanscale.models.embed_texts` (MiniLM-L6, loaded on the first semantic look-up).
            Rows are normalised here.
        clock: ``clock() -> seconds`` for the TTL (default ``time.monotonic``; tests inject one).
        redis_client: an object with Redis's ``get(key)`` and ``set(key, value, px=ms)``; None builds
            one from ``redis_url`` when configured (the ``redis`` package, imported here).
    """

    def __init__(self, settings: dict | None = None, *, embed: Callable[[list[str]], Any] | None = None,
                 clock: Callable[[], float] | None = None, redis_client: Any = None):
        s = check_cache_config({} if settings is None else settings)
        self.settings = s
        self.enabled: bool = s["enabled"]
        self.only_deterministic: bool = s["only_deterministic"]
        self.semantic: bool = s["semantic"]
        self.threshold: float = s["threshold"]
        self.max_entries: int = s["max_entries"]
        self.ttl_s: float = s["ttl_s"]
        self.max_answer_bytes: int = s["max_answer_bytes"]
        self.semantic_max_chars: int = s["semantic_max_chars"]
        self.semantic_same_numbers: bool = s["semantic_same_numbers"]
        # the static embedder (~0.3 ms a text) and its look-up run on the event loop: a hop to a
        # worker thread and back costs more than they do, and queues behind other requests' hops
        self.inline: bool = embed is None and s["embedder"] == "static"
        if self.inline and self.enabled and self.semantic:
            embed = self._load_static()  # at start: a missing folder is built now, not on a request
        self._embed_fn = embed
        self._clock = clock or time.monotonic
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # LRU order: oldest first
        self._vecs: np.ndarray | None = None  # (max_entries, d) float32, rows of unit norm
        self._slot_group = np.zeros(self.max_entries, dtype=np.int64)
        self._slot_expires = np.full(self.max_entries, -np.inf)  # -inf: a free slot
        self._slot_key: list[str | None] = [None] * self.max_entries
        self._free = list(range(self.max_entries - 1, -1, -1))
        self._memo: OrderedDict[str, np.ndarray] = OrderedDict()
        self._counts = dict.fromkeys(("hits_exact", "hits_semantic", "misses", "skipped", "puts", "evictions",
                                      "expired", "redis_errors", "semantic_busy", "semantic_late"), 0)
        self.embed_wait_s: float | None = s["embed_wait_ms"] / 1e3 or None
        self.embed_batch_s: float = s["embed_batch_ms"] / 1e3
        self._batcher: EmbedBatcher | None = None  # built on the first embedding (when embed_batch_ms > 0)
        self._redis = redis_client
        self._redis_prefix: str = s["redis_prefix"]
        if self._redis is None and s["redis_url"] is not None and self.enabled:
            self._redis = _redis_from_url(s["redis_url"])

    @classmethod
    def from_config(cls, value: Any, *, source: str | None = None, error: type[Exception] = InvalidParameterError,
                    embed: Callable[[list[str]], Any] | None = None, clock: Callable[[], float] | None = None,
                    redis_client: Any = None) -> ResponseCache:
        """The cache of a config's ``cache:`` section (checked with :func:`check_cache_config`;
        ``None``: a disabled cache whose ``get`` always misses and ``put`` stores nothing)."""
        return cls(check_cache_config(value, source, error), embed=embed, clock=clock, redis_client=redis_client)

    # -------------------------------------------------------------------------- helpers
    def cacheable(self, body: Any) -> bool:
        """Whether a request may be answered from / stored in the cache: the cache is enabled,
        the body is a JSON object with ``messages`` or ``prompt``, and (with
        ``only_deterministic``) its ``temperature`` is 0."""
        if not self.enabled or not isinstance(body, dict) or ("messages" not in body and "prompt" not in body):
            return False
        if self.only_deterministic:
            t = body.get("temperature")
            return isinstance(t, (int, float)) and not isinstance(t, bool) and t == 0
        return True

    def _prepare(self, body: Any) -> _Prepared | None:
        if not self.cacheable(body):
            return None
        try:
            key = request_key(body)
        except (ValueError, TypeError):  # NaN, a non-JSON value: not cacheable
            return None
        sem = (_semantic_parts(body, self.semantic_max_chars, self.semantic_same_numbers) if self.semantic
               else None)
        return _Prepared(key, sem)

    def _embed_function(self) -> Callable[[list[str]], Any]:
        if self._embed_fn is None:
            from leanscale.models import embed_texts

            return embed_texts
        return self._embed_fn

    def _load_static(self) -> Callable[[list[str]], Any]:
        """The static embedder's ``encode`` (``embedder: static``), its folder built when missing."""
        from leanscale.data.paths import cache_dir
        from leanscale.models import static_text_encoder

        path = self.settings["embedder_path"] or str(cache_dir() / STATIC_EMBEDDER_DIR)
        return static_text_encoder(path).encode

    def batcher(self) -> EmbedBatcher | None:
        """The embedding batcher (None with ``embed_batch_ms: 0`` or the static embedder), built on first use."""
        if self.embed_batch_s <= 0 or self.inline:
            return None
        with self._lock:
            if self._batcher is None:
                self._batcher = EmbedBatcher(self._embed_function(), window_s=self.embed_batch_s,
                                             max_batch=self.settings["embed_max_batch"],
                                             max_queue=self.settings["embed_max_queue"])
            return self._batcher

    def _memo_get(self, text: str) -> tuple[str, np.ndarray | None]:
        memo_key = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
        with self._lock:
            vec = self._memo.get(memo_key)
            if vec is not None:
                self._memo.move_to_end(memo_key)
        return memo_key, vec

    def _unit(self, memo_key: str, row: np.ndarray) -> np.ndarray | None:
        """``row`` scaled to unit norm and remembered (None for a zero or non-finite row)."""
        norm = float(np.linalg.norm(row))
        if not math.isfinite(norm) or norm == 0:
            return None
        vec = row / norm
        with self._lock:
            self._memo[memo_key] = vec
            while len(self._memo) > _EMBED_MEMO:
                self._memo.popitem(last=False)
        return vec

    def _busy(self) -> None:
        with self._lock:
            self._counts["semantic_busy"] += 1

    def _embed(self, text: str) -> np.ndarray | None:
        """The unit vector of ``text`` (blocking; batched with other threads' texts), or None
        (a zero vector, or the batcher's queue full: no semantic layer for this call)."""
        memo_key, vec = self._memo_get(text)
        if vec is not None:
            return vec
        batcher = self.batcher()
        if batcher is not None:
            try:
                row = batcher.embed(text)
            except EmbedQueueFull:
                self._busy()
                return None
        else:
            out = np.asarray(self._embed_function()([text]), dtype=np.float32)
            if out.ndim != 2 or out.shape[0] != 1:
                raise InvalidParameterError(f"the cache's embed function must return an array of shape (1, d) for "
                                            f"one text. Got shape {out.shape}.")
            row = out[0]
        return self._unit(memo_key, row)

    async def _aembed(self, text: str) -> np.ndarray | None:
        """:meth:`_embed` for the event loop: awaits the batcher (no worker thread held while the
        batch fills); without a batcher, the embedding runs in a worker thread."""
        memo_key, vec = self._memo_get(text)
        if vec is not None:
            return vec
        if self.inline:
            return self._embed(text)
        batcher = self.batcher()
        if batcher is None:
            waiting = asyncio.ensure_future(asyncio.to_thread(self._embed, text))  # remembers the vector itself
        else:
            try:
                fut = batcher.submit(text)
            except EmbedQueueFull:
                self._busy()
                return None

            def remember(f) -> None:  # in the batcher's thread, before the waiter wakes: a late vector is kept
                if not f.cancelled() and f.exception() is None:
                    self._unit(memo_key, f.result())

            fut.add_done_callback(remember)
            waiting = asyncio.wrap_future(fut)
        waiting.add_done_callback(lambda f: f.cancelled() or f.exception())  # a late failure: retrieved, not logged
        if self.embed_wait_s is None:
            row = await waiting
        else:
            try:
                row = await asyncio.wait_for(asyncio.shield(waiting), self.embed_wait_s)
            except asyncio.TimeoutError:
                with self._lock:
                    self._counts["semantic_late"] += 1
                return None
        return row if batcher is None else self._unit(memo_key, row)

    def _drop(self, key: str) -> None:  # lock held
        entry = self._entries.pop(key)
        if entry.slot >= 0:
            self._slot_expires[entry.slot] = -np.inf
            self._slot_key[entry.slot] = None
            self._free.append(entry.slot)

    def _get_exact(self, prep: _Prepared) -> tuple[dict, str] | None:
        now = self._clock()
        answer = None
        with self._lock:
            entry = self._entries.get(prep.key)
            if entry is not None:
                if entry.expires <= now:
                    self._drop(prep.key)
                    self._counts["expired"] += 1
                else:
                    self._entries.move_to_end(prep.key)
                    self._counts["hits_exact"] += 1
                    answer = entry.answer
        return None if answer is None else _fresh(answer, "exact")

    def _needs_thread(self, prep: _Prepared) -> bool:
        return self._redis is not None or prep.semantic is not None

    def _get_rest(self, prep: _Prepared) -> tuple[dict, str] | None:
        hit = self._get_redis(prep)
        if hit is not None:
            return hit
        vec = self._embed(prep.semantic[0]) if prep.semantic is not None else None
        return self._get_semantic(prep, vec)

    def _get_redis(self, prep: _Prepared) -> tuple[dict, str] | None:
        if self._redis is not None:
            try:
                raw = self._redis.get(self._redis_prefix + prep.key)
            except Exception:  # noqa: BLE001 -- connection refused, timeout...: a miss, never a failed request
                raw = None
                with self._lock:
                    self._counts["redis_errors"] += 1
            if raw is not None:
                text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
                with self._lock:
                    self._counts["hits_exact"] += 1
                return _fresh(text, "exact")
        return None

    def _get_semantic(self, prep: _Prepared, vec: np.ndarray | None) -> tuple[dict, str] | None:
        """The best live entry of the request's group at cosine >= threshold with ``vec`` (the
        last user message's unit vector; None: no semantic look-up), else a miss."""
        if prep.semantic is not None:
            group = prep.semantic[1]
            answer = None
            if vec is not None:
                now = self._clock()
                with self._lock:
                    if self._vecs is not None and self._vecs.shape[1] == vec.shape[0]:
                        live = (self._slot_group == group) & (self._slot_expires > now)
                        rows = np.flatnonzero(live)
                        if rows.size:
                            if 4 * rows.size < live.size:  # a small group: its rows only (a copy)
                                sub = self._vecs[rows] @ vec  # (rows,)
                                best = int(rows[int(np.argmax(sub))])
                                best_sim = float(sub.max())
                            else:  # most rows: one product, no copy
                                sims = self._vecs @ vec  # (max_entries,)
                                sims[~live] = -np.inf
                                best = int(np.argmax(sims))
                                best_sim = float(sims[best])
                            if best_sim >= self.threshold - 1e-6:
                                key = self._slot_key[best]
                                self._entries.move_to_end(key)
                                self._counts["hits_semantic"] += 1
                                answer = self._entries[key].answer
                if answer is not None:
                    return _fresh(answer, "semantic")
        with self._lock:
            self._counts["misses"] += 1
        return None

    # -------------------------------------------------------------------------- API
    def get(self, body: Any) -> tuple[dict, str] | None:
        """The cached answer of a request: ``(answer_json, "exact" | "semantic")``, or None.

        The answer is a fresh copy of the stored one with a new ``id`` and ``created`` and
        ``usage.cost_usd`` 0.0 (no backend was called; the token counts are the original call's);
        ``model`` is the model that answered originally. Non-cacheable requests (see
        :meth:`cacheable`) return None and count as ``skipped``, not ``misses``. Blocking (may
        embed and call Redis): from async code use :meth:`aget`.
        """
        prep = self._prepare(body)
        if prep is None:
            self._skip()
            return None
        return self._get_exact(prep) or self._get_rest(prep)

    async def aget(self, body: Any) -> tuple[dict, str] | None:
        """:meth:`get` for the event loop: an exact local hit inline; the embedding and Redis in
        a worker thread."""
        prep = self._prepare(body)
        if prep is None:
            self._skip()
            return None
        hit = self._get_exact(prep)
        if hit is not None:
            return hit
        if not self._needs_thread(prep):
            with self._lock:
                self._counts["misses"] += 1
            return None
        if self._redis is not None:
            hit = await asyncio.to_thread(self._get_redis, prep)
            if hit is not None:
                return hit
        vec = await self._aembed(prep.semantic[0]) if prep.semantic is not None else None
        if vec is None or self._vecs is None or self.inline:  # nothing to compare, or cheap: no thread
            return self._get_semantic(prep, vec)
        return await asyncio.to_thread(self._get_semantic, prep, vec)  # a (max_entries, d) product

    def _skip(self) -> None:
        if self.enabled:
            with self._lock:
                self._counts["skipped"] += 1

    def put(self, body: Any, answer_json: Any) -> bool:
        """Store the answer of a request; True when stored. Not stored: a non-cacheable request,
        an answer that is not a completion (a dict with a non-empty ``choices`` list of objects),
        or one over ``max_answer_bytes``. Blocking (may embed and call Redis): from async code use
        :meth:`aput`."""
        prep = self._prepare(body)
        if prep is None:
            return False
        return self._put(prep, answer_json)

    async def aput(self, body: Any, answer_json: Any) -> bool:
        """:meth:`put` for the event loop (the embedding and Redis in a worker thread)."""
        prep = self._prepare(body)
        if prep is None:
            return False
        if not self._needs_thread(prep):
            return self._put(prep, answer_json)
        vec = await self._aembed(prep.semantic[0]) if prep.semantic is not None else None
        if self._redis is not None:
            return await asyncio.to_thread(self._put, prep, answer_json, vec)
        return self._put(prep, answer_json, vec)

    def _put(self, prep: _Prepared, answer_json: Any, vec: np.ndarray | None | object = ...) -> bool:
        """Store (``vec``: the semantic vector already computed, None for none; ``...``: embed here)."""
        choices = answer_json.get("choices") if isinstance(answer_json, dict) else None
        if not isinstance(choices, list) or not choices or not all(isinstance(c, dict) for c in choices):
            return False
        try:
            data = _dumps(answer_json)
        except (ValueError, TypeError):
            return False
        if len(data) > self.max_answer_bytes:
            return False
        text = data.decode("utf-8", "surrogatepass")
        group = 0
        if prep.semantic is None:
            vec = None
        else:
            if vec is ...:
                vec = self._embed(prep.semantic[0])
            group = prep.semantic[1]
        if self._redis is not None:
            try:
                self._redis.set(self._redis_prefix + prep.key, data, px=max(1, int(self.ttl_s * 1000)))
            except Exception:  # noqa: BLE001 -- Redis down: stored locally only
                with self._lock:
                    self._counts["redis_errors"] += 1
        now = self._clock()
        expires = now + self.ttl_s
        with self._lock:
            if prep.key in self._entries:
                self._drop(prep.key)
            if len(self._entries) >= self.max_entries:
                self._purge_expired(now)
            while len(self._entries) >= self.max_entries:
                oldest = next(iter(self._entries))
                self._drop(oldest)
                self._counts["evictions"] += 1
            slot = -1
            if vec is not None:
                if self._vecs is None:
                    self._vecs = np.zeros((self.max_entries, vec.shape[0]), dtype=np.float32)
                if self._vecs.shape[1] == vec.shape[0]:
                    slot = self._free.pop()
                    self._vecs[slot] = vec
                    self._slot_group[slot] = group
                    self._slot_expires[slot] = expires
                    self._slot_key[slot] = prep.key
            self._entries[prep.key] = _Entry(text, expires, slot)
            self._counts["puts"] += 1
        return True

    def _purge_expired(self, now: float) -> None:  # lock held
        dead = [k for k, e in self._entries.items() if e.expires <= now]
        for k in dead:
            self._drop(k)
        self._counts["expired"] += len(dead)

    def clear(self) -> None:
        """Drop every local entry (Redis entries expire on their own)."""
        with self._lock:
            for key in list(self._entries):
                self._drop(key)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def stats(self) -> dict[str, int]:
        """Counters for ``/metrics``: ``hits`` (= ``hits_exact`` + ``hits_semantic``), ``misses``
        (cacheable requests not found), ``skipped`` (requests not cacheable), ``puts``,
        ``evictions`` (LRU, at ``max_entries``), ``expired`` (dropped at their TTL),
        ``redis_errors``, ``semantic_busy`` (look-ups and puts that skipped the semantic layer:
        ``embed_max_queue`` texts were waiting to be embedded), ``semantic_late`` (async look-ups
        and puts that gave up waiting for their vector after ``embed_wait_ms``) and ``size``
        (local entries now)."""
        with self._lock:
            out = dict(self._counts)
            out["hits"] = out["hits_exact"] + out["hits_semantic"]
            out["size"] = len(self._entries)
        return out

    def __repr__(self) -> str:
        s = self.stats()
        return (f"ResponseCache(enabled={self.enabled}, semantic={self.semantic}, threshold={self.threshold:g}, "
                f"size={s['size']}/{self.max_entries}, hits={s['hits']}, misses={s['misses']})")


def _redis_from_url(url: str):
    try:
        import redis
    except ImportError as exc:
        raise MissingDependencyError(
            f"cache.redis_url is set ({url.split('@')[-1]!r}), which needs the 'redis' package. Install it "
            f"with: {_REDIS_INSTALL}") from exc
    return redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)


# ------------------------------------------------------------------------------------ streams
def completion_from_chunks(chunks: Sequence[dict]) -> dict | None:
    """The complete answer of a finished stream (its parsed ``data:`` events, without
    ``[DONE]``), to store with :meth:`ResponseCache.put`: a ``chat.completion`` (or a
    ``text_completion``) with each choice's text, ``finish_reason`` and the usage chunk's
    ``usage``. None when it cannot be rebuilt faithfully: no chunks, an error event, tool or
    function calls, or a choice without ``finish_reason`` (a cut stream)."""
    if not chunks:
        return None
    texts: dict[int, list[str]] = {}
    roles: dict[int, str] = {}
    finish: dict[int, str] = {}
    usage = None
    first = None
    for c in chunks:
        if not isinstance(c, dict) or c.get("error"):
            return None
        first = first or c
        if isinstance(c.get("usage"), dict):
            usage = c["usage"]
        for ch in c.get("choices") or []:
            if not isinstance(ch, dict) or not isinstance(ch.get("index", 0), int):
                return None
            i = ch.get("index", 0)
            if "delta" in ch:
                delta = ch["delta"] or {}
                if delta.get("tool_calls") or delta.get("function_call"):
                    return None
                if delta.get("role"):
                    roles[i] = delta["role"]
                piece = delta.get("content")
            else:
                piece = ch.get("text")
            if isinstance(piece, str):
                texts.setdefault(i, []).append(piece)
            else:
                texts.setdefault(i, [])
            if ch.get("finish_reason"):
                finish[i] = ch["finish_reason"]
    if not texts or set(finish) != set(texts):
        return None
    chat = first.get("object") != "text_completion"
    out = {"id": first.get("id"), "object": "chat.completion" if chat else "text_completion",
           "created": first.get("created"), "model": first.get("model"),
           "system_fingerprint": first.get("system_fingerprint")}
    if chat:
        out["choices"] = [{"index": i, "message": {"role": roles.get(i, "assistant"), "content": "".join(texts[i])},
                           "logprobs": None, "finish_reason": finish[i]} for i in sorted(texts)]
    else:
        out["choices"] = [{"index": i, "text": "".join(texts[i]), "logprobs": None, "finish_reason": finish[i]}
                          for i in sorted(texts)]
    if usage is not None:
        out["usage"] = usage
    return out
