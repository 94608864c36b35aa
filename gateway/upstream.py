"""The one HTTP client towards the engines, and the one place where transport errors are translated.

Created in the app's lifespan, closed at shutdown. Explicit timeouts suited to long streams (the read
timeout bounds the gap between two chunks, not the whole response) and explicit connection limits.

    httpx.ConnectError / ConnectTimeout      -> UpstreamError 502 (engine unreachable)
    httpx.PoolTimeout                        -> EngineUnavailableError 503 (gateway saturated)
    httpx.ReadTimeout / WriteTimeout         -> UpstreamTimeoutError 504
    other httpx.TransportError               -> UpstreamError 502
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import httpx

from gateway.errors import (
    EngineUnavailableError,
    GatewayError,
    UpstreamError,
    UpstreamTimeoutError,
    from_upstream,
)
from gateway.settings import Settings

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "content-length"}


def map_transport_error(exc: httpx.TransportError, what: str = "engine") -> GatewayError:
    """Most specific first; the caller raises the result `from exc`."""
    if isinstance(exc, httpx.PoolTimeout):
        return EngineUnavailableError(f"The gateway has no free connection to the {what}; try again.")
    if isinstance(exc, httpx.ConnectTimeout | httpx.ConnectError):
        return UpstreamError(
            f"The {what} is unreachable: {exc.__class__.__name__}.", code="engine_unreachable"
        )
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeoutError(f"The {what} did not answer in time ({exc.__class__.__name__}).")
    return UpstreamError(f"The {what} connection failed: {exc.__class__.__name__}: {exc}".rstrip(": "))


class UpstreamClient:
    """Thin wrapper over one `httpx.AsyncClient`; every engine call goes through it."""

    def __init__(self, settings: Settings, transport: httpx.AsyncBaseTransport | None = None) -> None:
        t = settings.timeouts
        self.admin_timeout = httpx.Timeout(t.admin_s)
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=t.connect_s, read=t.read_s, write=t.write_s, pool=t.pool_s),
            limits=httpx.Limits(
                max_connections=settings.max_connections,
                max_keepalive_connections=settings.max_connections,
                keepalive_expiry=30.0,
            ),
            transport=transport,
            trust_env=False,
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    async def send(
        self,
        method: str,
        url: str,
        *,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        stream: bool = False,
        timeout: httpx.Timeout | None = None,
        what: str = "engine",
    ) -> httpx.Response:
        request = self.client.build_request(
            method,
            url,
            content=content,
            headers=headers,
            timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
        )
        try:
            return await self.client.send(request, stream=stream)
        except httpx.TransportError as exc:
            raise map_transport_error(exc, what) from exc

    async def post_json(
        self, url: str, payload: Any, *, timeout: httpx.Timeout | None = None
    ) -> httpx.Response:
        """A small admin call (load/unload adapter); raises our error for a non-2xx answer."""
        response = await self.send(
            "POST",
            url,
            content=json.dumps(payload).encode(),
            headers={"content-type": "application/json"},
            timeout=timeout or self.admin_timeout,
        )
        if response.status_code >= 400:
            raise from_upstream(response.status_code, response.content)
        return response

    async def get_json(self, url: str, *, timeout: float) -> Any:
        response = await self.send("GET", url, timeout=httpx.Timeout(timeout))
        if response.status_code >= 400:
            raise from_upstream(response.status_code, response.content)
        return response.json()


def passthrough_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Response headers worth passing to the client (no hop-by-hop, no length: we may rewrite the body)."""
    return {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP and k.lower() != "server"}
