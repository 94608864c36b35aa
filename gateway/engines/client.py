"""How the gateway talks to an engine: the interface every engine call goes through.

`create_app(settings, engine_client=...)` takes one, as httpx takes a transport. Production uses
`gateway.upstream.UpstreamClient` (aiohttp, pooled, its transport failures mapped to our errors there);
`tests/fake_engine.py` is an in-memory vLLM for tests of auth, routes, metrics and retries that run in
milliseconds. Whatever implements it raises only `GatewayError`s (gateway/errors.py): a refused
connection is `EngineUnreachableError(refused=True)`, an engine's own 4xx/5xx passes through
`from_upstream`, so no caller inspects a transport library's exceptions.
The engine's key (vLLM's `--api-key`) is the client's to attach: callers pass URLs, never credentials.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol


class EngineResponse(Protocol):
    """An engine's answer: status and headers are in; the body is read whole or chunk by chunk."""

    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    async def read(self) -> bytes: ...

    def iter_chunks(self) -> AsyncIterator[bytes]:
        """Bytes as they arrive (no re-chunking, no buffering)."""
        ...

    def close(self) -> None:
        """Drop the connection: mid-stream, this tells vLLM that the client is gone, so it aborts."""
        ...


class EngineClient(Protocol):
    async def send(
        self,
        method: str,
        url: str,
        *,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        what: str = "engine",
    ) -> EngineResponse:
        """Return once the status and headers are in; the caller reads the body."""
        ...

    async def stream(
        self,
        method: str,
        url: str,
        *,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        what: str = "engine",
    ) -> EngineResponse:
        """`send` for a streamed answer. A response that also has `attach(sink)` (gateway/relay/engine.py)
        hands its chunks to the sink from the read callback; others are iterated."""
        ...

    def authorize(self, base_url: str, api_key: str | None) -> None:
        """Send `Authorization: Bearer <api_key>` on every call to the engine at `base_url` from now on
        (requests, loads and unloads, probes); None: send none."""
        ...

    async def post_json(self, url: str, payload: Any) -> bytes:
        """A small admin call (load/unload an adapter); our error for a non-2xx answer."""
        ...

    # Probes (`/v1/models`, `/metrics`, `/health`): never queued behind requests (their own pool).
    async def get_json(self, url: str, *, timeout: float) -> Any:
        """GET a JSON document (a probe's `/v1/models`); our error for a non-2xx answer."""
        ...

    async def get_text(self, url: str, *, timeout: float) -> tuple[int, str]:
        """GET a text document (vLLM's `/metrics`): status and text."""
        ...

    async def get_status(self, url: str, *, timeout: float) -> int: ...

    async def aclose(self) -> None: ...
