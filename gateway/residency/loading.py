"""The engine calls: vLLM's `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`, called from here only.

Both are idempotent (an adapter vLLM already has is loaded; one it does not have is unloaded), and
both stamp `touched`, so that a probe's listing asked for before the call cannot undo it
(`policy.believed_resident`). Callers hold the adapter's lock (`EngineResidency.lock`).
"""

from __future__ import annotations

import logging
import re
import time

from gateway.engines.base import Engine, listed_adapters
from gateway.engines.client import EngineClient
from gateway.errors import EngineUnavailableError, GatewayError, UpstreamError
from gateway.metrics import Metrics
from gateway.registry.catalog import AdapterRef
from gateway.residency.state import States

log = logging.getLogger("lora_gateway.residency")


_LORA_INFO = re.compile(r"^vllm:lora_requests_info\{([^}]*)\} (\S+)$", re.M)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def running_adapters(metrics_text: str) -> set[str] | None:
    """The adapters vLLM's scheduler ran or queued in its latest step, from its Prometheus text: the
    `vllm:lora_requests_info` sample with the newest value (each label set's value is the time it was
    last set). None when vLLM does not say (no such metric)."""
    newest: tuple[float, set[str]] | None = None
    for labels, value in _LORA_INFO.findall(metrics_text):
        at = float(value)
        if newest is None or at > newest[0]:
            found = dict(_LABEL.findall(labels))
            names = found.get("running_lora_adapters", "") + "," + found.get("waiting_lora_adapters", "")
            newest = (at, {n for n in names.split(",") if n})
    return None if newest is None else newest[1]


class Loader:
    def __init__(self, client: EngineClient, metrics: Metrics, states: States, *, retry_after_s: int) -> None:
        self._client = client
        self._metrics = metrics
        self._states = states
        self._retry_after_s = retry_after_s

    async def still_running(self, engine: Engine, key: str) -> bool:
        """Does vLLM still run or queue a request for `key`? False when it cannot say (then nothing waits)."""
        try:
            status, text = await self._client.get_text(engine.url("/metrics"), timeout=2.0)
        except GatewayError:
            return False
        running = running_adapters(text) if status == 200 else None
        return running is not None and key in running

    async def listed(self, engine: Engine, key: str) -> bool:
        """Does vLLM list `key` now (a gateway sharing the engine loaded it)? False when it cannot say."""
        try:
            data = await self._client.get_json(engine.url("/v1/models"), timeout=5.0)
        except (GatewayError, ValueError):
            return False
        return key in (listed_adapters(data) or set())

    def adopt(self, engine: Engine, ref: AdapterRef) -> None:
        """`ref` is resident: someone else loaded it (a gateway sharing the engine)."""
        state = self._states.of(engine)
        state.touched[ref.engine_name] = time.monotonic()  # a listing older than this cannot undo it
        state.resident.add(ref.engine_name)
        state.wanted[ref.engine_name] = ref
        state.known.add(ref.engine_name)
        if ref.pinned:
            state.pinned.add(ref.engine_name)
        self.observe_resident(engine)

    async def load(self, engine: Engine, ref: AdapterRef) -> None:
        if not engine.ready:
            raise EngineUnavailableError(
                f"Engine {engine.name} is not ready.", retry_after_s=self._retry_after_s
            )
        state = self._states.of(engine)
        state.touched[ref.engine_name] = time.monotonic()
        started = time.perf_counter()
        payload = {"lora_name": ref.engine_name, "lora_path": str(ref.path)}
        try:
            await self._client.post_json(engine.url("/v1/load_lora_adapter"), payload)
        except GatewayError as exc:
            if "already been loaded" not in exc.message:  # idempotent: vLLM has it, so do we
                self._metrics.adapter_loads.labels(ref.name, "error").inc()
                log.warning("engine %s: loading %s failed: %s", engine.name, ref.engine_name, exc.message)
                if isinstance(exc, EngineUnavailableError):
                    raise
                raise UpstreamError(
                    f"Loading adapter `{ref.name}` failed: {exc.message}", code="adapter_load_failed"
                ) from exc
        elapsed = time.perf_counter() - started
        self._metrics.adapter_loads.labels(ref.name, "ok").inc()
        metrics = self._metrics
        metrics.child(metrics.adapter_load_duration, metrics.detail(ref.name, count=False)).observe(elapsed)
        state.touched[ref.engine_name] = time.monotonic()
        state.resident.add(ref.engine_name)
        state.last_load_at[ref.engine_name] = time.time()
        state.wanted[ref.engine_name] = ref
        state.known.add(ref.engine_name)
        if ref.pinned:
            state.pinned.add(ref.engine_name)
        self.observe_resident(engine)
        log.info("engine %s: loaded adapter %s in %.1f ms", engine.name, ref.engine_name, elapsed * 1000)

    async def unload(self, engine: Engine, key: str, *, reason: str = "unloaded") -> None:
        """Unload one adapter; idempotent (an adapter vLLM does not have is already unloaded)."""
        state = self._states.of(engine)
        label = state.label(key)
        state.wanted.pop(key, None)
        state.touched[key] = time.monotonic()
        state.resident.discard(key)
        state.draining.discard(key)
        state.lru.pop(key, None)
        try:
            await self._client.post_json(engine.url("/v1/unload_lora_adapter"), {"lora_name": key})
        except GatewayError as exc:
            if exc.status_code != 404:
                log.warning("engine %s: unloading %s failed: %s", engine.name, key, exc.message)
        state.touched[key] = time.monotonic()
        state.resident.discard(key)  # again: a listing older than the unload may have re-added it
        if reason == "evicted":
            self._metrics.adapter_evictions.labels(label).inc()
        self.observe_resident(engine)
        state.notify()  # requests waiting for it while it drained go and load it again
        log.info("engine %s: %s adapter %s", engine.name, reason, key)

    def observe_resident(self, engine: Engine) -> None:
        self._metrics.resident_adapters.labels(engine.name).set(len(self._states.of(engine).resident))
