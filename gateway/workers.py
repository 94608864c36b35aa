"""`serve --workers N`: N gateway processes on one port over the same engines.

One gateway process relays what one core can (docs/benchmarks.md); a host whose GPUs stream more needs
several. With `--workers N` (N > 1):

    parent      registers the adapters found in adapters_dir once (the workers do not seed: N seeders
                would race to register the same folders), starts and supervises the managed vLLM
                replicas (if any), binds the port and runs uvicorn's process supervisor, which
                restarts a worker that dies
    worker i    a whole gateway (`create_app`) attached to the engines: its own connection pools and
                probes, the registry and adapter store shared with the others (a SQLite file in WAL
                mode works for processes of one host; PostgreSQL across hosts), and residency
                coordinated through that registry (gateway/residency/shared.py), as replicas of a
                Deployment are

The kernel spreads connections over the workers (they accept on the same socket). Each worker keeps
its own Prometheus metrics: `/metrics` answers for the worker that took the scrape (scrape each
worker, or run one gateway per pod as deploy/ does). The settings reach the workers in a file only
the gateway's user can read (they hold the engine and admin keys), removed at exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import pickle
import secrets
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from pydantic import SecretStr

from gateway.settings import Settings

log = logging.getLogger("lora_gateway")

SETTINGS_FILE_ENV = "LORA_GATEWAY_WORKER_SETTINGS_FILE"


def worker_settings(settings: Settings) -> Settings:
    """What every worker runs: attached to the engines (the parent supervises managed ones), no seeding."""
    engine = settings.engine
    if engine.mode == "managed":
        urls = [engine.replica(i).base_url for i in range(engine.replicas)]
        sized = settings.lora_sizing()  # what the parent starts vLLM with: the workers must count the same
        update = {"mode": "attached", "url": urls[0], "urls": urls[1:], **sized.engine_fields()}
        engine = engine.model_copy(update=update)
    registry = settings.registry.model_copy(update={"seed_adapters_dir": False})
    return settings.model_copy(update={"engine": engine, "registry": registry})


def with_engine_key(settings: Settings) -> Settings:
    """A managed vLLM without `engine.api_key` gets a random key of its own (gateway/engines/managed.py);
    with workers, they need it too, so it is chosen once, here, for the parent's vLLM and every worker."""
    if settings.engine.mode != "managed" or settings.engine.api_key is not None:
        return settings
    key = SecretStr(secrets.token_urlsafe(32))
    return settings.model_copy(update={"engine": settings.engine.model_copy(update={"api_key": key})})


def app() -> FastAPI:
    """The app factory each worker process calls (uvicorn `factory=True`)."""
    from gateway.app import create_app
    from gateway.log import setup_logging

    settings = pickle.loads(Path(os.environ[SETTINGS_FILE_ENV]).read_bytes())
    if not isinstance(settings, Settings):
        raise TypeError(f"{os.environ[SETTINGS_FILE_ENV]} does not hold gateway settings")
    setup_logging(settings.log_level)
    return create_app(settings)


@contextlib.contextmanager
def settings_file(settings: Settings) -> Iterator[Path]:
    fd, name = tempfile.mkstemp(prefix="lora-gateway-workers-", suffix=".pickle")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(settings, f)
        yield Path(name)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


class EngineSupervisor:
    """The managed engines, run by the parent on an event loop in a thread of their own."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="engines", daemon=True)
        self._pool: Any = None
        self._client: Any = None

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result()

    async def _start(self) -> None:
        from gateway.engines.pool import EnginePool
        from gateway.upstream import UpstreamClient

        self._client = UpstreamClient(self.settings)
        self._pool = EnginePool(self.settings, self._client)
        await self._pool.start()

    def stop(self) -> None:
        async def stop() -> None:
            await self._pool.stop()
            await self._client.aclose()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


def seed_once(settings: Settings) -> None:
    """Register what adapters_dir holds, once, before the workers start."""
    from gateway.app import build_registry

    async def seed() -> None:
        registry = await build_registry(settings)
        await asyncio.to_thread(registry.store.close)

    asyncio.run(seed())


def serve_workers(settings: Settings, workers: int, **uvicorn_options: Any) -> None:
    """Run `workers` gateway processes on settings.host:settings.port until SIGINT/SIGTERM."""
    import uvicorn

    from gateway.relay.client import RelayHttpProtocol

    settings = with_engine_key(settings)
    if settings.registry.seed_adapters_dir:
        seed_once(settings)
    supervisor = EngineSupervisor(settings) if settings.engine.mode == "managed" else None
    if supervisor is not None:
        supervisor.start()
    try:
        with settings_file(worker_settings(settings)) as path:
            os.environ[SETTINGS_FILE_ENV] = str(path)
            log.info("starting %d gateway workers on %s:%d", workers, settings.host, settings.port)
            uvicorn.run(
                "gateway.workers:app",
                factory=True,
                workers=workers,
                http=RelayHttpProtocol,
                host=settings.host,
                port=settings.port,
                log_level=settings.log_level,
                timeout_graceful_shutdown=math.ceil(settings.engine.stop_timeout_s),
                proxy_headers=False,
                **uvicorn_options,
            )
    finally:
        if supervisor is not None:
            supervisor.stop()
