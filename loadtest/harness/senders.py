"""What a request is sent as, and the clients that send it.

A ``Job`` is a full URL, a ``RequestSpec`` and a tag (``direct``/``gateway`` in the overhead run),
so one run can interleave targets. A ``Sender`` is the HTTP client: httpx by default, aiohttp
(``loadtest.harness.aiohttp_sender``) where the generator's own CPU cost matters; both read responses
through ``loadtest.harness.parse`` and translate their own exceptions into :class:`SendError`, here
and nowhere else.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from loadtest.harness.parse import StreamParser, read_body
from loadtest.harness.records import RequestResult
from loadtest.harness.workload import RequestSpec


@dataclass(frozen=True, slots=True)
class Job:
    url: str
    spec: RequestSpec
    tag: str = ""


def base_url(url: str) -> str:
    """``http://host:port`` from ``http://host:port``, ``.../`` or ``.../v1``."""
    url = url.rstrip("/")
    return url.removesuffix("/v1")


def jobs_for(target: str, specs: Iterable[RequestSpec], tag: str = "") -> list[Job]:
    root = base_url(target)
    return [Job(root + s.path, s, tag) for s in specs]


class SendError(Exception):
    """A request got no usable HTTP response; ``kind`` names the cause (the client's exception class)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Sender(Protocol):
    """Sends one job and fills its record (status, timings, tokens) through ``loadtest.harness.parse``.

    Transport failures are raised as :class:`SendError`, the one boundary where a client's own
    exceptions are translated. Senders are async context managers owning their connection pool.
    """

    async def send(self, job: Job, rec: RequestResult, start: float) -> None: ...

    async def __aenter__(self) -> Sender: ...

    async def __aexit__(self, *exc: Any) -> None: ...


def make_client(
    *, api_key: str | None = None, timeout_s: float = 60.0, max_connections: int = 256
) -> httpx.AsyncClient:
    """The one httpx client of a run: explicit limits and timeouts, no proxies from the environment."""
    headers = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    return httpx.AsyncClient(
        headers=headers,
        limits=httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=30.0,
        ),
        timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)),
        trust_env=False,
    )


class HttpxSender:
    """The default sender: one ``httpx.AsyncClient`` (made by :func:`make_client` unless given)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def __aenter__(self) -> HttpxSender:
        await self.client.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.client.__aexit__(*exc)

    async def send(self, job: Job, rec: RequestResult, start: float) -> None:
        try:
            if not job.spec.stream:
                resp = await self.client.post(job.url, content=job.spec.body)
                rec.e2e = time.perf_counter() - start
                read_body(rec, resp.status_code, resp.content)
                return
            async with self.client.stream("POST", job.url, content=job.spec.body) as resp:
                if resp.status_code >= 400:
                    body = await resp.aread()
                    rec.e2e = time.perf_counter() - start
                    read_body(rec, resp.status_code, body)
                    return
                rec.status = resp.status_code
                parser = StreamParser(rec, start)
                async for line in resp.aiter_lines():
                    if parser.feed(line):
                        break
                parser.finish()
        except httpx.HTTPError as exc:
            raise SendError(type(exc).__name__, str(exc) or type(exc).__name__) from exc


CLIENTS = ("httpx", "aiohttp")


def make_sender(
    kind: str = "httpx", *, api_key: str | None = None, timeout_s: float = 60.0, max_connections: int = 256
) -> Sender:
    """``httpx`` (default, a project dependency) or ``aiohttp`` (several times less CPU per request)."""
    if kind == "httpx":
        return HttpxSender(make_client(api_key=api_key, timeout_s=timeout_s, max_connections=max_connections))
    if kind == "aiohttp":
        try:
            from loadtest.harness.aiohttp_sender import AiohttpSender
        except ImportError as exc:
            raise ValueError("client: 'aiohttp' needs the aiohttp package (pip install aiohttp)") from exc
        return AiohttpSender(api_key=api_key, timeout_s=timeout_s, max_connections=max_connections)
    raise ValueError(f"client: must be one of {CLIENTS}, got {kind!r}")
