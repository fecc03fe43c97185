"""Shared pieces of the gateway benchmarks: fake OpenAI-compatible backends and the gateway, each in
a process of its own, and an asynchronous HTTP client that drives them and classifies every answer.

Why processes: the machines these benchmarks run on may have 2 cores. A server in a thread of the
client's process shares the client's GIL, so the client's own work would be counted as gateway
latency (and the other way round). Here the client runs in the benchmark's process, the gateway
(uvicorn configured as ``leanscale gateway`` serves it: :func:`leanscale.cascade.server.server_config`)
in a second one and every fake backend in a process of its own; direct calls and gateway calls
are sent by the same client code, so the difference between them is the gateway's.

The client is raw HTTP/1.1 over asyncio streams (one keep-alive connection per concurrent
worker), not the official ``openai`` client nor a shared ``httpx.AsyncClient``: on a 2-core
machine the client's own CPU time is latency of everything it measures. Measured against a fake
backend answering at once (2,000 requests): a raw ``aiohttp`` session costs the client 0.2 ms of
CPU per request at 64 workers, an ``httpx.AsyncClient`` per worker 1.7 ms, one ``httpx.AsyncClient``
shared by 64 workers 3.4 ms (its connection pool) -- the last one saturates a core at ~200 req/s
and the load test measured the client. The official client adds pydantic parsing on top.
``--client httpx`` (a client per worker) remains available. Every answer is still checked for
OpenAI's shape (:func:`classify`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import csv
import multiprocessing as mp
import random
import re
import threading
import time
import traceback
from typing import Any

import numpy as np

from leanscale.cascade.gateway.testing import FakeOpenAIBackend

SPAWN = mp.get_context("spawn")  # no fork: the children must not inherit the client's threads or loop
NO_RECORD = "(no recorded answer for this prompt)"


# ----------------------------------------------------------------------------- fake backends
class RandomFaultBackend(FakeOpenAIBackend):
    """:class:`FakeOpenAIBackend` with faults drawn at random per call (``set_fault`` of the fake
    applies to every call or to the next N calls; a load test needs "5% of the calls, at random").
    While ``faults_on``: a seeded ``fault_rate`` of the calls answer HTTP 500 (an OpenAI error
    body), a further ``hang_rate`` sleep ``hang_s`` seconds before answering (a hang, when longer
    than the gateway's ``timeout_s`` for this model). ``injected`` counts them. ``latency_jitter``:
    each answer waits ``latency_s`` times a uniform factor in [1 - jitter, 1 + jitter] (0: exactly
    ``latency_s``; with a constant latency, closed-loop clients that start together stay
    synchronized in waves of ``concurrency`` requests, which a real LLM backend's varying answer
    times do not do).

    It overrides the fake's private ``_take_fault`` (called once per completion request, under
    the fake's lock) and changes nothing in ``testing.py``."""

    def __init__(self, reply, *, fault_rate: float = 0.0, hang_rate: float = 0.0, hang_s: float = 0.0,
                 seed: int = 0, latency_jitter: float = 0.0, **kw):
        self.latency_jitter = float(latency_jitter)
        self._jitter_rng = random.Random(seed + 10**6)
        super().__init__(reply, **kw)
        self.fault_rate, self.hang_rate, self.hang_s = float(fault_rate), float(hang_rate), float(hang_s)
        self.rng = random.Random(seed)
        self.faults_on = False
        self.injected: collections.Counter = collections.Counter()

    @property
    def latency_s(self) -> float:  # read by the fake before every answer
        base = self._latency_s
        if base and self.latency_jitter:
            return base * (1.0 + self.latency_jitter * (2.0 * self._jitter_rng.random() - 1.0))
        return base

    @latency_s.setter
    def latency_s(self, value: float) -> None:
        self._latency_s = float(value)

    def _take_fault(self) -> dict:
        with self._lock:
            self.calls += 1
            if not self.faults_on:
                return {}
            u = self.rng.random()
            if u < self.fault_rate:
                self.injected["status_500"] += 1
                return {"status": 500, "message": "injected fault (benchmark)"}
            if u < self.fault_rate + self.hang_rate:
                self.injected["hang"] += 1
                return {"hang_s": self.hang_s}
        return {}


def replay_table(csv_path: str, prompt_column: str, response_column: str) -> dict[str, str]:
    """prompt -> recorded response, from a CSV file (the RouteLLM GSM8K file's layout)."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        return {row[prompt_column]: row[response_column] for row in csv.DictReader(f)}


def _make_reply(spec: dict):
    if "text" in spec:
        return str(spec["text"])
    table = replay_table(spec["csv"], spec["prompt_column"], spec["response_column"])
    return lambda prompt: table.get(prompt, NO_RECORD)


def _backend_main(conn, spec: dict) -> None:
    """A child process serving one fake backend; answers commands on ``conn``."""
    try:
        fake = RandomFaultBackend(_make_reply(spec["reply"]), fault_rate=spec.get("fault_rate", 0.0),
                                  hang_rate=spec.get("hang_rate", 0.0), hang_s=spec.get("hang_s", 0.0),
                                  seed=spec.get("seed", 0), latency_s=spec.get("latency_s", 0.0),
                                  latency_jitter=spec.get("latency_jitter", 0.0),
                                  name=spec.get("name"))
        fake.requests = _Discard()  # a load test does not keep the bodies (memory, and the lock's time)
        fake.headers = _Discard()
        fake.__enter__()
    except Exception:  # noqa: BLE001 -- reported to the parent, which raises
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ok", fake.port))
    try:
        while True:
            cmd, arg = conn.recv()
            if cmd == "faults":
                fake.faults_on = bool(arg)
            elif cmd == "latency":
                fake.latency_s = float(arg)
            elif cmd == "reseed":  # the same latency draws again (phases compared draw for draw)
                fake._jitter_rng.seed(int(arg))
            elif cmd == "stop":
                break
            conn.send({"calls": fake.calls, "injected": dict(fake.injected), "faults_on": fake.faults_on,
                       "latency_s": fake._latency_s})
    except EOFError:
        pass
    finally:
        fake.__exit__(None, None, None)
        with contextlib.suppress(Exception):
            conn.send("stopped")


class _Discard(list):
    """A list that keeps nothing (the fake appends every request body and header to lists)."""

    def append(self, item) -> None:
        pass


def _gateway_main(conn, config: dict, server_options: dict, torch_threads: int | None = None) -> None:
    """A child process serving the gateway with uvicorn (as ``leanscale gateway`` configures it);
    ``torch_threads``: ``torch.set_num_threads`` first (the semantic cache's MiniLM), None: torch's default."""
    try:
        if torch_threads is not None:
            import torch

            torch.set_num_threads(int(torch_threads))
        import uvicorn

        from leanscale.cascade.gateway import GatewayConfig, create_gateway_app
        from leanscale.cascade.server import server_config

        app = create_gateway_app(GatewayConfig.from_dict(config))
        uv = server_config(app, host="127.0.0.1", port=0, log_level="warning", **server_options)
        server = uvicorn.Server(uv)
        thread = threading.Thread(target=server.run, name="gateway", daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start")
            time.sleep(0.005)
    except Exception:  # noqa: BLE001 -- reported to the parent, which raises
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ok", server.servers[0].sockets[0].getsockname()[1]))
    try:
        while conn.recv()[0] != "stop":
            conn.send("?")
    except EOFError:
        pass
    finally:
        server.should_exit = True
        thread.join(30)
        with contextlib.suppress(Exception):
            conn.send("stopped")


class Child:
    """A child process (a fake backend or the gateway) and its command pipe."""

    def __init__(self, target, *args, what: str):
        self.what = what
        self.conn, child_conn = SPAWN.Pipe()
        self.process = SPAWN.Process(target=target, args=(child_conn, *args), name=what, daemon=True)
        self.process.start()
        if not self.conn.poll(60):
            self.stop()
            raise RuntimeError(f"the {what} process did not start within 60 s")
        status, value = self.conn.recv()
        if status != "ok":
            self.process.join(5)
            raise RuntimeError(f"the {what} process failed to start:\n{value}")
        self.port: int = value

    def command(self, cmd: str, arg: Any = None) -> Any:
        self.conn.send((cmd, arg))
        return self.conn.recv()

    def cpu_seconds(self) -> float | None:
        """User + system CPU seconds of the process so far (None without psutil or /proc)."""
        return cpu_seconds(self.process.pid)

    def stop(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(Exception):
                self.conn.send(("stop", None))
                if self.conn.poll(30):
                    self.conn.recv()
            self.process.join(30)
        if self.process.is_alive():  # our own child, by its id
            self.process.terminate()
            self.process.join(10)
        self.conn.close()


def start_backend(name: str, reply: dict, **options) -> Child:
    """A fake backend in its own process. ``reply``: ``{"text": ...}`` or ``{"csv": path,
    "prompt_column": ..., "response_column": ...}`` (replay); ``options``: ``latency_s``,
    ``latency_jitter``, ``fault_rate``, ``hang_rate``, ``hang_s``, ``seed``."""
    child = Child(_backend_main, {"name": name, "reply": reply, **options}, what=f"fake backend {name!r}")
    child.base_url = f"http://127.0.0.1:{child.port}/v1"
    return child


def start_gateway(config: dict, *, torch_threads: int | None = None, **server_options) -> Child:
    """The gateway (``config``: a dict of the YAML's shape) in its own process (``torch_threads``:
    see :func:`_gateway_main`)."""
    child = Child(_gateway_main, config, server_options, torch_threads, what="gateway")
    child.base_url = f"http://127.0.0.1:{child.port}/v1"
    return child


def cpu_seconds(pid: int | None = None) -> float | None:
    try:
        import psutil

        t = psutil.Process(pid).cpu_times()
        return float(t.user + t.system)
    except Exception:  # noqa: BLE001 -- psutil missing or no access: no CPU numbers
        return None


def pin_cores(gateway_pid: int, other_pids: list) -> dict:
    """Give the gateway CPU 0 and every other process (``None``: this one) the remaining CPUs: the
    gateway's overhead then measures the gateway, not its competition for a core with the load
    generator and the fake backends (which in a deployment run on other machines). Returns what
    was set, for the results' settings."""
    import os

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise RuntimeError(f"--pin needs at least 2 CPUs; this process may use {len(cpus)}")
    gateway_cpus, other_cpus = cpus[:1], cpus[1:]
    os.sched_setaffinity(gateway_pid, gateway_cpus)
    for pid in other_pids:
        os.sched_setaffinity(0 if pid is None else pid, other_cpus)
    return {"gateway": gateway_cpus, "client_and_fakes": other_cpus}


def server_stack() -> str:
    """The event loop uvicorn picks here (``loop="auto"``: uvloop when installed) and the HTTP
    protocol (always h11: ``server_config``'s connection-limited h11 protocol)."""
    import importlib.util

    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    return f"{loop} loop, h11"


# ---------------------------------------------------------------------------------- client
Result = collections.namedtuple("Result", "status seconds data model cost")
CLIENTS = ("raw", "httpx")


class _RawConnection:
    """One keep-alive HTTP/1.1 connection over asyncio streams: the cheapest client there is in
    Python (no parsing beyond the status line, the headers and the body's framing), so that the
    client's CPU time does not blur what is measured on a small machine."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        self.reader = self.writer = None

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = [f"POST {path} HTTP/1.1", f"host: {self.host}:{self.port}", f"content-length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        await self.writer.drain()
        line = await self.reader.readline()
        if not line:
            raise ConnectionError("the server closed the connection without an answer")
        status = int(line.split()[1])
        got: dict[str, str] = {}
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            got[name.strip().lower()] = value.strip()
        if "content-length" in got:
            data = await self.reader.readexactly(int(got["content-length"]))
        elif got.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await self.reader.readline()).split(b";")[0], 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                parts.append(chunk[:-2])
            data = b"".join(parts)
        else:
            data = await self.reader.read()
            await self.close()
        if got.get("connection", "").lower() == "close":
            await self.close()
        return status, got, data


async def _drive(url: str, bodies: list[bytes], concurrency: int, timeout: float,
                 client: str) -> tuple[list[Result], float]:
    from urllib.parse import urlsplit

    results: list[Result | None] = [None] * len(bodies)
    order = iter(range(len(bodies)))
    headers = {"content-type": "application/json", "authorization": "Bearer benchmark"}
    parts = urlsplit(url)

    async def raw_worker() -> None:
        conn = _RawConnection(parts.hostname, parts.port)
        try:
            for i in order:
                t0 = time.perf_counter()
                try:
                    status, got, data = await asyncio.wait_for(conn.post(parts.path, bodies[i], headers), timeout)
                    results[i] = Result(status, time.perf_counter() - t0, data, got.get("x-leanscale-model"),
                                        got.get("x-leanscale-cost-usd"))
                except Exception as exc:  # noqa: BLE001 -- no answer: counted as lost
                    results[i] = Result(None, time.perf_counter() - t0, repr(exc).encode(), None, None)
                    await conn.close()
        finally:
            await conn.close()

    async def httpx_worker() -> None:
        import httpx

        # one client per worker: a client shared by 64 workers spends milliseconds of CPU per request
        # in its connection pool (measured: 3.4 ms at 64 workers vs 1.1 ms at 1)
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout)) as http:
            for i in order:
                t0 = time.perf_counter()
                try:
                    r = await http.post(url, content=bodies[i], headers=headers)
                    results[i] = Result(r.status_code, time.perf_counter() - t0, r.content,
                                        r.headers.get("x-leanscale-model"), r.headers.get("x-leanscale-cost-usd"))
                except Exception as exc:  # noqa: BLE001 -- no answer: counted as lost
                    results[i] = Result(None, time.perf_counter() - t0, repr(exc).encode(), None, None)

    worker = raw_worker if client == "raw" else httpx_worker
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results, time.perf_counter() - t0


def drive(url: str, bodies: list[bytes], concurrency: int, timeout: float = 60.0,
          client: str = "raw") -> tuple[list[Result], float]:
    """POST every body to ``url`` from ``concurrency`` workers, each with one keep-alive
    connection (``client``: "raw", HTTP/1.1 over asyncio streams, or "httpx", an
    ``httpx.AsyncClient`` per worker); the results in the bodies' order, and the wall seconds."""
    if client not in CLIENTS:
        raise ValueError(f"client must be one of {CLIENTS}. Got {client!r}.")
    return asyncio.run(_drive(url, bodies, concurrency, timeout, client))


def chat_body(model: str, prompt: str, **extra) -> bytes:
    import json

    return json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], **extra}).encode()


def classify(r: Result) -> tuple[str, str | None]:
    """("ok", content) for a 200 with an OpenAI chat completion whose first choice has a text;
    ("error", code) for a non-200 with a well-formed OpenAI error body; else ("lost", why)."""
    import json

    if r.status is None:
        return "lost", "no answer: " + r.data.decode(errors="replace")[:200]
    try:
        body = json.loads(r.data)
    except ValueError:
        return "lost", f"HTTP {r.status} with a body that is not JSON"
    if r.status == 200:
        try:
            content = body["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            return "lost", "HTTP 200 without choices[0].message.content"
        if not isinstance(content, str) or not content:
            return "lost", "HTTP 200 with an empty answer"
        return "ok", content
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict) and isinstance(err.get("message"), str) and isinstance(err.get("type"), str):
        return "error", err.get("code") or err.get("type")
    return "lost", f"HTTP {r.status} without an OpenAI error body"


def latency_summary(seconds: list[float]) -> dict:
    if not seconds:
        return {}
    ms = np.asarray(seconds) * 1e3
    return {"p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
            "p99": float(np.percentile(ms, 99)), "max": float(ms.max()), "mean": float(ms.mean())}


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def scrape(base_url: str) -> dict[str, float]:
    """The gateway's Prometheus samples (``name{labels}`` -> value)."""
    import httpx

    text = httpx.get(base_url.removesuffix("/v1") + "/metrics", timeout=30).text
    out = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def healthz(base_url: str) -> dict:
    import httpx

    return httpx.get(base_url.removesuffix("/v1") + "/healthz", timeout=30).json()
