"""An in-memory vLLM behind the gateway's `EngineClient` interface (gateway/engines/client.py).

For the fast tests (tests/test_gateway_fast.py): the whole gateway (its HTTP server, auth, routes, registry,
residency, routing, retries, metrics) runs for real; only the engine is this stand-in, so a test takes
milliseconds, not a vLLM start. The real-vLLM end-to-end tests stay the proof; these give most of the
signal in seconds.

One `FakeVllm` per engine URL; it speaks the routes the gateway calls: `GET /health`, `GET /v1/models`
(the base and the loaded adapters, as vLLM lists them), `GET /metrics`, `POST /v1/load_lora_adapter` and
`/v1/unload_lora_adapter`, and `POST /v1/chat/completions` and `/v1/completions` (an answer that names
the model that produced it, streamed as one SSE event per word). Faults on demand: refuse connections,
drop a stream after some events, hang (count the calls the gateway drops), forget an adapter behind the
gateway's back, list garbage.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from gateway.errors import EngineUnreachableError, UpstreamError, from_upstream


def answer_words(model: str) -> list[str]:
    """What the fake answers for `model`: words that name it, so a test sees who answered."""
    return ["answer", "from", model]


@dataclass
class FakeVllm:
    base: str
    adapters: set[str] = field(default_factory=set)
    refuse: bool = False  # a closed port: every call fails to connect
    drop_after_events: int | None = None  # a stream breaks after this many events
    requests: list[dict[str, Any]] = field(default_factory=list)  # inference bodies, as received
    hang: bool = False  # completions never answer (until the gateway drops the call)
    dropped: int = 0  # completion calls the gateway dropped (cancelled) while they hung
    listing: Any = None  # set: `/v1/models` answers this as its `data` (a malformed listing), not the truth
    probes: int = 0  # `/v1/models` calls
    calls: list[tuple[str, str, Any]] = field(default_factory=list)  # every call made: (method, path, body)

    def answer(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        self.calls.append((method, path, body))
        if path == "/health":
            return 200, {}
        if path == "/v1/models":
            self.probes += 1
            if self.listing is not None:
                return 200, {"object": "list", "data": self.listing}
            data = [{"id": self.base, "object": "model", "parent": None}]
            data += [{"id": a, "object": "model", "parent": self.base} for a in sorted(self.adapters)]
            return 200, {"object": "list", "data": data}
        if path == "/v1/load_lora_adapter":
            if body["lora_name"] in self.adapters:
                return 400, _error(f"The lora adapter '{body['lora_name']}' has already been loaded.", 400)
            self.adapters.add(body["lora_name"])
            return 200, "ok"
        if path == "/v1/unload_lora_adapter":
            if body["lora_name"] not in self.adapters:
                return 404, _error(f"The lora adapter '{body['lora_name']}' cannot be found.", 404)
            self.adapters.discard(body["lora_name"])
            return 200, "ok"
        if path in ("/v1/chat/completions", "/v1/completions"):
            self.requests.append(body)
            if body["model"] != self.base and body["model"] not in self.adapters:
                return 404, _error(f"The model `{body['model']}` does not exist.", 404)
            return 200, body
        return 404, _error(f"no route {method} {path}", 404)


def _error(message: str, code: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": "NotFoundError" if code == 404 else "BadRequestError",
                      "param": None, "code": code}}  # fmt: skip


class FakeResponse:
    def __init__(self, status: int, payload: bytes, events: list[bytes] | None, vllm: FakeVllm) -> None:
        self.status_code = status
        self.headers: Mapping[str, str] = {
            "content-type": "text/event-stream" if events is not None else "application/json"
        }
        self._payload = payload
        self._events = events
        self._vllm = vllm
        self.closed = False

    async def read(self) -> bytes:
        return self._payload

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        for i, event in enumerate(self._events or []):
            if self._vllm.drop_after_events is not None and i >= self._vllm.drop_after_events:
                raise UpstreamError("The engine connection failed: ClientPayloadError: fake drop")
            yield event

    def close(self) -> None:
        self.closed = True


class FakeEngineClient:
    """The gateway's `EngineClient`, answering from one `FakeVllm` per engine URL."""

    def __init__(self, engines: dict[str, FakeVllm]) -> None:
        self.engines = engines  # base URL ("http://host:port") -> its fake vLLM
        self.responses: list[FakeResponse] = []
        self.keys: dict[str, str | None] = {}  # base URL -> the key the gateway gave it (`authorize`)
        self.sent_headers: list[dict[str, str]] = []  # the headers of every inference call, in order

    def _engine(self, url: str) -> tuple[FakeVllm, str]:
        parts = urlsplit(url)
        vllm = self.engines[f"{parts.scheme}://{parts.netloc}"]
        if vllm.refuse:
            raise EngineUnreachableError("The engine is unreachable: ClientConnectorError.", refused=True)
        return vllm, parts.path

    async def stream(
        self,
        method: str,
        url: str,
        *,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        what: str = "engine",
    ) -> FakeResponse:
        """Streams as `send` does: the relay iterates these responses (they have no `attach`)."""
        return await self.send(method, url, content=content, headers=headers, what=what)

    async def send(
        self,
        method: str,
        url: str,
        *,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        what: str = "engine",
    ) -> FakeResponse:
        vllm, path = self._engine(url)
        if path.endswith("completions"):
            self.sent_headers.append(dict(headers or {}))
        if path == "/metrics":
            text = "vllm:num_requests_waiting 0\nvllm:num_requests_running 0\n"
            return FakeResponse(200, text.encode(), None, vllm)
        body = json.loads(content) if content else None
        status, result = vllm.answer(method, path, body)
        if vllm.hang and path.endswith("completions"):
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                vllm.dropped += 1  # what vLLM sees as a client gone: it aborts the request
                raise
        if status != 200 or path == "/v1/models":
            return FakeResponse(status, json.dumps(result).encode(), None, vllm)
        return self._completion(vllm, path, result)

    def _completion(self, vllm: FakeVllm, path: str, body: dict[str, Any]) -> FakeResponse:
        model, words = body["model"], answer_words(body["model"])
        chat = path == "/v1/chat/completions"
        usage = {"prompt_tokens": 3, "completion_tokens": len(words), "total_tokens": 3 + len(words)}
        if not body.get("stream"):
            text = " ".join(words)
            choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
            choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            kind = "chat.completion" if chat else "text_completion"
            out = {"id": "cmpl-fake", "object": kind, "model": model, "choices": [choice], "usage": usage}
            response = FakeResponse(200, json.dumps(out, separators=(",", ":")).encode(), None, vllm)
        else:
            events = []
            for word in words:
                delta = (
                    {"index": 0, "delta": {"content": word + " "}}
                    if chat
                    else {"index": 0, "text": word + " "}
                )
                chunk = {"id": "cmpl-fake", "model": model, "choices": [delta]}
                events.append(b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n")
            if (body.get("stream_options") or {}).get("include_usage"):
                chunk = {"id": "cmpl-fake", "model": model, "choices": [], "usage": usage}
                events.append(b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n")
            events.append(b"data: [DONE]\n\n")
            response = FakeResponse(200, b"", events, vllm)
        self.responses.append(response)
        return response

    def authorize(self, base_url: str, api_key: str | None) -> None:
        self.keys[base_url] = api_key  # an in-memory engine checks none: the real client's tests do

    async def post_json(self, url: str, payload: Any) -> bytes:
        vllm, path = self._engine(url)
        status, result = vllm.answer("POST", path, payload)
        body = json.dumps(result).encode()
        if status >= 400:
            raise from_upstream(status, body)
        return body

    async def get_json(self, url: str, *, timeout: float) -> Any:
        vllm, path = self._engine(url)
        status, result = vllm.answer("GET", path, None)
        if status >= 400:
            raise from_upstream(status, json.dumps(result).encode())
        return result

    async def get_text(self, url: str, *, timeout: float) -> tuple[int, str]:
        response = await self.send("GET", url, timeout=timeout)
        return response.status_code, (await response.read()).decode()

    async def get_status(self, url: str, *, timeout: float) -> int:
        vllm, path = self._engine(url)
        return vllm.answer("GET", path, None)[0]

    async def aclose(self) -> None:
        pass
