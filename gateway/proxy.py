"""Forwarding one validated inference request to an engine and its answer back to the client.

Non-streaming: one upstream call, the JSON answer passed on (its `model` set back to what the client
asked for); a client that leaves before the answer is ready drops the upstream call, so vLLM aborts.
Streaming: the engine's SSE bytes are passed on as they arrive, never buffered whole; when the client
goes away the upstream response is closed, so vLLM aborts the generation. An error after the first
byte is sent as one `data: {"error": ...}` event, then the stream ends.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

from fastapi.responses import Response, StreamingResponse

from gateway.engines.client import EngineClient, EngineResponse
from gateway.errors import GatewayError, from_upstream, sse_error_event

Finish = Callable[[int, str | None, dict[str, Any] | None], None]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]  # ASGI's receive


def model_rewrite(engine_model: str, requested: str) -> tuple[bytes, bytes]:
    """The bytes vLLM writes for its model name, and what the client must see instead."""
    return b'"model":' + json.dumps(engine_model).encode(), b'"model":' + json.dumps(requested).encode()


class SseRewriter:
    """Rewrites the engine's SSE events for the client, whole events at a time.

    - puts the client's `model` back (vLLM knows adapters by digest; it writes compact JSON, so a byte
      replacement of `"model":"<engine name>"` is exact);
    - reads the usage event (the gateway asks for one on every stream, for its token metrics) and drops
      it when the client did not ask for it itself.

    Events are split on blank lines, so a pattern cut by a TCP chunk boundary is never missed.
    """

    def __init__(self, engine_model: str, requested: str, *, drop_usage: bool = False) -> None:
        self.rewrite = engine_model != requested
        self.drop_usage = drop_usage
        self.old, self.new = model_rewrite(engine_model, requested)
        self.usage: dict[str, Any] | None = None
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._pending + chunk
        cut = data.rfind(b"\n\n")
        if cut < 0:
            self._pending = data
            return b""
        self._pending = data[cut + 2 :]
        return self._events(data[: cut + 2])

    def flush(self) -> bytes:
        rest, self._pending = self._pending, b""
        return self._events(rest) if rest else b""

    def _events(self, data: bytes) -> bytes:
        if b'"usage":{' in data:
            kept = []
            for event in data.split(b"\n\n"):
                if b'"usage":{' in event and event.startswith(b"data: {"):
                    usage = _event_usage(event)
                    self.usage = usage or self.usage
                    if self.drop_usage and b'"choices":[]' in event:
                        continue
                kept.append(event)
            data = b"\n\n".join(kept)
        return data.replace(self.old, self.new) if self.rewrite else data


def _event_usage(event: bytes) -> dict[str, Any] | None:
    try:
        return _usage(json.loads(event[6:]))
    except ValueError:
        return None


def _usage(body: Any) -> dict[str, Any] | None:
    usage = body.get("usage") if isinstance(body, dict) else None
    return usage if isinstance(usage, dict) else None


_DECODER = json.JSONDecoder()


def body_usage(content: bytes) -> dict[str, Any] | None:
    """The `usage` object of a completion body, decoded alone (the body itself is never parsed)."""
    at = content.rfind(b'"usage":{')
    if at < 0:
        return None
    try:
        usage, _ = _DECODER.raw_decode(content[at + 8 :].decode("utf-8", "replace"))
    except ValueError:
        return None
    return usage if isinstance(usage, dict) else None


async def forward_json(
    client: EngineClient,
    url: str,
    content: bytes,
    headers: dict[str, str],
    rewrite: tuple[bytes, bytes] | None,
    finish: Finish,
    receive: Receive | None = None,
) -> Response:
    """Non-streaming: the engine's JSON bytes, `model` put back by an exact byte replacement.

    vLLM writes compact JSON, so `"model":"<engine name>"` appears exactly as built in `SseRewriter`.
    While vLLM generates, `receive` (the client's ASGI channel, its body already read) is watched: a
    client that leaves cancels the exchange, the upstream connection is dropped, vLLM aborts the
    generation, and the request is recorded as 499 (nobody reads the answer).
    """
    exchange = asyncio.current_task()
    left = False

    async def watch(receive: Receive, exchange: asyncio.Task[Any]) -> None:
        nonlocal left
        while (await receive())["type"] != "http.disconnect":
            pass
        left = True
        exchange.cancel()

    watcher = None if receive is None or exchange is None else asyncio.create_task(watch(receive, exchange))
    response: EngineResponse | None = None
    try:
        response = await client.send("POST", url, content=content, headers=headers)
        payload = await response.read()
    except asyncio.CancelledError:
        if not left or exchange is None:
            raise
        exchange.uncancel()  # our own cancel: the client left, nothing is wrong
        if response is not None:
            response.close()
        finish(499, "client_disconnected", None)
        return Response(status_code=499)
    finally:
        if watcher is not None:
            watcher.cancel()
    if response.status_code >= 400:
        raise from_upstream(response.status_code, payload)
    if rewrite is not None:
        payload = payload.replace(rewrite[0], rewrite[1], 1)
    finish(response.status_code, None, body_usage(payload))
    out_headers = {"x-request-id": headers["x-request-id"]} if "x-request-id" in headers else {}
    return Response(
        payload, status_code=response.status_code, media_type="application/json", headers=out_headers
    )


class _Relay:
    """One upstream SSE response relayed to one client; `close()` runs exactly once on every path."""

    def __init__(
        self,
        response: EngineResponse,
        rewriter: SseRewriter,
        finish: Finish,
        on_first_chunk: Callable[[float], None],
        started: float,
    ) -> None:
        self.response = response
        self.rewriter = rewriter
        self.finish = finish
        self.on_first_chunk = on_first_chunk
        self.started = started
        self.error: str | None = "client_disconnected"  # until the stream ends by itself
        self.closed = False

    async def body(self) -> AsyncIterator[bytes]:
        first = True
        try:
            async for chunk in self.response.iter_chunks():
                if first:
                    first = False
                    self.on_first_chunk(time.perf_counter() - self.started)
                out = self.rewriter.feed(chunk)
                if out:
                    yield out
            tail = self.rewriter.flush()
            if tail:
                yield tail
            self.error = None
        except GatewayError as exc:
            self.error = exc.code
            yield sse_error_event(exc)
        finally:
            await self.close()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.response.close()  # drops the connection mid-stream: vLLM aborts the request
        status = self.response.status_code
        if self.error == "client_disconnected":
            status = 499
        elif self.error is not None:
            status = 502
        self.finish(status, self.error, self.rewriter.usage)


class RelayResponse(StreamingResponse):
    """Relays one upstream SSE stream to the client; closes the upstream on every path.

    Starlette's `StreamingResponse` watches for the client leaving with an anyio task group (the
    server speaks ASGI 2.3), which costs more than the rest of relaying a short stream. Here one
    plain asyncio task waits for `http.disconnect` and cancels the relay, which then closes the
    upstream response (vLLM aborts the generation) and records the request as 499.
    """

    def __init__(self, relay: _Relay, headers: dict[str, str]) -> None:
        super().__init__(relay.body(), media_type="text/event-stream", headers=headers)
        self.relay = relay

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        relaying = asyncio.current_task()
        client_left = done = False

        async def watch() -> None:
            nonlocal client_left
            # The server also says http.disconnect once the response is complete: not a departure.
            while (await receive())["type"] != "http.disconnect":
                pass
            if not done and relaying is not None:
                client_left = True
                relaying.cancel()

        watcher = asyncio.create_task(watch())
        try:
            await self.stream_response(send)
            done = True  # set before this task can yield to the watcher again
        except asyncio.CancelledError:
            if not client_left or relaying is None:
                raise
            relaying.uncancel()  # our own cancel: the client left, nothing is wrong
        except OSError:
            pass  # the connection broke under a write: the client is gone too
        finally:
            watcher.cancel()
            await self.relay.close()


async def forward_stream(
    client: EngineClient,
    url: str,
    content: bytes,
    headers: dict[str, str],
    rewriter: SseRewriter,
    finish: Finish,
    on_first_chunk: Callable[[float], None],
) -> StreamingResponse:
    started = time.perf_counter()
    response = await client.send("POST", url, content=content, headers=headers)
    if response.status_code >= 400:
        body = await response.read()
        raise from_upstream(response.status_code, body)
    out_headers = {"cache-control": "no-cache", "x-accel-buffering": "no"}
    if "x-request-id" in headers:
        out_headers["x-request-id"] = headers["x-request-id"]
    return RelayResponse(_Relay(response, rewriter, finish, on_first_chunk, started), out_headers)
