"""`create_app(settings)`: everything wired in the lifespan, nothing done at import time."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from gateway.api import admin, health, keys, openai
from gateway.engines.client import EngineClient
from gateway.engines.pool import EnginePool
from gateway.errors import install_error_handlers
from gateway.metrics import Metrics
from gateway.registry.blobs import BlobStore
from gateway.registry.open import open_store
from gateway.registry.service import Registry, RegistryLimits, load_base_spec
from gateway.residency import Residency
from gateway.residency.shared import SharedUse
from gateway.routing import Router
from gateway.settings import Settings
from gateway.state import GatewayState
from gateway.tenancy.access import access_logger
from gateway.tenancy.keys import Keyring, open_hasher
from gateway.tenancy.limits import open_limiter
from gateway.tenancy.usage import UsageRecorder
from gateway.tracing import configure_tracing
from gateway.upstream import UpstreamClient

log = logging.getLogger("lora_gateway")


async def build_registry(settings: Settings) -> Registry:
    data = settings.data_dir
    await asyncio.to_thread(data.mkdir, parents=True, exist_ok=True)
    store = await asyncio.to_thread(open_store, settings.registry.url or data / "registry.sqlite3")
    blobs = BlobStore(settings.registry.store_dir or data / "adapters")
    await asyncio.to_thread(blobs.cleanup_partial)
    base_name = settings.base_model_name()
    base = await asyncio.to_thread(load_base_spec, settings.resolved_engine_model(), base_name)
    limits = RegistryLimits(
        max_rank=settings.engine.max_lora_rank,
        max_bytes=settings.registry.max_adapter_bytes,
        allowed_roots=settings.allowed_roots(),
        s3_buckets=settings.registry.s3_buckets,
    )
    registry = Registry(store, blobs, base, base_name, limits)
    await registry.refresh()
    if settings.registry.seed_adapters_dir:
        added = await registry.seed(settings.resolved_adapters_dir())
        if added:
            log.info(
                "registered adapters found in %s: %s", settings.resolved_adapters_dir(), ", ".join(added)
            )
    await registry.gc(keep=set())
    return registry


ClientFactory = Callable[[Settings], EngineClient]


async def build_state(settings: Settings, engine_client: ClientFactory = UpstreamClient) -> GatewayState:
    metrics = Metrics(histogram_models=settings.metrics.histogram_models)
    client = engine_client(settings)
    registry = await build_registry(settings)
    metrics.set_fixed({registry.base_name})
    pool = EnginePool(settings, client, metrics)
    shared = (
        SharedUse(registry.store, interval_s=settings.registry.share_use_interval_s)
        if settings.registry.share_use
        else None
    )
    residency = Residency(
        client,
        metrics,
        max_resident=settings.max_resident(),
        restore_limit=settings.preload_count(),
        wait_timeout_s=settings.registry.load_wait_timeout_s,
        drain_after_s=settings.registry.drain_after_s,
        retry_after_s=settings.retry_after_s,
        shared=shared,
    )
    pool.add_listener(residency.on_probe)
    pool.add_state_lost_listener(residency.on_state_lost)
    # Preload at start (and restore after a restart): pinned adapters everywhere; with one engine, also
    # the others, as many as it keeps in memory. With several, routing places adapters where asked for.
    current = sorted(registry.adapters(), key=lambda r: not r.pinned)
    for engine in pool.engines:
        for i, ref in enumerate(current[: settings.max_resident()]):
            if ref.pinned or (len(pool.engines) == 1 and i < settings.preload_count()):
                residency.want(engine, ref)

    seen = {ref.engine_name for ref in registry.versions()}

    async def follow_registry() -> None:
        registered = {ref.engine_name: ref for ref in registry.versions()}
        for e in list(pool.engines):
            await residency.sync(e, registered)
        # Registered since: with one engine, loaded ahead of their first request while vLLM's memory has
        # room, as the start-up preload does (with several, routing places adapters where asked for).
        new = [ref for key, ref in registered.items() if key not in seen]
        seen.update(registered)
        if new and len(pool.engines) == 1:
            residency.prefetch(pool.engines[0], new)

    registry.on_change(follow_registry)
    router = Router(
        lambda: pool.engines,
        retry_after_s=settings.retry_after_s,
        max_resident=settings.max_resident(),
        policy=settings.routing,
        residency=residency.view,
    )
    secret = settings.auth.key_hash_secret
    hasher = await asyncio.to_thread(
        open_hasher, registry.store, secret.get_secret_value() if secret is not None else None
    )
    keyring = Keyring(hasher, registry.store, settings.auth.api_keys, settings.auth.require_api_key)
    await keyring.refresh()
    registry.on_change(keyring.refresh)  # a key made or revoked by any gateway sharing the registry
    limiter = open_limiter(
        settings.limits.redis_url,
        prefix=settings.limits.redis_prefix,
        on_error=settings.limits.on_redis_error,
    )
    usage = UsageRecorder(registry.store, interval_s=settings.usage.flush_interval_s)
    return GatewayState(
        settings,
        metrics,
        client,
        registry,
        pool,
        residency,
        router,
        keyring,
        limiter,
        usage,
        shared,
        tracing=configure_tracing(),
        access=access_logger(settings.access_log),
    )


async def collect_garbage(state: GatewayState, interval_s: float = 300.0) -> None:
    """Delete stored adapter files that no ready version references and no engine still has loaded."""
    while True:
        await asyncio.sleep(interval_s)
        resident = set().union(*(state.residency.view(e).resident for e in state.engines))
        try:
            removed = await state.registry.gc(keep=resident)
        except Exception:
            log.exception("adapter store garbage collection failed")
            continue
        if removed:
            log.info("removed %d unreferenced adapter blob(s)", len(removed))


def create_app(settings: Settings, engine_client: ClientFactory = UpstreamClient) -> FastAPI:
    """The gateway's ASGI app. `engine_client(settings)` builds, inside the running loop, what every engine
    call goes through (gateway/engines/client.py): aiohttp in production, an in-memory vLLM in fast tests."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = await build_state(settings, engine_client)
        app.state.gateway = state
        await state.pool.start()
        log.info(
            "lora-gateway serving %s with %d adapter(s) on engine %s",
            state.registry.base_name,
            len(state.registry.adapters()),
            ", ".join(e.base_url for e in state.engines),
        )
        collector = asyncio.create_task(collect_garbage(state), name="blob-gc")
        follower = asyncio.create_task(
            state.registry.follow(settings.registry.poll_interval_s), name="registry-follow"
        )
        publisher = (
            asyncio.create_task(state.shared.run(), name="adapter-use") if state.shared is not None else None
        )
        accountant = asyncio.create_task(state.usage.run(), name="usage")
        try:
            yield
        finally:
            collector.cancel()
            follower.cancel()
            if publisher is not None:
                publisher.cancel()
            accountant.cancel()
            await asyncio.gather(accountant, return_exceptions=True)
            await state.usage.close()  # after the last request (uvicorn drained them): nothing is lost
            await state.limiter.aclose()
            if state.tracing is not None:
                await asyncio.to_thread(state.tracing.shutdown)
            await state.pool.stop()
            if state.shared is not None:
                await state.shared.close()
            await state.client.aclose()
            await asyncio.to_thread(state.registry.store.close)

    app = FastAPI(title="lora-gateway", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(openai.router)
    app.include_router(health.router)
    app.include_router(admin.router)
    app.include_router(keys.router)
    return app
