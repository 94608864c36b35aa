"""The one HTTP client towards the engines, and the one place where transport errors are translated.

aiohttp, not httpx: on the hot path httpx cost ~700-800 us of CPU per proxied request against
~100 us for aiohttp (measured with loadtest/, see docs/benchmarks.md); on a small machine that is
the difference between ~1,000 and several thousand requests per second per gateway process.

Created in the app's lifespan (it needs the running loop), closed at shutdown. Explicit timeouts
suited to long streams: `read_s` bounds the silence between two chunks, not the whole response.

    every pooled connection busy for `timeouts.pool_s`     -> EngineUnavailableError 503 `overloaded` +
                                                              Retry-After (no cool-down: the engine is fine)
    probes and health checks: a small pool of their own, so a full request pool never fails them
    aiohttp.ClientConnectorError, ConnectionTimeoutError   -> UpstreamError 502 (engine unreachable)
    aiohttp.SocketTimeoutError / ServerTimeoutError, TimeoutError -> UpstreamTimeoutError 504
    other aiohttp.ClientError (disconnects, bad payloads)   -> UpstreamError 502

Every call to an engine the gateway was given a key for (`authorize`: a managed vLLM's key, or
`engine.api_key`) carries `Authorization: Bearer <key>`: requests, adapter loads and unloads, probes.
The key is known per engine origin (scheme://host:port) and goes nowhere else.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from gateway.engines.client import EngineResponse
from gateway.errors import (
    EngineUnavailableError,
    EngineUnreachableError,
    GatewayError,
    UpstreamError,
    UpstreamTimeoutError,
    from_upstream,
)
from gateway.relay.engine import EngineStreams
from gateway.settings import Settings

TRANSPORT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)
PROBE_CONNECTIONS = 16  # the probes' own pool, all engines together (2 per engine)


def map_transport_error(exc: BaseException, what: str = "engine") -> GatewayError:
    """Most specific first; the caller raises the result `from exc`."""
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return EngineUnreachableError(
            f"The {what} is unreachable: {exc.__class__.__name__}.",
            refused=isinstance(exc, aiohttp.ClientConnectorError),
        )
    if isinstance(exc, aiohttp.ServerTimeoutError | asyncio.TimeoutError):
        return UpstreamTimeoutError(f"The {what} did not answer in time ({exc.__class__.__name__}).")
    return UpstreamError(f"The {what} connection failed: {exc.__class__.__name__}: {exc}".rstrip(": "))


class UpstreamResponse:
    """An engine's answer: status, headers, and the body read whole or chunk by chunk."""

    __slots__ = ("_response", "status_code", "headers", "_what")

    def __init__(self, response: aiohttp.ClientResponse, what: str) -> None:
        self._response = response
        self.status_code = response.status
        self.headers = response.headers
        self._what = what

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except TRANSPORT_ERRORS as exc:
            raise map_transport_error(exc, self._what) from exc
        finally:
            self._response.release()

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """Bytes as they arrive (no re-chunking, no buffering)."""
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except TRANSPORT_ERRORS as exc:
            raise map_transport_error(exc, self._what) from exc

    def close(self) -> None:
        """Drop the connection; mid-stream this tells vLLM the client is gone, so it aborts."""
        self._response.close()


# Each hook notes in the request's trace context (`send` passes a dict; other calls pass none).
async def _queued(_: Any, ctx: Any, __: Any) -> None:
    if ctx.trace_request_ctx is not None:
        ctx.trace_request_ctx["queued"] = True


async def _dequeued(_: Any, ctx: Any, __: Any) -> None:
    if ctx.trace_request_ctx is not None:
        ctx.trace_request_ctx["queued"] = False


async def _reused(_: Any, ctx: Any, __: Any) -> None:
    if ctx.trace_request_ctx is not None:
        ctx.trace_request_ctx["reused"] = True


class UpstreamClient:
    """The `EngineClient` (gateway/engines/client.py) on aiohttp: one `aiohttp.ClientSession` for every
    engine call; build it inside the running loop."""

    def __init__(self, settings: Settings) -> None:
        t = settings.timeouts
        self.max_connections = settings.max_connections
        self.retry_after_s = settings.retry_after_s
        # aiohttp reports a wait for a pooled connection and a slow connect as the same timeout; its
        # trace signals say which one it was (a full pool is a busy engine, 503, not an unreachable one).
        pool_trace = aiohttp.TraceConfig()
        pool_trace.on_connection_queued_start.append(_queued)
        pool_trace.on_connection_queued_end.append(_dequeued)
        pool_trace.on_connection_reuseconn.append(_reused)
        self.timeout = aiohttp.ClientTimeout(
            total=None, connect=t.pool_s + t.connect_s, sock_connect=t.connect_s, sock_read=t.read_s
        )
        self.admin_timeout = aiohttp.ClientTimeout(total=t.admin_s, sock_connect=t.connect_s)
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=settings.max_connections,
                limit_per_host=settings.max_connections,
                keepalive_timeout=30,
                ttl_dns_cache=60,
            ),
            timeout=self.timeout,
            auto_decompress=False,  # bytes pass through as the engine sent them
            trust_env=False,
            skip_auto_headers=("User-Agent",),
            trace_configs=[pool_trace],
        )
        # Probes and health checks on a small pool of their own: a pool full of requests must not make a
        # healthy engine look dead (its probes would wait behind the requests, time out, and take it out).
        self.probes = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=PROBE_CONNECTIONS, limit_per_host=2, keepalive_timeout=30),
            timeout=aiohttp.ClientTimeout(total=t.admin_s, sock_connect=t.connect_s),
            auto_decompress=False,
            trust_env=False,
            skip_auto_headers=("User-Agent",),
        )
        self._auth: dict[str, dict[str, str]] = {}  # engine origin -> its Authorization header
        # Streams: at the protocol level (gateway/relay/engine.py), unless configured to go through aiohttp.
        self.streams = (
            EngineStreams(
                max_connections=settings.max_connections,
                connect_s=t.connect_s,
                read_s=t.read_s,
                pool_s=t.pool_s,
                retry_after_s=settings.retry_after_s,
                headers_for=self._headers,
            )
            if settings.stream_relay == "socket"
            else None
        )

    async def aclose(self) -> None:
        if self.streams is not None:
            self.streams.close()
        await self.session.close()
        await self.probes.close()

    async def send(
        self,
        method: str,
        url: str,
        *,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        what: str = "engine",
    ) -> UpstreamResponse:
        """Send and return once the status and headers are in; the body is read by the caller."""
        trace: dict[str, bool] = {}
        kwargs: dict[str, Any] = {
            "data": content,
            "headers": self._headers(url, headers),
            "trace_request_ctx": trace,
        }
        if timeout is not None:
            kwargs["timeout"] = aiohttp.ClientTimeout(total=timeout)
        try:
            try:
                response = await self.session.request(method, url, **kwargs)
            except aiohttp.ServerDisconnectedError:
                # A kept-alive connection the engine closed as it was reused (its idle timeout): nothing
                # reached it. Once more, on another connection, rather than taking a healthy replica out.
                if not trace.pop("reused", False):
                    raise
                response = await self.session.request(method, url, **kwargs)
        except TRANSPORT_ERRORS as exc:
            if trace.get("queued") and isinstance(exc, aiohttp.ConnectionTimeoutError):
                raise EngineUnavailableError(
                    f"All {self.max_connections} connections to the {what} are busy; try again.",
                    retry_after_s=self.retry_after_s,
                    code="overloaded",
                ) from exc
            raise map_transport_error(exc, what) from exc
        return UpstreamResponse(response, what)

    async def stream(
        self,
        method: str,
        url: str,
        *,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        what: str = "engine",
    ) -> EngineResponse:
        """`send` for a streamed answer: on the protocol-level pool, whose responses also `attach` a sink."""
        if self.streams is None or method != "POST":
            return await self.send(method, url, content=content, headers=headers, what=what)
        return await self.streams.send(url, content=content or b"", headers=headers, what=what)

    def authorize(self, base_url: str, api_key: str | None) -> None:
        """From now on send `Authorization: Bearer <api_key>` on every call to `base_url` (None: none)."""
        if api_key:
            self._auth[_origin(base_url)] = {"authorization": f"Bearer {api_key}"}
        else:
            self._auth.pop(_origin(base_url), None)

    def _headers(self, url: str, headers: Mapping[str, str] | None) -> Mapping[str, str] | None:
        """`headers` with the engine's key, replacing any other Authorization."""
        auth = self._auth.get(_origin(url))
        if auth is None:
            return headers
        if not headers:
            return auth
        return {k: v for k, v in headers.items() if k.lower() != "authorization"} | auth

    async def post_json(self, url: str, payload: Any) -> bytes:
        """A small admin call (load/unload adapter); raises our error for a non-2xx answer. Sent again once
        when the engine closed a kept-alive connection as it was reused (both calls are idempotent: an
        adapter already loaded, or already gone, is success to residency)."""
        data = json.dumps(payload).encode()
        headers = self._headers(url, {"content-type": "application/json"})
        for attempt in (1, 2):
            try:
                async with self.session.post(
                    url, data=data, headers=headers, timeout=self.admin_timeout
                ) as r:
                    status, body = r.status, await r.read()
            except aiohttp.ServerDisconnectedError as exc:
                if attempt == 1:
                    continue
                raise map_transport_error(exc) from exc
            except TRANSPORT_ERRORS as exc:
                raise map_transport_error(exc) from exc
            if status >= 400:
                raise from_upstream(status, body)
            return body
        raise AssertionError("unreachable")

    async def _probe(self, url: str, timeout: float) -> tuple[int, bytes]:
        """GET on the probes' own pool: status and body."""
        try:
            async with self.probes.get(
                url, headers=self._headers(url, None), timeout=aiohttp.ClientTimeout(total=timeout)
            ) as response:
                return response.status, await response.read()
        except TRANSPORT_ERRORS as exc:
            raise map_transport_error(exc) from exc

    async def get_json(self, url: str, *, timeout: float) -> Any:
        status, body = await self._probe(url, timeout)
        if status >= 400:
            raise from_upstream(status, body)
        return json.loads(body)

    async def get_text(self, url: str, *, timeout: float) -> tuple[int, str]:
        status, body = await self._probe(url, timeout)
        return status, body.decode("utf-8", "replace")

    async def get_status(self, url: str, *, timeout: float) -> int:
        return (await self._probe(url, timeout))[0]


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"
