"""Which adapters are loaded in which engine: the only code that calls vLLM's load/unload routes.

    request path        acquire(engine, adapter) -> Lease; release()      leases.py
    engine probes       on_probe(listing), on_state_lost(reason), forget   reconcile.py
    registry changes    want(adapter), sync(registered), prefetch(adapters)  reconcile.py
    vLLM's routes       load, unload                                       loading.py
    decisions           evict, drain, lift, believe, restore (pure)        policy.py
    other gateways      their use of the same engines, via the registry    shared.py
    one engine's state  EngineResidency, read by others as ResidencyView  state.py

Residency owns that state: engines report "state lost" (`Engine.add_state_lost_listener`) and
never touch it; routing, the admin API and garbage collection read it through `view(engine)`.
"""

from __future__ import annotations

from gateway.engines.base import Engine, ProbeResult
from gateway.engines.client import EngineClient
from gateway.metrics import Metrics
from gateway.registry.catalog import AdapterRef
from gateway.residency.leases import Lease, Leases
from gateway.residency.loading import Loader
from gateway.residency.reconcile import Reconciler
from gateway.residency.shared import SharedUse
from gateway.residency.state import ResidencyView, States

__all__ = ["Lease", "Residency", "ResidencyView"]


class Residency:
    def __init__(
        self,
        client: EngineClient,
        metrics: Metrics,
        *,
        max_resident: int,
        restore_limit: int | None = None,
        wait_timeout_s: float = 30.0,
        drain_after_s: float = 1.0,
        retry_after_s: int = 5,
        shared: SharedUse | None = None,
    ) -> None:
        self.max_resident = max_resident
        # After a restart, adapters loaded again at once besides the pinned ones (the most recently used
        # first): what vLLM keeps in memory. The others load on their next request.
        self.restore_limit = min(max_resident, restore_limit or max_resident)
        self.retry_after_s = retry_after_s
        self._states = States()
        self._loader = Loader(client, metrics, self._states, retry_after_s=retry_after_s)
        self._leases = Leases(
            self._states,
            self._loader,
            metrics,
            max_resident=max_resident,
            wait_timeout_s=wait_timeout_s,
            drain_after_s=drain_after_s,
            retry_after_s=retry_after_s,
            on_idle=self._idle,
            shared=shared,
        )
        self._reconciler = Reconciler(
            self._states, self._loader, self._leases, restore_limit=self.restore_limit
        )

    # --- requests --------------------------------------------------------------------------------
    async def acquire(self, engine: Engine, ref: AdapterRef) -> Lease:
        """Lease `ref` on `engine`: resident already, or loaded once (503 + Retry-After if no slot)."""
        return await self._leases.acquire(engine, ref)

    def leases(self, engine: Engine) -> dict[str, dict[str, int]]:
        """Per adapter (engine name): leases acquired and released on this engine so far."""
        return self._leases.counts(engine)

    def forget(self, engine: Engine, key: str) -> None:
        """vLLM answered that it does not have `key` (restarted, or unloaded by someone else)."""
        self._reconciler.forget(engine, key)

    def _idle(self, engine: Engine, key: str) -> None:
        self._reconciler.on_idle(engine, key)

    # --- reading -----------------------------------------------------------------------------------
    def view(self, engine: Engine) -> ResidencyView:
        """What is resident, in flight, draining and loaded when on `engine`, read-only."""
        return ResidencyView(self._states.of(engine))

    # --- engines and registry ------------------------------------------------------------------------
    async def on_probe(self, engine: Engine, result: ProbeResult) -> None:
        """A probe listener (`EnginePool.add_listener`): believe vLLM's listing, restore what it lost."""
        await self._reconciler.on_probe(engine, result)

    def on_state_lost(self, engine: Engine, reason: str) -> None:
        """A state-lost listener (`EnginePool.add_state_lost_listener`): nothing is resident there now."""
        self._reconciler.on_state_lost(engine, reason)

    async def unload(self, engine: Engine, key: str, *, reason: str = "unloaded") -> None:
        """Unload one adapter; idempotent (an adapter vLLM does not have is already unloaded)."""
        await self._loader.unload(engine, key, reason=reason)

    def want(self, engine: Engine, ref: AdapterRef) -> None:
        """Ask for `ref` to be resident on this engine whenever it is (re)ready."""
        self._reconciler.want(engine, ref)

    def prefetch(self, engine: Engine, refs: list[AdapterRef]) -> None:
        """Load `refs` ahead of their first request while vLLM's memory has room (background)."""
        self._reconciler.prefetch(engine, refs)

    async def sync(self, engine: Engine, registered: dict[str, AdapterRef]) -> None:
        """Follow the registry: pins, retired versions (unloaded once idle), pinned adapters loaded now."""
        await self._reconciler.sync(engine, registered)
