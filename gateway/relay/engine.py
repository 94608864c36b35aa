"""Streaming requests to the engines over HTTP/1.1 at the protocol level: no task, future or await per chunk.

A stream is one `EngineStream`: an `asyncio.Protocol` on a pooled keep-alive connection, with httptools'
response parser (C, the parser uvicorn uses) calling back on each decoded body chunk. `send()` returns once
the status and headers are in; then `attach(sink)` hands every further body chunk straight to the sink
from the event loop's read callback, so relaying a chunk costs one read, one parse and the sink's work.

    pool: every connection in use counts against `max_connections`; a wait longer than `pool_s` -> 503
          `overloaded` + Retry-After (the engine is fine, only busy), as gateway/upstream.py does
    connect refused                            -> EngineUnreachableError(refused=True), 502
    connect slower than `connect_s`            -> EngineUnreachableError, 502
    no status line within `read_s`; a body silent longer than `read_s` -> UpstreamTimeoutError, 504
    connection lost before the response ends   -> UpstreamError, 502 (a mid-stream one reaches the sink)
    a reused idle connection the engine had closed before answering: sent once more on a new one

A connection goes back to the pool only after a complete response the engine will keep alive; `close()`
mid-stream drops it, which tells vLLM the client is gone, so it aborts the generation.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Protocol
from urllib.parse import urlsplit

import httptools

from gateway.errors import (
    EngineUnavailableError,
    EngineUnreachableError,
    GatewayError,
    UpstreamError,
    UpstreamTimeoutError,
)


class Sink(Protocol):
    """Where an attached stream's body goes; called from the event loop's read callbacks."""

    def data(self, chunk: bytes) -> None: ...

    def end(self, error: GatewayError | None) -> None:
        """The body is complete (None), or the stream broke (the error); called exactly once."""
        ...


class _Buffer:
    """The sink until one is attached: chunks and the end kept in order."""

    __slots__ = ("chunks", "ended", "error", "waiter")

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.ended = False
        self.error: GatewayError | None = None
        self.waiter: asyncio.Future[None] | None = None

    def data(self, chunk: bytes) -> None:
        self.chunks.append(chunk)

    def end(self, error: GatewayError | None) -> None:
        self.ended, self.error = True, error
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


class EngineStream:
    """One streamed response: status and headers in; the body read whole, attached to a sink, or iterated.

    Its connection is its own until the response is over (complete, broken, or closed); from then on
    nothing done to it reaches the connection, which may already carry another request.
    """

    __slots__ = ("status_code", "headers", "what", "sink", "head", "ended", "_conn", "_on_done")

    def __init__(self, conn: _Connection, what: str) -> None:
        self.status_code = 0
        self.headers: dict[str, str] = {}
        self.what = what
        self.sink: Sink = _Buffer()
        self.head: asyncio.Future[None] = conn.loop.create_future()
        self.ended = False
        self._conn: _Connection | None = conn
        self._on_done: Callable[[], None] | None = None  # gives the pool slot back

    async def read(self) -> bytes:
        """The whole body (an error's): buffered until the end."""
        buffer = self.sink
        assert isinstance(buffer, _Buffer), "read() after attach()"
        if not buffer.ended:
            buffer.waiter = asyncio.get_running_loop().create_future()
            await buffer.waiter
        self._release()
        if buffer.error is not None:
            raise buffer.error
        return b"".join(buffer.chunks)

    def attach(self, sink: Sink) -> None:
        """From now on every body chunk goes to `sink` as it is parsed; what came before goes first."""
        buffer = self.sink
        assert isinstance(buffer, _Buffer), "attach() twice"
        self.sink = sink
        for chunk in buffer.chunks:
            sink.data(chunk)
        if buffer.ended:
            self._release()
            sink.end(buffer.error)

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body chunk by chunk (the relay attaches instead; this is for other callers)."""
        queue: asyncio.Queue[bytes | GatewayError | None] = asyncio.Queue()

        class _Queue:
            def data(self, chunk: bytes) -> None:
                queue.put_nowait(chunk)

            def end(self, error: GatewayError | None) -> None:
                queue.put_nowait(error)

        self.attach(_Queue())
        while (item := await queue.get()) is not None:
            if isinstance(item, GatewayError):
                raise item
            yield item

    def pause_reading(self) -> None:
        if self._conn is not None:
            self._conn.pause_reading()

    def resume_reading(self) -> None:
        if self._conn is not None:
            self._conn.resume_reading()

    def close(self) -> None:
        """Done with it: mid-stream the connection is dropped (vLLM aborts the request), and the sink
        hears nothing more; after the end, the connection goes back to the pool if it can."""
        self.sink = _Buffer()
        conn = self._conn
        if conn is not None and not self.ended:
            self.ended = True
            conn.keep = False
        self._release()

    def _release(self) -> None:
        """The response is over for its caller: the connection back to the pool or closed, the slot freed."""
        conn, self._conn = self._conn, None
        done, self._on_done = self._on_done, None
        if done is not None:
            done()
        if conn is not None:
            conn.finished(self)


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection to an engine, carrying one `EngineStream` at a time."""

    def __init__(self, pool: EngineStreams, origin: str) -> None:
        self.pool, self.origin = pool, origin
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: EngineStream | None = None
        self.received = False  # any byte of the current response
        self.lost = False
        self.keep = False
        self.reused = False
        self._parts: list[bytes] = []  # body chunks parsed from the current read, handed over together
        self._timer: asyncio.TimerHandle | None = None
        self._last_read = 0.0

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received = True
        self._last_read = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"The engine sent a malformed response: {exc}"))
        if self._parts:
            self._hand_over()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.keep = False
        response = self.response
        if response is not None and not response.ended:
            self._fail(UpstreamError(f"The {response.what} closed the connection before the response ended."))
        elif response is None:
            self.pool._forget(self)

    # -- httptools callbacks (inside feed_data)
    def on_header(self, name: bytes, value: bytes) -> None:
        if self.response is not None:
            self.response.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        response = self.response
        if response is not None:
            response.status_code = self.parser.get_status_code()
            if not response.head.done():
                response.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self._parts.append(body)  # several events in one read become one write to the client

    def _hand_over(self) -> None:
        parts, self._parts = self._parts, []
        if self.response is not None:
            self.response.sink.data(parts[0] if len(parts) == 1 else b"".join(parts))

    def on_message_complete(self) -> None:
        if self._parts:
            self._hand_over()
        response = self.response
        self._stop_timer()
        if response is None or response.ended:
            return
        response.ended = True
        self.keep = self.parser.should_keep_alive() and not self.lost
        sink = response.sink
        if not isinstance(sink, _Buffer):
            response._release()  # attached: the connection is free as soon as the body is in
        sink.end(None)  # a buffer: its reader gives the connection back once it has read it

    # -- for the pool and the response
    def start(self, request: bytes, read_s: float, what: str) -> EngineStream:
        self.parser = httptools.HttpResponseParser(self) if self.reused else self.parser
        response = self.response = EngineStream(self, what)
        self.received = self.keep = False
        self._last_read = self.loop.time()
        self._timer = self.loop.call_at(self._last_read + read_s, self._check_silence, read_s)
        assert self.transport is not None
        try:
            self.transport.write(request)
        except RuntimeError as exc:  # uvloop: the peer closed it, and connection_lost has not run yet
            self._stop_timer()
            self.response, self.lost = None, True
            self.pool._forget(self)
            raise UpstreamError(f"The {what} connection failed: it was closed ({exc}).") from exc
        return response

    def finished(self, response: EngineStream) -> None:
        if self.response is not response:
            return
        self.response = None
        self._stop_timer()
        if self.keep and not self.lost and self.transport is not None and not self.transport.is_closing():
            self.pool._idle[self.origin].append(self)
            return
        self.pool._forget(self)
        if self.transport is not None:
            self.transport.close()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.resume_reading()

    def _check_silence(self, read_s: float) -> None:
        due = self._last_read + read_s
        if self.loop.time() < due:
            self._timer = self.loop.call_at(due, self._check_silence, read_s)
            return
        self._timer = None
        what = self.response.what if self.response is not None else "engine"
        self._fail(UpstreamTimeoutError(f"The {what} sent nothing for {read_s:g} s."))

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fail(self, error: GatewayError) -> None:
        if self._parts:
            self._hand_over()
        response = self.response
        self._stop_timer()
        self.keep = False
        if response is None or response.ended:
            return
        response.ended = True
        if not response.head.done():
            response.head.set_exception(error)
            response.head.exception()  # retrieved here: its waiter may be gone (cancelled)
            return
        sink = response.sink
        if not isinstance(sink, _Buffer):
            response._release()
        sink.end(error)


class EngineStreams:
    """The pool of streaming connections, all engines together (keep-alive, per origin)."""

    def __init__(
        self,
        *,
        max_connections: int,
        connect_s: float,
        read_s: float,
        pool_s: float,
        retry_after_s: int,
        headers_for: Callable[[str, Mapping[str, str] | None], Mapping[str, str] | None],
    ) -> None:
        self.max_connections = max_connections
        self.connect_s, self.read_s, self.pool_s = connect_s, read_s, pool_s
        self.retry_after_s = retry_after_s
        self.headers_for = headers_for  # adds the engine's key (gateway/upstream.py)
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: dict[str, collections.deque[_Connection]] = collections.defaultdict(collections.deque)
        self._open: set[_Connection] = set()

    async def send(
        self, url: str, *, content: bytes, headers: Mapping[str, str] | None, what: str = "engine"
    ) -> EngineStream:
        """POST `content`; return once the status and headers are in. The caller then reads the body,
        attaches a sink, or closes the stream; its pool slot is held until one of those ends it."""
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None:
            raise UpstreamError(f"Only http:// engines stream at the protocol level, not {url!r}.")
        port = parts.port or 80
        origin = f"{parts.hostname}:{port}"
        request = _request(parts.path or "/", parts.query, origin, content, self.headers_for(url, headers))
        try:
            await asyncio.wait_for(self._slots.acquire(), self.pool_s)
        except TimeoutError:
            raise EngineUnavailableError(
                f"All {self.max_connections} connections to the {what} are busy; try again.",
                retry_after_s=self.retry_after_s,
                code="overloaded",
            ) from None
        response: EngineStream | None = None
        try:
            for attempt in range(2):
                conn = await self._connection(origin, parts.hostname, port)
                try:
                    response = conn.start(request, self.read_s, what)
                except UpstreamError:
                    if conn.reused and attempt == 0:
                        continue  # an idle connection the engine had closed: nothing reached it
                    raise
                try:
                    await response.head
                except UpstreamTimeoutError:
                    raise UpstreamTimeoutError(f"The {what} did not answer in {self.read_s:g} s.") from None
                except UpstreamError:
                    if conn.reused and not conn.received and attempt == 0:
                        response.close()
                        continue  # the engine had closed this idle connection: nothing reached it
                    raise
                response._on_done = self._slots.release
                return response
            raise AssertionError("unreachable")
        except BaseException:
            if response is not None:
                response._on_done = None
                response.close()
            self._slots.release()
            raise

    async def _connection(self, origin: str, host: str, port: int) -> _Connection:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if not conn.lost and conn.transport is not None and not conn.transport.is_closing():
                conn.reused = True
                return conn
            self._open.discard(conn)
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self, origin), host, port), self.connect_s
            )
        except ConnectionRefusedError as exc:
            raise EngineUnreachableError(
                f"The engine is unreachable: {exc.__class__.__name__}.", refused=True
            ) from exc
        except (TimeoutError, OSError) as exc:
            raise EngineUnreachableError(f"The engine is unreachable: {exc.__class__.__name__}.") from exc
        self._open.add(conn)
        return conn

    def _forget(self, conn: _Connection) -> None:
        self._open.discard(conn)
        idle = self._idle.get(conn.origin)
        if idle is not None:
            with contextlib.suppress(ValueError):
                idle.remove(conn)

    def close(self) -> None:
        """At shutdown: every connection closed."""
        for conn in list(self._open):
            if conn.transport is not None:
                conn.transport.close()
        self._open.clear()
        self._idle.clear()


def _request(path: str, query: str, host: str, content: bytes, headers: Mapping[str, str] | None) -> bytes:
    target = f"{path}?{query}" if query else path
    lines = [f"POST {target} HTTP/1.1", f"host: {host}", f"content-length: {len(content)}"]
    for name, value in (headers or {}).items():
        low = name.lower()
        if low in ("host", "content-length", "connection", "transfer-encoding"):
            continue
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise UpstreamError(f"A header for the engine holds a line break: {name!r}.")
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + content
