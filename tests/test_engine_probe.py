"""When a ready engine leaves routing: real HTTP on loopback against a stand-in `/v1/models` that can be
told to answer late, and then taken away.

A vLLM that answers one probe late under load is still serving; taking it out would turn its
slowness into 503s for every request (seen in the thrash benchmark at 64 clients). A closed port
means the server is gone: out at once.
"""

from __future__ import annotations

import asyncio
import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.engines.base import Engine, EngineState
from gateway.settings import Settings
from gateway.upstream import UpstreamClient
from loadtest.servers.serving import serve_in_thread

READY, OUT = EngineState.READY, EngineState.UNAVAILABLE
DELAY = {"s": 0.0}


async def models(_: Request) -> JSONResponse:
    await asyncio.sleep(DELAY["s"])
    return JSONResponse({"object": "list", "data": [{"id": "base", "object": "model", "parent": None}]})


APP = Starlette(routes=[Route("/v1/models", models)])


async def probe(engine: Engine, delay_s: float, answered: bool, state: EngineState, failed: int) -> None:
    DELAY["s"] = delay_s
    assert await engine.probe_once() is answered
    assert (engine.status.state, engine.status.failed_probes) == (state, failed)
    assert engine.describe()["failed_probes"] == failed


def test_late_probes_keep_a_ready_engine_until_unhealthy_after() -> None:
    async def main() -> None:
        client = UpstreamClient(Settings())
        engine = Engine("engine0", url, client, probe_interval_s=1.0, unhealthy_after=3)
        engine.probe_timeout_s = 0.2
        try:
            await probe(engine, 0.0, True, READY, 0)
            await probe(engine, 1.0, False, READY, 1)  # late: still routed to
            await probe(engine, 1.0, False, READY, 2)
            await probe(engine, 0.0, True, READY, 0)  # answered again: the count starts over
            await probe(engine, 1.0, False, READY, 1)
            await probe(engine, 1.0, False, READY, 2)
            await probe(engine, 1.0, False, OUT, 3)  # unhealthy_after late answers in a row: out
            await probe(engine, 0.0, True, READY, 0)
        finally:
            DELAY["s"] = 0.0
            await client.aclose()

    with serve_in_thread(APP) as url:
        asyncio.run(main())


def test_a_closed_port_takes_a_ready_engine_out_at_once() -> None:
    async def main() -> None:
        client = UpstreamClient(Settings())
        try:
            with serve_in_thread(APP) as url:
                engine = Engine("engine0", url, client, probe_interval_s=1.0, unhealthy_after=3)
                await probe(engine, 0.0, True, READY, 0)
            started = time.monotonic()  # the server and its socket are closed now
            await probe(engine, 0.0, False, OUT, 1)
            assert time.monotonic() - started < 2
        finally:
            await client.aclose()

    asyncio.run(main())
