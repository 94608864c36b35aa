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
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi.responses import Response

from gateway.engines.client import EngineClient, EngineResponse
from gateway.errors import GatewayError, from_upstream, sse_error_event
from gateway.relay.client import EXTENSION, ClientSocket

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


class ResponsesSseRewriter(SseRewriter):
    """The Responses API's events (`event: response.created` then its `data: {...}` line), rewritten for
    the client: the model is put back in the `response` object of every event that carries one (the same
    byte replacement), and the usage is read from the `response` of the event that ends the stream
    (`response.completed`, `.incomplete`, `.failed`) as prompt/completion tokens. Nothing is dropped: the
    Responses API always reports usage. Chosen once per request, so the chat/completions path is unchanged.
    """

    def __init__(self, engine_model: str, requested: str) -> None:
        super().__init__(engine_model, requested)

    def _events(self, data: bytes) -> bytes:
        if b'"usage":{' in data:
            for event in data.split(b"\n\n"):
                if b'"usage":{' in event:
                    self.usage = responses_event_usage(event) or self.usage
        return data.replace(self.old, self.new) if self.rewrite else data


def responses_usage(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """A Responses API `usage` (`input_tokens`, `output_tokens`, `total_tokens`) in the names the gateway
    counts by (`prompt_tokens`, `completion_tokens`, `total_tokens`); None stays None."""
    if usage is None:
        return None
    return {
        "prompt_tokens": usage.get("input_tokens"),
        "completion_tokens": usage.get("output_tokens"),
        "total_tokens": usage.get("total_tokens"),
    }


def responses_event_usage(event: bytes) -> dict[str, Any] | None:
    """The usage of one Responses API event, from its `response` object; None if it has none."""
    at = event.find(b"data: ")
    if at < 0:
        return None
    try:
        body = json.loads(event[at + 6 :])
    except ValueError:
        return None
    response = body.get("response") if isinstance(body, dict) else None
    return responses_usage(_usage(response))


def responses_body_usage(content: bytes) -> dict[str, Any] | None:
    """The usage of a non-streamed Responses API answer, as prompt/completion tokens."""
    return responses_usage(body_usage(content))


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
    usage_of: Callable[[bytes], dict[str, Any] | None] = body_usage,
) -> Response:
    """Non-streaming: the engine's JSON bytes, `model` put back by an exact byte replacement; `usage_of`
    reads the answer's usage (`responses_body_usage` for the Responses API).

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
    finish(response.status_code, None, usage_of(payload))
    out_headers = {"x-request-id": headers["x-request-id"]} if "x-request-id" in headers else {}
    return Response(
        payload, status_code=response.status_code, media_type="application/json", headers=out_headers
    )


class _Relay:
    """One engine stream relayed to one client: the `Sink` its body chunks are handed to.

    Called from the engine connection's read callback (gateway/relay/engine.py), it rewrites each
    chunk and hands it to `write`: the client's socket directly (gateway/relay/client.py), or a queue
    that the response's task sends as ASGI messages. `end` and the client's departure settle `done`;
    `close()` runs exactly once on every path and records the request.
    """

    __slots__ = (
        "stream",
        "rewriter",
        "finish",
        "on_first_chunk",
        "started",
        "first",
        "write",
        "done",
        "error",
        "closed",
    )

    def __init__(
        self,
        stream: EngineResponse,
        rewriter: SseRewriter,
        finish: Finish,
        on_first_chunk: Callable[[float], None],
        started: float,
    ) -> None:
        self.stream = stream
        self.rewriter = rewriter
        self.finish = finish
        self.on_first_chunk = on_first_chunk
        self.started = started
        self.first = True
        self.write: Callable[[bytes], None] = _nowhere
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.error: str | None = "client_disconnected"  # until the stream ends by itself
        self.closed = False

    def data(self, chunk: bytes) -> None:
        if self.first:
            self.first = False
            self.on_first_chunk(time.perf_counter() - self.started)
        out = self.rewriter.feed(chunk)
        if out:
            self.write(out)

    def end(self, error: GatewayError | None) -> None:
        # What the rewriter holds is an event not yet ended by its blank line. A stream that ended by
        # itself sends it as it is; a broken one drops it: half an event glued to the error event would
        # be one unparseable line for the client.
        tail = self.rewriter.flush()
        if tail and error is None:
            self.write(tail)
        if error is None:
            self.error = None
        else:
            self.error = error.code
            self.write(sse_error_event(error))
        if not self.done.done():
            self.done.set_result(None)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.stream.close()  # mid-stream this drops the connection: vLLM aborts the request
        status = self.stream.status_code
        if self.error == "client_disconnected":
            status = 499
        elif self.error is not None:
            status = 502
        self.finish(status, self.error, self.rewriter.usage)


def _nowhere(_: bytes) -> None:
    pass


async def _pump(response: EngineResponse, relay: _Relay) -> None:
    """For an engine client whose responses only iterate (tests/fake_engine.py): chunks into the relay."""
    try:
        async for chunk in response.iter_chunks():
            relay.data(chunk)
    except GatewayError as exc:
        relay.end(exc)
    else:
        relay.end(None)


ASGI_QUEUE_HIGH = 256 * 1024  # bytes waiting for ASGI send before reading from the engine pauses


class RelayResponse(Response):
    """Relays one engine stream to the client; closes the engine's side on every path.

    The start and the end of the response go through ASGI `send`. The body goes to the client's socket
    from the engine connection's read callback when the server offers it (gateway/relay/client.py: no task
    wakes per chunk), else through `send`, one message per batch of chunks that arrived together. One
    plain asyncio task waits for `http.disconnect` (uvicorn says it once the client is gone) and ends the
    relay: the engine connection is dropped (vLLM aborts the generation) and the request is a 499.
    """

    media_type = "text/event-stream"

    def __init__(self, relay: _Relay, headers: dict[str, str]) -> None:
        # Not Response.__init__: a body (even empty) would bring a content-length; this one is chunked.
        self.status_code = 200
        self.background = None
        self.init_headers(headers)
        self.relay = relay

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        relay = self.relay
        socket: ClientSocket | None = scope.get("extensions", {}).get(EXTENSION)
        watcher: asyncio.Task[None] | None = None
        try:
            start = {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            await send(start)
            watcher = asyncio.create_task(_departure(receive))
            attach = getattr(relay.stream, "attach", None)
            if socket is not None and attach is not None and socket.usable():
                await self._to_socket(socket, attach, watcher)
            else:
                await self._through_send(send, attach, watcher)
            if relay.error != "client_disconnected":
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the connection broke under a write: the client is gone too
        finally:
            if watcher is not None:
                watcher.cancel()
            if socket is not None:
                socket.release()
            relay.close()

    async def _to_socket(
        self, socket: ClientSocket, attach: Callable[[Any], None], watcher: asyncio.Task[None]
    ) -> None:
        relay, stream = self.relay, self.relay.stream

        def write(data: bytes) -> None:
            if socket.gone:
                if not relay.done.done():
                    relay.done.set_result(None)  # the client left: close() will say 499
                return
            socket.write(data)

        relay.write = write
        socket.on_pause = stream.pause_reading  # type: ignore[attr-defined]
        socket.on_resume = stream.resume_reading  # type: ignore[attr-defined]
        if socket.paused:
            stream.pause_reading()  # type: ignore[attr-defined]
        attach(relay)
        await asyncio.wait((relay.done, watcher), return_when=asyncio.FIRST_COMPLETED)

    async def _through_send(
        self, send: Any, attach: Callable[[Any], None] | None, watcher: asyncio.Task[None]
    ) -> None:
        relay, stream = self.relay, self.relay.stream
        loop = asyncio.get_running_loop()
        pending: list[bytes] = []
        size = 0
        paused = False
        ready: asyncio.Future[None] | None = None

        def wake(_: object = None) -> None:
            if ready is not None and not ready.done():
                ready.set_result(None)

        def write(data: bytes) -> None:
            nonlocal size, paused
            pending.append(data)
            size += len(data)
            if size > ASGI_QUEUE_HIGH and not paused and attach is not None:
                paused = True
                stream.pause_reading()  # type: ignore[attr-defined]
            wake()

        relay.write = write
        relay.done.add_done_callback(wake)
        watcher.add_done_callback(wake)
        pump = None
        if attach is not None:
            attach(relay)
        else:
            pump = asyncio.create_task(_pump(stream, relay))
        try:
            while not watcher.done():
                if not pending:
                    if relay.done.done():
                        return
                    ready = loop.create_future()
                    await ready
                    continue
                batch = b"".join(pending)
                pending.clear()
                size = 0
                await send({"type": "http.response.body", "body": batch, "more_body": True})
                if paused:
                    paused = False
                    stream.resume_reading()  # type: ignore[attr-defined]
        finally:
            if pump is not None:
                pump.cancel()


async def _departure(receive: Receive) -> None:
    """Returns when the client has left (ASGI `http.disconnect`)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def forward_stream(
    client: EngineClient,
    url: str,
    content: bytes,
    headers: dict[str, str],
    rewriter: SseRewriter,
    finish: Finish,
    on_first_chunk: Callable[[float], None],
) -> Response:
    started = time.perf_counter()
    response = await client.stream("POST", url, content=content, headers=headers)
    if response.status_code >= 400:
        body = await response.read()
        raise from_upstream(response.status_code, body)
    out_headers = {"cache-control": "no-cache", "x-accel-buffering": "no"}
    if "x-request-id" in headers:
        out_headers["x-request-id"] = headers["x-request-id"]
    return RelayResponse(_Relay(response, rewriter, finish, on_first_chunk, started), out_headers)
