"""gateway/upstream.py's load/unload calls against a loopback engine that hangs up on the first one (what
a kept-alive connection that vLLM closed as it was reused looks like: ServerDisconnectedError). The call is
sent again once (load and unload are idempotent to residency); a second hang-up is the error."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.errors import GatewayError
from gateway.settings import Settings
from gateway.upstream import UpstreamClient


class _HangsUp(asyncio.Protocol):
    def __init__(self, calls: list[str], hang_ups: int) -> None:
        self.calls, self.hang_ups = calls, hang_ups

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if b"\r\n\r\n" not in data:
            return
        self.calls.append("call")
        if len(self.calls) <= self.hang_ups:
            self.transport.close()  # read, never answered
            return
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")


@pytest.mark.parametrize(("hang_ups", "answered"), [(1, True), (2, False)])
def test_a_load_the_engine_hung_up_on_is_sent_again_once(
    tmp_path: Path, hang_ups: int, answered: bool
) -> None:
    async def main() -> list[str]:
        calls: list[str] = []
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _HangsUp(calls, hang_ups), "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        client = UpstreamClient(Settings(data_dir=tmp_path, engine={"mode": "attached", "url": url}))
        try:
            payload = {"lora_name": "x", "lora_path": "/x"}
            if answered:
                assert await client.post_json(url + "/v1/load_lora_adapter", payload) == b"ok"
            else:
                with pytest.raises(GatewayError):
                    await client.post_json(url + "/v1/load_lora_adapter", payload)
        finally:
            await client.aclose()
            server.close()
        return calls

    assert asyncio.run(main()) == ["call", "call"]


class _ClosesIdle(asyncio.Protocol):
    """Answers one request per connection and promises keep-alive; `close_idle` then closes the connections
    it answered, as vLLM's server does after its keep-alive timeout."""

    open: list[asyncio.Transport] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        _ClosesIdle.open.append(transport)

    def data_received(self, data: bytes) -> None:
        if b"\r\n\r\n" in data:
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")


def test_an_inference_call_on_a_connection_the_engine_closed_is_sent_again(tmp_path: Path) -> None:
    """The race seen in the replica-kill test: a healthy replica left out of routing for 5 s because a
    kept-alive connection it had closed was reused (ServerDisconnectedError). Sent again once instead."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_ClosesIdle, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        client = UpstreamClient(Settings(data_dir=tmp_path, engine={"mode": "attached", "url": url}))
        try:
            first = await client.send("POST", url + "/v1/completions", content=b"{}")
            assert await first.read() == b"ok"
            for transport in _ClosesIdle.open:
                transport.abort()  # the engine drops the idle connection; the client has not noticed yet
            second = await client.send("POST", url + "/v1/completions", content=b"{}")
            assert await second.read() == b"ok"
        finally:
            await client.aclose()
            server.close()

    asyncio.run(main())


def test_admin_calls_reuse_kept_alive_connections(tmp_path: Path) -> None:
    """Two loads on one kept-alive connection: the pool's trace hooks see a call without a trace context
    (a TypeError there was a 500 for every request that loaded an adapter, once)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_ClosesIdle, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        client = UpstreamClient(Settings(data_dir=tmp_path, engine={"mode": "attached", "url": url}))
        try:
            for _ in range(2):
                assert await client.post_json(url + "/v1/load_lora_adapter", {"lora_name": "x"}) == b"ok"
        finally:
            await client.aclose()
            server.close()

    asyncio.run(main())
