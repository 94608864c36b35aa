"""What an engine reports by itself, with no request and no `/health` call: real HTTP on loopback against a
stand-in `/v1/models`, probed by the engine's own monitor (an attached engine in an `EnginePool`, with
residency listening as in the gateway).

- The engine reports "state lost" instead of clearing residency's state: residency, listening, forgets
  what was resident there.
- `lora_gateway_engine_up` follows the engine's state: 1 once a probe answers, 0 as soon as a probe finds
  the server gone, 0 when the engine is stopped. (It used to be set to 1 by residency at each probe and
  to 0 only by `GET /health`: without health traffic, a dead engine kept reporting up.)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.engines.base import Engine, EngineState
from gateway.engines.pool import EnginePool
from gateway.metrics import Metrics
from gateway.residency import Residency
from gateway.settings import Settings
from gateway.upstream import UpstreamClient
from loadtest.servers.serving import serve_in_thread


async def models(_: Request) -> JSONResponse:
    data = [
        {"id": "base", "object": "model", "parent": None},
        {"id": "lora-x", "object": "model", "parent": "base"},
    ]
    return JSONResponse({"object": "list", "data": data})


APP = Starlette(routes=[Route("/v1/models", models)])


@dataclass
class Watched:
    pool: EnginePool
    engine: Engine
    residency: Residency
    metrics: Metrics
    kill_server: Callable[[], None]

    def gauge(self, name: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, {"engine": self.engine.name})


@contextlib.asynccontextmanager
async def watched_engine() -> AsyncIterator[Watched]:
    """An attached engine probed every 50 ms, wired to residency as `gateway/app.py` does; not started."""
    metrics, client = Metrics(), UpstreamClient(Settings())
    with contextlib.ExitStack() as server:
        url = server.enter_context(serve_in_thread(APP))
        settings = Settings(engine={"mode": "attached", "url": url, "health_interval_s": 0.05})
        pool = EnginePool(settings, client, metrics)
        residency = Residency(client, metrics, max_resident=2)
        pool.add_listener(residency.on_probe)
        pool.add_state_lost_listener(residency.on_state_lost)
        [engine] = pool.engines
        try:
            yield Watched(pool, engine, residency, metrics, server.close)
        finally:
            await pool.stop()
            await client.aclose()


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    """A deadline, not a window: the engine's monitor probes every 50 ms; 30 s is only the give-up."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


def test_an_engine_that_dies_reports_state_lost_and_residency_forgets_what_was_there() -> None:
    async def main() -> None:
        async with watched_engine() as w:
            await w.pool.start()
            await until(lambda: w.residency.view(w.engine).resident == {"lora-x"}, "residency follows vLLM")
            w.kill_server()  # its port closed: the next probe is refused
            await until(lambda: w.engine.status.state == EngineState.UNAVAILABLE, "the engine notices")
            assert w.residency.view(w.engine).resident == set(), "state lost: nothing resident there"
            assert w.gauge("lora_gateway_resident_adapters") == 0

    asyncio.run(main())


def test_engine_up_follows_the_probes_without_health_traffic() -> None:
    async def main() -> None:
        async with watched_engine() as w:
            assert w.gauge("lora_gateway_engine_up") == 0, "not ready yet"
            await w.pool.start()
            await until(lambda: w.gauge("lora_gateway_engine_up") == 1, "up once a probe answers")
            w.kill_server()  # nobody calls /health
            await until(lambda: w.gauge("lora_gateway_engine_up") == 0, "a dead engine must not report up")
            assert w.engine.status.state == EngineState.UNAVAILABLE
            await w.pool.stop()
            assert w.engine.status.state == EngineState.STOPPED and w.gauge("lora_gateway_engine_up") == 0

    asyncio.run(main())
