"""The protocol-level streaming connections to engines (gateway/relay/engine.py), against real asyncio
servers on loopback: keep-alive reuse, error bodies, a stream that breaks, a reused connection the engine
had closed, a full pool, a refused port, and an attached sink that sees every event in order."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import pytest

from gateway.errors import EngineUnavailableError, EngineUnreachableError, GatewayError, UpstreamError
from gateway.relay.engine import EngineStreams

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _pool(max_connections: int = 4, pool_s: float = 2.0, read_s: float = 5.0) -> EngineStreams:
    return EngineStreams(
        max_connections=max_connections,
        connect_s=2.0,
        read_s=read_s,
        pool_s=pool_s,
        retry_after_s=1,
        headers_for=lambda _url, headers: headers,
    )


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(v) for k, _, v in (h.partition(b": ") for h in head.split(b"\r\n")) if k == b"content-length"
    )
    return head + await reader.readexactly(length)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


class Collect:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.ended: asyncio.Future[GatewayError | None] = asyncio.get_running_loop().create_future()

    def data(self, chunk: bytes) -> None:
        self.chunks.append(chunk)

    def end(self, error: GatewayError | None) -> None:
        self.ended.set_result(error)


async def _serve(handler: Handler) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/v1/completions"


def test_streams_reuse_one_connection_and_the_sink_gets_every_event_in_order() -> None:
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            try:
                await _read_request(reader)
            except asyncio.IncompleteReadError:
                return
            writer.write(SSE_HEAD)
            for i in range(20):
                writer.write(_chunk(b"data: %d\n\n" % i))
                await writer.drain()
                await asyncio.sleep(0.001)
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    async def go() -> None:
        server, url = await _serve(handler)
        pool = _pool()
        for _ in range(3):
            stream = await pool.send(url, content=b"{}", headers={"content-type": "application/json"})
            assert stream.status_code == 200 and stream.headers["content-type"] == "text/event-stream"
            sink = Collect()
            stream.attach(sink)
            assert await asyncio.wait_for(sink.ended, 5) is None
            stream.close()
            assert b"".join(sink.chunks) == b"".join(b"data: %d\n\n" % i for i in range(20))
        assert connections == 1  # kept alive and reused
        pool.close()
        server.close()

    asyncio.run(go())


def test_an_error_answer_is_read_whole_and_a_broken_stream_ends_the_sink_with_an_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await _read_request(reader)
        if b"bad" in request:
            body = b'{"error": {"message": "no such model", "code": 404}}'
            writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body))
        else:
            writer.write(SSE_HEAD + _chunk(b"data: 1\n\n"))
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.close()  # a stream that stops without its last chunk

    async def go() -> None:
        server, url = await _serve(handler)
        pool = _pool()
        error = await pool.send(url, content=b'{"bad": 1}', headers=None)
        assert error.status_code == 404 and b"no such model" in await error.read()
        stream = await pool.send(url, content=b"{}", headers=None)
        sink = Collect()
        stream.attach(sink)
        ended = await asyncio.wait_for(sink.ended, 5)
        assert isinstance(ended, UpstreamError) and sink.chunks == [b"data: 1\n\n"]
        stream.close()
        pool.close()
        server.close()

    asyncio.run(go())


def test_a_reused_connection_the_engine_closed_is_sent_again_on_a_new_one() -> None:
    served = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        await _read_request(reader)
        served += 1
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()  # keep-alive promised, then closed while idle (an engine restart, an idle timeout)

    async def go() -> None:
        server, url = await _serve(handler)
        pool = _pool()
        first = await pool.send(url, content=b"{}", headers=None)
        assert await first.read() == b"ok"
        await asyncio.sleep(0.2)  # the engine has closed the idle connection by now
        second = await pool.send(url, content=b"{}", headers=None)
        assert await second.read() == b"ok" and served == 2
        pool.close()
        server.close()

    asyncio.run(go())


def test_a_full_pool_is_overloaded_and_a_closed_port_is_refused() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(SSE_HEAD)
        await writer.drain()
        await asyncio.sleep(10)

    async def go() -> None:
        server, url = await _serve(handler)
        pool = _pool(max_connections=1, pool_s=0.2)
        held = await pool.send(url, content=b"{}", headers=None)
        with pytest.raises(EngineUnavailableError) as busy:
            await pool.send(url, content=b"{}", headers=None)
        assert busy.value.code == "overloaded"
        held.close()  # the slot comes back at once
        again = await pool.send(url, content=b"{}", headers=None)
        again.close()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        with pytest.raises(EngineUnreachableError) as refused:
            await pool.send(f"http://127.0.0.1:{port}/v1/completions", content=b"{}", headers=None)
        assert refused.value.refused
        pool.close()
        server.close()

    asyncio.run(go())


def test_closing_mid_stream_drops_the_connection_so_the_engine_sees_the_client_leave() -> None:
    gone = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(SSE_HEAD + _chunk(b"data: 1\n\n"))
        await writer.drain()
        if await reader.read(1) == b"":  # EOF: the gateway hung up, as vLLM notices before aborting
            gone.set()

    async def go() -> None:
        server, url = await _serve(handler)
        pool = _pool()
        stream = await pool.send(url, content=b"{}", headers=None)
        sink = Collect()
        stream.attach(sink)
        await asyncio.sleep(0.05)
        stream.close()
        await asyncio.wait_for(gone.wait(), 2)
        assert not sink.ended.done()  # a closed stream tells its sink nothing more
        pool.close()
        server.close()

    asyncio.run(go())


def test_a_connection_whose_handle_closed_under_it_is_retried_or_a_502_never_a_500() -> None:
    """uvloop closes a transport's handle when the peer resets it and runs connection_lost later: a write
    in between raises RuntimeError (seen in the replica-kill test: seven 500s). The race is stood in for by
    a transport whose write raises that error; the pool's answer to it is what is tested."""
    served = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        while True:
            try:
                await _read_request(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            served += 1
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()

    class ClosedUnderIt:
        def __init__(self, real: asyncio.BaseTransport) -> None:
            self.real = real

        def __getattr__(self, name: str) -> object:
            return getattr(self.real, name)

        def is_closing(self) -> bool:
            return False  # connection_lost has not run yet

        def write(self, data: bytes) -> None:
            raise RuntimeError(
                "unable to perform operation on <TCPTransport closed=True>; the handler is closed"
            )

    async def go() -> None:
        server, url = await _serve(handler)
        pool = _pool()
        first = await pool.send(url, content=b"{}", headers=None)
        assert await first.read() == b"ok"
        [idle] = list(pool._idle.values())
        idle[0].transport = ClosedUnderIt(idle[0].transport)  # type: ignore[assignment]
        second = await pool.send(url, content=b"{}", headers=None)  # the idle one: sent again on a new one
        assert await second.read() == b"ok" and served == 2

        real_connection = pool._connection

        async def fresh_but_closed(*args: object) -> object:
            conn = await real_connection(*args)  # type: ignore[arg-type]
            conn.reused = False
            conn.transport = ClosedUnderIt(conn.transport)  # type: ignore[assignment]
            return conn

        pool._connection = fresh_but_closed  # type: ignore[method-assign, assignment]
        with pytest.raises(UpstreamError) as info:
            await pool.send(url, content=b"{}", headers=None)
        assert info.value.code == "upstream_error", "a failed connection: the request goes to another replica"
        pool._connection = real_connection  # type: ignore[method-assign]
        third = await pool.send(url, content=b"{}", headers=None)
        assert await third.read() == b"ok", "the pool slot was given back"
        pool.close()
        server.close()

    asyncio.run(go())
