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
