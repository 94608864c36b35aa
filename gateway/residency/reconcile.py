"""Reconciliation: keeping what residency believes equal to what vLLM has, and to what the registry wants.

on_probe(engine, listed)   after every successful probe of an engine
  `resident` := what vLLM really lists; adapters we had that vLLM lost (it restarted) are loaded
  again, pinned ones too; nothing is reported resident that vLLM does not have. An adapter this
  gateway loaded or unloaded after the probe asked for the listing keeps its state: the listing
  may predate that change (without this, a stale listing dropped adapters with requests in flight
  and brought back ones just evicted). What to believe and what comes back first: `policy.py`.
  Gateways sharing the engine each load into it: above `max_resident`, the idle ones go (`trim`).
on_state_lost(engine)      the engine says what it had loaded is gone (its process died or stopped)
  nothing is resident there any more; what should be (`wanted`) and the recency order stay, so the
  next successful probe restores it.
forget(engine, adapter)    vLLM answered a request that it does not have the adapter
sync(engine, registered)   the registry changed: pins follow it, pinned adapters load now, versions no
  longer registered retire (unloaded once their last lease is released).
prefetch(engine, refs)     adapters just registered load ahead of their first request, into free room only
  (fewer resident than vLLM keeps in memory), in the background.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from gateway.engines.base import Engine, ProbeResult
from gateway.errors import GatewayError
from gateway.registry.catalog import AdapterRef
from gateway.residency import policy
from gateway.residency.leases import Leases
from gateway.residency.loading import Loader
from gateway.residency.state import States

log = logging.getLogger("lora_gateway.residency")


class Reconciler:
    def __init__(self, states: States, loader: Loader, leases: Leases, *, restore_limit: int) -> None:
        self._states = states
        self._loader = loader
        self._leases = leases
        self.restore_limit = restore_limit
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- what vLLM has -------------------------------------------------------------------------
    async def on_probe(self, engine: Engine, result: ProbeResult) -> None:
        state = self._states.of(engine)
        believed, lost = policy.believed_resident(
            state.resident, result.adapters, state.touched, result.started_at
        )
        state.touched.clear()  # the next probe starts after every change made so far
        if lost:
            log.warning("engine %s lost adapters %s (restarted?); restoring", engine.name, sorted(lost))
        recency = list(state.lru)  # before the lost ones leave it
        state.resident = believed
        state.draining &= believed
        for key in recency:
            if key not in believed:
                state.lru.pop(key)
        self._loader.observe_resident(engine)
        missing = {key: ref for key, ref in state.wanted.items() if key not in state.resident}
        for key in policy.restore_order(missing, state.pinned, recency):
            if not policy.may_restore(key, len(state.resident), self.restore_limit, state.pinned):
                break
            try:
                (await self._leases.acquire(engine, missing[key])).release()
            except GatewayError as exc:
                log.warning("engine %s: could not restore %s: %s", engine.name, key, exc.message)
        await self._leases.trim(engine)  # other gateways on this engine loaded too: back to max_resident

    def on_state_lost(self, engine: Engine, reason: str) -> None:
        """Nothing is resident on `engine` until a probe lists it again. Leases still held stay counted:
        their requests end (or fail) and release them."""
        state = self._states.of(engine)
        if not state.resident and not state.draining:
            return
        log.info("engine %s lost what it had loaded (%s): %s", engine.name, reason, sorted(state.resident))
        state.resident.clear()
        state.draining.clear()
        self._loader.observe_resident(engine)
        state.notify()  # requests waiting on a drain look again (and get 503 while the engine is down)

    def forget(self, engine: Engine, key: str) -> None:
        """vLLM answered that it does not have `key` (restarted, or unloaded by someone else)."""
        state = self._states.of(engine)
        state.touched[key] = time.monotonic()
        state.resident.discard(key)
        state.draining.discard(key)
        state.lru.pop(key, None)
        self._loader.observe_resident(engine)
        state.notify()

    # --- what the registry wants ---------------------------------------------------------------
    def want(self, engine: Engine, ref: AdapterRef) -> None:
        """Ask for `ref` to be resident on this engine whenever it is (re)ready."""
        state = self._states.of(engine)
        state.wanted[ref.engine_name] = ref
        if ref.pinned:
            state.pinned.add(ref.engine_name)

    async def sync(self, engine: Engine, registered: dict[str, AdapterRef]) -> None:
        """Follow the registry: pins, retired versions (unloaded once idle), pinned adapters loaded now."""
        state = self._states.of(engine)
        state.pinned = {key for key, ref in registered.items() if ref.pinned}
        state.retiring -= registered.keys()  # removed, then registered again (same bytes) before it went idle
        for key in list(state.wanted):
            if key not in registered:
                del state.wanted[key]
        for key in sorted(state.resident | set(state.lru)):
            if key not in registered and key in state.known:
                state.retiring.add(key)
                if not state.in_flight.get(key):
                    await self._retire_now(engine, key)
        state.retiring &= set(state.resident)
        for key in sorted(state.pinned):
            ref = registered[key]
            state.wanted[key] = ref
            if engine.ready and key not in state.resident:
                try:
                    (await self._leases.acquire(engine, ref)).release()
                except GatewayError as exc:
                    log.warning("engine %s: could not load pinned %s: %s", engine.name, key, exc.message)

    def prefetch(self, engine: Engine, refs: list[AdapterRef]) -> None:
        """Load `refs` ahead of their first request, in the background, one at a time, while fewer than
        `restore_limit` (what vLLM keeps in memory) are resident: into free room only, nothing is evicted
        for them. What comes next stays wanted, as the start-up preload's are (restored after a restart)."""
        state = self._states.of(engine)
        todo = [ref for ref in refs if ref.engine_name not in state.resident]
        if not todo or not engine.ready:
            return

        async def run() -> None:
            for ref in todo:
                if not engine.ready or len(state.resident) + state.loading >= self.restore_limit:
                    return
                if ref.engine_name in state.resident:
                    continue
                state.wanted[ref.engine_name] = ref
                try:
                    (await self._leases.acquire(engine, ref)).release()
                except GatewayError as exc:
                    log.warning("engine %s: could not prefetch %s: %s", engine.name, ref.name, exc.message)
                    return

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def on_idle(self, engine: Engine, key: str) -> None:
        """The last lease of `key` was released: a retiring adapter is unloaded now."""
        if key in self._states.of(engine).retiring:
            task = asyncio.get_running_loop().create_task(self._retire_now(engine, key))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _retire_now(self, engine: Engine, key: str) -> None:
        state = self._states.of(engine)
        async with state.lock(key):
            if key in state.retiring and not state.in_flight.get(key):
                state.retiring.discard(key)
                await self._loader.unload(engine, key, reason="retired")
