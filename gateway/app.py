"""`create_app(settings)`: everything wired in the lifespan, nothing done at import time."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from gateway.api import health, openai
from gateway.engines.attached import AttachedEngine
from gateway.engines.base import Engine
from gateway.engines.managed import ManagedEngine
from gateway.errors import install_error_handlers
from gateway.metrics import Metrics
from gateway.registry.catalog import DirectoryCatalog
from gateway.residency import Residency
from gateway.routing import Router
from gateway.settings import Settings
from gateway.state import GatewayState
from gateway.upstream import UpstreamClient

log = logging.getLogger("lora_gateway")


def build_engine(settings: Settings, client: UpstreamClient) -> Engine:
    e = settings.engine
    if e.mode == "attached":
        return AttachedEngine("engine0", e.base_url, client, probe_interval_s=e.health_interval_s)
    return ManagedEngine("engine0", e, settings.resolved_engine_model(), settings.base_model_name(), client)


def build_state(settings: Settings) -> GatewayState:
    metrics = Metrics()
    client = UpstreamClient(settings)
    catalog = DirectoryCatalog(settings.resolved_adapters_dir(), settings.base_model_name())
    engine = build_engine(settings, client)
    residency = Residency(
        client, metrics, max_resident=settings.engine.max_cpu_loras, retry_after_s=settings.retry_after_s
    )
    engine.add_listener(residency.on_probe)
    for ref in catalog.adapters()[: settings.engine.max_cpu_loras]:
        residency.want(engine, ref)  # preload at start, restore after a restart
    router = Router([engine], retry_after_s=settings.retry_after_s)
    return GatewayState(settings, metrics, client, catalog, [engine], residency, router)


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = build_state(settings)
        app.state.gateway = state
        for engine in state.engines:
            await engine.start()
        log.info(
            "lora-gateway serving %s with %d adapter(s) on engine %s",
            state.catalog.base_name,
            len(state.catalog.adapters()),
            ", ".join(e.base_url for e in state.engines),
        )
        try:
            yield
        finally:
            for engine in state.engines:
                await engine.stop()
            await state.client.aclose()

    app = FastAPI(title="lora-gateway", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(openai.router)
    app.include_router(health.router)
    return app
