"""A minimal, fast OpenAI-compatible upstream that answers at once with canned tokens.

It isolates a proxy's own cost in overhead benchmarks, and it looks enough like a vLLM engine
with LoRA enabled for a gateway to manage it: ``/v1/load_lora_adapter`` and
``/v1/unload_lora_adapter`` answer like vLLM (200 plain text; JSON errors with an integer
``code``), and ``/v1/models`` lists the base model and the loaded adapters.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (stream and non-stream; usage
reported, ``stream_options.include_usage`` honoured, ``data: [DONE]``), ``GET /v1/models``,
``GET /health``, ``POST /v1/load_lora_adapter``, ``POST /v1/unload_lora_adapter``.

The completion has ``max_tokens`` tokens (default 16), one per stream chunk. By default any
model name is accepted; ``--strict-models`` answers 404 for names that are neither the served
model nor a loaded adapter, as vLLM does.

    python -m loadtest.servers.fast_upstream --port 8001
    python -m loadtest.servers.fast_upstream --port 8001 --strict-models --itl-ms 5 --load-delay-ms 200

It is a raw ASGI app (no framework) so its own cost stays small next to the proxy's.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

try:
    import orjson

    def _dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)

except ImportError:  # orjson is optional; the stdlib is fast enough for the default

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
_DONE = b"data: [DONE]\n\n"
MODULE = "loadtest.servers.fast_upstream"  # python -m MODULE


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    served_model_name: str = "base"
    strict_models: bool = False
    default_max_tokens: int = 16
    max_tokens_cap: int = 4096
    token: str = " tok"
    ttft_ms: float = 0.0
    itl_ms: float = 0.0
    load_delay_ms: float = 0.0


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, err_type: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.err_type, self.param = status, message, err_type, param

    def body(self) -> dict[str, Any]:
        err = {"message": self.message, "type": self.err_type, "param": self.param, "code": self.status}
        return {"error": err}


def _count_words(content: Any) -> int:
    if isinstance(content, str):
        return len(content.split())
    if isinstance(content, list):
        return sum(_count_words(p.get("text", "") if isinstance(p, dict) else p) for p in content)
    return 0


class FastUpstream:
    """The ASGI app. State (loaded adapters, counters) lives on the instance."""

    def __init__(self, config: UpstreamConfig | None = None) -> None:
        self.config = config or UpstreamConfig()
        self.adapters: dict[str, str] = {}
        self.created = int(time.time())
        self._ids = itertools.count(1)
        self._routes: dict[tuple[str, str], Callable[[Scope, bytes, Send], Awaitable[None]]] = {
            ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/v1/completions"): self._completions,
            ("GET", "/v1/models"): self._models,
            ("GET", "/health"): self._health,
            ("POST", "/v1/load_lora_adapter"): self._load_lora,
            ("POST", "/v1/unload_lora_adapter"): self._unload_lora,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        handler = self._routes.get((scope["method"], scope["path"]))
        if handler is None:
            known = any(path == scope["path"] for _, path in self._routes)
            err = (
                _HTTPError(405, "Method Not Allowed", "MethodNotAllowed")
                if known
                else _HTTPError(404, f"Not Found: {scope['path']}", "NotFoundError")
            )
            await _respond(send, err.status, _dumps(err.body()), _JSON)
            return
        body = await _read_body(receive)
        try:
            await handler(scope, body, send)
        except _HTTPError as err:
            await _respond(send, err.status, _dumps(err.body()), _JSON)

    # -- generation ---------------------------------------------------------------------------

    def _parse(self, body: bytes) -> tuple[dict[str, Any], str, int]:
        try:
            req = json.loads(body)
        except ValueError:
            raise _HTTPError(400, "The request body is not valid JSON.", "BadRequestError") from None
        if not isinstance(req, dict):
            raise _HTTPError(400, "The request body must be a JSON object.", "BadRequestError")
        model = req.get("model") or self.config.served_model_name
        if (
            self.config.strict_models
            and model != self.config.served_model_name
            and model not in self.adapters
        ):
            raise _HTTPError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        n = req.get("max_tokens", req.get("max_completion_tokens")) or self.config.default_max_tokens
        if not isinstance(n, int) or n < 1:
            raise _HTTPError(400, "max_tokens must be a positive integer.", "BadRequestError", "max_tokens")
        return req, model, min(n, self.config.max_tokens_cap)

    async def _chat(self, scope: Scope, body: bytes, send: Send) -> None:
        req, model, n = self._parse(body)
        messages = req.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _HTTPError(400, "messages must be a non-empty list.", "BadRequestError", "messages")
        prompt = sum(_count_words(m.get("content")) for m in messages if isinstance(m, dict))
        await self._generate(send, req, model, n, prompt, chat=True)

    async def _completions(self, scope: Scope, body: bytes, send: Send) -> None:
        req, model, n = self._parse(body)
        if "prompt" not in req:
            raise _HTTPError(400, "prompt is required.", "BadRequestError", "prompt")
        await self._generate(send, req, model, n, _count_words(req["prompt"]), chat=False)

    async def _generate(
        self, send: Send, req: dict[str, Any], model: str, n: int, prompt: int, *, chat: bool
    ) -> None:
        cfg = self.config
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{next(self._ids)}"
        usage = {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}
        if cfg.ttft_ms > 0:
            await asyncio.sleep(cfg.ttft_ms / 1000)
        if not req.get("stream"):
            if cfg.itl_ms > 0 and n > 1:
                await asyncio.sleep(cfg.itl_ms * (n - 1) / 1000)
            text = cfg.token * n
            choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": "length"}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            obj = "chat.completion" if chat else "text_completion"
            out = {"id": rid, "object": obj, "created": self.created, "model": model, "choices": [choice]}
            out["usage"] = usage
            await _respond(send, 200, _dumps(out), _JSON)
            return
        obj = "chat.completion.chunk" if chat else "text_completion"
        head = {"id": rid, "object": obj, "created": self.created, "model": model}

        def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            return b"data: " + _dumps({**head, "choices": choices, **extra}) + b"\n\n"

        def choice_of(piece: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
            c: dict[str, Any] = {"index": 0}
            if chat:
                delta: dict[str, Any] = {"role": "assistant"} if role else {}
                if piece is not None:
                    delta["content"] = piece
                c["delta"] = delta
            else:
                c["text"] = piece or ""
            return c | {"logprobs": None, "finish_reason": finish}

        token_event = event([choice_of(cfg.token, None)])
        await send({"type": "http.response.start", "status": 200, "headers": _SSE})
        try:
            if chat:
                await _chunk(send, event([choice_of("", None, role=True)]))
            for i in range(n):
                if i and cfg.itl_ms > 0:
                    await asyncio.sleep(cfg.itl_ms / 1000)
                await _chunk(send, token_event)
            await _chunk(send, event([choice_of(None if chat else "", "length")]))
            opts = req.get("stream_options")
            if isinstance(opts, dict) and opts.get("include_usage"):
                await _chunk(send, event([], usage=usage))
            await send({"type": "http.response.body", "body": _DONE, "more_body": False})
        except OSError:  # the client went away
            return

    # -- models and adapters ------------------------------------------------------------------

    def _card(self, name: str, root: str, parent: str | None) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": self.created,
            "owned_by": "vllm",
            "root": root,
            "parent": parent,
            "max_model_len": None,
            "permission": [],
        }

    async def _models(self, scope: Scope, body: bytes, send: Send) -> None:
        base = self.config.served_model_name
        data = [self._card(base, base, None)]
        data += [self._card(name, path, base) for name, path in self.adapters.items()]
        await _respond(send, 200, _dumps({"object": "list", "data": data}), _JSON)

    async def _health(self, scope: Scope, body: bytes, send: Send) -> None:
        await _respond(send, 200, b"", [])

    def _lora_body(self, body: bytes) -> dict[str, Any]:
        try:
            req = json.loads(body)
        except ValueError:
            req = None
        if not isinstance(req, dict):
            raise _HTTPError(400, "The request body is not a valid JSON object.", "BadRequestError")
        return req

    async def _load_lora(self, scope: Scope, body: bytes, send: Send) -> None:
        req = self._lora_body(body)
        name, path = req.get("lora_name"), req.get("lora_path")
        if not name or not path:
            raise _HTTPError(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput")
        if name == self.config.served_model_name:
            raise _HTTPError(
                400, f"The lora adapter '{name}' conflicts with a served base model.", "InvalidUserInput"
            )
        if name in self.adapters and not req.get("load_inplace"):
            raise _HTTPError(
                400,
                f"The lora adapter '{name}' has already been loaded. If you want to load the adapter "
                "in place, set 'load_inplace' to True.",
                "InvalidUserInput",
            )
        if self.config.load_delay_ms > 0:
            await asyncio.sleep(self.config.load_delay_ms / 1000)
        self.adapters[name] = path
        msg = f"Success: LoRA adapter '{name}' added successfully."
        await _respond(send, 200, msg.encode(), [(b"content-type", b"text/plain; charset=utf-8")])

    async def _unload_lora(self, scope: Scope, body: bytes, send: Send) -> None:
        name = self._lora_body(body).get("lora_name")
        if not name:
            raise _HTTPError(
                400, "'lora_name' needs to be provided to unload a LoRA adapter.", "InvalidUserInput"
            )
        if name not in self.adapters:
            raise _HTTPError(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
        del self.adapters[name]
        msg = f"Success: LoRA adapter '{name}' removed successfully."
        await _respond(send, 200, msg.encode(), [(b"content-type", b"text/plain; charset=utf-8")])


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif msg["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            break
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body"):
            break
    return b"".join(chunks)


async def _respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _chunk(send: Send, data: bytes) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": True})


# -- running it --------------------------------------------------------------------------------


def serve_in_thread(
    config: UpstreamConfig | None = None, host: str = "127.0.0.1"
) -> AbstractContextManager[str]:
    """Run a :class:`FastUpstream` in a background thread on a free port; yields its base URL."""
    from loadtest.servers.serving import serve_in_thread as serve

    return serve(FastUpstream(config), host=host)


def serve_in_subprocess(
    *args: str, host: str = "127.0.0.1", port: int | None = None
) -> AbstractContextManager[str]:
    """Run ``python -m loadtest.servers.fast_upstream`` in its own process (own GIL); yields its URL.

    ``args`` are extra command-line options, e.g. ``"--itl-ms", "5"``.
    """
    from loadtest.servers.serving import free_port
    from loadtest.servers.serving import serve_in_subprocess as serve

    port = port or free_port(host)
    argv = [sys.executable, "-m", MODULE, "--host", host, "--port", str(port), *args]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    return serve(argv, f"http://{host}:{port}", env={**os.environ, "PYTHONPATH": path})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--served-model-name", default="base")
    p.add_argument("--strict-models", action="store_true", help="404 for unknown models, as vLLM does")
    p.add_argument("--default-max-tokens", type=int, default=16)
    p.add_argument("--ttft-ms", type=float, default=0.0, help="delay before the first token")
    p.add_argument("--itl-ms", type=float, default=0.0, help="delay between tokens")
    p.add_argument("--load-delay-ms", type=float, default=0.0, help="time a LoRA load takes")
    p.add_argument("--log-level", default="warning")
    a = p.parse_args(argv)
    config = UpstreamConfig(
        served_model_name=a.served_model_name,
        strict_models=a.strict_models,
        default_max_tokens=a.default_max_tokens,
        ttft_ms=a.ttft_ms,
        itl_ms=a.itl_ms,
        load_delay_ms=a.load_delay_ms,
    )
    import uvicorn

    uvicorn.run(
        FastUpstream(config),
        host=a.host,
        port=a.port,
        log_level=a.log_level,
        access_log=False,
        lifespan="on",
        server_header=False,
    )


if __name__ == "__main__":
    main()
