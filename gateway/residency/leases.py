"""Leases: one request's hold on one adapter in one engine, and the waiting for a slot.

acquire(engine, adapter) -> Lease
  resident?  yes -> count one more request in flight
             no  -> under the adapter's lock (singleflight: one load, the others wait for it)
                    make room, load it
Lease.release()  always, exactly once (success, error, client gone): the adapter becomes evictable.

Making room when every slot is taken: the least recently used idle adapter (not pinned) is unloaded.
When every resident adapter has requests in flight, the load waits for one to go idle. Under steady
traffic the popular ones never do, so a load that has waited `drain_after_s` *drains* one: the
resident adapter with the fewest requests in flight (then the least recently used) takes no new
requests; the ones it has finish; it is unloaded as soon as it is idle, within one generation time,
and no adapter starves behind busy ones. Requests for a draining adapter wait (the router sends them
to another replica that has it, if any), then load it again. Draining at once would be fairer but
costs loads: a drained adapter is usually still wanted, and reloading it drains another (measured
in docs/benchmarks.md). One adapter drains per overdue load, never more; when a load stops waiting
(it found room, or gave up), the drains it no longer needs are lifted. A load that finds no room
within `wait_timeout_s` answers 503 + Retry-After, and so does a request whose adapter drained for
longer than that. Which adapter is evicted, drained or lifted: `policy.py`.

Waits, deadlines and drains run on the event loop's clock (`_now()`): a test's loop may run on
virtual time (tests/test_residency.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from gateway.engines.base import Engine
from gateway.errors import EngineUnavailableError
from gateway.metrics import Metrics
from gateway.registry.catalog import AdapterRef
from gateway.residency import policy
from gateway.residency.loading import Loader
from gateway.residency.shared import SharedUse
from gateway.residency.state import EngineResidency, States

log = logging.getLogger("lora_gateway.residency")

# An aborted request's lease is held until vLLM's metrics no longer show its adapter running or queued
# (vLLM aborts at its next step, ~0.1-0.3 s on this CPU), polled this often, for at most this long.
ABORT_POLL_S = 0.05
ABORT_SETTLE_S = 10.0


def _now() -> float:
    """The event loop's clock (time.monotonic() in production) for waits, deadlines and drains: a test's
    loop may run on virtual time. `touched` stays on time.monotonic(), the clock of a probe's start."""
    return asyncio.get_running_loop().time()


class Lease:
    """One request's hold on one adapter in one engine; `release()` is idempotent."""

    __slots__ = ("_leases", "engine", "engine_name", "_released")

    def __init__(self, leases: Leases, engine: Engine, engine_name: str) -> None:
        self._leases = leases
        self.engine = engine
        self.engine_name = engine_name
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._leases.release(self.engine, self.engine_name)

    def release_when_vllm_stops(self) -> None:
        """The request ended early (client gone, a timeout, a broken stream): the gateway dropped its
        connection, but vLLM aborts it only at its next step. The hold stays until vLLM no longer runs the
        adapter (or `ABORT_SETTLE_S`), so nothing evicts an adapter vLLM is still using."""
        if not self._released:
            self._released = True
            self._leases.release_when_vllm_stops(self.engine, self.engine_name)


class Leases:
    def __init__(
        self,
        states: States,
        loader: Loader,
        metrics: Metrics,
        *,
        max_resident: int,
        wait_timeout_s: float,
        drain_after_s: float,
        retry_after_s: int,
        on_idle: Callable[[Engine, str], None],
        shared: SharedUse | None = None,
    ) -> None:
        self._states = states
        self._loader = loader
        self._metrics = metrics
        self.max_resident = max_resident
        self.wait_timeout_s = wait_timeout_s
        self.drain_after_s = drain_after_s
        self.retry_after_s = retry_after_s
        self._on_idle = on_idle  # the last lease of an adapter was released (a retiring one goes now)
        self._shared = shared  # the other gateways' use of the same engines (None: this gateway alone)
        self._settling: set[asyncio.Task[None]] = set()  # leases waiting for vLLM to stop an aborted request

    async def acquire(self, engine: Engine, ref: AdapterRef) -> Lease:
        state, key = self._states.of(engine), ref.engine_name
        if key in state.resident and key not in state.draining:  # the hot path
            self._hold(engine, state, key)
            return Lease(self, engine, key)
        started = _now()
        deadline = started + self.wait_timeout_s
        while True:
            if key in state.resident:
                if key not in state.draining:
                    break
                await self._wait(engine, state, deadline)  # it leaves (then we load it again) or stays
                continue
            async with state.lock(key):
                if key in state.resident:  # another request loaded it while we waited for the lock
                    continue
                if self._shared is not None and await self._loaded_elsewhere(engine, ref, deadline):
                    break
                await self._make_room(engine, state, deadline)
                if self._shared is not None:  # the other gateways wait for this load instead of making room
                    await self._shared.announce(engine.base_url, key, state.in_flight.get(key, 0) + 1)
                try:
                    await self._loader.load(engine, ref)
                finally:
                    state.loading -= 1
                    if self._shared is not None and key not in state.resident:  # it failed: no longer loading
                        self._shared.touch(engine.base_url, key, state.in_flight.get(key, 0))
                break
        self._hold(engine, state, key)
        metrics = self._metrics
        metrics.child(metrics.adapter_wait, metrics.detail(ref.name, count=False)).observe(_now() - started)
        return Lease(self, engine, key)

    def _hold(self, engine: Engine, state: EngineResidency, key: str) -> None:
        n = state.in_flight[key] = state.in_flight.get(key, 0) + 1
        state.acquired[key] = state.acquired.get(key, 0) + 1
        state.lru[key] = None
        state.lru.move_to_end(key)
        if self._shared is not None:
            now = state.last_used[key] = time.time()
            self._shared.touch(engine.base_url, key, n, now)

    def release(self, engine: Engine, key: str) -> None:
        """Called by `Lease.release()`, once per lease."""
        state = self._states.of(engine)
        state.released[key] = state.released.get(key, 0) + 1
        in_flight = state.in_flight
        n = in_flight[key] = max(0, in_flight.get(key, 0) - 1)
        if self._shared is not None:
            self._shared.touch(engine.base_url, key, n)
        if not n:
            del in_flight[key]
            state.notify()
            self._on_idle(engine, key)

    def release_when_vllm_stops(self, engine: Engine, key: str) -> None:
        task = asyncio.get_running_loop().create_task(self._release_when_vllm_stops(engine, key))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _release_when_vllm_stops(self, engine: Engine, key: str) -> None:
        try:
            for _ in range(round(ABORT_SETTLE_S / ABORT_POLL_S)):  # vLLM is polled: it has no event for this
                if not await self._loader.still_running(engine, key):
                    break
                await asyncio.sleep(ABORT_POLL_S)
        finally:
            self.release(engine, key)

    def counts(self, engine: Engine) -> dict[str, dict[str, int]]:
        """Per adapter (engine name): leases acquired and released on this engine so far."""
        state = self._states.of(engine)
        return {k: {"acquired": n, "released": state.released.get(k, 0)} for k, n in state.acquired.items()}

    async def _wait(
        self, engine: Engine, state: EngineResidency, deadline: float, wake_at: float | None = None
    ) -> None:
        """Wait for the next change of residency, or `wake_at`, or 1 s, whichever comes first (the
        caller then looks again); past `deadline`, 503 + Retry-After."""
        now = _now()
        remaining = deadline - now
        if remaining <= 0:
            raise EngineUnavailableError(
                f"All {self.max_resident} adapter slots of engine {engine.name} are busy; try again.",
                retry_after_s=self.retry_after_s,
                code="adapter_slots_busy",
            )
        # Other gateways' requests end without waking us: look again soon when they share the engine.
        longest = 1.0 if self._shared is None else self._shared.interval_s * 4
        with contextlib.suppress(TimeoutError):
            timeout = min(remaining, longest, longest if wake_at is None else max(wake_at - now, 0.0))
            await asyncio.wait_for(state.changed.wait(), timeout=timeout)

    async def _make_room(self, engine: Engine, state: EngineResidency, deadline: float) -> None:
        """Reserve a slot for one load: evict an idle adapter if the engine is full; after
        `drain_after_s` with none idle, drain a busy one."""
        drain_at = _now() + self.drain_after_s
        overdue = False
        try:
            while len(state.resident) + state.loading >= self.max_resident:
                victim = await self._victim(engine, state)
                if victim is not None:
                    await self._evict(engine, state, victim)
                    continue
                if not overdue and _now() >= drain_at:
                    overdue = True
                    state.overdue_loads += 1
                if overdue:
                    self._drain(engine, state)
                await self._wait(engine, state, deadline, None if overdue else drain_at)
        finally:
            if overdue:
                state.overdue_loads -= 1
                self._undrain(state)
        state.loading += 1

    async def _loaded_elsewhere(self, engine: Engine, ref: AdapterRef, deadline: float) -> bool:
        """Another gateway sharing the engine loaded `ref` (vLLM lists it: adopt it, no room to make), or is
        loading it (it announced the load: wait for vLLM to list it). False: this gateway loads it."""
        assert self._shared is not None
        if not (await self._shared.others(engine.base_url)).gateways:
            return False  # alone on this engine lately: what others loaded earlier, the probes have seen
        while True:
            if await self._loader.listed(engine, ref.engine_name):
                self._loader.adopt(engine, ref)
                return True
            others = await self._shared.others(engine.base_url)
            if not others.in_flight.get(ref.engine_name) or _now() >= deadline:
                return False
            await asyncio.sleep(self._shared.interval_s * 4)

    async def _victim(self, engine: Engine, state: EngineResidency) -> str | None:
        """The idle adapter to evict: idle here and, with other gateways sharing the engine, idle there too,
        the least recently used by any of them. One busy only elsewhere is never evicted: this load waits
        for it to go idle there (and drains one here when overdue, as with one gateway)."""
        locked = state.locked()
        if self._shared is None:
            return policy.eviction_candidate(state.resident, state.lru, state.in_flight, state.pinned, locked)
        others = await self._shared.others(engine.base_url)
        order = policy.by_last_use(state.resident, state.last_used, others.last_used)
        busy = policy.add_counts(state.in_flight, others.in_flight)
        victim = policy.eviction_candidate(state.resident, order, busy, state.pinned, locked)
        if victim is not None and others.gateways and not await self._still_idle(engine, state, victim):
            return None  # another gateway started using it meanwhile: look again
        return victim

    async def _still_idle(self, engine: Engine, state: EngineResidency, key: str) -> bool:
        """Look again after a few publishing intervals: a request another gateway admitted just before the
        first look has been published by then (without this second look, such requests lost their adapter
        often enough under churn to crash vLLM 0.32's engine: docs/deploy.md)."""
        assert self._shared is not None
        await asyncio.sleep(self._shared.confirm_s)
        others = await self._shared.others(engine.base_url)
        return key in state.resident and not state.in_flight.get(key) and not others.in_flight.get(key)

    async def trim(self, engine: Engine) -> None:
        """Several gateways sharing an engine each loaded into it at once: more of this registry's adapters
        are resident than `max_resident` (one gateway alone never goes over). The idle ones go, the least
        recently used by any gateway first, down to `max_resident`. Only adapters a gateway sharing this
        registry has used count and go: others' (a gateway of another registry on the same engine, or
        loaded before a restart) are left to making room, which evicts them first when a slot is needed.
        Every gateway orders them alike (last use anywhere), so two trimming at once pick the same ones."""
        state = self._states.of(engine)
        if self._shared is None or len(state.resident) + state.loading <= self.max_resident:
            return
        others = await self._shared.others(engine.base_url)
        used = state.last_used.keys() | others.last_used.keys()
        ours = {key for key in state.resident if key in used}
        busy = policy.add_counts(state.in_flight, others.in_flight)
        locked = state.locked()
        for key in policy.by_last_use(ours, state.last_used, others.last_used):
            if len(ours & state.resident) + state.loading <= self.max_resident:
                break
            idle = not busy.get(key) and key not in state.pinned and key not in locked
            if idle and (not others.gateways or await self._still_idle(engine, state, key)):
                await self._evict(engine, state, key)

    def _drain(self, engine: Engine, state: EngineResidency) -> None:
        """Stop admitting requests to busy adapters, one per overdue load, so that slots come free."""
        chosen = policy.to_drain(
            state.resident,
            state.lru,
            state.in_flight,
            state.draining,
            state.pinned,
            state.locked(),
            state.overdue_loads,
        )
        for key in chosen:
            state.draining.add(key)
            self._metrics.adapter_drains.labels(state.label(key)).inc()
            log.info(
                "engine %s: draining adapter %s (%d in flight) to make room",
                engine.name,
                key,
                state.in_flight.get(key, 0),
            )

    @staticmethod
    def _undrain(state: EngineResidency) -> None:
        """Lift the drains no waiting load needs any more: their requests go on."""
        lifted = policy.drains_to_lift(state.draining, state.in_flight, state.overdue_loads)
        if lifted:
            state.draining.difference_update(lifted)
            state.notify()

    async def _evict(self, engine: Engine, state: EngineResidency, key: str) -> None:
        """Unload `key` under its own lock (load and unload of one adapter never overlap). The lock is
        free (see `policy.eviction_candidate`), so taking it does not wait; check again all the same."""
        async with state.lock(key):
            if key in state.resident and not state.in_flight.get(key) and key not in state.pinned:
                await self._loader.unload(engine, key, reason="evicted")
