"""The client's side of the relay: uvicorn's HTTP protocol, offering the client's socket to a stream relay.

`serve` runs uvicorn with `RelayHttpProtocol` (uvicorn's httptools protocol, which takes a protocol class as
`http=`). It adds one ASGI extension to each request's scope, `EXTENSION`: a `ClientSocket` through which a
streamed response's body chunks are written to the client's transport directly, in HTTP/1.1 chunked framing,
from the engine connection's read callback. The response's start and its end still go through ASGI `send`,
so uvicorn's own state (keep-alive, the closing chunk, its logging) stays whole. Backpressure: when the
client's socket buffer is full the relay pauses reading from the engine, and resumes when it drains.

Under any other ASGI server the extension is absent and the relay falls back to ASGI `send` per batch of
chunks (gateway/proxy.py), which behaves the same and costs more.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

EXTENSION = "lora_gateway.client_socket"


class ClientSocket:
    """One request's client connection, for writing a chunked body without ASGI messages."""

    __slots__ = ("_protocol", "_cycle", "on_pause", "on_resume")

    def __init__(self, protocol: RelayHttpProtocol, cycle: Any) -> None:
        self._protocol = protocol
        self._cycle = cycle
        self.on_pause: Callable[[], None] | None = None
        self.on_resume: Callable[[], None] | None = None

    def usable(self) -> bool:
        """True once the response has started with chunked framing and while the client is there."""
        cycle = self._cycle
        return (
            cycle.response_started
            and cycle.chunked_encoding is True
            and not cycle.response_complete
            and not cycle.disconnected
            and self._protocol.cycle is cycle
        )

    @property
    def gone(self) -> bool:
        transport = self._protocol.transport
        return self._cycle.disconnected or transport is None or transport.is_closing()

    @property
    def paused(self) -> bool:
        return bool(self._protocol.flow.write_paused)

    def write(self, data: bytes) -> None:
        """One chunk of the body, framed; nothing for empty data (an empty chunk would end the body)."""
        if data:
            self._protocol.transport.write(b"%x\r\n%b\r\n" % (len(data), data))

    def release(self) -> None:
        self.on_pause = self.on_resume = None


class RelayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus the `ClientSocket` extension and its flow-control hooks."""

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope:
            socket = ClientSocket(self, cycle)
            extensions: dict[str, Any] = self.scope.setdefault("extensions", {})
            extensions[EXTENSION] = socket
            self._client_socket = socket

    def pause_writing(self) -> None:
        super().pause_writing()
        socket: ClientSocket | None = getattr(self, "_client_socket", None)
        if socket is not None and socket.on_pause is not None:
            socket.on_pause()

    def resume_writing(self) -> None:
        super().resume_writing()
        socket: ClientSocket | None = getattr(self, "_client_socket", None)
        if socket is not None and socket.on_resume is not None:
            socket.on_resume()


def uvicorn_config(app: Any, **kwargs: Any) -> Any:
    """The uvicorn Config the gateway is served with (`serve`, the tests' in-process gateways)."""
    import uvicorn

    kwargs.setdefault("loop", "uvloop")
    return uvicorn.Config(app, http=RelayHttpProtocol, **kwargs)
