"""The set of engines behind one gateway, built from the settings.

- managed: `engine.replicas` vLLM processes on consecutive ports (each with its own GPUs when
  `engine.devices_per_replica` is set), all supervised by this gateway;
- attached: `engine.url` plus `engine.urls`; with `engine.resolve_dns`, every address the host name of
  `engine.url` resolves to is one replica (a Kubernetes headless Service), re-resolved every
  `engine.dns_refresh_s`: new addresses join, vanished ones leave.

Every engine gets the same listeners (residency's reconciliation: probe results, state lost) and the
metrics its `engine_up` gauge is in, also those that join later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from urllib.parse import urlsplit, urlunsplit

from gateway.engines.attached import AttachedEngine
from gateway.engines.base import Engine, ProbeListener, StateLostListener
from gateway.engines.client import EngineClient
from gateway.engines.managed import ManagedEngine
from gateway.metrics import Metrics
from gateway.settings import Settings

log = logging.getLogger("lora_gateway.engine")


class EnginePool:
    def __init__(self, settings: Settings, client: EngineClient, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.client = client
        self.metrics = metrics
        self.engines: list[Engine] = []
        self._listeners: list[ProbeListener] = []
        self._lost_listeners: list[StateLostListener] = []
        self._discovery: asyncio.Task[None] | None = None
        e = settings.engine
        if e.mode == "managed":
            model, served = settings.resolved_engine_model(), settings.base_model_name()
            sizing = settings.lora_sizing()
            log.info(
                "vLLM --max-loras %d --max-cpu-loras %d (%s)", sizing.max_loras, sizing.cpu_loras, sizing.how
            )
            for i in range(e.replicas):
                replica = e.replica(i).model_copy(update=sizing.engine_fields())
                self.engines.append(
                    ManagedEngine(f"engine{i}", replica, model, served, client, metrics=metrics)
                )
        elif not e.resolve_dns:
            for i, url in enumerate(e.attached_urls()):
                self.engines.append(self._attached(f"engine{i}", url))

    def _attached(self, name: str, url: str) -> AttachedEngine:
        e = self.settings.engine
        engine = AttachedEngine(
            name,
            url,
            self.client,
            probe_interval_s=e.health_interval_s,
            unhealthy_after=e.unhealthy_after,
            metrics=self.metrics,
            api_key=e.api_key.get_secret_value() if e.api_key else None,
        )
        for listener in self._listeners:
            engine.add_listener(listener)
        for lost in self._lost_listeners:
            engine.add_state_lost_listener(lost)
        return engine

    def add_listener(self, listener: ProbeListener) -> None:
        self._listeners.append(listener)
        for engine in self.engines:
            engine.add_listener(listener)

    def add_state_lost_listener(self, listener: StateLostListener) -> None:
        self._lost_listeners.append(listener)
        for engine in self.engines:
            engine.add_state_lost_listener(listener)

    async def start(self) -> None:
        for engine in self.engines:
            await engine.start()
        if self.settings.engine.mode == "attached" and self.settings.engine.resolve_dns:
            try:
                await self._resolve_once()
            except OSError as exc:  # no replica scheduled yet (a GPU node pending): 503s until one is
                log.warning("engine addresses do not resolve yet (%s); retrying", exc)
            self._discovery = asyncio.create_task(self._discover(), name="engine-dns")

    async def stop(self) -> None:
        if self._discovery is not None:
            self._discovery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._discovery
        await asyncio.gather(*(engine.stop() for engine in self.engines))

    async def _discover(self) -> None:
        while True:
            await asyncio.sleep(self.settings.engine.dns_refresh_s)
            try:
                await self._resolve_once()
            except OSError as exc:
                log.warning("resolving engine addresses failed (%s); keeping the current replicas", exc)

    async def _resolve_once(self) -> None:
        urls = set()
        for base in self.settings.engine.attached_urls():
            urls |= await resolve_replicas(base)
        current = {e.base_url: e for e in self.engines}
        for url in sorted(urls - current.keys()):
            engine = self._attached(f"engine-{urlsplit(url).netloc}", url)
            self.engines.append(engine)
            await engine.start()
            log.info("engine %s joined (%s)", engine.name, url)
        for url in sorted(current.keys() - urls):
            gone = current[url]
            self.engines.remove(gone)
            await gone.stop()
            log.info("engine %s left (%s no longer resolves)", engine.name, url)


async def resolve_replicas(url: str) -> set[str]:
    """`http://vllm:8000` -> one URL per address the host name resolves to."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    out = set()
    for family, *_, sockaddr in infos:
        host = f"[{sockaddr[0]}]" if family == socket.AF_INET6 else sockaddr[0]
        out.add(urlunsplit((parts.scheme, f"{host}:{port}", parts.path.rstrip("/"), "", "")))
    return out
