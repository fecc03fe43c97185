"""A fake OpenAI-compatible server for tests and benchmarks: a real HTTP server on 127.0.0.1
(uvicorn in a thread, a free port) speaking ``/v1/chat/completions``, ``/v1/completions`` and
``/v1/models``, with deterministic answers, streaming, ``usage`` and injectable faults.

::

    from leanscale.cascade.gateway.testing import FakeOpenAIBackend

    with FakeOpenAIBackend(reply="hello there") as small, FakeOpenAIBackend(reply=str.upper) as big:
        small.set_fault(status=500)                  # every call answers 500 ...
        small.set_fault(status=429, times=2)         # ... or only the next 2
        small.set_fault(hang_s=5)                    # sleep 5 s before answering (a timeout)
        small.latency_s = 0.01                       # before every answer (a stream: its first chunk)
        small.chunk_delay_s = 0.05                   # between the chunks of a stream
        small.set_fault(stream_fail_after=2)         # a stream breaks off after 2 content chunks
        ... small.base_url (http://127.0.0.1:PORT/v1), small.calls, small.requests ...

``reply``: a fixed text, or a function of the prompt (the chat messages' contents joined by
newlines, or the completion prompt) returning the text, e.g. a dict lookup replaying recorded
answers. Tokens are counted as whitespace-separated words (``prompt_tokens`` of the prompt,
``completion_tokens`` of the reply), so a test can compute the cost by hand. A stream sends the
reply word by word (each word with its leading space), a last chunk with ``finish_reason``
"stop", a ``usage`` chunk (empty ``choices``) when the request has ``stream_options:
{"include_usage": true}``, and ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["FakeOpenAIBackend", "count_tokens"]


def count_tokens(text: str) -> int:
    """The fake's token count: whitespace-separated words."""
    return len(text.split())


def _prompt_of(body: dict, chat: bool) -> str:
    if chat:
        parts = []
        for m in body.get("messages") or []:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):  # content parts
                content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            parts.append(str(content or ""))
        return "\n".join(parts)
    prompt = body.get("prompt", "")
    return "\n".join(map(str, prompt)) if isinstance(prompt, list) else str(prompt)


class FakeOpenAIBackend:
    """See the module docstring. ``latency_s``: seconds before every answer (for a stream, before
    its first chunk); ``chunk_delay_s``: seconds between the chunks of a stream. ``api_key``: when given, requests must send ``Authorization:
    Bearer <api_key>`` (else 401). ``name``: the model name answered in ``model`` (default: the
    request's ``model``)."""

    def __init__(self, reply: str | Callable[[str], str] = "Hello from the fake backend.", *,
                 latency_s: float = 0.0, chunk_delay_s: float = 0.0, api_key: str | None = None,
                 name: str | None = None):
        self.reply, self.latency_s, self.api_key, self.name = reply, latency_s, api_key, name
        self.chunk_delay_s = chunk_delay_s
        self.calls = 0  # requests to /v1/chat/completions and /v1/completions, faulty ones included
        self.requests: list[dict] = []  # their JSON bodies, in order
        self.headers: list[dict[str, str]] = []  # their headers
        self._lock = threading.Lock()
        self._fault: dict[str, Any] = {}
        self._stopping = threading.Event()
        self._server = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    # ------------------------------------------------------------------------- faults
    def set_fault(self, *, status: int | None = None, hang_s: float = 0.0, times: int | None = None,
                  retry_after: float | None = None, stream_fail_after: int | None = None,
                  message: str | None = None) -> None:
        """Answer the next ``times`` calls (every call with None) with HTTP ``status`` (an OpenAI
        error body; ``Retry-After`` when given), after sleeping ``hang_s`` seconds (a hang, when
        longer than the caller's timeout); or, with ``stream_fail_after``, break streamed answers
        off after that many content chunks (no ``[DONE]``)."""
        with self._lock:
            self._fault = {"status": status, "hang_s": float(hang_s), "times": times, "retry_after": retry_after,
                           "stream_fail_after": stream_fail_after, "message": message}

    def clear_faults(self) -> None:
        with self._lock:
            self._fault = {}

    def _take_fault(self) -> dict:
        with self._lock:
            self.calls += 1
            fault = dict(self._fault)
            if fault and fault.get("times") is not None:
                self._fault["times"] -= 1
                if self._fault["times"] <= 0:
                    self._fault = {}
        return fault

    # --------------------------------------------------------------------------- server
    @property
    def base_url(self) -> str:
        if self.port is None:
            raise RuntimeError("the fake backend is not running; use it as a context manager (with ...)")
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> FakeOpenAIBackend:  # noqa: PYI034 -- typing.Self needs Python 3.11
        import uvicorn

        self._stopping.clear()
        config = uvicorn.Config(self._app(), host="127.0.0.1", port=0, log_level="error", access_log=False,
                                lifespan="off", ws="none", timeout_graceful_shutdown=1, timeout_keep_alive=5)
        self._server = server = uvicorn.Server(config)
        self._thread = threading.Thread(target=server.run, name="fake-openai-backend", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 15
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the fake OpenAI backend did not start")
            time.sleep(0.005)
        self.port = server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc) -> None:
        self._stopping.set()  # ends hangs at once
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self._server = self._thread = None
        self.port = None

    async def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self._stopping.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(min(left, 0.05))

    # ------------------------------------------------------------------------------ app
    def _text_for(self, prompt: str) -> str:
        return self.reply(prompt) if callable(self.reply) else str(self.reply)

    def _app(self):
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse, StreamingResponse
        from starlette.routing import Route

        def error(status: int, message: str, kind: str = "server_error", headers=None) -> JSONResponse:
            return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}},
                                status_code=status, headers=headers)

        async def models(request: Request):
            name = self.name or "fake"
            return JSONResponse({"object": "list", "data": [{"id": name, "object": "model", "created": 0,
                                                             "owned_by": "leanscale-fake"}]})

        async def complete(request: Request):
            chat = request.url.path.endswith("/chat/completions")
            raw = await request.body()
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
            with self._lock:
                self.requests.append(body)
                self.headers.append({k.lower(): v for k, v in request.headers.items()})
            fault = self._take_fault()
            if self.api_key is not None and request.headers.get("authorization") != f"Bearer {self.api_key}":
                return error(401, "Incorrect API key provided.", "invalid_request_error")
            if not isinstance(body, dict):
                return error(400, "the body must be a JSON object", "invalid_request_error")
            if fault.get("hang_s"):
                await self._sleep(fault["hang_s"])
            if self.latency_s:
                await self._sleep(self.latency_s)
            if fault.get("status") is not None:
                headers = {"retry-after": f"{fault['retry_after']:g}"} if fault.get("retry_after") is not None else None
                return error(int(fault["status"]), fault.get("message") or f"injected fault {fault['status']}",
                             headers=headers)
            prompt = _prompt_of(body, chat)
            text = self._text_for(prompt)
            usage = {"prompt_tokens": count_tokens(prompt), "completion_tokens": count_tokens(text)}
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            model = self.name or str(body.get("model", "fake"))
            created = int(time.time())
            ident = f"{'chatcmpl' if chat else 'cmpl'}-fake{self.calls}"
            if not body.get("stream"):
                if chat:
                    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                              "logprobs": None}
                else:
                    choice = {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}
                return JSONResponse({"id": ident, "object": "chat.completion" if chat else "text_completion",
                                     "created": created, "model": model, "choices": [choice], "usage": usage})
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            fail_after = fault.get("stream_fail_after")
            kind = "chat.completion.chunk" if chat else "text_completion"

            def chunk(choices: list, **extra) -> bytes:
                obj = {"id": ident, "object": kind, "created": created, "model": model, "choices": choices, **extra}
                return f"data: {json.dumps(obj)}\n\n".encode()

            def piece(content: str | None, finish: str | None, first: bool = False) -> dict:
                if chat:
                    delta = {"role": "assistant", "content": content or ""} if first else (
                        {"content": content} if content is not None else {})
                    return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
                return {"index": 0, "text": content or "", "finish_reason": finish, "logprobs": None}

            words = re.findall(r"\s*\S+", text) or [""]

            async def events():
                if chat:
                    yield chunk([piece("", None, first=True)])
                for i, word in enumerate(words):
                    if fail_after is not None and i >= fail_after:
                        raise RuntimeError("injected stream failure")  # uvicorn drops the connection
                    yield chunk([piece(word, None)])
                    if self.chunk_delay_s:
                        await self._sleep(self.chunk_delay_s)
                yield chunk([piece(None, "stop")])
                if include_usage:
                    yield chunk([], usage=usage)
                yield b"data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        routes = [Route("/v1/chat/completions", complete, methods=["POST"]),
                  Route("/v1/completions", complete, methods=["POST"]),
                  Route("/v1/models", models, methods=["GET"])]
        app = Starlette(routes=routes)
        app.state.fake = self
        return app


