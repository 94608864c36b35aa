"""When a ready engine leaves routing: real HTTP on loopback against a stand-in `/v1/models` that can be
told to answer late, and then taken away.

No timing window: a late probe meets a listing that never comes (held until the test ends), so its
short timeout surely fires; a probe that must be answered gets a long one, so a loaded machine cannot
make it late.

A vLLM that answers one probe late under load is still serving; taking it out would turn its
slowness into 503s for every request (seen in the thrash benchmark at 64 clients). A closed port
means the server is gone: out at once.
"""

from __future__ import annotations

import asyncio
import threading
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
LATE = threading.Event()  # set: the listing is held back until RELEASE
RELEASE = threading.Event()
LATE_TIMEOUT_S, ANSWER_TIMEOUT_S = 0.2, 30.0


async def models(_: Request) -> JSONResponse:
    if LATE.is_set():
        await asyncio.to_thread(RELEASE.wait)  # set from the test's thread
    return JSONResponse({"object": "list", "data": [{"id": "base", "object": "model", "parent": None}]})


APP = Starlette(routes=[Route("/v1/models", models)])


async def probe(engine: Engine, late: bool, answered: bool, state: EngineState, failed: int) -> None:
    if late:
        LATE.set()
    else:
        LATE.clear()
    engine.probe_timeout_s = LATE_TIMEOUT_S if late else ANSWER_TIMEOUT_S
    assert await engine.probe_once() is answered
    assert (engine.status.state, engine.status.failed_probes) == (state, failed)
    assert engine.describe()["failed_probes"] == failed


def test_late_probes_keep_a_ready_engine_until_unhealthy_after() -> None:
    async def main() -> None:
        client = UpstreamClient(Settings())
        engine = Engine("engine0", url, client, probe_interval_s=1.0, unhealthy_after=3)
        try:
            await probe(engine, False, True, READY, 0)
            await probe(engine, True, False, READY, 1)  # late: still routed to
            await probe(engine, True, False, READY, 2)
            await probe(engine, False, True, READY, 0)  # answered again: the count starts over
            await probe(engine, True, False, READY, 1)
            await probe(engine, True, False, READY, 2)
            await probe(engine, True, False, OUT, 3)  # unhealthy_after late answers in a row: out
            await probe(engine, False, True, READY, 0)
        finally:
            LATE.clear()
            RELEASE.set()  # the held listings finish, so the server can stop
            await client.aclose()

    with serve_in_thread(APP) as url:
        asyncio.run(main())


def test_a_closed_port_takes_a_ready_engine_out_at_once() -> None:
    async def main() -> None:
        client = UpstreamClient(Settings())
        try:
            with serve_in_thread(APP) as url:
                engine = Engine("engine0", url, client, probe_interval_s=1.0, unhealthy_after=3)
                await probe(engine, False, True, READY, 0)
            started = time.monotonic()  # the server and its socket are closed now
            await probe(engine, False, False, OUT, 1)  # refused at once, not after the 30 s timeout
            assert time.monotonic() - started < ANSWER_TIMEOUT_S / 2
        finally:
            await client.aclose()

    asyncio.run(main())
