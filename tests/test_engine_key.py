"""The engine's key (vLLM's `--api-key`) on every call the gateway makes to that engine, and nowhere else.

Real HTTP on loopback against a stand-in vLLM that records the `Authorization` header of each call:
probes (`/v1/models`, `/metrics`, `/health`), adapter loads, and proxied requests (whose own
`Authorization`, a client's key, must never reach vLLM). The same server under another origin
(`localhost` instead of `127.0.0.1`) is another engine, given no key: it gets none.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from gateway.engines.pool import EnginePool
from gateway.settings import Settings
from gateway.upstream import UpstreamClient
from loadtest.servers.serving import serve_in_thread

KEY = "engine-key-for-tests"
SEEN: list[tuple[str, str | None]] = []  # (path, Authorization) of each call


async def record(request: Request) -> Response:
    SEEN.append((request.url.path, request.headers.get("authorization")))
    if request.url.path == "/v1/models":
        return JSONResponse({"object": "list", "data": [{"id": "base", "object": "model", "parent": None}]})
    if request.url.path == "/metrics":
        return PlainTextResponse("vllm:num_requests_waiting 0\n")
    return PlainTextResponse("ok")


APP = Starlette(
    routes=[
        Route("/v1/models", record),
        Route("/metrics", record),
        Route("/health", record),
        Route("/v1/load_lora_adapter", record, methods=["POST"]),
        Route("/v1/chat/completions", record, methods=["POST"]),
    ]
)


@pytest.fixture
def engine_url() -> Iterator[str]:
    SEEN.clear()
    with serve_in_thread(APP) as url:
        yield url.rstrip("/")


def test_every_call_to_an_attached_engine_carries_its_key(engine_url: str, tmp_path: Path) -> None:
    other = engine_url.replace("127.0.0.1", "localhost")  # another origin: an engine with no key

    async def main() -> None:
        settings = Settings(data_dir=tmp_path, engine={"mode": "attached", "url": engine_url, "api_key": KEY})
        client = UpstreamClient(settings)
        try:
            (engine,) = EnginePool(settings, client).engines
            assert await engine.probe_once()  # /v1/models and /metrics
            assert await client.get_status(engine.url("/health"), timeout=5) == 200
            await client.post_json(engine.url("/v1/load_lora_adapter"), {"lora_name": "a", "lora_path": "/a"})
            response = await client.send(
                "POST",
                engine.url("/v1/chat/completions"),
                content=b"{}",
                headers={"Authorization": "Bearer a-client-key", "x-request-id": "r1"},
            )
            await response.read()
            assert KEY not in str(engine.describe()) and KEY not in repr(settings)
            SEEN.append(("--", None))
            assert await client.get_status(other + "/health", timeout=5) == 200
            await client.post_json(other + "/v1/load_lora_adapter", {})
        finally:
            await client.aclose()

    asyncio.run(main())
    mine, others = SEEN[: SEEN.index(("--", None))], SEEN[SEEN.index(("--", None)) + 1 :]
    assert [path for path, _ in mine] == [
        "/v1/models",
        "/metrics",
        "/health",
        "/v1/load_lora_adapter",
        "/v1/chat/completions",
    ]
    assert {auth for _, auth in mine} == {f"Bearer {KEY}"}, "the engine's key, never the client's"
    assert others == [("/health", None), ("/v1/load_lora_adapter", None)]


def test_authorize_none_stops_sending_the_key(engine_url: str) -> None:
    async def main() -> None:
        client = UpstreamClient(Settings())
        try:
            client.authorize(engine_url, KEY)
            assert await client.get_status(engine_url + "/health", timeout=5) == 200
            client.authorize(engine_url, None)
            assert await client.get_status(engine_url + "/health", timeout=5) == 200
        finally:
            await client.aclose()

    asyncio.run(main())
    sent = [auth for _, auth in SEEN]
    assert sent == [f"Bearer {KEY}", None]
